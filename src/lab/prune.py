"""Pruning at equal progress (search.prune): stop a screen run that is clearly losing to the best, mid-run.

Every run prints its smoothed training loss at each 5% of its counted budget (src/harness/budget.py Curve), so
two runs of one session compare at the same fractions whatever their step times. The reference is the mean curve
of the best commit's runs; the noise is the session's own: the pooled spread between curves of runs of one
configuration (the baseline repeats, the confirmation pairs), per fraction. From `search.prune_min_fraction` of
the budget on, a screen run whose loss is above the reference by more than

    max(prune_min_delta, prune_sigmas x sigma(f) x sqrt(1 + 1/n_ref))

at two points in a row is stopped and recorded `pruned` (never kept; the fractions, losses and margin in its
reason). Baselines, confirmation runs and re-runs of the best are never pruned; nothing is pruned while the curve
noise has no degree of freedom. A curve is printed by the training process: advisory, like its loss. A run that
forges a good curve is only not pruned (it is still scored); one that forges a bad one only loses its own run.

Usage: pruner = pruner_for(lab, rows)      # None: off, or nothing to compare with yet
       why = pruner(fraction, loss)        # '' to go on, else why the run is stopped
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from src.lab.decisions import BASELINE, CONFIRM, KEEP
from src.lab.ledger import Experiment
from src.lab.runner import attempt_name

STANDING = (BASELINE, KEEP, CONFIRM)  # rows whose run stood, finished and undisturbed (the curves compared)


def row_curve(runs_dir: Path, e: Experiment) -> dict[float, float]:
    """{fraction: smoothed loss} of the run that stood for ledger row `e` ({} when it printed none)."""
    try:
        s = json.loads((runs_dir / attempt_name(e.exp, max(1, e.attempts or 1)) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return {round(float(f), 2): float(v) for f, v in s.get("curve") or [] if math.isfinite(float(v))}


def curves_by_commit(runs_dir: Path, rows: list[Experiment]) -> dict[str, list[dict]]:
    """commit -> the curves of its standing runs, in ledger order (a commit fixes both code and overrides)."""
    out: dict[str, list[dict]] = {}
    for e in rows:
        if e.status in STANDING and e.val_bpb is not None:
            c = row_curve(runs_dir, e)
            if c:
                out.setdefault(e.commit, []).append(c)
    return out


def curve_noise(groups: list[list[dict]]) -> tuple[dict[float, float], int]:
    """Pooled sigma of the loss per fraction between runs of one configuration, and its degrees of freedom."""
    ss: dict[float, float] = {}
    dof: dict[float, int] = {}
    for curves in groups:
        for f in set.intersection(*(set(c) for c in curves)) if len(curves) > 1 else ():
            xs = [c[f] for c in curves]
            m = sum(xs) / len(xs)
            ss[f] = ss.get(f, 0.0) + sum((x - m) ** 2 for x in xs)
            dof[f] = dof.get(f, 0) + len(xs) - 1
    sigma = {f: math.sqrt(ss[f] / dof[f]) for f in ss if dof[f] > 0}
    return sigma, min(dof.values(), default=0)


class Pruner:
    """Says when a run's curve is worse than the reference by more than the noise explains, twice in a row."""

    def __init__(self, reference: dict[float, float], n_ref: int, sigma: dict[float, float], min_fraction: float,
                 sigmas: float, min_delta: float, best: str):
        self.reference, self.n_ref, self.sigma = reference, n_ref, sigma
        self.min_fraction, self.sigmas, self.min_delta, self.best = min_fraction, sigmas, min_delta, best
        self.behind: list[str] = []  # the points in a row above the line so far

    def margin(self, f: float) -> float:
        return max(self.min_delta, self.sigmas * self.sigma.get(f, 0.0) * math.sqrt(1 + 1 / self.n_ref))

    def __call__(self, fraction: float, loss: float) -> str:
        f = round(fraction, 2)
        ref = self.reference.get(f)
        if f + 1e-9 < self.min_fraction or ref is None or f not in self.sigma:
            return ""
        m = self.margin(f)
        if not (loss > ref + m or math.isnan(loss)):
            self.behind = []
            return ""
        self.behind.append(f"{f:.0%}: {loss:.4f} against {ref:.4f} + {m:.4f}")
        if len(self.behind) < 2:
            return ""
        return (f"pruned at {f:.0%} of the budget: its smoothed train loss was above the best's ({self.best}, mean of "
                f"{self.n_ref} run(s)) by more than the margin (max(search.prune_min_delta, search.prune_sigmas x the "
                f"session's curve sigma)) at two points in a row ({'; '.join(self.behind[-2:])})")


def pruner_for(lab, rows: list[Experiment]) -> Optional[Pruner]:
    """The pruner of the next screen run against the best now; None when pruning is off or cannot judge yet."""
    s = lab.cfg.search
    if not s.prune:
        return None
    runs_dir = lab.session.runs_dir
    groups = curves_by_commit(runs_dir, rows)
    sigma, dof = curve_noise(list(groups.values()))
    best = lab.standings(rows).best
    ref_curves = groups.get(best.commit, [])
    if dof < 1 or not ref_curves:
        return None
    common = set.intersection(*(set(c) for c in ref_curves))
    reference = {f: sum(c[f] for c in ref_curves) / len(ref_curves) for f in common}
    return Pruner(reference, len(ref_curves), sigma, s.prune_min_fraction, s.prune_sigmas, s.prune_min_delta,
                  best.exp)
