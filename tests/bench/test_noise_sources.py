"""bench/noise_sources.py on ledgers written by the lab's own Ledger: it must find the step count behind the spread
of identical runs and its worth per step, and tell pairs that share their noise from runs that share nothing.

Run: python -m pytest -q tests/bench/test_noise_sources.py
"""
from __future__ import annotations

import random
import re
import subprocess
import sys

from src.lab.decisions import BASELINE, CONFIRM
from src.lab.ledger import COLUMNS, Experiment
from tests.support.helpers import REPO


class ledger(list):
    """Rows in the lab's ledger format (Experiment.to_row under the COLUMNS header), written in one go: the
    Ledger's fsync per row costs seconds on a busy disk."""
    def __init__(self, path):
        super().__init__()
        self.path = path

    def write(self):
        self.path.mkdir(parents=True)
        (self.path / "results.tsv").write_text("\t".join(COLUMNS) + "\n" + "".join(e.to_row() for e in self))


def bench(path) -> str:
    return subprocess.run([sys.executable, "bench/noise_sources.py", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True).stdout


def test_the_step_count_explains_the_spread_of_identical_runs(tmp_path):
    rng, runs = random.Random(0), ledger(tmp_path / "steps")
    for i in range(12):  # identical runs: 20 to 22 steps, 0.02 bpb per step, 0.002 of noise besides
        steps = 20 + i % 3
        runs.append(Experiment(exp=f"base-{i + 1}", status=BASELINE, description="baseline", commit="a" * 40,
                               val_bpb=3.6 - 0.02 * (steps - 21) + rng.gauss(0, 0.002), num_steps=steps,
                               training_seconds=29.0, overrides="device=cpu"))
    runs.write()
    out = bench(tmp_path / "steps")
    share = int(re.search(r"step count explains \| (\d+)%", out)[1])
    slope = float(re.search(r"per step more .*? \| ([+-][\d.]+)", out)[1])
    assert share >= 90 and abs(slope + 0.02) < 0.002, out

    pairs = ledger(tmp_path / "pairs")  # each pair shares a drift of 0.02 sigma; its two runs differ by 0.002
    for i in range(1, 7):
        drift = rng.gauss(0, 0.02)
        for side, commit, gain in (("b", "a" * 40, 0.0), ("c", "b" * 40, -0.01)):
            pairs.append(Experiment(exp=f"exp-001-{side}{i}", status=CONFIRM, description="pair", commit=commit,
                                    val_bpb=3.6 + gain + drift + rng.gauss(0, 0.002), num_steps=21,
                                    training_seconds=29.0))
    pairs.write()
    ratio = float(re.search(r"\| pairs exp-001 \| 6 \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", bench(tmp_path / "pairs"))[1])
    assert ratio < 0.1
