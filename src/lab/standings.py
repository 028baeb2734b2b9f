"""Where a session stands: the best so far, the baseline, the noise floor, the margin, the counts.

Computed from the ledger rows alone, at full precision (each row's `values`, not the TSV's six
decimals), by the loop, the report and the agents alike. Runs are grouped by the commit they ran
(a commit fixes both code and overrides), so the baseline repeats, an experiment's screen run and
its confirmation re-runs, and the best's re-runs each form a group of identical configurations.
Disturbed, crashed and invalid rows carry no run and count nowhere.

The best is the last kept commit (else the base commit) and its score is the mean of its group's
inliers: a score its code actually got, or the mean of consistent repeats of it, never a mean
polluted by an outlier or a disturbed run.

Usage: st = Standings.of(ledger.rows(), base_commit, noise_sigmas=2.0, min_delta=0.002, spread=0.01)
       st.best.val_bpb, st.margin, st.noise.sigma, st.noise.dof, st.experiments_run
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from src.lab.decision import NoiseFloor, consistent, inliers
from src.lab.ledger import Experiment
from src.lab.decisions import BASELINE, CONFIRM, DISTURBED, KEEP


@dataclass
class Best:
    exp: str  # the ledger row that set it ("baseline" for the base commit)
    commit: str  # full sha: the branch tip
    val_bpb: float  # mean of the inlier runs of its commit (inf before any baseline run succeeded)
    overrides: list[str] = field(default_factory=list)  # research overrides in effect (conf/experiment/<tag>_best.yaml)


def groups(rows: list[Experiment]) -> dict[str, list[float]]:
    """commit -> the val_bpb of every undisturbed finished run of it, in ledger order."""
    out: dict[str, list[float]] = {}
    for e in rows:
        if e.runs:
            out.setdefault(e.commit, []).extend(e.runs)
    return out


def baseline_scores(rows: list[Experiment]) -> list[float]:
    """Full-precision val_bpb of every undisturbed baseline run (outliers included)."""
    return [v for e in rows if e.status == BASELINE for v in e.runs]


def baseline_mean(rows: list[Experiment], spread: float = 0.0) -> Optional[float]:
    kept = inliers(baseline_scores(rows), spread)
    return sum(kept) / len(kept) if kept else None


def best_of(rows: list[Experiment], base_commit: str, spread: float = 0.0) -> Best:
    """The last kept row, else the baseline, scored by the inlier mean of its commit's runs."""
    best = Best("baseline", base_commit, math.inf, [])
    for e in rows:
        if e.status == KEEP:
            best = Best(e.exp, e.commit, math.inf, list(e.overrides_in_effect))
    runs = inliers(groups(rows).get(best.commit, []), spread)
    if runs:
        best.val_bpb = sum(runs) / len(runs)
    elif best.exp == "baseline":  # ledgers whose baseline rows carry another commit (none expected)
        base = baseline_mean(rows, spread)
        best.val_bpb = base if base is not None else math.inf
    return best


@dataclass(frozen=True)
class Standings:
    best: Best
    baseline: Optional[float]  # mean val_bpb of the consistent baseline runs
    baseline_runs: int  # undisturbed baseline runs (outliers included)
    baseline_inliers: int  # ... of which agree with the others
    baseline_settled: bool  # do the baseline runs agree within the plausible spread (or have 3+ shown the outlier)?
    noise: NoiseFloor
    margin: float  # what the next experiment must beat the best by (the screen)
    experiments_run: int  # experiments that count toward search.max_experiments
    by_status: dict  # decision -> rows
    disturbed_runs: int = 0  # runs found disturbed (and re-run, or their rows recorded `disturbed`)
    undecided: int = 0  # experiments whose runs stayed disturbed: neither kept nor discarded

    def verdicts(self) -> str:
        """One line on what the verdicts rest on: the noise, the margin, confirmations, disturbed runs."""
        return (f"noise {self.noise.describe()}, margin {self.margin:.4f}; {self.count(CONFIRM)} confirmation run(s); "
                f"{self.disturbed_runs} disturbed run(s) set aside" +
                (f", {self.undecided} experiment(s) left undecided" if self.undecided else ""))

    @classmethod
    def of(cls, rows: list[Experiment], base_commit: str, noise_sigmas: float, min_delta: float,
           spread: float = 0.0) -> "Standings":
        noise = NoiseFloor.pooled(list(groups(rows).values()), spread)
        base = baseline_scores(rows)
        agree = inliers(base, spread)
        return cls(best=best_of(rows, base_commit, spread), baseline=baseline_mean(rows, spread),
                   baseline_runs=len(base), baseline_inliers=len(agree), baseline_settled=consistent(agree, spread),
                   noise=noise, margin=noise.margin(noise_sigmas, min_delta),
                   experiments_run=sum(1 for e in rows if e.counted),
                   by_status=dict(Counter(e.status for e in rows)),
                   disturbed_runs=sum(max(e.disturbed_runs, int(e.status == DISTURBED)) for e in rows),
                   undecided=sum(1 for e in rows if e.counted and e.status == DISTURBED))

    def count(self, status: str) -> int:
        return self.by_status.get(status, 0)
