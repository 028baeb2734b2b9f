"""The one place that decides device, autocast dtype, compilation and peak FLOP/s.

`auto` picks cuda > mps > cpu. On CPU, bf16 autocast is chosen only when a quick
matmul probe shows the CPU's bf16 units beat fp32 (AMX, AVX512-BF16). Peak FLOP/s for
MFU comes from the config, a table of known GPUs, or a one-time measurement cached
under the data cache dir. Compilation (`device.compile`, `compile_mode`, `compile_scope`)
keeps Inductor's caches in one directory across runs (`device.compile_cache`), so the
experiments of a session after the first reuse the kernels it compiled.

Usage: rt = resolve(cfg.device); fwd = compile_model(model, rt); with rt.autocast(): logits = fwd(x)
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from src.harness.config import DeviceConfig
from src.harness.paths import cache_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # Inductor's (and, below it, Triton's) on-disk cache
GPU_PEAK_BF16 = {"H200": 989.5e12, "H100": 989.5e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                 "4090": 165e12, "3090": 71e12, "B200": 2250e12}
PROBE_CACHE = cache_dir() / "device_probe.json"


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype for matmuls (fp32 = no autocast)
    compile: bool
    peak_flops: float  # FLOP/s at `dtype`, for MFU
    name: str  # human-readable device name
    compile_mode: str = "default"  # torch.compile mode
    compile_scope: str = "model"  # model | blocks
    memory_limit_mb: Optional[float] = None  # device.memory_limit_mb (None: the whole device)

    @property
    def eval_batch_tokens(self) -> int:
        """Tokens per evaluation forward pass. On CPU small batches stay in cache: 4,096 tokens scored
        the validation split 2.5x faster than 65,536 on a 2-core Xeon; GPUs want large batches."""
        return 4096 if self.device.type == "cpu" else 131072

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in DTYPES.items()}[self.dtype]

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_mb(self) -> float:
        """Peak memory of the run: CUDA allocator peak, MPS driver allocation, or CPU process max RSS."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        if self.device.type == "mps":
            return torch.mps.driver_allocated_memory() / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**20 if platform.system() == "Darwin" else 2**10)


_T_IMPORTED = time.time()


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc, interpreter start-up and imports included;
    elsewhere: since this module was imported)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime, in clock ticks since boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time() - _T_IMPORTED


def pick_device(kind: str) -> torch.device:
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device.type={kind!r}; expected auto, cpu, cuda or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA GPU; use device=auto or device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device=mps was asked for but this torch build has no MPS backend; use device=auto or device=cpu")
    return torch.device(kind)


def _matmul_flops(dtype: torch.dtype, n: int = 1024, reps: int = 6) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _measure_probe() -> dict:
    """fp32 and bf16 matmul FLOP/s. bf16 is first tried on a small matrix: a CPU without bf16 units runs it
    100x slower than fp32 (here 0.46 against 67 GFLOP/s: one 1024^3 product took ~5 s), and then the small figure,
    under a tenth of fp32's, is answer enough (fp32 is chosen unless bf16 is 1.2x faster)."""
    fp32 = _matmul_flops(torch.float32)
    bf16 = _matmul_flops(torch.bfloat16, n=256, reps=3)  # a small product runs below a CPU's peak, never above it
    if bf16 > 0.1 * fp32:  # in the running (or unsure): measure it like fp32
        bf16 = _matmul_flops(torch.bfloat16)
    return {"fp32": fp32, "bf16": bf16}


def cpu_probe() -> dict:
    """Measured CPU matmul FLOP/s for fp32 and bf16, cached per CPU, thread count and torch version (one file holds
    every key: runs at one thread and at two on the same machine do not measure again in turn)."""
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}"
    try:
        cached = json.loads(PROBE_CACHE.read_text())
        probes = cached.get("probes", {}) if isinstance(cached, dict) else {}
    except (OSError, ValueError):
        probes = {}
    if isinstance(probes.get(key), dict):
        return {"key": key, **probes[key]}
    probe = _measure_probe()
    try:
        PROBE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        try:  # another process may have added its key meanwhile
            probes = json.loads(PROBE_CACHE.read_text()).get("probes", {})
        except (OSError, ValueError, AttributeError):
            pass
        tmp = PROBE_CACHE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"probes": {**probes, key: probe}}))
        tmp.replace(PROBE_CACHE)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return {"key": key, **probe}


def resolve(cfg: DeviceConfig) -> Runtime:
    """The device, autocast dtype, compilation and peak FLOP/s a run uses (cfg is a validated DeviceConfig)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.type)
    compile_ = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")
    probe = None
    if device.type == "cpu":
        probe = cpu_probe() if (cfg.dtype == "auto" or cfg.peak_flops is None) else None
        if cfg.dtype == "auto":
            dtype = torch.bfloat16 if probe["bf16"] > 1.2 * probe["fp32"] else torch.float32
        else:
            dtype = DTYPES["bf16" if cfg.dtype == "mixed" else cfg.dtype]
        name = platform.processor() or platform.machine() or "cpu"
    elif device.type == "cuda":
        reduced = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        dtype = DTYPES[reduced if cfg.dtype in ("auto", "mixed") else cfg.dtype]
        name = torch.cuda.get_device_name(device)
    else:  # mps: bf16 autocast (macOS 14+); fp16 would need a grad scaler
        dtype = DTYPES["bf16" if cfg.dtype in ("auto", "mixed") else cfg.dtype]
        name = "mps"
    peak = cfg.peak_flops
    if peak is None:
        if device.type == "cpu":
            peak = probe["bf16" if dtype == torch.bfloat16 else "fp32"]
        elif device.type == "cuda":
            peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 0.0)
        else:
            peak = 0.0  # unknown: MFU is reported as 0 unless device.peak_flops is set
    if compile_:
        use_compile_cache(cfg.compile_cache)
    return Runtime(device=device, dtype=dtype, compile=compile_, peak_flops=float(peak), name=name,
                   compile_mode=cfg.compile_mode, compile_scope=cfg.compile_scope,
                   memory_limit_mb=cfg.memory_limit_mb)


def use_compile_cache(path: Optional[str] = None) -> Path:
    """Point Inductor's on-disk caches (FX graphs, AOT autograd, compiled kernels, autotuning) at a directory that
    outlives the run, so a session's later runs reuse what its first one compiled: `path`, else <data cache>/compile.
    Inductor reads $TORCHINDUCTOR_CACHE_DIR whenever it looks a cache up (importing torch._dynamo sets it to
    /tmp/torchinductor_<user>), so setting it before the first compile is enough; its keys cover code, shapes
    and versions, so one directory serves every model and torch version."""
    target = Path(path or cache_dir() / "compile").expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    os.environ[COMPILE_CACHE_ENV] = str(target)
    return target


def compile_model(model: torch.nn.Module, rt: Runtime):
    """What the training loop calls: the model itself (eager), the model compiled as one graph, or the model with
    each of its repeated blocks compiled (scope `blocks`: every module in an nn.ModuleList directly under the model,
    so no attribute name is asked of it; one block's graph is compiled once per distinct block shape, e.g. window
    and value-embedding variants; embeddings, head and soft-cap stay eager)."""
    if not rt.compile:
        return model
    if rt.compile_scope == "blocks":
        for child in model.children():
            if isinstance(child, torch.nn.ModuleList):
                for block in child:
                    block.compile(dynamic=False, mode=rt.compile_mode)
        return model
    return torch.compile(model, dynamic=False, mode=rt.compile_mode)
