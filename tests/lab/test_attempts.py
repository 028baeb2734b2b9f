"""Running one configuration until a run stands (src/lab/attempts.py), against a fake runner.

Run: python -m pytest -q tests/lab/test_attempts.py
"""
from __future__ import annotations

import json

from src.lab.attempts import Attempts
from src.lab.ledger import Experiment
from src.lab.session import InFlight
from src.lab.decisions import BASELINE, CRASH, DISTURBED, OK, STALLED, TAMPERED


def base_commit(lab) -> str:
    return lab.session.state.base_commit


def test_a_stalled_run_is_rerun_and_each_attempt_has_its_own_run_dir(make_lab):
    lab, w, runner = make_lab("search.stall_retries=1", outcomes=[(STALLED, None), (OK, 3.0)])
    a = Attempts(lab, w).run("exp-001", base_commit(lab), [], 0, [])
    assert a.out.status == OK and a.attempts == 2 and a.stalled and "exp-001 stalled" in a.rerun_note
    assert [c[1].name for c in runner.calls] == ["exp-001", "exp-001-a2"]


def test_stalls_beyond_the_retries_stand_as_the_outcome(make_lab):
    lab, w, _ = make_lab("search.stall_retries=0", outcomes=[(STALLED, None)])
    a = Attempts(lab, w).run("exp-001", base_commit(lab), [], 0, [])
    assert a.out.status == STALLED and a.attempts == 1


def test_a_resume_continues_the_attempt_count(make_lab):
    lab, w, runner = make_lab(outcomes=[(OK, 3.0)])
    a = Attempts(lab, w).run("exp-001", base_commit(lab), [], 1, [])
    assert a.attempts == 2 and runner.calls[0][1].name == "exp-001-a2"


def test_more_counted_seconds_than_the_process_lived_is_tampered(make_lab):
    lab, w, _ = make_lab(outcomes=[(OK, 2.0, {"training_seconds": 500.0})])
    a = Attempts(lab, w).run("exp-001", base_commit(lab), [], 0, [])
    assert a.out.status == TAMPERED and "counted 500.0 s of training" in a.out.error_line


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
