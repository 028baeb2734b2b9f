"""agent=claude against a local Messages API server (tests/messages_server.py), never the real API.

Unit tests drive ClaudeAgent the way the loop does (restore, propose, observe) and check what the
server received: the forced tool, the cached prefix, tool results for outcomes and refusals by
the loop, the handling of every stop reason, retries, pauses, cost accounting and caps. The
end-to-end test runs `python -m src.search agent=claude` as a subprocess against the server: a
session paused by its cost cap, resumed with a higher cap to 5 experiments (overrides, patches,
an invalid proposal and a crash), then checks the ledger, the branch and MLflow, and that the
API key appears nowhere on disk.

Run: python -m pytest tests/test_claude_agent.py -q
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.lab.agents.base import AgentStop, Best, SearchState
from src.lab.agents.claude import USAGE_FILE, ClaudeAgent, Usage, price_for
from src.lab.agents.claude_context import TOOL_NAME, history_table
from src.config import TrainConfig
from src.lab.config import ClaudeAgentConfig, ClaudePrice
from src.lab.ledger import Experiment
from src.lab.proposal import Proposal
from tests.conftest import REPO
from tests.messages_server import MessagesServer, error, max_tokens, refusal, text, tool_use
from tests.search_support import crash_patch, make_patch, make_repo, read_tsv, session_children

KEY = "sk-ant-test-7d1c2b9e-never-store-me"
PRICE = ClaudePrice(input=3.0, output=15.0, cache_write=3.75, cache_read=0.30)
SHA = "a" * 40


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def server():
    with MessagesServer(api_key=KEY) as srv:
        yield srv


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    return KEY


def make_cfg(server: MessagesServer, **kw) -> ClaudeAgentConfig:
    base = dict(base_url=server.url, prices={"claude-sonnet-4-6": PRICE}, max_retries=2, patience_s=0.0,
                retry_wait_s=0.01, timeout_s=10.0, max_tokens=1024)
    return ClaudeAgentConfig(**{**base, **kw})


def worktree(tmp_path: Path) -> Path:
    """A session directory whose worktree holds the editable files, the config groups and program.md."""
    wt = tmp_path / "session" / "worktree"
    for rel in ("src/model.py", "src/optim.py", "program.md"):
        (wt / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, wt / rel)
    for group in ("model", "optimizer", "batch"):
        shutil.copytree(REPO / "conf" / group, wt / "conf" / group)
    (tmp_path / "session" / "runs").mkdir()
    return wt


def row(exp: str, status: str, val: float | None = None, delta: float | None = None, desc: str = "",
        reason: str = "", proposal: Proposal | None = None, run_status: str = "ok") -> Experiment:
    return Experiment(exp=exp, status=status, description=desc or exp, val_bpb=val, delta=delta, reason=reason,
                      kind="baseline" if status == "baseline" else "overrides", margin=0.01, run_status=run_status,
                      commit=SHA, proposal=proposal)


def make_state(wt: Path, history: list[Experiment], best: Best | None = None) -> SearchState:
    cfg = TrainConfig()
    return SearchState(tag="t1", best=best or Best("baseline", SHA, 2.5, []), margin=0.01, sigma=0.004,
                       history=history, editable=["src/model.py", "src/optim.py"],
                       override_roots=["model", "optimizer", "batch"], pinned=["device.type"],
                       base_overrides=["device.type=cpu"], worktree=wt, base_config=cfg, best_config=cfg,
                       experiments_left=5, seconds_left=3600.0)


BASE = [row("base-1", "baseline", 2.50), row("base-2", "baseline", 2.51)]


def good(i: int = 1, **kw) -> dict:
    return tool_use({"description": f"matrix lr 0.0{i + 2}", "hypothesis": f"idea {i}: a higher LR helps",
                     "overrides": [f"optimizer.matrix_lr=0.0{i + 2}"], **kw})


def outcome(p: Proposal, exp: str, status: str, val: float | None = None, delta: float | None = None,
            reason: str = "", run_status: str = "ok") -> Experiment:
    return row(exp, status, val, delta, p.description, reason, p, run_status)


def last_user(req: dict) -> list[dict]:
    return req["body"]["messages"][-1]["content"]


def blocks_of(req: dict, kind: str) -> list[dict]:
    return [b for m in req["body"]["messages"] if m["role"] == "user" for b in m["content"]
            if isinstance(b, dict) and b.get("type") == kind]


# ---------------------------------------------------------------------------- a session of proposals


def test_a_session_of_proposals_is_one_valid_conversation_with_a_cached_prefix(server, key, tmp_path):
    wt = worktree(tmp_path)
    patch = ("--- a/src/optim.py\n+++ b/src/optim.py\n@@ -1,1 +1,1 @@\n-x\n+y\n")
    server.script(good(1), tool_use({"description": "patch the schedule", "hypothesis": "h2", "patch": patch}),
                  good(3), good(4))
    agent = ClaudeAgent(make_cfg(server))
    agent.preflight()
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))

    p1 = agent.propose(make_state(wt, hist))
    assert p1.overrides == ["optimizer.matrix_lr=0.03"] and p1.hypothesis == "idea 1: a higher LR helps"
    e1 = outcome(p1, "exp-001", "keep", 2.40, -0.10)
    hist.append(e1)
    agent.observe(e1, make_state(wt, hist))
    p2 = agent.propose(make_state(wt, hist, Best("exp-001", SHA, 2.40, ["optimizer.matrix_lr=0.03"])))
    assert p2.patch == patch and p2.kind == "patch"
    e2 = outcome(p2, "exp-002", "invalid", reason="the patch does not apply to the best commit aaaaaaa: corrupt")
    hist.append(e2)
    agent.observe(e2, make_state(wt, hist))
    p3 = agent.propose(make_state(wt, hist))
    e3 = outcome(p3, "exp-003", "crash", reason="RuntimeError: boom", run_status="crash")
    (tmp_path / "session" / "runs" / "exp-003").mkdir()
    (tmp_path / "session" / "runs" / "exp-003" / "run.log").write_text("step 1\nTraceback...\nRuntimeError: boom\n")
    hist.append(e3)
    agent.observe(e3, make_state(wt, hist))
    agent.propose(make_state(wt, hist))

    reqs = server.messages_requests()
    assert len(reqs) == 4 and all(r["status"] == 200 for r in server.requests)  # the server refuses malformed chats
    for r in reqs:
        b = r["body"]
        assert r["headers"]["authorization"] == f"Bearer {KEY}"
        assert [t["name"] for t in b["tools"]] == [TOOL_NAME]
        assert b["tool_choice"] == {"type": "tool", "name": TOOL_NAME, "disable_parallel_tool_use": True}
        assert b["system"][0]["cache_control"] == {"type": "ephemeral"}
        assert not {"temperature", "top_p", "top_k"} & set(b) and b["model"] == "claude-sonnet-4-6"
    system = reqs[0]["body"]["system"][0]["text"]
    assert "## How results are judged" in system  # program.md
    assert "class GPT(nn.Module)" in system and "def build_optimizer" in system  # the editable files
    assert "class OptimizerConfig" in system and "conf/batch/small.yaml" in system  # schemas and group options
    first = last_user(reqs[0])[-1]["text"]
    assert "| base-2 | baseline | 2.510000 |" in first and "margin 0.0100" in first and "val_bpb < 2.490000" in first
    # outcomes come back as tool results of the tool_use they answer
    kept = blocks_of(reqs[1], "tool_result")[-1]
    assert kept["tool_use_id"] == p1.meta["tool_use_id"] and kept["content"].startswith("KEPT (exp-001)")
    assert not kept.get("is_error")
    bad = blocks_of(reqs[2], "tool_result")[-1]
    assert bad["tool_use_id"] == p2.meta["tool_use_id"] and bad["is_error"] is True
    assert "does not apply" in bad["content"] and "Correct exactly that" in bad["content"]
    crash_turn = last_user(reqs[3])
    assert crash_turn[0]["content"].startswith("CRASHED (exp-003")
    assert "## Last failure: exp-003" in crash_turn[-1]["text"] and "RuntimeError: boom" in crash_turn[-1]["text"]
    # the state of earlier turns is not re-sent: only the latest turn carries the history table
    assert sum("| base-1 |" in b.get("text", "") for m in reqs[3]["body"]["messages"] for b in m["content"]) == 1
    # prompt caching: the prefix is written once, then read
    u = [Usage.from_dict(p.meta["usage"]) for p in (p1, p2, p3)]
    assert u[0].cache_creation_input_tokens > 1000 and u[0].cache_read_input_tokens == 0
    assert u[1].cache_read_input_tokens == u[0].cache_creation_input_tokens and u[1].cache_creation_input_tokens == 0


def test_the_prefix_changes_with_the_best_commit(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1), good(2))
    agent = ClaudeAgent(make_cfg(server))
    hist = list(BASE)
    p1 = agent.propose(make_state(wt, hist))
    e1 = outcome(p1, "exp-001", "keep", 2.40, -0.10)
    hist.append(e1)
    agent.observe(e1, make_state(wt, hist))
    (wt / "src" / "optim.py").write_text((wt / "src" / "optim.py").read_text() + "\n# kept change\n")
    p2 = agent.propose(make_state(wt, hist, Best("exp-001", "b" * 40, 2.40, [])))
    s1, s2 = (r["body"]["system"][0]["text"] for r in server.messages_requests())
    assert "# kept change" in s2 and "# kept change" not in s1 and "bbbbbbb" in s2
    assert Usage.from_dict(p2.meta["usage"]).cache_creation_input_tokens > 0


def test_invalid_proposals_are_corrected_then_abandoned(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1), good(2), good(3))
    agent = ClaudeAgent(make_cfg(server, fix_attempts=2))
    hist = list(BASE)
    for i in (1, 2):
        p = agent.propose(make_state(wt, hist))
        e = outcome(p, f"exp-00{i}", "invalid", reason="optimizer.matrx_lr: Key 'matrx_lr' not in 'OptimizerConfig'")
        hist.append(e)
        agent.observe(e, make_state(wt, hist))
    agent.propose(make_state(wt, hist))
    r2, r3 = server.messages_requests()[1:]
    assert "Correct exactly that" in blocks_of(r2, "tool_result")[-1]["content"]
    last = blocks_of(r3, "tool_result")[-1]
    assert last["is_error"] is True and "2 invalid proposals in a row: drop this idea" in last["content"]


# ---------------------------------------------------------------------------- stop reasons


@pytest.mark.parametrize("bad,problem", [
    (text("Let me think about the learning rate first."), "end_turn without a propose_experiment call"),
    (max_tokens({"description": "half a patch"}), "reply cut at max_tokens=1024"),
    (refusal("declined"), "refusal (declined)"),
    (tool_use({"description": "no hypothesis", "overrides": "optimizer.matrix_lr=0.05"}), "malformed tool input"),
    (tool_use({"description": "d", "hypothesis": "h", "overides": ["x=1"]}), "malformed tool input"),
    (tool_use({"description": "d", "hypothesis": "h"}), "neither overrides nor a patch"),
])
def test_every_stop_reason_is_reasked_not_a_crash(server, key, tmp_path, bad, problem):
    wt = worktree(tmp_path)
    server.script(bad, good(1), good(2))
    agent = ClaudeAgent(make_cfg(server))
    hist = list(BASE)
    p = agent.propose(make_state(wt, hist))
    assert p.overrides == ["optimizer.matrix_lr=0.03"] and p.meta["attempts"] == 2
    assert any(problem in s for s in p.meta["problems"]), p.meta["problems"]
    assert p.meta["usage"]["calls"] == 2  # the failed reply is paid for and counted
    retry = server.messages_requests()[1]["body"]["messages"]
    sent = json.dumps(retry)
    if bad["kind"] == "tool_use":  # malformed input: answered as an error tool_result
        assert retry[-1]["content"][0]["is_error"] is True and "Malformed" in retry[-1]["content"][0]["content"]
    elif bad["kind"] == "text":  # the text reply stays in the conversation, followed by the instruction
        assert retry[-2]["role"] == "assistant" and "Answer only by calling" in sent
    else:  # max_tokens / refusal: the cut or refused reply is not kept; a note says what to do
        assert len(retry) == 1 and ("output limit" in sent or "refusal" in sent)
    # the conversation goes on normally afterwards
    e = outcome(p, "exp-001", "discard", 2.52, 0.02)
    agent.observe(e, make_state(wt, hist + [e]))
    assert agent.propose(make_state(wt, hist + [e])).overrides == ["optimizer.matrix_lr=0.04"]


def test_no_usable_reply_pauses_the_session_and_the_conversation_survives(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1), text(), max_tokens(), refusal(), good(2))
    agent = ClaudeAgent(make_cfg(server, attempts=3))
    hist = list(BASE)
    p = agent.propose(make_state(wt, hist))
    e = outcome(p, "exp-001", "discard", 2.52, 0.02)
    hist.append(e)
    agent.observe(e, make_state(wt, hist))
    with pytest.raises(AgentStop) as err:
        agent.propose(make_state(wt, hist))
    msg = str(err.value)
    assert "no usable proposal after 3 replies" in msg and "search.tag=t1 search.resume=true agent=claude" in msg
    # a later propose() (a resumed loop) answers the pending tool_use again and works
    p2 = agent.propose(make_state(wt, hist))
    assert p2.overrides == ["optimizer.matrix_lr=0.04"]
    assert blocks_of(server.messages_requests()[-1], "tool_result")[-1]["content"].startswith("DISCARDED (exp-001)")


# ---------------------------------------------------------------------------- API failures


def test_rate_limits_overload_and_5xx_are_retried_with_backoff(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(error(429), error(529), error(500), good(1))
    agent = ClaudeAgent(make_cfg(server, max_retries=3))
    p = agent.propose(make_state(wt, list(BASE)))
    assert p.overrides == ["optimizer.matrix_lr=0.03"]
    assert [r["status"] for r in server.requests] == [429, 529, 500, 200]
    assert p.meta["usage"]["calls"] == 1  # errors are not billed


def test_models_that_refuse_forced_tool_use_get_tool_choice_auto(key, tmp_path):
    wt = worktree(tmp_path)
    with MessagesServer(api_key=KEY, forced_tools=False) as srv:
        srv.script(tool_use({"description": "d1", "hypothesis": "h1", "overrides": ["model.depth=3"]},
                            thinking="The LR looks high for this budget."), text("Here is my plan."), good(2))
        agent = ClaudeAgent(make_cfg(srv))
        hist = list(BASE)
        p = agent.propose(make_state(wt, hist))
        e = outcome(p, "exp-001", "discard", 2.6, 0.1)
        agent.observe(e, make_state(wt, hist + [e]))
        p2 = agent.propose(make_state(wt, hist + [e]))  # a text reply first: re-asked under tool_choice auto
        assert p.overrides == ["model.depth=3"] and p2.overrides == ["optimizer.matrix_lr=0.04"]
        assert [r["status"] for r in srv.requests] == [400, 200, 200, 200]
        assert all(r["body"]["tool_choice"]["type"] == "auto" for r in srv.messages_requests())
        # the thinking block goes back unchanged, before the tool_use it led to
        first_turn = srv.messages_requests()[1]["body"]["messages"][1]["content"]
        assert first_turn[0] == {"type": "thinking", "thinking": "The LR looks high for this budget.",
                                 "signature": first_turn[0]["signature"]} and first_turn[1]["type"] == "tool_use"


def test_a_persistent_failure_pauses_with_a_clear_message(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.fallback = error(529)
    agent = ClaudeAgent(make_cfg(server, max_retries=1, patience_s=0.3, retry_wait_s=0.05))
    t0 = time.monotonic()
    with pytest.raises(AgentStop) as err:
        agent.propose(make_state(wt, list(BASE)))
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "kept failing" in msg and "HTTP 529" in msg and "search.resume=true agent=claude" in msg
    assert len(server.requests) >= 4  # SDK retries, then our own tries within patience_s
    assert agent.spent.calls == 0 and agent.spent.cost_usd == 0


def test_the_prompt_is_condensed_when_the_api_says_it_is_too_long(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(error(400, "prompt is too long: 210000 tokens > 200000 maximum"), good(1))
    agent = ClaudeAgent(make_cfg(server))
    p = agent.propose(make_state(wt, list(BASE)))
    assert p.meta["attempts"] == 2 and agent.shrink < 1


def test_missing_key_or_unreachable_api_fails_before_any_training(server, monkeypatch, tmp_path):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(AgentStop) as err:
        ClaudeAgent(make_cfg(server))
    assert "$ANTHROPIC_API_KEY, which is not set" in str(err.value) and "agent=tpe" in str(err.value)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-wrong")
    with pytest.raises(AgentStop) as err:
        ClaudeAgent(make_cfg(server)).preflight()
    assert "rejected the key" in str(err.value) and "401" in str(err.value) and "agent=replay" in str(err.value)
    assert "sk-wrong" not in str(err.value)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    closed = MessagesServer()
    dead_url = closed.url
    closed.httpd.server_close()  # nothing listens there now
    with pytest.raises(AgentStop) as err:
        ClaudeAgent(make_cfg(server, base_url=dead_url, max_retries=0)).preflight()
    assert "cannot reach the Anthropic API" in str(err.value) and "agent=tpe" in str(err.value)
    server.models = ["claude-sonnet-4-6"]
    with pytest.raises(AgentStop) as err:
        ClaudeAgent(make_cfg(server, model="claude-sonnet-4-6-20260101")).preflight()
    assert "does not know model 'claude-sonnet-4-6-20260101'" in str(err.value)
    with pytest.raises(AgentStop, match=r"has no price in agent.prices"):
        ClaudeAgent(make_cfg(server, model="claude-unknown-9"))
    ClaudeAgent(make_cfg(server)).preflight()  # the good case passes
    assert server.requests[-1]["path"] == "/v1/messages/count_tokens"
    assert not server.messages_requests()  # no paid request was made by any check


# ---------------------------------------------------------------------------- accounting and caps


def test_cost_is_accounted_per_proposal_and_session_and_the_cap_holds_across_resume(server, key, tmp_path):
    wt = worktree(tmp_path)
    u = {"input_tokens": 100_000, "output_tokens": 2_000, "cache_creation_input_tokens": 10_000,
         "cache_read_input_tokens": 50_000}
    per_call = (100_000 * 3 + 2_000 * 15 + 10_000 * 3.75 + 50_000 * 0.30) / 1e6  # $0.3825
    server.script(*[tool_use({"description": f"d{i}", "hypothesis": "h", "overrides": [f"model.depth={i}"]},
                             usage=u) for i in range(2, 8)])
    agent = ClaudeAgent(make_cfg(server, max_cost_usd=0.8))
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    for i in (1, 2):
        p = agent.propose(make_state(wt, hist))
        assert p.meta["usage"]["cost_usd"] == pytest.approx(per_call)
        assert p.meta["metrics"]["agent/input_tokens"] == 100_000
        assert p.meta["metrics"]["agent/session_cost_usd"] == pytest.approx(i * per_call)
        assert f"1 call, 160,000 in (50,000 cached) + 2,000 out tokens, ${per_call:.4f}" in p.meta["commit_note"]
        e = outcome(p, f"exp-00{i}", "discard", 2.6, 0.1)
        hist.append(e)
        agent.observe(e, make_state(wt, hist))
    saved = json.loads((tmp_path / "session" / USAGE_FILE).read_text())
    assert saved["session"]["cost_usd"] == pytest.approx(2 * per_call) and saved["proposals"] == 2
    assert agent.usage()["agent/cost_usd"] == pytest.approx(2 * per_call)
    # $0.765 spent; the next request could cost ~$0.06 (its prompt all written to the cache + max_tokens out)
    n = len(server.requests)
    with pytest.raises(AgentStop) as err:
        agent.propose(make_state(wt, hist))
    assert len(server.requests) == n  # stopped before asking
    msg = str(err.value)
    assert "the session has spent $0.7650" in msg and "would cross agent.max_cost_usd=$0.80" in msg
    assert "agent.max_cost_usd=1.8" in msg
    assert "search.tag=t1 search.resume=true agent=claude" in msg
    # a new invocation (resume) reads the spend back: the same cap still holds, a higher one continues
    again = ClaudeAgent(make_cfg(server, max_cost_usd=0.8))
    again.restore(hist, make_state(wt, hist))
    assert again.spent.cost_usd == pytest.approx(2 * per_call)
    with pytest.raises(AgentStop):
        again.propose(make_state(wt, hist))
    raised = ClaudeAgent(make_cfg(server, max_cost_usd=2.0))
    raised.restore(hist, make_state(wt, hist))
    assert raised.propose(make_state(wt, hist)).meta["session_cost_usd"] == pytest.approx(3 * per_call)


def test_the_token_cap_stops_too(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(tool_use({"description": "d", "hypothesis": "h", "overrides": ["model.depth=3"]},
                           usage={"input_tokens": 40_000, "output_tokens": 1_000, "cache_creation_input_tokens": 0,
                                  "cache_read_input_tokens": 0}), good(2))
    # the next request could add its prompt (thousands of tokens) + max_tokens=1024: past 43,000
    agent = ClaudeAgent(make_cfg(server, max_session_tokens=43_000))
    hist = list(BASE)
    p = agent.propose(make_state(wt, hist))
    e = outcome(p, "exp-001", "discard", 2.6, 0.1)
    agent.observe(e, make_state(wt, hist + [e]))
    with pytest.raises(AgentStop, match=r"has used 41,000 tokens.*agent.max_session_tokens=43,000"):
        agent.propose(make_state(wt, hist + [e]))


def test_the_spend_is_rebuilt_from_the_ledger_when_the_usage_file_is_gone(server, key, tmp_path):
    wt = worktree(tmp_path)
    p = Proposal("d", "h", ["model.depth=3"], meta={"agent": "claude", "usage": Usage(1, 10, 20, 30, 40, 0.5).to_dict()})
    hist = BASE + [outcome(p, "exp-001", "discard", 2.6, 0.1), outcome(p, "exp-002", "invalid", reason="x")]
    agent = ClaudeAgent(make_cfg(server))
    agent.restore(hist, make_state(wt, hist))
    assert agent.spent.cost_usd == pytest.approx(1.0) and agent.spent.tokens == 200 and agent.fix_streak == 1


def test_prices_match_models_and_their_dated_snapshots():
    prices = {"claude-sonnet-4-5": PRICE, "claude-sonnet-4": ClaudePrice(9, 9, 9, 9)}
    assert price_for("claude-sonnet-4-5-20250929", prices) is PRICE
    for unknown in ("claude-sonnet-4-5-turbo", "claude-sonnet-4-6"):  # no guessing from a family name
        with pytest.raises(AgentStop):
            price_for(unknown, prices)
    u = Usage.of_reply(type("U", (), {"input_tokens": 1_000_000, "output_tokens": 1_000_000,
                                      "cache_creation_input_tokens": None, "cache_read_input_tokens": None})(), PRICE)
    assert u.cost_usd == pytest.approx(18.0) and u.tokens == 2_000_000


def test_conf_agent_claude_composes_with_a_price_for_its_model():
    from tests.search_support import compose_search

    cfg = compose_search(["agent=claude"]).agent
    assert isinstance(cfg, ClaudeAgentConfig) and price_for(cfg.model, cfg.prices).output > 0
    assert cfg.force_tool and cfg.cache and cfg.preflight and cfg.max_cost_usd > 0
    added = compose_search(["agent=claude", "agent.model=my-model",
                            "+agent.prices={my-model: {input: 1, output: 5, cache_write: 1.25, cache_read: 0.1}}"]).agent
    assert price_for(added.model, added.prices) == ClaudePrice(1, 5, 1.25, 0.1)
    with pytest.raises(Exception, match="inptu"):
        compose_search(["agent=claude", "+agent.prices={m: {inptu: 1}}"])


# ---------------------------------------------------------------------------- the context budget


def test_a_long_history_is_condensed_to_the_token_budget(server, key, tmp_path):
    wt = worktree(tmp_path)
    hist = list(BASE)
    for i in range(1, 301):
        st = "keep" if i in (40, 200) else "crash" if i % 7 == 0 else "discard"
        hist.append(row(f"exp-{i:03d}", st, 2.4 + i / 1e4, 0.01, desc=f"a fairly long description of idea {i} " * 3,
                        reason="RuntimeError: a long reason " * 10 if st == "crash" else ""))
    big = "--- a/src/model.py\n+++ b/src/model.py\n" + "".join(f"+# line {i} of a long patch\n" for i in range(300))
    server.fallback = tool_use({"description": "a long patch", "hypothesis": "h", "patch": big})
    agent = ClaudeAgent(make_cfg(server, context_tokens=20_000))
    for i in range(6):  # several turns of ~3k tokens each: the oldest are dropped to stay in budget
        p = agent.propose(make_state(wt, hist))
        e = outcome(p, f"exp-{301 + i}", "discard", 2.6, 0.1)
        agent.observe(e, make_state(wt, hist))
    req = server.messages_requests()[-1]["body"]
    assert 1 <= sum(m["role"] == "assistant" for m in req["messages"]) < 5  # older turns dropped ...
    first = req["messages"][0]["content"]  # ... and the outcome of a dropped tool call became plain text
    assert first[0]["type"] == "text" and first[0]["text"].startswith("(Outcome of an earlier proposal) DISCARDED")
    size = len(json.dumps([req["system"], req["tools"], req["messages"]]))
    assert size / 3.0 <= 20_000  # the estimate the agent budgets with
    state = last_user(server.messages_requests()[-1])[-1]["text"]
    assert "older rows condensed" in state and "| exp-040 | keep |" in state and "| exp-200 | keep |" in state
    assert "| exp-300 | discard |" in state and "| base-1 | baseline |" in state
    assert all(r["status"] == 200 for r in server.requests)  # dropping old turns keeps the chat valid


def test_history_table_is_compact_and_fits():
    rows = BASE + [row(f"exp-{i:03d}", "discard", 2.6, 0.1, desc="x" * 300) for i in range(1, 50)]
    t = history_table(rows, 3000)
    assert len(t) <= 3000 and "older rows condensed: " in t and "| exp-049 |" in t


# ---------------------------------------------------------------------------- end to end through the CLI

TINY_SEARCH = ["device=cpu", "model.depth=2", "budget.mode=tokens", "budget.tokens=8192", "batch.total_tokens=2048",
               "batch.device_tokens=2048", "data.eval_tokens=8192", "search.baseline_repeats=1",
               "search.preflight=false", "search.progress=false"]


def _search(args: list[str], env: dict, tmp: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.search", *args, f"hydra.run.dir={tmp / 'hydra' / name}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_cli_session_pauses_at_its_cost_cap_resumes_and_leaks_no_key(tmp_path, isolated_env):
    repo = make_repo(tmp_path)  # a copy: the session's branch and worktree stay out of the real checkout
    floor = make_patch(repo, "src/optim.py", lambda t: t.replace(
        "    return cooldown + (1 - cooldown) * cfg.final_lr_frac\n",
        "    return max(cooldown + (1 - cooldown) * cfg.final_lr_frac, 0.05)\n"))
    assert floor
    u = {"input_tokens": 100_000, "output_tokens": 1_000, "cache_creation_input_tokens": 0,
         "cache_read_input_tokens": 0}  # $0.315 a reply at $3/$15
    replies = [
        {"description": "higher matrix LR", "hypothesis": "H1: more steps at a higher LR",
         "overrides": ["optimizer.matrix_lr=0.06"]},
        {"description": "linear cooldown to a floor of 5%", "hypothesis": "H2: a non-zero floor keeps learning",
         "patch": floor},
        {"description": "typo'd key", "hypothesis": "H3: invalid on purpose", "overrides": ["optimizer.matrx_lr=0.1"]},
        {"description": "a model that crashes", "hypothesis": "H4: crashes on purpose", "patch": crash_patch(repo)},
        {"description": "lower embedding LR", "hypothesis": "H5: the embedding LR is too high",
         "overrides": ["optimizer.embedding_lr=0.3"]},
        {"description": "warmdown 0.3", "hypothesis": "H6: warm down later", "overrides": ["optimizer.warmdown_ratio=0.3"]},
    ]
    root, mlruns = tmp_path / "research", isolated_env / "mlruns"
    env = {**os.environ, "ANTHROPIC_API_KEY": KEY}
    with MessagesServer(api_key=KEY) as srv:
        srv.script(*[tool_use(r, usage=u) for r in replies])
        common = ["agent=claude", f"agent.base_url={srv.url}", "agent.max_tokens=1024", f"search.repo={repo}",
                  f"search.root={root}", "search.tag=cc", "search.max_experiments=5", *TINY_SEARCH]
        # 1) cap $0.65: two replies cost $0.63, a third could cross it -> paused after two proposals
        p1 = _search([*common, "agent.max_cost_usd=0.65"], env, tmp_path, "first")
        assert p1.returncode == 0, p1.stderr[-3000:]
        out1 = p1.stdout + p1.stderr
        assert "would cross agent.max_cost_usd=$0.65" in out1 and "search.resume=true" in out1
        assert srv.pending == 4
        # 2) resume with a higher cap: runs to 5 experiments
        p2 = _search([*common, "search.resume=true", "agent.max_cost_usd=5"], env, tmp_path, "second")
        assert p2.returncode == 0, p2.stderr[-3000:]
        assert "search.max_experiments=5 reached" in p2.stdout + p2.stderr
        assert srv.pending == 0
        assert all(r["headers"].get("authorization") == f"Bearer {KEY}" for r in srv.requests)

    sdir = root / "cc"
    rows = read_tsv(sdir / "results.tsv")
    assert [r["exp"] for r in rows] == ["base-1"] + [f"exp-00{i}" for i in range(1, 7)]
    assert rows[0]["status"] == "baseline" and rows[3]["status"] == "invalid" and rows[4]["status"] == "crash"
    assert {rows[i]["status"] for i in (1, 2, 5, 6)} <= {"keep", "discard"}, [r["status"] for r in rows]
    assert "matrx_lr" in rows[3]["reason"]
    assert [r["hypothesis"] for r in rows[1:]] == [r["hypothesis"] for r in replies]
    for i in range(1, 7):
        meta = json.loads((sdir / "proposals" / f"exp-00{i}.json").read_text())["proposal"]["meta"]
        assert meta["usage"]["input_tokens"] == 100_000 and meta["usage"]["cost_usd"] == pytest.approx(0.315)
    spent = json.loads((sdir / USAGE_FILE).read_text())["session"]
    assert spent["calls"] == 6 and spent["cost_usd"] == pytest.approx(6 * 0.315)
    # the branch: each candidate commit carries the hypothesis and the agent's tokens and cost
    log = subprocess.run(["git", "log", "--format=%B", "refs/research/cc/exp-005"], cwd=repo, capture_output=True,
                         text=True, check=True).stdout
    assert "Hypothesis: H5: the embedding LR is too high" in log
    assert "Agent: claude-sonnet-4-6: 1 call, 100,000 in + 1,000 out tokens, $0.3150" in log
    # MLflow: a child per experiment with the hypothesis and token metrics; the session's totals on the parent
    from mlflow.tracking import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    parent = MlflowClient(tracking_uri=uri).get_run(json.loads((sdir / "state.json").read_text())["parent_run_id"])
    kids = {r.data.tags.get("search.exp"): r for r in session_children(uri, parent.info.run_id)}
    for i, rep in enumerate(replies, 1):
        k = kids[f"exp-00{i}"]
        assert k.data.tags["search.hypothesis"] == rep["hypothesis"]
        assert k.data.metrics["agent/input_tokens"] == 100_000 and k.data.metrics["agent/output_tokens"] == 1_000
        assert k.data.metrics["agent/cost_usd"] == pytest.approx(0.315)
    assert parent.data.metrics["agent/cost_usd"] == pytest.approx(6 * 0.315)
    assert parent.data.metrics["agent/calls"] == 6
    # the key is nowhere on disk: session, Hydra dirs, MLflow db and artifacts (bytes, not just text)
    def holding_key(*dirs: Path) -> list[Path]:
        return [p for d in dirs for p in d.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]

    assert not holding_key(root, tmp_path / "hydra", mlruns, repo)
    assert any(p.name == "mlflow.db" for p in mlruns.rglob("*"))  # the scan did read the store's db
    (tmp_path / "canary").mkdir()
    (tmp_path / "canary" / "x.db").write_bytes(b"\0\1" + KEY.encode() + b"\0")
    assert holding_key(tmp_path / "canary")  # and would have found a leak
