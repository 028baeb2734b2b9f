"""What the lab checks of a scored run beyond the scorer: the budget, counted from outside, and plausibility.

The budget: every run is launched by src/harness/launch.py, the subreaper of its whole process tree.
When the training process has written its checkpoint it stops itself; with the tree stopped the
launcher reads the tree's CPU seconds from the kernel and copies the checkpoint (what is scored, by
its sha256). On CPU the run's device time is counted as the harness's clock counts it, from the clock's
start (the `overnight-clock-start` line the harness prints before any research code runs) to the
freeze: the training loop thread's CPU seconds or the rest of the tree's divided by the slot's other
threads, whichever is longer (`slot_seconds`); it may exceed the session's budget by `search.device_allowance_s`
plus `search.device_allowance_share` of it (the last step's variance and the checkpoint write),
no more. Beyond that the run trained outside its budget: `tampered`, with the figures. A slow or
shared machine only lengthens wall time, which is never held against a run.

Plausibility: a val_bpb below the data set's floor (`data.bpb_floor`), or a gain over the best
far beyond anything the session has kept (`search.plausible_gain` bpb, or
`search.plausible_factor` x the largest kept gain), is not kept on one scoring: the checkpoint is
scored again in a fresh scorer process (a different score is `tampered`) and the candidate is run
again, paired with the best, before it can be kept.

Usage: why = device_overrun(outcome.launch, clock_start(run_log), budget, cores)
       why = implausible(val, best, rows, cfg.search, floor)
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from src.harness.budget import START_LINE, slot_seconds
from src.lab.config import SearchConfig
from src.lab.ledger import Experiment
from src.lab.decisions import KEEP

START_RE = re.compile(rf"^{START_LINE} cpu_seconds=([0-9.]+)(?: main_cpu_seconds=([0-9.]+))? threads=(\d+) "
                      r"device=(\w+)\s*$", re.M)


@dataclass(frozen=True)
class DeviceBudget:
    """The session's time budget as the runner checks it."""
    seconds: float
    allowance_s: float = 0.25
    allowance_share: float = 0.02

    @property
    def allowed(self) -> float:
        return self.seconds * (1 + self.allowance_share) + self.allowance_s


def clock_start(run_log: Path) -> Optional[dict]:
    """The first clock-start line of a run's log (printed before any research code could print one), or None."""
    try:
        with open(run_log, "rb") as f:
            head = f.read(4 << 20).decode(errors="replace")
    except OSError:
        return None
    m = START_RE.search(head)
    if not m:
        return None
    return {"cpu_seconds": float(m.group(1)), "main_cpu_seconds": float(m.group(2)) if m.group(2) else None,
            "threads": int(m.group(3)), "device": m.group(4)}


def outside_seconds(freeze: dict, start: dict, cores: int) -> tuple[float, str]:
    """The run's device seconds as the launcher counted them, from the clock's start to the freeze, and how: the
    slot_seconds of the process tree's CPU seconds and the training loop thread's (the same rule as the harness's
    CpuTime, read here from the kernel's accounting; without the loop's figure, the tree's CPU per thread)."""
    threads = max(1, min(start["threads"], cores))
    cpu = freeze["cpu"] - start["cpu_seconds"]
    how = f"{cpu:.2f} CPU seconds of its process tree on {threads} threads"
    if freeze.get("main_cpu") is None or start.get("main_cpu_seconds") is None:
        return cpu / threads, how
    loop = min(freeze["main_cpu"] - start["main_cpu_seconds"], cpu)
    return slot_seconds(cpu, loop, threads), how + f", {loop:.2f} of them on its training loop's thread"


def counted_cpu(launch: Optional[dict], start: Optional[dict]) -> Optional[float]:
    """CPU seconds of the run's process tree from the clock's start to the freeze, as the launcher read them from the
    kernel; None when either end is missing."""
    freeze = (launch or {}).get("freeze")
    if not freeze or start is None:
        return None
    return freeze["cpu"] - start["cpu_seconds"]


def device_overrun(launch: dict, start: Optional[dict], budget: DeviceBudget, cores: int) -> str:
    """'' when the run's device time, counted from outside, fits the budget; else why not (the run is tampered).
    Only CPU runs are counted this way; on a GPU the in-process event clock is all there is."""
    freeze = launch.get("freeze")
    if not freeze:
        return ("the training process ended without stopping at its checkpoint, so its compute could not be "
                "counted (the harness always stops there): the research code kept the harness from finishing")
    if start is None:
        return "the run's log has no clock-start line (the harness prints it before any research code runs)"
    if start["device"] != "cpu":
        return ""
    used, how = outside_seconds(freeze, start, cores)
    if used > budget.allowed:
        extra = f", {freeze['processes'] - 1} other processes in the tree" if freeze.get("processes", 1) > 1 else ""
        return (f"the run used {used:.2f} device seconds ({how}, counted by the launcher from the clock's start to "
                f"the checkpoint{extra}), more than the budget of {budget.seconds:g} s + the allowance "
                f"({budget.allowed:.2f} s: search.device_allowance_s, search.device_allowance_share): it trained "
                "outside its budget")
    return ""


def counted_in_process(launch: dict, start: Optional[dict], summary: dict, cores: int, budget: DeviceBudget) -> bool:
    """Was an overrun compute the training loop could not stop (a model build, or one step longer than what was
    left), rather than compute hidden from the clock, a clock edited, or work after the loop? True when the
    harness's own clock at the checkpoint (device_seconds) agrees with the launcher's count from outside, and the
    checkpoint took no more than the allowance after the last step (training_seconds)."""
    freeze = (launch or {}).get("freeze")
    at_ckpt, at_loop_end = summary.get("device_seconds"), summary.get("training_seconds")
    if not freeze or start is None or not all(isinstance(v, (int, float)) for v in (at_ckpt, at_loop_end)):
        return False
    used, _ = outside_seconds(freeze, start, cores)
    return abs(used - at_ckpt) <= 0.1 + 0.02 * used and at_ckpt - at_loop_end <= budget.allowed - budget.seconds


def frozen_mismatch(launch: dict, frozen: Path) -> str:
    """'' when the launcher's copy of the checkpoint is what it copied at the freeze; else why not."""
    freeze = launch.get("freeze")
    if not freeze:
        return ""  # no freeze at all: device_overrun says why
    if not freeze.get("sha256"):
        return ("the training process stopped before its checkpoint was written (the harness stops only after "
                "writing it): what it trained after that stop would not have been counted")
    try:
        h = hashlib.sha256()
        with open(frozen, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        return f"the frozen checkpoint is gone ({e}): something of the run removed it after the freeze"
    if h.hexdigest() != freeze["sha256"]:
        return "the frozen checkpoint was changed after the freeze: something of the run wrote to it"
    return ""


def implausible(val_bpb: float, best: float, rows: list[Experiment], s: SearchConfig,
                floor: Optional[float]) -> str:
    """'' when a would-be keep is plausible, else why it must be re-scored and re-run before it counts."""
    if floor is not None and val_bpb < floor:
        return f"val_bpb {val_bpb:.4f} is below the floor {floor} of this data set (data.bpb_floor)"
    kept = [-(e.delta or 0.0) for e in rows if e.status == KEEP and e.delta is not None]
    limit = max(s.plausible_gain, s.plausible_factor * max(kept, default=0.0))
    gain = best - val_bpb
    if gain > limit:
        return (f"a gain of {gain:.4f} over the best is beyond anything this session has kept (limit {limit:.4f}: "
                f"search.plausible_gain={s.plausible_gain} or search.plausible_factor={s.plausible_factor} x the "
                "largest kept gain)")
    return ""
