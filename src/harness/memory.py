"""Device memory: the largest micro-batch that fits, the memory limit, and out-of-memory as a status.

`batch.device_tokens=auto` runs one real training step (forward, backward, optimizer) of a
throwaway copy of the model at each candidate micro-batch, largest first, and takes the first
that fits with HEADROOM of the limit to spare. The candidates divide total_tokens / sequence_len
sequences, so `batch.total_tokens` stays exact and gradient accumulation rises to make up the rest.
The probe runs eagerly (a compiled step needs no more memory) and its answer is cached per model
shape, batch, device, dtype, limit and torch version in <data cache>/microbatch.json.

The limit is `device.memory_limit_mb`, else the whole device. CUDA and MPS enforce it in their
allocators (set_per_process_memory_fraction). On CPU it is simulated: the bytes autograd saves for
backward in one micro-batch's forward pass (activations and the weights they use: what grows with
the micro-batch) may not exceed it, else torch.OutOfMemoryError, as a GPU would raise.

An out-of-memory anywhere in a run becomes the status `oom` with the fix in one line (oom_message).

Usage: mem = Memory(rt); B, tried = mem.largest_fitting(key, candidates(total, T), try_step)
       with mem.guard(): step()
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from src.harness.device import Runtime
from src.harness.paths import cache_dir

HEADROOM = 0.9  # a probe must peak below this share of the limit: fragmentation, compiled kernels' workspaces
CPU_DEFAULT_SHARE = 0.5  # without device.memory_limit_mb, the CPU probe keeps activations under half the RAM
CACHE_FILE = "microbatch.json"


def candidates(total_tokens: int, seq_len: int) -> list[int]:
    """Sequences per micro-batch that keep total_tokens exact, largest first: the divisors of total / seq_len."""
    n = total_tokens // seq_len
    return [b for b in range(n, 0, -1) if n % b == 0]


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error, also when wrapped (a compile that ran out of memory, an MPS message)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def oom_message(rt: Runtime, batch_size: int, seq_len: int, auto: bool) -> str:
    """What ran out, where, and the fix, in one line."""
    where = f"out of memory on {rt.name} at {batch_size} x {seq_len} tokens per micro-batch"
    if batch_size <= 1:
        return (f"{where}, and one sequence is the smallest micro-batch: make the model smaller (model.depth, "
                "model.aspect_ratio) or the context shorter (model.sequence_len)")
    smaller = f"batch.device_tokens={batch_size // 2 * seq_len}" if batch_size % 2 == 0 else \
        f"a smaller multiple of model.sequence_len={seq_len} in batch.device_tokens"
    if auto:
        return f"{where}, which the automatic micro-batch picked: set {smaller} (batch.total_tokens stays the same)"
    return (f"{where}: set batch.device_tokens=auto (the largest micro-batch that fits; batch.total_tokens is kept "
            f"by more gradient accumulation) or {smaller}")


class _SavedBytes:
    """The CPU simulation: counts the bytes autograd saves for backward since the last micro-batch began."""

    def __init__(self, limit: int):
        self.limit, self.bytes = limit, 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        if self.bytes > self.limit:
            raise torch.OutOfMemoryError(
                f"CPU out of memory (simulated by device.memory_limit_mb): the forward pass keeps over "
                f"{self.limit / 2**20:.0f} MiB for backward")
        return t


class Memory:
    """The run's memory limit on its device, the guard that enforces it, and the micro-batch probe."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.device_bytes = _device_bytes(rt.device)
        configured = int(rt.memory_limit_mb * 2**20) if rt.memory_limit_mb else None
        self.limit = configured or self.device_bytes  # bytes; None: unknown
        self.simulated = rt.device.type == "cpu" and configured is not None
        self._meter: Optional[_SavedBytes] = None
        if configured and rt.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(min(1.0, configured / self.device_bytes), rt.device)
        elif configured and rt.device.type == "mps":
            torch.mps.set_per_process_memory_fraction(min(1.0, configured / self.device_bytes))

    @contextlib.contextmanager
    def guard(self, limit: Optional[int] = None) -> Iterator[None]:
        """Enforce the simulated CPU limit (or `limit`) in this block; elsewhere the allocator does, for free."""
        limit = limit or (self.limit if self.simulated else None)
        if limit is None:
            yield
            return
        self._meter = _SavedBytes(limit)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._meter.pack, lambda t: t):
                yield
        finally:
            self._meter = None

    def new_micro_batch(self) -> None:
        """A micro-batch begins: the previous one's saved tensors were freed by its backward."""
        if self._meter is not None:
            self._meter.bytes = 0

    def _fits(self, batch_size: int, try_step: Callable[[int], None]) -> bool:
        cpu_limit = None
        if self.rt.device.type == "cpu":
            cpu_limit = self.limit if self.simulated else int(CPU_DEFAULT_SHARE * (self.device_bytes or 2**62))
        self.rt.reset_peak_memory()
        try:
            with self.guard(cpu_limit):
                try_step(batch_size)
            self.rt.synchronize()
        except Exception as e:  # only out-of-memory means "does not fit"; anything else is a crash
            if not is_oom(e):
                raise
            return False
        finally:
            gc.collect()
            self.empty_cache()
        if self.rt.device.type in ("cuda", "mps") and self.limit:
            return self.rt.peak_memory_mb() * 2**20 <= HEADROOM * self.limit
        return True

    def empty_cache(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.rt.device.type == "mps":
            torch.mps.empty_cache()

    def largest_fitting(self, key: dict, sizes: list[int], try_step: Callable[[int], None]) -> tuple[Optional[int], list]:
        """The first of `sizes` (largest first) whose training step `try_step(size)` fits (None if none does), and the
        sizes probed to find it ([] when cached under `key` plus the device, dtype, limit and torch version)."""
        full = json.dumps({**key, "device": self.rt.name, "dtype": self.rt.dtype_name, "limit": self.limit,
                           "torch": torch.__version__, "sizes": sizes}, sort_keys=True, default=str)
        path = cache_path()
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        if isinstance(known.get(full), int) and known[full] in sizes:
            return known[full], []
        probed, found = [], None
        for b in sizes:
            probed.append(b)
            if self._fits(b, try_step):
                found = b
                break
        if found is not None:
            known[full] = found
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(known, indent=1))
                tmp.replace(path)
            except OSError:
                pass  # a read-only cache only costs a new probe next time
        return found, probed


def _device_bytes(device: torch.device) -> Optional[int]:
    """The device's memory in bytes: the GPU's, MPS's recommended working set, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "mps":
        return torch.mps.recommended_max_memory()
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cache_path() -> Path:
    """In a folder of its own: the training process's sandbox freezes the cache's top folder (src/harness/landlock.py
    hide()), not what lies in the folders beside the data sets. train.py makes the folder before the sandbox closes."""
    return cache_dir() / "runtime" / CACHE_FILE
