"""Run statuses and session decisions: the one list of each, used by train, runner, ledger and tracking.

A training run ends with a `status` in summary.json (RUN_STATUSES); the research loop adds
`interrupted` (the search was stopped mid-run) and records each experiment with a decision
(DECISIONS, the `status` column of results.tsv). MLflow run statuses follow from both.

Usage: from src.harness.status import FAILED_RUN, mlflow_status
"""
from __future__ import annotations

OK = "ok"
STALLED = "stalled"  # finished, but stalls ate too much of the budget: re-run
DRY_RUN = "dry_run"
OOM = "oom"  # out of device memory; the error says which knob to turn (batch.device_tokens=auto, ...)
FAILED_RUN = ("nan", "crash", "killed", "timeout", OOM)  # the run produced no trustworthy val_bpb
RUN_STATUSES = (OK, STALLED, DRY_RUN, *FAILED_RUN)
INTERRUPTED = "interrupted"  # the search stopped the run (Ctrl-C / SIGTERM); not a train status
TAMPERED = "tampered"  # the scorer's integrity checks (or the runner's clock) caught the research code cheating
DISTURBED = "disturbed"  # the machine was busy: throughput far off the session's for that shape; re-run
CONFIRM = "confirm"  # a confirmation run (the candidate or the best re-run back to back) backing a decision
CONFLICT = "conflict"  # search.workers > 1: a would-be keep whose patch no longer applies on the best kept meanwhile

# the `status` column of results.tsv: the reference's keep/discard/crash plus ours
DECISIONS = ("baseline", "keep", "discard", "crash", "invalid", INTERRUPTED, TAMPERED, DISTURBED, CONFIRM, CONFLICT)
SCORED = ("baseline", "keep", "discard", CONFIRM)  # decisions that carry a val_bpb of a finished, undisturbed run
# experiments that count toward search.max_experiments (a disturbed one too: it cost its runs, and a machine
# that stays busy must not keep the session going forever)
COUNTED = ("keep", "discard", "crash", TAMPERED, DISTURBED, CONFLICT)


def mlflow_status(status: str) -> str:
    """The MLflow run status of a run status or a decision: FINISHED, KILLED (we stopped it) or FAILED."""
    if status == INTERRUPTED:
        return "KILLED"
    return "FINISHED" if status in (OK, STALLED, DRY_RUN, CONFLICT, *SCORED) else "FAILED"
