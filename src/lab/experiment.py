"""One experiment, start to record: stage the candidate, run its attempts, decide (and confirm), record.

A baseline run is an experiment without a proposal. A `stalled` run is re-run up to
search.stall_retries times; with search.confirm a would-be keep is run once more and kept only if
the mean of both runs still beats the best by the margin. The ledger row is the commit point:
it is appended first, then the MLflow tags, then the branch and the session state follow.

Usage: row = Experiments(lab).execute("exp-004", proposal, rows, attempt=0)
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import replace
from typing import Optional

from src.lab import candidate
from src.lab.context import Lab
from src.lab.decision import decide
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal, merge_overrides
from src.lab.runner import Outcome, RunInterrupted, attempt_name
from src.lab.session import InFlight
from src.lab.standings import Best
from src.status import INTERRUPTED, STALLED

log = logging.getLogger(__name__)


def quote(v: str) -> str:
    """A Hydra override value quoted so that any string (a URI, a run name) passes through intact."""
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def new_row(exp: str, proposal: Optional[Proposal], base_overrides: list[str], overrides: list[str]) -> Experiment:
    if proposal is None:
        return Experiment(exp=exp, status="", description="baseline", kind="baseline",
                          hypothesis="the starting point; repeats measure the noise floor",
                          overrides=" ".join(base_overrides))
    return Experiment(exp=exp, status="", description=proposal.description, hypothesis=proposal.hypothesis,
                      kind=proposal.kind, overrides=" ".join(proposal.overrides), proposal=proposal,
                      overrides_in_effect=overrides)


def fill_from_run(e: Experiment, out: Outcome) -> None:
    """The run's figures on its ledger row."""
    s = out.summary
    e.memory_gb = s["peak_vram_mb"] / 1024 if isinstance(s.get("peak_vram_mb"), (int, float)) else None
    e.training_seconds = s.get("training_seconds")
    e.stall_seconds = s.get("stalled_seconds")
    e.num_steps = s.get("num_steps")
    e.wall_seconds = out.wall_seconds or s.get("total_seconds")


class Experiments:
    def __init__(self, lab: Lab):
        self.lab = lab

    def execute(self, exp: str, proposal: Optional[Proposal], rows: list[Experiment], attempt: int) -> Experiment:
        """Check, commit, run, decide and record one experiment (a baseline run when proposal is None)."""
        lab, sess = self.lab, self.lab.session
        standings = lab.standings(rows)
        best = standings.best
        overrides = merge_overrides(best.overrides, proposal.overrides) if proposal else []
        lab.ledger.save(exp, proposal, overrides)
        sess.state.in_flight = InFlight(exp=exp, attempt=attempt, commit="", run_dir="", started=time.time())
        sess.save()
        e = new_row(exp, proposal, lab.base_overrides, overrides)
        try:
            if proposal is None:
                commit = sess.state.base_commit
            else:
                try:
                    commit = candidate.stage(lab, exp, proposal, best, overrides)
                except InvalidProposal as err:
                    sess.reset(best.commit)
                    e.status, e.run_status, e.reason, e.commit = "invalid", "-", str(err), best.commit
                    e.best_val_bpb = _finite(best.val_bpb)
                    return self.record(e, rows, None, best)
            e.commit = commit
            lab.ledger.save(exp, proposal, overrides, commit=commit)
            out, e.attempts = self.run_attempts(exp, commit, attempt, has_preset=bool(overrides))
        except RunInterrupted as ri:  # Ctrl-C / SIGTERM: the run was stopped; record it, then stop the session
            out = ri.outcome
            e.status, e.run_status, e.reason, e.attempts = INTERRUPTED, INTERRUPTED, out.error_line, attempt + 1
            e.commit = e.commit or best.commit
            e.best_val_bpb = _finite(best.val_bpb)
            fill_from_run(e, out)
            sess.reset(best.commit)
            self.record(e, rows, out, best)
            raise KeyboardInterrupt from None
        fill_from_run(e, out)
        e.run_status = out.status
        if proposal is None:
            return self._baseline(e, rows, out, best)
        values = self._decide(e, out, best, standings.margin, commit, bool(overrides))
        if e.status != "keep":
            sess.reset(best.commit)
        e.best_val_bpb = e.val_bpb if e.status == "keep" else best.val_bpb
        return self.record(e, rows, out, best, values)

    def _baseline(self, e: Experiment, rows: list[Experiment], out: Outcome, best: Best) -> Experiment:
        values = []
        if out.ok and out.val_bpb is not None:
            e.status, e.val_bpb = "baseline", out.val_bpb
            values = [out.val_bpb]
            e.values = values
            e.best_val_bpb = self.lab.standings(self.lab.rows() + [e]).best.val_bpb
        else:
            e.status, e.reason = "crash", out.error_line
        return self.record(e, rows, out, best, values)

    def _decide(self, e: Experiment, out: Outcome, best: Best, margin: float, commit: str,
                has_preset: bool) -> list[float]:
        """Keep or discard (confirmed by a second run with search.confirm); the val_bpb values behind it."""
        if not (out.ok and out.val_bpb is not None):
            e.status, e.reason, e.val_bpb = "crash", out.error_line, out.val_bpb
            return []
        values = [out.val_bpb]
        verdict = decide(out.val_bpb, best.val_bpb, margin)
        if verdict.keep and self.lab.cfg.search.confirm:
            second, _ = self.run_attempts(e.exp, commit, 0, has_preset=has_preset, confirm=True)
            self.lab.runs.mark_attempt(f"{e.exp}-confirm", second, f"confirmation re-run of {e.exp}")
            if second.ok and second.val_bpb is not None:
                values.append(second.val_bpb)
                verdict = decide(sum(values) / len(values), best.val_bpb, margin)
                e.reason = f"confirmation re-run: {values[0]:.6f}, {values[1]:.6f} (mean {sum(values) / 2:.6f})"
            else:
                verdict = replace(verdict, decision="discard")
                e.reason = f"confirmation re-run failed ({second.status}: {second.error_line})"
        e.val_bpb = sum(values) / len(values)
        e.delta, e.margin, e.status = verdict.delta, verdict.margin, verdict.decision
        return values

    # ------------------------------------------------------------------ running
    def timeout_s(self) -> float:
        """The hard timeout of one run: explicit, from the time budget, or (tokens mode) from the baseline's wall."""
        s, b = self.lab.cfg.search, self.lab.base_config.budget
        if s.timeout_s:
            return s.timeout_s
        if b.mode == "time":
            return b.seconds * s.timeout_factor + s.timeout_grace_s
        walls = [e.wall_seconds for e in self.lab.rows() if e.status == "baseline" and e.wall_seconds]
        return max(walls) * s.timeout_factor + s.timeout_grace_s if walls else 3600.0

    def run_attempts(self, exp: str, commit: str, done: int, has_preset: bool,
                     confirm: bool = False) -> tuple[Outcome, int]:
        """Run the committed candidate; a `stalled` run is re-run up to search.stall_retries times."""
        lab, sess = self.lab, self.lab.session
        base = candidate.with_preset(lab, lab.base_overrides, has_preset)
        attempt, retries = done, 0
        while True:
            attempt += 1
            name = attempt_name(f"{exp}-confirm" if confirm else exp, attempt)
            run_dir = sess.runs_dir / name
            if not confirm:
                sess.state.in_flight = InFlight(exp=exp, attempt=attempt, commit=commit, run_dir=str(run_dir),
                                                started=time.time())
                sess.save()
            ovs = merge_overrides(base, self._tracking_overrides(name))  # ours replace the same keys of the command line

            def started(pid: int) -> None:
                if sess.state.in_flight is not None:
                    sess.state.in_flight.pid = pid
                    sess.save()

            log.info("%s: running (attempt %d, commit %s, timeout %.0f s) -> %s", name, attempt, commit[:7],
                     self.timeout_s(), run_dir)
            out = lab.runner.run(ovs, run_dir, self.timeout_s(), on_start=started)
            if out.status == STALLED and retries < lab.cfg.search.stall_retries:
                retries += 1
                log.warning("%s stalled (%s); re-running (%d of %d)", name, out.error_line, retries,
                            lab.cfg.search.stall_retries)
                lab.runs.mark_attempt(name, out, "stalled, re-run")
                continue
            return out, attempt

    def _tracking_overrides(self, run_name: str) -> list[str]:
        """Where the run logs itself: the session's store and experiment, nested under its parent run."""
        runs = self.lab.runs
        own = [f"tracking.uri={quote(runs.uri)}", f"tracking.experiment={quote(runs.experiment_name)}",
               f"tracking.run_name={quote(run_name)}", "progress=false"]
        if runs.parent_id:
            own.append(f"tracking.parent_run_id={quote(runs.parent_id)}")
        return own

    # ------------------------------------------------------------------ recording
    def record(self, e: Experiment, rows: list[Experiment], out: Optional[Outcome], best: Best,
               values: Optional[list[float]] = None) -> Experiment:
        """Ledger row (the commit point), then MLflow tags, then the branch and state follow."""
        lab, sess = self.lab, self.lab.session
        e.finished = dt.datetime.now().isoformat(timespec="seconds")
        if e.status != "invalid" and e.margin is None:
            e.margin = lab.standings(rows).margin
        if values:
            lab.ledger.save(e.exp, e.proposal, e.overrides_in_effect, commit=e.commit, values=values)
        run_id, created = lab.runs.row_run(e, out)
        e.mlflow_run_id = run_id or ""
        lab.ledger.append(e)
        try:
            lab.runs.tag_row(e, len(rows) + 1, run_id, lab.standings().best, out, created)
        except Exception as err:
            log.warning("MLflow: could not tag the run of %s: %s", e.exp, err)
        sess.state.in_flight = None
        sess.save()
        log_row(e)
        return e


def log_row(e: Experiment) -> None:
    """One console/search.log line per ledger row."""
    val = f"{e.val_bpb:.6f}" if e.val_bpb is not None else "-"
    extra = ""
    if e.delta is not None:
        extra = f" (delta {e.delta:+.4f}, margin {e.margin:.4f})"
    elif e.status in ("invalid", "crash", INTERRUPTED):
        extra = f" ({e.reason[:200]})"
    log.info("%-8s %-11s val_bpb %s%s  %s", e.exp, e.status, val, extra, e.description[:120])


def _finite(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None
