"""Pruning at equal progress (src/lab/prune.py, search.prune): the rule on curves, and whole sessions with the
stand-in train (its curve is 0.7 val_bpb + 2.5 (1 - f)^2, a point every 5% of the budget, FAKE_CURVE_S apart):
a clearly worse screen run is stopped mid-run and recorded `pruned` with its reason (never kept, never scored),
a better one runs to the end, baselines and confirmation runs are never pruned, and off means off.

Run: python -m pytest -q tests/lab/test_prune.py
"""
from __future__ import annotations

import json
import os

import pytest
import yaml

from src.lab.loop import Search, train_overrides
from src.lab.prune import Pruner, curve_noise
from tests.support.helpers import compose_search, fake_command, make_repo, read_tsv


def test_the_rule_needs_two_points_in_a_row_past_the_margin_after_the_minimum_fraction():
    ref = {round(0.05 * i, 2): 3.0 for i in range(1, 21)}
    p = Pruner(ref, n_ref=2, sigma={f: 0.01 for f in ref}, min_fraction=0.3, sigmas=4.0, min_delta=0.02, best="exp-001")
    assert p.margin(0.5) == pytest.approx(4 * 0.01 * (1.5 ** 0.5))
    assert p(0.2, 9.0) == "" and p(0.25, 9.0) == ""  # before prune_min_fraction: never
    assert p(0.3, 3.1) == "" and p(0.35, 3.01) == ""  # one point past the line, then back under it
    assert p(0.4, 3.1) == "" and "pruned at 45% of the budget" in p(0.45, 3.1)
    unsure = Pruner(ref, 1, {}, 0.3, 4.0, 0.02, "baseline")
    assert unsure(0.5, 99.0) == "" and unsure(0.55, 99.0) == ""  # no curve noise measured at a fraction: no verdict


def test_curve_noise_pools_the_spread_of_runs_of_one_configuration():
    a = [{0.5: 3.0, 0.55: 2.9}, {0.5: 3.2, 0.55: 2.9}]
    b = [{0.5: 2.0}, {0.5: 2.2}, {0.5: 2.1}]
    sigma, dof = curve_noise([a, b, [{0.5: 9.0}]])  # a lone run adds nothing
    assert sigma[0.5] == pytest.approx(((0.02 + 0.02) / (1 + 2)) ** 0.5) and sigma[0.55] == 0.0 and dof == 1


def session(tmp_path, proposals, *more):
    repo = make_repo(tmp_path)
    f = tmp_path / "proposals.yaml"
    f.write_text(yaml.safe_dump(proposals))
    ovs = [f"search.repo={repo}", "search.progress=false", f"tracking.uri={os.environ['MLFLOW_TRACKING_URI']}",
           "device=cpu", "search.tag=p", "search.timeout_s=60", "agent=replay", f"agent.file={f}", *more]
    out = Search(compose_search(ovs), train_overrides(ovs), fake_command()).run()
    d = repo / "outputs" / "research" / "p"
    return out, {r["exp"]: r for r in read_tsv(d / "results.tsv")}, d


def lr(v: float) -> dict:
    return {"description": f"lr {v}", "overrides": [f"optimizer.matrix_lr={v}"]}


@pytest.mark.slow
def test_a_clearly_worse_run_is_stopped_mid_run_and_never_kept_and_confirmations_are_never_pruned(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setenv("FAKE_CURVE_S", "0.1")  # a 2-s run: the runner sees the curve while the run trains
    out, rows, d = session(tmp_path, [lr(0.01), lr(0.06), lr(0.0125)], "search.prune=true", "search.confirm=true")
    assert rows["exp-001"]["status"] == "pruned" and rows["exp-003"]["status"] == "pruned", rows
    for x in ("exp-001", "exp-003"):
        r = rows[x]
        assert r["val_bpb"] == "" and "pruned at " in r["reason"] and "two points in a row" in r["reason"]
        stopped_at = float(r["reason"].split("pruned at ")[1].split("%")[0]) / 100
        assert 0.3 <= stopped_at < 1.0  # from prune_min_fraction on, and before the end of the run
        printed = (d / "runs" / x / "run.log").read_text().count("overnight-curve ")
        assert stopped_at * 20 <= printed < 20  # it never finished its budget (the stand-in writes no summary then)
    assert rows["exp-003"]["reason"].count("exp-002") == 1  # judged against the best as it stood: exp-002
    assert rows["exp-002"]["status"] == "keep" and rows["exp-002"]["val_bpb"] != ""
    # the baselines and the confirmation runs of exp-002 ran to the end, pruning on or not
    for x, r in rows.items():
        if r["status"] in ("baseline", "confirm"):
            assert len(json.loads((d / "runs" / x / "summary.json").read_text())["curve"]) == 20, x
    assert any(r["status"] == "confirm" for r in rows.values())
    assert out["best_exp"] == "exp-002"


@pytest.mark.slow
def test_pruning_off_runs_every_experiment_to_its_end(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CURVE_S", "0.05")
    _, rows, d = session(tmp_path, [lr(0.01)], "search.confirm=false")
    assert rows["exp-001"]["status"] == "discard"
    assert len(json.loads((d / "runs" / "exp-001" / "summary.json").read_text())["curve"]) == 20
