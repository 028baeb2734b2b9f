"""One experiment, start to record: stage the candidate, run it, decide (and confirm), record.

The one pipeline of the lab, run by one worker (src/lab/workers.py) at a time: the baseline phase
and a pool of one on the session's own worktree and runner, each worker of a larger pool in a
worktree of its own. A baseline run is an experiment without a proposal. The run is re-run while it
is `stalled` or disturbed (src/lab/attempts.py); a disturbed one that stays so is recorded
`disturbed`, neither kept nor discarded. A run that beats the best by the screen margin is kept at
once when the noise floor is strong, else (search.confirm, by default while sigma has few dof) only
if the paired confirmation agrees (src/lab/confirm.py).

Under concurrency a result is judged against the best at the time it finishes: a would-be keep
takes the `advance` lock (would-be keeps one at a time; discards are not held up), and if its parent
is no longer the best it is rebased (the patch re-applied on the current best, the overrides merged
with the best's) and confirmed there before the branch advances; a patch that no longer applies is a
`conflict` row. Ledger, state and branch writes happen under the session's lock; the runs outside it.
The ledger row is the commit point: the branch tip follows the best, then the row is appended, then
the MLflow tags, then the session state.

Usage: row = Experiments(lab, worker).execute(Job("exp-004", proposal))
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from src.lab import candidate, retest
from src.lab.attempts import Attempt, Attempts
from src.lab.confirm import Confirmation
from src.lab.context import Lab
from src.lab.decision import Verdict, decide, weak
from src.lab.integrity import implausible
from src.lab.leases import Leases
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal, merge_overrides
from src.lab.prune import pruner_for
from src.lab.runner import FROZEN, Outcome, RunInterrupted
from src.harness.score_client import CHECKPOINT
from src.lab.session import InFlight
from src.lab.standings import Standings
from src.lab.decisions import (BASELINE, CONFIRM, CONFLICT, CRASH, DISTURBED, INTERRUPTED, INVALID, KEEP, OK,
                               PENDING, PRUNED, TAMPERED)

if TYPE_CHECKING:
    from src.lab.workers import Worker

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One experiment to run: a new proposal (attempt 0), or one a resume finishes (src/lab/resume.py)."""
    exp: str
    proposal: Optional[Proposal]  # None: a baseline run
    attempt: int = 0  # attempts an earlier invocation started
    proposed: str = ""  # when it was proposed (ISO time)
    job: str = ""  # launcher=submitit_*: a running job of attempt `attempt` to re-attach to, not to run again
    job_folder: str = ""
    worker: Optional[int] = None  # re-attaching: the worker whose worktree the job runs in
    commit: str = ""  # re-attaching: the candidate commit the job runs
    parent: str = ""  # re-attaching: the best commit it was branched from


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def new_row(exp: str, proposal: Optional[Proposal], base_overrides: list[str], overrides: list[str]) -> Experiment:
    if proposal is None:
        return Experiment(exp=exp, status="", description="baseline", kind="baseline",
                          hypothesis="the starting point; repeats measure the noise floor",
                          overrides=" ".join(base_overrides))
    return Experiment(exp=exp, status=PENDING, description=proposal.description, hypothesis=proposal.hypothesis,
                      kind=proposal.kind, overrides=" ".join(proposal.overrides), proposal=proposal,
                      overrides_in_effect=overrides)


class Experiments:
    """The pipeline on one worker: stage -> attempts -> (confirm) -> decide -> record.

    leases: the pool's (None: no other worker to borrow); a confirmation runs its pairs side by side on this
    worker and a borrowed one, and this worker may be lent while its experiment waits for the advance lock."""

    def __init__(self, lab: Lab, worker: "Worker", leases: Optional[Leases] = None):
        self.lab, self.worker, self.leases = lab, worker, leases
        self.attempts = Attempts(lab, worker)

    def execute(self, job: Job) -> Experiment:
        """Stage on the best (under the lock), run (outside it), settle, record; an interrupted run is recorded
        `interrupted` (the caller stops the session)."""
        lab, w = self.lab, self.worker
        attach = bool(job.job) and hasattr(w.runner, "attach")
        if job.job and not attach:  # resumed with launcher=local: the job is not waited on; stop it, run it again
            from src.lab.launcher import JobHandle

            log.warning("%s: job %s is left by a launcher this invocation does not use; cancelling it", job.exp,
                        job.job)
            JobHandle(job.job, job.job_folder).cancel()
        with lab.lock:
            rows = lab.rows()
            st = lab.standings(rows)
            asked_err = None
            if job.proposal is not None and job.proposal.retest:  # an agent's retest: the change it re-runs
                try:
                    job = replace(job, proposal=retest.asked(rows, job.proposal, job.exp, lab.cfg.search))
                except InvalidProposal as err:
                    asked_err = err
            e, overrides = self._row(job, st, attach)
            fl = InFlight(exp=job.exp, attempt=job.attempt, commit=e.commit if attach else "", run_dir="",
                          started=time.time(), worker=w.index, parent=job.parent if attach else st.best.commit,
                          proposed=job.proposed)
            w.mark(e, fl.parent, fl.proposed)
            if attach:  # never a moment without its job
                lab.session.track(replace(fl, job=job.job, job_folder=job.job_folder))
            else:
                lab.session.track(fl)
                try:
                    if asked_err is not None:
                        raise asked_err
                    e.commit = self._stage(job, st.best, overrides)
                except InvalidProposal as err:
                    return self._invalid(e, err, rows)
        try:
            if job.proposal is not None and job.proposal.retest:
                self._asked_retest(e, job.proposal, overrides, fl.parent)
                w.usage.experiments += 1
                return e
            if attach:
                w.runner.attach(job.job, job.job_folder)
            a = self.attempts.run(job.exp, e.commit, overrides, job.attempt, lab.rows(), fl, attach=attach,
                                  prune=self._pruner if job.proposal is not None and lab.cfg.search.prune else None)
            a.fill(e)
            err = candidate.failed_to_start(lab, job.proposal, a.out)
            if err is not None:  # it never trained: the proposal is invalid, not a counted crash
                with lab.lock:
                    return self._invalid(e, err, rows, a.out)
            if job.proposal is None:
                settle_baseline(e, a)
                with lab.lock:
                    self._finish(e, rows, a.out)
            else:
                self._settle(e, a, job.proposal, overrides, fl.parent)
        except RunInterrupted as ri:  # Ctrl-C / SIGTERM: the run was stopped; record it
            out = ri.outcome
            e.status, e.run_status, e.reason = INTERRUPTED, INTERRUPTED, out.error_line
            e.attempts = max(e.attempts, job.attempt + (0 if attach else 1))
            with lab.lock:
                self._finish(e, rows, out, prune=False)
        w.usage.experiments += 1
        return e

    def _row(self, job: Job, st: Standings, attach: bool) -> tuple[Experiment, list[str]]:
        """The experiment's ledger row as it starts, and the research overrides in effect for it."""
        lab, p = self.lab, job.proposal
        if attach:  # the job runs what was staged: the overrides recorded then
            rec = lab.ledger.load(job.exp) or {}
            overrides = list(rec.get("config") or merge_overrides(st.best.overrides, p.overrides))
        else:
            overrides = merge_overrides(st.best.overrides, p.overrides) if p else []
            lab.ledger.save(job.exp, p, overrides)
        e = new_row(job.exp, p, lab.base_overrides, overrides)
        e.commit, e.sigma, e.dof = job.commit if attach else st.best.commit, st.noise.sigma, st.noise.dof
        return e, overrides

    def _stage(self, job: Job, best, overrides: list[str]) -> str:
        """The candidate commit, in the worker's worktree on top of the best (a baseline: the base commit)."""
        lab, w = self.lab, self.worker
        if job.proposal is None:
            commit = lab.session.state.base_commit
        else:
            w.tree.ensure(lab.session.repo_git, best.commit)
            commit = candidate.stage(lab, w.tree, job.exp, job.proposal, best, overrides)
        lab.ledger.save(job.exp, job.proposal, overrides, commit=commit)
        return commit

    def _invalid(self, e: Experiment, err: Exception, rows: list[Experiment],
                 out: Optional[Outcome] = None) -> Experiment:
        """Under the lock: the proposal cannot run (out: the run that failed before training); recorded `invalid`."""
        e.status, e.run_status, e.reason, e.sigma, e.dof = INVALID, out.status if out else "-", str(err), None, None
        self._finish(e, rows, out)
        return e

    def _pruner(self):
        """The pruner of a screen run, against the best as it stands when the run starts (src/lab/prune.py)."""
        with self.lab.lock:
            return pruner_for(self.lab, self.lab.rows())

    def _settle(self, e: Experiment, a: Attempt, proposal: Proposal, overrides: list[str], parent: str) -> None:
        """Judge against the best now; a would-be keep waits for the advance lock, then keep (rebased and confirmed
        when the best moved), discard or conflict; the branch advances under the lock."""
        lab, out = self.lab, a.out
        with lab.lock:
            rows = lab.rows()
            st = lab.standings(rows)
            screen = decide(out.val_bpb, st.best.val_bpb, st.margin) if out.ok and out.val_bpb is not None else None
            keep = screen is not None and (screen.keep or near_miss(screen, lab.cfg.search))
            if not keep:  # discard, crash, disturbed, tampered: nothing more to run
                self._decide(e, a, st, overrides, rows, parent)
                self._finish(e, rows, out)
                return
        with self._advancing():
            if self.worker.tree.head() != e.commit:  # lent meanwhile: the candidate goes back in its worktree
                self.worker.tree.reset(e.commit)
            with lab.lock:
                rows = lab.rows()
                st = lab.standings(rows)
            if st.best.commit == parent:
                self._decide(e, a, st, overrides, rows, parent)
            else:
                self._rebase(e, a, proposal, st, rows, parent)
            with lab.lock:
                self._finish(e, rows, out)

    @contextmanager
    def _advancing(self):
        """The advance lock: would-be keeps (and near misses, retested against the best) one at a time, so only its
        holder moves the best. Waiting for it, this worker runs nothing: the holder may borrow it for a confirmation
        run (it comes back before the lock is free)."""
        with self.leases.waiting(self.worker) if self.leases else nullcontext():
            self.lab.advance.acquire()
        try:
            yield
        finally:
            self.lab.advance.release()

    def _decide(self, e: Experiment, a: Attempt, st: Standings, overrides: list[str], rows: list[Experiment],
                parent: str) -> None:
        """Keep, discard (screen, then the paired confirmation while the noise is weak), or why neither."""
        out, best, s = a.out, st.best, self.lab.cfg.search
        if out.status == DISTURBED:
            e.status, e.val_bpb = DISTURBED, out.val_bpb
            e.reason = f"{a.disturbed_note} (search.disturbed_retries={s.disturbed_retries} spent): left undecided"
            return
        if out.status == TAMPERED:
            e.status, e.reason = TAMPERED, out.error_line
            return
        if out.status == PRUNED:  # stopped mid-run, losing clearly: never kept, its device time back to the night
            e.status, e.reason, e.val_bpb = PRUNED, out.note, None
            return
        if not (out.ok and out.val_bpb is not None):
            e.status, e.reason, e.val_bpb = CRASH, out.error_line, out.val_bpb
            return
        e.val_bpb, e.values = out.val_bpb, [out.val_bpb]
        v = decide(out.val_bpb, best.val_bpb, st.margin)
        e.delta, e.margin, e.status = v.delta, v.margin, v.decision
        notes = [f"{a.rerun_note}; re-run"] if a.rerun_note else []
        doubt = implausible(out.val_bpb, best.val_bpb, rows, s, self.lab.base_config.data.bpb_floor) if v.keep else ""
        if doubt:  # score it again in a fresh scorer process, then confirm it whatever the noise floor says
            again = self.worker.runner.rescore(out)
            if not (again.get("status") == OK and abs(again["val_bpb"] - out.val_bpb) <= 1e-6 * out.val_bpb):
                e.status, e.delta = TAMPERED, None
                e.reason = (f"implausible ({doubt}) and a fresh scorer process gave {again.get('val_bpb')} "
                            f"({again.get('status')}: {again.get('reason', '')}) instead of {out.val_bpb}")
                return
            notes.append(f"implausible ({doubt}): re-scored identically in a fresh process; confirming")
        conf, c = self._confirmation(parent), None
        if v.keep and (doubt or weak(st.noise, s.confirm, s.confirm_min_dof)):
            c = conf.run(e, best, e.commit, overrides, rows, st.noise)
            what = f"screen: {v.delta:+.4f} beat the margin {v.margin:.4f}"
        elif not v.keep and near_miss(v, s):
            c = conf.retest(e, best, e.commit, overrides, st.noise)
            what = f"a near miss: screen {v.delta:+.4f}, inside the margin {v.margin:.4f}"
        if c is not None:
            notes.append(f"{what} (noise {st.noise.describe()}); {c.reason}")
            runs = [out.val_bpb, *c.candidate_runs]
            if doubt and c.candidate_runs:  # an implausible screen run stands for nothing: its confirmations do
                runs, e.values = list(c.candidate_runs), []
            c.apply(e, runs)
        e.reason = "; ".join(notes)

    def _rebase(self, e: Experiment, a: Attempt, proposal: Proposal, st: Standings, rows: list[Experiment],
                parent: str) -> None:
        """The best moved while `e` ran: judged against it; if it still beats it, re-staged on it and confirmed."""
        lab, out, best, tree = self.lab, a.out, st.best, self.worker.tree
        v = decide(out.val_bpb, best.val_bpb, st.margin)
        e.val_bpb, e.values, e.delta, e.margin, e.status = out.val_bpb, [out.val_bpb], v.delta, v.margin, v.decision
        moved = f"the best moved to {best.exp} ({best.commit[:7]}) while it ran on {parent[:7]}"
        if not v.keep:
            e.reason = f"{moved}; it does not beat the new best by the margin"  # a near miss too: its pairs would
            return  # be against a best it was not screened against
        with lab.lock:
            overrides = merge_overrides(best.overrides, proposal.overrides)
            tree.keep_ref(f"{e.exp}-screen", e.commit)  # the commit the screen run ran stays inspectable
            try:
                tree.reset(best.commit)
                commit = candidate.stage(lab, tree, e.exp, proposal, best, overrides)
            except InvalidProposal as err:
                e.status, e.values = CONFLICT, []
                e.reason = (f"conflict: {moved}, and beat it by {-v.delta:.4f} (margin {v.margin:.4f}), but the "
                            f"proposal cannot be re-applied on it: {err}")
                return
            e.commit, e.overrides_in_effect = commit, overrides
            lab.ledger.save(e.exp, proposal, overrides, commit=commit)
        log.info("%s: %s; rebased on it as %s and confirming there", e.exp, moved, commit[:7])
        s = lab.cfg.search
        conf = self._confirmation(parent)
        doubt = implausible(out.val_bpb, best.val_bpb, rows, s, lab.base_config.data.bpb_floor)  # paired, always
        if doubt or weak(st.noise, s.confirm, s.confirm_min_dof):
            c = conf.run(e, best, commit, overrides, rows, st.noise)
        else:
            c = conf.rerun(e, best, commit, overrides, st.margin)
        e.values = list(c.candidate_runs)  # the screen run ran the old parent: only the rebased runs stand
        c.apply(e, c.candidate_runs)
        e.reason = (f"{moved}: rebased on it (screen on the old parent {v.delta:+.4f}, margin {v.margin:.4f}); "
                    f"{c.reason}")

    def _asked_retest(self, e: Experiment, p: Proposal, overrides: list[str], parent: str) -> None:
        """An agent's retest of an earlier near miss (src/lab/retest.py), staged on the best as `e`: no screen run,
        the near miss's (best, candidate) pairs, under the advance lock (a keep moves the best)."""
        lab, tree = self.lab, self.worker.tree
        with self._advancing():
            with lab.lock:
                rows = lab.rows()
                st = lab.standings(rows)
                try:
                    if st.best.commit != parent:  # the best moved while this waited: the change goes on it
                        overrides = merge_overrides(st.best.overrides, p.overrides)
                        tree.ensure(lab.session.repo_git, st.best.commit)
                        e.commit = candidate.stage(lab, tree, e.exp, p, st.best, overrides)
                        e.overrides_in_effect = overrides
                        lab.ledger.save(e.exp, p, overrides, commit=e.commit)
                    elif tree.head() != e.commit:  # lent meanwhile: the candidate goes back in its worktree
                        tree.reset(e.commit)
                except InvalidProposal as err:
                    e.status, e.reason = CONFLICT, (f"conflict: the best moved to {st.best.exp} before the retest "
                                                    f"of {p.retest} started, and its change cannot go on it: {err}")
                    self._finish(e, rows, None)
                    return
            e.sigma, e.dof = st.noise.sigma, st.noise.dof
            c = self._confirmation(st.best.commit).retest(e, st.best, e.commit, overrides, st.noise)
            e.values = list(c.candidate_runs)  # no screen run: the pairs' candidate runs are its runs
            c.apply(e, c.candidate_runs)
            e.reason = f"a retest of {p.retest} asked by the agent, against {st.best.exp}: {c.reason}"
            with lab.lock:
                self._finish(e, rows, None)

    def _confirmation(self, parent: str) -> Confirmation:
        """Confirmation runs of this worker's experiment: rows of their own, marked with the worker that ran each."""
        def record(row: Experiment, rows: list[Experiment], out: Optional[Outcome], worker: "Worker") -> Experiment:
            return self.record(worker.mark(row, parent, row.proposed), rows, out)
        return Confirmation(self.lab, self.attempts, record, self._second)

    @contextmanager
    def _second(self, commit: str):
        """Attempts on a second worker, borrowed from the pool for a confirmation's pairs (None: there is none)."""
        if self.leases is None:
            yield None
            return
        with self.leases.borrow(self.worker) as other:
            if other is None:
                yield None
                return
            with self.lab.lock:
                other.tree.ensure(self.lab.session.repo_git, commit)
            yield Attempts(self.lab, other, owner=self.worker)

    def _finish(self, e: Experiment, rows: list[Experiment], out: Optional[Outcome], prune: bool = True) -> None:
        """Under the lock: the branch tip follows the best (a keep: one fast-forward commit), then the row."""
        lab, sess = self.lab, self.lab.session
        tip = e.commit if e.status == KEEP else lab.standings().best.commit
        if sess.head() != tip:
            sess.reset(tip)
        self.record(e, rows, out)
        if prune:
            prune_checkpoints(sess.runs_dir, e.exp, e.status, lab.cfg.search.keep_checkpoints)

    # ------------------------------------------------------------------ recording
    def record(self, e: Experiment, rows: list[Experiment], out: Optional[Outcome] = None) -> Experiment:
        """Ledger row (the commit point), then MLflow tags, then the branch and state follow.

        rows: the ledger before this row's experiment (what its margin and noise were measured on).
        A confirmation run's row leaves the experiment in flight; any other row ends it.
        """
        with self.lab.lock:
            return self._record(e, rows, out)

    def _record(self, e: Experiment, rows: list[Experiment], out: Optional[Outcome]) -> Experiment:
        lab, sess = self.lab, self.lab.session
        e.finished = now()
        if e.status != INVALID and e.margin is None and e.kind != CONFIRM:
            e.margin = lab.standings(rows).margin
        ledger = lab.rows()
        after = lab.standings(ledger + [e]).best
        e.best_val_bpb = _finite(after.val_bpb)
        if e.values is not None:
            lab.ledger.save(e.exp, e.proposal, e.overrides_in_effect, commit=e.commit, values=e.values)
        run_id, created = lab.runs.row_run(e, out)
        e.mlflow_run_id = run_id or ""
        lab.ledger.append(e)
        try:
            lab.runs.tag_row(e, len(ledger) + 1, run_id, after, out, created)
        except Exception as err:
            log.warning("MLflow: could not tag the run of %s: %s", e.exp, err)
        if e.kind != CONFIRM:
            sess.untrack(self.worker.index)
        log_row(e)
        return e


def near_miss(v: Verdict, s) -> bool:
    """A screen discard that beat the best by more than search.retest_within x the margin: it earns a retest."""
    return bool(s.retest) and not v.keep and v.delta < -s.retest_within * v.margin


def settle_baseline(e: Experiment, a: Attempt) -> None:
    """A baseline run's row: `baseline` with its score, `disturbed`, or `crash`."""
    out = a.out
    if out.status == DISTURBED:
        e.status, e.val_bpb, e.reason = DISTURBED, out.val_bpb, a.disturbed_note
    elif out.ok and out.val_bpb is not None:
        e.status, e.val_bpb, e.values = BASELINE, out.val_bpb, [out.val_bpb]
        e.reason = f"{a.rerun_note}; re-run" if a.rerun_note else ""
    else:
        e.status, e.reason = CRASH, out.error_line


def prune_checkpoints(runs_dir: Path, exp: str, status: str, policy: str) -> None:
    """Delete the checkpoints of an experiment's runs once decided (search.keep_checkpoints: all | best | none).
    `best` keeps those of kept experiments and baselines: a 50M-parameter model is 200 MB a run."""
    if policy == "all" or (policy == "best" and status in (KEEP, BASELINE)):
        return
    for run in [runs_dir / exp, *runs_dir.glob(f"{exp}-*")]:
        (run / CHECKPOINT).unlink(missing_ok=True)
        (run / FROZEN).unlink(missing_ok=True)


def log_row(e: Experiment) -> None:
    """One console/search.log line per ledger row."""
    val = f"{e.val_bpb:.6f}" if e.val_bpb is not None else "-"
    extra = ""
    if e.delta is not None:
        extra = f" (delta {e.delta:+.4f}, margin {e.margin:.4f})"
    elif e.status in (INVALID, CRASH, INTERRUPTED, DISTURBED, TAMPERED):
        extra = f" ({e.reason[:200]})"
    log.info("%-10s %-11s val_bpb %s%s  %s", e.exp, e.status, val, extra, e.description[:120])


def _finite(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None
