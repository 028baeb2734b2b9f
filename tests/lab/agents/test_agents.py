"""Agents (src/lab/agents/): the search spaces, the Optuna agents (tpe, random) and replay; every agent
and search-space option composes and builds.

Run: python -m pytest -q tests/lab/agents/test_agents.py
"""
from __future__ import annotations

import json

import pytest
import yaml

from src.lab.agents import Best, SearchState, build_agent
from src.lab.agents.replay import ReplayAgent, load_proposals
from src.lab.agents.space import SpaceError, check_space, distributions, to_overrides
from src.lab.config import KnobConfig, OptunaAgentConfig, ReplayAgentConfig, SearchSpaceConfig
from src.lab.ledger import Experiment
from src.lab.proposal import Proposal, check_overrides, compose_train
from tests.support.helpers import CONF, REPO, compose_search, config_options

ROOTS = ["model", "optimizer", "batch"]


def state(history=(), best_config=None, worktree=REPO) -> SearchState:
    base = compose_train(CONF, ["device=cpu"])
    return SearchState(tag="t", best=Best("baseline", "0" * 40, 2.9, []), margin=0.01, sigma=0.005,
                       history=list(history), editable=["src/research/model.py"], override_roots=ROOTS, pinned=["device"],
                       base_overrides=["device=cpu"], worktree=worktree, base_config=base,
                       best_config=best_config or base, experiments_left=5, seconds_left=3600.0)


OFFLINE = ["random", "replay", "tpe"]  # agent=claude (needs a key) is tested in test_claude_agent.py


def test_every_offline_agent_has_a_config_option():
    assert set(OFFLINE) <= set(config_options("agent"))


@pytest.mark.parametrize("agent", OFFLINE)
def test_every_offline_agent_option_composes_and_builds(agent, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump([{"description": "x", "overrides": ["model.depth=3"]}]))
    cfg = compose_search([f"agent={agent}", f"agent.file={f}"] if agent == "replay" else [f"agent={agent}"])
    p = build_agent(cfg.agent, cfg.search_space).propose(state())
    assert isinstance(p, Proposal) and p.meta["agent"] == agent
    if agent == "replay":  # the file's first entry
        assert (p.description, p.overrides, p.patch) == ("x", ["model.depth=3"], None)
    else:  # a point of the default space: every knob set once, in the space's order
        assert [o.split("=")[0] for o in p.overrides] == [k.key for k in cfg.search_space.knobs]
        check_overrides(p.overrides, ROOTS)


@pytest.mark.parametrize("space", config_options("search_space"))
def test_every_search_space_is_valid_and_its_points_compose(space):
    cfg = compose_search([f"search_space={space}"])
    check_space(cfg.search_space, ROOTS)
    agent = build_agent(OptunaAgentConfig(name="random", sampler="random", seed=1), cfg.search_space)
    for _ in range(3):
        p = agent.propose(state())
        check_overrides(p.overrides, ROOTS)
        compose_train(CONF, ["device=cpu", *p.overrides])


@pytest.mark.parametrize("knob,why", [
    (KnobConfig(key="model.nosuch", low=1, high=2), "no such train config key"),
    (KnobConfig(key="budget.seconds", low=1, high=2), "outside search.override_roots"),
    (KnobConfig(key="model.depth", type="int", low=4, high=2), "low < high"),
    (KnobConfig(key="optimizer.matrix_lr", low=0, high=1, log=True), "log scale"),
    (KnobConfig(key="model.window_pattern", type="choice", choices=[]), "non-empty"),
    (KnobConfig(key="batch.device_tokens", type="same_as", same_as="batch.nope"), "same_as must name"),
    (KnobConfig(key="model.depth", type="grid"), "expected float, int, choice or same_as"),
])
def test_malformed_spaces_fail_at_start_naming_the_knob(knob, why):
    with pytest.raises(SpaceError, match=why):
        check_space(SearchSpaceConfig(name="bad", knobs=[knob]), ROOTS)


def test_same_as_knobs_follow_their_source_and_floats_keep_4_significant_digits():
    space = SearchSpaceConfig(knobs=[KnobConfig(key="batch.total_tokens", type="choice", choices=[4096]),
                                     KnobConfig(key="batch.device_tokens", type="same_as", same_as="batch.total_tokens"),
                                     KnobConfig(key="optimizer.matrix_lr", low=0.01, high=0.1, log=True)])
    assert sorted(distributions(space)) == ["batch.total_tokens", "optimizer.matrix_lr"]
    assert to_overrides({"batch.total_tokens": 4096, "optimizer.matrix_lr": 0.0523456}, space) == [
        "batch.total_tokens=4096", "batch.device_tokens=4096", "optimizer.matrix_lr=0.05235"]


def _row(exp, p, status, val):
    return Experiment(exp=exp, status=status, description=p.description, val_bpb=val, proposal=p)


def test_tpe_restores_history_and_learns_from_outcomes():
    cfg = compose_search(["agent=tpe", "agent.n_startup_trials=2"])
    agent = build_agent(cfg.agent, cfg.search_space)
    base_rows = [Experiment(exp="base-1", status="baseline", description="baseline", val_bpb=2.9)]
    first = agent.propose(state(base_rows))
    assert first.meta["agent"] == "tpe" and "batch.device_tokens" not in first.meta["params"]
    assert first.description.startswith("tpe: ") and first.kind == "overrides"
    history = base_rows + [_row("exp-001", first, "discard", 2.95)]
    # a fresh agent (a resumed session) re-learns the baseline and every earlier point from the ledger
    again = build_agent(cfg.agent, cfg.search_space)
    again.restore(history, state(history))
    assert [t.user_attrs["exp"] for t in again.study.trials] == ["baseline", "exp-001"]
    assert again.study.trials[1].value == 2.95
    p = again.propose(state(history))
    again.observe(_row("exp-002", p, "crash", None), state(history))
    assert again.study.trials[-1].state.name == "FAIL"
    q = again.propose(state(history))  # asked by an earlier invocation: observed via the ledger
    other = build_agent(cfg.agent, cfg.search_space)
    other.observe(_row("exp-003", q, "keep", 2.7), state(history))
    assert other.study.trials[-1].value == 2.7
    # a pruned run is PRUNED to the sampler (TPE ranks it below every completed trial), also when re-told on resume
    r = other.propose(state(history))
    other.observe(_row("exp-004", r, "pruned", None), state(history))
    assert other.study.trials[-1].state.name == "PRUNED"
    resumed = build_agent(cfg.agent, cfg.search_space)
    resumed.restore(history + [_row("exp-004", r, "pruned", None)], state(history))
    assert [t.state.name for t in resumed.study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]


def test_random_agent_is_reproducible_by_seed():
    cfg = compose_search(["agent=random", "agent.seed=7"])
    a, b = (build_agent(cfg.agent, cfg.search_space) for _ in range(2))
    assert a.propose(state()).overrides == b.propose(state()).overrides


def test_replay_reads_yaml_jsonl_and_patch_files_and_resumes_after_the_last_replayed(tmp_path):
    (tmp_path / "fix.diff").write_text("--- a/src/research/model.py\n+++ b/src/research/model.py\n")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"proposals": [
        {"description": "one", "overrides": ["model.depth=3"]},
        {"description": "two", "patch_file": "fix.diff"}]}))
    (tmp_path / "p.jsonl").write_text(json.dumps({"description": "j", "overrides": ["model.depth=5"]}) + "\n\n")
    assert [p.description for p in load_proposals(tmp_path / "p.yaml")] == ["one", "two"]
    assert load_proposals(tmp_path / "p.yaml")[1].patch.startswith("--- a/src/research/model.py")
    assert load_proposals(tmp_path / "p.jsonl")[0].overrides == ["model.depth=5"]
    agent = ReplayAgent(ReplayAgentConfig(name="replay", file=str(tmp_path / "p.yaml")))
    p1 = agent.propose(state())
    assert p1.meta["replay_index"] == 0
    resumed = ReplayAgent(ReplayAgentConfig(name="replay", file=str(tmp_path / "p.yaml")))
    resumed.restore([_row("exp-001", p1, "keep", 2.8)], state())
    assert resumed.propose(state()).description == "two" and resumed.propose(state()) is None


@pytest.mark.parametrize("content,why", [
    ("[]", "non-empty list"),
    ("- {description: x, overides: [a=1]}", "proposal 1: unknown proposal field"),
    ("- {description: x, overrides: {a: 1}}", "proposal 1: overrides must be a list"),
])
def test_replay_file_errors_name_the_entry(tmp_path, content, why):
    (tmp_path / "bad.yaml").write_text(content)
    with pytest.raises(ValueError, match=why):
        load_proposals(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="no such file"):
        load_proposals(tmp_path / "missing.yaml")


def test_unknown_agent_name_is_a_clear_error():
    with pytest.raises(ValueError, match="agent.name='nosuch'.*agents: random, replay, tpe"):  # noqa
        build_agent(OptunaAgentConfig(name="nosuch"), SearchSpaceConfig())


def test_state_reads_worktree_files_and_refuses_paths_outside_it():
    s = state()
    assert "class GPT" in s.read("src/research/model.py")
    with pytest.raises(ValueError, match="outside"):
        s.read("../../etc/passwd")
