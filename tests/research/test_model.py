"""The GPT: derived widths, sliding windows and the forward contract.

Its parameter counts and FLOPs are the harness's, from the config: tests/harness/test_model_facts.py.

Run: python -m pytest -q tests/research/test_model.py
"""
import math

import pytest
import torch

from src.harness.config import ModelConfig
from src.research.model import GPT, GPTConfig


def build(model_cfg: ModelConfig, vocab: int, device="meta") -> GPT:
    with torch.device(device):
        return GPT(GPTConfig.from_model_config(model_cfg, vocab))


def test_widths_derive_from_depth():
    c = GPTConfig.from_model_config(ModelConfig(depth=8, aspect_ratio=64, head_dim=128), 8192)
    assert (c.n_embd, c.n_head, c.n_kv_head) == (512, 4, 4)
    c = GPTConfig.from_model_config(ModelConfig(depth=3, aspect_ratio=50, head_dim=64, n_kv_head=1), 257)
    assert (c.n_embd, c.n_head, c.n_kv_head) == (192, 3, 1)  # 150 rounded up to a multiple of 64


def test_window_pattern_repeats_with_a_full_last_layer_and_value_embeds_alternate():
    c = GPTConfig.from_model_config(ModelConfig(depth=5, sequence_len=256, window_pattern="SSL"), 257)
    assert c.window_sizes() == [128, 128, 256, 128, 256]  # last layer always full
    assert [i for i in range(5) if c.has_ve(i)] == [0, 2, 4]  # alternating, last included


@pytest.mark.parametrize("bad", [dict(window_pattern="SXL"), dict(activation="tanh"), dict(n_kv_head=3)])
def test_bad_model_knobs_are_refused_naming_the_knob(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GPTConfig.from_model_config(ModelConfig(depth=4, aspect_ratio=32, head_dim=64, **bad), 257)


def test_sliding_window_is_honoured():
    """A token beyond the window of every layer cannot influence the output; inside it, it does."""
    torch.manual_seed(0)
    m = build(ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=16, window_pattern="S"), 257, "cpu")
    m.init_weights()
    for p in m.parameters():  # break the zero-init identity so attention actually mixes
        p.data.add_(0.05 * torch.randn_like(p))
    m.window_sizes = [4, 4]  # both layers see only 4 tokens: position 15 depends on positions >= 9
    x = torch.randint(0, 257, (1, 16))
    x2 = x.clone()
    x2[0, 0] = (x[0, 0] + 1) % 257
    out, out2 = m(x)[0, -1], m(x2)[0, -1]
    assert torch.allclose(out, out2, atol=1e-6)
    x3 = x.clone()
    x3[0, 13] = (x[0, 13] + 1) % 257
    assert not torch.allclose(out, m(x3)[0, -1], atol=1e-6)


def test_forward_returns_capped_logits_for_input_ids_only_with_gqa():
    torch.manual_seed(0)
    m = build(ModelConfig(depth=2, aspect_ratio=64, head_dim=32, n_kv_head=2, sequence_len=32,
                          activation="gelu"), 257, "cpu")
    m.init_weights()
    x, y = torch.randint(0, 257, (2, 32)), torch.randint(0, 257, (2, 32))
    logits = m(x)
    assert logits.shape == (2, 32, 257) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft-capped
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 257), y.view(-1))
    assert abs(loss.item() - math.log(257)) < 0.05  # near-uniform at init
    with pytest.raises(TypeError):
        m(x, y)  # the contract: input ids only; targets never reach the model
