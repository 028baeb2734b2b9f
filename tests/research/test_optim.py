"""Muon + AdamW: orthogonalization, parameter groups, and the progress-driven schedules.

Run: python -m pytest -q tests/research/test_optim.py
"""
import pytest
import torch

from src.harness.config import ModelConfig, OptimizerConfig
from src.research.model import GPT, GPTConfig
from src.research.optim import build_optimizer, orthogonalize


def tiny_model():
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_model_config(ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=16), 257))
    m.init_weights()
    return m


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128)])
def test_orthogonalize_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(2, shape[0], k))
    V, _ = torch.linalg.qr(torch.randn(2, shape[1], k))
    G = U @ torch.diag_embed(torch.logspace(-2, 1, k).expand(2, k)) @ V.mT  # condition number 1000
    s = torch.linalg.svdvals(orthogonalize(G, 5).float())
    assert s.shape[-1] == k
    # condition number 1000 -> under 5: most singular values land near 1, none above ~1.15
    assert s.max() < 1.3 and s.median() > 0.8 and (s.max(-1).values / s.min(-1).values).max() < 5
    assert torch.linalg.svdvals(G).min() < 0.05


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_every_parameter_is_in_exactly_one_group(name):
    m = tiny_model()
    opt = build_optimizer(m, OptimizerConfig(name=name))
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    kinds = {g["kind"] for g in opt.param_groups}
    assert kinds == ({"muon", "adamw"} if name == "muon" else {"adamw"})


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_a_few_steps_on_one_batch_lower_its_loss(name):
    m = tiny_model()
    cfg = OptimizerConfig(name=name)
    opt = build_optimizer(m, cfg)
    x = torch.randint(0, 257, (4, 16))
    losses = []
    for step in range(8):
        opt.schedule(1.0, 0.0, step, cfg)
        logits = m(x)  # the model returns logits only (B, T, vocab); the loss is the step's
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), x.roll(-1, 1).view(-1))
        loss.backward()
        opt.step()
        m.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_lr_momentum_and_weight_decay_schedules_follow_the_harness_multiplier_and_budget_progress():
    """The LR multiplier is the harness's (src/harness/budget.py lr_multiplier, tests/harness/test_budget.py)."""
    m = tiny_model()
    cfg = OptimizerConfig(weight_decay=0.2, momentum_warmup_steps=300)
    opt = build_optimizer(m, cfg)
    opt.schedule(0.25, 0.5, 150, cfg)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert all(g["momentum"] == pytest.approx(0.90) for g in muon)  # halfway from 0.85 to 0.95
    assert all(g["weight_decay"] == pytest.approx(0.1) for g in muon)  # decays linearly to 0
    assert all(g["lr"] == pytest.approx(0.25 * g["initial_lr"]) for g in opt.param_groups)  # the harness's multiplier
