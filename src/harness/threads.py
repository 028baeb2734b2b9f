"""How the CPU's OpenMP threads wait: chosen so that a neighbour on the cores cannot change what training costs.

The budget on CPU is CPU time (src/harness/budget.py). OpenMP threads that spin while they wait for
work burn CPU doing nothing, and far more of it when another process holds the cores (libgomp's default,
300k spins before it sleeps: 3.6x the CPU for the same training beside one busy process; 100k spins:
1.7x). Threads that sleep at once (OMP_WAIT_POLICY=PASSIVE) cost about the same CPU quiet or not, but
every wait pays a wake-up: the same training took 13.7 s of wall and 12.2 counted s. A short spin
(GOMP_SPINCOUNT=10000, a few microseconds) rides out most waits and sleeps through the long ones: 11.9 s
of wall and 11.6 counted s quiet, 12.1 counted s beside one busy process per core (PASSIVE: 11.6)
(`python bench/omp_policy.py`, 262,144 tokens at 2 threads, medians of 2; docs/LOG.md). `apply()` sets
the defaults below for the training process before torch is imported, unless the user set them or set
OMP_WAIT_POLICY (which decides the spinning itself).

Usage: from src.harness import threads; threads.apply()   (before `import torch`)
"""
from __future__ import annotations

import os

DEFAULTS = {"GOMP_SPINCOUNT": "10000"}
POLICY = "OMP_WAIT_POLICY"  # when set (ACTIVE / PASSIVE), libgomp's spin count follows it and ours is not set


def apply(environ=os.environ) -> dict:
    """Set the defaults that are not set already (none while OMP_WAIT_POLICY is set); returns the settings in force."""
    if not environ.get(POLICY):
        for k, v in DEFAULTS.items():
            environ.setdefault(k, v)
    return {k: environ[k] for k in (POLICY, *DEFAULTS) if environ.get(k)}
