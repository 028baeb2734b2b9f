"""What agent=claude shows the model (src/lab/agents/claude_context.py): the research journal (in the
session and in every turn), learning curves from MLflow, near misses, the last failure while it is recent,
and a history table that condenses its older rows to fit.

Run: python -m pytest -q tests/lab/agents/test_claude_context.py   (the MLflow curves are marked slow)
"""
from __future__ import annotations

import json
import os

import pytest

from src.lab.agents.base import Best
from src.lab.agents.claude import JOURNAL_FILE
from src.lab.agents.claude_context import LossCurves, curve_lines, history_table, last_failure, near_misses
from tests.support.claude import BASE, SHA, agent_for, good, last_user, make_state, outcome, row, step, worktree


def test_the_journal_is_written_to_the_session_and_shown_every_turn(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1), good(2), good(3))
    agent = agent_for(server)
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    p1 = step(agent, wt, hist, "exp-001", "keep", 2.40, -0.10)
    step(agent, wt, hist, "exp-002", "discard", 2.45, 0.05)
    agent.propose(make_state(wt, hist))
    assert p1.meta["learned"] == "lesson 1" and p1.meta["next_ideas"] == ["idea 2", "idea 3"]
    journal = (tmp_path / "session" / JOURNAL_FILE).read_text()
    assert "## exp-001: matrix lr 0.03 -> keep 2.4000 (-0.1000)" in journal and "Learned: lesson 1" in journal
    assert "## exp-002: matrix lr 0.04 -> discard 2.4500 (+0.0500)" in journal and "1. idea 3" in journal
    state = last_user(server.messages_requests()[-1])[-1]["text"]
    assert "## Your research journal" in state and "Idea queue (your latest next_ideas): idea 3; idea 4" in state
    assert state.index("before exp-002") < state.index("before exp-001")  # newest first


@pytest.mark.slow  # real MLflow runs with long metric histories
def test_learning_curves_of_the_best_and_the_last_run_come_from_mlflow(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]  # the test session's store (conftest): created once, not per test
    c = MlflowClient(tracking_uri=uri)
    exp_id = c.create_experiment(f"curves-{tmp_path.name}", artifact_location=str(tmp_path / "art"))
    ids = []
    for scale in (1.0, 2.0):
        run = c.create_run(exp_id)
        c.log_batch(run.info.run_id, metrics=[Metric("train/loss", scale * (4.0 - s / 100), 0, s) for s in range(100)])
        ids.append(run.info.run_id)
    (tmp_path / "state.json").write_text(json.dumps({"tracking_uri": uri}))
    hist = BASE + [row("exp-001", "keep", 2.4, -0.1, mlflow_run_id=ids[0], num_steps=100),
                   row("exp-002", "discard", 2.6, 0.2, mlflow_run_id=ids[1])]
    state = make_state(tmp_path, hist, Best("exp-001", SHA, 2.4, []))
    lines = curve_lines(state, LossCurves(tmp_path))
    assert lines[0].startswith("## Learning curves (train loss at 25 / 50 / 75 / 100%")
    assert lines[1].startswith("- best exp-001: 3.765 3.515 3.265 3.015 (100 steps")
    assert lines[2].startswith("- last exp-002: 7.530 7.030 6.530 6.030")
    assert curve_lines(state, LossCurves(tmp_path / "nowhere")) == []  # no store: no curve, no error


def test_near_misses_and_the_last_failure_only_while_it_is_recent(tmp_path):
    runs = tmp_path / "runs"
    (runs / "exp-002").mkdir(parents=True)
    (runs / "exp-002" / "run.log").write_text("x" * 5000 + "\nline A\nRuntimeError: shape mismatch\n")
    hist = BASE + [row("exp-001", "keep", 2.40, -0.1), row("exp-002", "crash", None, None, reason="RuntimeError",
                                                           run_status="crash"),
                   row("exp-003", "discard", 2.395, -0.005, overrides="optimizer.matrix_lr=0.05")]
    best = Best("exp-001", SHA, 2.40, [])
    assert [e.exp for e in near_misses(hist, best, 0.01)] == ["exp-003"]
    fail = last_failure(hist, runs, 100)
    assert fail.startswith("## Last failure: exp-002 (crash)") and "RuntimeError: shape mismatch" in fail
    assert "xxx" not in fail.split("Log tail")[1].splitlines()[2]  # starts at a whole line
    later = hist + [row("exp-004", "discard", 2.5, 0.1), row("exp-005", "discard", 2.5, 0.1)]
    assert last_failure(later, runs, 100) == ""  # two experiments later it is history, not news


def test_the_history_table_condenses_older_rows_to_fit_its_size():
    rows = BASE + [row(f"exp-{i:03d}", "discard", 2.6, 0.1, desc="x" * 300) for i in range(1, 50)]
    t = history_table(rows, 3000)
    assert len(t) <= 3000 and "older rows condensed: " in t and "| exp-049 |" in t


def test_the_scripted_researcher_asks_for_a_retest_of_the_near_miss_it_reads_once(server, key, tmp_path):
    """The stand-in Claude of the benches (src/lab/fakes/scripted_researcher.py) reads the near-miss list of the real
    prompt and asks for the top one's retest, through the real tool call and parser, and never twice."""
    from src.lab.fakes.scripted_researcher import ScriptedResearcher
    wt = worktree(tmp_path)
    server.responder = ScriptedResearcher(seed=1, retest_share=1.0)
    agent = agent_for(server)
    hist = BASE + [row("exp-001", "discard", 2.52, 0.02), row("exp-002", "discard", 2.497, -0.003),
                   row("exp-003", "discard", 2.495, -0.005)]
    agent.restore(hist, make_state(wt, hist))
    first = agent.propose(make_state(wt, hist))
    assert first.retest == "exp-003" and first.overrides == []  # the best near miss
    hist.append(outcome(first, "exp-004", "discard", 2.50, 0.0))
    agent.observe(hist[-1], make_state(wt, hist))
    second = agent.propose(make_state(wt, hist))
    assert second.retest == "exp-002"  # the next one, not exp-003 again
    hist.append(outcome(second, "exp-005", "discard", 2.50, 0.0))
    agent.observe(hist[-1], make_state(wt, hist))
    third = agent.propose(make_state(wt, hist))
    assert not third.retest and third.overrides  # nothing left to ask about: an idea of its own
