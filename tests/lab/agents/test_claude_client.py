"""agent=claude's link to the Messages API (src/lab/agents/claude_client.py): a 400 drops one optional
feature at a time, transient errors are retried briefly, a hung request times out, and no request is sent
that could cross the token cap. Against the local Messages API (src/lab/fakes/messages_server.py).

Run: python -m pytest -q tests/lab/agents/test_claude_client.py
"""
from __future__ import annotations

import time

import pytest

from src.lab.fakes.messages_server import error, hang, tool_use
from src.lab.agents.base import AgentStop
from tests.support.claude import BASE, agent_for, good, idea, make_state, step, worktree


# ---------------------------------------------------------------------------- retries and degradation


def test_a_400_drops_one_optional_feature_at_a_time_whatever_its_message_says(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(error(400, "prompt is too long: 1 tokens"), error(400, "tool_choice forced"), good(1))
    agent = agent_for(server)
    p = agent.propose(make_state(wt, list(BASE)))
    reqs = [r["body"] for r in server.requests if r["path"] == "/v1/messages"]
    assert [bool(b["tools"][0].get("strict")) for b in reqs] == [True, False, False]  # strict dropped first ...
    assert ["output_config" in b for b in reqs] == [True, True, False]  # ... then the effort level
    assert all(b["thinking"] == {"type": "adaptive"} for b in reqs)  # the message text changed nothing
    assert agent.options().dropped == ["strict tool schema", "effort=medium"] and p.meta["attempts"] == 1


def test_rate_limits_and_overload_are_retried_briefly_with_backoff(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(error(429), error(529), good(1))
    p = agent_for(server, max_retries=3).propose(make_state(wt, list(BASE)))
    assert p.overrides == ["optimizer.matrix_lr=0.03"]
    assert [r["status"] for r in server.requests if r["path"] == "/v1/messages"] == [429, 529, 200]
    assert p.meta["usage"]["calls"] == 1  # errors are not billed


def test_a_hung_request_times_out_and_the_fallback_proposes(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(hang(3.0), good(1))
    agent = agent_for(server, fallback="tpe", timeout_s=0.5, max_retries=0)
    t0 = time.monotonic()
    p = agent.propose(make_state(wt, list(BASE)))
    assert time.monotonic() - t0 < 2.5 and p.meta["proposed_by"] == "tpe"
    assert "request timed out" in p.meta["fallback_reason"]


# ---------------------------------------------------------------------------- caps


def test_the_token_cap_stops_a_request_that_could_cross_it(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(tool_use(idea(1), usage={"input_tokens": 40_000, "output_tokens": 1_000,
                                           "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}), good(2))
    agent = agent_for(server, max_session_tokens=43_000)
    hist = list(BASE)
    step(agent, wt, hist, "exp-001")
    with pytest.raises(AgentStop, match=r"has used 41,000 tokens.*agent.max_session_tokens=43,000"):
        agent.propose(make_state(wt, hist))
