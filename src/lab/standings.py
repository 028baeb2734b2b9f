"""Where a session stands: the best so far, the baseline, the noise floor, the margin, the counts.

Computed from the ledger rows alone, at full precision (each row's `values`, not the TSV's six
decimals), by the loop, the report and the TPE agent alike.

Usage: st = Standings.of(ledger.rows(), base_commit, noise_sigmas=2.0, min_delta=0.002)
       st.best.val_bpb, st.margin, st.noise.sigma, st.experiments_run
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from src.lab.decision import NoiseFloor
from src.lab.ledger import Experiment


@dataclass
class Best:
    exp: str  # the ledger row that set it (base-* for the baseline)
    commit: str  # full sha: the branch tip
    val_bpb: float  # mean of the runs behind it (inf before any baseline run succeeded)
    overrides: list[str] = field(default_factory=list)  # research overrides in effect (conf/experiment/<tag>_best.yaml)


def baseline_scores(rows: list[Experiment]) -> list[float]:
    """Full-precision val_bpb of every successful baseline run."""
    return [e.score for e in rows if e.status == "baseline" and e.score is not None]


def baseline_mean(rows: list[Experiment]) -> Optional[float]:
    scores = baseline_scores(rows)
    return sum(scores) / len(scores) if scores else None


def noise_floor(rows: list[Experiment]) -> NoiseFloor:
    """Pooled over the baseline repeats and every row backed by more than one run (confirmations)."""
    groups = [baseline_scores(rows)] + [e.values for e in rows if e.status != "baseline" and len(e.values) > 1]
    return NoiseFloor.pooled(groups)


def best_of(rows: list[Experiment], base_commit: str) -> Best:
    """The last kept row, else the baseline (the mean of its runs) at the session's base commit."""
    base = baseline_mean(rows)
    best = Best("baseline", base_commit, base if base is not None else math.inf, [])
    for e in rows:
        if e.status == "keep":
            best = Best(e.exp, e.commit, e.score, list(e.overrides_in_effect))
    return best


@dataclass(frozen=True)
class Standings:
    best: Best
    baseline: Optional[float]  # mean val_bpb of the baseline runs
    baseline_runs: int
    noise: NoiseFloor
    margin: float  # what the next experiment must beat the best by
    experiments_run: int  # experiments that count toward search.max_experiments
    by_status: dict  # decision -> rows

    @classmethod
    def of(cls, rows: list[Experiment], base_commit: str, noise_sigmas: float, min_delta: float) -> "Standings":
        noise = noise_floor(rows)
        return cls(best=best_of(rows, base_commit), baseline=baseline_mean(rows),
                   baseline_runs=len(baseline_scores(rows)), noise=noise,
                   margin=noise.margin(noise_sigmas, min_delta),
                   experiments_run=sum(1 for e in rows if e.counted),
                   by_status=dict(Counter(e.status for e in rows)))

    def count(self, status: str) -> int:
        return self.by_status.get(status, 0)
