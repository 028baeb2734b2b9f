"""Staging a candidate (src/lab/candidate.py): checked against the best, committed with its preset, dry-run.

Run: python -m pytest -q tests/lab/test_candidate.py
"""
from __future__ import annotations

import pytest

from src.lab import candidate
from src.lab.proposal import InvalidProposal, Proposal
from src.lab.runner import Outcome
from src.lab.decisions import CRASH
from tests.support.helpers import git


def proposal(*overrides: str, patch=None) -> Proposal:
    return Proposal("try it", "it helps", list(overrides), patch, {})


@pytest.mark.slow
def test_an_override_proposal_is_committed_with_the_kept_overrides_as_a_preset(make_lab):
    lab, w, _ = make_lab()
    best = lab.standings().best
    commit = candidate.stage(lab, w.tree, "exp-001", proposal("optimizer.matrix_lr=0.05"), best,
                             ["optimizer.matrix_lr=0.05"])
    assert w.tree.head() == commit and git(lab.session.worktree, "rev-parse", f"{commit}^") == best.commit
    preset = lab.session.preset_path.read_text()
    assert "matrix_lr: 0.05" in preset and "Reproduce: git checkout" in preset
    assert git(lab.session.worktree, "rev-parse", f"refs/research/{lab.session.tag}/exp-001") == commit
    assert git(lab.session.worktree, "log", "-1", "--format=%B").startswith("exp-001: try it")


@pytest.mark.slow
def test_a_proposal_that_restates_the_best_is_invalid_before_anything_is_committed(make_lab):
    lab, w, _ = make_lab()
    best = lab.standings().best
    same = f"optimizer.matrix_lr={lab.base_config.optimizer.matrix_lr}"
    with pytest.raises(InvalidProposal, match="changes nothing relative to the best"):
        candidate.stage(lab, w.tree, "exp-001", proposal(same), best, [same])
    assert w.tree.head() == best.commit


def test_a_patch_that_does_not_apply_is_invalid(make_lab):
    lab, w, _ = make_lab()
    bad = "--- a/src/research/model.py\n+++ b/src/research/model.py\n@@ -1,1 +1,1 @@\n-no such line\n+x\n"
    with pytest.raises(InvalidProposal, match="does not apply to the best commit"):
        candidate.stage(lab, w.tree, "exp-001", proposal(patch=bad), lab.standings().best, [])


def test_overrides_outside_the_research_roots_are_invalid(make_lab):
    lab, w, _ = make_lab()
    with pytest.raises(InvalidProposal):
        candidate.stage(lab, w.tree, "exp-001", proposal("device.type=cuda"), lab.standings().best,
                        ["device.type=cuda"])


def test_the_dry_run_runs_on_the_workers_runner_and_a_failing_one_is_invalid(make_lab, monkeypatch):
    lab, w, runner = make_lab()
    candidate.dry_run(lab, w, "exp-001", has_preset=True)
    ovs, run_dir, score = runner.calls[-1]
    assert not score and "dry_run=true" in ovs and f"+experiment={lab.session.preset_name}" in ovs
    assert run_dir == lab.session.runs_dir / "exp-001" / "preflight"
    monkeypatch.setattr(runner, "run", lambda *a, **k: Outcome(CRASH, run_dir, {"error": "boom"}, returncode=1))
    with pytest.raises(InvalidProposal, match="fails its dry run.*boom"):
        candidate.dry_run(lab, w, "exp-001", has_preset=False)


def test_the_committed_preset_is_merged_with_a_preset_the_user_gave():
    from types import SimpleNamespace

    lab = SimpleNamespace(session=SimpleNamespace(preset_name="t_best"))
    assert candidate.with_preset(lab, ["device=cpu"], False) == ["device=cpu"]
    assert candidate.with_preset(lab, ["device=cpu"], True) == ["device=cpu", "+experiment=t_best"]
    assert candidate.with_preset(lab, ["+experiment=mine"], True) == ["+experiment=[mine,t_best]"]
