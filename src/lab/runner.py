"""Runs one experiment: `python -m src.train <overrides>` as a subprocess in the session's worktree.

The run gets its own Hydra output dir (summary.json, run.log, .hydra/), its own process group
(so a timeout or Ctrl-C stops it and anything it started), and an environment without secrets
(API keys, tokens, passwords). On Linux it also dies with the search process (PR_SET_PDEATHSIG),
so a kill -9 of the search leaves no orphan training in the background.

Usage: outcome = Runner(worktree, strip=cfg.search.env_strip).run(overrides, run_dir, timeout_s=270)
"""
from __future__ import annotations

import ctypes
import fnmatch
import json
import os
import shlex
import signal
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from src.lab.config import ENV_STRIP
from src.lab.integrity import (DeviceBudget, clock_start, counted_cpu, counted_in_process, device_overrun,
                               frozen_mismatch)
from src.lab.session import atomic_write
from src.harness.budget import CURVE_LINE
from src.harness.launch import tree, waited
from src.harness.pinning import pin
from src.harness.paths import HIDE_ROOTS_ENV
from src.harness.score_client import CHECKPOINT, Scorer, apply_verdict, training_cost
from src.lab.decisions import CRASH, INTERRUPTED, OK, PRUNED, STALLED, TAMPERED, TIMEOUT

ALWAYS_STRIP = ("MLFLOW_RUN_ID",)  # would attach the child to whatever run the parent has open
OVERRUN = "over budget: "  # _tampering's prefix for a run whose device time passed the budget
STARVED_SHARE = 0.1  # a timed-out run that waited for a CPU this share of its wall time was starved (the machine's)
FROZEN = "checkpoint.frozen.pt"  # the launcher's copy of the checkpoint at the freeze: what is scored


@dataclass
class Outcome:
    status: str  # train's status (src.harness.status.RUN_STATUSES), or interrupted / timeout / crash as the runner saw it
    run_dir: Path
    summary: dict = field(default_factory=dict)
    returncode: Optional[int] = None
    wall_seconds: float = 0.0
    log_tail: str = ""  # last lines of the run's output, kept for crashes
    note: str = ""  # why the runner decided the status (timeout after N s, no summary.json, ...)
    launch: Optional[dict] = None  # the launcher's report (src/harness/launch.py): the tree's CPU time, the freeze
    hung: bool = False  # timed out while neither starved of a CPU nor stalled: the code's doing, not the machine's
    curve: list = field(default_factory=list)  # (fraction of the counted budget, smoothed train loss), every 5%

    @property
    def checkpoint(self) -> Path:
        """What is scored: the launcher's copy at the freeze when there is one, else the run's own checkpoint."""
        return self.run_dir / (FROZEN if (self.launch or {}).get("freeze") else CHECKPOINT)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def val_bpb(self) -> Optional[float]:
        v = self.summary.get("val_bpb")
        return float(v) if isinstance(v, (int, float)) and v == v else None

    @property
    def error_line(self) -> str:
        """One line saying why the run failed: the note, the summary's error, or the last traceback line."""
        if self.note and self.status in (TIMEOUT, INTERRUPTED):
            return self.note
        if self.summary.get("error"):
            return str(self.summary["error"]).splitlines()[0][:300]
        lines = [ln.strip() for ln in self.log_tail.splitlines() if ln.strip()]
        for ln in reversed(lines):
            if "Error" in ln or "Exception" in ln:
                return ln[:300] + (f" [{self.note}]" if self.note else "")
        return self.note or (lines[-1][:300] if lines else f"exit code {self.returncode}")


CURVE_RE = re.compile(rf"^{CURVE_LINE} fraction=([0-9.]+) loss=(\S+) step=(\d+)\s*$", re.M)


class CurveReader:
    """The learning curve a run prints (src/harness/budget.py Curve), read from its log while it trains: new
    points at each poll. Advisory (the training process prints it, as it prints its loss): no verdict rests on
    it; fractions out of order or repeated are dropped."""

    def __init__(self, log_path: Path):
        self.path, self.offset, self.buf = Path(log_path), 0, b""
        self.points: list[tuple[float, float]] = []

    def poll(self) -> list[tuple[float, float]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        self.buf += data
        cut = self.buf.rfind(b"\n") + 1
        text, self.buf = self.buf[:cut].decode(errors="replace"), self.buf[cut:]
        new = []
        for m in CURVE_RE.finditer(text):
            f, loss = float(m.group(1)), float(m.group(2))
            if not self.points or f > self.points[-1][0] + 1e-9:
                self.points.append((f, loss))
                new.append((f, loss))
        return new


class RunInterrupted(Exception):
    """Ctrl-C (or SIGTERM) arrived during a run; the run was stopped. Carries its outcome."""

    def __init__(self, outcome: Outcome):
        super().__init__(INTERRUPTED)
        self.outcome = outcome


def clean_env(environ: dict, strip=ENV_STRIP, keep=()) -> dict:
    """A copy of `environ` without variables whose name matches a strip pattern (case-insensitive)."""
    pats = [p.upper() for p in (*strip, *ALWAYS_STRIP)]
    keep = {k.upper() for k in keep}
    return {k: v for k, v in environ.items()
            if k.upper() in keep or not any(fnmatch.fnmatchcase(k.upper(), p) for p in pats)}


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _child_setup(cpus: tuple) -> Optional[Callable[[], None]]:
    """What runs in the train process between fork and exec: die with the search (Linux), pinned to `cpus`."""
    if not sys.platform.startswith("linux"):
        return None

    def setup() -> None:
        _die_with_parent()
        if cpus:
            pin(cpus)
    return setup


def alive(pid: Optional[int]) -> bool:
    """Is the process running (a zombie waiting to be reaped is not)?"""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def stop_group(pid: int, grace_s: float = 15.0, proc: Optional[subprocess.Popen] = None) -> None:
    """SIGINT the process group (train records itself as killed), then SIGKILL whatever is left.

    proc: the Popen when the run is our child (reaped here); None for an orphan of a killed search.
    """
    def gone() -> bool:
        return proc.poll() is not None if proc is not None else not alive(pid)

    try:
        os.killpg(pid, signal.SIGINT)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not gone():
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)  # a stuck leader, or anything it left in the group
    except (ProcessLookupError, PermissionError):
        pass
    if proc is not None:
        proc.wait()


def read_summary(run_dir: Path) -> dict:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
        return s if isinstance(s, dict) else {}
    except (OSError, ValueError):
        return {}


def tail(path: Path, n_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class Runner:
    """Runs `python -m src.train` and scores what it trained in a scorer process of its own.

    The train process only saves a checkpoint (score=caller); the scorer (src/harness/score.py) is started
    here, beside it, and its verdict reaches us on a pipe with a nonce the train process never sees.
    Whatever the train process wrote as val_bpb is replaced. score_checkpoints=False is the seam for
    the tests' stand-in train script, which has no model to score (default: on for the real train).
    """

    def __init__(self, cwd: Path, strip=ENV_STRIP, keep=(), command: Optional[list[str]] = None,
                 stop_grace_s: float = 15.0, score_checkpoints: Optional[bool] = None,
                 extra_env: Optional[dict] = None, cpus: tuple = (), budget: Optional[DeviceBudget] = None,
                 eval_spec: Optional[dict] = None, host_floor: Optional[Callable[[], Optional[float]]] = None,
                 hide_roots: tuple = ()):
        """extra_env: a worker's device slot (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS), for its runs and scorers;
        cpus: the cores they are pinned to (search.workers > 1 on CPU; Linux); budget: the session's time budget,
        which every run's device time is checked against from outside (None: not checked); eval_spec: how every
        checkpoint is scored (score_client.eval_spec of the session's config; None: as the checkpoint says);
        host_floor: the session baseline's training CPU seconds per token (None until known), the least the judge
        allows a run's model hosts per token (a recipe that draws rows it does not train on pays less per token);
        hide_roots: folders whose saved models every run hides from itself (the session's, the repo's outputs), as
        well as the other runs' folders beside its own."""
        self.cwd = Path(cwd)
        self.env = clean_env(dict(os.environ), strip, keep)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.update(extra_env or {})
        self.cpus = tuple(cpus)
        self.command = command or [sys.executable, "-m", "src.train"]
        self.stop_grace_s = stop_grace_s
        self.score_checkpoints = command is None if score_checkpoints is None else score_checkpoints
        self.interrupted = threading.Event()  # set from another thread (search.workers > 1: Ctrl-C): stop the run
        self._pid: Optional[int] = None
        self.budget = budget
        self.eval_spec = eval_spec
        self.host_floor = host_floor
        self.hide_roots = tuple(str(r) for r in hide_roots)
        self.cores = len(self.cpus) or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else os.cpu_count() or 1)

    def interrupt(self) -> None:
        """Stop the run in progress from another thread (its own thread records it as interrupted)."""
        self.interrupted.set()
        pid = self._pid
        if pid:
            try:
                os.killpg(pid, signal.SIGINT)
            except (ProcessLookupError, PermissionError):
                pass

    def _check_interrupt(self, run_dir: Path) -> None:
        if self.interrupted.is_set():
            raise RunInterrupted(Outcome(INTERRUPTED, Path(run_dir), note="interrupted by the user (Ctrl-C / SIGTERM)"))

    def run(self, overrides: list[str], run_dir: Path, timeout_s: float,
            on_start: Optional[Callable[[int], None]] = None, score: bool = True,
            on_curve: Optional[Callable[[float, float], str]] = None) -> Outcome:
        """Run to completion, timeout or Ctrl-C (raises RunInterrupted after stopping the run), then score it.

        score=False: a run that trains nothing (the dry run of a candidate). on_curve(fraction, loss): each point
        of the run's learning curve as the run prints it (every 5% of the counted budget), while it trains; a
        non-empty answer stops the run there, and its outcome is `pruned` with that reason (nothing is scored)."""
        run_dir = Path(run_dir)
        self._check_interrupt(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        scorer = None
        if score and self.score_checkpoints:
            overrides = [*overrides, "score=caller"]
            scorer = Scorer(self.cwd, run_dir / "score.log", self.env, self.cpus, spec=self.eval_spec).start()
        try:
            out = self._train(overrides, run_dir, timeout_s, on_start, on_curve)
            if scorer is not None:
                self._score(out, scorer)
        finally:
            if scorer is not None:
                scorer.close()
        return out

    def _train(self, overrides: list[str], run_dir: Path, timeout_s: float,
               on_start: Optional[Callable[[int], None]],
               on_curve: Optional[Callable[[float, float], str]] = None) -> Outcome:
        cmd = [*self.command, *overrides, f"hydra.run.dir={run_dir}"]
        env = {**self.env, HIDE_ROOTS_ENV: os.pathsep.join([*self.hide_roots, str(run_dir.parent)])}
        (run_dir / "command.txt").write_text(f"cd {shlex.quote(str(self.cwd))} && {shlex.join(cmd)}\n")
        log_path = run_dir / "run.log"
        r, w = os.pipe()  # the launcher's report: the training process never holds this pipe
        freeze = ["--freeze", str(run_dir / CHECKPOINT), str(run_dir / FROZEN)] if self.score_checkpoints else []
        launch = [sys.executable, "-m", "src.harness.launch", "--report-fd", str(w), *freeze, "--"]
        t0 = time.monotonic()
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen([*launch, *cmd], cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_child_setup(self.cpus), pass_fds=(w,))
        finally:
            os.close(w)
        reader = Report(r)
        curve = CurveReader(log_path)
        note, hung, pruned = "", False, ""
        self._pid = proc.pid
        try:
            if self.interrupted.is_set():  # interrupt() came before the pid was known
                raise KeyboardInterrupt
            if on_start is not None:
                on_start(proc.pid)
            try:
                rc, pruned = self._wait_curve(proc, timeout_s, curve, on_curve, self.stop_grace_s)
            except subprocess.TimeoutExpired:
                sched = waited([proc.pid, *tree(proc.pid)])  # before the kill: how the tree spent its wall time
                stop_group(proc.pid, self.stop_grace_s, proc)
                rc = proc.returncode
                note = f"timeout: killed after {timeout_s:.0f} s (search.timeout_factor/timeout_grace_s/timeout_s)"
                hung = hung_not_starved(sched, timeout_s)
                if sched is not None:
                    note += (f"; {sched['cpu']:.1f} CPU s, {sched['waiting']:.1f} s waiting for a CPU: "
                             + ("it hung or ran on by itself, not starved by the machine" if hung else
                                "starved by the machine"))
            if self.interrupted.is_set():  # stopped from another thread
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            stop_group(proc.pid, self.stop_grace_s, proc)
            out = self._outcome(run_dir, proc.returncode, t0, "interrupted by the user (Ctrl-C / SIGTERM)")
            out.status = INTERRUPTED
            raise RunInterrupted(out) from None
        finally:
            reader.close()
        out = self._outcome(run_dir, rc, t0, note)
        curve.poll()
        out.hung, out.curve = hung, list(curve.points)
        if pruned:
            out.status, out.note = PRUNED, pruned
        out.launch = reader.result
        if out.launch:
            out.summary["launch"] = out.launch
        if note:
            out.status = TIMEOUT
        return out

    @staticmethod
    def _wait_curve(proc: subprocess.Popen, timeout_s: float, curve: CurveReader,
              on_curve: Optional[Callable[[float, float], str]], grace_s: float) -> tuple[int, str]:
        """proc.wait(timeout_s), handing each new point of the learning curve to on_curve meanwhile: (exit code,
        why on_curve stopped the run or '')."""
        if on_curve is None:
            return proc.wait(timeout=timeout_s), ""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                rc = proc.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise
                rc = None
            for f, loss in curve.poll():
                why = on_curve(f, loss)
                if why and rc is None:
                    stop_group(proc.pid, grace_s, proc)
                    return proc.returncode, why
            if rc is not None:
                return rc, ""

    def _score(self, out: Outcome, scorer: Scorer) -> None:
        """The scorer's val_bpb (or `tampered` with the reason) replaces whatever the train process reported."""
        out.summary["val_bpb"] = float("nan")
        if out.status not in (OK, STALLED):
            return
        why = self._tampering(out)
        if why.startswith(OVERRUN) and counted_in_process(out.launch, clock_start(out.run_dir / "run.log"),
                                                           out.summary, self.cores, self.budget):
            verdict = {"status": CRASH, "val_bpb": float("nan"), "reason": (
                f"over its budget, as the harness's own clock counted too: {why[len(OVERRUN):]}; the loop stops "
                "between steps, so the model's construction and each step must fit in what is left: make them cheaper")}
        else:
            cost = training_cost(counted_cpu(out.launch, clock_start(out.run_dir / "run.log")),
                                 float(out.summary.get("total_tokens_M") or 0.0) * 1e6,
                                 self.host_floor() if self.host_floor is not None else None)
            out.summary["train_cost"] = cost  # the rescore and the held-out scoring bound the hosts by it too
            verdict = {"status": TAMPERED, "val_bpb": float("nan"), "reason": why} if why else \
                scorer.score(out.checkpoint, cost=cost)
        atomic_write(out.run_dir / "score.json", json.dumps(verdict, indent=2))
        apply_verdict(out.summary, verdict)
        if verdict.get("status") != OK:
            out.status, out.note = out.summary["status"], out.summary["error"]
        # summary.json carries the scorer's figure (what the train process wrote there is replaced)
        atomic_write(out.run_dir / "summary.json", json.dumps(out.summary, indent=2, default=str))

    def rescore(self, out: Outcome) -> dict:
        """The checkpoint of a finished run scored again, in a fresh scorer process (the plausibility gate).
        Without checkpoints (the tests' stand-in train) the run's own figure is all there is."""
        if not self.score_checkpoints:
            return {"status": OK, "val_bpb": out.val_bpb}
        return Scorer(self.cwd, out.run_dir / "rescore.log", self.env, self.cpus,
                      spec=self.eval_spec).start().score(out.checkpoint, cost=out.summary.get("train_cost"))

    def _tampering(self, out: Outcome) -> str:
        """What the runner itself saw that the run's report cannot explain: '' when nothing."""
        if not (out.run_dir / CHECKPOINT).is_file():
            return "the run finished without saving its checkpoint, so its score cannot be checked"
        if out.launch is not None and self.score_checkpoints:
            why = frozen_mismatch(out.launch, out.run_dir / FROZEN)
            if why:
                return why
            if self.budget is not None:
                why = device_overrun(out.launch, clock_start(out.run_dir / "run.log"), self.budget, self.cores)
                if why:
                    return OVERRUN + why
        changed = worktree_changes(self.cwd)
        if changed:
            return f"the run changed files of the code it ran from ({changed}): the research code may not write files"
        return ""

    def _outcome(self, run_dir: Path, rc: Optional[int], t0: float, note: str) -> Outcome:
        summary = read_summary(run_dir)
        status = str(summary.get("status") or "")
        if not status:
            status = CRASH
            note = note or (f"exit code {rc} without summary.json" if rc != 0 else "exited 0 but wrote no summary.json")
        return Outcome(status=status, run_dir=run_dir, summary=summary, returncode=rc,
                       wall_seconds=time.monotonic() - t0, log_tail=tail(run_dir / "run.log"), note=note)


class Report:
    """Reads the launcher's one JSON line from the read end of its pipe, in a thread (the pipe never fills)."""

    def __init__(self, fd: int):
        self.result: Optional[dict] = None
        self._f = os.fdopen(fd, "rb")
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        try:
            data = self._f.read()
            lines = [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]
            self.result = json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            self.result = None

    def close(self) -> None:
        self._t.join(timeout=30)
        try:
            self._f.close()
        except OSError:
            pass


def hung_not_starved(sched: Optional[dict], wall: float) -> bool:
    """A run at its timeout that spent under STARVED_SHARE of the wall time waiting for a CPU was not starved by the
    machine: it hung (asleep, deadlocked) or ran on by itself. False where the kernel does not say (then the
    machine gets the benefit of the doubt: the run is re-run, then undecided)."""
    return sched is not None and wall > 0 and sched["waiting"] < STARVED_SHARE * wall


def worktree_changes(cwd: Path) -> str:
    """Tracked files modified and untracked files added in the git checkout `cwd` ('' if clean or not git)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=cwd, capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [ln[3:] for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else []
    return ", ".join(lines[:5]) + (" ..." if len(lines) > 5 else "")


def attempt_name(exp: str, attempt: int) -> str:
    """The run name (and run dir) of an experiment's attempt: exp-004, then exp-004-a2, ..."""
    return exp if attempt <= 1 else f"{exp}-a{attempt}"


def is_train_process(pid: int, run_dir: str) -> bool:
    """Is pid the train process of run_dir (and not some unrelated process that reused the pid)?"""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # no /proc (macOS)
        cmd = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True).stdout
    return "src.train" in cmd and (not run_dir or run_dir in cmd)
