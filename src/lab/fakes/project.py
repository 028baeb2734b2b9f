"""The project in a throwaway git repo, and what a stand-in research session needs around it.

Shared by the tests (through tests/support/helpers.py) and the benches (through src/lab/fakes/scripted_researcher.py):
- make_repo (a git copy of this checkout's working tree, one commit), git (a git command that must succeed)
- make_patch / comment_patch (unified diffs against that copy)
- fake_command (the stand-in train script src/lab/fakes/train.py, the command a session runs instead of src.train)
- compose_search (the typed SearchAppConfig, composed like `python -m src.search`), read_tsv (the ledger)

Usage: repo = make_repo(tmp); Search(compose_search(ovs), train_overrides(ovs), fake_command()).run()
"""
from __future__ import annotations

import csv
import difflib
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CONF = REPO / "conf"
FAKE_TRAIN = Path(__file__).resolve().parent / "train.py"


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"git {args}: {out.stderr}"
    return out.stdout.strip()


def make_repo(root: Path) -> Path:
    """A git repo holding a copy of this project's code and configs (the working tree), one commit."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, repo / name, ignore=ignore)
    for name in ("prepare.py", "pyproject.toml"):
        shutil.copy2(REPO / name, repo / name)
    (repo / ".gitignore").write_text("outputs/\nmlruns/\n__pycache__/\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "project")
    return repo


def fake_command() -> list[str]:
    """The stand-in for `python -m src.train` (src/lab/fakes/train.py): same CLI contract, no torch."""
    return [sys.executable, str(FAKE_TRAIN)]


def make_patch(repo: Path, path: str, transform) -> str:
    """A git-style unified diff of `path` in `repo` after `transform(text) -> text`."""
    old = (repo / path).read_text()
    new = transform(old)
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                 fromfile=f"a/{path}", tofile=f"b/{path}")
    return "".join(lines)


def comment_patch(repo: Path, path: str = "src/research/model.py", note: str = "a harmless comment") -> str:
    """A patch that adds one comment line at the top of `path`: changes the code, not the result."""
    return make_patch(repo, path, lambda t: f"# {note}\n" + t)


def read_tsv(path: Path) -> list[dict]:
    """The rows of a tab-separated ledger (results.tsv) as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def compose_search(overrides: list[str]):
    """The typed SearchAppConfig, composed like `python -m src.search <overrides>` (Hydra errors propagate)."""
    from hydra import compose, initialize_config_dir

    from src.harness.config import to_object
    from src.lab.config import SearchAppConfig, register_search_configs

    register_search_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_object(compose(config_name="search", overrides=overrides), SearchAppConfig)
