"""Running one configuration until a run stands: the re-runs of `stalled` and of disturbed runs.

A configuration is a commit run with (or without) the session's committed preset. Its run is
re-run when train marks it `stalled` or it is starved past its wall ceiling (`timeout`; both
search.stall_retries) and when its throughput shows that the machine was busy
(src/lab/disturbance.py; search.disturbed_retries); when every attempt was stalled, starved or
disturbed the outcome's status becomes `disturbed` and nothing may be decided on it: a slow
machine is never the code's fault (never `crash`, never `tampered`). Each
attempt has its own run directory and MLflow run (exp-004, exp-004-a2, ...); the ones that do
not stand are tagged with why.

Usage: a = Attempts(lab, worker).run("exp-004", commit, overrides, done=0, rows=rows, flight=in_flight)
       a.out (the Outcome that stands), a.attempts, a.disturbed (notes), a.fill(row)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

from src.lab import candidate
from src.lab.context import Lab
from src.lab.disturbance import Judgement, Throughput, judge
from src.lab.ledger import Experiment
from src.lab.proposal import merge_overrides
from src.lab.runner import Outcome, attempt_name
from src.lab.session import InFlight
from src.lab.decisions import BASELINE, DISTURBED, OK, STALLED, TIMEOUT

if TYPE_CHECKING:
    from src.lab.workers import Worker

log = logging.getLogger(__name__)


def quote(v: str) -> str:
    """A Hydra override value quoted so that any string (a URI, a run name) passes through intact."""
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Attempt:
    """The run that stands for a ledger row, and what it took to get it."""
    out: Outcome
    attempts: int  # attempts made for the row so far (a resume continues the count)
    shape: str = ""
    throughput: Optional[Throughput] = None
    disturbed: list[str] = field(default_factory=list)  # one note per attempt found disturbed
    stalled: list[str] = field(default_factory=list)  # one note per attempt marked stalled and re-run

    def fill(self, e: Experiment) -> None:
        """The run's figures on its ledger row."""
        s, tp = self.out.summary, self.throughput
        e.memory_gb = s["peak_vram_mb"] / 1024 if isinstance(s.get("peak_vram_mb"), (int, float)) else None
        e.training_seconds = s.get("training_seconds")
        e.stall_seconds = s.get("stalled_seconds")
        e.num_steps = s.get("num_steps")
        e.wall_seconds = self.out.wall_seconds or s.get("total_seconds")
        e.attempts, e.run_status, e.shape, e.disturbed_runs = self.attempts, self.out.status, self.shape, len(self.disturbed)
        if tp is not None:
            e.tokens_per_sec, e.step_time_p50, e.mfu_percent = tp.tokens_per_sec, tp.step_time_p50 or None, tp.mfu or None

    @property
    def disturbed_note(self) -> str:
        return "; ".join(self.disturbed)

    @property
    def rerun_note(self) -> str:
        """Why earlier attempts were re-run (stalled, disturbed): the row's reason says so."""
        return "; ".join([*self.stalled, *self.disturbed])


class Attempts:
    """The runs of one worker (its worktree, its runner); owner: the worker whose experiment borrowed it (a
    confirmation run beside the owner's), under whose entry of state.json its runs' processes are recorded."""

    def __init__(self, lab: Lab, worker: "Worker", owner: Optional["Worker"] = None):
        self.lab, self.worker, self.owner = lab, worker, owner

    def timeout_s(self) -> float:
        """The hard timeout of one run: explicit, from the time budget, or (tokens mode) from the baseline's wall."""
        s, b = self.lab.cfg.search, self.lab.base_config.budget
        if s.timeout_s:
            return s.timeout_s
        if b.mode == "time":
            return b.seconds * s.timeout_factor + s.timeout_grace_s
        walls = [e.wall_seconds for e in self.lab.rows() if e.status == BASELINE and e.wall_seconds]
        return max(walls) * s.timeout_factor + s.timeout_grace_s if walls else 3600.0

    def run(self, name: str, commit: str, overrides: list[str], done: int, rows: list[Experiment],
            flight: Optional[InFlight] = None, attach: bool = False, prune=None) -> Attempt:
        """Run `commit` (+ the preset of `overrides`) until a run stands; RunInterrupted on Ctrl-C.

        name: the row's id (runs are name, name-a2, ...); done: attempts an earlier invocation made;
        rows: the ledger the throughput is judged against; flight: the experiment in flight, each attempt of which
        is persisted in state.json (None: a confirmation run, which leaves the experiment's entry as it is);
        attach: attempt `done` is still running as a job (launcher=submitit_*): wait on it, do not start another;
        prune: makes the pruner of each attempt (src/lab/prune.py; None: never pruned), a screen run's only.
        """
        lab, s, tree = self.lab, self.lab.cfg.search, self.worker.tree
        if tree.head() != commit:  # a confirmation alternates the best and the candidate in the worktree
            tree.reset(commit)
        args = candidate.with_preset(lab, lab.base_overrides, bool(overrides))
        attempt, notes, stalled = (done - 1 if attach else done), [], []
        while True:
            attempt += 1
            run_name = attempt_name(name, attempt)
            out = self._launch(run_name, attempt, commit, args, flight, prune() if prune else None)
            if out.status in (STALLED, TIMEOUT) and not out.hung:  # the machine's doing: re-run, then undecided
                what = "stalled" if out.status == STALLED else "starved past its wall ceiling"
                stalled.append(f"{run_name} {what}: {out.error_line}")
                if len(stalled) <= s.stall_retries:
                    log.warning("%s %s (%s); re-running (%d of %d)", run_name, what, out.error_line, len(stalled),
                                s.stall_retries)
                    with lab.lock:
                        lab.runs.mark_attempt(run_name, out, f"{what}, re-run")
                    continue
                log.warning("%s %s again (search.stall_retries=%d spent): nothing is decided on it", run_name, what,
                            s.stall_retries)
                notes.append(stalled.pop())
                out.status, out.note = DISTURBED, notes[-1]
                return Attempt(out, attempt, disturbed=notes, stalled=stalled)
            a = Attempt(out, attempt, disturbed=notes, stalled=stalled)
            if out.status != OK:
                return a
            a.throughput = Throughput.of(out.summary)
            a.shape = lab.shape(commit, overrides, out.summary)
            j = self.judge(a, rows)
            if not j.disturbed:
                return a
            notes.append(f"{run_name} disturbed: {j.note}")
            if len(notes) <= s.disturbed_retries:
                log.warning("%s is disturbed (%s); re-running (%d of %d)", run_name, j.note, len(notes),
                            s.disturbed_retries)
                with lab.lock:
                    lab.runs.mark_attempt(run_name, out, f"disturbed, re-run: {j.note}")
                continue
            log.warning("%s is disturbed (%s) and out of re-runs (search.disturbed_retries=%d): nothing is decided "
                        "on it", run_name, j.note, s.disturbed_retries)
            out.status, out.note = DISTURBED, j.note
            return a

    def judge(self, a: Attempt, rows: list[Experiment]) -> Judgement:
        """Was the machine busy during this run? Only time budgets are judged (src/lab/disturbance.py)."""
        s = self.lab.cfg.search
        if self.lab.base_config.budget.mode != "time":
            return Judgement(False, 0.0, "token budget: a slow run trains on the same tokens; not judged")
        return judge(a.throughput, a.shape, rows, s.disturbed_factor, s.disturbed_factor_new_shape)

    def _launch(self, run_name: str, attempt: int, commit: str, args: list[str],
                flight: Optional[InFlight], pruner=None) -> Outcome:
        sess, w = self.lab.session, self.worker
        run_dir = sess.runs_dir / run_name
        if flight is not None:
            sess.track(replace(flight, attempt=attempt, commit=commit, run_dir=str(run_dir), started=time.time(),
                               pid=None, job="", job_folder=""))
        ovs = merge_overrides(args, self._tracking_overrides(run_name))  # ours replace the same keys of the command line

        def started(pid: int, job: str = "", job_folder: str = "") -> None:
            if self.owner is not None:  # a borrowed worker's run: the owner's experiment is what a resume finishes
                sess.track_other(self.owner.index, pid)
            else:
                sess.track_pid(w.index, pid, job, job_folder)  # a confirmation run too: the experiment stays in flight

        log.info("%s: running (attempt %d, commit %s, timeout %.0f s) -> %s", run_name, attempt, commit[:7],
                 self.timeout_s(), run_dir)
        return w.run(ovs, run_dir, self.timeout_s(), on_start=started, on_curve=pruner)

    def _tracking_overrides(self, run_name: str) -> list[str]:
        """Where the run logs itself: the session's store and experiment, nested under its parent run."""
        runs = self.lab.runs
        own = [f"tracking.uri={quote(runs.uri)}", f"tracking.experiment={quote(runs.experiment_name)}",
               f"tracking.run_name={quote(run_name)}", "progress=false"]
        if runs.parent_id:
            own.append(f"tracking.parent_run_id={quote(runs.parent_id)}")
        return own
