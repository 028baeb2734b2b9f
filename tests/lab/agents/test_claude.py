"""agent=claude against a local Messages API server (fakes/messages_server.py), never the real API.

Unit tests drive ClaudeAgent the way the loop does (restore, propose, observe) and check what the
server received: reasoning (thinking with tool_choice auto where the model supports it, else an
`analysis` field first in a forced tool call; strict schemas and effort where supported), the
append-only conversation and its cache breakpoints, the research journal, the saved conversation a
resume continues, outcomes with their figures, every stop reason, refusals (rephrased, then the turn
dropped, then the fallback), errors classified by code, timeouts, the fallback agent while the API is
down, cost accounting and caps. The end-to-end test runs `python -m src.search agent=claude` as a
subprocess: a session paused by its cost cap (agent.fallback=none), resumed with a higher cap, then
checks the ledger, the branch and MLflow, and that the API key appears nowhere on disk.

Run: python -m pytest -q tests/lab/agents/test_claude.py   (without the end-to-end CLI session: -m "not slow")
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from src.harness.config import TrainConfig
from src.lab.agents.base import AgentStop, Best, SearchState
from src.lab.agents.claude import CONVERSATION_FILE, JOURNAL_FILE, USAGE_FILE, ClaudeAgent, parse_input
from src.lab.agents.claude_api import Capabilities, Options, Usage, classify, price_for
from src.lab.agents.claude_context import (TOOL_NAME, LossCurves, curve_lines, history_table, last_failure,
                                           near_misses, tool_schema)
from src.lab.config import ClaudeAgentConfig, ClaudePrice, KnobConfig, SearchSpaceConfig
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal
from tests.support.helpers import CONF, REPO, compose_search, crash_patch, git, make_patch, make_repo, read_tsv, run_cli, \
    session_children
from fakes.messages_server import (MessagesServer, error, hang, max_tokens, refusal, spend_limit, text, tool_use)

KEY = "sk-ant-test-7d1c2b9e-never-store-me"
PRICE = ClaudePrice(input=3.0, output=15.0, cache_write=3.75, cache_read=0.30)
SHA = "a" * 40
SPACE = SearchSpaceConfig(name="t", knobs=[KnobConfig(key="optimizer.matrix_lr", type="float", low=0.01, high=0.1,
                                                      log=True)])


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def server():
    """A local Messages API (fakes/messages_server.py) that accepts KEY; tests script its replies."""
    with MessagesServer(api_key=KEY) as srv:
        yield srv


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    return KEY


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


# ---------------------------------------------------------------------------- reasoning


def test_the_model_thinks_before_it_proposes_where_it_can_with_the_tool_choice_the_api_allows(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1, thinking="The LR looks low for a 120-s budget; try 0.03."), good(2))
    agent = agent_for(server)
    agent.preflight()
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    p = step(agent, wt, hist, "exp-001")
    step(agent, wt, hist, "exp-002")
    assert [r["path"] for r in server.requests[:2]] == ["/v1/messages/count_tokens", "/v1/models/claude-sonnet-4-6"]
    r1, r2 = (r["body"] for r in server.messages_requests())
    assert r1["thinking"] == {"type": "adaptive"} and r1["output_config"] == {"effort": "medium"}
    assert r1["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}  # thinking forbids a forced tool
    assert r1["tools"][0]["strict"] is True and "analysis" not in r1["tools"][0]["input_schema"]["properties"]
    assert p.meta["reasoning"] == "thinking adaptive, effort medium, strict tool, tool_choice auto"
    # the thinking block goes back unchanged (the server checks its signature), before the tool_use it led to
    reply = r2["messages"][1]["content"]
    assert reply[0]["type"] == "thinking" and reply[0]["thinking"] == "The LR looks low for a 120-s budget; try 0.03."
    assert reply[0]["signature"] == server.sign(reply[0]["thinking"]) and reply[1]["type"] == "tool_use"
    assert all(r["status"] == 200 for r in server.requests)


@pytest.mark.parametrize("caps,cfg,expect", [
    ({"thinking": ["enabled", "disabled"], "effort": [], "structured_outputs": False}, {},
     {"thinking": {"type": "enabled", "budget_tokens": 3000}, "choice": "auto", "analysis": False, "strict": False}),
    (None, {}, {"thinking": None, "choice": "tool", "analysis": True, "strict": False}),  # capabilities unknown
    ({"thinking": ["adaptive", "enabled", "disabled"], "effort": ["low", "medium", "high"], "structured_outputs": True},
     {"thinking": "off", "effort": None}, {"thinking": None, "choice": "tool", "analysis": True, "strict": True}),
    ({"thinking": ["adaptive"], "effort": ["low", "medium", "high", "max"], "structured_outputs": True},  # always thinks
     {"thinking": "off", "effort": "max"}, {"thinking": {"type": "adaptive"}, "choice": "auto", "analysis": False,
                                            "strict": True}),
])
def test_reasoning_follows_what_the_model_supports(key, tmp_path, caps, cfg, expect):
    wt = worktree(tmp_path)
    with MessagesServer(api_key=KEY, capabilities=caps) as srv:
        srv.script(tool_use({**idea(1), "analysis": "the LR is low"} if expect["analysis"] else idea(1),
                            thinking="thought"))
        agent = agent_for(srv, **cfg)
        agent.preflight()
        p = agent.propose(make_state(wt, list(BASE)))
        body = srv.messages_requests()[0]["body"]
    assert body.get("thinking") == expect["thinking"]
    assert body["tool_choice"]["type"] == expect["choice"]
    props = list(body["tools"][0]["input_schema"]["properties"])
    assert (props[0] == "analysis") is expect["analysis"]  # the analysis comes first: it is written first
    assert bool(body["tools"][0].get("strict")) is expect["strict"]
    assert ("output_config" in body) is bool(caps and cfg.get("effort", "medium") in caps["effort"])
    if expect["analysis"]:
        assert p.meta["analysis"] == "the LR is low"


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


# ---------------------------------------------------------------------------- the conversation and its cache


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


def test_the_journal_is_written_to_the_session_and_shown_every_turn(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1), good(2), good(3))
    agent = agent_for(server)
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    p1 = step(agent, wt, hist, "exp-001", "keep", 2.40, -0.10)
    step(agent, wt, hist, "exp-002", "discard", 2.45, 0.05)
    agent.propose(make_state(wt, hist))
    assert p1.meta["learned"] == "lesson 1" and p1.meta["next_ideas"] == ["idea 2", "idea 3"]
    journal = (tmp_path / "session" / JOURNAL_FILE).read_text()
    assert "## exp-001: matrix lr 0.03 -> keep 2.4000 (-0.1000)" in journal and "Learned: lesson 1" in journal
    assert "## exp-002: matrix lr 0.04 -> discard 2.4500 (+0.0500)" in journal and "1. idea 3" in journal
    state = last_user(server.messages_requests()[-1])[-1]["text"]
    assert "## Your research journal" in state and "Idea queue (your latest next_ideas): idea 3; idea 4" in state
    assert state.index("before exp-002") < state.index("before exp-001")  # newest first


# ---------------------------------------------------------------------------- the state shown


@pytest.mark.slow  # real MLflow runs with long metric histories
def test_learning_curves_of_the_best_and_the_last_run_come_from_mlflow(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]  # the test session's store (conftest): created once, not per test
    c = MlflowClient(tracking_uri=uri)
    exp_id = c.create_experiment(f"curves-{tmp_path.name}", artifact_location=str(tmp_path / "art"))
    ids = []
    for scale in (1.0, 2.0):
        run = c.create_run(exp_id)
        c.log_batch(run.info.run_id, metrics=[Metric("train/loss", scale * (4.0 - s / 100), 0, s) for s in range(100)])
        ids.append(run.info.run_id)
    (tmp_path / "state.json").write_text(json.dumps({"tracking_uri": uri}))
    hist = BASE + [row("exp-001", "keep", 2.4, -0.1, mlflow_run_id=ids[0], num_steps=100),
                   row("exp-002", "discard", 2.6, 0.2, mlflow_run_id=ids[1])]
    state = make_state(tmp_path, hist, Best("exp-001", SHA, 2.4, []))
    lines = curve_lines(state, LossCurves(tmp_path))
    assert lines[0].startswith("## Learning curves (train loss at 25 / 50 / 75 / 100%")
    assert lines[1].startswith("- best exp-001: 3.765 3.515 3.265 3.015 (100 steps")
    assert lines[2].startswith("- last exp-002: 7.530 7.030 6.530 6.030")
    assert curve_lines(state, LossCurves(tmp_path / "nowhere")) == []  # no store: no curve, no error


def test_near_misses_and_the_last_failure_only_while_it_is_recent(tmp_path):
    runs = tmp_path / "runs"
    (runs / "exp-002").mkdir(parents=True)
    (runs / "exp-002" / "run.log").write_text("x" * 5000 + "\nline A\nRuntimeError: shape mismatch\n")
    hist = BASE + [row("exp-001", "keep", 2.40, -0.1), row("exp-002", "crash", None, None, reason="RuntimeError",
                                                           run_status="crash"),
                   row("exp-003", "discard", 2.395, -0.005, overrides="optimizer.matrix_lr=0.05")]
    best = Best("exp-001", SHA, 2.40, [])
    assert [e.exp for e in near_misses(hist, best, 0.01)] == ["exp-003"]
    fail = last_failure(hist, runs, 100)
    assert fail.startswith("## Last failure: exp-002 (crash)") and "RuntimeError: shape mismatch" in fail
    assert "xxx" not in fail.split("Log tail")[1].splitlines()[2]  # starts at a whole line
    later = hist + [row("exp-004", "discard", 2.5, 0.1), row("exp-005", "discard", 2.5, 0.1)]
    assert last_failure(later, runs, 100) == ""  # two experiments later it is history, not news


def test_the_history_table_condenses_older_rows_to_fit_its_size():
    rows = BASE + [row(f"exp-{i:03d}", "discard", 2.6, 0.1, desc="x" * 300) for i in range(1, 50)]
    t = history_table(rows, 3000)
    assert len(t) <= 3000 and "older rows condensed: " in t and "| exp-049 |" in t


# ---------------------------------------------------------------------------- stop reasons and refusals


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


def test_errors_are_classified_by_status_type_and_code_never_by_message_text():
    import anthropic
    import httpx2

    def err(status: int, etype: str, message: str, code: str | None = None, headers: dict | None = None):
        body = {"type": "error", "error": {"type": etype, "message": message,
                                           **({"details": {"error_code": code}} if code else {})}}
        resp = httpx2.Response(status, json=body, headers=headers or {},
                               request=httpx2.Request("POST", "http://127.0.0.1/v1/messages"))
        return anthropic._exceptions.APIStatusError(f"Error code: {status}", response=resp, body=body)

    assert classify(err(429, "rate_limit_error", "You have reached your usage limits",
                        "enforced_spend_limit_reached")).kind == "stop"
    assert classify(err(429, "rate_limit_error", "You have reached your specified spend limit")).kind == "transient"
    assert classify(err(429, "rate_limit_error", "x", headers={"retry-after": "7"})).retry_after == 7.0
    assert classify(err(400, "invalid_request_error", "prompt is too long: 300000 tokens")).kind == "bad_request"
    assert classify(err(413, "request_too_large", "x")).kind == "too_large"
    assert classify(err(529, "overloaded_error", "x")).kind == "transient"
    assert classify(err(402, "billing_error", "x")).kind == "stop"
    assert classify(err(401, "authentication_error", "x")).kind == "stop"
    assert classify(anthropic.APITimeoutError(httpx2.Request("POST", "http://127.0.0.1"))).kind == "transient"


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


def test_an_outage_hands_over_to_the_fallback_and_claude_takes_back_when_it_answers(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(good(1), good(2), good(3))
    agent = agent_for(server, fallback="tpe", probe_s=0.5, probe_max_s=1.0, patience_s=0.3, retry_wait_s=0.05)
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    step(agent, wt, hist, "exp-001")
    server.outage(1.5)
    t0 = time.monotonic()
    by = [step(agent, wt, hist, f"exp-00{i}").meta["proposed_by"] for i in (2, 3)]
    assert by == ["tpe", "tpe"] and time.monotonic() - t0 < 1.5  # no waiting on the API: the device keeps busy
    time.sleep(1.6)
    p = step(agent, wt, hist, "exp-004")
    assert p.meta["proposed_by"] == "claude" and agent.fallback_proposals == 2
    answer = last_user(server.messages_requests()[-1])
    assert answer[0]["content"].startswith("DISCARDED (exp-001)")  # its own proposal's outcome, then the others'
    assert "exp-002 [tpe]" in answer[1]["text"] and "exp-003 [tpe]" in answer[1]["text"]
    assert [e.agent for e in hist[2:]] == ["claude", "tpe", "tpe", "claude"]


def test_a_hung_request_times_out_and_the_fallback_proposes(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(hang(3.0), good(1))
    agent = agent_for(server, fallback="tpe", timeout_s=0.5, max_retries=0)
    t0 = time.monotonic()
    p = agent.propose(make_state(wt, list(BASE)))
    assert time.monotonic() - t0 < 2.5 and p.meta["proposed_by"] == "tpe"
    assert "request timed out" in p.meta["fallback_reason"]


def test_rate_limits_and_overload_are_retried_briefly_with_backoff(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(error(429), error(529), good(1))
    p = agent_for(server, max_retries=3).propose(make_state(wt, list(BASE)))
    assert p.overrides == ["optimizer.matrix_lr=0.03"]
    assert [r["status"] for r in server.requests if r["path"] == "/v1/messages"] == [429, 529, 200]
    assert p.meta["usage"]["calls"] == 1  # errors are not billed


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


# ---------------------------------------------------------------------------- accounting and caps


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


def test_the_token_cap_stops_a_request_that_could_cross_it(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(tool_use(idea(1), usage={"input_tokens": 40_000, "output_tokens": 1_000,
                                           "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}), good(2))
    agent = agent_for(server, max_session_tokens=43_000)
    hist = list(BASE)
    step(agent, wt, hist, "exp-001")
    with pytest.raises(AgentStop, match=r"has used 41,000 tokens.*agent.max_session_tokens=43,000"):
        agent.propose(make_state(wt, hist))


def test_the_spend_is_rebuilt_from_the_ledger_when_the_usage_file_is_gone(server, key, tmp_path):
    wt = worktree(tmp_path)
    p = Proposal("d", "h", ["model.depth=3"], meta={"agent": "claude",
                                                    "usage": Usage(1, 10, 20, 30, 0, 40, 0.5).to_dict()})
    hist = BASE + [outcome(p, "exp-001", "discard", 2.6, 0.1), outcome(p, "exp-002", "invalid", reason="x")]
    agent = agent_for(server)
    agent.restore(hist, make_state(wt, hist))
    assert agent.spent.cost_usd == pytest.approx(1.0) and agent.spent.tokens == 200 and agent.proposals == 2
    assert server.requests == []  # rebuilt from the ledger alone


def test_prices_match_models_and_their_dated_snapshots_and_1h_writes_cost_twice_the_input():
    prices = {"claude-sonnet-4-5": PRICE, "claude-sonnet-4": ClaudePrice(9, 9, 9, 9)}
    assert price_for("claude-sonnet-4-5-20250929", prices) is PRICE
    for unknown in ("claude-sonnet-4-5-turbo", "claude-sonnet-4-6"):  # no guessing from a family name
        with pytest.raises(AgentStop):
            price_for(unknown, prices)
    u = Usage.of_reply(type("U", (), {"input_tokens": 1_000_000, "output_tokens": 1_000_000,
                                      "cache_creation_input_tokens": None, "cache_read_input_tokens": None})(), PRICE)
    assert u.cost_usd == pytest.approx(18.0) and u.tokens == 2_000_000
    w = Usage.of_reply({"cache_creation_input_tokens": 1_000_000}, PRICE, ttl="1h")
    assert w.cost_usd == pytest.approx(6.0) and w.cache_creation_1h_input_tokens == 1_000_000


def test_conf_agent_claude_composes_with_a_price_for_its_model():
    import yaml

    conf = yaml.safe_load((CONF / "agent" / "claude.yaml").read_text())
    cfg = compose_search(["agent=claude"]).agent
    assert isinstance(cfg, ClaudeAgentConfig) and cfg.model == conf["model"]
    assert price_for(cfg.model, cfg.prices) == ClaudePrice(**conf["prices"][conf["model"]])
    assert price_for(cfg.model, cfg.prices).output > 0 and cfg.max_cost_usd == conf["max_cost_usd"] > 0
    assert cfg.cache is True and cfg.preflight is True and cfg.fallback == "tpe" and cfg.thinking == "auto"
    added = compose_search(["agent=claude", "agent.model=my-model",
                            "+agent.prices={my-model: {input: 1, output: 5, cache_write: 1.25, cache_read: 0.1}}"]).agent
    assert price_for(added.model, added.prices) == ClaudePrice(1, 5, 1.25, 0.1)
    with pytest.raises(ConfigCompositionException, match="inptu"):
        compose_search(["agent=claude", "+agent.prices={m: {inptu: 1}}"])


def test_options_are_checked_and_the_tool_schema_is_closed():
    cfg = ClaudeAgentConfig(thinking="sometimes")
    with pytest.raises(AgentStop, match="agent.thinking='sometimes'"):
        Options.choose(cfg, Capabilities())
    for analysis in (True, False):
        for strict in (True, False):
            schema = tool_schema(analysis, strict)["input_schema"]
            assert schema["additionalProperties"] is False and ("analysis" in schema["properties"]) is analysis
            assert set(schema["required"]) >= {"description", "hypothesis", "learned"}
    with pytest.raises(InvalidProposal, match="next_ideas"):
        parse_input({**idea(1), "next_ideas": 3})
    assert parse_input({**idea(1), "patch": ""}).patch is None  # strict mode may send an empty patch


# ---------------------------------------------------------------------------- the local server itself


def test_the_server_models_cache_lifetimes_and_minimum_lengths(key):
    import anthropic

    system = [{"type": "text", "text": "x" * 6000, "cache_control": {"type": "ephemeral"}}]
    msgs = [{"role": "user", "content": "hello"}]
    with MessagesServer(api_key=KEY, min_cache_tokens={"claude-haiku-4-5": 4096}) as srv:
        srv.fallback = text("ok")
        c = anthropic.Anthropic(api_key=KEY, base_url=srv.url, max_retries=0)
        ask = lambda model="claude-sonnet-4-6", ttl=None: c.messages.create(  # noqa: E731
            model=model, max_tokens=100, messages=msgs,
            system=[{**system[0], "cache_control": {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}}]).usage
        assert ask().cache_creation_input_tokens > 1000
        srv.advance(240)
        assert ask().cache_read_input_tokens > 1000  # within 5 minutes: read (and refreshed)
        srv.advance(299)
        assert ask().cache_read_input_tokens > 1000  # 5 minutes since the last read, not since the write
        srv.advance(301)
        assert ask().cache_read_input_tokens == 0  # expired: written again
        srv.advance(301)
        assert ask(ttl="1h").cache_creation.ephemeral_1h_input_tokens > 1000
        srv.advance(3000)
        assert ask(ttl="1h").cache_read_input_tokens > 1000  # a 1-hour entry outlives 50 minutes
        short = ask(model="claude-haiku-4-5")  # 1,500 tokens is below Haiku 4.5's minimum: nothing cached
        assert short.cache_creation_input_tokens == 0 and short.cache_read_input_tokens == 0
        assert ask(model="claude-haiku-4-5").cache_read_input_tokens == 0


def test_the_server_refuses_what_the_api_refuses(key):
    import anthropic

    with MessagesServer(api_key=KEY) as srv:
        srv.fallback = text("ok")
        c = anthropic.Anthropic(api_key=KEY, base_url=srv.url, max_retries=0)
        tool = tool_schema(False, False)
        call = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": srv.sign("t")},
                                                  {"type": "tool_use", "id": "toolu_1", "name": TOOL_NAME,
                                                   "input": {}}]}]
        result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}
        bad = {
            "text before tool_result": call + [{"role": "user", "content": [{"type": "text", "text": "x"}, result]}],
            "tampered thinking": [call[0], {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "t2", "signature": srv.sign("t")}, call[1]["content"][1]]},
                {"role": "user", "content": [result]}],
        }
        for why, msgs in bad.items():
            with pytest.raises(anthropic.BadRequestError):
                c.messages.create(model="m", max_tokens=2000, messages=msgs, tools=[tool])
        with pytest.raises(anthropic.BadRequestError, match="forces tool use"):
            c.messages.create(model="m", max_tokens=2000, messages=[call[0]], tools=[tool],
                              thinking={"type": "adaptive"}, tool_choice={"type": "tool", "name": TOOL_NAME})
        with pytest.raises(anthropic.BadRequestError, match="additionalProperties"):
            c.messages.create(model="m", max_tokens=2000, messages=[call[0]], tools=[
                {**tool, "strict": True, "input_schema": {"type": "object", "properties": {}}}])
        ok = c.messages.create(model="m", max_tokens=2000, messages=call + [{"role": "user", "content": [result]}],
                               tools=[tool])
        assert ok.stop_reason == "end_turn"


# ---------------------------------------------------------------------------- end to end through the CLI

TINY_SEARCH = ["device=cpu", "model.depth=2", "budget.mode=tokens", "budget.tokens=8192", "batch.total_tokens=2048",
               "batch.device_tokens=2048", "data.eval_tokens=8192", "search.baseline_repeats=1",
               "search.preflight=false", "search.progress=false", "search.confirm=false"]  # confirmations: tested apart


def _search(args: list[str], tmp: Path, name: str):
    return run_cli("src.search", *args, f"hydra.run.dir={tmp / 'hydra' / name}", timeout=600, check=False,
                   env={"ANTHROPIC_API_KEY": KEY})


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_cli_session_pauses_at_its_cost_cap_resumes_and_leaks_no_key(tmp_path, isolated_env):
    repo = make_repo(tmp_path)  # a copy: the session's branch and worktree stay out of the real checkout
    floor = make_patch(repo, "src/research/optim.py", lambda t: t.replace(
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
    with MessagesServer(api_key=KEY) as srv:
        srv.script(*[tool_use({**r, "learned": f"lesson {i}", "next_ideas": ["more"]}, usage=u,
                              thinking=f"thinking {i}") for i, r in enumerate(replies)])
        common = ["agent=claude", f"agent.base_url={srv.url}", "agent.max_tokens=1024", "agent.fallback=none",
                  f"search.repo={repo}", f"search.root={root}", "search.tag=cc", "search.max_experiments=5",
                  *TINY_SEARCH]
        # 1) cap $0.65: two replies cost $0.63, a third could cross it -> paused after two proposals
        p1 = _search([*common, "agent.max_cost_usd=0.65"], tmp_path, "first")
        assert p1.returncode == 0, p1.stderr[-3000:]
        out1 = p1.stdout + p1.stderr
        assert "would cross agent.max_cost_usd=$0.65" in out1 and "search.resume=true" in out1
        assert srv.pending == 4
        # 2) resume with a higher cap: the saved conversation goes on, to 5 experiments
        p2 = _search([*common, "search.resume=true", "agent.max_cost_usd=5"], tmp_path, "second")
        assert p2.returncode == 0, p2.stderr[-3000:]
        assert "search.max_experiments=5 reached" in p2.stdout + p2.stderr
        assert srv.pending == 0
        assert all(r["headers"].get("authorization") == f"Bearer {KEY}" for r in srv.requests)
        assert all(r["status"] == 200 for r in srv.requests)
        third = srv.messages_requests()[2]["body"]["messages"]  # the first request of the resumed process
        assert third[1]["content"][0] == {"type": "thinking", "thinking": "thinking 0", "signature": srv.sign(
            "thinking 0")}

    sdir = root / "cc"
    rows = read_tsv(sdir / "results.tsv")
    assert [r["exp"] for r in rows] == ["base-1"] + [f"exp-00{i}" for i in range(1, 7)]
    assert rows[0]["status"] == "baseline" and rows[3]["status"] == "invalid" and rows[4]["status"] == "crash"
    assert {rows[i]["status"] for i in (1, 2, 5, 6)} <= {"keep", "discard"}, [r["status"] for r in rows]
    assert [r["agent"] for r in rows] == [""] + ["claude"] * 6
    assert "matrx_lr" in rows[3]["reason"]
    assert [r["hypothesis"] for r in rows[1:]] == [r["hypothesis"] for r in replies]
    for i in range(1, 7):
        meta = json.loads((sdir / "proposals" / f"exp-00{i}.json").read_text())["proposal"]["meta"]
        assert meta["usage"]["input_tokens"] == 100_000 and meta["usage"]["cost_usd"] == pytest.approx(0.315)
    spent = json.loads((sdir / USAGE_FILE).read_text())["session"]
    assert spent["calls"] == 6 and spent["cost_usd"] == pytest.approx(6 * 0.315)
    journal = (sdir / JOURNAL_FILE).read_text()
    assert "Learned: lesson 4" in journal and "## exp-005: lower embedding LR" in journal
    assert "## Research journal" in (sdir / "report.md").read_text()
    # the branch: each candidate commit carries the hypothesis and the agent's tokens and cost
    log = git(repo, "log", "--format=%B", "refs/research/cc/exp-005")
    assert "Hypothesis: H5: the embedding LR is too high" in log
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
    assert parent.data.metrics["agent/cost_usd"] == pytest.approx(6 * 0.315)
    assert parent.data.metrics["agent/calls"] == 6 and parent.data.metrics["agent/cost_per_proposal"] > 0

    # the key is nowhere on disk: session, Hydra dirs, MLflow db and artifacts (bytes, not just text)
    def holding_key(*dirs: Path) -> list[Path]:
        return [p for d in dirs for p in d.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]

    assert not holding_key(root, tmp_path / "hydra", mlruns, repo)
    assert any(p.name == "mlflow.db" for p in mlruns.rglob("*"))  # the scan did read the store's db
    (tmp_path / "canary").mkdir()
    (tmp_path / "canary" / "x.db").write_bytes(b"\0\1" + KEY.encode() + b"\0")
    assert holding_key(tmp_path / "canary")  # and would have found a leak
