"""Running one configuration until a run stands (src/lab/attempts.py), against a fake runner.

Run: python -m pytest -q tests/lab/test_attempts.py
"""
from __future__ import annotations

import json

import pytest

from src.lab.attempts import Attempts
from src.lab.ledger import Experiment
from src.lab.session import InFlight
from src.lab.decisions import BASELINE, CRASH, DISTURBED, OK, STALLED, TIMEOUT


def base_commit(lab) -> str:
    return lab.session.state.base_commit


def test_a_stalled_run_is_rerun_and_each_attempt_has_its_own_run_dir(make_lab):
    lab, w, runner = make_lab("search.stall_retries=1", outcomes=[(STALLED, None), (OK, 3.0)])
    a = Attempts(lab, w).run("exp-001", base_commit(lab), [], 0, [])
    assert a.out.status == OK and a.attempts == 2 and a.stalled and "exp-001 stalled" in a.rerun_note
    assert [c[1].name for c in runner.calls] == ["exp-001", "exp-001-a2"]


def test_stalls_beyond_the_retries_leave_the_run_disturbed_never_crashed(make_lab):
    lab, w, runner = make_lab("search.stall_retries=1", outcomes=[(STALLED, None), (STALLED, None)])
    a = Attempts(lab, w).run("exp-001", base_commit(lab), [], 0, [])
    assert a.out.status == DISTURBED and a.attempts == 2 and len(runner.calls) == 2
    assert "exp-001-a2 stalled" in a.out.note


@pytest.mark.slow
def test_a_run_starved_past_its_wall_ceiling_is_rerun_then_disturbed(make_lab):
    """A busy machine that keeps a run from finishing (timeout) is the machine's doing: never crash, never tampered."""
    lab, w, runner = make_lab("search.stall_retries=1", outcomes=[(TIMEOUT, None), (OK, 3.0)])
    a = Attempts(lab, w).run("exp-001", base_commit(lab), [], 0, [])
    assert a.out.status == OK and a.attempts == 2 and "starved past its wall ceiling" in a.rerun_note
    lab, w, runner = make_lab("search.stall_retries=0", outcomes=[(TIMEOUT, None)])
    a = Attempts(lab, w).run("exp-001", base_commit(lab), [], 0, [])
    assert a.out.status == DISTURBED and len(runner.calls) == 1


def test_a_resume_continues_the_attempt_count(make_lab):
    lab, w, runner = make_lab(outcomes=[(OK, 3.0)])
    a = Attempts(lab, w).run("exp-001", base_commit(lab), [], 1, [])
    assert a.attempts == 2 and runner.calls[0][1].name == "exp-001-a2"


def test_a_crash_is_not_rerun(make_lab):
    lab, w, runner = make_lab(outcomes=[(CRASH, None)])
    assert Attempts(lab, w).run("exp-001", base_commit(lab), [], 0, []).out.status == CRASH
    assert len(runner.calls) == 1


def test_a_run_far_slower_than_its_shape_is_rerun_then_left_disturbed(make_lab):
    slow = {"tokens_per_sec": 4000.0}
    lab, w, runner = make_lab("search.disturbed_retries=1", outcomes=[(OK, 3.0, slow), (OK, 3.0, slow)])
    commit = base_commit(lab)
    ref = Experiment(exp="base-1", status=BASELINE, description="", commit=commit, val_bpb=3.0,
                     tokens_per_sec=20000.0, shape=lab.shape(commit, [], {}))
    a = Attempts(lab, w).run("exp-001", commit, [], 0, [ref])
    assert a.out.status == DISTURBED and len(a.disturbed) == 2 and "5.00x slower" in a.disturbed_note
    assert len(runner.calls) == 2


def test_each_attempt_is_persisted_as_its_workers_entry_of_state_running(make_lab):
    lab, w, _ = make_lab(outcomes=[(OK, 3.0)])
    flight = InFlight(exp="exp-001", attempt=0, commit="", run_dir="", worker=w.index, parent="p", proposed="now")
    Attempts(lab, w).run("exp-001", base_commit(lab), [], 0, [], flight)
    running = json.loads((lab.session.dir / "state.json").read_text())["running"]
    assert len(running) == 1 and running[0]["exp"] == "exp-001" and running[0]["attempt"] == 1
    assert running[0]["pid"] == 4242 and running[0]["parent"] == "p"  # the fake runner's pid, via on_start
