"""Helpers for the research-loop tests: a throwaway git copy of the project, the composed search
config, a stand-in train script, and readers for the ledger and the session's MLflow runs.

Not a test module; imported by tests/test_search*.py, test_report.py, test_agents.py.
"""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAKE_TRAIN = Path(__file__).resolve().parent / "search_fake_train.py"
# a real, tiny, deterministic train run: a few seconds
TINY_TRAIN = ["model.depth=2", "budget.mode=tokens", "budget.tokens=32768", "data.eval_tokens=8192", "device=cpu"]


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


def compose_search(overrides: list[str]):
    """The typed SearchAppConfig, composed like `python -m src.search <overrides>`."""
    from hydra import compose, initialize_config_dir

    from src.config import to_object
    from src.lab.config import SearchAppConfig, register_search_configs

    register_search_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_object(compose(config_name="search", overrides=overrides), SearchAppConfig)


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def session_children(uri: str, parent_id: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


def fake_command() -> list[str]:
    return [sys.executable, str(FAKE_TRAIN)]


def make_patch(repo: Path, path: str, transform) -> str:
    """A git-style unified diff of `path` in `repo` after `transform(text) -> text`."""
    import difflib

    old = (repo / path).read_text()
    new = transform(old)
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                 fromfile=f"a/{path}", tofile=f"b/{path}")
    return "".join(lines)


def crash_patch(repo: Path) -> str:
    """src/model.py raising at the first forward pass (imports and builds fine: passes the dry run)."""
    def t(text: str) -> str:
        marker = "    def forward(self, idx"
        i = text.index(marker)
        j = text.index("\n", text.index("):", i)) + 1
        return text[:j] + '        raise RuntimeError("patched model crashes")\n' + text[j:]
    return make_patch(repo, "src/model.py", t)


def comment_patch(repo: Path, path: str = "src/model.py", note: str = "a harmless comment") -> str:
    return make_patch(repo, path, lambda t: f"# {note}\n" + t)
