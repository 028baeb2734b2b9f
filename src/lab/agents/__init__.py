"""Agents: what proposes the next experiment. All speak `Proposal` through the `Agent` interface.

Offline: `tpe` and `random` (Optuna ask/tell over conf/search_space/*.yaml, src/lab/agents/tpe.py) and
`replay` (a file of proposals, src/lab/agents/replay.py). A new agent is a module src/lab/agents/<name>.py
with `build(cfg, space) -> Agent`, a schema extending AgentConfig and conf/agent/<name>.yaml: the
loop needs no change.

Usage: agent = build_agent(cfg.agent, cfg.search_space)
"""
from __future__ import annotations

import importlib

from src.lab.agents.base import Agent, AgentStop, SearchState
from src.lab.standings import Best

MODULES = {"tpe": "src.lab.agents.tpe", "random": "src.lab.agents.tpe", "replay": "src.lab.agents.replay"}


def build_agent(cfg, space) -> Agent:
    module = MODULES.get(cfg.name, f"src.lab.agents.{cfg.name}")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise ValueError(f"agent.name={cfg.name!r}: no module {module}; agents: "
                             f"{', '.join(sorted(MODULES))} (conf/agent/)") from None
        raise
    return mod.build(cfg, space)


__all__ = ["Agent", "AgentStop", "Best", "SearchState", "build_agent"]
