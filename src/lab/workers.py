"""The pool: N workers (search.workers=N), one session, one ledger, one best; search.workers=1 is a pool of one.

The one research loop: it fills every free worker with an experiment (resumed ones first, then the
agent's next proposal) until the session stops, and each worker runs the one pipeline
(src/lab/experiment.py) on it. A worker has its own device slot (src/lab/slots.py), the same for every
experiment of the session, its own runner and a worktree: a pool of one (the local launcher) works in
the session's own worktree, on branch research/<tag>, with the whole machine; a larger pool (or a
submitit launcher, whose jobs can outlive the search) gives each worker a detached worktree
(<session>/workers/w<i>, branched from the best when its experiment is staged). The agent is asked
and told from the main thread only, and sees what is in flight (SearchState.in_flight: replay goes on
in file order, TPE/random hold asked-but-not-told trials, Optuna's running trials, with the constant
liar; Claude reads the in-flight list in its state).

The ledger's row order is the finish order; exp ids (and the `proposed` column) are the proposal
order; `worker` and `parent` say where and on what each ran (search.workers > 1). state.json's
`running` lists every experiment in flight, so a resume (kill -9 included) finishes each once
(src/lab/resume.py).

Usage: Pool(lab, agent, make_runner).run(jobs, bar)     (src/lab/loop.py; pool.stop_reason says why it stopped)
"""
from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from src.lab.agents import Agent, AgentStop
from src.lab.context import Lab
from src.lab.experiment import Experiments, Job, new_row, now
from src.lab.leases import Leases
from src.lab.ledger import Experiment, next_experiment
from src.lab.runner import Outcome, Runner
from src.lab.session import Worktree, atomic_write
from src.lab.slots import own_worktrees, plan_slots
from src.lab.decisions import INVALID

log = logging.getLogger(__name__)


@dataclass
class Usage:
    """Where a worker's time went (seconds): its runs (training, the rest of the run, scoring) and the rest."""
    run: float = 0.0  # inside the runner: train runs start to exit, and their scoring
    train: float = 0.0  # counted training seconds
    score: float = 0.0  # the scorer process, after the run (part of `run`)
    experiments: int = 0


class Worker:
    """One slot of the pool: where its experiments run (a worktree), how (a runner), where its time went.

    index None: the session's own worktree and runner (the baseline phase, and a pool of one), whose rows
    name no worker."""

    def __init__(self, index: Optional[int], tree: Worktree, runner: Runner, label: str):
        self.index, self.tree, self.runner, self.label = index, tree, runner, label
        self.usage = Usage()

    def run(self, overrides: list[str], run_dir, timeout_s: float, on_start=None, score: bool = True,
            on_curve=None) -> Outcome:
        """The runner's run, timed (utilisation: time in runs, counted training, scoring)."""
        t0 = time.monotonic()
        out = self.runner.run(overrides, run_dir, timeout_s, on_start=on_start, score=score, on_curve=on_curve)
        self.usage.run += time.monotonic() - t0
        for attr, key in (("train", "training_seconds"), ("score", "score_seconds")):
            v = out.summary.get(key)
            if isinstance(v, (int, float)) and v == v:
                setattr(self.usage, attr, getattr(self.usage, attr) + float(v))
        return out

    def mark(self, e: Experiment, parent: str, proposed: str) -> Experiment:
        """Where a row ran (the ledger's worker / parent / proposed): a pool worker's rows only."""
        if self.index is not None and e.worker is None:
            e.worker, e.parent, e.proposed = self.index, parent, proposed
        return e


def home(lab: Lab, runner: Runner) -> Worker:
    """The session's own worker: its worktree (branch research/<tag>) and the session's runner."""
    return Worker(None, lab.session, runner, "the session's worktree")


class Pool:
    def __init__(self, lab: Lab, agent: Agent, own: Worker, make_runner: Callable[..., Runner]):
        """own: the session's worker (a pool of one); make_runner(cwd, env, cpus): a worker's runner."""
        self.lab, self.agent = lab, agent
        self.detached = own_worktrees(lab.cfg)
        self.workers = [own]
        if self.detached:
            trees = {s.index: lab.session.worker_tree(s.index) for s in plan_slots(lab.cfg)}
            self.workers = [Worker(s.index, trees[s.index], make_runner(trees[s.index].worktree, s.env, s.cpus), s.label)
                            for s in plan_slots(lab.cfg)]
        self.leases = Leases(self.workers)  # who may use which worker: new experiments, borrowed confirmation runs
        self.pipelines = {id(w): Experiments(lab, w, self.leases) for w in self.workers}
        self.running: dict[cf.Future, tuple[Worker, Job]] = {}  # what is in flight, and where
        self.stopped = False  # no more experiments start (those in flight finish)
        self.stop_reason = ""
        self.invalid_streak = 0
        self.t0 = time.time()

    def run(self, jobs: list[Job], bar) -> None:
        """Fill every free worker with an experiment (`jobs`, resumed ones, first) until the session stops."""
        if self.detached:
            log.info("%d workers: %s", len(self.workers), ", ".join(f"w{w.index} {w.label}" for w in self.workers))
        queue = list(jobs)
        ex = cf.ThreadPoolExecutor(max_workers=len(self.workers), thread_name_prefix="worker")
        try:
            while True:
                while not self.stopped:
                    # a job to re-attach to runs in the worktree of the worker that started it
                    w = self.leases.take(queue[0].worker if queue and queue[0].job else None)
                    if w is None:  # none free, or a confirmation waits to borrow one: it goes first
                        break
                    job = queue.pop(0) if queue else self._next()
                    if job is None:
                        self.leases.release(w)
                        break
                    self.running[ex.submit(self.pipelines[id(w)].execute, job)] = (w, job)
                if not self.running:
                    return
                done, _ = cf.wait(list(self.running), timeout=1.0, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    w, _ = self.running.pop(f)
                    self.leases.release(w)
                    self._observe(f.result(), bar)
        except BaseException:  # Ctrl-C, SIGTERM, a worker's error: stop every run, let each record itself
            self.stopped = True
            self.leases.close()
            for w in self.workers:
                w.runner.interrupt()
            for f in list(self.running):
                try:
                    f.result()
                except BaseException as err:  # noqa: BLE001 - the first error is the one raised
                    log.debug("worker stopped: %s", err)
            raise
        finally:
            ex.shutdown(wait=True)
            if self.detached:
                self.report()

    def _observe(self, e: Experiment, bar) -> None:
        """A finished experiment: the agent is told, the progress shown; a streak of invalid proposals stops."""
        lab, s = self.lab, self.lab.cfg.search
        with lab.lock:
            rows = lab.rows()
            state = self._state(rows)
        self.agent.observe(e, state)
        try:  # the agent's session totals (agent=claude: tokens, cost) on the parent run
            with lab.lock:
                lab.runs.log_parent(len(rows), self.agent.usage())
        except Exception as err:
            log.warning("MLflow: could not log the agent's usage: %s", err)
        if e.counted:
            bar.update(1)
        shown = {"running": len(self.running)} if self.detached else {}
        bar.set_postfix(best=f"{lab.standings(rows).best.val_bpb:.4f}", last=e.status, refresh=True, **shown)
        self.invalid_streak = self.invalid_streak + 1 if e.status == INVALID else 0
        if self.invalid_streak >= s.max_invalid_in_row and not self.stopped:
            self._stop(f"{self.invalid_streak} invalid proposals in a row (search.max_invalid_in_row); see the "
                       "`reason` column of results.tsv")

    def _stop(self, reason: str, final: bool = True) -> None:
        self.stop_reason = reason
        self.stopped = self.stopped or final

    def _state(self, rows: list[Experiment]):
        """What the agent sees: the session, and the experiments in flight (not in the ledger yet)."""
        lab = self.lab
        state = lab.state(rows, lab.deadline - time.time())
        state.in_flight = [new_row(job.exp, job.proposal, lab.base_overrides, []) for _, job in self.running.values()]
        for e in state.in_flight:
            e.status = "running"
        state.experiments_left = max(0, state.experiments_left - len(state.in_flight))
        return state

    def _next(self) -> Optional[Job]:
        """The agent's next proposal as a job, or None (the session stops, or waits for the runs in flight)."""
        lab, s = self.lab, self.lab.cfg.search
        with lab.lock:
            rows = lab.rows()
            if lab.standings(rows).experiments_run + len(self.running) >= s.max_experiments:
                # not final: an experiment in flight may turn out invalid (not counted)
                self._stop(f"search.max_experiments={s.max_experiments} reached", final=False)
                return None
            if time.time() >= lab.deadline:
                self._stop(f"search.max_hours={s.max_hours} reached")
                return None
            state = self._state(rows)
        try:
            proposal = self.agent.propose(state)
        except AgentStop as err:  # a cost cap, an API down for long: stop cleanly, resumable
            log.warning("%s", err)
            self._stop(f"paused: {err}")
            return None
        if proposal is None:
            self._stop(f"agent {lab.cfg.agent.name} has nothing more to propose")
            return None
        return Job(next_experiment(rows, [job.exp for _, job in self.running.values()]), proposal, 0, now())

    # ------------------------------------------------------------------ utilisation
    def utilisation(self) -> dict:
        """Where the workers' time went, and the throughput of this invocation."""
        elapsed = max(1e-9, time.time() - self.t0)
        rows = [e for e in self.lab.rows() if e.is_experiment and e.counted and e.finished
                and _ts(e.finished) >= self.t0 - 1]
        per = []
        for w in self.workers:
            u = w.usage
            u_train = min(u.train, u.run)
            u_score = min(u.score, u.run - u_train)  # the runner waits for the scorer: scoring is inside u.run
            per.append({"worker": w.index, "slot": w.label, "experiments": u.experiments,
                        "training": u_train / elapsed, "run_overhead": (u.run - u_train - u_score) / elapsed,
                        "scoring": u_score / elapsed, "idle": max(0.0, elapsed - u.run) / elapsed})
        n = len(per)
        total = {k: sum(p[k] for p in per) / n for k in ("training", "run_overhead", "scoring", "idle")}
        return {"workers": n, "elapsed_s": elapsed, "experiments": len(rows),
                "experiments_per_hour": len(rows) / (elapsed / 3600), **total, "per_worker": per}

    def report(self) -> None:
        try:
            u = self.utilisation()
            atomic_write(self.lab.session.dir / "workers.json", json.dumps(u, indent=2))
            log.info("workers: %d, %d experiments in %.0f s (%.1f per hour); worker time: training %.0f%%, rest of "
                     "the runs (start-up, warm-up) %.0f%%, scoring %.0f%%, idle (staging, agent, decisions, nothing "
                     "to run) %.0f%% (%s)", u["workers"], u["experiments"], u["elapsed_s"], u["experiments_per_hour"],
                     100 * u["training"], 100 * u["run_overhead"], 100 * u["scoring"], 100 * u["idle"],
                     ", ".join(f"w{p['worker']} {100 * p['idle']:.0f}%" for p in u["per_worker"]))
            with self.lab.lock:
                self.lab.runs.log_parent(len(self.lab.rows()), {
                    "workers/count": u["workers"], "workers/experiments_per_hour": u["experiments_per_hour"],
                    "workers/training_share": u["training"], "workers/idle_share": u["idle"]})
        except Exception as e:
            log.warning("could not write the workers' utilisation: %s", e)


def _ts(iso: str) -> float:
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0
