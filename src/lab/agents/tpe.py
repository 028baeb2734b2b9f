"""Offline agents over a declared search space: `tpe` (Optuna's TPE) and `random`, via ask/tell.

Every proposal sets every knob of the space (a point, not a step), so its val_bpb is a clean
observation of that point. The study lives in memory and is rebuilt on resume: every earlier
ledger row that carries a point (proposal.meta.params) is re-told, with its val_bpb, or as
failed when it crashed, was invalid or interrupted. The baseline's point is told first, as the
mean of the baseline runs, when it lies inside the space.

Usage: python -m src.search agent=tpe search_space=cpu    (agent=random for the control arm)
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional

from src.lab.agents.base import Agent, SearchState
from src.lab.agents.space import check_space, distributions, format_value, resolve, to_overrides, values_of
from src.lab.config import OptunaAgentConfig, SearchSpaceConfig
from src.lab.ledger import Experiment
from src.lab.proposal import Proposal
from src.lab.decisions import DISCARD, KEEP, PRUNED

log = logging.getLogger("src.lab.agents.tpe")


def build(cfg: OptunaAgentConfig, space: SearchSpaceConfig) -> "OptunaAgent":
    return OptunaAgent(cfg, space)


class OptunaAgent(Agent):
    def __init__(self, cfg: OptunaAgentConfig, space: SearchSpaceConfig):
        import optuna

        if cfg.sampler not in ("tpe", "random", "cmaes"):
            raise ValueError(f"agent.sampler={cfg.sampler!r}; expected tpe, random or cmaes")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.name = cfg.name
        self.cfg = cfg
        self.space = space
        self.dists = distributions(space)
        if cfg.sampler == "tpe":
            with warnings.catch_warnings():  # multivariate is "experimental" in Optuna 4, and the better default
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials,
                                                     multivariate=cfg.multivariate,
                                                     constant_liar=bool(getattr(cfg, "constant_liar", False)))
        elif cfg.sampler == "cmaes":  # continuous knobs by CMA-ES; categorical ones by TPE (warned about once, here)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                sampler = optuna.samplers.CmaEsSampler(
                    seed=cfg.seed, n_startup_trials=cfg.n_startup_trials, warn_independent_sampling=False,
                    independent_sampler=optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials))
        else:
            sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
        self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.pending: dict[int, object] = {}  # trial number -> asked trial awaiting its outcome
        self._baseline_told = False
        self._checked = False

    # ------------------------------------------------------------------ learning
    def _tell_point(self, params: dict, value: Optional[float], exp: str, by: str = "", pruned: bool = False) -> None:
        """One finished point: COMPLETE with its val_bpb; PRUNED when the lab stopped it losing (TPE counts a pruned
        trial worse than every completed one, so the sampler learns to avoid its region); FAIL otherwise (a crash
        says nothing about the point's quality, and TPE leaves it out)."""
        import optuna
        from optuna.trial import TrialState

        if set(params) != set(self.dists) or not all(self.dists[k]._contains(self.dists[k].to_internal_repr(v))
                                                     for k, v in params.items()):
            log.info("%s: point outside the current search space; not told to the sampler", exp)
            return
        state = TrialState.COMPLETE if value is not None else TrialState.PRUNED if pruned else TrialState.FAIL
        trial = optuna.trial.create_trial(params=params, distributions=self.dists, value=value, state=state,
                                          user_attrs={"exp": exp, "by": by or self.name})
        self.study.add_trial(trial)

    def _tell_baseline(self, state: SearchState) -> None:
        if self._baseline_told or not self.cfg.tell_baseline:
            return
        if state.baseline is None:
            return
        try:
            point = values_of(state.base_config, self.space)
            self._tell_point(point, state.baseline, "baseline")
        except (ValueError, TypeError):
            pass
        self._baseline_told = True

    @staticmethod
    def _value(e: Experiment) -> Optional[float]:
        return e.val_bpb if e.status in (KEEP, DISCARD) and e.val_bpb is not None else None

    def restore(self, history: list[Experiment], state: SearchState) -> None:
        self._tell_baseline(state)
        for e in history:
            params = (e.proposal.meta.get("params") if e.proposal else None)
            if params:
                self._tell_point(params, self._value(e), e.exp, e.agent, pruned=e.status == PRUNED)

    def observe(self, e: Experiment, state: SearchState) -> None:
        from optuna.trial import TrialState

        meta = e.proposal.meta if e.proposal else {}
        if "params" not in meta:
            return
        trial = self.pending.pop(meta.get("trial", -1), None)
        value = self._value(e)
        if trial is None:  # asked by an earlier invocation (the in-flight experiment of a resume), or another agent's
            self._tell_point(meta["params"], value, e.exp, e.agent, pruned=e.status == PRUNED)
            return
        trial.set_user_attr("exp", e.exp)
        trial.set_user_attr("by", self.name)
        if value is not None:
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=TrialState.PRUNED if e.status == PRUNED else TrialState.FAIL)

    # ------------------------------------------------------------------ proposing
    def propose(self, state: SearchState) -> Proposal:
        if not self._checked:
            check_space(self.space, state.override_roots)
            self._checked = True
        self._tell_baseline(state)
        trial = self.study.ask(self.dists)
        params = dict(trial.params)
        self.pending[trial.number] = trial
        current = values_of(state.best_config, self.space)
        changed = [f"{k.split('.')[-1]} {format_value(current[k])}->{format_value(v)}"
                   for k, v in params.items() if current.get(k) != v]
        told = len([t for t in self.study.trials if t.state.name == "COMPLETE"])
        if self.cfg.sampler == "random":
            hyp = f"a uniform random point of search_space={self.space.name} (control arm for tpe)"
        elif told < self.cfg.n_startup_trials:
            hyp = f"TPE start-up: random point {told + 1} of {self.cfg.n_startup_trials} in search_space={self.space.name}"
        else:
            hyp = f"TPE: the density model over {told} observed points expects a lower val_bpb here"
        return Proposal(description=f"{self.name}: " + (", ".join(changed) or "same point as the best"),
                        hypothesis=hyp, overrides=to_overrides(params, self.space),
                        meta={"agent": self.name, "trial": trial.number,
                              "params": {k: resolve(params, self.space)[k] for k in params}})
