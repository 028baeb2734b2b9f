"""Fixtures of the lab's unit tests: a real session (a git repo, its worktree, its ledger) with tracking off,
and a fake runner that returns scripted Outcomes instead of training (no subprocess, no torch run).

Run: python -m pytest -q tests/lab
"""
from __future__ import annotations

from pathlib import Path

import pytest

from src.lab.context import Lab
from src.lab.ledger import Ledger
from src.lab.runner import Outcome
from src.lab.runs import SessionRuns
from src.lab.session import Session
from src.lab.workers import Worker
from src.lab.decisions import OK
from tests.support.helpers import compose_search, compose_train_cfg, make_repo

BASE = ["device=cpu", "budget.seconds=10"]


class FakeRunner:
    """Runner's interface; run() hands out `outcomes` in order: (status, val_bpb) or (status, val_bpb, summary)."""

    def __init__(self, outcomes=()):
        self.outcomes = list(outcomes)
        self.calls: list[tuple[list[str], Path, bool]] = []  # (overrides, run_dir, score)

    def run(self, overrides, run_dir, timeout_s, on_start=None, score=True, on_curve=None) -> Outcome:
        self.calls.append((list(overrides), Path(run_dir), score))
        if not score:  # a dry run
            return Outcome(OK, Path(run_dir), {}, returncode=0)
        status, val, *more = self.outcomes.pop(0)
        summary = {"status": status, "val_bpb": val, "training_seconds": 10.0, "tokens_per_sec": 20000.0,
                   "built": True, **(more[0] if more else {})}
        if on_start is not None:
            on_start(4242)
        return Outcome(status, Path(run_dir), summary, returncode=0 if status == OK else 1, wall_seconds=12.0,
                       note="" if status == OK else f"{status} (fake)")

    def rescore(self, out: Outcome) -> dict:
        return {"status": OK, "val_bpb": out.val_bpb}

    def interrupt(self) -> None:
        pass


@pytest.fixture
def make_lab(tmp_path):
    """make_lab(*search_overrides) -> (lab, worker, runner): a session on a copy of the project, tracking off."""
    repo = make_repo(tmp_path)
    sessions = []

    def make(*more: str, outcomes=()):
        cfg = compose_search([*BASE, "search.progress=false", f"search.repo={repo}", *more])
        session = Session.create(Session.plan(f"t{len(sessions)}", str(repo)), BASE)
        sessions.append(session)
        lab = Lab(cfg, session, Ledger(session.dir), SessionRuns(None, "unit", enabled=False), BASE,
                  compose_train_cfg(BASE))
        runner = FakeRunner(outcomes)
        return lab, Worker(None, session, runner, "test"), runner
    yield make
    for s in sessions:
        s.close()
