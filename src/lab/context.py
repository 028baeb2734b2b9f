"""What an open research session holds: its config, session, ledger, MLflow runs, baseline and locks.

Built once by the loop (src/lab/loop.py) when the session opens; the pieces that stage, run and
record experiments (src/lab/candidate.py, experiment.py, resume.py) read it, so none of them
recomputes a fact another already holds. Shared by every worker (src/lab/workers.py): what is a
worker's own (its worktree, its runner) is the Worker's, not the Lab's.

Usage: lab = Lab(cfg, session, ledger, runs, base_overrides, base_config); lab.standings()
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

from src.harness.config import TrainConfig
from src.lab.agents.base import SearchState
from src.lab.config import SearchAppConfig
from src.lab.disturbance import shape_key
from src.lab.ledger import Experiment, Ledger
from src.lab.proposal import compose_train, override_key
from src.lab.runs import SessionRuns
from src.lab.session import Session
from src.lab.standings import Best, Standings


@dataclass
class Lab:
    cfg: SearchAppConfig
    session: Session
    ledger: Ledger
    runs: SessionRuns
    base_overrides: list[str]  # the session's train overrides (device, budget, ...), fixed for its life
    base_config: TrainConfig  # the baseline, composed in the worktree
    deadline: float = float("inf")  # no experiment starts after this time.time()
    # would-be keeps are decided one at a time (search.workers > 1): only the holder moves the best
    advance: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _configs: dict = field(default_factory=dict, repr=False)  # research overrides -> composed TrainConfig

    @property
    def lock(self):
        """The session's lock: ledger, state.json, branch and MLflow writes of the workers' threads."""
        return self.session.lock

    @property
    def pinned(self) -> list[str]:
        """Keys the session's command line fixed: no proposal may change them."""
        return [override_key(o).lstrip("+~") for o in self.base_overrides]

    def rows(self) -> list[Experiment]:
        return self.ledger.rows()

    def standings(self, rows: Optional[list[Experiment]] = None) -> Standings:
        s = self.cfg.search
        return Standings.of(self.rows() if rows is None else rows, self.session.state.base_commit,
                            s.noise_sigmas, s.min_delta, s.baseline_spread)

    def config(self, overrides: list[str]) -> TrainConfig:
        """The typed config of the baseline + research `overrides`, composed once per distinct list."""
        key = tuple(overrides)
        with self.lock:  # the session's worktree moves only under the lock (a keep advances the branch)
            if key not in self._configs:
                if len(self._configs) > 64:  # a long session: keep the cache small
                    self._configs.clear()
                self._configs[key] = compose_train(self.session.conf_dir, self.base_overrides + list(overrides))
            return self._configs[key]

    def best_config(self, best: Best) -> TrainConfig:
        """The typed config of the best (baseline + its kept overrides)."""
        return self.config(best.overrides)

    def shape(self, commit: str, overrides: list[str], summary: dict) -> str:
        """What fixes the speed of a run of `commit` with `overrides` (src/lab/disturbance.py)."""
        cfg = self.config(overrides)
        return shape_key(self.session.tree(commit, "src"), cfg.model, cfg.batch, summary)

    def state(self, rows: list[Experiment], seconds_left: float) -> SearchState:
        """What the agent sees before its next proposal."""
        s, st = self.cfg.search, self.standings(rows)
        return SearchState(tag=self.session.tag, best=st.best, margin=st.margin, sigma=st.noise.sigma, history=rows,
                           editable=list(s.editable), override_roots=list(s.override_roots), pinned=self.pinned,
                           base_overrides=list(self.base_overrides), worktree=self.session.worktree,
                           base_config=self.base_config, best_config=self.best_config(st.best),
                           experiments_left=max(0, s.max_experiments - st.experiments_run),
                           seconds_left=max(0.0, seconds_left))
