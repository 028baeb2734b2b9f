"""Where a session stands (src/lab/standings.py): the best, the baseline, the noise floor, the counts.

Run: python -m pytest -q tests/lab/test_standings.py
"""
from __future__ import annotations

import math

import pytest

from src.lab.ledger import Experiment
from src.lab.standings import Standings, baseline_mean, best_of
from src.lab.decisions import BASELINE, CONFIRM, CRASH, DISCARD, DISTURBED, INVALID, KEEP

BASE = "b" * 40


def row(exp, status, val=None, commit=BASE, **kw) -> Experiment:
    return Experiment(exp=exp, status=status, description=exp, commit=commit, val_bpb=val, **kw)


def test_before_any_baseline_the_best_is_the_base_commit_at_infinity():
    st = Standings.of([], BASE, 2.0, 0.002)
    assert st.best.exp == "baseline" and st.best.commit == BASE and math.isinf(st.best.val_bpb)
    assert st.baseline is None and st.experiments_run == 0 and st.noise.dof == 0


def test_the_best_is_the_last_keep_scored_by_the_mean_of_its_commits_runs():
    rows = [row("base-1", BASELINE, 3.0), row("base-2", BASELINE, 3.02),
            row("exp-001", KEEP, 2.9, "c1", overrides_in_effect=["optimizer.matrix_lr=0.05"]),
            row("exp-001-c1", CONFIRM, 2.92, "c1"), row("exp-002", DISCARD, 2.95, "c2")]
    best = best_of(rows, BASE)
    assert (best.exp, best.commit, best.overrides) == ("exp-001", "c1", ["optimizer.matrix_lr=0.05"])
    assert best.val_bpb == pytest.approx(2.91)


def test_disturbed_crashed_and_invalid_rows_count_nowhere_in_the_noise_or_the_baseline():
    rows = [row("base-1", BASELINE, 3.0), row("base-2", DISTURBED, 3.5), row("base-3", BASELINE, 3.02),
            row("exp-001", CRASH), row("exp-002", INVALID), row("exp-003", DISCARD, 3.1, "c3")]
    st = Standings.of(rows, BASE, 2.0, 0.002)
    assert st.baseline == pytest.approx(3.01) and st.baseline_runs == 2 and st.noise.dof == 1
    assert st.experiments_run == 2  # the crash and the discard; the invalid proposal ran nothing
    assert st.disturbed_runs == 1 and st.count(DISCARD) == 1


def test_the_margin_is_the_noise_times_sigmas_but_never_under_min_delta():
    rows = [row("base-1", BASELINE, 3.0), row("base-2", BASELINE, 3.0)]
    assert Standings.of(rows, BASE, 2.0, 0.002).margin == pytest.approx(0.002)  # no spread: min_delta
    wide = [row("base-1", BASELINE, 3.0), row("base-2", BASELINE, 3.1)]
    st = Standings.of(wide, BASE, 2.0, 0.002)
    assert st.margin > 0.002 and st.margin == pytest.approx(st.noise.margin(2.0, 0.002))


def test_an_outlying_baseline_run_is_left_out_of_the_mean_with_a_spread():
    runs = [row("base-1", BASELINE, 3.5), row("base-2", BASELINE, 3.0), row("base-3", BASELINE, 3.01)]
    assert baseline_mean(runs, spread=0.01) == pytest.approx(3.005)
    st = Standings.of(runs, BASE, 2.0, 0.002, spread=0.01)
    assert st.baseline_inliers == 2 and st.baseline_settled and st.best.val_bpb == pytest.approx(3.005)
