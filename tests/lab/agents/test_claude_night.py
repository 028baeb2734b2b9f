"""Whole nights of agent=claude against the local Messages API server: what they cost, and that they never idle.

Real research sessions (src/lab/loop.py on a throwaway git copy of the project) with the stand-in
train script and Claude played by src/lab/fakes/scripted_researcher.py (replies of realistic size); the
server's clock advances one run per request, so its prompt cache ages as in a real night. The
figures these tests check are the ones bench/claude_night.py prints for docs/LOG.md.

Run: python -m pytest -q tests/lab/agents/test_claude_night.py -s   (every test here is slow: minutes on two cores)
"""
from __future__ import annotations

import re

import pytest

from src.lab.fakes.scripted_researcher import ScriptedResearcher, cost_table, run_night
from tests.support.helpers import compose_search


def experiments(out: dict) -> list[dict]:
    """The experiments' own rows (not the baseline, not confirmation runs)."""
    return [r for r in out["rows"] if re.fullmatch(r"exp-\d+", r["exp"])]


def read_share(out: dict) -> float:
    u = out["usage"]["session"]
    return u["cache_read_input_tokens"] / (u["input_tokens"] + u["cache_creation_input_tokens"]
                                           + u["cache_read_input_tokens"])


def messages_statuses(out: dict) -> list[int]:
    return [r["status"] for r in out["requests"] if r["path"] == "/v1/messages"]


@pytest.mark.slow
def test_a_night_pays_under_half_the_default_cap_per_100_experiments_and_reads_most_of_its_input_from_the_cache(
        tmp_path):
    # 50 experiments: the conversation is condensed at agent.context_tokens (every ~13 turns here), so the cost per
    # experiment has settled long before; bench/claude_night.py plays the whole 100 (docs/LOG.md: ~$3.5).
    cap = compose_search(["agent=claude"]).agent.max_cost_usd
    out = run_night(tmp_path, experiments=50, seconds_per_run=150, budget_seconds=120, tracking=False)
    print(cost_table("50 experiments, 2.5-minute runs", out))
    rows = experiments(out)
    counted = [r for r in rows if r["status"] not in ("invalid", "interrupted")]
    assert len(counted) == 50 and {r["agent"] for r in rows} == {"claude"}
    assert out["summary"]["stop_reason"] == "search.max_experiments=50 reached"
    assert (out["dir"] / "search.log").read_text().count("conversation condensed") >= 2  # the cost has settled
    u = out["usage"]["session"]
    assert 100 * u["cost_usd"] / len(counted) < 0.5 * cap  # per 100 experiments, with room under the default cap
    assert read_share(out) > 0.8 and u["cache_creation_1h_input_tokens"] == 0  # short runs: the 5-minute cache
    assert set(messages_statuses(out)) == {200} and u["calls"] == len(rows)  # one reply per proposal
    journal = (out["dir"] / "journal.md").read_text()
    assert journal.count("\n## exp-") == len(rows) and "Learned: Outcome 49" in journal


@pytest.mark.slow
def test_runs_longer_than_five_minutes_get_the_one_hour_cache_and_it_pays(tmp_path):
    auto = run_night(tmp_path / "auto", experiments=10, seconds_per_run=330, budget_seconds=300, tracking=False)
    five = run_night(tmp_path / "five", experiments=10, seconds_per_run=330, budget_seconds=300, tracking=False,
                     agent=("agent.cache_ttl=5m",))
    print(cost_table("1h (auto)", auto), cost_table("5m forced", five))
    first = next(r for r in auto["requests"] if r["path"] == "/v1/messages")["body"]
    assert first["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert auto["usage"]["session"]["cache_creation_1h_input_tokens"] > 0
    assert five["usage"]["session"]["cache_creation_1h_input_tokens"] == 0
    assert read_share(auto) > 0.8 > 0.3 > read_share(five)  # 5-minute entries are gone after each 5.5-min run
    per = [o["usage"]["session"]["cost_usd"] / o["usage"]["session"]["calls"] for o in (auto, five)]
    assert per[0] < 0.75 * per[1]


@pytest.mark.slow
def test_an_outage_drill_keeps_the_device_busy_and_claude_takes_over_again(tmp_path):
    out = run_night(tmp_path, experiments=30, outage=(8, 10.0), tracking=False,
                    agent=("agent.probe_s=2", "agent.probe_max_s=4", "agent.patience_s=2", "agent.retry_wait_s=0.2"))
    print(cost_table("outage drill: 10 s without the API", out))
    rows = experiments(out)
    who = "".join(r["agent"][0] for r in rows)
    assert re.fullmatch(r"c{8}t{2,}c{5,}", who), who  # claude, the fallback through the outage, claude again
    assert out["summary"]["stop_reason"] == "search.max_experiments=30 reached"  # nothing paused
    import json

    fallback = [json.loads((out["dir"] / "proposals" / f"{r['exp']}.json").read_text())["proposal"]["meta"]
                for r in rows if r["agent"] == "tpe"]
    assert all(m["fallback_for"] == "claude" and "529" in m["fallback_reason"] for m in fallback[:1])
    assert 529 in messages_statuses(out) and messages_statuses(out)[-1] == 200
    back = [r["body"] for r in out["requests"] if r["path"] == "/v1/messages" and r["status"] == 200]
    handover = next(b for b in back if "[tpe]" in json.dumps(b["messages"][-1]))  # Claude is told what tpe did
    assert sum(f"{r['exp']} [tpe]" in json.dumps(handover["messages"][-1]) for r in rows if r["agent"] == "tpe") \
        == len(fallback)
    assert out["usage"]["fallback_proposals"] == len(fallback)


@pytest.mark.slow
def test_a_refusal_drill_persistent_refusals_on_one_turn_do_not_stop_the_session(tmp_path):
    out = run_night(tmp_path, experiments=12, tracking=False, researcher=ScriptedResearcher(refuse=(5, 6, 7)),
                    agent=("agent.probe_s=0",))
    print(cost_table("refusal drill: three refusals on one turn", out))
    rows = experiments(out)
    who = "".join(r["agent"][0] for r in rows)
    assert re.fullmatch(r"c+tc+", who), who  # the refused turn went to the fallback, then Claude again
    assert out["summary"]["stop_reason"] == "search.max_experiments=12 reached"
    bodies = [r["body"] for r in out["requests"] if r["path"] == "/v1/messages"]
    assert len(bodies[7]["messages"]) == 1  # the third try: the refused turn dropped, a fresh digest
    assert "stopped as a refusal" in bodies[6]["messages"][-1]["content"][-1]["text"]  # the second: rephrased
