"""MLflow tracking: one store under mlruns/ (sqlite db + artifacts beside it).

Usage: uri = resolve_uri(cfg.tracking.uri)
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STORE = REPO / "mlruns"


def resolve_uri(uri: str | None = None, store: Path = DEFAULT_STORE) -> str:
    """The tracking URI: explicit > $MLFLOW_TRACKING_URI > sqlite:///<repo>/mlruns/mlflow.db."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_root(store: Path = DEFAULT_STORE) -> str:
    """Artifacts live beside the db, under mlruns/artifacts (used when creating experiments)."""
    return (store / "artifacts").as_uri()
