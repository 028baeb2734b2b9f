"""Staging a candidate (src/lab/candidate.py): checked against the best, committed with its preset; one that fails
before its first step is invalid.

Run: python -m pytest -q tests/lab/test_candidate.py
"""
from __future__ import annotations

import pytest

from src.lab import candidate
from src.lab.proposal import InvalidProposal, Proposal
from src.lab.runner import Outcome
from src.lab.decisions import CRASH, OK
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


def test_a_candidate_that_crashes_before_its_model_is_built_is_invalid_and_one_that_crashes_later_is_not(make_lab):
    """No dry run per candidate: its own run tells (the harness's summary says `built` once model and optimizer are)."""
    lab, _, _ = make_lab()
    p, d = proposal("optimizer.matrix_lr=0.05"), lab.session.runs_dir / "exp-001"
    early = Outcome(CRASH, d, {"status": CRASH, "error": "ModuleNotFoundError: no module named x"}, returncode=1)
    err = candidate.failed_to_start(lab, p, early)
    assert isinstance(err, InvalidProposal) and "before its first step" in str(err) and "no module named x" in str(err)
    late = Outcome(CRASH, d, {"status": CRASH, "error": "RuntimeError: boom", "built": True}, returncode=1)
    assert candidate.failed_to_start(lab, p, late) is None  # a crash of the run itself counts
    assert candidate.failed_to_start(lab, None, early) is None  # a baseline run is never a proposal's fault
    assert candidate.failed_to_start(lab, p, Outcome(CRASH, d, {}, returncode=-9)) is None  # no summary: not judged
    assert candidate.failed_to_start(lab, p, Outcome(OK, d, {"status": OK}, returncode=0)) is None
    lab.cfg.search.preflight = False
    assert candidate.failed_to_start(lab, p, early) is None  # search.preflight=false: a crash like any other


def test_the_committed_preset_is_merged_with_a_preset_the_user_gave():
    from types import SimpleNamespace

    lab = SimpleNamespace(session=SimpleNamespace(preset_name="t_best"))
    assert candidate.with_preset(lab, ["device=cpu"], False) == ["device=cpu"]
    assert candidate.with_preset(lab, ["device=cpu"], True) == ["device=cpu", "+experiment=t_best"]
    assert candidate.with_preset(lab, ["+experiment=mine"], True) == ["+experiment=[mine,t_best]"]
