"""Run statuses and session decisions: the one list of each, used by train, runner, ledger and tracking.

A training run ends with a `status` in summary.json (RUN_STATUSES); the research loop adds
`interrupted` (the search was stopped mid-run) and records each experiment with a decision
(DECISIONS, the `status` column of results.tsv). MLflow run statuses follow from both.

Usage: from src.status import FAILED_RUN, mlflow_status
"""
from __future__ import annotations

OK = "ok"
STALLED = "stalled"  # finished, but stalls ate too much of the budget: re-run
DRY_RUN = "dry_run"
FAILED_RUN = ("nan", "crash", "killed", "timeout")  # the run produced no trustworthy val_bpb
RUN_STATUSES = (OK, STALLED, DRY_RUN, *FAILED_RUN)
INTERRUPTED = "interrupted"  # the search stopped the run (Ctrl-C / SIGTERM); not a train status

# the `status` column of results.tsv: the reference's keep/discard/crash plus ours
DECISIONS = ("baseline", "keep", "discard", "crash", "invalid", INTERRUPTED)
SCORED = ("baseline", "keep", "discard")  # decisions that carry a val_bpb of a finished run
COUNTED = ("keep", "discard", "crash")  # experiments that count toward search.max_experiments


def mlflow_status(status: str) -> str:
    """The MLflow run status of a run status or a decision: FINISHED, KILLED (we stopped it) or FAILED."""
    if status == INTERRUPTED:
        return "KILLED"
    return "FINISHED" if status in (OK, STALLED, DRY_RUN, *SCORED) else "FAILED"
