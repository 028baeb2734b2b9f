"""Agents: what proposes the next experiment. All speak `Proposal` through the `Agent` interface.

Offline: `tpe` and `random` (Optuna ask/tell over conf/search_space/*.yaml, src/agents/tpe.py) and
`replay` (a file of proposals, src/agents/replay.py). A new agent is a module src/agents/<name>.py
with `build(cfg, space) -> Agent`, a schema extending AgentConfig and conf/agent/<name>.yaml: the
loop needs no change.

Usage: agent = build_agent(cfg.agent, cfg.search_space)
"""
from __future__ import annotations

import importlib

from src.agents.base import Agent, AgentStop, Best, SearchState

MODULES = {"tpe": "src.agents.tpe", "random": "src.agents.tpe", "replay": "src.agents.replay"}


def build_agent(cfg, space) -> Agent:
    module = MODULES.get(cfg.name, f"src.agents.{cfg.name}")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise ValueError(f"agent.name={cfg.name!r}: no module {module}; agents: "
                             f"{', '.join(sorted(MODULES))} (conf/agent/)") from None
        raise
    return mod.build(cfg, space)


__all__ = ["Agent", "AgentStop", "Best", "SearchState", "build_agent"]
