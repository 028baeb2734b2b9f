"""agent=hybrid: two researchers on one night. An optimizer (Optuna TPE or CMA-ES) proposes the numbers, Claude
the ideas, on `agent.claude_share` of the proposals.

The division of labour (program.md tells Claude the same):
- the tuner (agent.tuner: tpe | cmaes) proposes a full point of the search space on every turn that is not
  Claude's. It learns from every ledger row it can place in its space: its own points and every proposal of
  Claude's made of overrides only (the knobs it sets, the best's values for the rest). A code patch is not a
  point of the space: told as one, a failed patch would teach the sampler that the best point is bad.
- Claude proposes on its share of the turns (spread evenly: 0.3 = turns 3, 6, 10, 13, ...), sees the tuner's state
  in its dashboard every turn (the best trials, the parameter importances, the spread of the top quartile) and is
  asked to spend its turns on what the tuner cannot reach: code, structure, knobs outside the space, or a point the
  tuner's model is wrong about.
- While Claude cannot answer (outage, rate limit, refusal, a cost cap) the tuner proposes its turns too: the same
  study, so nothing is lost and no one waits. A resume re-tells the tuner every row (src/lab/agents/tpe.py).
The ledger's `agent` column says who proposed each row: claude, or the tuner (tpe / cmaes), with
`fallback_for: claude` in the proposal's meta when it stood in for Claude.

Anchor: arXiv 2603.24647 (autoresearch's task, 24 H200-hours a run): CMA-ES with an LLM on ~30% of trials that
sees the optimizer's mean, step size and top configurations was best (0.9739), TPE alone 0.9768, the LLM alone
0.9770; an 80% LLM share did worse than the optimizer alone.

Usage: ANTHROPIC_API_KEY=... python -m src.search agent=hybrid search_space=cpu device=cpu budget.seconds=30
       python -m src.search agent=hybrid agent.tuner=cmaes agent.claude_share=0.3
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import yaml

from src.lab.agents.base import AgentStop, SearchState
from src.lab.agents.claude import ClaudeAgent
from src.lab.agents.space import format_value, values_of
from src.lab.agents.tpe import OptunaAgent
from src.lab.config import HybridAgentConfig, OptunaAgentConfig
from src.lab.proposal import Proposal, override_key

log = logging.getLogger("src.lab.agents.hybrid")
TUNERS = ("tpe", "cmaes")


def build(cfg: HybridAgentConfig, space) -> "HybridAgent":
    return HybridAgent(cfg, space)


def claude_turn(i: int, share: float) -> bool:
    """Is proposal i (0-based) Claude's? `share` of the turns, spread evenly (Bresenham): 0.3 -> 3, 6, 10, ..."""
    return math.floor((i + 1) * share + 1e-9) > math.floor(i * share + 1e-9)


class HybridAgent(ClaudeAgent):
    name = "hybrid"

    def __init__(self, cfg: HybridAgentConfig, space=None):
        if cfg.tuner not in TUNERS:
            raise AgentStop(f"agent.tuner={cfg.tuner!r}; expected one of {', '.join(TUNERS)}")
        if not 0.0 <= cfg.claude_share <= 1.0:
            raise AgentStop(f"agent.claude_share={cfg.claude_share} must be between 0 and 1 (0.3: Claude proposes 3 "
                            "of every 10 experiments)")
        if space is None:
            raise AgentStop("agent=hybrid needs a search space for its tuner (search_space=cpu, ...)")
        cfg.fallback = "none"  # the tuner below stands in for Claude: one study for both roles
        super().__init__(cfg, space)
        self.tuner = OptunaAgent(OptunaAgentConfig(name=cfg.tuner, seed=cfg.seed, sampler=cfg.tuner,
                                                   n_startup_trials=cfg.n_startup_trials,
                                                   multivariate=cfg.multivariate), space)
        self.fallback = self.tuner
        self.cfg.fallback = cfg.tuner  # what the messages about outages name
        self.hcfg = cfg

    # ------------------------------------------------------------------ proposing
    def propose(self, state: SearchState) -> Optional[Proposal]:
        i = sum(1 for e in state.history if e.is_experiment) + len(getattr(state, "in_flight", None) or [])
        if not claude_turn(i, self.hcfg.claude_share):
            p = self.tuner.propose(state)
            if p is not None:
                p.meta.update({"proposed_by": self.tuner.name, "hybrid_role": "tuner"})
            return p
        p = super().propose(state)  # Claude; the tuner when Claude cannot answer (meta says fallback_for)
        if p is None:
            return None
        if p.meta.get("proposed_by") == "claude":
            p.meta["hybrid_role"] = "claude"
            point = self.point_of(p, state)
            if point is not None:
                p.meta["params"] = point  # the tuner is told its result like one of its own (observe)
        return p

    def point_of(self, p: Proposal, state: SearchState) -> Optional[dict]:
        """Claude's proposal as a point of the tuner's space (the knobs it sets, the best's values for the rest);
        None for a code patch or a value outside the space."""
        if p.patch:
            return None
        point = values_of(state.best_config, self.space)
        for ov in p.overrides:
            key = override_key(ov).lstrip("+~")
            if key in point:
                try:
                    point[key] = yaml.safe_load(ov.split("=", 1)[1])
                except yaml.YAMLError:
                    return None
        dists = self.tuner.dists
        try:
            if all(dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in point.items() if k in dists):
                return {k: v for k, v in point.items() if k in dists}
        except (ValueError, TypeError):
            pass
        return None

    # ------------------------------------------------------------------ what Claude is shown
    def tuner_state(self, top: int = 5) -> str:
        """The tuner's state for Claude's dashboard: trials told, the best ones, importances, the top quartile."""
        study = self.tuner.study
        done = sorted((t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None),
                      key=lambda t: t.value)
        share = self.hcfg.claude_share
        head = (f"## The optimizer's state ({self.tuner.name} over search_space={self.space.name}; it proposes "
                f"{1 - share:.0%} of the experiments, you {share:.0%})")
        if not done:
            return f"{head}\nNo trial told yet: it is still sampling its start-up points."
        keys = list(self.tuner.dists)
        short = {k: k.split(".")[-1] for k in keys}
        lines = [head, f"Trials told: {len(done)} ({sum(1 for t in done if t.user_attrs.get('by') == 'claude')} of "
                       "them yours). Best trials (val_bpb, then the point):"]
        for t in done[:top]:
            pts = ", ".join(f"{short[k]}={format_value(t.params[k])}" for k in keys if k in t.params)
            lines.append(f"- {t.value:.4f}  {t.user_attrs.get('exp', f'trial {t.number}')}: {pts}")
        imp = importances(study)
        if imp:
            lines.append("Parameter importances (fANOVA over the told trials; what moves val_bpb most): " +
                         ", ".join(f"{short.get(k, k)} {v:.2f}" for k, v in imp.items()))
        q = done[:max(2, len(done) // 4)]
        spread = []
        for k in keys:
            vals = [t.params[k] for t in q if k in t.params and isinstance(t.params[k], (int, float))]
            if len(vals) >= 2 and not isinstance(vals[0], bool):
                m = sum(vals) / len(vals)
                sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
                spread.append(f"{short[k]} {format_value(m)} +- {format_value(sd)}")
        if spread:
            lines.append(f"Where its best quarter ({len(q)} trials) lies, mean +- sd (the region it searches now): "
                         + ", ".join(spread))
        lines.append("Spend your turns on what it cannot reach: code and structure, knobs outside its space, or a "
                     "point where you think its model is wrong. Your overrides-only results are told to it.")
        return "\n".join(lines)


def importances(study: Any) -> dict:
    """Optuna's parameter importances (fANOVA), {} while too few trials or when it cannot fit."""
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(done) < 4:
        return {}
    try:
        import optuna

        return dict(optuna.importance.get_param_importances(study))
    except Exception as e:  # a constant parameter, too few distinct values, ...
        log.debug("no importances: %s", e)
        return {}
