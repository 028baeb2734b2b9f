"""The lab's decisions: the `status` column of results.tsv, one constant each, and which of them
count. (The rule that makes them is src/lab/decision.py; a training run's own statuses are
src/harness/status.py, re-exported here for the lab.)

Usage: from src.lab.decisions import KEEP, DISCARD, SCORED, mlflow_status
"""
from __future__ import annotations

from src.harness import status as run
from src.harness.status import CRASH, DRY_RUN, FAILED_RUN, KILLED, NAN, OK, OOM, STALLED, TAMPERED, TIMEOUT  # noqa: F401

BASELINE = "baseline"  # a baseline run: the noise floor
KEEP = "keep"  # beat the best by more than the margin (and, while the noise estimate is weak, confirmed)
DISCARD = "discard"
INVALID = "invalid"  # refused before it ran (composition, patch, contract); cost no run
INTERRUPTED = "interrupted"  # the search stopped the run (Ctrl-C / SIGTERM)
DISTURBED = "disturbed"  # the machine was busy: throughput far off the session's for that shape; re-run
CONFIRM = "confirm"  # a confirmation run (the candidate or the best re-run in a pair) backing a decision
CONFLICT = "conflict"  # search.workers > 1: a would-be keep whose patch no longer applies on the best kept meanwhile
PRUNED = "pruned"  # search.prune: stopped early, its learning curve clearly worse than the best's (never kept)
PENDING = ""  # an experiment proposed but not decided yet (a resume re-runs it)

# the `status` column of results.tsv: the reference's keep/discard/crash plus ours
DECISIONS = (BASELINE, KEEP, DISCARD, CRASH, INVALID, INTERRUPTED, TAMPERED, DISTURBED, CONFIRM, CONFLICT, PRUNED)
SCORED = (BASELINE, KEEP, DISCARD, CONFIRM)  # decisions that carry a val_bpb of a finished, undisturbed run
# experiments that count toward search.max_experiments (a disturbed one too: it cost its runs, and a machine
# that stays busy must not keep the session going forever)
COUNTED = (KEEP, DISCARD, CRASH, TAMPERED, DISTURBED, CONFLICT, PRUNED)


def mlflow_status(status: str) -> str:
    """The MLflow run status of a decision or a run status: FINISHED, KILLED (we stopped it) or FAILED."""
    if status in (INTERRUPTED, PRUNED):
        return "KILLED"
    return "FINISHED" if status in (CONFLICT, *SCORED) else run.mlflow_status(status)
