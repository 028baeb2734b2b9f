"""The fixed evaluation harness: val_bpb, the one score every run is judged by.

val_bpb = sum of per-token cross-entropy (nats) over target tokens
          / (ln 2 * sum of the UTF-8 byte lengths of those target tokens),
with special tokens (byte length 0) excluded from both sums. Vocabulary-independent.

The model is called with input ids only and must return logits (B, T, vocab); the loss is
computed here, with library functions bound when this module is imported (before any research
code is), so rebinding torch.nn.functional afterwards cannot change the arithmetic. Not part of
the research surface; run by the scorer process (src/harness/score.py), never by the training process.

Usage: bpb = evaluate_bpb(model, val_tokens, token_bytes, seq_len, batch_size, device, autocast)
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.nn.functional import cross_entropy as _cross_entropy

_LN2 = math.log(2)


def bpb_from_sums(total_nats: float, total_bytes: int) -> float:
    return total_nats / (_LN2 * total_bytes)


def token_nats(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in nats (B, T) from logits (B, T, V), in float64 for the sums."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(y.shape):
        raise ValueError(f"the model returned shape {tuple(logits.shape)}; the harness expects logits "
                         f"(B, T, vocab) = ({y.shape[0]}, {y.shape[1]}, vocab) for input ids (B, T)")
    nats = _cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    return nats.view(y.shape).double()


def windows(n_tokens: int, seq_len: int, batch_size: int) -> list[tuple[int, int, int]]:
    """(start, rows, length) of each scoring batch: non-overlapping windows, every target once, the last short."""
    n_targets = n_tokens - 1
    full = n_targets // seq_len
    out = [(b * seq_len, min(batch_size, full - b), seq_len) for b in range(0, full, batch_size)]
    if full * seq_len < n_targets:
        out.append((full * seq_len, 1, n_targets - full * seq_len))
    return out


@torch.no_grad()
def evaluate_bpb(model, tokens: torch.Tensor, token_bytes: torch.Tensor, seq_len: int, batch_size: int,
                 device: torch.device, autocast=None, progress: bool = False) -> float:
    """Score `tokens` (1-D int64, the fixed validation tokens) in non-overlapping windows of seq_len."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    ctx = autocast or contextlib.nullcontext
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    plan = windows(tokens.numel(), seq_len, batch_size)
    bar = tqdm(total=sum(rows for _, rows, _ in plan), desc="eval", unit="seq", disable=not progress, leave=False)
    for start, rows, length in plan:
        chunk = tokens[start: start + rows * length + 1].to(device)
        x, y = chunk[:-1].view(rows, length), chunk[1:].view(rows, length)
        with ctx():
            logits = model(x)
        nb = token_bytes[y]  # (B, T) bytes per target token; 0 for specials
        total_nats += (token_nats(logits, y) * (nb > 0)).sum()
        total_bytes += nb.sum()
        bar.update(rows)
    bar.close()
    model.train(was_training)
    return bpb_from_sums(total_nats.item(), int(total_bytes.item()))
