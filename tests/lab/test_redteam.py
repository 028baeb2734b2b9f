"""The red team: every adversarial patch (src/lab/fakes/redteam.py) is refused or scored `tampered`; every honest one passes.

Two layers. The static contract (src/lab/contract.py) refuses, before any run, patches that
import outside the allow-list, rebind library or harness functions, or reach files, the process,
the clock or introspection. The scorer (src/harness/score.py) and the runner catch at run time what is
plain model code (a model that looks ahead, depends on the batch, keeps state, returns something
other than logits), and, with the contract switched off, the tampering the contract would refuse.

Run: python -m pytest -q tests/lab/test_redteam.py          (the run-time layer is marked slow)
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from src.lab.config import ContractConfig
from src.lab.contract import ContractViolation, check_files, check_source
from src.lab.runner import Runner
from src.lab.fakes.redteam import ATTACKS, BUDGET_PATCHES, LEGIT, OVERRUN, REFUSED, TAMPERED, prepend
from src.lab.integrity import DeviceBudget, clock_start, outside_seconds
from tests.support.helpers import REPO, git, make_repo

# eval 16,385 tokens: four full scoring batches of 32 rows on CPU, so that a model that keeps state uses it
TINY_RUN = ["model.depth=2", "budget.mode=tokens", "budget.tokens=16384", "data.eval_tokens=16385", "device=cpu",
            "tracking.enabled=false", "progress=false"]
CONTRACT = ContractConfig()


def patched(p) -> str:
    return p.transform((REPO / p.path).read_text())


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a.static], ids=lambda a: a.name)
def test_the_contract_refuses_the_attack_with_file_line_and_rule(attack):
    problems = check_source(patched(attack), attack.path, CONTRACT)
    assert problems, f"{attack.name} passed the static contract"
    assert all(p.startswith(f"{attack.path}:") and ": " in p[len(attack.path) + 1:] for p in problems)
    if attack.rule:  # refused by the rule that names what it reached, at a line the patch added
        assert any(attack.rule in p for p in problems), problems
        original = (REPO / attack.path).read_text().splitlines()
        text = patched(attack).splitlines()
        lines = {int(p.split(":")[1]) for p in problems if attack.rule in p}
        assert any(text[n - 1] not in original for n in lines), (lines, problems)


@pytest.mark.parametrize("attack", [a for a in ATTACKS if not a.static], ids=lambda a: a.name)
def test_plain_model_code_passes_the_contract_and_is_left_to_the_scorer(attack):
    assert check_source(patched(attack), attack.path, CONTRACT) == []


@pytest.mark.parametrize("patch", LEGIT, ids=lambda p: p.name)
def test_honest_patches_pass_the_contract(patch):
    assert check_source(patched(patch), patch.path, CONTRACT) == []


def test_the_contract_reports_every_violation_and_can_be_switched_off(tmp_path):
    f = tmp_path / "src" / "research" / "model.py"
    f.parent.mkdir(parents=True)
    f.write_text("import os\nimport torch\ntorch.load = None\nx = open('a')\n")
    with pytest.raises(ContractViolation) as e:
        check_files(tmp_path, ["src/research/model.py"], CONTRACT)
    msg = str(e.value)
    assert "src/research/model.py:1: imports os" in msg and "src/research/model.py:3: assigns to torch.load" in msg
    assert "src/research/model.py:4: uses open" in msg
    check_files(tmp_path, ["src/research/model.py"], ContractConfig(enabled=False))  # off: no refusal


@pytest.mark.parametrize("call", ["torch.set_num_threads(2)", "torch.set_num_interop_threads(2)"])
def test_a_patch_cannot_take_more_threads_than_its_slot_gives(call):
    """device.threads (a worker's fixed share of the cores) belongs to the harness: more threads would buy a
    time-budgeted run more compute, and with search.workers > 1 take it from the other worker."""
    problems = check_source(prepend(call + "\n")((REPO / "src" / "research" / "model.py").read_text()), "src/research/model.py", CONTRACT)
    assert any(call.split("(")[0] in p for p in problems), problems


def test_a_patch_that_does_not_parse_is_refused_with_its_line():
    assert check_source("def f(:\n", "src/research/model.py", CONTRACT) == ["src/research/model.py:1: does not parse (invalid syntax)"]


# ---------------------------------------------------------------------------- run time: the real runner + scorer

@pytest.fixture(scope="module")
def repo(tmp_path_factory, shakespeare):
    return make_repo(tmp_path_factory.mktemp("redteam"))


def run_patched(repo, tmp_path, patch):
    """Commit the patch in the repo, train it briefly through the real Runner (which scores it), reset."""
    f = repo / patch.path
    original = f.read_text()
    f.write_text(patch.transform(original))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", patch.name)
    try:
        return Runner(repo).run(TINY_RUN, tmp_path / "run", timeout_s=300)
    finally:
        git(repo, "reset", "-q", "--hard", "HEAD~1")
        git(repo, "clean", "-qfd")


RUNTIME_ATTACKS = [a for a in ATTACKS if not a.static] + [
    a for a in ATTACKS if a.name in ("rebind torch.nn.functional.cross_entropy at import", "rebind via an alias of "
                                     "torch.Tensor", "slow the budget clock", "train on the validation split",
                                     "write into the run directory", "rebind the harness's loss through src.harness.evaluate")]


@pytest.mark.slow
@pytest.mark.parametrize("attack", RUNTIME_ATTACKS, ids=lambda a: a.name)
def test_the_runner_and_scorer_catch_the_attack_at_run_time(repo, tmp_path, attack):
    out = run_patched(repo, tmp_path, attack)
    assert out.status == "tampered", (out.status, out.error_line, out.log_tail[-2000:])
    assert out.val_bpb is None and out.error_line
    if attack.kind == "compute while scored":  # the runner handed the judge the run's own training cost
        assert "CPU s" in out.error_line and "training cost" in out.error_line, out.error_line


def test_a_run_hides_every_saved_model_but_its_own(tmp_path, monkeypatch):
    """What a run hides besides the held-out splits (src/harness/train.py other_checkpoints): every saved model under
    the folders the lab names and the project's outputs, but those in its own run folder."""
    from src.harness.paths import HIDE_ROOTS_ENV
    from src.harness.train import other_checkpoints

    own, other = tmp_path / "runs" / "exp-002", tmp_path / "runs" / "exp-001"
    for d in (own, other, tmp_path / "older" / "x"):
        d.mkdir(parents=True)
    for f in (own / "checkpoint.pt", other / "checkpoint.frozen.pt", tmp_path / "older" / "x" / "model.safetensors",
              other / "summary.json"):
        f.write_bytes(b"0")
    monkeypatch.setenv(HIDE_ROOTS_ENV, os.pathsep.join([str(tmp_path / "runs"), str(tmp_path / "older")]))
    root = tmp_path.resolve()
    found = {f.relative_to(root).as_posix() for f in other_checkpoints(own) if root in f.parents}
    assert {"runs/exp-001/checkpoint.frozen.pt", "older/x/model.safetensors"} <= found
    assert not any(f.startswith("runs/exp-002") or f.endswith(".json") for f in found)


@pytest.mark.slow  # subprocesses: real processes
def test_a_run_cannot_read_the_checkpoint_of_another_run(repo, tmp_path):
    """Red team 2026-12-07 (eighth session): a step recipe loaded the best earlier run's frozen checkpoint (a warm
    start from weights trained by other runs: training outside the budget, kept at -0.47, each confirmation run
    starting from the best so far). The runner has every run hide the saved models beside its own folder."""
    other = tmp_path / "exp-001" / "checkpoint.frozen.pt"
    other.parent.mkdir()
    other.write_bytes(b"weights")
    patch = SimpleNamespace(name="read another run's checkpoint", path="src/research/step.py",
                            transform=prepend(f"_W = open({str(other)!r}, 'rb').read()\n"))
    out = run_patched(repo, tmp_path, patch)
    assert out.status == "tampered" and "PermissionError" in out.error_line, (out.status, out.error_line)


def honest_groups(size: int = 4) -> list[list]:
    """The honest patches in groups that apply together (each patch's anchors still found after the others of
    its group), at most `size` a group: one scored run per group instead of one per patch (suite time)."""
    groups: list[list] = []
    for patch in LEGIT:
        g = next((g for g in groups if len(g) < size and applies(g + [patch])), None)
        if g is None:
            groups.append([patch])
        else:
            g.append(patch)
    return groups


def applies(patches: list) -> bool:
    """Whether the patches, applied one after the other to the checkout's files, all find their anchors."""
    texts: dict[str, str] = {}
    try:
        for p in patches:
            texts[p.path] = p.transform(texts.get(p.path, (REPO / p.path).read_text()))
    except (AssertionError, ValueError):
        return False
    return True


def together(patches: list) -> SimpleNamespace:
    """The patches as one change set for run_budget_patch (name, changes: (path, transform) in order)."""
    return SimpleNamespace(name=" + ".join(p.name for p in patches), changes=[(p.path, p.transform) for p in patches])


@pytest.mark.slow
@pytest.mark.parametrize("group", honest_groups(), ids=lambda g: " + ".join(p.name for p in g))
def test_honest_patches_are_scored(repo, tmp_path, group):
    """Every honest patch is trained and scored (with the others of its group: each group's patches apply
    together; a false refusal of any one of them fails its group, whose name lists its patches)."""
    out = run_budget_patch(repo, tmp_path, together(group), TINY_RUN, budget=None)
    assert out.status == "ok", (out.status, out.error_line, out.log_tail[-2000:])
    assert 2.0 < out.val_bpb < 9.0  # a scored, untrained-ish tiny model: between a good model and uniform (8 bits)
    assert (tmp_path / "run" / "score.json").is_file()


@pytest.mark.slow  # subprocesses: real processes
def test_a_val_bpb_the_train_process_reports_is_never_taken(tmp_path):
    """A train command that writes its own summary.json (val_bpb 2.5, as the stand-in does) and no checkpoint."""
    from tests.support.helpers import fake_command

    out = Runner(REPO, command=fake_command(), score_checkpoints=True).run(["device=cpu"], tmp_path / "run", 60)
    assert out.status == "tampered" and out.val_bpb is None
    assert "without saving its checkpoint" in out.error_line


@pytest.mark.slow  # subprocesses: real processes
def test_the_scorer_says_when_it_is_ready_and_its_verdict_still_comes_through(tmp_path):
    """A standalone run waits for READY before its clock starts; reading it must not eat the verdict."""
    from src.harness.score import Scorer

    import os

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    scorer = Scorer(REPO, tmp_path / "score.log", cpus=tuple(cores[-1:])).start()  # a lab worker's slot: one core
    try:
        if cores:  # pinned before exec, as a worker's scorer is
            assert os.sched_getaffinity(scorer.proc.pid) == {cores[-1]}
        assert scorer.wait_ready(timeout_s=120)
        verdict = scorer.score(tmp_path / "no-such-checkpoint.pt", timeout_s=120)
    finally:
        scorer.close()
    assert verdict["status"] == "crash" and "scoring failed" in verdict["reason"]


# ---------------------------------------------------------------------------- the budget: compute the clock must count

BUDGET_S = 4.0
TIME_RUN = ["model.depth=2", f"budget.seconds={BUDGET_S}", "data.eval_tokens=4096", "device=cpu", "device.threads=1",
            "tracking.enabled=false", "progress=false"]


def run_budget_patch(repo, tmp_path, patch, run=None, budget=DeviceBudget(BUDGET_S)):
    """The patch's changes committed, one time-budgeted run through the real runner with the session's budget check
    (run, budget: other train overrides, and budget=None for none)."""
    originals = {}
    for path, transform in patch.changes:
        f = repo / path
        originals[path] = originals.get(path, f.read_text())
        f.write_text(transform(f.read_text()))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", patch.name)
    try:
        return Runner(repo, budget=budget).run(run or TIME_RUN, tmp_path / "run", timeout_s=300)
    finally:
        git(repo, "reset", "-q", "--hard", "HEAD~1")
        git(repo, "clean", "-qfd")


def counted_outside(out) -> float:
    return outside_seconds(out.launch["freeze"], clock_start(out.run_dir / "run.log"), os.cpu_count() or 1)[0]


@pytest.fixture(scope="module")
def honest_steps(repo, tmp_path_factory):
    """The untouched code's run at the same budget: how many steps the budget buys."""
    out = Runner(repo, budget=DeviceBudget(BUDGET_S)).run(TIME_RUN, tmp_path_factory.mktemp("base") / "run", 300)
    assert out.status == "ok", (out.error_line, out.log_tail[-2000:])
    assert abs(counted_outside(out) - out.summary["device_seconds"]) < 0.1  # the two counts agree
    return out.summary["num_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("patch", BUDGET_PATCHES, ids=lambda p: p.name)
def test_compute_outside_the_budget_is_counted_refused_or_tampered(repo, tmp_path, honest_steps, patch):
    out = run_budget_patch(repo, tmp_path, patch)
    if patch.expect == TAMPERED:
        assert out.status == "tampered" and out.val_bpb is None, (out.status, out.error_line, out.log_tail[-2000:])
        assert "device seconds" in out.error_line or "clock" in out.error_line, out.error_line
    elif patch.expect == OVERRUN:
        assert out.status == "crash" and "over its budget" in out.error_line, (out.status, out.error_line)
    elif patch.expect == REFUSED:
        assert out.status == "tampered" and "may not start processes" in out.error_line, out.log_tail[-2000:]
    else:  # counted: the run is scored, and what it bought came out of its own budget
        assert out.status == "ok", (out.status, out.error_line, out.log_tail[-2000:])
        used = counted_outside(out)
        assert used <= DeviceBudget(BUDGET_S).allowed and abs(used - out.summary["device_seconds"]) < 0.1
        # extra work in the training thread: fewer steps. (A helper thread's work is counted, as `used` shows, but
        # how much of it runs before the budget ends depends on the machine's load: no step count is promised.)
        if not patch.honest or "refresh" in patch.name:
            assert out.summary["num_steps"] < 0.85 * honest_steps, (out.summary["num_steps"], honest_steps)
        # A whole step handed to a new thread (the loop's thread waits in join) is what `used` above settles: the
        # process tree's CPU seconds, read from outside, equal what the clock counted, so the other thread's work
        # was counted. Its step count is not compared with the honest run's: that run was measured at another
        # moment of a shared machine, and a 4-s run's steps moved from 10 to 14 between such moments in CI.
