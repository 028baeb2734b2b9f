"""What the agent=claude tests share (not a test module; the `server` and `key` fixtures live in
tests/lab/agents/conftest.py): the key the local Messages API accepts, a price, a one-knob space, an
agent configured against the server, a session worktree, ledger rows and states, scripted proposals, one
loop iteration (`step`), and readers of what the server received.

Usage: from tests.support.claude import BASE, agent_for, good, make_state, step, worktree
"""
from __future__ import annotations

import shutil
from pathlib import Path

from src.lab.fakes.messages_server import MessagesServer, tool_use
from src.harness.config import TrainConfig
from src.lab.agents.base import Best, SearchState
from src.lab.agents.claude import ClaudeAgent
from src.lab.config import ClaudeAgentConfig, ClaudePrice, KnobConfig, SearchSpaceConfig
from src.lab.ledger import Experiment
from src.lab.proposal import Proposal
from tests.support.helpers import REPO


KEY = "sk-ant-test-7d1c2b9e-never-store-me"  # what the local server accepts; must appear nowhere on disk
PRICE = ClaudePrice(input=3.0, output=15.0, cache_write=3.75, cache_read=0.30)
SHA = "a" * 40
SPACE = SearchSpaceConfig(name="t", knobs=[KnobConfig(key="optimizer.matrix_lr", type="float", low=0.01, high=0.1,
                                                      log=True)])


# ---------------------------------------------------------------------------- the agent, its session and its state


def make_cfg(server: MessagesServer, **kw) -> ClaudeAgentConfig:
    base = dict(base_url=server.url, prices={"claude-sonnet-4-6": PRICE}, max_retries=2, patience_s=5.0,
                retry_wait_s=0.01, timeout_s=10.0, max_tokens=4096, fallback="none", probe_s=0.0)
    return ClaudeAgentConfig(**{**base, **kw})


def agent_for(server: MessagesServer, **kw) -> ClaudeAgent:
    return ClaudeAgent(make_cfg(server, **kw), SPACE)


def worktree(tmp_path: Path) -> Path:
    """A session directory whose worktree holds the editable files, the config groups and program.md."""
    wt = tmp_path / "session" / "worktree"
    for rel in ("src/research/model.py", "src/research/optim.py", "program.md"):
        (wt / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, wt / rel)
    for group in ("model", "optimizer", "batch"):
        shutil.copytree(REPO / "conf" / group, wt / "conf" / group)
    (tmp_path / "session" / "runs").mkdir()
    return wt


def row(exp: str, status: str, val: float | None = None, delta: float | None = None, desc: str = "",
        reason: str = "", proposal: Proposal | None = None, run_status: str = "ok", **kw) -> Experiment:
    return Experiment(exp=exp, status=status, description=desc or exp, val_bpb=val, delta=delta, reason=reason,
                      kind="baseline" if status == "baseline" else "overrides", margin=0.01, run_status=run_status,
                      commit=SHA, proposal=proposal, **kw)


def make_state(wt: Path, history: list[Experiment], best: Best | None = None) -> SearchState:
    cfg = TrainConfig()
    return SearchState(tag="t1", best=best or Best("baseline", SHA, 2.5, []), margin=0.01, sigma=0.004,
                       history=history, editable=["src/research/model.py", "src/research/optim.py"],
                       override_roots=["model", "optimizer", "batch"], pinned=["device.type"],
                       base_overrides=["device.type=cpu"], worktree=wt, base_config=cfg, best_config=cfg,
                       experiments_left=5, seconds_left=3600.0)


BASE = [row("base-1", "baseline", 2.50), row("base-2", "baseline", 2.51)]


# ---------------------------------------------------------------------------- scripted proposals and one loop iteration


def idea(i: int = 1, **kw) -> dict:
    return {"learned": f"lesson {i}", "next_ideas": [f"idea {i + 1}", f"idea {i + 2}"],
            "description": f"matrix lr 0.0{i + 2}", "hypothesis": f"idea {i}: a higher LR helps",
            "overrides": [f"optimizer.matrix_lr=0.0{i + 2}"], **kw}


def good(i: int = 1, thinking: str = "", **kw) -> dict:
    return tool_use(idea(i, **kw), thinking=thinking or f"Thinking about idea {i}: the margin is 0.01.")


def outcome(p: Proposal, exp: str, status: str, val: float | None = None, delta: float | None = None,
            reason: str = "", run_status: str = "ok", **kw) -> Experiment:
    return row(exp, status, val, delta, p.description, reason, p, run_status, overrides=" ".join(p.overrides), **kw)


def step(agent: ClaudeAgent, wt: Path, hist: list[Experiment], exp: str, status: str = "discard",
         val: float | None = 2.6, delta: float | None = 0.1, **kw) -> Proposal:
    """One loop iteration: propose, record the row, observe it."""
    p = agent.propose(make_state(wt, hist))
    e = outcome(p, exp, status, val, delta, **kw)
    hist.append(e)
    agent.observe(e, make_state(wt, hist))
    return p


# ---------------------------------------------------------------------------- what the server received


def last_user(req: dict) -> list[dict]:
    return req["body"]["messages"][-1]["content"]


def blocks_of(req: dict, kind: str) -> list[dict]:
    return [b for m in req["body"]["messages"] if m["role"] == "user" for b in m["content"]
            if isinstance(b, dict) and b.get("type") == kind]


def strip_cache(obj):
    """A request part without its cache_control markers (they move; the content must not)."""
    if isinstance(obj, dict):
        return {k: strip_cache(v) for k, v in obj.items() if k != "cache_control"}
    if isinstance(obj, list):
        return [strip_cache(v) for v in obj]
    return obj
