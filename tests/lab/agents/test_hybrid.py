"""agent=hybrid (src/lab/agents/hybrid.py): the tuner proposes the numbers, Claude the ideas on its share of the
turns, against the local Messages API server: the share holds, Claude sees the tuner's state, the tuner is told
Claude's results, an outage hands Claude's turns to the tuner, a resume re-tells everything, CMA-ES works, and a
whole `python -m src.search agent=hybrid` session (stand-in training) says who proposed each row.

Run: python -m pytest -q tests/lab/agents/test_hybrid.py
"""
from __future__ import annotations

import pytest

from src.harness.config import TrainConfig
from src.lab.agents.base import AgentStop
from src.lab.agents.hybrid import HybridAgent, claude_turn
from src.lab.config import HybridAgentConfig, KnobConfig, SearchSpaceConfig
from tests.support.claude import BASE, KEY, PRICE, good, make_state, step, worktree

SPACE2 = SearchSpaceConfig(name="t2", knobs=[
    KnobConfig(key="optimizer.matrix_lr", type="float", low=0.01, high=0.1, log=True),
    KnobConfig(key="optimizer.warmdown_ratio", type="float", low=0.1, high=0.7)])


def hybrid(server, space=SPACE2, **kw) -> HybridAgent:
    base = dict(base_url=server.url, prices={"claude-sonnet-4-6": PRICE}, max_retries=2, patience_s=5.0,
                retry_wait_s=0.01, timeout_s=10.0, max_tokens=4096, probe_s=0.0, n_startup_trials=2)
    return HybridAgent(HybridAgentConfig(**{**base, **kw}), space)


def test_claudes_share_of_the_turns_is_spread_evenly():
    turns = [i for i in range(10) if claude_turn(i, 0.3)]
    assert turns == [3, 6, 9] or len(turns) == 3, turns
    assert sum(claude_turn(i, 0.3) for i in range(100)) == 30 and sum(claude_turn(i, 0.8) for i in range(10)) == 8
    assert not any(claude_turn(i, 0.0) for i in range(20)) and all(claude_turn(i, 1.0) for i in range(20))
    gaps = [b - a for a, b in zip(turns, turns[1:])]
    assert max(gaps) - min(gaps) <= 1  # no run of Claude turns, no long drought


def test_bad_settings_are_refused_before_anything_runs(server, key):
    with pytest.raises(AgentStop, match="agent.tuner='bayes'"):
        hybrid(server, tuner="bayes")
    with pytest.raises(AgentStop, match="claude_share=1.5"):
        hybrid(server, claude_share=1.5)
    with pytest.raises(AgentStop, match="needs a search space"):
        hybrid(server, space=None)


def test_the_tuner_proposes_its_turns_claude_sees_its_state_and_it_learns_claudes_results(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(*[good(i) for i in range(1, 5)])  # Claude's overrides: optimizer.matrix_lr=0.03, 0.04, ...
    agent = hybrid(server)
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    by = []
    for n in range(1, 11):
        p = step(agent, wt, hist, f"exp-{n:03d}", val=2.6 - 0.01 * n, delta=-0.01)
        by.append(p.meta["proposed_by"])
        if p.meta["proposed_by"] == "tpe":  # a full point of the space
            assert sorted(o.split("=")[0] for o in p.overrides) == ["optimizer.matrix_lr", "optimizer.warmdown_ratio"]
    assert by.count("claude") == 3 and by.count("tpe") == 7, by
    assert len(server.messages_requests()) == 3  # Claude is asked on its turns only
    assert [e.agent for e in hist[2:]] == by  # the ledger's agent column
    # the tuner was told every row, Claude's overrides-only proposals included (at the best's other values)
    trials = [t for t in agent.tuner.study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("exp") != "baseline"]
    assert sorted(t.user_attrs["exp"] for t in trials) == [f"exp-{n:03d}" for n in range(1, 11)]
    claudes = [t for t in trials if t.user_attrs["by"] == "claude"]
    assert len(claudes) == 3 and claudes[0].params["optimizer.matrix_lr"] == pytest.approx(0.03)
    assert claudes[0].params["optimizer.warmdown_ratio"] == pytest.approx(TrainConfig().optimizer.warmdown_ratio)
    # Claude's last dashboard showed the tuner's state: its best trials and who proposed them
    last = server.messages_requests()[-1]["body"]["messages"][-1]["content"]
    text = " ".join(b.get("text", "") for b in last if isinstance(b, dict))
    assert "## The optimizer's state (tpe over search_space=t2; it proposes 70% of the experiments, you 30%)" in text
    assert "Best trials" in text and "matrix_lr=" in text and "them yours" in text


def test_claudes_code_patch_is_not_told_as_a_point_and_an_outage_gives_its_turn_to_the_tuner(server_clock, key,
                                                                                              tmp_path):
    server = server_clock
    wt = worktree(tmp_path)
    patch = {"description": "a patch", "hypothesis": "h", "learned": "l", "next_ideas": [],
             "patch": "--- a/src/research/model.py\n+++ b/src/research/model.py\n@@ -1 +1,2 @@\n+# x\n"}
    from src.lab.fakes.messages_server import tool_use
    server.script(tool_use(patch), good(2))
    agent = hybrid(server, claude_share=1.0, patience_s=0.3, probe_s=0.5, probe_max_s=1.0, retry_wait_s=0.05)
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    p = step(agent, wt, hist, "exp-001")
    assert p.meta["proposed_by"] == "claude" and "params" not in p.meta
    told = [t for t in agent.tuner.study.trials if t.user_attrs.get("exp") == "exp-001"]
    assert told == []  # a code patch is not a point of the tuner's space
    server.outage(60)
    p = step(agent, wt, hist, "exp-002")
    assert p.meta["proposed_by"] == "tpe" and p.meta["fallback_for"] == "claude"
    server.outage(0)
    server.advance(1.0)
    assert step(agent, wt, hist, "exp-003").meta["proposed_by"] == "claude"


def test_a_resume_re_tells_the_tuner_every_row_and_cmaes_tunes_too(server, key, tmp_path):
    wt = worktree(tmp_path)
    server.script(*[good(i) for i in range(1, 4)])
    agent = hybrid(server, tuner="cmaes")
    hist = list(BASE)
    agent.restore(hist, make_state(wt, hist))
    for n in range(1, 9):
        step(agent, wt, hist, f"exp-{n:03d}", val=2.6 - 0.005 * n, delta=-0.005)
    assert type(agent.tuner.study.sampler).__name__ == "CmaEsSampler"
    before = sorted(t.user_attrs["exp"] for t in agent.tuner.study.trials if t.state.name == "COMPLETE")
    again = hybrid(server, tuner="cmaes")
    again.restore(hist, make_state(wt, hist))  # a new invocation: the study is rebuilt from the ledger
    after = sorted(t.user_attrs["exp"] for t in again.tuner.study.trials if t.state.name == "COMPLETE")
    assert after == before and len(after) == 1 + 8  # the baseline and every row
    assert {t.user_attrs["by"] for t in again.tuner.study.trials} >= {"claude", "cmaes"}


@pytest.mark.slow
def test_a_hybrid_session_runs_from_the_cli_and_the_ledger_says_who_proposed_each_row(tmp_path):
    from src.lab.fakes.scripted_researcher import run_night

    out = run_night(tmp_path, experiments=10, seconds_per_run=30, budget_seconds=30, tracking=False,
                    agent=("agent=hybrid", "search_space=cpu", "agent.n_startup_trials=2"))
    rows = [r for r in out["rows"] if r["exp"].startswith("exp-") and r["exp"].count("-") == 1]
    assert len(rows) == 10 and sum(r["agent"] == "claude" for r in rows) == 3, [r["agent"] for r in rows]
    assert {r["agent"] for r in rows} == {"claude", "tpe"}
    assert out["usage"]["proposals"] == 3 and out["server"]["requests"] == 3
    assert KEY not in (out["dir"] / "results.tsv").read_text()
