"""The ledger (src/lab/ledger.py): results.tsv rows, crash safety, disk full, and the session's MLflow
runs (src/lab/runs.py).

Run: python -m pytest -q tests/lab/test_ledger.py
"""
from __future__ import annotations

import errno
import json
import os

import pytest

from src.lab.ledger import COLUMNS, Experiment, Ledger
from src.lab.runs import SessionRuns
from src.lab.proposal import Proposal
from src.lab.session import SessionError, atomic_write


def exp(i: int, **kw) -> Experiment:
    d = dict(exp=f"exp-{i:03d}", status="discard", description=f"try {i}", commit="a" * 40, val_bpb=2.5 + i / 100,
             memory_gb=1.25, delta=0.01, margin=0.002, run_status="ok", num_steps=12, attempts=1)
    d.update(kw)
    return Experiment(**d)


def test_rows_round_trip_with_the_reference_columns_first(tmp_path):
    led = Ledger(tmp_path)
    p = Proposal("lower lr", "less noise", ["optimizer.matrix_lr=0.03"], None, {"agent": "x"})
    led.save("exp-001", p, ["optimizer.matrix_lr=0.03"], commit="b" * 40)
    led.append(exp(1, description="tabs\tand\nnewlines", reason="", val_bpb=None, delta=None))
    led.append(exp(2, status="keep"))
    lines = (tmp_path / "results.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert lines[0].split("\t") == list(COLUMNS)
    assert lines[2].split("\t")[:5] == ["aaaaaaa", "2.520000", "1.2", "keep", "try 2"]
    rows = led.rows()
    assert [r.exp for r in rows] == ["exp-001", "exp-002"]
    assert rows[0].description == "tabs and newlines" and rows[0].val_bpb is None
    assert rows[0].proposal == p and rows[0].overrides_in_effect == ["optimizer.matrix_lr=0.03"] and rows[0].commit == "b" * 40
    assert rows[1].commit == "aaaaaaa" and rows[1].num_steps == 12 and rows[1].val_bpb == pytest.approx(2.52)


def test_a_torn_last_row_is_cut_and_earlier_rows_survive(tmp_path):
    led = Ledger(tmp_path)
    led.append(exp(1))
    with open(tmp_path / "results.tsv", "a") as f:
        f.write("aaaaaaa\t2.6\t1.0\tkee")  # power cut mid-append
    assert [r.exp for r in led.rows()] == ["exp-001"]
    assert (tmp_path / "results.tsv").read_text().endswith("\n")
    led.append(exp(2))
    assert [r.exp for r in led.rows()] == ["exp-001", "exp-002"]


def test_disk_full_is_a_clear_error_and_loses_nothing(tmp_path, monkeypatch):
    led = Ledger(tmp_path)
    led.append(exp(1))
    before = (tmp_path / "results.tsv").read_bytes()
    atomic_write(tmp_path / "state.json", json.dumps({"v": 1}))
    real_write = os.write

    def full(fd, data):
        real_write(fd, data[:7])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SessionError, match="disk full.*resume"):
        led.append(exp(2))
    monkeypatch.undo()
    assert (tmp_path / "results.tsv").read_bytes() == before

    def full_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_fsync)
    with pytest.raises(SessionError, match="disk full"):
        atomic_write(tmp_path / "state.json", json.dumps({"v": 2}))
    monkeypatch.undo()
    assert json.loads((tmp_path / "state.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.slow  # subprocesses: real processes
def test_session_runs_nest_one_child_per_experiment_under_a_reopenable_parent(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = SessionRuns(uri, "ledger-test")
    pid = runs.open_parent(None, "t", {"agent": "tpe"}, {"search.branch": "research/t"})
    e = exp(1, status="keep", proposal=Proposal("d", "h", ["model.depth=3"]), kind="overrides")
    rid = runs.create_child("exp-001")
    runs.record(e, 1, rid, {"val_bpb": 2.51, "num_steps": 12}, {"overrides.txt": "model.depth=3\n"}, {}, created=True)
    stale = runs.create_child("exp-002")
    runs.close_stale("exp-002")
    c = runs.client
    run = c.get_run(rid)
    assert run.data.tags["mlflow.parentRunId"] == pid and run.data.tags["search.status"] == "keep"
    assert run.data.metrics["search/val_bpb"] == pytest.approx(2.51) and run.data.metrics["summary/num_steps"] == 12
    assert run.data.params["model.depth"] == "3" and run.info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(rid, "search")] == ["search/overrides.txt"]
    assert c.get_run(stale).info.status == "KILLED" and c.get_run(stale).data.tags["search.attempt"] == "abandoned"
    assert runs.find_child("exp-001") == rid
    runs.close_parent("FINISHED")
    assert c.get_run(pid).info.status == "FINISHED"
    assert runs.open_parent(pid, "t", {}, {}) == pid and c.get_run(pid).info.status == "RUNNING"
    assert SessionRuns(uri, "x", enabled=False).open_parent(None, "t", {}, {}) is None
