"""The baseline phase (src/lab/baseline.py): repeats until the noise floor can be trusted, on a fake runner.

Run: python -m pytest -q tests/lab/test_baseline.py
"""
from __future__ import annotations

import pytest

from src.lab.baseline import run_baseline, settled
from src.lab.experiment import Job
from src.lab.session import SessionError
from src.lab.decisions import BASELINE, CRASH, INTERRUPTED, OK
from src.lab.runner import Outcome, RunInterrupted


def test_repeats_that_agree_settle_the_baseline(make_lab):
    lab, w, _ = make_lab("search.baseline_repeats=2", outcomes=[(OK, 3.0), (OK, 3.001)])
    run_baseline(lab, [w])
    rows = lab.rows()
    assert [(e.exp, e.status) for e in rows] == [("base-1", BASELINE), ("base-2", BASELINE)]
    assert settled(lab, rows) and lab.standings(rows).noise.dof == 1


@pytest.mark.slow
def test_repeats_that_disagree_bring_one_more_to_show_the_outlier(make_lab):
    lab, w, _ = make_lab("search.baseline_repeats=2", "search.baseline_max_repeats=4", "search.baseline_spread=0.01",
                         outcomes=[(OK, 3.0), (OK, 3.5), (OK, 3.01)])
    run_baseline(lab, [w])
    st = lab.standings()
    assert st.baseline_runs == 3 and st.baseline_inliers == 2 and st.baseline == pytest.approx(3.005)


def test_a_crashed_baseline_stops_the_session_with_what_to_do(make_lab):
    lab, w, _ = make_lab(outcomes=[(CRASH, None)])
    with pytest.raises(SessionError, match="the baseline run base-1 failed.*search.resume=true"):
        run_baseline(lab, [w])
    assert lab.rows()[0].status == CRASH


def test_a_resumed_baseline_run_is_finished_first_under_its_own_id(make_lab):
    lab, w, runner = make_lab("search.baseline_repeats=1", outcomes=[(OK, 3.0)])
    run_baseline(lab, [w], [Job("base-1", None, attempt=1)])
    assert [(e.exp, e.attempts) for e in lab.rows()] == [("base-1", 2)] and runner.calls[0][1].name == "base-1-a2"


def test_an_interrupted_baseline_run_is_recorded_then_the_session_stops(make_lab, monkeypatch):
    lab, w, runner = make_lab()

    def interrupted(overrides, run_dir, *a, **k):
        raise RunInterrupted(Outcome(INTERRUPTED, run_dir, note="interrupted by the user"))
    monkeypatch.setattr(runner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_baseline(lab, [w])
    assert [(e.exp, e.status) for e in lab.rows()] == [("base-1", INTERRUPTED)]
    assert lab.session.state.running == []
