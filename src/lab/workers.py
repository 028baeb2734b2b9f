"""Many experiments at once (search.workers=N): one session, one ledger, one best, N workers.

Each worker has its own git worktree (<session>/workers/w<i>, a detached HEAD branched from the
best commit when its experiment was proposed) and its own device slot, the same for every
experiment of the session: one GPU on CUDA (CUDA_VISIBLE_DEVICES, from search.gpus or every
visible GPU), a fixed thread count on CPU (device.threads; N x threads must fit the cores). The
pool is asynchronous: a worker that finishes gets the agent's next proposal at once. The agent
is asked and told from the main thread only, and sees what is in flight (SearchState.in_flight:
replay goes on in file order, TPE/random hold asked-but-not-told trials, Optuna's running
trials, with the constant liar; Claude reads the in-flight list in its state).

Decisions under concurrency. A result is judged against the best at the time it finishes. A
would-be keep takes the `advance` lock (would-be keeps are decided one at a time; discards are
not held up), and if its parent is no longer the best it is rebased (the patch re-applied on the
current best, the overrides merged with the best's) and confirmed on top of the current best
before the branch advances (by paired runs while the noise is weak, for an implausible gain or with
search.confirm=true, else by one re-run screened against the best); a patch that no longer applies
is a `conflict` row (with the reason), not lost. The branch research/<tag> moves only in the
session's own worktree, by one fast-forward commit per keep, so it stays linear and its tip is
always the best. Ledger, state and branch writes happen under one lock (the session's); the heavy
work runs in subprocesses.

The ledger's row order is the finish order; exp ids (and the `proposed` column) are the proposal
order; `worker` and `parent` say where and on what each ran. state.json's `running` lists every
experiment in flight, so a resume (kill -9 included) finishes each once (src/lab/resume.py).

Usage: Pool(search).run(pendings, bar)     (src/lab/loop.py, when search.workers > 1)
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Optional

from src.lab import candidate
from src.lab.agents import AgentStop
from src.lab.confirm import Confirmation
from src.lab.decision import decide, weak
from src.lab.experiment import Experiments, new_row, prune_checkpoints
from src.lab.integrity import implausible
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal, merge_overrides
from src.lab.resume import Pending
from src.lab.runner import RunInterrupted
from src.lab.session import Git, InFlight, Session, SessionError, atomic_write
from src.lab.decisions import CONFLICT, DISTURBED, INTERRUPTED, INVALID, KEEP

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- device slots
@dataclass(frozen=True)
class Slot:
    index: int
    env: dict  # what the worker's runs (and scorers) get: CUDA_VISIBLE_DEVICES or the thread count
    label: str  # cuda:1, cpu x1 thread (core 0)
    cpus: tuple = ()  # CPU: the cores its processes are pinned to (train, scorer, dry run); () = not pinned


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def device_kind(device_type: str) -> str:
    if device_type != "auto":
        return device_type
    if visible_gpus():
        return "cuda"
    try:
        import torch

        return "mps" if torch.backends.mps.is_available() else "cpu"
    except Exception:
        return "cpu"


def plan_slots(cfg) -> list[Slot]:
    """One device slot per worker; SessionError when the machine cannot give each worker its own."""
    n, threads = cfg.search.workers, cfg.device.threads
    launcher = getattr(getattr(cfg, "launcher", None), "name", "local")
    if launcher == "submitit_slurm":  # each run a job of its own: SLURM gives it its GPU(s) and cores
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
        return [Slot(i, env, f"slurm job {i}") for i in range(n)]
    kind = device_kind(cfg.device.type)
    if kind == "cuda":
        gpus = [str(g) for g in cfg.search.gpus] if cfg.search.gpus else visible_gpus()
        if len(gpus) < n:
            raise SessionError(f"search.workers={n} needs a GPU per worker but {len(gpus)} are available "
                               f"({', '.join(gpus) or 'none'}); set search.workers<={max(1, len(gpus))} or "
                               "search.gpus=[...] (GPU ids, one per worker)")
        return [Slot(i, {"CUDA_VISIBLE_DEVICES": gpus[i]}, f"cuda:{gpus[i]}") for i in range(n)]
    if kind == "mps" and n > 1:
        raise SessionError(f"search.workers={n}: device=mps is one GPU shared by everything on this Mac; run "
                           "search.workers=1 (or device=cpu with device.threads=<k>)")
    cores = cpu_cores()
    if n > 1 and not threads:
        raise SessionError(f"search.workers={n} on CPU needs a fixed thread count per worker: set device.threads=<k> "
                           f"with {n} x k <= {cores} cores (e.g. device.threads={max(1, cores // n)}); runs that each "
                           "use every core slow each other down far more than 2x")
    if n * (threads or 0) > cores:
        raise SessionError(f"search.workers={n} x device.threads={threads} = {n * threads} threads, but this machine "
                           f"has {cores} cores; lower device.threads (at most {max(1, cores // n)}) or search.workers")
    if not threads:  # one worker, every core (the sequential loop's runs, through the pool: launcher=submitit_*)
        return [Slot(0, {}, f"cpu x{cores} (all)")]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # each worker its own cores: one worker's start-up, dry run and scorer import then slow only
    # itself, never another worker's counted training (where the OS can pin; macOS cannot)
    ids = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") and n > 1 else []
    slots = []
    for i in range(n):
        cpus = tuple(ids[i * threads:(i + 1) * threads]) if ids else ()
        where = f" (core{'s' if len(cpus) > 1 else ''} {','.join(map(str, cpus))})" if cpus else ""
        slots.append(Slot(i, env, f"cpu x{threads} thread{'s' if threads > 1 else ''}{where}", cpus))
    return slots


def check_workers(cfg) -> None:
    """search.workers and the device, checked before a session exists (SessionError)."""
    if cfg.search.workers > 1:
        plan_slots(cfg)


# ---------------------------------------------------------------------------- a worker's view of the session
class WorkerSession:
    """The session seen from one worker: the shared directory, state, lock and refs, its own worktree.

    The worktree is detached (no branch): a candidate is committed there on top of the best it was
    proposed against; research/<tag> moves only in the session's worktree (Pool._finish)."""
    # git in the worker's worktree: Session's own methods, run on this object's worktree and git
    reset = Session.reset
    head = Session.head
    check_patch = Session.check_patch
    commit_candidate = Session.commit_candidate
    tree = Session.tree
    conf_dir = Session.conf_dir
    preset_path = Session.preset_path

    def __init__(self, main: Session, index: int):
        self.main, self.index = main, index
        self.worktree = main.dir / "workers" / f"w{index}"
        self.git = Git(self.worktree)
        # no `git gc --auto` from a worker's commit while other worktrees of the repo are busy
        self.git.env = {**(main.git.env or os.environ), "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "gc.auto",
                        "GIT_CONFIG_VALUE_0": "0"}
        self.parent = ""  # the best commit the current experiment branched from
        self.proposed = ""

    def __getattr__(self, name):  # dir, state, tag, runs_dir, preset_name, keep_ref, save, lock, ...
        return getattr(self.main, name)

    def ensure(self, commit: str) -> None:
        """The worker's worktree, created on first use (or after it was deleted), at `commit`."""
        if (self.worktree / ".git").exists():
            self.reset(commit)
            return
        self.main.repo_git("worktree", "prune")
        shutil.rmtree(self.worktree, ignore_errors=True)
        self.worktree.parent.mkdir(parents=True, exist_ok=True)
        self.main.repo_git("worktree", "add", "--detach", "--quiet", str(self.worktree), commit)

    # the worker's entry of state.running (persisted before each run starts)
    def track(self, fl: InFlight) -> None:
        fl.worker, fl.parent, fl.proposed = self.index, self.parent, self.proposed
        with self.main.lock:
            st = self.main.state
            old = next((x for x in st.running if x.worker == self.index), None)
            if old is not None and (old.exp, old.attempt) == (fl.exp, fl.attempt) and old.job and not fl.job:
                fl.pid, fl.job, fl.job_folder = old.pid, old.job, old.job_folder  # a re-attached job stays known
            st.running = [x for x in st.running if x.worker != self.index] + [fl]
            self.main.save()

    def track_pid(self, pid: int, job: str = "", job_folder: str = "") -> None:
        with self.main.lock:
            for fl in self.main.state.running:
                if fl.worker == self.index:
                    fl.pid, fl.job, fl.job_folder = pid, job or fl.job, job_folder or fl.job_folder
            self.main.save()

    def untrack(self) -> None:
        with self.main.lock:
            self.main.state.running = [x for x in self.main.state.running if x.worker != self.index]
            self.main.save()


class Locked:
    """Every method call of `obj` under `lock` (the session's MLflow runs: one client, many threads)."""

    def __init__(self, obj, lock):
        self._obj, self._lock = obj, lock

    def __getattr__(self, name):
        v = getattr(self._obj, name)
        if not callable(v):
            return v

        def call(*args, **kwargs):
            with self._lock:
                return v(*args, **kwargs)
        return call


@dataclass
class Job:
    exp: str
    proposal: Proposal
    attempt: int = 0  # attempts an earlier invocation started (a resume)
    proposed: str = ""
    attach: str = ""  # launcher=submitit_*: a running job of attempt `attempt` to re-attach to
    attach_folder: str = ""
    worker: Optional[int] = None  # re-attaching: the worker whose worktree the job runs in
    commit: str = ""  # re-attaching: the candidate commit the job runs
    parent: str = ""


@dataclass
class Usage:
    """Where a worker's time went (seconds): its runs (training, the rest of the run, scoring) and the rest."""
    run: float = 0.0  # inside the runner: train runs start to exit, their scoring, and the candidates' dry runs
    train: float = 0.0  # counted training seconds
    score: float = 0.0  # the scorer process, after the run (part of `run`)
    experiments: int = 0


class Worker(Experiments):
    """One slot: executes an experiment end to end in its own worktree, with its own runner."""

    def __init__(self, pool: "Pool", slot: Slot):
        self.pool, self.slot = pool, slot
        main = pool.lab
        self.session = WorkerSession(main.session, slot.index)
        runner = pool.search.make_runner(self.session.worktree, slot.env, slot.cpus)
        self.usage = Usage()
        real = runner.run

        def timed(*args, **kwargs):  # utilisation: time in runs, counted training, scoring
            t0 = time.monotonic()
            out = real(*args, **kwargs)
            self.usage.run += time.monotonic() - t0
            for attr, key in (("train", "training_seconds"), ("score", "score_seconds")):
                v = out.summary.get(key)
                if isinstance(v, (int, float)) and v == v:
                    setattr(self.usage, attr, getattr(self.usage, attr) + float(v))
            return out
        runner.run = timed
        lab = dataclasses.replace(main, session=self.session, runner=runner, runs=Locked(main.runs, pool.lock),
                                  _configs={})
        super().__init__(lab)

    def record(self, e: Experiment, rows: list[Experiment], out=None) -> Experiment:
        if e.worker is None:  # a confirmation run: on this worker too
            e.worker, e.parent = self.slot.index, self.session.parent
        with self.pool.lock:
            return super().record(e, rows, out)

    # ------------------------------------------------------------------ one experiment
    def execute(self, job: Job) -> Experiment:
        """Stage on the best (under the lock), run (outside it), settle, record; an interrupted run is recorded."""
        lab, sess, lock = self.lab, self.session, self.pool.lock
        proposal, attempt = job.proposal, job.attempt
        if job.attach and hasattr(lab.runner, "attach"):
            return self._reattach(job)
        if job.attach:  # resumed with launcher=local: the job is not waited on; stop it and run the experiment again
            from src.lab.launcher import JobHandle

            log.warning("%s: job %s is left by a launcher this invocation does not use; cancelling it", job.exp,
                        job.attach)
            JobHandle(job.attach, job.attach_folder).cancel()
        with lock:
            rows = lab.rows()
            st = lab.standings(rows)
            best = st.best
            overrides = merge_overrides(best.overrides, proposal.overrides)
            sess.parent, sess.proposed = best.commit, job.proposed
            lab.ledger.save(job.exp, proposal, overrides)
            sess.track(InFlight(exp=job.exp, attempt=attempt, commit="", run_dir="", started=time.time()))
            e = new_row(job.exp, proposal, lab.base_overrides, overrides)
            e.commit, e.sigma, e.dof = best.commit, st.noise.sigma, st.noise.dof
            e.worker, e.proposed, e.parent = self.slot.index, job.proposed, best.commit
            try:
                sess.ensure(best.commit)
                e.commit = candidate.stage(lab, job.exp, proposal, best, overrides, dry=False)
            except InvalidProposal as err:
                return self._invalid(e, err, rows)
            lab.ledger.save(job.exp, proposal, overrides, commit=e.commit)
        try:
            if lab.cfg.search.preflight:
                try:
                    candidate.dry_run(lab, job.exp, bool(overrides))
                except InvalidProposal as err:
                    with lock:
                        return self._invalid(e, err, rows)
            a = self.attempts.run(job.exp, e.commit, overrides, attempt, lab.rows(), in_flight=True)
            a.fill(e)
            self._settle(e, a, proposal, overrides)
        except RunInterrupted as ri:  # Ctrl-C / SIGTERM: the pool stopped the run; record it
            out = ri.outcome
            e.status, e.run_status, e.reason = INTERRUPTED, INTERRUPTED, out.error_line
            e.attempts = max(e.attempts, attempt + 1)
            self.record(e, lab.rows(), out)
        self.usage.experiments += 1
        return e

    def _reattach(self, job: Job) -> Experiment:
        """A resumed session: the job of attempt `job.attempt` runs on (or has finished) in this worker's worktree;
        wait on it rather than run the experiment again, then settle it like any other."""
        lab, sess, lock = self.lab, self.session, self.pool.lock
        with lock:
            rows = lab.rows()
            st = lab.standings(rows)
            rec = lab.ledger.load(job.exp) or {}
            overrides = list(rec.get("config") or merge_overrides(st.best.overrides, job.proposal.overrides))
            sess.parent, sess.proposed = job.parent or st.best.commit, job.proposed
            e = new_row(job.exp, job.proposal, lab.base_overrides, overrides)
            e.commit, e.sigma, e.dof = job.commit, st.noise.sigma, st.noise.dof
            e.worker, e.proposed, e.parent = self.slot.index, job.proposed, sess.parent
            sess.track(InFlight(exp=job.exp, attempt=job.attempt, commit=job.commit, run_dir="", started=time.time(),
                                job=job.attach, job_folder=job.attach_folder))  # never a moment without its job
        lab.runner.attach(job.attach, job.attach_folder)
        try:
            a = self.attempts.run(job.exp, e.commit, overrides, job.attempt, lab.rows(), in_flight=True, attach=True)
            a.fill(e)
            self._settle(e, a, job.proposal, overrides)
        except RunInterrupted as ri:
            out = ri.outcome
            e.status, e.run_status, e.reason = INTERRUPTED, INTERRUPTED, out.error_line
            e.attempts = max(e.attempts, job.attempt)
            self.record(e, lab.rows(), out)
        self.usage.experiments += 1
        return e

    def _invalid(self, e: Experiment, err: Exception, rows: list[Experiment]) -> Experiment:
        e.status, e.run_status, e.reason, e.sigma, e.dof = INVALID, "-", str(err), None, None
        return self.record(e, rows)

    def _settle(self, e: Experiment, a, proposal: Proposal, overrides: list[str]) -> None:
        """Judge against the best now; a would-be keep waits for the advance lock, then keep (rebased and
        confirmed when the best moved), discard or conflict; the branch advances under the lock."""
        lab, lock, out = self.lab, self.pool.lock, a.out
        with lock:
            rows = lab.rows()
            st = lab.standings(rows)
            keep = out.ok and out.val_bpb is not None and decide(out.val_bpb, st.best.val_bpb, st.margin).keep
            if not keep:  # discard, crash, disturbed, tampered: nothing more to run
                self._decide(e, a, st, overrides, rows)
                self._finish(e, rows, a.out)
                return
        with self.pool.advance:  # would-be keeps one at a time: only their holder moves the best
            with lock:
                rows = lab.rows()
                st = lab.standings(rows)
            if st.best.commit == e.parent:
                self._decide(e, a, st, overrides, rows)
            else:
                self._rebase(e, a, proposal, st, rows)
            with lock:
                self._finish(e, rows, a.out)

    def _rebase(self, e: Experiment, a, proposal: Proposal, st, rows: list[Experiment]) -> None:
        """The best moved while `e` ran: judged against it; if it still beats it, re-staged on it and confirmed."""
        lab, out, best = self.lab, a.out, st.best
        v = decide(out.val_bpb, best.val_bpb, st.margin)
        e.val_bpb, e.values, e.delta, e.margin, e.status = out.val_bpb, [out.val_bpb], v.delta, v.margin, v.decision
        moved = f"the best moved to {best.exp} ({best.commit[:7]}) while it ran on {e.parent[:7]}"
        if not v.keep:
            e.reason = f"{moved}; it does not beat the new best by the margin"
            return
        with self.pool.lock:
            overrides = merge_overrides(best.overrides, proposal.overrides)
            self.session.keep_ref(f"{e.exp}-screen", e.commit)  # the commit the screen run ran stays inspectable
            try:
                self.session.reset(best.commit)
                commit = candidate.stage(lab, e.exp, proposal, best, overrides, dry=False)
            except InvalidProposal as err:
                e.status, e.values = CONFLICT, []
                e.reason = (f"conflict: {moved}, and beat it by {-v.delta:.4f} (margin {v.margin:.4f}), but the "
                            f"proposal cannot be re-applied on it: {err}")
                return
            e.commit, e.overrides_in_effect = commit, overrides
            lab.ledger.save(e.exp, proposal, overrides, commit=commit)
        log.info("%s: %s; rebased on it as %s and confirming there", e.exp, moved, commit[:7])
        s = lab.cfg.search
        conf = Confirmation(lab, self.attempts, self.record)
        doubt = implausible(out.val_bpb, best.val_bpb, rows, s, lab.base_config.data.bpb_floor)  # paired, always
        if doubt or weak(st.noise, s.confirm, s.confirm_min_dof):
            c = conf.run(e, best, commit, overrides, rows, st.noise)
        else:
            c = conf.rerun(e, best, commit, overrides, st.margin)
        e.status = c.decision
        if c.verdict is not None:
            e.delta, e.margin = c.verdict.delta, c.verdict.margin
        if c.decision == DISTURBED:
            e.delta = None
        e.values = list(c.candidate_runs)  # the screen run ran the old parent: only the rebased runs stand
        if c.candidate_runs:
            e.val_bpb = sum(c.candidate_runs) / len(c.candidate_runs)
        e.reason = (f"{moved}: rebased on it (screen on the old parent {v.delta:+.4f}, margin {v.margin:.4f}); "
                    f"{c.reason}")

    def _finish(self, e: Experiment, rows: list[Experiment], out) -> None:
        """Under the lock: the branch advances (a keep: one fast-forward commit), then the row is recorded."""
        if e.status == KEEP:
            self.pool.lab.session.reset(e.commit)
        self.record(e, rows, out)
        prune_checkpoints(self.lab.session.runs_dir, e.exp, e.status, self.lab.cfg.search.keep_checkpoints)


# ---------------------------------------------------------------------------- the pool
class Pool:
    def __init__(self, search):
        self.search = search
        self.lab = search.lab
        self.lock = self.lab.session.lock  # ledger, state.json, branch, MLflow, the agent's state
        self.advance = threading.Lock()  # would-be keeps, one at a time
        self.slots = plan_slots(search.cfg)
        self.workers = [Worker(self, s) for s in self.slots]
        self.stopped = False
        self.t0 = time.time()

    def run(self, pendings: list[Pending], bar) -> None:
        """Fill every free worker with a proposal (resumed experiments first) until the session stops."""
        lab, s, search = self.lab, self.search.cfg.search, self.search
        log.info("%d workers: %s", len(self.workers), ", ".join(f"w{w.slot.index} {w.slot.label}" for w in self.workers))
        queue = [Job(p.exp, p.proposal, p.attempt, p.proposed or _now(), p.job, p.job_folder, p.worker, p.commit,
                     p.parent) for p in pendings]
        free = list(self.workers)
        running: dict[cf.Future, tuple[Worker, Job]] = {}
        invalid_streak = 0
        ex = cf.ThreadPoolExecutor(max_workers=len(self.workers), thread_name_prefix="worker")
        try:
            while True:
                while free and not self.stopped:
                    job = queue.pop(0) if queue else self._next(running)
                    if job is None:
                        break
                    # a job to re-attach to runs in the worktree of the worker that started it
                    w = next((x for x in free if job.attach and x.slot.index == job.worker), free[0])
                    free.remove(w)
                    running[ex.submit(w.execute, job)] = (w, job)
                if not running:
                    return
                done, _ = cf.wait(list(running), timeout=1.0, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    w, job = running.pop(f)
                    free.append(w)
                    e = f.result()
                    with self.lock:
                        rows = lab.rows()
                        state = self._state(rows, running)
                    search.agent.observe(e, state)
                    try:
                        with self.lock:
                            lab.runs.log_parent(len(rows), search.agent.usage())
                    except Exception as err:
                        log.warning("MLflow: could not log the agent's usage: %s", err)
                    if e.counted:
                        bar.update(1)
                    bar.set_postfix(best=f"{lab.standings(rows).best.val_bpb:.4f}", last=e.status,
                                    running=len(running), refresh=True)
                    invalid_streak = invalid_streak + 1 if e.status == INVALID else 0
                    if invalid_streak >= s.max_invalid_in_row and not self.stopped:
                        self.stopped = True
                        search.stop_reason = (f"{invalid_streak} invalid proposals in a row (search.max_invalid_in_row)"
                                              "; see the `reason` column of results.tsv")
        except BaseException:  # Ctrl-C, SIGTERM, a worker's error: stop every run, let each record itself
            self.stopped = True
            for w in self.workers:
                w.lab.runner.interrupt()
            for f in list(running):
                try:
                    f.result()
                except BaseException as err:  # noqa: BLE001 - the first error is the one raised
                    log.debug("worker stopped: %s", err)
            raise
        finally:
            ex.shutdown(wait=True)
            self.report()

    def _state(self, rows: list[Experiment], running: dict):
        lab = self.lab
        state = lab.state(rows, lab.deadline - time.time())
        flying = []
        for _, job in running.values():
            e = new_row(job.exp, job.proposal, lab.base_overrides, [])
            e.status = "running"
            flying.append(e)
        state.in_flight = flying
        state.experiments_left = max(0, state.experiments_left - len(flying))
        return state

    def _next(self, running: dict) -> Optional[Job]:
        """The agent's next proposal as a job, or None (the session stops, or waits for the runs in flight)."""
        lab, s, search = self.lab, self.search.cfg.search, self.search
        with self.lock:
            rows = lab.rows()
            st = lab.standings(rows)
            if st.experiments_run + len(running) >= s.max_experiments:
                search.stop_reason = f"search.max_experiments={s.max_experiments} reached"
                return None  # not final: an experiment in flight may turn out invalid (not counted)
            if time.time() >= lab.deadline:
                self.stopped = True
                search.stop_reason = f"search.max_hours={s.max_hours} reached"
                return None
            state = self._state(rows, running)
        try:
            proposal = search.agent.propose(state)
        except AgentStop as err:
            log.warning("%s", err)
            self.stopped = True
            search.stop_reason = f"paused: {err}"
            return None
        if proposal is None:
            self.stopped = True
            search.stop_reason = f"agent {search.cfg.agent.name} has nothing more to propose"
            return None
        return Job(self._allocate(rows, running), proposal, 0, _now())

    @staticmethod
    def _allocate(rows: list[Experiment], running: dict) -> str:
        """exp-NNN after every id recorded or in flight: ids are the proposal order."""
        ids = [e.exp for e in rows] + [job.exp for _, job in running.values()]
        nums = [int(m.group(1)) for x in ids for m in [re.fullmatch(r"exp-(\d+)", x)] if m]
        return f"exp-{max(nums, default=0) + 1:03d}"

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
            per.append({"worker": w.slot.index, "slot": w.slot.label, "experiments": u.experiments,
                        "training": u_train / elapsed, "run_overhead": (u.run - u_train - u_score) / elapsed,
                        "scoring": u_score / elapsed, "waiting": max(0.0, elapsed - u.run) / elapsed})
        n = len(per)
        total = {k: sum(p[k] for p in per) / n for k in ("training", "run_overhead", "scoring", "waiting")}
        return {"workers": n, "elapsed_s": elapsed, "experiments": len(rows),
                "experiments_per_hour": len(rows) / (elapsed / 3600), **total, "per_worker": per}

    def report(self) -> None:
        try:
            u = self.utilisation()
            atomic_write(self.lab.session.dir / "workers.json", json.dumps(u, indent=2))
            log.info("workers: %d, %d experiments in %.0f s (%.1f per hour); worker time: training %.0f%%, rest of "
                     "the runs (start-up, warm-up, dry runs) %.0f%%, scoring %.0f%%, waiting (staging, agent, decisions, idle) "
                     "%.0f%%", u["workers"], u["experiments"], u["elapsed_s"], u["experiments_per_hour"],
                     100 * u["training"], 100 * u["run_overhead"], 100 * u["scoring"], 100 * u["waiting"])
            with self.lock:
                self.lab.runs.log_parent(len(self.lab.rows()), {
                    "workers/count": u["workers"], "workers/experiments_per_hour": u["experiments_per_hour"],
                    "workers/training_share": u["training"], "workers/waiting_share": u["waiting"]})
        except Exception as e:
            log.warning("could not write the workers' utilisation: %s", e)


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def _ts(iso: str) -> float:
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0
