"""`python -m src.search` and `python -m src.report` for real: the CLI, real (tiny, deterministic)
training runs of src.train in the session's worktree, a real git repo and the test MLflow store.
Includes Ctrl-C and kill -9 of the search process in the middle of an experiment, then resume.

Run: python -m pytest -q tests/lab/test_search_cli.py   (all slow: real CLI runs)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from src.lab.runner import alive
from tests.support.helpers import (REPO, TINY_TRAIN, comment_patch, crash_patch, git, make_patch, make_repo, read_summary,
                                   read_tsv, run_cli, session_children, wait_for)

pytestmark = pytest.mark.slow


def search_args(tmp: Path, repo: Path, proposals: list, *extra: str) -> list[str]:
    f = tmp / "proposals.yaml"
    f.write_text(yaml.safe_dump(proposals))
    return ["agent=replay", f"agent.file={f}", f"search.repo={repo}", "search.tag=cli", "search.baseline_repeats=1",
            "search.confirm=false",  # paired confirmation has tests of its own (test_verdicts.py)
            "search.plausible_gain=10",  # tiny runs gain a lot at once; the plausibility gate is tested in test_integrity.py
            f"hydra.run.dir={tmp / 'hydra'}", *TINY_TRAIN, *extra]


@pytest.mark.usefixtures("shakespeare")
def test_a_replay_session_with_real_training_keeps_refuses_and_crashes_then_reports(tmp_path):
    repo = make_repo(tmp_path)
    proposals = [
        {"description": "smaller batch", "hypothesis": "twice the steps for the same tokens",
         "overrides": ["batch.total_tokens=4096", "batch.device_tokens=4096"]},
        {"description": "edit the data harness", "patch": comment_patch(repo, "prepare.py")},
        {"description": "a model that crashes", "hypothesis": "it will not run", "patch": crash_patch(repo)},
        {"description": "a model that does not import", "patch": make_patch(
            repo, "src/research/model.py", lambda t: t + "\nraise RuntimeError('no_such_model_here')\n")},
    ]
    proc = run_cli("src.search", *search_args(tmp_path, repo, proposals), timeout=600)
    assert "best val_bpb" in proc.stdout
    d = repo / "outputs" / "research" / "cli"
    rows = read_tsv(d / "results.tsv")
    assert [(r["exp"], r["status"]) for r in rows] == [("base-1", "baseline"), ("exp-001", "keep"),
                                                       ("exp-002", "invalid"), ("exp-003", "crash"),
                                                       ("exp-004", "invalid")]
    assert float(rows[1]["val_bpb"]) < float(rows[0]["val_bpb"]) - float(rows[1]["margin"])
    assert "prepare.py" in rows[2]["reason"] and rows[2]["val_bpb"] == ""
    assert not (d / "runs" / "exp-002").exists()  # refused before anything ran
    assert "patched model crashes" in rows[3]["reason"]
    assert "patched model crashes" in (d / "runs" / "exp-003" / "run.log").read_text()
    # no dry run before each run: a candidate whose run fails before its first step is invalid, not a crash
    assert "before its first step" in rows[4]["reason"] and "no_such_model_here" in rows[4]["reason"]
    assert not (d / "runs" / "exp-001" / "preflight").exists()
    # the branch holds the keep; the crash was reset away; the user's main is untouched
    assert git(repo, "rev-parse", "research/cli").startswith(rows[1]["commit"])
    assert "patched model crashes" not in (d / "worktree" / "src" / "research" / "model.py").read_text()
    assert git(repo, "rev-list", "--count", "main..research/cli") == "1"
    # what ran is what the branch reproduces: the run's config carries the committed preset
    summary = read_summary(d / "runs" / "exp-001")
    assert summary["status"] == "ok" and summary["val_bpb"] == pytest.approx(float(rows[1]["val_bpb"]), abs=1e-6)
    # MLflow agrees row for row
    state = json.loads((d / "state.json").read_text())
    uri = os.environ["MLFLOW_TRACKING_URI"]
    tagged = {r.data.tags["search.exp"]: r for r in session_children(uri, state["parent_run_id"])
              if "search.exp" in r.data.tags}
    assert sorted(tagged) == [r["exp"] for r in rows]
    for r in rows:
        assert tagged[r["exp"]].info.run_id == r["mlflow_run_id"]
        assert tagged[r["exp"]].data.tags["search.status"] == r["status"]
    assert summary["mlflow_run_id"] == rows[1]["mlflow_run_id"]  # the train run itself is the child

    # the held-out test split, scored once at the end for the baseline and the best: the session's last line,
    # heldout.json, the parent run and the report say "val gain X, test gain Y"
    held = json.loads((d / "heldout.json").read_text())
    assert [r["run"] for r in held["baseline"]["runs"]] == ["base-1"] and held["best"]["exp"] == "exp-001"
    assert [r["run"] for r in held["best"]["runs"]] == ["exp-001"] and held["best"]["commit"].startswith(rows[1]["commit"])
    assert held["best"]["runs"][0]["status"] == "ok" and held["baseline"]["runs"][0]["val_bpb"] == pytest.approx(
        float(rows[0]["val_bpb"]), abs=1e-6)
    assert held["val_gain"] == pytest.approx(float(rows[0]["val_bpb"]) - float(rows[1]["val_bpb"]), abs=1e-5)
    assert held["test_gain"] is not None and held["baseline"]["test_bpb"] != held["baseline"]["val_bpb"]
    last = [ln for ln in proc.stdout.splitlines() if "Best val_bpb" in ln][-1]
    assert f"val gain {held['val_gain']:+.4f}, test gain {held['test_gain']:+.4f}" in last, last
    parent = MlflowClient(uri).get_run(state["parent_run_id"]).data
    assert parent.metrics["heldout/test_gain"] == pytest.approx(held["test_gain"]) and "test gain" in parent.tags["heldout"]

    # the printed MLflow link opens the runs table in the session's shared view (bench/mlflow_ui.py renders it in a
    # headless browser): its columns are metrics and tags the rows carry, its filter selects this session's runs
    link = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MLflow: ")).split()[1]
    exp = MlflowClient(uri).get_experiment_by_name("overnight")
    assert link.endswith(f"/#/experiments/{exp.experiment_id}/runs?viewStateShareKey=overnight-cli"), link
    view = json.loads(exp.tags["mlflow.sharedViewState.overnight-cli"])
    listed = MlflowClient(uri).search_runs([exp.experiment_id], view["searchFilter"])
    assert sorted(r.info.run_name for r in listed) == sorted([r["exp"] for r in rows if r["mlflow_run_id"]]
                                                            + ["research/cli"])
    child = MlflowClient(uri).get_run(rows[1]["mlflow_run_id"]).data
    for col in ("metrics.`search/val_bpb`", "metrics.`search/delta`", "tags.`search.status`", "tags.`search.description`"):
        kind, key = col.split(".", 1)
        assert col in view["selectedColumns"] and key.strip("`") in getattr(child, kind), col
    assert view["orderByKey"] == "metrics.`search/val_bpb`" and view["orderByAsc"] is True

    rep = run_cli("src.report", "cli", "--root", str(repo / "outputs" / "research"))
    assert "Leaderboard" in rep.stdout and "exp-001" in rep.stdout
    assert f"test gain {held['test_gain']:+.4f}" in rep.stdout  # cached: the same figures, not scored again
    assert json.loads((d / "heldout.json").read_text())["scored_utc"] == held["scored_utc"]
    assert "batch:" in (d / "best_overrides.yaml").read_text()
    assert (d / "progress.png").exists() and "conf/experiment/cli_best.yaml" in (d / "best.diff").read_text()

    arts = [a.path for a in MlflowClient(uri).list_artifacts(state["parent_run_id"], "report")]
    assert "report/report.md" in arts and "report/progress.png" in arts


def _in_flight(d: Path, exp: str):
    try:
        fl = next(iter(json.loads((d / "state.json").read_text()).get("running") or []), None)
    except (OSError, ValueError):
        return None
    return fl if fl and fl["exp"] == exp and fl.get("pid") and alive(fl["pid"]) else None


@pytest.mark.usefixtures("shakespeare")
def test_ctrl_c_then_kill_9_mid_experiment_then_resume_finishes_it_once(tmp_path):
    repo = make_repo(tmp_path)
    proposals = [{"description": f"matrix lr {lr}", "overrides": [f"optimizer.matrix_lr={lr}"]}
                 for lr in (0.05, 0.03, 0.06)]
    args = search_args(tmp_path, repo, proposals, "search.max_experiments=1", "search.preflight=false",
                       "search.test_split=false")
    d = repo / "outputs" / "research" / "cli"
    cmd = [sys.executable, "-m", "src.search", *args]

    # 1. Ctrl-C during exp-001: the run is stopped and recorded as interrupted
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fl = wait_for(lambda: _in_flight(d, "exp-001"), 300, "exp-001 to start")
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out[-3000:]
    assert not alive(fl["pid"])
    rows = read_tsv(d / "results.tsv")
    assert [(r["exp"], r["status"]) for r in rows] == [("base-1", "baseline"), ("exp-001", "interrupted")]
    assert git(repo, "rev-parse", "research/cli") == git(repo, "rev-parse", "main")  # reset to the best

    # 2. resume, then kill -9 the search during exp-002: its training dies with it, no row is written
    p = subprocess.Popen([*cmd, "search.resume=true"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    fl = wait_for(lambda: _in_flight(d, "exp-002"), 300, "exp-002 to start")
    before = (d / "results.tsv").read_bytes()
    p.kill()
    p.communicate(timeout=60)
    wait_for(lambda: not alive(fl["pid"]), 30, "the orphaned training run to die")
    assert (d / "results.tsv").read_bytes() == before

    # 3. resume to the end: exp-002 is finished once (second attempt); max_experiments=1 counts it alone
    proc = run_cli("src.search", *args, "search.resume=true", timeout=600)
    rows = read_tsv(d / "results.tsv")
    assert [r["exp"] for r in rows] == ["base-1", "exp-001", "exp-002"]
    assert rows[1]["status"] == "interrupted" and rows[2]["attempts"] == "2"
    assert rows[2]["status"] in ("keep", "discard"), proc.stdout[-2000:]
    assert (d / "runs" / "exp-002-a2" / "summary.json").exists()
    best = [r for r in rows if r["status"] == "keep"]
    tip = git(repo, "rev-parse", "research/cli")
    assert tip.startswith(best[-1]["commit"]) if best else tip == git(repo, "rev-parse", "main")
    assert json.loads((d / "state.json").read_text())["running"] == []
    state = json.loads((d / "state.json").read_text())
    children = session_children(os.environ["MLFLOW_TRACKING_URI"], state["parent_run_id"])
    tagged = [r.data.tags["search.exp"] for r in children if "search.exp" in r.data.tags]
    assert sorted(tagged) == [r["exp"] for r in rows]  # one tagged child per row, no duplicate
    assert all(r.info.status != "RUNNING" for r in children)


def test_bad_input_is_refused_before_anything_runs(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    p = run_cli("src.search", f"search.repo={plain}", f"hydra.run.dir={tmp_path / 'h1'}", check=False)
    assert p.returncode == 2 and "not a git checkout" in p.stderr + p.stdout
    repo = make_repo(tmp_path)
    p = run_cli("src.search", f"search.repo={repo}", "model.depht=3", f"hydra.run.dir={tmp_path / 'h2'}", check=False)
    assert p.returncode != 0 and "depht" in p.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {description: x, overides: [model.depth=3]}\n")
    p = run_cli("src.search", f"search.repo={repo}", "agent=replay", f"agent.file={bad}",
                f"hydra.run.dir={tmp_path / 'h3'}", check=False)
    assert p.returncode == 2 and "unknown proposal field" in p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert not (repo / "outputs" / "research").exists()  # no session, no branch
    assert "research/" not in git(repo, "branch", "--list")
