"""Near misses are retested (src/lab/confirm.py Confirmation.retest, experiment.near_miss): a screen run that beat the
best by less than the margin earns (best, candidate) pairs, one at a time, until the paired rule at
search.retest_alpha / retest_pairs keeps it or the pairs stop favouring it. Sessions with the stand-in train, whose
$FAKE_SHIFT moves the runs it names: the baseline's two runs 0.01 apart (sigma 0.0071, margin 0.0141).

Run: python -m pytest -q tests/lab/test_retest.py
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from src.lab.decision import Verdict
from src.lab.experiment import near_miss
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal
from src.lab.retest import asked
from tests.lab.test_verdicts import lab, session  # noqa: F401  (the fixture and the session runner)
from tests.support.helpers import comment_patch, compose_search


def test_a_near_miss_is_a_screen_discard_past_the_share_of_the_margin():
    s = compose_search([]).search
    assert s.retest and s.retest_within == 0.75
    assert near_miss(Verdict("discard", -0.011, 0.0141), s)
    assert not near_miss(Verdict("discard", -0.006, 0.0141), s)  # less than three quarters of the margin
    assert not near_miss(Verdict("discard", +0.01, 0.0141), s)
    assert not near_miss(Verdict("keep", -0.02, 0.0141), s)  # a would-be keep is confirmed, not retested
    assert not near_miss(Verdict("discard", -0.011, 0.0141), SimpleNamespace(retest=False, retest_within=0.5))


def test_a_retest_request_is_checked_against_the_ledger_and_granted_once():
    s = compose_search([]).search
    change = Proposal("real", "h", ["optimizer.matrix_lr=0.05"])
    rows = [Experiment(exp="base-1", status="baseline", description="baseline"),
            Experiment(exp="exp-001", status="discard", description="real", delta=-0.006, proposal=change),
            Experiment(exp="exp-002", status="discard", description="worse", delta=+0.01, proposal=change),
            Experiment(exp="exp-003", status="discard", description="paired", delta=-0.011, proposal=change),
            Experiment(exp="exp-003-c1", status="confirm", description="pair")]
    ask = Proposal("", "", retest="exp-001")
    p = asked(rows, ask, "exp-004", s)  # the change it re-runs, whatever came with the request
    assert (p.overrides, p.patch, p.retest, p.description) == (change.overrides, None, "exp-001", "retest of exp-001: real")
    for x, why in (("base-1", "not an experiment"), ("exp-009", "not an experiment"), ("exp-002", "only a near miss"),
                   ("exp-003", "already had pairs run")):
        with pytest.raises(InvalidProposal, match=why):
            asked(rows, Proposal("", "", retest=x), "exp-004", s)
    # granted once: an earlier request that ran, even one the machine disturbed, uses it up; an invalid one does not
    for status, refused in (("invalid", False), ("interrupted", False), ("disturbed", True), ("discard", True)):
        earlier = Experiment(exp="exp-004", status=status, description="retest", proposal=p)
        if refused:
            with pytest.raises(InvalidProposal, match="retested already, as exp-004"):
                asked(rows + [earlier], ask, "exp-005", s)
        else:
            assert asked(rows + [earlier], ask, "exp-005", s).retest == "exp-001"
    assert asked(rows + [Experiment(exp="exp-004", status="discard", description="r", proposal=p)], ask, "exp-004", s)
    with pytest.raises(InvalidProposal, match="search.retest=false"):
        asked(rows, ask, "exp-004", compose_search(["search.retest=false"]).search)


def shifts(exp: str, screen: float, pairs: float, n: int = 8) -> str:
    """FAKE_SHIFT for an experiment: its screen run by `screen`, its candidate re-runs (exp-c1..cn) by `pairs`."""
    return ",".join([f"{exp}:{screen}"] + [f"{exp}-c{i}:{pairs}" for i in range(1, n + 1)])


@pytest.mark.slow  # two sessions of a dozen stand-in runs
def test_a_real_gain_inside_the_margin_is_kept_on_its_retest_and_a_null_one_stops_early(lab, monkeypatch):
    repo = lab["repo"]
    # exp-001: a null change whose screen run was lucky (-0.011: a near miss); its re-runs score as the baseline
    # exp-002: a real gain of 0.012 (under the margin) whose screen run shows it; every re-run shows it too
    monkeypatch.setenv("FAKE_SHIFT", ",".join(["base-2:0.01", shifts("exp-001", -0.006, 0.0),
                                               shifts("exp-002", -0.006, -0.012)]))
    by, rows, s = session(lab, proposals=[
        {"description": "null", "patch": comment_patch(repo, note="null change")},
        {"description": "real", "patch": comment_patch(repo, note="a real gain, by FAKE_SHIFT")}])
    assert by["exp-001"]["status"] == "discard", by["exp-001"]["reason"]
    assert "near miss" in by["exp-001"]["reason"] and "no longer favour" in by["exp-001"]["reason"]
    null_pairs = [r["exp"] for r in rows if r["exp"].startswith("exp-001-")]
    assert sorted(null_pairs) == ["exp-001-b1", "exp-001-b2", "exp-001-c1", "exp-001-c2"]  # stopped at its first look
    assert by["exp-002"]["status"] == "keep", by["exp-002"]["reason"]
    assert "near miss" in by["exp-002"]["reason"] and "retest (kept" in by["exp-002"]["reason"]
    pairs = [r for r in rows if r["exp"].startswith("exp-002-")]
    assert 4 <= len(pairs) <= 2 * s.lab.cfg.search.retest_pairs and all(r["status"] == "confirm" for r in pairs)
    assert float(by["exp-002"]["delta"]) == pytest.approx(-0.012, abs=1e-6)  # the pairs' mean difference
    report = (repo / "outputs" / "research" / "v" / "report.md").read_text()  # the leaderboard says what rows rest on
    assert f"| keep | screen + {len(pairs) // 2} pair(s) |" in report and "| discard | screen + 2 pair(s) |" in report
    # with retests off the same real gain is a plain discard at its screen run
    monkeypatch.setenv("FAKE_SHIFT", ",".join(["base-2:0.01", shifts("exp-001", -0.006, -0.012)]))
    by, rows, _ = session(lab, "search.retest=false", tag="off2", proposals=[
        {"description": "real", "patch": comment_patch(repo, note="a real gain, by FAKE_SHIFT")}])
    assert by["exp-001"]["status"] == "discard" and not [r for r in rows if r["exp"].startswith("exp-001-")]


@pytest.mark.slow  # a session of a dozen stand-in runs
def test_an_agent_asks_for_a_retest_of_a_near_miss_once(lab, monkeypatch):
    repo = lab["repo"]
    # exp-001: a real gain of 0.012 whose screen run shows only 0.006 against the baselines' mean (under
    # retest_within of the margin: the lab does not retest it); exp-002 asks for its retest, whose candidate runs
    # show the gain
    monkeypatch.setenv("FAKE_SHIFT", ",".join(["base-2:0.01", "exp-001:-0.001"] +
                                              [f"exp-002-c{i}:-0.012" for i in range(1, 9)]))
    by, rows, s = session(lab, proposals=[
        {"description": "real", "patch": comment_patch(repo, note="a real gain, by FAKE_SHIFT")},
        {"retest": "exp-001", "hypothesis": "it beat the best by 0.006: a small real gain?"},
        {"retest": "exp-001"},  # once per experiment
        {"retest": "base-1"},
        {"retest": "exp-002"},  # a keep is no near miss
    ])
    assert by["exp-001"]["status"] == "discard" and "near miss" not in by["exp-001"]["reason"]
    assert not [r for r in rows if r["exp"].startswith("exp-001-")]
    e = by["exp-002"]
    assert e["status"] == "keep" and e["description"] == "retest of exp-001: real", e
    assert "a retest of exp-001 asked by the agent" in e["reason"] and "retest (kept" in e["reason"]
    assert e["run_status"] in ("", "-") and float(e["delta"]) == pytest.approx(-0.012, abs=1e-6)
    pairs = [r for r in rows if r["exp"].startswith("exp-002-")]
    assert len(pairs) >= 4 and all(r["status"] == "confirm" for r in pairs)  # pairs only: no screen run of its own
    assert s.lab.standings().best.exp == "exp-002"
    assert by["exp-003"]["status"] == "invalid" and "retested already, as exp-002 (keep)" in by["exp-003"]["reason"]
    assert by["exp-004"]["status"] == "invalid" and "not an experiment of this session" in by["exp-004"]["reason"]
    assert by["exp-005"]["status"] == "invalid" and "only a near miss" in by["exp-005"]["reason"]
    report = (repo / "outputs" / "research" / "v" / "report.md").read_text()
    assert f"| keep | {len(pairs) // 2} pair(s), retesting exp-001 |" in report
    # with retests off the lab refuses the request
    monkeypatch.setenv("FAKE_SHIFT", "base-2:0.01,exp-001:-0.001")
    by, _, _ = session(lab, "search.retest=false", tag="off3", proposals=[
        {"description": "real", "patch": comment_patch(repo, note="a real gain, by FAKE_SHIFT")},
        {"retest": "exp-001"}])
    assert by["exp-002"]["status"] == "invalid" and "search.retest=false" in by["exp-002"]["reason"]
