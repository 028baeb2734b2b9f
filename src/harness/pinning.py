"""CPU pinning: a child process kept to a set of cores (a lab worker's device slot, Linux).

The harness scorer pins itself with it, and the lab's runner pins the train process it starts;
both call it between fork and exec.

Usage: subprocess.Popen(cmd, preexec_fn=lambda: pin((0, 1)))
"""
from __future__ import annotations

import os


def pin(cpus: tuple) -> None:
    """In a child between fork and exec: keep it to `cpus` (a lab worker's cores). Where the OS cannot
    (macOS) or a core was taken away since the slots were planned, it runs unpinned rather than not at all."""
    try:
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError):
        pass
