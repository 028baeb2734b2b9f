"""Device slots: what each worker of a session runs on (search.workers=N), planned before the session exists.

One GPU per worker on CUDA (CUDA_VISIBLE_DEVICES, from search.gpus or every visible GPU); on CPU a
fixed thread count per worker (device.threads; N x threads must fit the cores), each worker pinned to
cores of its own where the OS can (src/harness/pinning.py); under SLURM each run is a job that gets
its own. A machine that cannot give every worker its own slot is refused with what to change.

Usage: slots = plan_slots(cfg)   # [Slot(0, {"OMP_NUM_THREADS": "1"}, "cpu x1 thread (core 0)", (0,)), ...]
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from src.lab.session import SessionError


@dataclass(frozen=True)
class Slot:
    index: int
    env: dict  # what the worker's runs (and scorers) get: CUDA_VISIBLE_DEVICES or the thread count
    label: str  # cuda:1, cpu x1 thread (core 0)
    cpus: tuple = ()  # CPU: the cores its processes are pinned to (train, scorer); () = not pinned


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def device_kind(device_type: str) -> str:
    if device_type != "auto":
        return device_type
    if visible_gpus():
        return "cuda"
    try:
        import torch

        return "mps" if torch.backends.mps.is_available() else "cpu"
    except Exception:
        return "cpu"


def plan_slots(cfg) -> list[Slot]:
    """One device slot per worker; SessionError when the machine cannot give each worker its own."""
    n, threads = cfg.search.workers, cfg.device.threads
    launcher = getattr(getattr(cfg, "launcher", None), "name", "local")
    if launcher == "submitit_slurm":  # each run a job of its own: SLURM gives it its GPU(s) and cores
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
        return [Slot(i, env, f"slurm job {i}") for i in range(n)]
    kind = device_kind(cfg.device.type)
    if kind == "cuda":
        gpus = [str(g) for g in cfg.search.gpus] if cfg.search.gpus else visible_gpus()
        if len(gpus) < n:
            raise SessionError(f"search.workers={n} needs a GPU per worker but {len(gpus)} are available "
                               f"({', '.join(gpus) or 'none'}); set search.workers<={max(1, len(gpus))} or "
                               "search.gpus=[...] (GPU ids, one per worker)")
        return [Slot(i, {"CUDA_VISIBLE_DEVICES": gpus[i]}, f"cuda:{gpus[i]}") for i in range(n)]
    if kind == "mps" and n > 1:
        raise SessionError(f"search.workers={n}: device=mps is one GPU shared by everything on this Mac; run "
                           "search.workers=1 (or device=cpu with device.threads=<k>)")
    cores = cpu_cores()
    if n > 1 and not threads:
        raise SessionError(f"search.workers={n} on CPU needs a fixed thread count per worker: set device.threads=<k> "
                           f"with {n} x k <= {cores} cores (e.g. device.threads={max(1, cores // n)}); runs that each "
                           "use every core slow each other down far more than 2x")
    if n * (threads or 0) > cores:
        raise SessionError(f"search.workers={n} x device.threads={threads} = {n * threads} threads, but this machine "
                           f"has {cores} cores; lower device.threads (at most {max(1, cores // n)}) or search.workers")
    if not threads:  # one worker, every core (the sequential loop's runs, through the pool: launcher=submitit_*)
        return [Slot(0, {}, f"cpu x{cores} (all)")]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # each worker its own cores: one worker's start-up and scorer import then slow only
    # itself, never another worker's counted training (where the OS can pin; macOS cannot)
    ids = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") and n > 1 else []
    slots = []
    for i in range(n):
        cpus = tuple(ids[i * threads:(i + 1) * threads]) if ids else ()
        where = f" (core{'s' if len(cpus) > 1 else ''} {','.join(map(str, cpus))})" if cpus else ""
        slots.append(Slot(i, env, f"cpu x{threads} thread{'s' if threads > 1 else ''}{where}", cpus))
    return slots


def check_workers(cfg) -> None:
    """search.workers and the device, checked before a session exists (SessionError)."""
    if cfg.search.workers > 1:
        plan_slots(cfg)


def own_worktrees(cfg) -> bool:
    """Do the experiments run in worktrees of their own (<session>/workers/w<i>)? With several workers, and with
    a submitit launcher, whose jobs can outlive the search; else the one worker runs in the session's worktree."""
    return cfg.search.workers > 1 or cfg.launcher.name != "local"
