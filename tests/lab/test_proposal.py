"""Proposals and their checks (src/lab/proposal.py): overrides, patches, composing, presets.

Run: python -m pytest -q tests/lab/test_proposal.py
"""
from __future__ import annotations

import shutil

import pytest
from hydra import compose, initialize_config_dir

from src.harness.config import TrainConfig, register_configs
from src.lab.proposal import (InvalidProposal, Proposal, check_overrides, check_patch_paths, compose_train,
                              merge_overrides, patch_paths, preset_yaml)
from tests.support.helpers import CONF, config_options

ROOTS = ["model", "optimizer", "batch"]
GROUPS = {"model", "optimizer", "batch", "device", "data", "budget"}


def test_from_dict_accepts_the_tool_shape_and_names_what_is_wrong():
    p = Proposal.from_dict({"description": "x", "hypothesis": "y", "overrides": ["model.depth=3"], "patch": ""})
    assert p.kind == "overrides" and p.patch is None
    assert Proposal.from_dict({"patch": "--- a/src/research/model.py\n"}).description == "code patch"
    assert Proposal.from_dict({"overrides": "a=1 b=2"}).overrides == ["a=1", "b=2"]
    with pytest.raises(InvalidProposal, match="unknown proposal field.*'overides'"):
        Proposal.from_dict({"description": "x", "overides": ["a=1"]})
    with pytest.raises(InvalidProposal, match="list of 'key=value'"):
        Proposal.from_dict({"overrides": {"a": 1}})
    p = Proposal("d", overrides=["a=1"], patch="diff", meta={"k": 1})
    assert Proposal.from_dict(p.to_dict()) == p and p.kind == "patch+overrides"


@pytest.mark.parametrize("bad,why", [
    (["seed=3"], "seed is fixed"),
    (["budget.seconds=600"], "outside the research surface"),
    (["data.eval_tokens=100"], "outside the research surface"),
    (["device=cuda"], "outside the research surface"),
    (["tracking.enabled=false"], "outside the research surface"),
    (["model.depth=2,3"], "sweep"),
    (["+model.new_knob=1"], "adds or deletes"),
    (["~model.depth"], "adds or deletes"),
    (["model.depth=3", "model.depth=4"], "set twice"),
    (["model.depth=("], "does not parse"),
])
def test_bad_overrides_are_refused_with_the_reason(bad, why):
    with pytest.raises(InvalidProposal, match=why):
        check_overrides(bad, ROOTS)


def test_keys_pinned_by_the_session_command_line_are_refused():
    with pytest.raises(InvalidProposal, match="fixed by the session's command line"):
        check_overrides(["batch.total_tokens=4096"], ROOTS, pinned=["batch.total_tokens"])
    assert len(check_overrides(["model=small", "optimizer.matrix_lr=0.05"], ROOTS, pinned=["device"])) == 2


def test_merge_overrides_new_values_win_by_key():
    assert merge_overrides(["a.b=1", "c=2"], ["c=3", "d=4"]) == ["a.b=1", "c=3", "d=4"]


def test_patch_paths_are_listed_and_files_outside_the_editable_ones_refused():
    patch = ("diff --git a/src/research/model.py b/src/research/model.py\n--- a/src/research/model.py\n+++ b/src/research/model.py\n@@ -1 +1 @@\n-a\n+b\n"
             "diff --git a/src/old.py b/src/new.py\nrename from src/old.py\nrename to src/new.py\n"
             "--- /dev/null\n+++ b/src/extra.py\n")
    assert patch_paths(patch) == ["src/research/model.py", "src/old.py", "src/new.py", "src/extra.py"]
    assert check_patch_paths(patch, ["src/*.py"]) == patch_paths(patch)
    with pytest.raises(InvalidProposal, match=r"touches src/old.py, src/new.py, src/extra.py, outside the editable"):
        check_patch_paths(patch, ["src/research/model.py", "src/research/optim.py"])
    with pytest.raises(InvalidProposal, match="names no file"):
        check_patch_paths("just some text\n", ["src/research/model.py"])


def test_compose_train_gives_the_typed_config_and_explains_bad_keys_values_and_options():
    cfg = compose_train(CONF, ["model.depth=3", "optimizer=adamw"])
    assert isinstance(cfg, TrainConfig) and cfg.model.depth == 3 and cfg.optimizer.name == "adamw"
    with pytest.raises(InvalidProposal, match="depht") as e:
        compose_train(CONF, ["model.depht=3"])
    assert "+model" not in str(e.value)  # no advice to add keys
    with pytest.raises(InvalidProposal, match="could not be converted"):
        compose_train(CONF, ["model.depth=deep"])
    with pytest.raises(InvalidProposal, match="nosuch"):
        compose_train(CONF, ["model=nosuch"])


def test_compose_train_inside_a_running_hydra_app_leaves_it_intact():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert compose_train(CONF, ["model.depth=5"]).model.depth == 5
        assert compose(config_name="train", overrides=["model.depth=6"]).model.depth == 6


def test_preset_reproduces_the_overrides(tmp_path):
    ovs = ["optimizer=adamw", "optimizer.matrix_lr=0.01", "model.window_pattern=L", "batch.total_tokens=4096",
           "batch.device_tokens=4096", "optimizer.adam_betas=[0.9,0.99]"]
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment").mkdir(exist_ok=True)
    text = preset_yaml(ovs, GROUPS, "test preset\nline two")
    assert text.startswith("# @package _global_\n# test preset\n# line two\n")
    (conf / "experiment" / "t_best.yaml").write_text(text)
    assert compose_train(conf, ["device=cpu", "+experiment=t_best"]) == compose_train(conf, ["device=cpu", *ovs])


@pytest.mark.parametrize("preset", config_options("experiment"))
def test_every_experiment_preset_composes(preset):
    assert isinstance(compose_train(CONF, [f"+experiment={preset}"]), TrainConfig)


# ---------------------------------------------------------------------------- interpolations (issue 20)

@pytest.mark.parametrize("line", ["model.depth=${oc.env:HOME}", "model.activation=${now:%H}",
                                  "optimizer.name=${hydra:runtime.cwd}", "model.depth='${oc.env:HOME,3}'",
                                  "model.window_pattern=S${oc.env:X}L", "optimizer.matrix_lr=${optimizer.embedding_lr}"])
def test_an_override_with_an_interpolation_or_resolver_is_refused(line):
    with pytest.raises(InvalidProposal, match=r"interpolation or resolver.*literal values"):
        check_overrides([line], ROOTS)


def test_literal_values_with_dollars_or_braces_alone_still_pass():
    assert len(check_overrides(["model.window_pattern=SSSL", "model.activation=relu2"], ROOTS)) == 2


@pytest.mark.slow  # a short session: baseline plus one proposal, the stand-in trainer
def test_an_env_secret_asked_for_by_interpolation_reaches_nothing_the_session_writes(tmp_path, monkeypatch):
    """`${oc.env:SECRET}` in a proposal is refused at validation: the value appears nowhere in the session
    dir (ledger, presets, logs, agent context) nor in its MLflow store."""
    import os

    import yaml

    from src.lab.loop import Search, train_overrides
    from tests.support.helpers import compose_search, fake_command, make_repo

    secret = "sk-test-7f3a9c1e-do-not-leak"
    monkeypatch.setenv("OVERNIGHT_TEST_SECRET", secret)
    repo = make_repo(tmp_path)
    f = tmp_path / "proposals.yaml"
    f.write_text(yaml.safe_dump([{"description": "env", "overrides": ["model.depth=${oc.env:OVERNIGHT_TEST_SECRET}"]}]))
    ovs = [f"search.repo={repo}", "search.progress=false", f"tracking.uri={os.environ['MLFLOW_TRACKING_URI']}",
           "device=cpu", "search.tag=leak", "search.timeout_s=60", "search.confirm=false",
           "search.baseline_repeats=1", "search.max_experiments=1", "agent=replay", f"agent.file={f}"]
    Search(compose_search(ovs), train_overrides(ovs), fake_command()).run()
    session = repo / "outputs" / "research" / "leak"
    files = [p for p in session.rglob("*") if p.is_file()]
    assert files, "the session wrote nothing"
    assert any("interpolation or resolver" in p.read_text(errors="replace") for p in files)  # refused, on record
    leaked = [p for p in files if secret in p.read_bytes().decode(errors="replace")]
    assert not leaked, leaked
    mlflow_db = os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")
    assert secret.encode() not in open(mlflow_db, "rb").read()
