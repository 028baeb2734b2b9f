"""The training budget clock: what counts as training time, and when a run is done.

Time mode counts wall-clock seconds of optimizer steps after `warmup_steps`; tokens
mode counts tokens from the first step (a deterministic run). Part of the fixed
harness: the research surface cannot change how long a run trains.

Usage: clock = BudgetClock(cfg.budget, tokens_per_step); clock.tick(dt); clock.done
"""
from __future__ import annotations

from src.config import BudgetConfig


class BudgetClock:
    def __init__(self, cfg: BudgetConfig, tokens_per_step: int):
        if cfg.mode not in ("time", "tokens"):
            raise ValueError(f"budget.mode={cfg.mode!r}; expected 'time' or 'tokens'")
        if (cfg.seconds if cfg.mode == "time" else cfg.tokens) <= 0:
            raise ValueError(f"budget.{'seconds' if cfg.mode == 'time' else 'tokens'} must be positive")
        self.cfg = cfg
        self.tokens_per_step = tokens_per_step
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # tokens trained on, warm-up included
        self.training_seconds = 0.0  # counted seconds (after warm-up)
        self.step_times: list[float] = []  # seconds of every counted step

    def tick(self, dt: float) -> None:
        """Record one finished optimizer step that took `dt` seconds."""
        self.step += 1
        self.tokens += self.tokens_per_step
        if self.step > self.cfg.warmup_steps:
            self.step_times.append(dt)
            self.training_seconds += dt

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
        return self.progress >= 1.0
