"""What the lab checks of a scored run beyond the scorer: the clock, seen from outside, and plausibility.

The clock: the runner measures how long the train process lived. A run's counted training
seconds plus its fixed cost (start-up, warm-up, checkpoint) must fit in that; the fixed cost of
a run may exceed the baseline's by `search.clock_factor` times or `search.clock_slack_s`
seconds, whichever is more. A run whose counted time cannot be reconciled with what the runner
saw trained longer than its budget: `tampered`.

Plausibility: a val_bpb below the data set's floor (`data.bpb_floor`), or a gain over the best
far beyond anything the session has kept (`search.plausible_gain` bpb, or
`search.plausible_factor` x the largest kept gain), is not kept on one scoring: the checkpoint is
scored again in a fresh scorer process (a different score is `tampered`) and the candidate is run
again, paired with the best, before it can be kept.

Usage: why = clock_mismatch(outcome, rows, cfg.search); why = implausible(val, best, rows, cfg.search, floor)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from src.lab.config import SearchConfig
from src.lab.ledger import Experiment
from src.lab.decisions import BASELINE, KEEP

if TYPE_CHECKING:  # the runner imports overcounted() from here
    from src.lab.runner import Outcome


def fixed_costs(rows: list[Experiment]) -> list[float]:
    """Wall seconds minus counted training seconds of every baseline run (the session's fixed cost per run)."""
    return [e.wall_seconds - e.training_seconds for e in rows
            if e.status == BASELINE and e.wall_seconds is not None and e.training_seconds is not None]


def overcounted(summary: dict, wall_seconds: float) -> str:
    """'' unless the run counted more training seconds than its process lived (the runner's wall time)."""
    counted = summary.get("training_seconds")
    if isinstance(counted, (int, float)) and wall_seconds and counted > wall_seconds + 1.0:
        return (f"the run counted {counted:.1f} s of training in a process that lived {wall_seconds:.1f} s "
                "(measured by the runner)")
    return ""


def clock_mismatch(out: "Outcome", rows: list[Experiment], s: SearchConfig) -> str:
    """'' when the run's counted time fits what the runner observed, else why it does not."""
    counted = out.summary.get("training_seconds")
    if not isinstance(counted, (int, float)) or not out.wall_seconds:
        return ""
    why = overcounted(out.summary, out.wall_seconds)
    if why:
        return why
    costs = fixed_costs(rows)
    if not costs:
        return ""
    base = max(costs)
    allowed = max(base * s.clock_factor, base + s.clock_slack_s)
    cost = out.wall_seconds - counted
    if cost > allowed:
        return (f"the run's process lived {out.wall_seconds:.1f} s for {counted:.1f} counted training seconds: "
                f"{cost:.1f} s unaccounted for, more than the {allowed:.1f} s allowed (the baseline's fixed cost "
                f"{base:.1f} s x search.clock_factor={s.clock_factor}, or + search.clock_slack_s="
                f"{s.clock_slack_s}); the budget clock was slowed or the run trained outside it")
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
