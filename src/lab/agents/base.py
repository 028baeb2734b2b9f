"""The Agent interface every proposer implements, and the state the loop shows it.

The loop calls, in order: `restore(history, state)` once (a resumed session re-learns from the
ledger), then repeatedly `propose(state)` -> Proposal (or None: nothing left to propose), and
`observe(experiment, state)` with the ledger row of that proposal: keep / discard / crash /
interrupted with val_bpb and delta, or `invalid` with the reason (a bad override, a patch that
does not apply or touches a protected file), so an agent can correct itself. Agents never run
anything, touch git or write files: proposals are data.

Usage: class MyAgent(Agent): def propose(self, state): return Proposal("...", overrides=[...])
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from src.lab.ledger import Experiment
from src.lab.proposal import Proposal
from src.lab.standings import Best, baseline_mean


@dataclass
class SearchState:
    tag: str
    best: Best
    margin: float  # a proposal must beat best.val_bpb by more than this to be kept
    sigma: float  # noise floor: pooled std of val_bpb between identical runs
    history: list[Experiment]  # every ledger row so far, oldest first (invalid ones carry `reason`)
    editable: list[str]  # files (globs) a patch may touch
    override_roots: list[str]  # top-level config keys an override may set
    pinned: list[str]  # keys the session's command line fixed
    base_overrides: list[str]  # the session's train overrides (device, budget, ...)
    worktree: Path  # the code at the best commit; read it, never write it
    base_config: Any  # typed TrainConfig of the baseline
    best_config: Any  # typed TrainConfig of the best (baseline + best.overrides)
    experiments_left: int
    seconds_left: float
    # search.workers > 1: experiments running now on other workers (not in history yet): propose something else
    in_flight: list[Experiment] = field(default_factory=list)

    def read(self, path: str) -> str:
        """A file of the best commit, e.g. state.read('src/research/model.py')."""
        p = (self.worktree / path).resolve()
        if self.worktree.resolve() not in p.parents:
            raise ValueError(f"{path} is outside the repository")
        return p.read_text()

    @property
    def baseline(self) -> Optional[float]:
        """Mean val_bpb of the baseline runs (None before one succeeded)."""
        return baseline_mean(self.history)

    @property
    def last(self) -> Optional[Experiment]:
        return self.history[-1] if self.history else None


class AgentStop(RuntimeError):
    """The agent cannot go on (no API key, API unreachable for long, a cost cap reached). Raised by build,
    preflight() or propose(); the loop stops cleanly, the session stays resumable, and the message says
    what to do. (Added for agent=claude.)"""


class Agent(ABC):
    name = "agent"

    def preflight(self) -> None:
        """Before the session opens and the baseline runs: check the agent can work (key, API); raise AgentStop."""

    def usage(self) -> dict[str, float]:
        """Session totals to log on the parent MLflow run after each experiment (agent=claude: tokens, cost)."""
        return {}

    def restore(self, history: list[Experiment], state: SearchState) -> None:
        """Resume: learn from the rows of an earlier invocation (default: nothing to learn)."""

    @abstractmethod
    def propose(self, state: SearchState) -> Optional[Proposal]:
        """The next experiment, or None when the agent has nothing more to propose."""

    def observe(self, experiment: Experiment, state: SearchState) -> None:
        """The outcome of the last proposal (its ledger row)."""

    def close(self) -> None:
        """Release clients, files."""
