"""The training budget: device time, counted from before the research code runs, and when a run is done.

`budget.seconds` (mode=time) is seconds of the run's device slot, everything included from the moment
the harness starts the clock (before the research code is imported: model construction, weight
initialisation, warm-up steps and every optimizer step) to the end of training:
- CPU (`CpuTime`, `slot_seconds`): from two counts the kernel keeps since the clock's start, the CPU seconds
  of the whole process (all of its threads, user + sys, and any child process it reaped) and those of the
  training loop's own thread: the loop's time, or the other threads' time divided by the slot's other
  threads, whichever is longer (so never less than the process's CPU seconds per thread). The loop's
  thread is busy whenever the run makes progress, so on a quiet machine its time is close to wall time
  and a run trains about what a wall-clock budget gave; work in another thread (OpenMP's, or one the
  research code starts), in an uncounted step or in a stall cannot escape the count. A neighbour on the
  cores lengthens wall time without changing either count (with OpenMP threads that sleep when idle:
  src/harness/threads.py).
- CUDA / MPS (`EventTime`): elapsed time between device events on the training stream since the start.
Tokens mode counts tokens (a deterministic run); its device time is still reported.

The loop stops before a step that might not fit: when the counted time plus the slowest of the recent steps
would pass the budget. A run never books a step at less than it cost. Outside the process the lab's runner counts
the same two figures from the kernel's accounting of the whole process tree and of the training process's main
thread (src/harness/launch.py) and compares `slot_seconds` of them with the budget; the start of the clock is
the `overnight-clock-start` line, printed before any research code runs.

Stalls: a step slower in wall time than `stall_factor` x the running median is a stall, reported
(`stalled_seconds`: its wall time beyond the median). On CPU a stall costs the budget nothing (a
descheduled process uses no CPU); on a GPU a stalled device eats the budget, so a run whose stalls took
more than `stall_max_share` of it is marked `stalled` (re-run). A hard wall ceiling (`deadline`: seconds
x wall_factor + wall_grace since the clock started) ends a run the machine starves (status timeout;
the lab re-runs it and, if it stays so, calls it disturbed).

The learning-rate schedule follows the same progress: `lr_multiplier` (warm-up, then warmdown to
optimizer.final_lr_frac) is computed here and handed to the research step (src/research/step.py).

Usage: device = CpuTime(threads) | EventTime("cuda"); clock = BudgetClock(cfg.budget, tokens_per_step, device)
       clock.tick(dt); clock.done; lr_mult = lr_multiplier(clock.progress, cfg.optimizer)
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
# bound when the harness is imported, before any research code
from time import clock_gettime, perf_counter, process_time, pthread_getcpuclockid
from typing import Callable, Iterator, Optional, Protocol

from src.harness.config import BudgetConfig, OptimizerConfig

MIN_HISTORY = 3  # normal steps needed before a step can be called a stall
STALL_ENV = "OVERNIGHT_INJECT_STALL"  # fault drill: "<step>:<seconds>[,...]" sleeps inside those optimizer steps
START_LINE = "overnight-clock-start"  # what the harness prints when the clock starts (read by the lab's runner)
CURVE_LINE = "overnight-curve"  # the training loss at each CURVE_STEP of the counted budget (read by the runner)
CURVE_STEP = 0.05


class Curve:
    """The smoothed training loss at fixed fractions of the counted budget (every CURVE_STEP of it): the same
    points for every run, so that the lab can compare runs point by point while they train. The loss is an
    exponential moving average of the step losses (bias-corrected, beta 0.9), read at the exact fraction by linear
    interpolation between the steps before and after it: a run of a few dozen steps lands its steps at different
    fractions from one run to the next, and without it two runs of the same code would differ by a whole step's
    drop in loss where the loss falls fast (measured: identical 30-s runs 0.5 apart at 10%)."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.ema, self.n = beta, 0.0, 0
        self.points: list[tuple[float, float]] = []
        self._last: Optional[tuple[float, float]] = None  # (progress, smoothed loss) of the previous step

    def add(self, progress: float, loss: float) -> list[tuple[float, float]]:
        """Record a step's loss at budget `progress` in [0, 1]; returns the fractions it crossed."""
        self.n += 1
        self.ema = self.beta * self.ema + (1 - self.beta) * loss
        smooth = self.ema / (1 - self.beta ** self.n)
        p0, v0 = self._last if self._last is not None else (progress, smooth)
        self._last = (progress, smooth)
        new = []
        while len(self.points) < round(1 / CURVE_STEP) and (len(self.points) + 1) * CURVE_STEP <= progress + 1e-9:
            f = round((len(self.points) + 1) * CURVE_STEP, 4)
            w = min(max((f - p0) / (progress - p0), 0.0), 1.0) if progress > p0 else 1.0
            new.append((f, v0 + w * (smooth - v0)))
            self.points.append(new[-1])
        return new


class DeviceTime(Protocol):
    kind: str  # cpu | cuda | mps | fake

    def seconds(self) -> float:
        """Device seconds since this clock was made."""


def cpu_seconds() -> float:
    """CPU seconds of this process: all threads, user + sys, plus the children it reaped (the kernel's count)."""
    t = os.times()
    return process_time() + t.children_user + t.children_system


def thread_clock(ident: Optional[int] = None) -> Callable[[], float]:
    """A reader of the CPU seconds of one thread (default: the calling one), readable from any thread; the same
    count as that thread's /proc/<pid>/task/<tid>/schedstat."""
    clk = pthread_getcpuclockid(ident if ident is not None else threading.get_ident())
    return lambda: clock_gettime(clk)


def slot_seconds(cpu: float, loop: float, threads: int) -> float:
    """Device seconds of a CPU slot of `threads` threads whose process used `cpu` CPU seconds, `loop` of them on
    the training loop's thread: the loop's own time, or the other threads' time spread over the slot's other
    threads, whichever is longer (never less than cpu / threads; all of it on one thread)."""
    if threads <= 1:
        return cpu
    return max(loop, (cpu - loop) / (threads - 1))


class CpuTime:
    """The CPU slot's time since the start, from two counts the kernel keeps: the CPU seconds of the whole process
    and those of the thread that made the clock (the training loop's). See `slot_seconds`.

    The loop's thread runs whenever the run makes progress (its Python, its share of every parallel op),
    sleeps only while it waits for the other threads or the disk, and gets no CPU while a neighbour holds
    its core: on a quiet machine its time is close to wall time, so a run trains about what a wall-clock
    budget gave, and beside a busy process it does not grow. The other threads (OpenMP's workers, and any
    thread the research code starts) are counted as `threads - 1` of them could run: work handed to a
    helper while the loop's thread sleeps, or run beside it, comes out of the budget."""
    kind = "cpu"

    def __init__(self, threads: int, read: Callable[[], float] = cpu_seconds,
                 read_main: Optional[Callable[[], float]] = None):
        if threads < 1:
            raise ValueError(f"a CPU slot needs at least one thread, not {threads}")
        self.threads, self._read = threads, read
        self._read_main = read_main if read_main is not None else thread_clock()
        self.start_cpu, self.start_main = read(), self._read_main()

    def parts(self) -> tuple[float, float]:
        """(process CPU seconds, loop thread CPU seconds) since the start."""
        return self._read() - self.start_cpu, self._read_main() - self.start_main

    def seconds(self) -> float:
        return slot_seconds(*self.parts(), self.threads)


class EventTime:
    """CUDA / MPS: elapsed device time between an event recorded at the start and one recorded now (synchronised)."""

    def __init__(self, kind: str):
        import torch

        self.kind = kind
        self._mod = torch.cuda if kind == "cuda" else torch.mps
        self._start = self._mod.Event(enable_timing=True)
        self._start.record()

    def seconds(self) -> float:
        end = self._mod.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self._start.elapsed_time(end) / 1000.0


class FakeTime:
    """A device clock the tests drive (and the kind a GPU clock would have): `t` seconds since the start."""

    def __init__(self, kind: str = "fake"):
        self.kind, self.t = kind, 0.0

    def seconds(self) -> float:
        return self.t


def device_time(device_type: str, threads: int) -> DeviceTime:
    """The budget's clock for a device: CPU time per thread on CPU, device events on CUDA and MPS."""
    return CpuTime(threads) if device_type == "cpu" else EventTime(device_type)


class BudgetClock:
    def __init__(self, cfg: BudgetConfig, tokens_per_step: int, device: DeviceTime,
                 now: Callable[[], float] = perf_counter):
        if cfg.mode not in ("time", "tokens"):
            raise ValueError(f"budget.mode={cfg.mode!r}; expected 'time' or 'tokens'")
        if (cfg.seconds if cfg.mode == "time" else cfg.tokens) <= 0:
            raise ValueError(f"budget.{'seconds' if cfg.mode == 'time' else 'tokens'} must be positive")
        if cfg.stall_factor <= 1 or cfg.stall_window < MIN_HISTORY:
            raise ValueError(f"budget.stall_factor={cfg.stall_factor} must be > 1 and budget.stall_window="
                             f"{cfg.stall_window} at least {MIN_HISTORY}")
        self.cfg, self.tokens_per_step, self.device = cfg, tokens_per_step, device
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # tokens trained on
        self.training_seconds = device.seconds()  # counted device seconds since the clock started (model build included)
        self.step_times: list[float] = []  # wall seconds of every step after the first warmup_steps (stalls show here)
        self.device_step_times: list[float] = []  # device seconds of the same steps (throughput)
        self.stalled_steps: list[int] = []  # step numbers of the stalls (wall time)
        self.stalled_seconds = 0.0  # wall seconds of stalled steps beyond the running median
        self._recent: deque[float] = deque(maxlen=cfg.stall_window)  # wall times of normal steps
        self._recent_device: deque[float] = deque(maxlen=cfg.stall_window)  # device times of the steps after warm-up
        self._last_device = 0.0  # device seconds of the last step
        self._now = now
        self._t0 = now()
        self.wall_seconds = 0.0  # wall seconds from the clock's start to the end of the last step
        self.deadline = cfg.max_wall_seconds  # hard ceiling on wall seconds since the clock started
        if self.deadline is None and cfg.mode == "time":
            self.deadline = cfg.seconds * cfg.wall_factor + cfg.wall_grace

    def tick(self, dt: float, tokens: Optional[int] = None) -> bool:
        """Record one finished optimizer step that took `dt` wall seconds and trained on `tokens` (default: the
        configured tokens per step); its device time is read from the device clock. True if it was a stall."""
        self.step += 1
        self.tokens += self.tokens_per_step if tokens is None else tokens
        self.wall_seconds = self._now() - self._t0
        now = self.device.seconds()
        self._last_device, self.training_seconds = now - self.training_seconds, now
        if self.step <= self.cfg.warmup_steps:
            return False
        self.step_times.append(dt)
        self.device_step_times.append(self._last_device)
        self._recent_device.append(self._last_device)
        median = statistics.median(self._recent) if len(self._recent) >= MIN_HISTORY else None
        if median is not None and dt > self.cfg.stall_factor * median:
            self.stalled_steps.append(self.step)
            self.stalled_seconds += dt - median
            return True
        self._recent.append(dt)
        return False

    def next_step(self) -> float:
        """Device seconds the next step may take: the slowest of the recent steps (the last step during warm-up), so
        that a periodic expensive step (a refresh every N steps) is not started where it would not fit."""
        return max(self._recent_device) if self._recent_device else self._last_device

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
        """On a GPU, stalls ate more than `stall_max_share` of the budget: the run should be re-run. (On CPU a stall
        costs no budget: the process is not running.)"""
        if self.device.kind == "cpu":
            return False
        budget = self.cfg.seconds if self.cfg.mode == "time" else self.training_seconds
        return self.stalled_seconds > self.cfg.stall_max_share * budget

    @property
    def progress(self) -> float:
        """Share of the budget spent, in [0, 1]; drives the LR and weight-decay schedules."""
        if self.cfg.mode == "tokens":
            return min(self.tokens / self.cfg.tokens, 1.0)
        return min(self.training_seconds / self.cfg.seconds, 1.0)

    @property
    def spent(self) -> bool:
        """The budget is used up: the tokens are trained, or (time) the next step would not fit."""
        if self.cfg.mode == "tokens":
            return self.tokens >= self.cfg.tokens
        return self.training_seconds + self.next_step() > self.cfg.seconds

    @property
    def tokens_per_sec(self) -> float:
        """Throughput over the steps after warm-up, per device second."""
        s = sum(self.device_step_times)
        return len(self.device_step_times) * self.tokens_per_step / s if s > 0 else 0.0

    @property
    def wall_ratio(self) -> float:
        """Wall seconds per counted device second (1 on an idle device; more when the machine is shared)."""
        return self.wall_seconds / self.training_seconds if self.training_seconds > 0 else 0.0

    @property
    def done(self) -> bool:
        return self.spent or self.timed_out


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
