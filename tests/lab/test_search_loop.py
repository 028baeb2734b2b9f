"""The research loop in-process (src/lab/loop.py), on a real git repo and a real MLflow store, with a
stand-in for src.train (src/lab/fakes/train.py: same CLI contract, no torch, a val_bpb that is a
known function of the overrides) so that decisions, faults and resume are fast to exercise.

Run: python -m pytest -q tests/lab/test_search_loop.py   (sessions of several runs are marked slow)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from src.lab.decision import NoiseFloor
from src.lab.loop import Search, train_overrides
from src.lab.session import Session, SessionError
from tests.support.helpers import (comment_patch, compose_search, fake_command, git, make_repo, read_tsv,
                                   session_children)


@pytest.fixture
def lab(tmp_path):
    """A fresh project repo; MLflow is the test session's store (conftest), each session its own parent run."""
    repo = make_repo(tmp_path)
    return {"tmp": tmp_path, "repo": repo, "uri": os.environ["MLFLOW_TRACKING_URI"]}


def start(lab, *overrides, proposals=None, command=None, tag="t"):
    """Compose like the CLI and run a session; returns the Search (for inspection) and its summary."""
    ovs = [f"search.repo={lab['repo']}", "search.progress=false", f"tracking.uri={lab['uri']}", "device=cpu",
           f"search.tag={tag}", "search.timeout_s=60", "search.confirm=false", *overrides]  # confirm: tested apart
    if proposals is not None:
        f = lab["tmp"] / f"proposals-{len(list(lab['tmp'].glob('proposals-*')))}.yaml"
        f.write_text(yaml.safe_dump(proposals))
        ovs += ["agent=replay", f"agent.file={f}"]
    s = Search(compose_search(ovs), train_overrides(ovs), command or fake_command())
    return s, s.run()


def sdir(lab, tag="t") -> Path:
    return lab["repo"] / "outputs" / "research" / tag


@pytest.mark.slow
def test_replay_keeps_discards_refuses_and_the_branch_follows_the_best(lab):
    repo = lab["repo"]
    main_head = git(repo, "rev-parse", "main")
    proposals = [
        {"description": "smaller batch", "hypothesis": "more steps", "overrides": ["batch.total_tokens=4096",
                                                                                   "batch.device_tokens=4096"]},
        {"description": "restate the lr", "overrides": ["optimizer.matrix_lr=0.04"]},
        {"description": "edit the harness", "patch": comment_patch(repo, "prepare.py")},
        {"description": "another seed", "overrides": ["seed=3"]},
        {"description": "longer budget", "overrides": ["budget.seconds=500"]},
        {"description": "typo", "overrides": ["model.depht=3"]},
        {"description": "comment in model.py", "hypothesis": "no effect", "patch": comment_patch(repo)},
        {"description": "lr at its optimum", "overrides": ["optimizer.matrix_lr=0.06"]},
    ]
    s, out = start(lab, "search.baseline_repeats=2", "search.min_delta=0.01", proposals=proposals)
    rows = read_tsv(sdir(lab) / "results.tsv")
    assert [r["status"] for r in rows] == ["baseline", "baseline", "keep", "invalid", "invalid", "invalid", "invalid",
                                           "invalid", "discard", "keep"]
    assert [r["exp"] for r in rows] == ["base-1", "base-2"] + [f"exp-{i:03d}" for i in range(1, 9)]
    reasons = {r["exp"]: r["reason"] for r in rows}
    assert "changes nothing" in reasons["exp-002"]
    assert "prepare.py" in reasons["exp-003"] and "outside the editable files" in reasons["exp-003"]
    assert "seed" in reasons["exp-004"]
    assert "budget" in reasons["exp-005"] and "outside the research surface" in reasons["exp-005"]
    assert "depht" in reasons["exp-006"]
    assert float(rows[2]["val_bpb"]) == pytest.approx(3.0 - 0.2 + 0.5 * 0.4054651 ** 2, abs=1e-5)
    assert float(rows[-1]["val_bpb"]) == pytest.approx(2.8, abs=1e-6)
    assert float(rows[-1]["delta"]) < -float(rows[-1]["margin"])
    assert out["best_exp"] == "exp-008" and out["best_val_bpb"] == pytest.approx(2.8)

    # the branch: base + one commit per keep; its tip is the best and holds the kept overrides as a preset
    branch = "research/t"
    assert git(repo, "rev-list", "--count", f"main..{branch}") == "2"
    tip = git(repo, "rev-parse", branch)
    assert tip.startswith(rows[-1]["commit"]) and tip == out["best_commit"]
    preset = yaml.safe_load(git(repo, "show", f"{branch}:conf/experiment/t_best.yaml"))
    assert preset == {"batch": {"total_tokens": 4096, "device_tokens": 4096}, "optimizer": {"matrix_lr": 0.06}}
    # discarded candidates stay inspectable; the worktree is clean at the best
    assert git(repo, "rev-parse", "refs/research/t/exp-007").startswith(rows[8]["commit"])
    assert "harmless comment" not in (sdir(lab) / "worktree" / "src" / "research" / "model.py").read_text()
    assert git(sdir(lab) / "worktree", "status", "--porcelain") == ""
    # the user's checkout and branch are untouched
    assert git(repo, "rev-parse", "main") == main_head and git(repo, "branch", "--show-current") == "main"
    assert git(repo, "status", "--porcelain") == ""

    # MLflow: one parent, one child per ledger row, agreeing on status and commit
    state = json.loads((sdir(lab) / "state.json").read_text())
    children = session_children(lab["uri"], state["parent_run_id"])
    tagged = {r.data.tags["search.exp"]: r for r in children if "search.exp" in r.data.tags}
    assert sorted(tagged) == sorted(r["exp"] for r in rows)
    for r in rows:
        run = tagged[r["exp"]]
        assert run.info.run_id == r["mlflow_run_id"]
        assert run.data.tags["search.status"] == r["status"]
        assert run.data.tags["search.commit"].startswith(r["commit"])
        if r["val_bpb"]:
            assert run.data.metrics["search/val_bpb"] == pytest.approx(float(r["val_bpb"]), abs=1e-6)
    assert "prepare.py" in tagged["exp-003"].data.tags["search.reason"]
    # the report was written at the end
    assert (sdir(lab) / "report.md").exists() and (sdir(lab) / "progress.png").stat().st_size > 1000
    assert "matrix_lr: 0.06" in (sdir(lab) / "best_overrides.yaml").read_text()


@pytest.mark.slow
def test_crashes_and_timeouts_are_recorded_and_a_stalled_run_is_rerun(lab, monkeypatch):
    monkeypatch.setenv("FAKE_STALL_FILE", str(lab["tmp"] / "stalled-once"))
    proposals = [{"description": "crashes", "overrides": ["model.activation=crash"]},
                 {"description": "hangs", "overrides": ["model.activation=sleep"]},
                 {"description": "stalls once", "overrides": ["model.activation=stall", "batch.total_tokens=4096",
                                                              "batch.device_tokens=4096"]}]
    s, out = start(lab, "search.baseline_repeats=1", "search.timeout_s=4", "search.preflight=false",
                   proposals=proposals)
    rows = read_tsv(sdir(lab) / "results.tsv")
    assert [(r["status"], r["run_status"]) for r in rows] == [
        ("baseline", "ok"), ("crash", "crash"), ("crash", "timeout"), ("keep", "ok")]
    assert "boom" in rows[1]["reason"]
    assert "timeout" in rows[2]["reason"] and "not starved by the machine" in rows[2]["reason"]  # a hang is the code's
    assert rows[3]["attempts"] == "2"  # the stalled attempt was re-run, and the row says why
    assert rows[3]["reason"].startswith("exp-003 stalled: ") and "; re-run" in rows[3]["reason"]
    assert (sdir(lab) / "runs" / "exp-003-a2" / "summary.json").exists()
    assert "RuntimeError: boom" in (sdir(lab) / "runs" / "exp-001" / "run.log").read_text()
    assert git(lab["repo"], "rev-parse", "research/t").startswith(rows[3]["commit"])


@pytest.mark.slow
def test_the_margin_comes_from_baseline_noise_and_a_would_be_keep_is_confirmed(lab, monkeypatch):
    monkeypatch.setenv("FAKE_NOISE", "0.04")
    proposals = [{"description": "tiny lr change", "overrides": ["optimizer.matrix_lr=0.041"]},
                 {"description": "smaller batch", "overrides": ["batch.total_tokens=4096", "batch.device_tokens=4096"]}]
    s, out = start(lab, "search.baseline_repeats=3", "search.confirm=true", "search.min_delta=0", "search.retest=false",
                   proposals=proposals)
    rows = read_tsv(sdir(lab) / "results.tsv")
    baseline = [float(r["val_bpb"]) for r in rows[:3]]
    assert [r["status"] for r in rows[:3]] == ["baseline"] * 3
    # from the noisy baseline repeats (noise_sigmas x their sigma), not from min_delta=0
    expected = NoiseFloor.pooled([baseline], s.cfg.search.baseline_spread).margin(s.cfg.search.noise_sigmas, 0.0)
    assert expected > 0.001 and float(rows[3]["margin"]) == pytest.approx(expected, abs=1e-5)
    assert rows[3]["status"] == "discard"  # within the noise: not even confirmed
    # the keep was confirmed by the best and the candidate re-run back to back, each run a row of its own
    by = {r["exp"]: r for r in rows}
    assert [r["exp"] for r in rows][4:] == ["exp-002-b1", "exp-002-c1", "exp-002"]
    assert by["exp-002"]["status"] == "keep" and "paired confirmation" in by["exp-002"]["reason"]
    assert by["exp-002-b1"]["status"] == by["exp-002-c1"]["status"] == "confirm"
    assert by["exp-002-b1"]["commit"] == by["base-1"]["commit"] and by["exp-002-c1"]["commit"] == by["exp-002"]["commit"]
    runs = [json.loads((sdir(lab) / "proposals" / f"{x}.json").read_text())["values"][0] for x in ("exp-002", "exp-002-c1")]
    assert float(by["exp-002"]["val_bpb"]) == pytest.approx(sum(runs) / 2, abs=1e-6)  # the candidate's mean
    # 2 dof from the baseline triple, + 1 from the baseline's confirmation re-run, + 1 from the candidate's two runs
    assert s.lab.standings().noise.dof == 4


@pytest.mark.slow
def test_tpe_proposes_inside_the_space_and_resumes_its_history(lab):
    s, out = start(lab, "agent=tpe", "agent.n_startup_trials=2", "search.max_experiments=3", "search.baseline_repeats=1")
    rows = read_tsv(sdir(lab) / "results.tsv")
    assert [r["exp"] for r in rows] == ["base-1", "exp-001", "exp-002", "exp-003"]
    for r in rows[1:]:
        p = json.loads((sdir(lab) / "proposals" / f"{r['exp']}.json").read_text())["proposal"]
        params = p["meta"]["params"]
        assert 0.02 <= params["optimizer.matrix_lr"] <= 0.12 and params["batch.total_tokens"] in (2048, 4096, 8192)
        assert f"batch.device_tokens={params['batch.total_tokens']}" in p["overrides"]  # same_as
    s2, out2 = start(lab, "agent=tpe", "agent.n_startup_trials=2", "search.max_experiments=5",
                     "search.baseline_repeats=1", "search.resume=true")
    rows2 = read_tsv(sdir(lab) / "results.tsv")
    assert rows2[:4] == rows and [r["exp"] for r in rows2[4:]] == ["exp-004", "exp-005"]
    # baseline + 3 re-told from the ledger + 2 new, all complete
    trials = s2.agent.study.trials
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    assert [t.user_attrs.get("exp") for t in trials[:4]] == ["baseline", "exp-001", "exp-002", "exp-003"]


@pytest.mark.slow
def test_resume_finishes_the_in_flight_experiment_once(lab):
    """What kill -9 leaves behind (an in-flight experiment with no row) is finished on resume, once."""
    proposals = [{"description": "smaller batch", "overrides": ["batch.total_tokens=4096", "batch.device_tokens=4096"]},
                 {"description": "lr", "overrides": ["optimizer.matrix_lr=0.06"]}]
    start(lab, "search.baseline_repeats=1", "search.max_experiments=1", proposals=proposals)
    d = sdir(lab)
    state = json.loads((d / "state.json").read_text())
    # forge the moment after exp-002 was committed and started: proposal saved, in_flight set, no row
    (d / "proposals" / "exp-002.json").write_text(json.dumps(
        {"exp": "exp-002", "proposal": {"description": "lr", "hypothesis": "", "overrides": ["optimizer.matrix_lr=0.06"],
                                        "patch": None, "meta": {"agent": "replay", "replay_index": 1}},
         "config": [], "commit": ""}))
    state["in_flight"] = {"exp": "exp-002", "attempt": 1, "commit": "", "run_dir": str(d / "runs" / "exp-002"),
                          "pid": 999999, "started": 0.0}
    (d / "state.json").write_text(json.dumps(state))
    start(lab, "search.baseline_repeats=1", "search.max_experiments=5", "search.resume=true", proposals=proposals)
    rows = read_tsv(d / "results.tsv")
    assert [r["exp"] for r in rows] == ["base-1", "exp-001", "exp-002"]  # replay continued after index 1: done
    assert rows[2]["status"] == "keep" and rows[2]["attempts"] == "2"
    assert (d / "runs" / "exp-002-a2" / "summary.json").exists()
    assert json.loads((d / "state.json").read_text())["in_flight"] is None


@pytest.mark.slow  # subprocesses: a session per case
def test_bad_sessions_are_refused_before_anything_runs(lab, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(SessionError, match="not a git checkout"):
        Session.open("x", False, [], repo=str(plain))
    proposals = [{"description": "a", "overrides": ["model.depth=3"]}]
    start(lab, "search.baseline_repeats=1", "search.max_experiments=0", proposals=proposals)
    with pytest.raises(SessionError, match="already exists.*search.resume=true"):
        start(lab, "search.baseline_repeats=1", proposals=proposals)
    with pytest.raises(SessionError, match="no session 'zz' to resume"):
        start(lab, "search.resume=true", tag="zz", proposals=proposals)
    held = Session.open("t", True, [], repo=str(lab["repo"]))  # a live session holds the lock
    try:
        with pytest.raises(SessionError, match=r"already running \(pid \d+"):
            start(lab, "search.resume=true", proposals=proposals)
    finally:
        held.close()
    git(lab["repo"], "rm", "-q", "conf/model/small.yaml")  # the session branches from a commit without it
    git(lab["repo"], "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "drop model=small")
    with pytest.raises(SessionError, match="do not compose in the worktree"):
        start(lab, "model=small", tag="u", proposals=proposals)
    assert not sdir(lab, "u").exists() and "research/u" not in git(lab["repo"], "branch", "--list")


@pytest.mark.slow
def test_a_streak_of_invalid_proposals_stops_the_session(lab):
    proposals = [{"description": f"seed {i}", "overrides": [f"seed={i}"]} for i in range(5)]
    s, out = start(lab, "search.baseline_repeats=1", "search.max_invalid_in_row=2", proposals=proposals)
    rows = read_tsv(sdir(lab) / "results.tsv")
    assert [r["status"] for r in rows] == ["baseline", "invalid", "invalid"]
    assert "invalid proposals in a row" in out["stop_reason"]


@pytest.mark.slow
def test_resume_with_another_agent_warns_and_names_the_original(lab, caplog):
    start(lab, "agent=tpe", "agent.n_startup_trials=1", "search.max_experiments=1", "search.baseline_repeats=1")
    proposals = [{"description": "smaller batch", "overrides": ["batch.total_tokens=4096", "batch.device_tokens=4096"]}]
    with caplog.at_level("WARNING", logger="src.search"):
        start(lab, "search.max_experiments=2", "search.baseline_repeats=1", "search.resume=true", proposals=proposals)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "was run by agent=tpe" in msg and "continues it with agent=replay" in msg
    assert "search.resume=true agent=tpe" in msg
