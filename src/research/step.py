"""One optimizer step: the training recipe. Part of the editable research surface.

The harness (src/harness/train.py) owns the loop, the clock, the data, the stall logic and the
learning-rate schedule: it calls `train_step` once per optimizer step with the LR multiplier for
this point of the budget (`lr_mult`: warm-up and warmdown by budget progress), times the call, and
stops when the budget is spent. What happens inside one step is yours to change: how the LR
multiplier, weight decay and momentum are applied, micro-batches, the loss, clipping, the optimizer
step. `next_batch()` hands out the next training micro-batch (x, y), each (B, T) token ids,
y = x shifted by one; the harness counts the tokens it hands out.

Usage: loss = train_step(model, opt, next_batch, step=12, progress=0.1, lr_mult=0.2, accum=1,
                         optim_cfg=cfg.optimizer, autocast=rt.autocast)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def train_step(model, opt, next_batch, *, step: int, progress: float, lr_mult: float, accum: int, optim_cfg,
               autocast) -> torch.Tensor:
    """Schedules for this point of the budget, `accum` micro-batches of forward/backward, one update.

    Returns the last micro-batch's loss (a tensor; the harness syncs it once per step).
    """
    opt.schedule(lr_mult, progress, step, optim_cfg)
    for _ in range(accum):
        x, y = next_batch()
        with autocast():
            logits = model(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        (loss / accum).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    return loss.detach()
