"""agent=claude's conversation (src/lab/agents/claude_conversation.py): one append-only conversation per
session with cache breakpoints on its stable parts, outcomes as tool results with the run's figures, and
the conversation saved so a resume continues it (thinking blocks sent back unchanged). Against the local
Messages API (src/lab/fakes/messages_server.py), which refuses malformed conversations like the real one.

Run: python -m pytest -q tests/lab/agents/test_claude_conversation.py
"""
from __future__ import annotations

import json

from src.lab.fakes.messages_server import tool_use
from src.lab.agents.claude import CONVERSATION_FILE
from src.lab.agents.claude_api import Usage
from tests.support.claude import (BASE, agent_for, blocks_of, good, idea, last_user, make_state, outcome, row, step,
                                  strip_cache, worktree)


def test_a_session_is_one_append_only_conversation_with_breakpoints_on_its_stable_parts(server, key, tmp_path):
    wt = worktree(tmp_path)
    patch = "--- a/src/research/optim.py\n+++ b/src/research/optim.py\n@@ -1,1 +1,1 @@\n-x\n+y\n"
    server.script(good(1), tool_use({**idea(2), "overrides": [], "patch": patch}), good(3), good(4))
    agent = agent_for(server)
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    step(agent, wt, hist, "exp-001", "keep", 2.40, -0.10, num_steps=312, tokens_per_sec=21300.0, memory_gb=1.25)
    step(agent, wt, hist, "exp-002", "invalid", None, None, reason="the patch does not apply to the best commit")
    hist.append(row("exp-002-c1", "confirm", 2.41))  # a row the lab added between two proposals
    (tmp_path / "session" / "runs" / "exp-003").mkdir()
    (tmp_path / "session" / "runs" / "exp-003" / "run.log").write_text("step 1\nTraceback...\nRuntimeError: boom\n")
    step(agent, wt, hist, "exp-003", "crash", None, None, reason="RuntimeError: boom", run_status="crash")
    agent.propose(make_state(wt, hist))
    reqs = server.messages_requests()
    assert len(reqs) == 4 and all(r["status"] == 200 for r in server.requests)  # the server refuses malformed chats
    for prev, cur in zip(reqs, reqs[1:]):  # append-only: each request extends the previous one
        old, new = prev["body"]["messages"], cur["body"]["messages"]
        assert strip_cache(new[: len(old) - 1]) == strip_cache(old[:-1])
        assert strip_cache(new[len(old) - 1]["content"]) == strip_cache(old[-1]["content"][:-1])  # minus the state
        assert strip_cache(cur["body"]["system"]) == strip_cache(prev["body"]["system"])
    for r in reqs:
        b = r["body"]
        marks = [blk for part in (b["system"], *[m["content"] for m in b["messages"]]) for blk in part
                 if blk.get("cache_control")]
        assert 1 <= len(marks) <= 3 and b["system"][0]["cache_control"] == {"type": "ephemeral"}
        final = b["messages"][-1]["content"]
        assert final[-2]["cache_control"] and "cache_control" not in final[-1]  # the state is never cached
        assert final[-1]["text"].startswith("# State now")
    last = reqs[-1]["body"]["messages"]
    assert last[-3]["content"][-1]["cache_control"]  # where the previous request's last breakpoint was
    # outcomes: tool results of the calls they answer, first in their turn, with the run's figures
    kept = blocks_of(reqs[1], "tool_result")[-1]
    assert kept["content"].startswith("KEPT (exp-001)") and "312 steps, 21.3k tok/s, 1.25 GB" in kept["content"]
    bad = blocks_of(reqs[2], "tool_result")[-1]
    assert bad["is_error"] is True and "does not apply" in bad["content"] and "Correct exactly that" in bad["content"]
    others = last_user(reqs[2])[1]["text"]  # the lab's row since, listed after the outcome
    assert others.startswith("Ledger rows since your last proposal") and "- exp-002-c1 [lab] confirm" in others
    crash_turn = last_user(reqs[3])
    assert crash_turn[0]["type"] == "tool_result" and crash_turn[0]["content"].startswith("CRASHED (exp-003")
    assert "## Last failure: exp-003" in crash_turn[-1]["text"] and "RuntimeError: boom" in crash_turn[-1]["text"]
    # prompt caching: the prefix is written once, then each request reads all that came before it
    u = [Usage.from_dict(x) for x in server.usage_log()]
    assert u[0].cache_creation_input_tokens > 1000 and u[0].cache_read_input_tokens == 0
    for a, b in zip(u, u[1:]):
        assert b.cache_read_input_tokens == a.cache_read_input_tokens + a.cache_creation_input_tokens
    assert server.totals()["cache_read_input_tokens"] / sum(x.prompt_tokens for x in u) > 0.6


def test_the_conversation_is_saved_and_a_resume_continues_it(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1, thinking="first thought"), good(2, thinking="second thought"), good(3))
    agent = agent_for(server)
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    step(agent, wt, hist, "exp-001")
    p2 = agent.propose(make_state(wt, hist))
    agent.close()  # the process ends with exp-002 in flight; the resumed loop runs it, then asks again
    hist.append(outcome(p2, "exp-002", "keep", 2.45, -0.05))
    saved = json.loads((tmp_path / "session" / CONVERSATION_FILE).read_text())
    assert saved["model"] == "claude-sonnet-4-6" and len(saved["turns"]) == 4
    again = agent_for(server)
    again.restore(hist, make_state(wt, hist))
    again.propose(make_state(wt, hist))
    r2, r3 = server.messages_requests()[1:]
    assert strip_cache(r3["body"]["messages"][:3]) == strip_cache(r2["body"]["messages"][:2] + [
        {"role": "user", "content": r2["body"]["messages"][2]["content"][:-1]}])
    assert r3["body"]["messages"][3]["content"][0]["thinking"] == "second thought"  # sent back unchanged
    answer = last_user(r3)[0]
    assert answer["tool_use_id"] == p2.meta["tool_use_id"] and answer["content"].startswith("KEPT (exp-002)")
    assert Usage.from_dict(server.usage_log()[2]).cache_read_input_tokens > 0 and server.requests[-1]["status"] == 200
