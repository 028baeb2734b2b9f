"""The baseline phase: repeats of the unchanged code until the noise floor can be trusted.

Runs the baseline until search.baseline_repeats undisturbed runs agree within the plausible
spread (search.baseline_spread x val_bpb); while they disagree, more repeats are run, up to
search.baseline_max_repeats, so that a third run shows which one was the outlier
(src/lab/decision.py). With several workers (search.workers > 1) the repeats run at once, one on
each worker (which also measures each slot's speed: the ledger's `worker` and tokens/s columns). A
run found disturbed is re-run (src/lab/attempts.py). The first
run has nothing to be compared with, so when a later repeat turns out much faster, the earlier
slow one is marked `disturbed` in the ledger and MLflow after the fact, and replaced.

Usage: run_baseline(lab, workers, resumed)   (before the first experiment; resumed: the baseline runs a resume
       finishes first; SessionError if the baseline cannot be measured)
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
from typing import TYPE_CHECKING

from src.lab.context import Lab
from src.lab.disturbance import Throughput, reference, slowdown
from src.lab.experiment import Experiments, Job
from src.lab.ledger import Experiment, next_baselines
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


def run_baseline(lab: Lab, workers: list["Worker"], resumed: list[Job] = ()) -> None:
    """Run baseline repeats (`resumed` first), one on each worker at once, until settled(); KeyboardInterrupt once
    an interrupted run is recorded."""
    s = lab.cfg.search
    pending = list(resumed)
    while True:
        rows = lab.rows()
        if not pending and settled(lab, rows):
            return
        disturbed = sum(1 for e in rows if e.exp.startswith("base-") and e.status == DISTURBED)
        if disturbed > s.disturbed_retries:
            raise SessionError(f"{disturbed} baseline runs were disturbed (the machine is busy: another program on "
                               f"its cores?); see {lab.ledger.path}. Resume when it is quiet "
                               f"(search.tag={lab.session.tag} search.resume=true)")
        jobs, pending = pending[:len(workers)], pending[len(workers):]
        st = lab.standings(rows)  # as many new runs as are missing (one if they disagree), a worker each
        room = min(max(1, s.baseline_max_repeats - st.baseline_runs), max(1, s.baseline_repeats - st.baseline_inliers))
        room -= len(jobs)
        new = max(0, min(len(workers) - len(jobs), room))  # (a resumed run keeps its own id)
        jobs += [Job(exp, None) for exp in next_baselines(rows, [j.exp for j in jobs], new)]
        for e in run_together(lab, workers, jobs):
            if e.status == BASELINE:
                mark_slower_repeats(lab, e)
            elif e.status == INTERRUPTED:
                raise KeyboardInterrupt
            elif e.status != DISTURBED:
                raise SessionError(f"the baseline run {e.exp} failed ({e.run_status}: {e.reason}); see "
                                   f"{lab.session.runs_dir / e.exp / 'run.log'}. Fix the session's train overrides "
                                   f"or the code, then resume (search.tag={lab.session.tag} search.resume=true)")


def run_together(lab: Lab, workers: list["Worker"], jobs: list[Job]) -> list[Experiment]:
    """Each job on a worker of its own (a re-attached job on the worker that started it), all at once; the rows in
    job order. Ctrl-C stops every run and each records itself before KeyboardInterrupt goes on."""
    free, placed = list(workers), []
    for job in jobs:
        w = next((x for x in free if job.job and x.index == job.worker), free[0])
        free.remove(w)
        placed.append((w, job))
    with lab.lock:  # a pool worker's own worktree is created by its first use
        for w, job in placed:
            if w.index is not None and not job.job:
                w.tree.ensure(lab.session.repo_git, lab.session.state.base_commit)
    if len(placed) == 1:
        w, job = placed[0]
        return [Experiments(lab, w).execute(job)]
    ex = cf.ThreadPoolExecutor(len(placed), thread_name_prefix="baseline")
    futures = [ex.submit(Experiments(lab, w).execute, job) for w, job in placed]
    try:
        return [f.result() for f in futures]
    except BaseException:
        for w, _ in placed:
            w.runner.interrupt()
        cf.wait(futures)
        raise
    finally:
        ex.shutdown(wait=True)


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
