"""How the training process's OpenMP threads wait (src/harness/threads.py): they sleep when idle by default, the
user's settings untouched, and the setting reaches a real training process.

Run: python -m pytest -q tests/harness/test_threads.py
"""
from __future__ import annotations

import os
import subprocess
import sys

from src.harness import threads
from src.harness.paths import REPO


def test_threads_sleep_when_idle_by_default_and_what_the_user_set_is_kept():
    env: dict = {}
    assert threads.apply(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.apply(mine) == {"OMP_WAIT_POLICY": "ACTIVE"} and mine == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_training_module_sets_it_in_its_own_process():
    """Importing the training module (what `python -m src.train` does first) sets the wait policy in its process
    (src/harness/train.py calls threads.apply() on the line before `import torch`: libgomp reads it when it loads)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", "import os, sys; import src.harness.train; "
                          "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["PASSIVE", "True"]
