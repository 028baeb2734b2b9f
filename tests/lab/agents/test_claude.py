"""agent=claude (src/lab/agents/claude.py) driven the way the loop drives it (restore, propose, observe),
against a local Messages API server (src/lab/fakes/messages_server.py), never the real API: every stop reason
re-asked, refusals (rephrased, then the turn dropped, then the fallback), a spend limit and an outage
handed to the fallback agent (on the server's clock: no real waiting), the key and the API checked before
any training, and cost accounted per proposal and session, its cap holding across a resume. The end-to-end
test runs `python -m src.search agent=claude` as a subprocess: a session paused by its cost cap
(agent.fallback=none), resumed with a higher cap, then checks the ledger, the branch and MLflow, and that
the API key appears nowhere on disk.

Run: python -m pytest -q tests/lab/agents/test_claude.py   (without the end-to-end CLI session: -m "not slow")
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from src.lab.fakes.messages_server import MessagesServer, max_tokens, refusal, spend_limit, text, tool_use
from src.lab.agents.base import AgentStop
from src.lab.agents.claude import JOURNAL_FILE, USAGE_FILE
from src.lab.agents.claude_api import Usage
from src.lab.proposal import Proposal
from tests.support.claude import (BASE, KEY, agent_for, good, idea, last_user, make_state, outcome, step, strip_cache,
                                  worktree)
from tests.support.helpers import crash_patch, git, make_patch, make_repo, read_tsv, run_cli, session_children


# ---------------------------------------------------------------------------- stop reasons and refusals


@pytest.mark.slow
@pytest.mark.parametrize("bad,problem", [
    (text("Let me think about the learning rate first."), "end_turn without a propose_experiment call"),
    (max_tokens({"description": "half a patch"}), "reply cut at max_tokens=4096"),
    (tool_use({"description": "no hypothesis", "overrides": "optimizer.matrix_lr=0.05"}), "malformed tool input"),
    (tool_use({"description": "d", "hypothesis": "h", "overides": ["x=1"]}), "malformed tool input"),
    (tool_use({"description": "d", "hypothesis": "h"}), "neither overrides nor a patch"),
])
def test_every_stop_reason_is_reasked_not_a_crash(server, key, tmp_path, bad, problem):
    wt = worktree(tmp_path)
    server.script(bad, good(1), good(2))
    agent = agent_for(server)
    hist = list(BASE)
    p = agent.propose(make_state(wt, hist))
    assert p.overrides == ["optimizer.matrix_lr=0.03"] and p.meta["attempts"] == 2
    assert any(problem in s for s in p.meta["problems"]), p.meta["problems"]
    assert p.meta["usage"]["calls"] == 2  # the failed reply is paid for and counted
    retry = server.messages_requests()[1]["body"]["messages"]
    if bad["kind"] == "tool_use":  # malformed input: answered as an error tool_result
        assert retry[-1]["content"][0]["is_error"] is True and "Malformed" in retry[-1]["content"][0]["content"]
    elif bad["kind"] == "text":  # the text reply stays in the conversation, followed by the instruction
        assert retry[-2]["role"] == "assistant" and "Answer only by calling" in json.dumps(retry[-1])
    else:  # a cut reply is not kept; the state says what to do
        assert len(retry) == 1 and "output limit" in retry[-1]["content"][-1]["text"]
    e = outcome(p, "exp-001", "discard", 2.52, 0.02)
    agent.observe(e, make_state(wt, hist + [e]))
    assert agent.propose(make_state(wt, hist + [e])).overrides == ["optimizer.matrix_lr=0.04"]
    assert all(r["status"] == 200 for r in server.requests)


def test_a_refusal_is_rephrased_then_its_turn_dropped_then_the_fallback_proposes(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1), refusal(), refusal(), refusal(), good(2))
    agent = agent_for(server, fallback="tpe")
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    step(agent, wt, hist, "exp-001")
    p = step(agent, wt, hist, "exp-002")  # three refusals on this turn: the fallback proposes it
    assert p.meta["proposed_by"] == "tpe" and "no usable proposal after 3 replies" in p.meta["fallback_reason"]
    assert p.meta["fallback_reason"].count("refusal (frontier_llm)") == 3
    first, rephrased, dropped = (r["body"]["messages"] for r in server.messages_requests()[1:4])
    assert strip_cache(rephrased[:-1]) == strip_cache(first[:-1])  # rephrased: the same turns ...
    assert "stopped as a refusal" in rephrased[-1]["content"][-1]["text"]  # ... and a note, the state made plain
    assert "## Research config at the best" not in rephrased[-1]["content"][-1]["text"]
    assert len(dropped) == 1 and dropped[0]["content"][0]["text"].startswith("# The session so far")  # turn dropped
    q = step(agent, wt, hist, "exp-003")  # the next turn: Claude again (agent.probe_s=0), from the fresh digest
    assert q.meta["proposed_by"] == "claude" and server.messages_requests()[-1]["body"]["messages"][0]["content"][
        0]["text"].startswith("# The session so far")
    assert "| exp-002 | tpe |" in server.messages_requests()[-1]["body"]["messages"][0]["content"][0]["text"]


def test_without_a_fallback_no_usable_reply_pauses_and_the_conversation_survives(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1), text(), max_tokens(), text(), good(2))
    agent = agent_for(server, attempts=3)
    hist = list(BASE)
    step(agent, wt, hist, "exp-001")
    with pytest.raises(AgentStop) as err:
        agent.propose(make_state(wt, hist))
    msg = str(err.value)
    assert "no usable proposal after 3 replies" in msg and "search.tag=t1 search.resume=true agent=claude" in msg
    p2 = agent.propose(make_state(wt, hist))  # a resumed loop asks again: the conversation is still valid
    assert p2.overrides == ["optimizer.matrix_lr=0.04"] and all(r["status"] == 200 for r in server.requests)


# ---------------------------------------------------------------------------- API failures: never idle


def test_a_spend_limit_stops_claude_at_once_and_the_fallback_goes_on(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1), spend_limit(), good(2))
    agent = agent_for(server, fallback="tpe", max_retries=5)
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    step(agent, wt, hist, "exp-001")
    n = len(server.requests)
    p = step(agent, wt, hist, "exp-002")
    assert len(server.requests) == n + 1  # not retried: no retry fixes a spend limit
    assert p.meta["proposed_by"] == "tpe" and "spend limit is reached" in p.meta["fallback_reason"]
    assert "enforced_spend_limit_reached" in agent.stopped
    for i in range(3, 6):
        assert step(agent, wt, hist, f"exp-00{i}").meta["proposed_by"] == "tpe"
    assert len(server.requests) == n + 1 and server.pending == 1  # Claude is not asked again this session
    saved = json.loads((tmp_path / "session" / USAGE_FILE).read_text())
    assert saved["fallback_proposals"] == 4 and "spend limit" in saved["stopped"]


def test_an_outage_hands_over_to_the_fallback_and_claude_takes_back_when_it_answers(server_clock, key, tmp_path):
    server = server_clock  # the agent waits on the server's clock: server.advance() lets time pass at once
    wt = worktree(tmp_path)
    server.script(good(1), good(2), good(3))
    agent = agent_for(server, fallback="tpe", probe_s=0.5, probe_max_s=1.0, patience_s=0.3, retry_wait_s=0.05)
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    step(agent, wt, hist, "exp-001")
    server.outage(60)  # real seconds: it lasts until ended below
    t0 = server.now()
    by = [step(agent, wt, hist, f"exp-00{i}").meta["proposed_by"] for i in (2, 3)]
    assert by == ["tpe", "tpe"] and server.now() - t0 < 1.5  # no waiting on the API: the device keeps busy
    server.outage(0)  # the API answers again ...
    server.advance(1.6)  # ... and agent.probe_s has passed: Claude is asked again
    p = step(agent, wt, hist, "exp-004")
    assert p.meta["proposed_by"] == "claude" and agent.fallback_proposals == 2
    answer = last_user(server.messages_requests()[-1])
    assert answer[0]["content"].startswith("DISCARDED (exp-001)")  # its own proposal's outcome, then the others'
    assert "exp-002 [tpe]" in answer[1]["text"] and "exp-003 [tpe]" in answer[1]["text"]
    assert [e.agent for e in hist[2:]] == ["claude", "tpe", "tpe", "claude"]


def test_missing_key_or_unreachable_api_fails_before_any_training(server, monkeypatch, tmp_path):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(AgentStop) as err:
        agent_for(server)
    assert "$ANTHROPIC_API_KEY, which is not set" in str(err.value) and "agent=tpe" in str(err.value)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-wrong")
    with pytest.raises(AgentStop) as err:
        agent_for(server, fallback="tpe").preflight()  # a key problem stops even with a fallback: it needs you
    assert "rejected the key" in str(err.value) and "401" in str(err.value) and "agent=replay" in str(err.value)
    assert "sk-wrong" not in str(err.value)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    closed = MessagesServer()
    dead_url = closed.url
    closed.httpd.server_close()  # nothing listens there now
    with pytest.raises(AgentStop) as err:
        agent_for(server, base_url=dead_url).preflight()
    assert "cannot reach the Anthropic API" in str(err.value) and "agent=tpe" in str(err.value)
    agent_for(server, base_url=dead_url, fallback="tpe").preflight()  # with a fallback the night starts anyway
    server.models = ["claude-sonnet-4-6"]
    with pytest.raises(AgentStop) as err:
        agent_for(server, model="claude-sonnet-4-6-20260101").preflight()
    assert "does not know model 'claude-sonnet-4-6-20260101'" in str(err.value)
    with pytest.raises(AgentStop, match=r"has no price in agent.prices"):
        agent_for(server, model="claude-unknown-9")
    agent_for(server).preflight()  # the good case passes
    assert not server.messages_requests()  # no paid request was made by any check


# ---------------------------------------------------------------------------- accounting


def test_cost_is_accounted_per_proposal_and_session_and_the_cap_holds_across_resume(server, key, tmp_path):
    wt = worktree(tmp_path)
    u = {"input_tokens": 100_000, "output_tokens": 2_000, "cache_creation_input_tokens": 10_000,
         "cache_read_input_tokens": 50_000, "cache_creation": {"ephemeral_5m_input_tokens": 6_000,
                                                                "ephemeral_1h_input_tokens": 4_000}}
    per_call = (100_000 * 3 + 2_000 * 15 + 6_000 * 3.75 + 4_000 * 6.0 + 50_000 * 0.30) / 1e6  # 1h writes: 2x input
    server.script(*[tool_use(idea(i), usage=u) for i in range(2, 8)])
    agent = agent_for(server, max_cost_usd=0.85)
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    for i in (1, 2):
        p = step(agent, wt, hist, f"exp-00{i}")
        assert p.meta["usage"]["cost_usd"] == pytest.approx(per_call)
        assert p.meta["usage"]["cache_creation_1h_input_tokens"] == 4_000
        assert p.meta["metrics"]["agent/session_cost_usd"] == pytest.approx(i * per_call)
        assert f"1 call, 160,000 in (50,000 cached) + 2,000 out tokens, ${per_call:.4f}" in p.meta["commit_note"]
    saved = json.loads((tmp_path / "session" / USAGE_FILE).read_text())
    assert saved["session"]["cost_usd"] == pytest.approx(2 * per_call) and saved["proposals"] == 2
    assert saved["cost_per_proposal_usd"] == pytest.approx(per_call, abs=1e-6)
    assert agent.usage()["agent/cost_per_proposal"] == pytest.approx(per_call)
    assert agent.usage()["agent/cache_read_share"] == pytest.approx(50_000 / 160_000)
    n = len(server.requests)
    with pytest.raises(AgentStop) as err:  # the next request could cross the cap: not sent, the session pauses
        agent.propose(make_state(wt, hist))
    assert len(server.requests) == n
    msg = str(err.value)
    assert f"the session has spent ${2 * per_call:.4f}" in msg and "would cross agent.max_cost_usd=$0.85" in msg
    assert "agent.max_cost_usd=1.85" in msg and "search.tag=t1 search.resume=true agent=claude" in msg
    again = agent_for(server, max_cost_usd=0.85)  # a resume reads the spend back: the same cap still holds
    again.restore(hist, make_state(wt, hist))
    assert again.spent.cost_usd == pytest.approx(2 * per_call)
    with pytest.raises(AgentStop):
        again.propose(make_state(wt, hist))
    with_fallback = agent_for(server, max_cost_usd=0.85, fallback="tpe")  # ... or the fallback goes on
    with_fallback.restore(hist, make_state(wt, hist))
    assert with_fallback.propose(make_state(wt, hist)).meta["proposed_by"] == "tpe"
    raised = agent_for(server, max_cost_usd=2.0)
    raised.restore(hist, make_state(wt, hist))
    assert raised.propose(make_state(wt, hist)).meta["session_cost_usd"] == pytest.approx(3 * per_call)


def test_the_spend_is_rebuilt_from_the_ledger_when_the_usage_file_is_gone(server, key, tmp_path):
    wt = worktree(tmp_path)
    p = Proposal("d", "h", ["model.depth=3"], meta={"agent": "claude",
                                                    "usage": Usage(1, 10, 20, 30, 0, 40, 0.5).to_dict()})
    hist = BASE + [outcome(p, "exp-001", "discard", 2.6, 0.1), outcome(p, "exp-002", "invalid", reason="x")]
    agent = agent_for(server)
    agent.restore(hist, make_state(wt, hist))
    assert agent.spent.cost_usd == pytest.approx(1.0) and agent.spent.tokens == 200 and agent.proposals == 2
    assert server.requests == []  # rebuilt from the ledger alone


# ---------------------------------------------------------------------------- end to end through the CLI


TINY_SEARCH = ["device=cpu", "model.depth=2", "budget.mode=tokens", "budget.tokens=8192", "batch.total_tokens=2048",
               "batch.device_tokens=2048", "data.eval_tokens=8192", "search.baseline_repeats=1",
               "search.preflight=false", "search.progress=false", "search.confirm=false",  # confirmations: tested apart
               "search.test_split=false"]  # the held-out split: tested in test_search_cli.py


def _search(args: list[str], tmp: Path, name: str):
    return run_cli("src.search", *args, f"hydra.run.dir={tmp / 'hydra' / name}", timeout=600, check=False,
                   env={"ANTHROPIC_API_KEY": KEY})


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_cli_session_pauses_at_its_cost_cap_resumes_and_leaks_no_key(tmp_path, isolated_env):
    repo = make_repo(tmp_path)  # a copy: the session's branch and worktree stay out of the real checkout
    floor = make_patch(repo, "src/research/optim.py", lambda t: t.replace(
        "            g[\"lr\"] = g[\"initial_lr\"] * lr_mult\n",
        "            g[\"lr\"] = g[\"initial_lr\"] * max(lr_mult, 0.05)\n"))
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
    ]
    root, mlruns = tmp_path / "research", isolated_env / "mlruns"
    with MessagesServer(api_key=KEY) as srv:
        srv.script(*[tool_use({**r, "learned": f"lesson {i}", "next_ideas": ["more"]}, usage=u,
                              thinking=f"thinking {i}") for i, r in enumerate(replies)])
        common = ["agent=claude", f"agent.base_url={srv.url}", "agent.max_tokens=1024", "agent.fallback=none",
                  f"search.repo={repo}", f"search.root={root}", "search.tag=cc", "search.max_experiments=3",
                  *TINY_SEARCH]
        # 1) cap $0.65: two replies cost $0.63, a third could cross it -> paused after two proposals
        p1 = _search([*common, "agent.max_cost_usd=0.65"], tmp_path, "first")
        assert p1.returncode == 0, p1.stderr[-3000:]
        out1 = p1.stdout + p1.stderr
        assert "would cross agent.max_cost_usd=$0.65" in out1 and "search.resume=true" in out1
        assert srv.pending == 2
        # 2) resume with a higher cap: the saved conversation goes on, to 3 experiments (the invalid one not counted)
        p2 = _search([*common, "search.resume=true", "agent.max_cost_usd=5"], tmp_path, "second")
        assert p2.returncode == 0, p2.stderr[-3000:]
        assert "search.max_experiments=3 reached" in p2.stdout + p2.stderr
        assert srv.pending == 0
        assert all(r["headers"].get("authorization") == f"Bearer {KEY}" for r in srv.requests)
        assert all(r["status"] == 200 for r in srv.requests)
        third = srv.messages_requests()[2]["body"]["messages"]  # the first request of the resumed process
        assert third[1]["content"][0] == {"type": "thinking", "thinking": "thinking 0", "signature": srv.sign(
            "thinking 0")}

    sdir = root / "cc"
    rows = read_tsv(sdir / "results.tsv")
    assert [r["exp"] for r in rows] == ["base-1"] + [f"exp-00{i}" for i in range(1, 5)]
    assert rows[0]["status"] == "baseline" and rows[3]["status"] == "invalid" and rows[4]["status"] == "crash"
    assert {rows[i]["status"] for i in (1, 2)} <= {"keep", "discard"}, [r["status"] for r in rows]
    assert [r["agent"] for r in rows] == [""] + ["claude"] * 4
    assert "matrx_lr" in rows[3]["reason"]
    assert [r["hypothesis"] for r in rows[1:]] == [r["hypothesis"] for r in replies]
    for i in range(1, 5):
        meta = json.loads((sdir / "proposals" / f"exp-00{i}.json").read_text())["proposal"]["meta"]
        assert meta["usage"]["input_tokens"] == 100_000 and meta["usage"]["cost_usd"] == pytest.approx(0.315)
    spent = json.loads((sdir / USAGE_FILE).read_text())["session"]
    assert spent["calls"] == 4 and spent["cost_usd"] == pytest.approx(4 * 0.315)
    journal = (sdir / JOURNAL_FILE).read_text()
    assert "Learned: lesson 3" in journal and "## exp-004: a model that crashes" in journal
    assert "## Research journal" in (sdir / "report.md").read_text()
    # the branch: each candidate commit carries the hypothesis and the agent's tokens and cost
    log = git(repo, "log", "--format=%B", "refs/research/cc/exp-004")
    assert "Hypothesis: H4: crashes on purpose" in log
    assert "Agent: claude-sonnet-4-6: 1 call, 100,000 in + 1,000 out tokens, $0.3150" in log
    # MLflow: a child per experiment with the hypothesis and token metrics; the session's totals on the parent
    from mlflow.tracking import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    parent = MlflowClient(tracking_uri=uri).get_run(json.loads((sdir / "state.json").read_text())["parent_run_id"])
    kids = {r.data.tags.get("search.exp"): r for r in session_children(uri, parent.info.run_id)}
    for i, rep in enumerate(replies, 1):
        k = kids[f"exp-00{i}"]
        assert k.data.tags["search.hypothesis"] == rep["hypothesis"] and k.data.tags["search.agent"] == "claude"
        assert k.data.metrics["agent/input_tokens"] == 100_000 and k.data.metrics["agent/output_tokens"] == 1_000
        assert k.data.metrics["agent/cost_usd"] == pytest.approx(0.315)
    assert parent.data.metrics["agent/cost_usd"] == pytest.approx(4 * 0.315)
    assert parent.data.metrics["agent/calls"] == 4 and parent.data.metrics["agent/cost_per_proposal"] > 0

    # the key is nowhere on disk: session, Hydra dirs, MLflow db and artifacts (bytes, not just text)
    def holding_key(*dirs: Path) -> list[Path]:
        return [p for d in dirs for p in d.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]

    assert not holding_key(root, tmp_path / "hydra", mlruns, repo)
    assert any(p.name == "mlflow.db" for p in mlruns.rglob("*"))  # the scan did read the store's db
    (tmp_path / "canary").mkdir()
    (tmp_path / "canary" / "x.db").write_bytes(b"\0\1" + KEY.encode() + b"\0")
    assert holding_key(tmp_path / "canary")  # and would have found a leak
