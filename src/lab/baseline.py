"""The baseline phase: repeats of the unchanged code until the noise floor can be trusted.

Runs the baseline until search.baseline_repeats undisturbed runs agree within the plausible
spread (search.baseline_spread x val_bpb); while they disagree, more repeats are run, one after
the other, up to search.baseline_max_repeats, so that a third run shows which one was the
outlier (src/lab/decision.py). A run found disturbed is re-run (src/lab/attempts.py). The first
run has nothing to be compared with, so when a later repeat turns out much faster, the earlier
slow one is marked `disturbed` in the ledger and MLflow after the fact, and replaced.

Usage: run_baseline(lab, worker, resumed)   (before the first experiment; resumed: a baseline run a resume
       finishes first, or None; SessionError if the baseline cannot be measured)
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from src.lab.context import Lab
from src.lab.disturbance import Throughput, reference, slowdown
from src.lab.experiment import Experiments, Job
from src.lab.ledger import Experiment, next_baseline
from src.lab.session import SessionError
from src.lab.decisions import BASELINE, DISTURBED, INTERRUPTED

if TYPE_CHECKING:
    from src.lab.workers import Worker

log = logging.getLogger(__name__)


def settled(lab: Lab, rows: list[Experiment]) -> bool:
    """Enough consistent baseline repeats, or as many as search.baseline_max_repeats allows."""
    s, st = lab.cfg.search, lab.standings(rows)
    if st.baseline_runs >= s.baseline_max_repeats:
        if not st.baseline_settled:
            log.warning("the %d baseline runs still disagree by more than search.baseline_spread=%g of val_bpb; "
                        "going on with noise %s (confirmation guards the keeps)", st.baseline_runs,
                        s.baseline_spread, st.noise.describe())
        return True
    return st.baseline_inliers >= s.baseline_repeats and st.baseline_settled


def run_baseline(lab: Lab, worker: "Worker", resumed: Optional[Job] = None) -> None:
    """Run baseline repeats (`resumed` first) until settled(); KeyboardInterrupt once an interrupted run is recorded."""
    s = lab.cfg.search
    experiments = Experiments(lab, worker)
    while True:
        rows = lab.rows()
        if resumed is None and settled(lab, rows):
            return
        disturbed = sum(1 for e in rows if e.exp.startswith("base-") and e.status == DISTURBED)
        if disturbed > s.disturbed_retries:
            raise SessionError(f"{disturbed} baseline runs were disturbed (the machine is busy: another program on "
                               f"its cores?); see {lab.ledger.path}. Resume when it is quiet "
                               f"(search.tag={lab.session.tag} search.resume=true)")
        job, resumed = resumed or Job(next_baseline(rows), None), None
        e = experiments.execute(job)
        if e.status == BASELINE:
            mark_slower_repeats(lab, e)
        elif e.status == INTERRUPTED:
            raise KeyboardInterrupt
        elif e.status != DISTURBED:
            raise SessionError(f"the baseline run {job.exp} failed ({e.run_status}: {e.reason}); see "
                               f"{lab.session.runs_dir / job.exp / 'run.log'}. Fix the session's train overrides or "
                               f"the code, then resume (search.tag={lab.session.tag} search.resume=true)")


def mark_slower_repeats(lab: Lab, new: Experiment) -> None:
    """Earlier baseline runs of new's shape far slower than the fastest one: disturbed after all (amended)."""
    s = lab.cfg.search
    if lab.base_config.budget.mode != "time" or not new.shape:
        return
    rows = lab.rows()
    ref, ref_exp = reference(rows, new.shape)
    for e in rows:
        tp = Throughput.of_row(e)
        if e.status != BASELINE or e.shape != new.shape or tp is None or ref is None:
            continue
        slow = slowdown(tp, ref)
        if slow > s.disturbed_factor:
            note = (f"disturbed after all: {slow:.2f}x slower than {ref_exp}, a later repeat of the same code "
                    f"({tp.describe()} vs {ref.tokens_per_sec:,.0f} tokens/s)")
            log.warning("%s is %s; it leaves the noise floor and the baseline, and is replaced", e.exp, note)
            amended = lab.ledger.amend(e.exp, status=DISTURBED, reason=note)
            try:
                lab.runs.tag_row(amended, len(rows), amended.mlflow_run_id or None, lab.standings().best)
            except Exception as err:
                log.warning("MLflow: could not re-tag %s: %s", e.exp, err)
