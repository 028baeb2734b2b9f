"""How the CPU's OpenMP threads wait: chosen so that a neighbour on the cores cannot change what training costs.

The budget on CPU is CPU time (src/harness/budget.py). OpenMP threads that spin while they wait for
work burn CPU doing nothing, and far more of it when another process holds the cores (measured here:
3.6x the CPU for the same training beside one busy process). Threads that sleep when idle cost the
same CPU quiet or not. `apply()` sets the defaults below for the training process before torch is
imported, unless the user set them; bench/omp_policy.py measures the choice.

Tried and rejected: a short spin (GOMP_SPINCOUNT=10000) made a fixed-token run 13% faster in wall time
quiet and looked neutral beside a busy process in bench/omp_policy.py, but the default 30-s run beside one
busy process per core then trained 20% fewer tokens in its counted 30 s (0.506M against 0.631M quiet,
val_bpb +0.15; PASSIVE in the same sitting: 0.65M either way), `python bench/budget_load.py runs`
(docs/LOG.md, 2026-12-07 seventh session).

Usage: from src.harness import threads; threads.apply()   (before `import torch`)
"""
from __future__ import annotations

import os

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply(environ=os.environ) -> dict:
    """Set the defaults that are not set already; returns the settings in force."""
    for k, v in DEFAULTS.items():
        environ.setdefault(k, v)
    return {k: environ[k] for k in DEFAULTS}
