"""Muon (+ AdamW groups) and plain AdamW, with schedules driven by budget progress.

Muon for the transformer matrices: Nesterov momentum, Polar Express orthogonalization,
NorMuon variance normalization and cautious weight decay. AdamW for embeddings,
unembedding and scalars, its LRs scaled by 1/sqrt(width/768). The LR multiplier (warm-up and
warmdown over the budget: optimizer.warmup_ratio, warmdown_ratio, final_lr_frac) comes from the
harness (src/harness/budget.py lr_multiplier) through train_step. Part of the editable research surface.

Usage: opt = build_optimizer(model, cfg.optimizer); opt.schedule(lr_mult, progress, step, cfg.optimizer); opt.step()
"""
from __future__ import annotations

import torch

from src.harness.config import OptimizerConfig

# Polar Express coefficients (5 iterations, safety factor 2e-2, cushion 2; arXiv 2505.16932)
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def orthogonalize(G: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate the polar factor U V^T of each matrix in the stack G (..., m, n), in bf16."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over groups of kind 'muon' (same-shape matrices, stacked) and 'adamw'."""

    def __init__(self, groups: list[dict]):
        super().__init__(groups, defaults={})
        for g in self.param_groups:
            g["initial_lr"] = g["lr"]
            g["initial_wd"] = g["weight_decay"]

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            (self._muon if g["kind"] == "muon" else self._adamw)(g)

    def _adamw(self, g):
        beta1, beta2 = g["betas"]
        for p in g["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
            st["step"] += 1
            p.mul_(1 - g["lr"] * g["weight_decay"])
            st["m"].lerp_(p.grad, 1 - beta1)
            st["v"].lerp_(p.grad.square(), 1 - beta2)
            denom = (st["v"] / (1 - beta2 ** st["step"])).sqrt_().add_(g["eps"])
            p.addcdiv_(st["m"], denom, value=-g["lr"] / (1 - beta1 ** st["step"]))

    def _muon(self, g):
        params = [p for p in g["params"] if p.grad is not None]
        if not params:
            return
        st = self.state[params[0]]
        grads, stacked = torch.stack([p.grad for p in params]), torch.stack(params)  # (N, m, n)
        m, n = stacked.shape[-2:]
        red = -1 if m >= n else -2  # NorMuon normalizes along the longer side
        if not st:
            st["momentum"] = torch.zeros_like(stacked)
            st["second"] = torch.zeros_like(stacked.mean(dim=red, keepdim=True))
        mom = g["momentum"]
        st["momentum"].lerp_(grads, 1 - mom)
        update = orthogonalize(grads.lerp_(st["momentum"], mom), g["ns_steps"]).float()  # Nesterov
        # NorMuon: per-row (or column) second moment, rescaled to keep the update's norm
        v_mean = update.square().mean(dim=red, keepdim=True)
        v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * update.size(red)).sqrt()
        st["second"].lerp_(v_mean, 1 - g["beta2"])
        scale = st["second"].clamp_min(1e-10).rsqrt()
        v_norm_new = (v_mean * update.size(red) * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
        update = update * scale * (v_norm / v_norm_new.clamp_min(1e-10))
        lr = g["lr"] * max(1.0, m / n) ** 0.5
        cautious = (update * stacked >= 0).to(stacked.dtype)  # decay only where the update agrees
        stacked.sub_(lr * update + lr * g["weight_decay"] * stacked * cautious)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    def schedule(self, lr_mult: float, progress: float, step: int, cfg: OptimizerConfig) -> None:
        """Set the LR to `lr_mult` (the harness's schedule at this point of the budget) times each group's initial
        LR, decay weight decay linearly to 0 over budget progress in [0, 1], warm Muon's momentum up by step."""
        frac = min(step / max(cfg.momentum_warmup_steps, 1), 1.0)
        for g in self.param_groups:
            g["lr"] = g["initial_lr"] * lr_mult
            g["weight_decay"] = g["initial_wd"] * (1 - progress)
            if g["kind"] == "muon":
                g["momentum"] = (1 - frac) * cfg.momentum_start + frac * cfg.momentum_end


def build_optimizer(model, cfg: OptimizerConfig) -> MuonAdamW:
    if cfg.name not in ("muon", "adamw"):
        raise ValueError(f"optimizer.name={cfg.name!r}; expected 'muon' or 'adamw'")
    scale = (model.config.n_embd / 768) ** -0.5  # AdamW LRs were tuned at width 768
    adam = dict(kind="adamw", betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=0.0)
    groups = [
        dict(adam, params=[model.lm_head.weight], lr=cfg.unembedding_lr * scale),
        dict(adam, params=[model.wte.weight, *model.value_embeds.parameters()], lr=cfg.embedding_lr * scale),
        dict(adam, params=[model.resid_lambdas], lr=cfg.scalar_lr * 0.01),
        dict(adam, params=[model.x0_lambdas], lr=cfg.scalar_lr, betas=(0.96, 0.95)),
    ]
    matrices = list(model.blocks.parameters())
    if cfg.name == "adamw":
        groups.append(dict(adam, params=matrices, lr=cfg.matrix_lr, weight_decay=cfg.weight_decay))
    else:
        for shape in sorted({p.shape for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=cfg.matrix_lr,
                               momentum=cfg.momentum_start, ns_steps=cfg.ns_steps, beta2=cfg.muon_beta2,
                               weight_decay=cfg.weight_decay))
    groups = [g for g in groups if g["params"]]
    return MuonAdamW(groups)
