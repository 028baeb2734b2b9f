"""launcher=submitit_local | submitit_slurm: each run of an experiment is one submitit job.

The job runs the same `python -m src.train <overrides>` in the worker's worktree (on a file system the
nodes share, for SLURM), with the runner's clean environment and the worker's device slot, its output
appended to the run's run.log; the lab reads summary.json from the run directory as for a local run and
scores the checkpoint in its own scorer process. Dry runs stay local. The job id (`local:<pid>` or
`slurm:<id>`) and submitit's folder are persisted in state.json before the run is waited on, so a resumed
session re-attaches to a job that is still running (or has finished meanwhile) instead of running it
again. How a job ends maps to the runner's statuses: finished by itself -> what summary.json says (or
crash); our own timeout -> timeout; cancelled / preempted / node failure / killed from outside ->
`killed`, and such a job is submitted again `launcher.requeue_killed` times (default once); SLURM's
TIMEOUT -> timeout.

Hydra sweeps of `python -m src.train -m` go through hydra-submitit-launcher instead (docs/workers.md).

Usage: runner = SubmititRunner(worktree, strip, keep, extra_env=slot_env, launcher=cfg.launcher, folder=dir)
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Callable, Optional

from src.harness.paths import HIDE_ROOTS_ENV
from src.lab.config import ENV_STRIP
from src.lab.runner import Outcome, RunInterrupted, Runner, alive
from src.lab.decisions import INTERRUPTED, KILLED, TIMEOUT

log = logging.getLogger(__name__)

RUNNING = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "UNKNOWN")
FINISHED = ("COMPLETED", "FAILED", "FINISHED", "DONE")  # the job ran to its end (train's summary says how)
SLURM_TIMEOUT = ("TIMEOUT", "DEADLINE")  # submitit job states of a job past its limit


def _submitit():
    try:
        import submitit
    except ImportError:
        raise RuntimeError("launcher=submitit_* needs submitit: pip install submitit") from None
    return submitit


class JobHandle:
    """A submitit job, live (just submitted) or rebuilt from its id and folder (a resumed session)."""

    def __init__(self, ref: str, folder: str, job=None):
        self.ref, self.folder, self.job = ref, folder, job  # ref: local:<pid> | slurm:<id>
        self.kind, _, self.id = ref.partition(":")

    @property
    def pid(self) -> Optional[int]:
        return int(self.id) if self.kind == "local" else None

    def state(self) -> str:
        """RUNNING-like states, FINISHED (ran to its end), or why it ended otherwise (INTERRUPTED, CANCELLED...)."""
        if self.kind == "local":
            proc = getattr(self.job, "_process", None)
            if proc is not None:
                rc = proc.poll()
                return "RUNNING" if rc is None else ("INTERRUPTED" if rc < 0 else "FINISHED")
            if alive(self.pid):
                return "RUNNING"
            return "FINISHED" if self._result().exists() else "INTERRUPTED"
        job = self.job or _submitit().SlurmJob(self.folder, self.id)
        return str(job.state).split()[0].upper()

    def _result(self) -> Path:
        return Path(self.folder) / f"{self.id}_0_result.pkl"

    def cancel(self) -> None:
        if self.kind == "local":
            if self.job is not None:
                self.job.cancel(check=False)
            elif alive(self.pid):
                os.kill(self.pid, signal.SIGINT)
            return
        (self.job or _submitit().SlurmJob(self.folder, self.id)).cancel(check=False)


def job_state(ref: str, folder: str) -> str:
    try:
        return JobHandle(ref, folder).state()
    except Exception as e:  # no submitit, no sacct: nothing to re-attach to
        log.warning("could not read the state of job %s: %s", ref, e)
        return "GONE"


class SubmititRunner(Runner):
    """A Runner whose train runs are submitit jobs (scorer and dry runs stay in this process's machine)."""

    def __init__(self, cwd: Path, strip=ENV_STRIP, keep=(), command: Optional[list[str]] = None, extra_env=None,
                 launcher=None, folder: Optional[str] = None, **kw):
        super().__init__(cwd, strip, keep, command=command, extra_env=extra_env, **kw)
        self.launcher = launcher
        self.folder = Path(folder or Path(cwd).parent / "submitit")
        self._local = False
        self._attach: Optional[tuple[str, str]] = None

    def attach(self, ref: str, folder: str) -> None:
        """The next run waits on this job (of an earlier invocation) instead of submitting one."""
        self._attach = (ref, folder)

    def run(self, overrides, run_dir, timeout_s, on_start=None, score=True, on_curve=None) -> Outcome:
        self._local = not score  # a dry run builds the model on the meta device: no job for that
        try:  # a job's curve is not read while it runs: no pruning under submitit (its log is the job's)
            return super().run(overrides, run_dir, timeout_s, on_start, score)
        finally:
            self._local = False

    def executor(self, timeout_s: float):
        submitit = _submitit()
        lc = self.launcher
        self.folder.mkdir(parents=True, exist_ok=True)
        timeout_min = lc.timeout_min or max(1, int(timeout_s // 60) + 1)
        if lc.name == "submitit_local":
            ex = submitit.LocalExecutor(folder=str(self.folder))
            ex.update_parameters(timeout_min=timeout_min)
            return ex
        if lc.name != "submitit_slurm":
            raise ValueError(f"launcher.name={lc.name!r}; expected local, submitit_local or submitit_slurm")
        ex = submitit.SlurmExecutor(folder=str(self.folder))
        params = {"time": timeout_min}
        for key in ("partition", "account", "qos", "gpus_per_node", "cpus_per_task", "mem", "constraint", "comment"):
            v = getattr(lc, key)
            if v is not None:
                params[key] = v
        if lc.mem_gb is not None and lc.mem is None:
            params["mem"] = f"{lc.mem_gb}GB"
        if lc.setup:
            params["setup"] = list(lc.setup)
        if lc.additional_parameters:
            params["additional_parameters"] = dict(lc.additional_parameters)
        ex.update_parameters(**params)
        return ex

    def _submit(self, cmd: list[str], run_dir: Path, timeout_s: float) -> JobHandle:
        submitit = _submitit()
        log_path = run_dir / "run.log"
        hide = os.pathsep.join([*self.hide_roots, str(run_dir.parent)])  # other runs' saved models (train.py)
        shell = (f"{self.env_prefix()}export {HIDE_ROOTS_ENV}={shlex.quote(hide)}; "
                 f"exec {shlex.join(cmd)} >> {shlex.quote(str(log_path))} 2>&1")
        fn = submitit.helpers.CommandFunction(["bash", "-c", shell], verbose=False, cwd=str(self.cwd))
        job = self.executor(timeout_s).submit(fn)
        kind = "local" if self.launcher.name == "submitit_local" else "slurm"
        return JobHandle(f"{kind}:{job.job_id}", str(self.folder), job)

    def env_prefix(self) -> str:
        """The run's environment as shell: the job keeps its own (SLURM sets CUDA_VISIBLE_DEVICES and SLURM_* on the
        node), minus what the runner strips (API keys, ...), plus what it sets (the worker's device slot)."""
        base = os.environ
        unset = sorted(k for k in base if k not in self.env and k.isidentifier())
        exports = {k: v for k, v in self.env.items() if base.get(k) != v and k.isidentifier()}
        if self.launcher.name == "submitit_local" and "CUDA_VISIBLE_DEVICES" in self.env:
            exports["CUDA_VISIBLE_DEVICES"] = self.env["CUDA_VISIBLE_DEVICES"]  # its controller sets "" otherwise
        return ((f"unset {' '.join(unset)}; " if unset else "")
                + "".join(f"export {k}={shlex.quote(v)}; " for k, v in sorted(exports.items())))

    def _train(self, overrides: list[str], run_dir: Path, timeout_s: float,
               on_start: Optional[Callable[..., None]], on_curve=None) -> Outcome:
        if self._local:
            return super()._train(overrides, run_dir, timeout_s, on_start)
        cmd = [*self.command, *overrides, f"hydra.run.dir={run_dir}"]
        (run_dir / "command.txt").write_text(f"cd {shlex.quote(str(self.cwd))} && {shlex.join(cmd)}\n")
        t0 = time.monotonic()
        resubmits = 0
        while True:
            if self._attach is not None:
                ref, folder = self._attach
                self._attach = None
                handle, what = JobHandle(ref, folder), "re-attached to job"
            else:
                handle, what = self._submit(cmd, run_dir, timeout_s), "submitted job"
            if on_start is not None:
                on_start(handle.pid, handle.ref, handle.folder)
            log.info("%s: %s %s (%s)", run_dir.name, what, handle.ref, handle.folder)
            state, note = self._wait(handle, run_dir, timeout_s, t0)
            out = self._outcome(run_dir, 0 if state in FINISHED else None, t0, note)
            if state in FINISHED or note.startswith("timeout"):
                if note.startswith("timeout"):
                    out.status = TIMEOUT
                return out
            # ended by something else than itself: cancelled, preempted, node failure, killed from outside
            if out.summary.get("status"):  # it still wrote its summary: that stands
                return out
            out.status = KILLED
            out.note = f"job {handle.ref} ended {state} without a summary: killed from outside (scheduler, " \
                       "preemption, node failure)"
            if resubmits >= self.launcher.requeue_killed:
                return out
            resubmits += 1
            log.warning("%s: %s; submitting it again (%d of %d, launcher.requeue_killed)", run_dir.name, out.note,
                        resubmits, self.launcher.requeue_killed)
            with open(run_dir / "run.log", "a") as f:
                f.write(f"\n[search] {out.note}; submitted again\n")

    def _wait(self, handle: JobHandle, run_dir: Path, timeout_s: float, t0: float) -> tuple[str, str]:
        """Poll the job until it ends, our timeout, or an interrupt (the job is cancelled: RunInterrupted)."""
        poll = max(0.05, float(self.launcher.poll_s))
        try:
            while True:
                state = handle.state()
                if state not in RUNNING:
                    if state in SLURM_TIMEOUT:
                        return state, f"timeout: job {handle.ref} ended {state}"
                    return state, ""
                if self.interrupted.is_set():
                    raise KeyboardInterrupt
                if time.monotonic() - t0 > timeout_s:
                    self._stop(handle)
                    return "TIMEOUT", (f"timeout: job {handle.ref} cancelled after {timeout_s:.0f} s "
                                       "(search.timeout_factor/timeout_grace_s/timeout_s)")
                time.sleep(poll)
        except KeyboardInterrupt:
            self._stop(handle)
            out = self._outcome(run_dir, None, t0, "interrupted by the user (Ctrl-C / SIGTERM)")
            out.status = INTERRUPTED
            raise RunInterrupted(out) from None

    def _stop(self, handle: JobHandle) -> None:
        handle.cancel()
        deadline = time.monotonic() + self.stop_grace_s
        while time.monotonic() < deadline and handle.state() in RUNNING:
            time.sleep(0.1)

    def interrupt(self) -> None:
        self.interrupted.set()  # the waiting thread cancels its job
