"""agent=claude's requests (src/lab/agents/claude_prompt.py): the static prefix is rebuilt only when a kept
patch changes it, and a conversation that outgrows agent.context_tokens is condensed into a digest in one
step, the journal kept. Against the local Messages API (src/lab/fakes/messages_server.py).

Run: python -m pytest -q tests/lab/agents/test_claude_prompt.py
"""
from __future__ import annotations

import json

from src.lab.agents.base import Best
from src.lab.agents.claude_api import Usage
from src.lab.proposal import Proposal
from tests.support.claude import BASE, SHA, agent_for, good, make_state, outcome, step, worktree


def test_a_kept_patch_changes_the_prefix_a_kept_override_does_not(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1), good(2), good(3))
    agent = agent_for(server)
    hist = list(BASE)
    step(agent, wt, hist, "exp-001", "keep", 2.40, -0.10)
    best = Best("exp-001", SHA, 2.40, ["optimizer.matrix_lr=0.03"])  # an override kept: the files are the same
    agent.propose(make_state(wt, hist, best))
    hist.append(outcome(Proposal("p", overrides=["x=1"], meta={"tool_use_id": "toolu_0002"}), "exp-002", "keep",
                        2.3, -0.1))
    (wt / "src" / "research" / "optim.py").write_text((wt / "src" / "research" / "optim.py").read_text() + "\n# kept change\n")
    agent.propose(make_state(wt, hist, Best("exp-002", "b" * 40, 2.30, [])))
    s1, s2, s3 = (r["body"]["system"][0]["text"] for r in server.messages_requests())
    assert s1 == s2 and "# kept change" in s3 and "# kept change" not in s2
    assert "matrix_lr: 0.03" not in s2  # the config at the best lives in the state block, not in the cached prefix
    u3 = Usage.from_dict(server.usage_log()[2])
    assert u3.cache_read_input_tokens == 0 and u3.cache_creation_input_tokens > 1000  # a new prefix is written


def test_the_conversation_is_condensed_in_one_step_and_the_journal_survives(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.responder = lambda body, n: good(n + 1, thinking="long thought " * 300)
    agent = agent_for(server, context_tokens=22_000)
    hist = list(BASE)
    for i in range(1, 13):
        step(agent, wt, hist, f"exp-{i:03d}")
    lengths = [len(r["body"]["messages"]) for r in server.messages_requests()]
    drops = [i for i, (a, b) in enumerate(zip(lengths, lengths[1:])) if b < a]
    assert drops and all(lengths[i + 1] == 1 for i in drops)  # condensed to the digest alone, in one step
    assert len(drops) <= 3 and max(lengths) >= 9  # large chunks: many turns between two condensations
    after = server.messages_requests()[drops[0] + 1]["body"]["messages"][0]["content"]
    assert after[0]["text"].startswith("# The session so far") and "| exp-001 | claude | discard |" in after[0]["text"]
    assert "lesson 1" in after[-1]["text"]  # the journal is in the state of every turn, condensed or not
    for r in server.messages_requests():
        size = len(json.dumps([r["body"]["system"], r["body"]["tools"], r["body"]["messages"]]))
        assert size / 3.0 <= 22_000  # the estimate the agent budgets with
    assert all(r["status"] == 200 for r in server.requests)
