"""val_bpb arithmetic against a hand-computed value.

Run: python -m pytest tests/test_evaluate.py -q
"""
import math

import torch

from src.evaluate import evaluate_bpb


class TargetLoss(torch.nn.Module):
    """A stand-in model whose loss for target token t is t / 100 nats."""

    def forward(self, x, y, reduction="none"):
        return y.double() / 100


def test_bpb_hand_computed():
    # tokens: 0 is a special (0 bytes), 1..3 are 1-byte tokens, 4 is a 3-byte token
    token_bytes = torch.tensor([0, 1, 1, 1, 3])
    tokens = torch.tensor([0, 1, 4, 2, 0, 3, 4])
    # targets = tokens[1:] = 1, 4, 2, 0, 3, 4 -> the special 0 is excluded from both sums
    nats = (1 + 4 + 2 + 3 + 4) / 100
    nbytes = 1 + 3 + 1 + 1 + 3
    expected = nats / (math.log(2) * nbytes)
    for seq_len, bs in [(2, 1), (3, 2), (6, 4), (4, 1)]:  # full windows, a short tail, one window
        got = evaluate_bpb(TargetLoss(), tokens, token_bytes, seq_len, bs, torch.device("cpu"))
        assert abs(got - expected) < 1e-12, (seq_len, bs, got, expected)


def test_bpb_is_deterministic_for_a_real_model():
    from src.config import ModelConfig
    from src.model import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig.from_model_config(ModelConfig(depth=1, aspect_ratio=64, head_dim=32, sequence_len=16), 257))
    m.init_weights()
    tokens = torch.randint(0, 256, (200,))
    tb = torch.ones(257, dtype=torch.long)
    a = evaluate_bpb(m, tokens, tb, 16, 4, torch.device("cpu"))
    b = evaluate_bpb(m, tokens, tb, 16, 7, torch.device("cpu"))
    assert abs(a - b) < 1e-6
    assert abs(a - math.log2(257)) < 0.1  # near-uniform predictions at init: ~8 bits per byte
