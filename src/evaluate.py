"""The fixed evaluation harness: val_bpb, the one score every run is judged by.

val_bpb = sum of per-token cross-entropy (nats) over target tokens
          / (ln 2 * sum of the UTF-8 byte lengths of those target tokens),
with special tokens (byte length 0) excluded from both sums. Vocabulary-independent.
Not part of the research surface: agents cannot edit it.

Usage: bpb = evaluate_bpb(model, val_tokens, token_bytes, seq_len, batch_size, rt)
"""
from __future__ import annotations

import math

import torch


def bpb_from_sums(total_nats: float, total_bytes: int) -> float:
    return total_nats / (math.log(2) * total_bytes)


@torch.no_grad()
def evaluate_bpb(model, tokens: torch.Tensor, token_bytes: torch.Tensor, seq_len: int, batch_size: int,
                 device: torch.device, autocast=None, progress: bool = False) -> float:
    """Score `tokens` (1-D int64, the fixed validation tokens) in non-overlapping windows of seq_len.

    Every token after the first is a target exactly once; the last window may be short.
    `model(x, y, reduction='none')` must return per-token losses in nats, shape (B, T).
    """
    import contextlib

    from tqdm import tqdm

    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    n_targets = tokens.numel() - 1
    starts = list(range(0, n_targets, seq_len))
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    full = [s for s in starts if s + seq_len <= n_targets]
    tail = [s for s in starts if s + seq_len > n_targets]
    windows = tokens[: len(full) * seq_len + 1]
    ctx = autocast or contextlib.nullcontext
    bar = tqdm(total=len(starts), desc="eval", unit="seq", disable=not progress, leave=False)
    for b in range(0, len(full), batch_size):
        n = min(batch_size, len(full) - b)
        chunk = windows[b * seq_len: (b + n) * seq_len + 1].to(device)
        x = chunk[:-1].view(n, seq_len)
        y = chunk[1:].view(n, seq_len)
        total_nats, total_bytes = _accumulate(model, x, y, token_bytes, ctx, total_nats, total_bytes)
        bar.update(n)
    for s in tail:
        chunk = tokens[s:].to(device)
        total_nats, total_bytes = _accumulate(model, chunk[:-1][None], chunk[1:][None], token_bytes, ctx,
                                              total_nats, total_bytes)
        bar.update(1)
    bar.close()
    model.train(was_training)
    return bpb_from_sums(total_nats.item(), int(total_bytes.item()))


def _accumulate(model, x, y, token_bytes, ctx, total_nats, total_bytes):
    with ctx():
        nats = model(x, y, reduction="none").double()  # (B, T)
    nb = token_bytes[y]  # (B, T) bytes per target token; 0 for specials
    counted = nb > 0
    return total_nats + (nats * counted).sum(), total_bytes + nb.sum()
