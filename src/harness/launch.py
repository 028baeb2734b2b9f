"""The launcher: runs one training process and counts the CPU time of its whole process tree from outside it.

The lab's runner starts `python -m src.harness.launch --report-fd N [--freeze CKPT FROZEN] -- <train command>`.
This small process (no torch, no research code) is the training process's parent and, on Linux, the
subreaper of everything below it (PR_SET_CHILD_SUBREAPER): any process the training process starts,
orphaned or not, ends up reaped here or is still visible here, so its CPU time is counted.

--freeze: the training process stops itself (SIGSTOP, with $OVERNIGHT_FREEZE=1) once its checkpoint is
written. Then, with the whole tree stopped, the launcher reads the tree's CPU seconds from the kernel
(/proc/<pid>/stat: utime + stime + cutime + cstime of every process, plus what this process reaped,
and the training process's main thread's own CPU seconds),
copies the checkpoint to FROZEN with its sha256, and lets the tree go on. What the training process
does after that (logging, summary) cannot change what is scored, nor the count at the freeze.

At the end the launcher kills what is left of the tree, reaps it, writes one JSON line on fd N (which
the training process never holds) and exits with the training process's exit code:
    {"returncode", "cpu_total", "freeze": {"cpu", "main_cpu", "wall", "processes", "sha256", "bytes"} | null}
("main_cpu": CPU seconds of the training process's main thread, which runs the training loop; null off Linux.)

Usage: python -m src.harness.launch --report-fd 5 --freeze run/checkpoint.pt run/checkpoint.frozen.pt -- python -m src.train ...
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

FREEZE_ENV = "OVERNIGHT_FREEZE"  # set for the training process: stop yourself after the checkpoint is written
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """The child processes of `pid` (living or zombie), from /proc (Linux), else from ps."""
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                kids += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                pass
        return kids
    except OSError:
        pass
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    return [int(a) for a, b in (ln.split() for ln in out.splitlines() if ln.strip()) if int(b) == pid]


def tree(pid: int) -> list[int]:
    """Every process below `pid`, depth first."""
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo += children(p)
    return out


def cpu_of(pid: int) -> float:
    """CPU seconds of a process (all its threads, user + sys) and of the children it reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK  # utime stime cutime cstime (fields 14-17)
    except (OSError, ValueError, IndexError):
        pass
    try:  # macOS: ps gives the cumulative CPU time of a process and its dead children
        t = subprocess.run(["ps", "-o", "cputime=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        parts = [float(x) for x in t.replace("-", ":").split(":")]
        secs = 0.0
        for x in parts:
            secs = secs * 60 + x
        return secs
    except (OSError, ValueError):
        return 0.0


def waited(pids: list[int]) -> Optional[dict]:
    """What the kernel says the threads of `pids` did with their time (Linux /proc/<pid>/task/*/schedstat):
    {"cpu": seconds on a CPU, "waiting": seconds runnable but waiting for a CPU (the machine's doing)}.
    None where the kernel does not say (no schedstat, macOS). A process that sleeps or waits on a lock is in
    neither figure: a hang is told from a starved run by `waiting`."""
    cpu = wait = 0.0
    seen = False
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                run_ns, wait_ns = Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[:2]
            except (OSError, ValueError):
                continue
            cpu, wait, seen = cpu + int(run_ns) / 1e9, wait + int(wait_ns) / 1e9, True
    return {"cpu": round(cpu, 3), "waiting": round(wait, 3)} if seen else None


def thread_cpu(pid: int, tid: int) -> Optional[float]:
    """CPU seconds of one thread (the kernel's sum_exec_runtime, /proc/<pid>/task/<tid>/schedstat), or None."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def reaped_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def copy_hashed(src: Path, dst: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as f, open(tmp, "wb") as g:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            g.write(chunk)
            n += len(chunk)
    os.replace(tmp, dst)
    return h.hexdigest(), n


class Launch:
    def __init__(self, cmd: list[str], freeze: Optional[tuple[Path, Path]]):
        self.cmd, self.freeze_paths = cmd, freeze
        self.freeze: Optional[dict] = None
        self.t0 = time.monotonic()

    def start(self) -> subprocess.Popen:
        env = dict(os.environ)
        if self.freeze_paths:
            env[FREEZE_ENV] = "1"
        return subprocess.Popen(self.cmd, env=env, preexec_fn=lambda: _prctl(PR_SET_PDEATHSIG, signal.SIGKILL))

    def on_freeze(self, train: int) -> None:
        """The training process stopped itself: stop the rest of the tree, count it, copy the checkpoint, resume."""
        me = os.getpid()
        others = [p for p in tree(me) if p != train]
        signal_all(others, signal.SIGSTOP)
        procs = tree(me)
        # what we reaped, plus every process still in the tree (each one's own time and what it reaped)
        cpu = reaped_cpu() + sum(cpu_of(p) for p in procs)
        ckpt, frozen = self.freeze_paths
        sha, size = (copy_hashed(ckpt, frozen) if ckpt.is_file() else ("", 0))
        main = thread_cpu(train, train)  # the training loop's thread (the process's main thread)
        self.freeze = {"cpu": round(cpu, 3), "main_cpu": None if main is None else round(main, 6),
                       "wall": round(time.monotonic() - self.t0, 3),
                       "processes": len(procs), "sha256": sha, "bytes": size}
        signal_all(procs, signal.SIGCONT)

    def run(self) -> tuple[int, dict]:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        for s in (signal.SIGINT, signal.SIGTERM):  # the runner stops the process group: the tree ends, we report
            signal.signal(s, lambda *_: None)
        proc = self.start()
        rc = None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WUNTRACED)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid != proc.pid:
                continue  # an orphan reaped: its CPU time is in our children's usage now
            if os.WIFSTOPPED(status):
                if self.freeze_paths and self.freeze is None and os.WSTOPSIG(status) == signal.SIGSTOP:
                    self.on_freeze(pid)
                else:
                    signal_all([pid], signal.SIGCONT)
                continue
            rc = os.waitstatus_to_exitcode(status)
            proc.returncode = rc
            left = tree(os.getpid())
            signal_all(left, signal.SIGKILL)  # what the training process left running ends with it
        return (rc if rc is not None else 1), {"returncode": rc, "cpu_total": round(reaped_cpu(), 3),
                                              "freeze": self.freeze}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: python -m src.harness.launch --report-fd N [--freeze CKPT FROZEN] -- <command>")
    i = argv.index("--")
    ap = argparse.ArgumentParser(prog="python -m src.harness.launch")
    ap.add_argument("--report-fd", type=int, required=True)
    ap.add_argument("--freeze", nargs=2, metavar=("CHECKPOINT", "FROZEN"))
    args = ap.parse_args(argv[:i])
    report = os.fdopen(args.report_fd, "w")
    rc, result = Launch(argv[i + 1:], tuple(map(Path, args.freeze)) if args.freeze else None).run()
    report.write(json.dumps(result) + "\n")
    report.close()
    if rc < 0:  # ended by a signal: end the same way, so that the runner sees what the training process saw
        signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
