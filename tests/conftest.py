"""Shared test set-up: an isolated data cache and MLflow store, the prepared default data, the CLI.

Every test session prepares the default Shakespeare data into its own cache (OVERNIGHT_CACHE,
inherited by CLI subprocesses) and points MLflow at a temporary sqlite store, so no test
touches ~/.cache or the repository's mlruns/.

Run: python -m pytest -q
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Tiny, fast runs of the real CLI: 2 layers, a few seconds, a slice of the validation split.
TINY = ["model.depth=2", "data.eval_tokens=8192", "progress=false"]


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("overnight")
    saved = {k: os.environ.get(k) for k in ("OVERNIGHT_CACHE", "MLFLOW_TRACKING_URI")}
    os.environ["OVERNIGHT_CACHE"] = str(root / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    from src.config import DataConfig
    from prepare import prepare

    prepare(DataConfig(cache_dir=str(root / "cache")))
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_cli(module: str, *args: str, cwd: Path = REPO, timeout: float = 300, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` for real; on failure show its output."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc
