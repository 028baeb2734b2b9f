"""The training budget clock: what counts as training time, and when a run is done.

Time mode counts wall-clock seconds of optimizer steps after `warmup_steps`; tokens
mode counts tokens from the first step (a deterministic run). Part of the fixed
harness: the research surface cannot change how long a run trains.

Stalls: a counted step slower than `stall_factor` x the running median of the last
`stall_window` normal steps is a stall (the macOS article saw 400-900 s steps among
~1.3 s ones). The clock counts a stalled step as a median step, so the model still gets
its full budget of productive training; the excess goes to `stalled_seconds`. A hard
wall-clock ceiling (`deadline`) still ends a run that stalls forever.

The learning-rate schedule follows the same progress: `lr_multiplier` (warm-up, then warmdown to
optimizer.final_lr_frac) is computed here and handed to the research step (src/research/step.py).

Usage: clock = BudgetClock(cfg.budget, tokens_per_step); clock.tick(dt); clock.done
       lr_mult = lr_multiplier(clock.progress, cfg.optimizer)
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Callable, Iterator, Optional

from src.harness.config import BudgetConfig, OptimizerConfig

MIN_HISTORY = 3  # normal counted steps needed before a step can be called a stall
STALL_ENV = "OVERNIGHT_INJECT_STALL"  # fault drill: "<step>:<seconds>[,...]" sleeps inside those optimizer steps


class BudgetClock:
    def __init__(self, cfg: BudgetConfig, tokens_per_step: int, now: Callable[[], float] = time.perf_counter):
        if cfg.mode not in ("time", "tokens"):
            raise ValueError(f"budget.mode={cfg.mode!r}; expected 'time' or 'tokens'")
        if (cfg.seconds if cfg.mode == "time" else cfg.tokens) <= 0:
            raise ValueError(f"budget.{'seconds' if cfg.mode == 'time' else 'tokens'} must be positive")
        if cfg.stall_factor <= 1 or cfg.stall_window < MIN_HISTORY:
            raise ValueError(f"budget.stall_factor={cfg.stall_factor} must be > 1 and budget.stall_window="
                             f"{cfg.stall_window} at least {MIN_HISTORY}")
        self.cfg = cfg
        self.tokens_per_step = tokens_per_step
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # tokens trained on, warm-up included
        self.training_seconds = 0.0  # counted seconds (after warm-up; a stalled step counts as a median one)
        self.step_times: list[float] = []  # measured seconds of every counted step, stalls included
        self.stalled_steps: list[int] = []  # step numbers of the stalls
        self.stalled_seconds = 0.0  # seconds of stalled steps beyond the running median
        self._recent: deque[float] = deque(maxlen=cfg.stall_window)  # normal counted step times
        self._now = now
        self._t0 = now()  # the wall clock starts with the clock (the first step)
        self.wall_seconds = 0.0  # wall seconds from the start to the end of the last step, stalls included
        self.deadline = cfg.max_wall_seconds  # hard ceiling on wall seconds since the first step
        if self.deadline is None and cfg.mode == "time":
            self.deadline = cfg.seconds * cfg.wall_factor + cfg.wall_grace

    def tick(self, dt: float, tokens: Optional[int] = None) -> bool:
        """Record one finished optimizer step that took `dt` seconds and trained on `tokens` (default: the
        configured tokens per step); True if it was a stall."""
        self.step += 1
        self.tokens += self.tokens_per_step if tokens is None else tokens
        self.wall_seconds = self._now() - self._t0
        if self.step <= self.cfg.warmup_steps:
            return False
        self.step_times.append(dt)
        median = statistics.median(self._recent) if len(self._recent) >= MIN_HISTORY else None
        if median is not None and dt > self.cfg.stall_factor * median:
            self.stalled_steps.append(self.step)
            self.stalled_seconds += dt - median
            self.training_seconds += median
            return True
        self._recent.append(dt)
        self.training_seconds += dt
        return False

    def elapsed(self) -> float:
        """Wall seconds since the clock started, now (the watchdog's view of a step that never ends)."""
        return self._now() - self._t0

    @property
    def timed_out(self) -> bool:
        return self.deadline is not None and self.wall_seconds >= self.deadline

    @property
    def stalls(self) -> int:
        return len(self.stalled_steps)

    @property
    def stalled(self) -> bool:
        """Stalls ate more than `stall_max_share` of the budget: the run should be re-run."""
        budget = self.cfg.seconds if self.cfg.mode == "time" else self.training_seconds
        return self.stalled_seconds > self.cfg.stall_max_share * budget

    @property
    def progress(self) -> float:
        """Share of the budget spent, in [0, 1]; drives the LR and weight-decay schedules."""
        if self.cfg.mode == "tokens":
            return min(self.tokens / self.cfg.tokens, 1.0)
        return min(self.training_seconds / self.cfg.seconds, 1.0)

    @property
    def tokens_per_sec(self) -> float:
        """Throughput over the counted (post-warm-up) steps."""
        return len(self.step_times) * self.tokens_per_step / self.training_seconds if self.training_seconds else 0.0

    @property
    def done(self) -> bool:
        return self.progress >= 1.0 or self.timed_out


def parse_stalls(spec: str) -> dict[int, float]:
    """'12:5,40:1.5' -> {12: 5.0, 40: 1.5}: optimizer step number -> seconds to sleep in it."""
    try:
        pairs = (item.split(":") for item in spec.split(",") if item.strip())
        return {int(step): float(secs) for step, secs in pairs}
    except ValueError:
        raise ValueError(f"{STALL_ENV}={spec!r}; expected '<step>:<seconds>[,<step>:<seconds>...]'") from None


def inject_stalls(batches: Iterator, accum: int, spec: str) -> Iterator:
    """Fault drill: wrap the batch iterator so that the listed optimizer steps (1-based) sleep.

    Used only when $OVERNIGHT_INJECT_STALL is set, so the training loop itself stays untouched.
    """
    stalls = parse_stalls(spec)
    for i, batch in enumerate(batches):
        step, micro = divmod(i, accum)
        if micro == 0 and step + 1 in stalls:
            time.sleep(stalls[step + 1])
        yield batch


def lr_multiplier(progress: float, cfg: OptimizerConfig) -> float:
    """The LR multiplier at budget progress in [0, 1]: a linear ramp over optimizer.warmup_ratio, then 1, then a
    linear warmdown over the last optimizer.warmdown_ratio of the budget to optimizer.final_lr_frac."""
    if progress < cfg.warmup_ratio:
        return (progress + 1e-8) / cfg.warmup_ratio
    if progress < 1.0 - cfg.warmdown_ratio:
        return 1.0
    cooldown = max(1.0 - progress, 0.0) / cfg.warmdown_ratio
    return cooldown + (1 - cooldown) * cfg.final_lr_frac
