"""val_bpb arithmetic against a hand-computed value.

Run: python -m pytest -q tests/harness/test_evaluate.py
"""
import math

import pytest
import torch

from src.harness.evaluate import evaluate_bpb


V = 5
Z = -torch.arange(V, dtype=torch.float64) / 100  # fixed logits: the loss of target t is logsumexp(Z) + t / 100


class FixedLogits(torch.nn.Module):
    """A stand-in model that returns the same logits Z at every position (input ids only, as the contract says)."""

    def forward(self, x):
        return Z.float().expand(*x.shape, V).clone()


def test_bpb_from_logits_matches_a_hand_computed_value_for_any_windowing_and_skips_special_tokens():
    # tokens: 0 is a special (0 bytes), 1..3 are 1-byte tokens, 4 is a 3-byte token
    token_bytes = torch.tensor([0, 1, 1, 1, 3])
    tokens = torch.tensor([0, 1, 4, 2, 0, 3, 4])
    # targets = tokens[1:] = 1, 4, 2, 0, 3, 4 -> the special 0 is excluded from both sums
    lse = math.log(sum(math.exp(-k / 100) for k in range(V)))
    nats = sum(lse + t / 100 for t in (1, 4, 2, 3, 4))
    nbytes = 1 + 3 + 1 + 1 + 3
    expected = nats / (math.log(2) * nbytes)
    for seq_len, bs in [(2, 1), (3, 2), (6, 4), (4, 1)]:  # full windows, a short tail, one window
        got = evaluate_bpb(FixedLogits(), tokens, token_bytes, seq_len, bs, torch.device("cpu"))
        assert abs(got - expected) < 1e-6, (seq_len, bs, got, expected)


def test_a_model_that_returns_no_logits_is_refused_with_the_contract():
    class Losses(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape)  # per-token "losses" instead of logits

    with pytest.raises(ValueError, match=r"expects logits \(B, T, vocab\)"):
        evaluate_bpb(Losses(), torch.arange(10), torch.ones(10, dtype=torch.long), 4, 2, torch.device("cpu"))


def test_bpb_of_a_fresh_model_is_independent_of_the_batch_size_and_near_log2_vocab():
    from src.harness.config import ModelConfig
    from src.research.model import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig.from_model_config(ModelConfig(depth=1, aspect_ratio=64, head_dim=32, sequence_len=16), 257))
    m.init_weights()
    tokens = torch.randint(0, 256, (200,))
    tb = torch.ones(257, dtype=torch.long)
    a = evaluate_bpb(m, tokens, tb, 16, 4, torch.device("cpu"))
    b = evaluate_bpb(m, tokens, tb, 16, 7, torch.device("cpu"))
    assert abs(a - b) < 1e-6
    assert abs(a - math.log2(257)) < 0.1  # near-uniform predictions at init: ~8 bits per byte
