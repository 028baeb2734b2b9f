"""A resumed session continues as it was started (src/lab/resume.py), and no-op proposals cost no run,
through the real CLI (`python -m src.search`, real tiny training runs in the session's worktree).

Resume: `search.tag=X search.resume=true` alone brings back the search knobs, the agent and its
options; a knob given again wins, with a warning naming the change. No-op: a patch that changes
nothing, or a proposal equal to the best, is an `invalid` row and the session goes on.

Run: python -m pytest -q tests/lab/test_resume_fidelity.py   (slow: real training)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from src.lab.config import SearchAppConfig
from src.lab.resume import explicit_keys, record_knobs, restore_knobs
from src.lab.session import SessionState
from tests.support.helpers import TINY_TRAIN, compose_search, compose_train_cfg, make_repo, read_tsv, run_cli


def test_restore_knobs_puts_back_the_sessions_values_and_names_what_the_command_line_changed():
    started = compose_search(["agent=replay", "agent.file=p.yaml", "search.baseline_repeats=1",
                              "search.max_experiments=3", "search_space=lr"])
    st = SessionState(tag="x", repo=".", branch="research/x", base_commit="0" * 40, created="")
    record_knobs(started, st)
    st = SessionState.from_json(st.to_json())  # as a later invocation reads it from state.json
    cli = ["search.tag=x", "search.resume=true", "search.max_experiments=5"]
    now: SearchAppConfig = compose_search(cli)
    changes = restore_knobs(now, st, explicit_keys(cli))
    assert now.agent.name == "replay" and now.agent.file == "p.yaml" and type(now.agent).__name__ == "ReplayAgentConfig"
    assert now.search.baseline_repeats == 1 and now.search.max_experiments == 5 and now.search_space.name == "lr"
    assert now.search.resume is True and now.search.tag == "x"  # where the session lives: this command line's
    assert changes == ["search.max_experiments: 3 -> 5"]
    # another agent given explicitly wins, and the warning names the original and how to keep it
    cli = ["search.tag=x", "search.resume=true", "agent=tpe", "agent.seed=3"]
    now = compose_search(cli)
    changes = restore_knobs(now, st, explicit_keys(cli))
    assert now.agent.name == "tpe" and now.agent.seed == 3
    assert any("was run by agent=replay" in c and "search.resume=true agent=replay" in c for c in changes)


def cli_args(tmp: Path, repo: Path, proposals: list, *extra: str) -> list[str]:
    f = tmp / "proposals.yaml"
    f.write_text(yaml.safe_dump(proposals))
    return ["agent=replay", f"agent.file={f}", f"search.repo={repo}", "search.tag=cli", "search.progress=false",
            f"hydra.run.dir={tmp / 'hydra'}", *TINY_TRAIN, "search.preflight=false", "tracking.enabled=false",
            "search.test_split=false", *extra]


def resume_args(tmp: Path, repo: Path, *extra: str) -> list[str]:
    return ["search.tag=cli", "search.resume=true", f"search.repo={repo}", f"hydra.run.dir={tmp / 'hydra2'}", *extra]


@pytest.mark.slow
def test_resume_continues_with_the_sessions_knobs_agent_and_options(tmp_path, shakespeare):
    repo = make_repo(tmp_path)
    proposals = [{"description": f"matrix lr {lr}", "overrides": [f"optimizer.matrix_lr={lr}"]} for lr in (0.05, 0.03)]
    run_cli("src.search", *cli_args(tmp_path, repo, proposals, "search.baseline_repeats=1", "search.confirm=false",
                                    "search.max_experiments=1"), timeout=600)
    d = repo / "outputs" / "research" / "cli"
    assert [r["exp"] for r in read_tsv(d / "results.tsv")] == ["base-1", "exp-001"]
    # only the session and one new knob: one baseline run is enough, no confirmation, the replay file goes on
    p = run_cli("src.search", *resume_args(tmp_path, repo, "search.max_experiments=2"), timeout=600)
    rows = read_tsv(d / "results.tsv")
    assert [r["exp"] for r in rows] == ["base-1", "exp-001", "exp-002"]
    assert rows[2]["description"] == "matrix lr 0.03" and rows[2]["status"] in ("keep", "discard")
    out = p.stdout + p.stderr
    assert "search.max_experiments: 1 -> 2" in out and "baseline_repeats" not in out.split("continues as it was")[-1]
    state = json.loads((d / "state.json").read_text())
    assert state["agent"] == "replay" and state["agent_config"]["file"].endswith("proposals.yaml")
    assert state["search"]["max_experiments"] == 2 and state["search"]["confirm"] is False


@pytest.mark.slow
def test_noop_proposals_are_invalid_rows_and_the_session_goes_on(tmp_path, shakespeare):
    repo = make_repo(tmp_path)
    a, b, c = (repo / "src" / "research" / "optim.py").read_text().splitlines()[:3]
    noop = f"--- a/src/research/optim.py\n+++ b/src/research/optim.py\n@@ -1,3 +1,3 @@\n {a}\n-{b}\n+{b}\n {c}\n"
    lr = compose_train_cfg(TINY_TRAIN).optimizer.matrix_lr
    proposals = [{"description": "a patch that changes nothing", "patch": noop},
                 {"description": "the best's own learning rate", "overrides": [f"optimizer.matrix_lr={lr}"]},
                 {"description": "the same no-op patch with the same learning rate", "patch": noop,
                  "overrides": [f"optimizer.matrix_lr={lr}"]},
                 {"description": "matrix lr 0.05", "overrides": ["optimizer.matrix_lr=0.05"]}]
    p = run_cli("src.search", *cli_args(tmp_path, repo, proposals, "search.baseline_repeats=1", "search.confirm=false"),
                timeout=600)
    d = repo / "outputs" / "research" / "cli"
    rows = read_tsv(d / "results.tsv")
    assert [(r["exp"], r["status"]) for r in rows] == [("base-1", "baseline"), ("exp-001", "invalid"),
                                                       ("exp-002", "invalid"), ("exp-003", "invalid"),
                                                       ("exp-004", rows[4]["status"])]
    assert rows[4]["status"] in ("keep", "discard") and "best val_bpb" in p.stdout
    assert "the patch changes nothing" in rows[1]["reason"] and "changes nothing" in rows[2]["reason"]
    assert "the patch changes nothing" in rows[3]["reason"]
    assert not any((d / "runs" / f"exp-00{i}").exists() for i in (1, 2, 3))  # no run, not even a dry run
    # a resume does not meet the same proposals again: the replay file is done
    p = run_cli("src.search", *resume_args(tmp_path, repo, "search.max_experiments=10"), timeout=600)
    assert len(read_tsv(d / "results.tsv")) == 5 and "nothing more to propose" in p.stdout
