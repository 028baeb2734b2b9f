"""Verdicts on a noisy machine (src/lab/decision.py, disturbance.py, baseline.py, confirm.py): the
robust noise floor and the paired rule, then whole sessions on a real git repo and MLflow store
with the stand-in train (src/lab/fakes/train.py), whose $FAKE_SLOW makes named runs slow (a
busy machine), $FAKE_SHIFT makes named runs score off, and $FAKE_NOISE adds run-to-run noise.

Run: python -m pytest -q tests/lab/test_verdicts.py   (sessions of several runs are marked slow)
"""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import yaml

from src.lab.confirm import Confirmation
from src.lab.decision import NoiseFloor, inliers, paired, t_quantile
from src.lab.disturbance import Throughput, judge
from src.lab.ledger import Experiment
from src.lab.loop import Search, train_overrides
from tests.support.helpers import comment_patch, compose_search, fake_command, make_repo, read_tsv, session_children

SMALLER_BATCH = ["batch.total_tokens=4096", "batch.device_tokens=4096"]  # the stand-in's real gain: -0.2 bpb


# ---------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("pairs", [1, 3])
def test_a_confirmation_runs_two_pairs_until_sigma_has_two_dof(pairs):
    """At 1 dof (the two default baseline runs) one pair faces t(0.95, 1) = 6.31 and turned down a real 0.09 gain."""
    lab = SimpleNamespace(cfg=compose_search([f"search.confirm_pairs={pairs}"]))
    c = Confirmation(lab, attempts=None, record=None)
    assert [c.pairs(NoiseFloor(0.01, dof)) for dof in (0, 1, 2, 9)] == [max(2, pairs)] * 2 + [pairs] * 2


def test_t_quantiles_match_the_tables():
    # one-sided 95% and 99% points of Student's t (any statistics table)
    for dof, q95, q99 in [(1, 6.3138, 31.8205), (2, 2.9200, 6.9646), (3, 2.3534, 4.5407), (10, 1.8125, 2.7638),
                          (30, 1.6973, 2.4573)]:
        assert t_quantile(0.95, dof) == pytest.approx(q95, abs=1e-4)
        assert t_quantile(0.99, dof) == pytest.approx(q99, abs=1e-4)


def test_one_wild_run_is_cast_out_but_a_normal_spread_is_kept():
    assert inliers([3.966, 2.721, 2.730], spread=0.01) == [2.721, 2.730]
    assert inliers([2.50, 2.55, 2.60], spread=0.01) == [2.50, 2.55, 2.60]  # noisy, but no one run stands out
    assert inliers([2.250, 2.251, 2.262], spread=0.01) == [2.250, 2.251, 2.262]  # two close by chance cast out nothing
    floor = NoiseFloor.pooled([[3.966, 2.721, 2.730]], spread=0.01)
    assert floor.dof == 1 and floor.outliers == 1 and floor.sigma == pytest.approx(0.009 / math.sqrt(2))


def test_the_paired_rule_keeps_a_real_gain_and_not_noise():
    floor = NoiseFloor(sigma=0.01, dof=1)
    threshold = t_quantile(0.95, 1) * 0.01 * math.sqrt(2)  # 0.089: one dof buys little confidence
    real = paired([-0.2], floor, alpha=0.05, min_delta=0.002)
    assert real.keep and real.margin == pytest.approx(threshold) and "t(0.95, 1 dof)" in real.note
    assert not paired([-0.05], floor, alpha=0.05, min_delta=0.002).keep
    # the pairs' own spread joins the estimate: 2 pairs add 1 dof, and the threshold shrinks
    two = paired([-0.05, -0.06], floor, alpha=0.05, min_delta=0.002)
    assert two.keep and two.margin < threshold
    assert not paired([-0.001], NoiseFloor(0.0, 3), alpha=0.05, min_delta=0.002).keep  # min_delta still holds
    with pytest.raises(ValueError, match="needs a noise estimate"):
        paired([-0.2], NoiseFloor(0.0, 0), alpha=0.05, min_delta=0.002)


def test_a_run_is_disturbed_when_far_slower_than_the_fastest_of_its_shape():
    rows = [Experiment(exp="base-1", status="baseline", description="", val_bpb=3.0, tokens_per_sec=20000,
                       step_time_p50=0.4, mfu_percent=30, shape="A")]
    assert not judge(Throughput(15000, 0.5, 22), "A", rows, 2.0, 3.0).disturbed  # drift, not a disturbance
    slow = judge(Throughput(5000, 1.6, 7.5), "A", rows, 2.0, 3.0)
    assert slow.disturbed and slow.slowdown == pytest.approx(4.0) and "base-1" in slow.note
    # a shape the session has not run: compared by MFU (comparable across shapes), more loosely
    assert not judge(Throughput(9000, 0.9, 15), "B", rows, 2.0, 3.0).disturbed
    assert judge(Throughput(5000, 1.6, 7.5), "B", rows, 2.0, 3.0).disturbed
    assert not judge(None, "A", rows, 2.0, 3.0).disturbed


# ---------------------------------------------------------------------------- sessions


@pytest.fixture
def lab(tmp_path, shakespeare):
    """A project repo; the default data prepared (the session's preflight checks it), the session's MLflow store."""
    return {"tmp": tmp_path, "repo": make_repo(tmp_path), "uri": os.environ["MLFLOW_TRACKING_URI"]}


def session(lab, *overrides, proposals=(), tag="v"):
    """Run a session like `python -m src.search <overrides>` with the stand-in train; (rows by exp, rows, Search)."""
    f = lab["tmp"] / f"proposals-{tag}.yaml"
    f.write_text(yaml.safe_dump(list(proposals)))
    ovs = [f"search.repo={lab['repo']}", "search.progress=false", f"tracking.uri={lab['uri']}", "device=cpu",
           f"search.tag={tag}", "search.timeout_s=60", "agent=replay", f"agent.file={f}", *overrides]
    s = Search(compose_search(ovs), train_overrides(ovs), fake_command(), cli=ovs)
    s.run()
    rows = read_tsv(lab["repo"] / "outputs" / "research" / tag / "results.tsv")
    return {r["exp"]: r for r in rows}, rows, s


@pytest.mark.slow  # a session of several stand-in runs
def test_a_disturbed_first_baseline_is_found_by_a_faster_repeat_and_replaced(lab, monkeypatch):
    """The quick start's failure: the first baseline ran while the machine was busy (4x slower, 0.42 worse)."""
    monkeypatch.setenv("FAKE_SLOW", "base-1:4")
    by, rows, s = session(lab, "search.confirm=false", proposals=[{"description": "smaller batch",
                                                                    "overrides": SMALLER_BATCH}])
    assert [(r["exp"], r["status"]) for r in rows] == [("base-1", "disturbed"), ("base-2", "baseline"),
                                                       ("base-3", "baseline"), ("exp-001", "keep")]
    assert "4.00x slower than base-2" in by["base-1"]["reason"] and float(by["base-1"]["tokens_per_sec"]) == 5000
    st = s.lab.standings()
    assert st.baseline == pytest.approx(3.0 + 0.5 * math.log(0.04 / 0.06) ** 2)  # base-1's 3.5 is in no mean
    assert st.noise.sigma == 0.0 and st.noise.dof == 1 and st.disturbed_runs == 1
    assert float(by["exp-001"]["margin"]) == pytest.approx(0.002)  # min_delta: not 2 x a polluted sigma
    parent = json.loads((lab["repo"] / "outputs" / "research" / "v" / "state.json").read_text())["parent_run_id"]
    tags = {r.data.tags.get("search.exp"): r.data.tags for r in session_children(lab["uri"], parent)}
    assert tags["base-1"]["search.status"] == "disturbed" and "slower" in tags["base-1"]["search.reason"]
    assert "1 disturbed run(s) set aside" in s.summary()["verdicts"]


@pytest.mark.slow  # a session of several stand-in runs
def test_a_disturbed_experiment_is_rerun_and_decided_on_the_rerun(lab, monkeypatch):
    monkeypatch.setenv("FAKE_SLOW", "exp-001:3,exp-002:3,exp-002-a2:3,exp-002-a3:3")
    by, rows, s = session(lab, "search.confirm=false", "search.disturbed_retries=2",
                          proposals=[{"description": "lr 0.05", "overrides": ["optimizer.matrix_lr=0.05"]},
                                     {"description": "lr 0.055", "overrides": ["optimizer.matrix_lr=0.055"]}])
    e1, e2 = by["exp-001"], by["exp-002"]
    assert e1["status"] == "keep" and e1["attempts"] == "2" and e1["disturbed_runs"] == "1"
    assert float(e1["val_bpb"]) == pytest.approx(3.0 + 0.5 * math.log(0.05 / 0.06) ** 2)  # the undisturbed re-run
    assert "exp-001 disturbed" in e1["reason"] and "re-run" in e1["reason"]
    # the same shape (a learning rate does not change the speed), disturbed three times (a first run and
    # search.disturbed_retries=2 re-runs): neither kept nor discarded
    assert e2["status"] == "disturbed" and e2["attempts"] == "3" and e2["delta"] == ""
    assert "left undecided" in e2["reason"]
    assert s.lab.standings().best.exp == "exp-001" and s.lab.standings().experiments_run == 2
    parent = json.loads((lab["repo"] / "outputs" / "research" / "v" / "state.json").read_text())["parent_run_id"]
    children = session_children(lab["uri"], parent)
    rerun = sorted(r.info.run_name for r in children if r.data.tags.get("search.attempt", "").startswith("disturbed"))
    assert rerun == ["exp-001", "exp-002", "exp-002-a2"]  # every disturbed attempt shows, with why
    rows_runs = {r.data.tags["search.exp"]: r for r in children if "search.exp" in r.data.tags}
    assert rows_runs["exp-002"].data.tags["search.status"] == "disturbed"
    assert rows_runs["exp-002"].info.status == "FAILED" and rows_runs["exp-001"].info.status == "FINISHED"


@pytest.mark.slow  # a session of several stand-in runs
def test_baseline_repeats_that_disagree_bring_more_until_one_is_shown_the_outlier(lab, monkeypatch):
    monkeypatch.setenv("FAKE_SHIFT", "base-2:1.2")  # scored far off, yet ran at full speed: not disturbed
    by, rows, s = session(lab, "search.confirm=false", "search.max_experiments=0", proposals=[{"description": "x",
                                                                                              "overrides": SMALLER_BATCH}])
    assert [r["status"] for r in rows] == ["baseline"] * 3
    st = s.lab.standings()
    assert st.baseline_runs == 3 and st.baseline_inliers == 2 and st.noise.outliers == 1
    assert st.best.val_bpb == pytest.approx(float(by["base-1"]["val_bpb"]), abs=1e-6)  # a score its code got


@pytest.mark.slow  # a session of several stand-in runs
def test_baseline_repeats_stop_at_the_bound_when_they_keep_disagreeing(lab, monkeypatch):
    monkeypatch.setenv("FAKE_NOISE", "0.5")  # every run a different, wide score
    by, rows, s = session(lab, "search.confirm=false", "search.baseline_max_repeats=4", "search.max_experiments=0",
                          proposals=[{"description": "x", "overrides": SMALLER_BATCH}])
    assert [r["exp"] for r in rows] == ["base-1", "base-2", "base-3", "base-4"]
    assert s.lab.standings().noise.dof >= 1


@pytest.mark.slow  # a session of several stand-in runs
def test_with_weak_noise_a_would_be_keep_is_confirmed_and_null_changes_are_not_kept(lab, monkeypatch):
    """Defaults: 2 baseline runs (1 dof) make the noise weak, so a keep needs a paired confirmation."""
    monkeypatch.setenv("FAKE_NOISE", "0.04")
    repo = lab["repo"]
    nulls = [{"description": f"null {i}", "patch": comment_patch(repo, note=f"null change {i}")} for i in range(6)]
    by, rows, s = session(lab, proposals=[*nulls, {"description": "smaller batch", "overrides": SMALLER_BATCH}])
    decided = [r for r in rows if r["exp"].startswith("exp-") and r["exp"].count("-") == 1]
    assert [r["status"] for r in decided] == ["discard"] * 6 + ["keep"]
    assert "paired confirmation" in by["exp-007"]["reason"]
    earlier = [r for r in rows if r["status"] == "confirm" and not r["exp"].startswith("exp-007")]
    if not earlier:  # sigma from the two baseline runs alone (1 dof): 2 pairs, in alternating order
        assert [r["exp"] for r in rows[-5:]] == ["exp-007-b1", "exp-007-c1", "exp-007-c2", "exp-007-b2", "exp-007"]
    assert all(by[x]["status"] == "confirm" for x in ("exp-007-b1", "exp-007-c1"))
    st = s.lab.standings()
    assert st.count("confirm") >= 2 and s.summary()["noise_dof"] == st.noise.dof


@pytest.mark.slow  # a session of several stand-in runs
def test_confirmation_with_no_noise_estimate_runs_two_pairs(lab):
    by, rows, s = session(lab, "search.baseline_repeats=1", proposals=[{"description": "smaller batch",
                                                                        "overrides": SMALLER_BATCH}])
    assert [r["exp"] for r in rows] == ["base-1", "exp-001-b1", "exp-001-c1", "exp-001-c2", "exp-001-b2", "exp-001"]
    assert by["exp-001"]["status"] == "keep" and float(by["exp-001"]["delta"]) == pytest.approx(-0.2)


@pytest.mark.slow  # a session of several stand-in runs
def test_a_noop_patch_is_an_invalid_proposal_that_costs_no_run(lab):
    repo = lab["repo"]
    a, b, c = (repo / "src" / "research" / "optim.py").read_text().splitlines()[:3]
    noop = f"--- a/src/research/optim.py\n+++ b/src/research/optim.py\n@@ -1,3 +1,3 @@\n {a}\n-{b}\n+{b}\n {c}\n"  # b replaced by b
    by, rows, s = session(lab, "search.baseline_repeats=1", "search.confirm=false",
                          proposals=[{"description": "no-op", "patch": noop},
                                     {"description": "smaller batch", "overrides": SMALLER_BATCH}])
    assert by["exp-001"]["status"] == "invalid" and "the patch changes nothing" in by["exp-001"]["reason"]
    assert not (lab["repo"] / "outputs" / "research" / "v" / "runs" / "exp-001").exists()
    assert by["exp-002"]["status"] == "keep"
