"""A training run's statuses: the `status` of summary.json, one constant each (the lab's decisions
are apart, in src/lab/decisions.py). MLflow run statuses follow from them.

Usage: from src.harness.status import OK, FAILED_RUN, mlflow_status
"""
from __future__ import annotations

OK = "ok"
STALLED = "stalled"  # finished, but stalls ate too much of the budget: re-run
DRY_RUN = "dry_run"
NAN = "nan"  # the loss (or val_bpb) is not finite
CRASH = "crash"  # an exception in training or scoring
KILLED = "killed"  # SIGTERM / SIGINT
TIMEOUT = "timeout"  # the hard wall-clock ceiling (or the scorer's timeout) was hit
OOM = "oom"  # out of device memory; the error says which knob to turn (batch.device_tokens=auto, ...)
TAMPERED = "tampered"  # the scorer's integrity checks (or the runner's clock) caught the research code cheating
FAILED_RUN = (NAN, CRASH, KILLED, TIMEOUT, OOM)  # the run produced no trustworthy val_bpb
RUN_STATUSES = (OK, STALLED, DRY_RUN, TAMPERED, *FAILED_RUN)


def mlflow_status(status: str) -> str:
    """The MLflow run status of a run status: FINISHED or FAILED."""
    return "FINISHED" if status in (OK, STALLED, DRY_RUN) else "FAILED"
