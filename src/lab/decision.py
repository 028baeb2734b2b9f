"""Keep or discard: the noise floor from repeated runs and the margin a change must beat.

Re-running identical code moves val_bpb (time budgets on a shared machine, MPS stalls), so a
single lower number is not a finding. The noise floor is the pooled standard deviation of every
group of runs of one identical configuration (the baseline repeats, confirmation re-runs); a
proposal is kept only when it beats the best by more than max(noise_sigmas * sigma, min_delta).

Usage: noise = NoiseFloor.pooled([[2.61, 2.64]]); margin = noise.margin(2.0, 0.002)
       verdict = decide(2.55, best=2.625, margin=margin)   # -> Verdict("keep", -0.075, ...)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class NoiseFloor:
    sigma: float  # pooled standard deviation of val_bpb between identical runs
    dof: int  # degrees of freedom behind it (0: no repeats yet, sigma unknown)

    @classmethod
    def pooled(cls, groups: list[list[float]]) -> "NoiseFloor":
        """Pooled sigma over groups of repeated runs of one configuration each (groups of 1 add nothing)."""
        ss, dof = 0.0, 0
        for g in groups:
            g = [x for x in g if x is not None and math.isfinite(x)]
            if len(g) < 2:
                continue
            m = sum(g) / len(g)
            ss += sum((x - m) ** 2 for x in g)
            dof += len(g) - 1
        return cls(sigma=math.sqrt(ss / dof) if dof else 0.0, dof=dof)

    def margin(self, noise_sigmas: float, min_delta: float) -> float:
        """How much lower than the best a val_bpb must be to count as an improvement."""
        return max(noise_sigmas * self.sigma, min_delta)


@dataclass(frozen=True)
class Verdict:
    decision: str  # keep | discard
    delta: float  # val_bpb - best (negative = better)
    margin: float

    @property
    def keep(self) -> bool:
        return self.decision == "keep"


def decide(val_bpb: float, best: float, margin: float) -> Verdict:
    delta = val_bpb - best
    return Verdict("keep" if delta < -margin else "discard", delta, margin)
