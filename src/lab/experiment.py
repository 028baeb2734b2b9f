"""One experiment, start to record: stage the candidate, run it, decide (and confirm), record.

A baseline run is an experiment without a proposal. The run is re-run while it is `stalled` or
disturbed (src/lab/attempts.py); a disturbed one that stays so is recorded `disturbed`, neither
kept nor discarded. A run that beats the best by the screen margin is kept at once when the noise
floor is strong, else (search.confirm, by default while sigma has few dof) only if the paired
confirmation agrees (src/lab/confirm.py). The ledger row is the commit point: it is appended
first, then the MLflow tags, then the branch and the session state follow.

Usage: row = Experiments(lab).execute("exp-004", proposal, rows, attempt=0)
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import time
from pathlib import Path
from typing import Optional

from src.lab import candidate
from src.lab.attempts import Attempt, Attempts
from src.lab.confirm import Confirmation
from src.lab.context import Lab
from src.lab.decision import decide, weak
from src.lab.integrity import implausible
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal, merge_overrides
from src.lab.runner import Outcome, RunInterrupted
from src.harness.score import CHECKPOINT
from src.lab.session import InFlight
from src.lab.standings import Standings
from src.lab.decisions import BASELINE, CONFIRM, CRASH, DISTURBED, INTERRUPTED, INVALID, KEEP, OK, PENDING, TAMPERED

log = logging.getLogger(__name__)


def new_row(exp: str, proposal: Optional[Proposal], base_overrides: list[str], overrides: list[str]) -> Experiment:
    if proposal is None:
        return Experiment(exp=exp, status="", description="baseline", kind="baseline",
                          hypothesis="the starting point; repeats measure the noise floor",
                          overrides=" ".join(base_overrides))
    return Experiment(exp=exp, status=PENDING, description=proposal.description, hypothesis=proposal.hypothesis,
                      kind=proposal.kind, overrides=" ".join(proposal.overrides), proposal=proposal,
                      overrides_in_effect=overrides)


class Experiments:
    def __init__(self, lab: Lab):
        self.lab = lab
        self.attempts = Attempts(lab)

    def execute(self, exp: str, proposal: Optional[Proposal], rows: list[Experiment], attempt: int) -> Experiment:
        """Check, commit, run, decide and record one experiment (a baseline run when proposal is None)."""
        lab, sess = self.lab, self.lab.session
        st = lab.standings(rows)
        best = st.best
        overrides = merge_overrides(best.overrides, proposal.overrides) if proposal else []
        lab.ledger.save(exp, proposal, overrides)
        sess.track(InFlight(exp=exp, attempt=attempt, commit="", run_dir="", started=time.time()))
        e = new_row(exp, proposal, lab.base_overrides, overrides)
        e.commit, e.sigma, e.dof = best.commit, st.noise.sigma, st.noise.dof
        try:
            try:
                e.commit = sess.state.base_commit if proposal is None else \
                    candidate.stage(lab, exp, proposal, best, overrides)
            except InvalidProposal as err:
                sess.reset(best.commit)
                e.status, e.run_status, e.reason, e.sigma, e.dof = INVALID, "-", str(err), None, None
                return self.record(e, rows)
            lab.ledger.save(exp, proposal, overrides, commit=e.commit)
            a = self.attempts.run(exp, e.commit, overrides, attempt, rows, in_flight=True)
            a.fill(e)
            if proposal is None:
                self._baseline(e, a)
            else:
                self._decide(e, a, st, overrides, rows)
        except RunInterrupted as ri:  # Ctrl-C / SIGTERM: the run was stopped; record it, then stop the session
            out = ri.outcome
            e.status, e.run_status, e.reason = INTERRUPTED, INTERRUPTED, out.error_line
            e.attempts = max(e.attempts, attempt + 1)
            sess.reset(best.commit)
            self.record(e, rows, out)
            raise KeyboardInterrupt from None
        sess.reset(e.commit if e.status == KEEP else best.commit)  # the branch tip: the best
        self.record(e, rows, a.out)
        prune_checkpoints(sess.runs_dir, e.exp, e.status, lab.cfg.search.keep_checkpoints)
        return e

    def _baseline(self, e: Experiment, a: Attempt) -> None:
        out = a.out
        if out.status == DISTURBED:
            e.status, e.val_bpb, e.reason = DISTURBED, out.val_bpb, a.disturbed_note
        elif out.ok and out.val_bpb is not None:
            e.status, e.val_bpb, e.values = BASELINE, out.val_bpb, [out.val_bpb]
            e.reason = f"{a.rerun_note}; re-run" if a.rerun_note else ""
        else:
            e.status, e.reason = CRASH, out.error_line

    def _decide(self, e: Experiment, a: Attempt, st: Standings, overrides: list[str], rows: list[Experiment]) -> None:
        """Keep, discard (screen, then the paired confirmation while the noise is weak), or why neither."""
        out, best, s = a.out, st.best, self.lab.cfg.search
        if out.status == DISTURBED:
            e.status, e.val_bpb = DISTURBED, out.val_bpb
            e.reason = f"{a.disturbed_note} (search.disturbed_retries={s.disturbed_retries} spent): left undecided"
            return
        if out.status == TAMPERED:
            e.status, e.reason = TAMPERED, out.error_line
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
            again = self.lab.runner.rescore(out)
            if not (again.get("status") == OK and abs(again["val_bpb"] - out.val_bpb) <= 1e-6 * out.val_bpb):
                e.status, e.delta = TAMPERED, None
                e.reason = (f"implausible ({doubt}) and a fresh scorer process gave {again.get('val_bpb')} "
                            f"({again.get('status')}: {again.get('reason', '')}) instead of {out.val_bpb}")
                return
            notes.append(f"implausible ({doubt}): re-scored identically in a fresh process; confirming")
        if v.keep and (doubt or weak(st.noise, s.confirm, s.confirm_min_dof)):
            c = Confirmation(self.lab, self.attempts, self.record).run(e, best, e.commit, overrides, rows, st.noise)
            notes.append(f"screen: {v.delta:+.4f} beat the margin {v.margin:.4f} (noise {st.noise.describe()}); "
                         f"{c.reason}")
            e.status = c.decision
            if c.verdict is not None:
                e.delta, e.margin = c.verdict.delta, c.verdict.margin
            runs = [out.val_bpb, *c.candidate_runs]
            if doubt and c.candidate_runs:  # an implausible screen run stands for nothing: its confirmations do
                runs, e.values = list(c.candidate_runs), []
            e.val_bpb = sum(runs) / len(runs)  # the candidate's score; each run stays on its own row
            if c.decision == DISTURBED:
                e.delta = None
        e.reason = "; ".join(notes)

    # ------------------------------------------------------------------ recording
    def record(self, e: Experiment, rows: list[Experiment], out: Optional[Outcome] = None) -> Experiment:
        """Ledger row (the commit point), then MLflow tags, then the branch and state follow.

        rows: the ledger before this row's experiment (what its margin and noise were measured on).
        A confirmation run's row leaves the experiment in flight; any other row ends it.
        """
        lab, sess = self.lab, self.lab.session
        e.finished = dt.datetime.now().isoformat(timespec="seconds")
        if e.status != INVALID and e.margin is None and e.kind != CONFIRM:
            e.margin = lab.standings(rows).margin
        now = lab.rows()
        after = lab.standings(now + [e]).best
        e.best_val_bpb = _finite(after.val_bpb)
        if e.values is not None:
            lab.ledger.save(e.exp, e.proposal, e.overrides_in_effect, commit=e.commit, values=e.values)
        run_id, created = lab.runs.row_run(e, out)
        e.mlflow_run_id = run_id or ""
        lab.ledger.append(e)
        try:
            lab.runs.tag_row(e, len(now) + 1, run_id, after, out, created)
        except Exception as err:
            log.warning("MLflow: could not tag the run of %s: %s", e.exp, err)
        if e.kind != CONFIRM:
            sess.untrack()
        log_row(e)
        return e


def prune_checkpoints(runs_dir: Path, exp: str, status: str, policy: str) -> None:
    """Delete the checkpoints of an experiment's runs once decided (search.keep_checkpoints: all | best | none).
    `best` keeps those of kept experiments and baselines: a 50M-parameter model is 200 MB a run."""
    if policy == "all" or (policy == "best" and status in (KEEP, BASELINE)):
        return
    for run in [runs_dir / exp, *runs_dir.glob(f"{exp}-*")]:
        (run / CHECKPOINT).unlink(missing_ok=True)


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
