"""agent=claude's side of the wire (src/lab/agents/claude_api.py): the request options chosen from what the
model supports (thinking, effort, strict tool schemas, tool_choice), failures classified by status, type and
error code, prices and usage, and conf/agent/claude.yaml composing with a price for its model. Against the
local Messages API (src/lab/fakes/messages_server.py), never the real one.

Run: python -m pytest -q tests/lab/agents/test_claude_api.py
"""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from src.lab.fakes.messages_server import MessagesServer, tool_use
from src.lab.agents.base import AgentStop
from src.lab.agents.claude import parse_input
from src.lab.agents.claude_api import Capabilities, Options, Usage, classify, price_for
from src.lab.agents.claude_context import tool_schema
from src.lab.config import ClaudeAgentConfig, ClaudePrice
from src.lab.proposal import InvalidProposal
from tests.support.claude import BASE, KEY, PRICE, agent_for, good, idea, make_state, step, worktree
from tests.support.helpers import CONF, compose_search


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


@pytest.mark.slow
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


def test_options_are_checked_and_the_tool_schema_is_closed():
    cfg = ClaudeAgentConfig(thinking="sometimes")
    with pytest.raises(AgentStop, match="agent.thinking='sometimes'"):
        Options.choose(cfg, Capabilities())
    for analysis in (True, False):
        for strict in (True, False):
            schema = tool_schema(analysis, strict)["input_schema"]
            assert schema["additionalProperties"] is False and ("analysis" in schema["properties"]) is analysis
            assert set(schema["required"]) >= {"description", "hypothesis", "learned"}
            assert "retest" in schema["properties"] and "retest" not in schema["required"]
    with pytest.raises(InvalidProposal, match="next_ideas"):
        parse_input({**idea(1), "next_ideas": 3})
    assert parse_input({**idea(1), "patch": ""}).patch is None  # strict mode may send an empty patch
    # a retest of a near miss instead of a new change: the lab fills in the change (src/lab/retest.py)
    p = parse_input({**idea(1), "overrides": [], "retest": "exp-003"})
    assert p.retest == "exp-003" and p.overrides == [] and p.patch is None
    with pytest.raises(InvalidProposal, match="neither overrides nor a patch"):
        parse_input({**idea(1), "overrides": [], "retest": ""})
    with pytest.raises(InvalidProposal, match="`retest` must be"):
        parse_input({**idea(1), "retest": 3})


# ---------------------------------------------------------------------------- failures by status, type and code


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


# ---------------------------------------------------------------------------- prices and usage


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


@pytest.mark.slow
def test_conf_agent_claude_composes_with_a_price_for_its_model():
    import yaml

    conf = yaml.safe_load((CONF / "agent_common" / "claude.yaml").read_text())  # shared with agent=hybrid
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
