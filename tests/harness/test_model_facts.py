"""The harness's model facts (src/harness/model_facts.py) against the real GPT built from the same config.

Run: python -m pytest -q tests/harness/test_model_facts.py
"""
import pytest
import torch

from src.harness.config import ModelConfig
from src.harness.model_facts import model_facts
from src.research.model import GPT, GPTConfig
from tests.support.helpers import compose_train_cfg

CONFIGS = [
    (ModelConfig(), 257),  # the CPU default
    (ModelConfig(depth=3, aspect_ratio=50, head_dim=64, n_kv_head=1, window_pattern="sl"), 257),  # GQA, rounding
    (ModelConfig(depth=5, head_dim=32, value_embeds=False, mlp_ratio=3, sequence_len=64), 300),
    (ModelConfig(depth=2, aspect_ratio=64, head_dim=32, n_kv_head=2, ve_gate_channels=16, window_pattern="L"), 64),
]


def counts_of(model: GPT) -> dict:
    """The parameters of the real model, per group, summed over p.numel()."""
    def n(params) -> int:
        return sum(p.numel() for p in params)
    groups = {"wte": n(model.wte.parameters()), "value_embeds": n(model.value_embeds.parameters()),
              "lm_head": n(model.lm_head.parameters()), "transformer_matrices": n(model.blocks.parameters()),
              "scalars": n([model.resid_lambdas, model.x0_lambdas])}
    groups["total"] = n(model.parameters())
    return groups


@pytest.mark.parametrize("m,vocab", CONFIGS)
def test_the_harness_counts_equal_the_real_models(m, vocab):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_model_config(m, vocab))
    facts = model_facts(m, vocab)
    assert facts.params == counts_of(model)
    assert sum(v for k, v in facts.params.items() if k != "total") == facts.num_params
    assert list(facts.windows) == model.window_sizes
    assert list(facts.ve_layers) == sorted(int(k) for k in model.value_embeds)
    c = model.config
    assert (facts.width, facts.n_head, facts.n_kv_head) == (c.n_embd, c.n_head, c.n_kv_head)


@pytest.mark.parametrize("preset,expected", [("small", 11_534_472), ("h100", 50_332_176)])
def test_presets_have_the_reference_parameter_counts(preset, expected):
    cfg = compose_train_cfg([f"model={preset}", "data=climbmix"])
    facts = model_facts(cfg.model, cfg.data.vocab_size)
    assert cfg.data.vocab_size == 8192 and facts.num_params == expected
    if preset == "h100":
        assert facts.params["value_embeds"] == 16_777_216  # the reference's 16.8M of value embeddings


def test_flops_per_token_are_six_per_matmul_weight_plus_attention():
    m = ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=16, window_pattern="S")
    f = model_facts(m, 257)
    assert f.windows == (8, 16)  # S = half the context; the last layer always full
    dense = f.params["lm_head"] + f.params["transformer_matrices"]
    assert f.flops_per_token == 6 * dense + 12 * f.n_head * 32 * (8 + 16)


def test_widths_windows_and_value_embeds_derive_from_the_knobs():
    f = model_facts(ModelConfig(depth=5, sequence_len=256, window_pattern="SSL"), 257)
    assert f.windows == (128, 128, 256, 128, 256) and f.ve_layers == (0, 2, 4)
    f = model_facts(ModelConfig(depth=3, aspect_ratio=50, head_dim=64, n_kv_head=1), 257)
    assert (f.width, f.n_head, f.n_kv_head) == (192, 3, 1)  # 150 rounded up to a multiple of 64
    assert "windows [64, 64, 128]" in f.describe() and "FLOPs per token" in f.describe()


@pytest.mark.parametrize("bad", [dict(window_pattern="SXL"), dict(n_kv_head=3)])
def test_bad_knobs_are_refused_naming_the_knob(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        model_facts(ModelConfig(depth=4, aspect_ratio=32, head_dim=64, **bad), 257)
