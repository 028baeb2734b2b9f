"""The session report (src/lab/report.py): leaderboard, progress plot, best diff and overrides, MLflow.

Builds a real session in-process (git repo, stand-in train from src/lab/fakes/train.py), then
runs the `python -m src.report` entry point (src/report.py main) on it.

Run: python -m pytest -q tests/lab/test_report.py   (the session-building test is marked slow)
"""
from __future__ import annotations

import json
import os

import pytest
import yaml

from src.lab.ledger import Experiment
from src.lab.report import leaderboard
from src.lab.report_cli import main
from src.lab.loop import Search, train_overrides
from tests.support.helpers import comment_patch, compose_search, fake_command, make_repo


@pytest.mark.slow
def test_the_report_ranks_the_session_explains_refusals_and_crashes_and_goes_to_mlflow(tmp_path, capsys):
    repo = make_repo(tmp_path)
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump([
        {"description": "smaller batch", "overrides": ["batch.total_tokens=4096", "batch.device_tokens=4096"]},
        {"description": "bad lr", "overrides": ["optimizer.matrix_lr=0.01"]},
        {"description": "comment + lr", "patch": comment_patch(repo, note="kept comment"),
         "overrides": ["optimizer.matrix_lr=0.05"]},
        {"description": "edit prepare", "patch": comment_patch(repo, "prepare.py")},
        {"description": "crash", "overrides": ["model.activation=crash"]},
        {"description": "best lr", "overrides": ["optimizer.matrix_lr=0.06"]},
    ]))
    ovs = [f"search.repo={repo}", "search.tag=r", "search.progress=false", "device=cpu", "agent=replay",
           f"agent.file={f}", "search.preflight=false"]
    Search(compose_search(ovs), train_overrides(ovs), fake_command()).run()
    root = repo / "outputs" / "research"
    d = root / "r"
    for name in ("report.md", "progress.png", "best.diff", "best_overrides.yaml"):
        (d / name).unlink()
    assert main(["--root", str(root)]) == 0  # the latest session by default
    out = capsys.readouterr().out
    assert "# Research session `r`" in out and "## Leaderboard" in out
    board = [ln for ln in out.splitlines() if ln.startswith("| 1 |")]
    assert board and "exp-006" in board[0]  # best first
    assert "edit prepare" in out and "outside the editable files" in out
    assert "RuntimeError: boom" in out
    assert "+experiment=r_best" in out
    assert yaml.safe_load((d / "best_overrides.yaml").read_text())["optimizer"] == {"matrix_lr": 0.06}
    diff = (d / "best.diff").read_text()
    assert "kept comment" in diff and "conf/experiment/r_best.yaml" in diff
    assert (d / "progress.png").read_bytes()[:4] == b"\x89PNG"
    from mlflow.tracking import MlflowClient

    state = json.loads((d / "state.json").read_text())
    arts = [a.path for a in MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).list_artifacts(state["parent_run_id"], "report")]
    assert {"report/report.md", "report/progress.png", "report/best.diff"} <= set(arts)
    assert main(["nosuch", "--root", str(root)]) == 2
    assert main(["--root", str(tmp_path / "empty")]) == 2


def test_the_leaderboard_ranks_scored_rows_best_first_and_leaves_out_unscored_ones():
    rows = [Experiment("base-1", "baseline", "b", val_bpb=3.0), Experiment("exp-001", "invalid", "i"),
            Experiment("exp-002", "keep", "k", val_bpb=2.5), Experiment("exp-003", "crash", "c"),
            Experiment("exp-004", "discard", "d", val_bpb=2.7)]
    assert [e.exp for e in leaderboard(rows)] == ["exp-002", "exp-004", "base-1"]
