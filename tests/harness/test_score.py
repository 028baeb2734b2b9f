"""The scorer (src/harness/score.py, the judge) and its model hosts (src/harness/host.py).

The exactness its checks rest on, measured on the real model: a causal model's logits at the positions before a
change are bitwise equal at a fixed shape and dtype, whatever the other rows and the future hold (CPU, fp32 and
bf16, the default and a windowed model); models that look ahead or depend on the batch are told apart. Then the
real judge with two real hosts on checkpoints of patched code: an honest model scored, with its checks counted;
a model that looks ahead, keeps state, reads the data or rebinds the loss arithmetic never gets a fake score.

Run: python -m pytest -q tests/harness/test_score.py
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import time

import pytest
import torch
import torch.nn.functional as F

from src.harness.config import TrainConfig
from src.harness.score import SPLIT_ENV, Audit, Scorer, make_twin, save_checkpoint, twin_mismatch
from src.harness.score_client import eval_spec
from src.harness.train import config_dict
from src.lab.fakes.redteam import after, fit_output_layer, replace
from src.research.model import GPT, GPTConfig
from tests.support.helpers import git, make_repo

V = 257


def trained_like(mc) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_model_config(mc, V))
    m.init_weights()
    with torch.no_grad():  # away from the initialisation, as a trained model is
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def twin_diff(forward, mc, dtype: str, rows: int = 16) -> float | None:
    """Max |difference| of the twin's logits up to each row's cut against the scored batch's (0.0: bitwise)."""
    rng = random.Random(1)
    x = torch.randint(0, V, (rows, mc.sequence_len), generator=torch.Generator().manual_seed(2))
    source = torch.randint(0, V, (4 * rows * mc.sequence_len,), generator=torch.Generator().manual_seed(3))
    twin = make_twin(x, source, rng)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    with torch.no_grad(), ctx():
        a, b = forward(x).float(), forward(twin.ids).float()
    bad = twin_mismatch(a, b, twin)
    return None if bad is None else bad[2]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("pattern", ["SSSL", "L"])
def test_a_causal_models_logits_before_a_change_are_bitwise_equal(dtype, pattern):
    mc = dataclasses.replace(TrainConfig().model, window_pattern=pattern)
    assert twin_diff(trained_like(mc), mc, dtype) is None


def test_a_model_that_looks_one_token_ahead_or_at_the_other_rows_is_told_apart():
    mc = TrainConfig().model
    m = trained_like(mc)

    def ahead(x):
        return m(x) + 30.0 * F.one_hot(torch.roll(x, -1, 1), V).float()

    def batch(x):
        return m(x) + m(x).mean(dim=0, keepdim=True)

    def next_row(x):  # a row's last target is the next row's first token: peek at it (red team, 2026-12-07)
        out = m(x).clone()
        out[:-1, -1] += 30.0 * F.one_hot(x[1:, 0], V).float()
        return out

    assert twin_diff(ahead, mc, "fp32") > 1.0
    assert twin_diff(batch, mc, "fp32") > 0.0
    assert twin_diff(next_row, mc, "fp32", rows=32) > 1.0


def test_the_audit_twins_a_share_of_the_full_batches_and_repeats_at_the_end():
    plan = [(i * 64, 8, 8) for i in range(40)] + [(40 * 64, 1, 5)]
    a = Audit(plan, 8, random.Random(0))
    assert len(a.twins) == 5 and all(plan[i][2] == 8 for i in a.twins)  # 1/8 of 40 full batches; never the short one
    assert Audit([(0, 63, 8), (504, 1, 7)], 8, random.Random(0)).twins == {0}  # a short pass: every batch it can
    assert len(Audit([(i * 64, 8, 8) for i in range(6)], 8, random.Random(0)).twins) == 4  # at least four
    assert len(a.kept) == 2 and len(plan) - 1 in a.repeat_of  # two repeats, one after the last batch
    assert all(j <= i for i, js in a.repeat_of.items() for j in js)  # a batch is sent again only after it was scored
    b = Audit(plan, 8, random.Random(1))
    assert a.twins != b.twins  # a new draw every pass
    assert all(points[-1] == len(plan) - 1 and len(points) <= 3 for points in a.probe_at)  # at random, and the last
    assert a.reserved == {0, 1} and not a.reserved & (a.twins | a.kept) and not a.twins & a.kept  # the probes' inputs


class _H:
    def __init__(self, name):
        self.name = name


def test_each_hosts_first_input_is_asked_of_the_other_host_later():
    """The probes: each host's first request (the first two scored batches, one to each host) goes to the other host
    later in the pass, after two random batches and after the last one, and that host has never been shown any of
    its text before (no twin, repeat or twin future draws on those two batches)."""
    plan = [(i * 64, 8, 8) for i in range(40)]
    val = torch.randint(0, 200, (40 * 64 + 1,))
    for seed in range(20):
        hosts = [_H("A"), _H("B")]
        reqs = list(Audit(plan, 8, random.Random(seed)).requests(plan, val, hosts, random.Random(seed)))
        firsts = [r for r in reqs if r.first_of >= 0 and r.kind != "probe"]
        assert [r.first_of for r in firsts] == [0, 1] and firsts[0].host is not firsts[1].host
        assert all(reqs.index(f) == min(k for k, r in enumerate(reqs) if r.host is f.host) for f in firsts)
        probes = [(k, r) for k, r in enumerate(reqs) if r.kind == "probe"]
        assert 2 <= len(probes) <= 6 and {r.first_of for _, r in probes} == {0, 1}
        assert [(r.kind, r.batch) for r in firsts] == [("batch", 0), ("batch", 1)]  # the first two batches
        for k, r in probes:
            src = firsts[r.first_of]
            assert r.host is not src.host and torch.equal(r.ids, src.ids) and k > reqs.index(firsts[1])
            # the probed host was never shown any of the probe's text before (no twin, repeat or twin future of it),
            # so it cannot tell the probe from a scored batch it has not seen
            grams = {tuple(row[j:j + 6].tolist()) for row in r.ids for j in range(len(row) - 5)}
            shown = [q for q in reqs[:k] if q.host is r.host and q.kind != "probe"]
            assert not any(tuple(row[j:j + 6].tolist()) in grams for q in shown for row in q.ids
                           for j in range(len(row) - 5))
        assert {r.first_of for _, r in probes if r.batch == len(plan) - 1} == {0, 1}  # both at the end


def test_the_host_cpu_rules_from_a_runs_cost_and_its_replies():
    """The arithmetic of the hosts' CPU bounds (score.py): each reply against the training's cost per token (or the
    session baseline's, whichever is more), the first tightly and the others loosely, the load allowance from the
    nominal size, and the first reply against the host's own median over the others."""
    from types import SimpleNamespace

    from src.harness import score
    from src.harness.score_client import training_cost

    assert training_cost(None, 1e5) is None and training_cost(10.0, 0) is None and training_cost(0.0, 1e5) is None
    b = score.HostBudget.of(training_cost(10.0, 1e5), nominal_params=2_000_000)
    assert b.per_token_s == pytest.approx(1e-4)
    assert b.load_s == pytest.approx(score.LOAD_S + 2 * score.LOAD_S_PER_M)
    floored = score.HostBudget.of(training_cost(1.0, 1e5, floor_per_token_s=5e-5), nominal_params=0)
    assert floored.per_token_s == pytest.approx(5e-5)  # a run that paid less per drawn token: the baseline's
    assert score.HostBudget.of(training_cost(10.0, 1e5, 5e-5), 0).per_token_s == pytest.approx(1e-4)  # the larger
    assert score.HostBudget.of(None, 10) is None and score.HostBudget.of({"cpu_s": "x", "tokens": 1}, 10) is None

    # per reply: the first tightly (it may hold work done before it), the others loosely (the probes see what work
    # there changes), the first request of a new shape with the load allowance again (kernels are built per shape)
    assert b.reply_s(4096, first=True) == pytest.approx(score.HOST_FACTOR * 1e-4 * 4096 + score.CALL_SLACK_S + b.load_s)
    assert b.reply_s(4096, first=False) == pytest.approx(score.LATER_FACTOR * 1e-4 * 4096 + score.CALL_SLACK_S)
    assert b.reply_s(4096, first=False, fresh=True) == pytest.approx(b.reply_s(4096, first=False) + b.load_s)
    assert score.HOST_FACTOR < score.LATER_FACTOR

    def host(first: float, rest: float, n: int = 8, tokens: int = 8192):
        costs = [(tokens, first, True)] + [(tokens, rest, False)] * (n - 1)
        return SimpleNamespace(name="A", call_costs=lambda: costs)

    edge = score.CALL_FACTOR * 0.2 + score.CALL_SLACK_S + score.LOAD_S
    score.Host.check_calls(host(0.2, 0.2), nominal_params=0)  # honest: the first reply costs what the others do
    score.Host.check_calls(host(edge - 0.01, 0.2), nominal_params=0)
    with pytest.raises(score.Tampered, match="first reply"):  # work before the first reply beyond the allowance
        score.Host.check_calls(host(edge + 0.05, 0.2), nominal_params=0)
    costs = host(0.2, 0.2).call_costs()
    costs[5] = (8192, 2.0, True)  # one expensive reply in the middle (a new shape's kernels, under load): not judged
    score.Host.check_calls(SimpleNamespace(name="A", call_costs=lambda: costs), nominal_params=0)  # by the median
    score.Host.check_calls(host(5.0, 0.2, n=score.MIN_CALLS - 1), nominal_params=0)  # too few replies to judge by


# ---------------------------------------------------------------------------- the judge and its hosts, for real

TINY = {"depth": 2, "sequence_len": 128}


@pytest.fixture(scope="module")
def project(tmp_path_factory, shakespeare):
    """A throwaway project and the checkpoint of an untrained tiny model in it (what a run would leave)."""
    repo = make_repo(tmp_path_factory.mktemp("score"))
    cfg = TrainConfig()
    cfg.model = dataclasses.replace(cfg.model, **TINY)
    cfg.data.eval_tokens = 65536
    cfg.device.threads = 1
    model = trained_like(cfg.model)
    ckpt = save_checkpoint(repo.parent / "checkpoint.pt", model, config_dict(cfg), "cpu", "fp32")
    return repo, ckpt


def score_with(project, transform=None, path: str = "src/research/model.py", cost: dict | None = None) -> dict:
    repo, ckpt = project
    f = repo / path
    original = f.read_text()
    if transform is not None:
        f.write_text(transform(original))
    try:
        return Scorer(repo).start().score(ckpt, timeout_s=600, cost=cost)
    finally:
        f.write_text(original)
        git(repo, "checkout", "-q", "--", ".")


LOGITS = "        return logits\n"
IMPORTS = "import torch.nn.functional as F\n"


def after_imports(code: str):
    return replace(IMPORTS, IMPORTS + code)


@pytest.mark.slow
def test_an_honest_model_is_scored_with_its_checks_counted_and_its_hosts_sandboxed(project):
    v = score_with(project)
    assert v["status"] == "ok" and 7.0 < v["val_bpb"] < 9.0, v
    c = v["checks"]
    assert c["twins"] >= 4 and c["twin_rows"] >= 4 * 4 and c["repeats"] == 2 * 2  # each repeat by both hosts
    assert 2 <= c["probes"] <= 6  # each host's first input, asked of the other at random and at the end
    assert c["sandbox"].startswith("Landlock ABI") or c["sandbox"].startswith("not restricted")


@pytest.mark.slow
@pytest.mark.parametrize("name, transform, why", [
    ("looks ahead only when not training", replace(LOGITS, (
        "        if not self.training:\n"
        "            logits = logits + 30.0 * F.one_hot(torch.roll(idx, -1, 1), logits.size(-1)).float()\n" + LOGITS)),
     "causality"),
    ("adapts to what it has been shown (state across calls)", replace(LOGITS, (
        "        if not self.training:\n"
        "            seen = getattr(self, '_seen', None)\n"
        "            self._seen = logits.detach().mean() if seen is None else 0.5 * seen + 0.5 * logits.detach().mean()\n"
        "            logits = logits + self._seen\n" + LOGITS)),
     ""),
    ("looks ahead at the last positions of a row only", replace(LOGITS, (
        "        if not self.training:\n"
        "            nxt = F.one_hot(torch.roll(idx, -1, 1), logits.size(-1)).float()\n"
        "            logits[:, -40:-1] = logits[:, -40:-1] + 30.0 * nxt[:, -40:-1]\n" + LOGITS)),
     "causality"),
])
def test_a_model_that_behaves_differently_when_scored_is_tampered(project, name, transform, why):
    v = score_with(project, transform)
    assert v["status"] == "tampered" and why in v["reason"], (name, v)


@pytest.mark.slow
def test_the_host_cannot_read_the_validation_split(project, shakespeare):
    """A model that opens val.bin at import (the contract off: plain Python) is refused by the OS, and tampered."""
    val = next(shakespeare.glob("val*"))
    v = score_with(project, after_imports(f"_VAL = open({str(val)!r}, 'rb').read()\n"))
    assert v["status"] == "tampered" and "PermissionError" in v["reason"], v


@pytest.mark.slow
def test_the_held_out_test_split_is_scored_only_by_a_scorer_started_for_it(project, shakespeare, monkeypatch):
    """split=test: the same checks on test.bin (a different figure); the hosts cannot read it either; and a
    scorer started for a run scores val whatever the starting process's environment says."""
    repo, ckpt = project
    test = Scorer(repo, split="test").start().score(ckpt, timeout_s=600)
    monkeypatch.setenv(SPLIT_ENV, "test")  # e.g. set in the lab's environment: a run's scorer still scores val
    val = Scorer(repo).start().score(ckpt, timeout_s=600)
    assert test["status"] == val["status"] == "ok" and (test["split"], val["split"]) == ("test", "val")
    assert test["checks"]["twins"] >= 4 and abs(test["val_bpb"] - val["val_bpb"]) > 1e-4, (test, val)
    held = next(shakespeare.glob("test*"))
    v = score_with(project, after_imports(f"_T = open({str(held)!r}, 'rb').read()\n"))
    assert v["status"] == "tampered" and "PermissionError" in v["reason"], v


@pytest.mark.slow
def test_rebinding_the_loss_in_a_host_cannot_change_the_score(project):
    """The host's libraries are its own: halving torch's cross-entropy there leaves the judge's arithmetic alone."""
    honest = score_with(project)
    rebound = score_with(project, after_imports("F.cross_entropy = lambda *a, **k: 0.0\n"
                                                "torch.Tensor.double = lambda self: self.float()\n"))
    assert rebound["status"] == "ok" and rebound["val_bpb"] == pytest.approx(honest["val_bpb"], abs=0), rebound


@pytest.mark.slow
def test_the_judge_scores_as_its_starter_says_not_as_the_checkpoint_config_says(project, tmp_path):
    """Red team 2026-12-07: research code kept the harness's ModelConfig and set sequence_len past the split's length,
    so the judge (reading the checkpoint's config) scored one long row and made no twin. Started with the run's
    spec (score_client.eval_spec of a config no research code touched), the judge cuts the same windows, with the
    same checks and the same figure, whatever the checkpoint's config says."""
    repo, ckpt = project
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    honest = TrainConfig()
    honest.model = dataclasses.replace(honest.model, **TINY)
    honest.data.eval_tokens, honest.device.threads = 65536, 1
    # past the split's length (the red team used 2 ** 22; the host's construction of a rotary table that long is now
    # refused by itself, as CPU time before the first reply: src/harness/score.py CALL_FACTOR)
    edited = dict(raw, config={**raw["config"], "model": {**raw["config"]["model"], "sequence_len": 1 << 17},
                               "data": {**raw["config"]["data"], "eval_tokens": 1024}})
    torch.save(edited, tmp_path / "edited.pt")
    spec = eval_spec(honest)
    plain = Scorer(repo, spec=spec).start().score(ckpt, timeout_s=600)
    v = Scorer(repo, spec=spec).start().score(tmp_path / "edited.pt", timeout_s=600)
    assert plain["status"] == v["status"] == "ok", (plain, v)
    assert v["checks"]["batches"] == plain["checks"]["batches"] > 8 and v["checks"]["twins"] >= 4
    assert abs(v["val_bpb"] - plain["val_bpb"]) < 0.01  # (the edited config also widens the S layers' windows)
    unchecked = Scorer(repo).start().score(tmp_path / "edited.pt", timeout_s=600)  # as the checkpoint says: the hole
    assert unchecked["checks"]["batches"] == 1 and unchecked["checks"]["twins"] == 0, unchecked


@pytest.mark.slow
def test_a_model_that_trains_while_it_is_scored_is_tampered(project):
    """Red team 2026-12-07: a model trained itself in its first scored forward call (enable_grad inside the host's
    no_grad, a few optimizer steps on a stash); the host has no gradient machinery, so it is refused, in every form."""
    for step in ("(self.lm_head.weight * 0).sum().backward()",
                 "torch.autograd.grad((self.lm_head.weight ** 2).sum(), [self.lm_head.weight])",
                 "torch.func.grad(lambda w: (w ** 2).sum())(self.lm_head.weight)"):
        code = (f"        if not self.training:\n            with torch.enable_grad():\n                {step}\n"
                + LOGITS)
        v = score_with(project, replace(LOGITS, code))
        assert v["status"] == "tampered" and "no gradients" in v["reason"], (step, v)


@pytest.mark.slow
def test_a_model_that_computes_more_than_its_logits_while_scored_is_stopped(project):
    """Without gradients a host can still train by forward passes alone (hand-written gradients of the output layer,
    zeroth-order steps). The twins and repeats cannot see it when both hosts do it before their first reply: every
    logit then comes from the same fitted model. The judge counts each host's CPU seconds from the kernel: in all, what
    the run's training paid per token (score.HOST_FACTOR x for the first reply, with the model's construction;
    LATER_FACTOR x for the others), checked while the host computes; and the first reply against a few times the
    host's median over the others. An honest model is scored the same under both, and so is one whose forward pass
    costs as much per token as its training (a recipe that trains a part of the model per step); the fitting one is
    stopped as soon as it is over, and a fit within a generous total (a run that wasted its training to raise its
    per-token cost) is refused at the end of the pass."""
    honest = score_with(project)
    h = honest["checks"]["hosts"]
    assert h["max_reply_over_allowed"] == [None, None] and all(c > 0 for c in h["research_cpu_s"])  # no cost given
    per_token = max(c / t for c, t in zip(h["research_cpu_s"], h["tokens"]))
    cost = {"cpu_s": 4.0 * per_token * 1e6, "tokens": 1e6}  # a training step costs about 4 forward passes (measured)
    bounded = score_with(project, cost=cost)
    assert bounded["status"] == "ok" and bounded["val_bpb"] == honest["val_bpb"], bounded
    assert all(x < 1.0 for x in bounded["checks"]["hosts"]["max_reply_over_allowed"]), bounded["checks"]["hosts"]
    # a recipe whose forward pass costs what its training does per token (stochastic depth over a deep model trains
    # a part of its blocks per step): scored (on this tiny model the slack alone covers a reply; the factors'
    # arithmetic is test_the_host_cpu_rules_from_a_runs_cost_and_its_replies, the depth-12 run docs/LOG.md)
    even = score_with(project, cost={"cpu_s": 1.0 * per_token * 1e6, "tokens": 1e6})
    assert even["status"] == "ok" and even["val_bpb"] == honest["val_bpb"], even
    # a recipe that draws rows it does not train on pays less per drawn token than a forward pass costs: the session
    # baseline's figure is the floor (the lab's runner hands it on)
    cheap = {"cpu_s": 0.1 * per_token * 1e6, "tokens": 1e6}
    floored = score_with(project, cost={**cheap, "floor_per_token_s": 4.0 * per_token})
    assert floored["status"] == "ok" and floored["val_bpb"] == honest["val_bpb"], floored
    short = score_with(project, after("    def forward(self, idx", fit_output_layer(20)))
    assert short["status"] == "ok" and short["val_bpb"] != honest["val_bpb"], short  # the checks alone pass it
    t0 = time.monotonic()
    v = score_with(project, after("    def forward(self, idx", fit_output_layer(1_000_000)), cost=cost)
    assert v["status"] == "tampered" and "CPU s" in v["reason"] and "outside the run's budget" in v["reason"], v
    assert time.monotonic() - t0 < 120  # stopped at its allowance (the whole fit would take an hour)
    lavish = {"cpu_s": 1000 * cost["cpu_s"], "tokens": cost["tokens"]}
    v = score_with(project, after("    def forward(self, idx", fit_output_layer(1500)), cost=lavish)
    assert v["status"] == "tampered" and "first reply" in v["reason"], v


@pytest.mark.slow
def test_a_model_that_changes_its_weights_after_its_first_replies_is_tampered(project):
    """Work on the side spread over the replies (each within its CPU allowance), then both hosts switch to the weights
    it bought after their first replies: twins run side by side on both hosts see the same weights, and the repeated
    batches see the change only when one was first scored before it. The probes ask each host's first input of the
    other host after the switch, so the change is seen in every pass."""
    switch = ("        if not self.training:\n"
              "            self._calls = getattr(self, '_calls', 0) + 1\n"
              + fit_output_layer(20, when="self._calls > 1"))
    reasons = []
    for _ in range(3):  # a new draw of batches, hosts and probe points each pass
        v = score_with(project, after("    def forward(self, idx", switch))
        assert v["status"] == "tampered", v
        reasons.append(v["reason"])
    # a twin or a repeat sees it only when it straddles a host's first reply (rare); the probes see it every time
    assert any("no change while scored" in r for r in reasons), reasons


@pytest.mark.slow
def test_a_host_starts_no_process_whoever_asks(project):
    """Red team 2026-12-07 (eighth session): code compiled under a non-research file name, run on a thread, forked a
    child that trained where the judge's CPU count of the host does not reach (the training process's hook looks for
    research code on the stack; a host refuses every process). Here the fork's outcome decides the logits: a fork
    that went through makes the model fail."""
    code = ("import threading as _th\n"
            "_RESULT = []\n"
            "_SRC = ('import os\\n'\n"
            "        'def attempt(out):\\n'\n"
            "        '    try:\\n'\n"
            "        '        pid = os.fork()\\n'\n"
            "        '        if pid == 0:\\n'\n"
            "        '            os._exit(0)\\n'\n"
            "        '        out.append(\"forked\")\\n'\n"
            "        '    except Exception as e:\\n'\n"
            "        '        out.append(type(e).__name__)\\n')\n"
            "_NS = {}\n"
            "exec(compile(_SRC, '/usr/lib/python3/_helper.py', 'exec'), _NS)\n"
            "_T = _th.Thread(target=_NS['attempt'], args=(_RESULT,))\n"
            "_T.start()\n"
            "_T.join()\n")
    check = "        if _RESULT != ['SandboxError']:\n            raise RuntimeError(f'fork: {_RESULT}')\n" + LOGITS
    v = score_with(project, lambda t: replace(LOGITS, check)(after_imports(code)(t)))
    assert v["status"] == "ok", v
