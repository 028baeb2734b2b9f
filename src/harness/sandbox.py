"""The training process's run-time sandbox: the research code starts no processes of its own.

`install()` adds an audit hook (sys.addaudithook: once added, Python code cannot remove it) when the
budget clock starts, before any research code is imported. From then on:
- creating a process (os.fork, os.posix_spawn, os.exec*, os.system, subprocess.Popen, pty.spawn ...)
  while research code (a file under src/research/) is on the calling stack is refused with a
  RuntimeError that says why, unless the code that asks for it (the first frame outside the standard
  library) is torch's compiler toolchain (Inductor runs the C++ compiler when a compiled model first
  runs, which happens inside the research step); the harness's own (git, MLflow) are never refused.
  The static contract keeps research code from calling into the toolchain's internals, and every
  process below the training process is counted anyway (below);
- looking up process-creating C functions through ctypes (fork, clone, execve, posix_spawn, system,
  syscall ...) is refused for everyone.
Threads are allowed: their CPU time is the process's and counts in the budget (src/harness/budget.py).
What an audit hook cannot see (a C extension's own fork, `_posixsubprocess.fork_exec` called directly)
is counted instead: the launcher (src/harness/launch.py) is the subreaper of the whole process tree, so
every process below the training process adds its CPU time to the run's count.

Usage: from src.harness.sandbox import install; install(research_dir)
"""
from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

PROCESS_EVENTS = frozenset({"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                            "subprocess.Popen", "pty.spawn", "os.startfile"})
PROCESS_SYMBOLS = frozenset({"fork", "vfork", "clone", "clone3", "__clone", "posix_spawn", "posix_spawnp",
                             "execve", "execv", "execvp", "execvpe", "execl", "execlp", "execle", "fexecve",
                             "system", "popen", "daemon", "syscall", "_Fork"})
_installed: list[str] = []


def _torch_dirs() -> list[str]:
    """Where torch is installed (without importing it): its package directory, resolved."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted({p for d in spec.submodule_search_locations for p in (d, os.path.realpath(d))})


class SandboxError(RuntimeError):
    """The research code tried to start a process."""


SOCKET_EVENTS = frozenset({"socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.sendto",
                           "socket.sendmsg"})


def install(research_dir: Path, sockets: bool = False, any_process: bool = False) -> None:
    """Refuse, from now on, processes started from research code (once per process); sockets=True: refuse every
    socket too, and any_process=True every process whoever asks (the scorer's model host, src/harness/host.py,
    which needs neither: red team of 2026-12-07, eighth session, forked from a thread running code compiled under
    a non-research file name, and the child's CPU time was not the host's)."""
    if _installed:
        return
    root = str(Path(research_dir).resolve()) + "/"
    _installed.append(root)
    stdlib = tuple({sysconfig.get_paths()["stdlib"] + "/", os.path.dirname(os.__file__) + "/"})
    toolchain = tuple(os.path.join(torch_dir, sub) + "/"
                      for torch_dir in _torch_dirs() for sub in ("_inductor", "_dynamo", "utils/_triton"))

    def research_on_stack() -> str:
        f, asker = sys._getframe(2), ""
        while f is not None:
            name = f.f_code.co_filename
            if not asker and not name.startswith(stdlib) and not name.startswith("<"):
                asker = name
                if name.startswith(toolchain):
                    return ""  # torch's compiler runs its compiler
            if name.startswith(root):
                return name
            f = f.f_back
        return ""

    def hook(event: str, args: tuple) -> None:
        if event in PROCESS_EVENTS:
            where = "the model host" if any_process else research_on_stack()
            if where:
                raise SandboxError(f"the training process may not start processes of its own ({event} from "
                                   f"{where}): their compute would run outside the budget; use the threads of "
                                   "the process (counted) or make the step cheaper")
        elif sockets and event in SOCKET_EVENTS:
            raise SandboxError(f"the model host may not use sockets ({event}): it talks to the scorer only")
        elif event == "ctypes.dlsym" and len(args) > 1 and str(args[1]) in PROCESS_SYMBOLS:  # whoever asks
            raise SandboxError(f"the training process may not reach the C function {args[1]!r} through ctypes: "
                               "processes started that way would run outside the budget")

    sys.addaudithook(hook)
