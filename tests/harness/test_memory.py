"""Memory: batch.device_tokens=auto, the (simulated on CPU) memory limit, and out-of-memory as the status `oom`.

A GPU's allocator raises torch.OutOfMemoryError past its memory; on CPU device.memory_limit_mb
simulates that (the bytes autograd saves in one forward pass), so the probe and the status are
tested here through the same code paths a GPU takes.

Run: python -m pytest -q tests/harness/test_memory.py   (the real CLI runs are marked slow)
"""
from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from src.harness.config import ModelConfig, OptimizerConfig
from src.harness.device import Runtime
from src.harness.memory import Memory, cache_path, candidates, is_oom, oom_message
from src.research.model import GPT, GPTConfig
from src.research.optim import build_optimizer
from src.research.step import train_step
from tests.support.helpers import TINY, read_summary, run_cli


def cpu(limit_mb=None) -> Runtime:
    return Runtime(device=torch.device("cpu"), dtype=torch.float32, compile=False, peak_flops=0.0, name="cpu-test",
                   memory_limit_mb=limit_mb)


def tiny_step(batch: int, seq: int = 128):
    """One real training step (the research surface's model, optimizer and recipe) of the TINY model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_model_config(ModelConfig(depth=2, sequence_len=seq), 257))
    model.init_weights()
    opt = build_optimizer(model, OptimizerConfig())
    x = torch.randint(0, 257, (batch, seq))
    train_step(model, opt, lambda: (x, x), step=0, progress=0.0, lr_mult=1.0, accum=1, optim_cfg=OptimizerConfig(),
               autocast=nullcontext)


def test_candidates_divide_the_step_so_total_tokens_stays_exact_largest_first():
    assert candidates(8192, 128) == [64, 32, 16, 8, 4, 2, 1]
    assert candidates(3 * 2048, 2048) == [3, 1]
    assert candidates(524288, 2048)[:3] == [256, 128, 64]


def test_out_of_memory_is_recognised_also_when_wrapped_and_nothing_else_is():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"))
    try:
        try:
            raise torch.OutOfMemoryError("boom")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as wrapped:
        assert is_oom(wrapped)
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of range"))


def test_the_oom_message_is_one_line_naming_the_fix():
    rt = cpu()
    fixed = oom_message(rt, 64, 128, auto=False)
    assert "\n" not in fixed and "64 x 128" in fixed
    assert "batch.device_tokens=auto" in fixed and "batch.device_tokens=4096" in fixed
    assert "batch.device_tokens=4096" in oom_message(rt, 64, 128, auto=True)
    assert "model.sequence_len" in oom_message(rt, 1, 128, auto=True)  # nothing smaller to try: a smaller model


def test_the_simulated_cpu_limit_raises_out_of_memory_when_a_forward_keeps_too_much():
    mem = Memory(cpu(limit_mb=30))
    assert mem.simulated and mem.limit == 30 * 2**20
    with mem.guard():
        tiny_step(2)  # about 6 MiB saved for backward
    with pytest.raises(torch.OutOfMemoryError, match="simulated"), mem.guard():
        tiny_step(64)  # about 160 MiB
    assert not Memory(cpu()).simulated  # no limit: nothing is counted


@pytest.mark.slow  # real forward/backward passes at several micro-batch sizes
def test_the_probe_takes_the_largest_micro_batch_that_fits_and_caches_it():
    mem, calls = Memory(cpu(limit_mb=1)), []

    def try_step(b: int) -> None:
        calls.append(b)
        if b > 5:
            raise torch.OutOfMemoryError(f"{b} sequences do not fit")

    key = {"model": "test-shape", "total": 64}
    assert mem.largest_fitting(key, candidates(64 * 128, 128), try_step) == (4, [64, 32, 16, 8, 4])
    assert calls == [64, 32, 16, 8, 4]
    assert mem.largest_fitting(key, candidates(64 * 128, 128), try_step) == (4, [])  # cached: no probe
    assert calls == [64, 32, 16, 8, 4] and any(v == 4 for v in json.loads(cache_path().read_text()).values())
    assert mem.largest_fitting({**key, "model": "other"}, [2, 1], try_step) == (2, [2])  # another shape: probed


def test_an_error_in_the_probe_that_is_not_out_of_memory_is_raised_not_taken_for_a_smaller_batch():
    def broken(b: int) -> None:
        raise ValueError("shape mismatch in the patched model")

    with pytest.raises(ValueError, match="shape mismatch"):
        Memory(cpu(limit_mb=1)).largest_fitting({"model": "broken"}, [4, 2, 1], broken)


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_auto_picks_the_largest_micro_batch_under_the_limit_and_keeps_total_tokens(tmp_path):
    args = [*TINY, "device=cpu", "device.dtype=fp32", "budget.mode=tokens", "budget.tokens=16384",
            "tracking.enabled=false", "batch.device_tokens=auto", "device.memory_limit_mb=30"]
    run_cli("src.train", *args, f"hydra.run.dir={tmp_path / 'a'}")
    s = read_summary(tmp_path / "a")
    B, accum = s["device_batch_size"], s["grad_accum_steps"]
    assert s["status"] == "ok" and s["device_tokens_auto"] is True
    assert 1 < B < 64 and B * accum * 128 == 8192  # batch.total_tokens of the cpu preset, kept exactly
    assert s["total_tokens_M"] == pytest.approx(2 * 8192 / 1e6)
    assert f"batch.device_tokens=auto: {B} sequences of 128 tokens per micro-batch (probed 64" in \
        (tmp_path / "a" / "train.log").read_text()
    mem = Memory(cpu(limit_mb=30))
    with mem.guard():
        tiny_step(B)  # it fits ...
    with pytest.raises(torch.OutOfMemoryError), mem.guard():
        tiny_step(2 * B)  # ... and the next candidate up does not: the largest
    run_cli("src.train", *args, f"hydra.run.dir={tmp_path / 'b'}")  # same shape and device: the cached answer
    assert read_summary(tmp_path / "b")["device_batch_size"] == B
    assert "micro-batch (cached in" in (tmp_path / "b" / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_running_out_of_memory_is_the_status_oom_with_the_fix_in_one_line_not_a_traceback(tmp_path):
    proc = run_cli("src.train", *TINY, "device=cpu", "device.dtype=fp32", "budget.seconds=30",
                   "tracking.enabled=false", "device.memory_limit_mb=30", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    s = read_summary(tmp_path)
    assert s["status"] == "oom" and s["num_steps"] == 0
    assert "\n" not in s["error"] and "batch.device_tokens=auto" in s["error"] and "64 x 128" in s["error"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "run failed (oom): out of memory" in (tmp_path / "train.log").read_text()
