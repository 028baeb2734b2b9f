"""bench/gpu.py: a clear exit without CUDA, its rows, and its pipeline end to end on CPU (--smoke).

Run: python -m pytest -q tests/bench/test_gpu.py   (the smoke run is marked slow)
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.support.helpers import REPO

BENCH = [sys.executable, str(REPO / "bench" / "gpu.py")]


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # the real script, a subprocess importing torch
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_with_a_clear_message_and_runs_nothing():
    p = bench()
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr and "--smoke" in p.stderr and not p.stdout


def test_the_rows_cover_the_issues_table_on_cuda_with_the_bpe_data():
    p = bench("--list")
    assert p.returncode == 0
    for name in ("h100-sssl-cold", "h100-sssl", "h100-L", "h100-sssl-blocks", "h100-sssl-eager", "small",
                 "small-cudagraphs"):
        assert f"\n{name} " in "\n" + p.stdout
    assert p.stdout.count("device=cuda") == 7 and "model.window_pattern=L" in p.stdout
    assert "budget.seconds=90" in p.stdout and "data.tokenizer=bpe data.vocab_size=8192" in p.stdout
    assert "device.compile_mode=reduce-overhead" in p.stdout and "device.compile=false" in p.stdout
    assert bench("--rows", "h100-sssl,nope").returncode == 2


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_smoke_mode_runs_the_pipeline_on_cpu_and_prints_the_table(tmp_path):
    p = bench("--smoke", "--rows", "small", "--out", str(tmp_path), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    table = p.stdout[p.stdout.index("\nrun "):]
    assert "tok/s" in table and "MFU%" in table and "warm-up s" in table and "score s" in table and "fixed s" in table
    rows = [line for line in table.splitlines() if line.startswith("small ")]
    assert len(rows) == 1 and " ok " in rows[0] and (tmp_path / "small" / "summary.json").is_file()
    assert "small: fixed cost" in p.stdout and "CUDA graphs" not in p.stdout  # verdicts only for rows that ran
