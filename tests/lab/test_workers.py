"""search.workers > 1 (src/lab/workers.py, src/lab/slots.py): device slots, the asynchronous pool, decisions under concurrency
(rebase + confirmation, conflicts), Ctrl-C / kill -9 / resume with several experiments in flight. Sessions run
the stand-in train (src/lab/fakes/train.py) on real git repositories and a real MLflow store; the order in
which workers finish is forced with $FAKE_AFTER, so every drill is deterministic.

Run: python -m pytest -q tests/lab/test_workers.py   (the sessions are marked slow)
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from src.lab.loop import Search, train_overrides
from src.lab.runner import alive
from src.lab.session import SessionError
from src.lab.slots import plan_slots
from tests.support.helpers import (REPO, compose_search, fake_command, git, make_patch, make_repo, read_tsv,
                                   session_children, wait_for)


def search_overrides(tmp: Path, repo: Path, proposals: list, *more: str, tag: str = "w") -> list[str]:
    f = tmp / f"proposals-{tag}.yaml"
    f.write_text(yaml.safe_dump(proposals))
    return [f"search.repo={repo}", "search.progress=false", f"tracking.uri={os.environ['MLFLOW_TRACKING_URI']}",
            "device=cpu", "device.threads=1", f"search.tag={tag}", "search.timeout_s=60", "search.confirm=false",
            "search.workers=2", "search.baseline_repeats=1", "agent=replay", f"agent.file={f}", *more]


def start(ovs: list[str]) -> dict:
    return Search(compose_search(ovs), train_overrides(ovs), fake_command()).run()


def lr(v: float) -> dict:
    return {"description": f"lr {v}", "overrides": [f"optimizer.matrix_lr={v}"]}


def test_each_worker_gets_its_own_device_slot_or_the_session_is_refused(monkeypatch):
    cfg = compose_search(["device=cpu", "search.workers=2"])
    with pytest.raises(SessionError, match=r"needs a fixed thread count per worker: set device.threads"):
        plan_slots(cfg)
    cfg.device.threads = 64
    with pytest.raises(SessionError, match=r"2 x device.threads=64 = 128 threads, but this machine has \d+ cores"):
        plan_slots(cfg)
    cfg.device.threads = 1
    slots = plan_slots(cfg)
    assert [s.env["OMP_NUM_THREADS"] for s in slots] == ["1", "1"] and [s.index for s in slots] == [0, 1]
    if hasattr(os, "sched_getaffinity"):  # each its own core, named in the label the ledger records
        assert [s.cpus for s in slots] == [(c,) for c in sorted(os.sched_getaffinity(0))[:2]]
        assert slots[1].label == f"cpu x1 thread (core {slots[1].cpus[0]})"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    cfg.device.type = "cuda"
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in plan_slots(cfg)] == ["3", "5"]
    cfg.search.workers, cfg.search.gpus = 3, [0, 1]
    with pytest.raises(SessionError, match="needs a GPU per worker but 2 are available"):
        plan_slots(cfg)


def test_a_slurm_job_is_submitted_with_submitits_parameters_and_keeps_the_nodes_gpu(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from src.lab.config import LauncherConfig
    from src.lab.launcher import SubmititRunner

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that it is on a SLURM cluster
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-secret")
    lc = LauncherConfig(name="submitit_slurm", partition="gpu", account="acc", gpus_per_node=1, cpus_per_task=8,
                        mem_gb=32, setup=["module load cuda"], additional_parameters={"exclusive": True})
    cfg = compose_search(["device=cuda", "search.workers=16", "launcher=submitit_slurm"])
    slots = plan_slots(cfg)  # no local GPUs needed: each job gets its own from SLURM
    assert len(slots) == 16 and all("CUDA_VISIBLE_DEVICES" not in s.env for s in slots)
    r = SubmititRunner(tmp_path, launcher=lc, folder=str(tmp_path / "jobs"), extra_env=slots[3].env)
    text = r.executor(300)._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("--partition=gpu", "--account=acc", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB",
                 "--exclusive", "--time=6"):
        assert f"#SBATCH {line}\n" in text
    assert "module load cuda" in text
    prefix = r.env_prefix()
    assert "ANTHROPIC_API_KEY" in prefix.split(";")[0] and "sk-secret" not in prefix and "CUDA_VISIBLE" not in prefix


def test_agents_see_what_is_in_flight(tmp_path):
    """replay resumes after the proposals in flight; claude's state lists them."""
    from types import SimpleNamespace

    from src.lab.agents.claude_context import in_flight_line
    from src.lab.agents.replay import ReplayAgent
    from src.lab.config import ReplayAgentConfig
    from src.lab.experiment import new_row
    from src.lab.proposal import Proposal

    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump([lr(v) for v in (0.05, 0.03, 0.07)]))
    agent = ReplayAgent(ReplayAgentConfig(name="replay", file=str(f)))
    running = new_row("exp-002", Proposal("lr 0.03", "", ["optimizer.matrix_lr=0.03"], None, {"replay_index": 1}),
                      [], [])
    agent.restore([], SimpleNamespace(in_flight=[running]))
    assert agent.propose(None).description == "lr 0.07"
    assert in_flight_line(running) == "- exp-002: lr 0.03; overrides: optimizer.matrix_lr=0.03"


def _first_line(tag: str):
    def t(text: str) -> str:
        first, rest = text.split("\n", 1)
        return f"{first} ({tag})\n{rest}"
    return t


@pytest.mark.slow
@pytest.mark.parametrize("confirm", [False, True])
def test_a_keep_whose_parent_moved_is_rebased_and_confirmed_and_a_conflict_is_recorded(tmp_path, monkeypatch,
                                                                                       confirm):
    """confirm=false: the rebased candidate runs once and must beat the new best by the margin;
    confirm=true: it is confirmed by pairs with the new best, each pair side by side on the two workers."""
    repo = make_repo(tmp_path)
    proposals = [
        {"description": "patch A + lr", "overrides": ["optimizer.matrix_lr=0.05"],
         "patch": make_patch(repo, "src/research/model.py", _first_line("A"))},
        {"description": "patch B + batch", "overrides": ["batch.total_tokens=4096", "batch.device_tokens=4096"],
         "patch": make_patch(repo, "src/research/model.py", _first_line("B"))},  # the same line as A: a conflict
        {"description": "batch 2048", "overrides": ["batch.total_tokens=2048", "batch.device_tokens=2048"]},
        {"description": "batch 4096", "overrides": ["batch.total_tokens=4096", "batch.device_tokens=4096"]},
        lr(0.06),
    ]
    if confirm:
        # exp-002 ends after exp-001's screen run, exp-004 after exp-003's: each of exp-001 and exp-003 is then
        # confirmed on both workers (the other one waits for the advance lock, lent meanwhile) and kept, and the
        # one that waited finds its parent replaced: exp-002 conflicts, exp-004 is rebased and confirmed
        monkeypatch.setenv("FAKE_AFTER", "exp-002:exp-001/,exp-004:exp-003/")
        order, moved, keeps = ["exp-001", "exp-002", "exp-003", "exp-004", "exp-005"], ("exp-001", "exp-003"), 3
    else:  # exp-002 finishes after exp-003 is kept, exp-004 after exp-005 is kept
        monkeypatch.setenv("FAKE_AFTER", "exp-002:exp-003,exp-004:exp-005")
        order, moved, keeps = ["exp-001", "exp-003", "exp-002", "exp-005", "exp-004"], ("exp-003", "exp-005"), 4
    ovs = [o.replace("search.confirm=false", f"search.confirm={str(confirm).lower()}")
           for o in search_overrides(tmp_path, repo, proposals)]
    out = start(ovs)
    d = repo / "outputs" / "research" / "w"
    rows = read_tsv(d / "results.tsv")
    by = {r["exp"]: r for r in rows}
    assert [r["exp"] for r in rows if r["exp"].startswith("exp-") and r["exp"].count("-") == 1] == order, \
        [(r["exp"], r["status"], r["worker"]) for r in rows]  # the finish order
    assert by["exp-001"]["status"] == by[moved[0]]["status"] == by[moved[1]]["status"] == "keep"
    c = by["exp-002"]
    assert c["status"] == "conflict" and "cannot be re-applied" in c["reason"] and moved[0] in c["reason"]
    r = by["exp-004"]
    parent = by["exp-001" if confirm else "exp-003"]["commit"]
    assert r["status"] == "keep" and "rebased" in r["reason"] and r["parent"] == parent
    assert git(repo, "rev-parse", f"{r['commit']}^").startswith(by[moved[1]]["commit"])  # re-staged on the new best
    again = [x for x in rows if x["exp"].startswith("exp-004-")]
    if confirm:
        assert {x["exp"] for x in again} in ({"exp-004-b1", "exp-004-c1"},
                                             {"exp-004-b1", "exp-004-c1", "exp-004-b2", "exp-004-c2"})
        assert "paired confirmation" in r["reason"]
        # every pair ran side by side: its two runs on the two workers, which swap sides from one pair to the next
        for exp in ("exp-001", "exp-003", "exp-004"):
            pairs = [(by[f"{exp}-b{i}"]["worker"], by[f"{exp}-c{i}"]["worker"]) for i in (1, 2) if f"{exp}-b{i}" in by]
            assert pairs and all(b != c for b, c in pairs), (exp, pairs)
            assert pairs[1:] == [] or pairs[1] == pairs[0][::-1], (exp, pairs)
    else:
        assert [x["exp"] for x in again] == ["exp-004-c1"] and "re-run on the best" in r["reason"]
    assert all(x["status"] == "confirm" and x["commit"] == r["commit"] for x in again if "-c" in x["exp"])
    rec = json.loads((d / "proposals" / "exp-004.json").read_text())
    merged = ["optimizer.matrix_lr=0.06" if not confirm else "optimizer.matrix_lr=0.05"]
    assert sorted(rec["config"]) == sorted([*merged, "batch.total_tokens=4096", "batch.device_tokens=4096"])
    assert out["best_exp"] == "exp-004" and out["best_val_bpb"] == pytest.approx(float(r["val_bpb"]), abs=1e-6)
    assert confirm or out["best_val_bpb"] == pytest.approx(2.8)
    assert git(repo, "rev-list", "--count", "main..research/w") == str(keeps)  # linear: one commit a keep
    assert git(repo, "rev-list", "--merges", "--count", "main..research/w") == "0"
    assert git(repo, "rev-parse", "research/w") == out["best_commit"]


SCRIPT = """
import faulthandler, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for the stacks of a session that hangs
sys.path.insert(0, {repo!r})
from src.lab.loop import Search, train_overrides
from tests.support.helpers import compose_search, fake_command
ovs = {ovs!r}
try:
    Search(compose_search(ovs), train_overrides(ovs), fake_command()).run()
except KeyboardInterrupt:
    sys.exit(130)
"""


def _running(d: Path, n: int):
    try:
        st = json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return None
    fls = [f for f in st.get("running") or [] if f.get("pid") and alive(f["pid"])]
    return fls if len(fls) == n else None


@pytest.mark.slow
def test_ctrl_c_and_kill_9_with_two_in_flight_then_resume_loses_nothing_and_runs_nothing_twice(tmp_path):
    repo = make_repo(tmp_path)
    proposals = [lr(v) for v in (0.05, 0.03, 0.07, 0.02, 0.06)]
    ovs = search_overrides(tmp_path, repo, proposals, "search.max_experiments=3")
    d = repo / "outputs" / "research" / "w"
    script = tmp_path / "session.py"
    env = {**os.environ, "FAKE_AFTER": "exp-001:never,exp-002:never,exp-003:never,exp-004:never"}  # held

    def launch(*more):
        script.write_text(SCRIPT.format(repo=str(REPO), ovs=[*ovs, *more]))
        return subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    # 1. Ctrl-C with exp-001 and exp-002 in flight: both stopped and recorded `interrupted`
    p = launch()
    fls = wait_for(lambda: _running(d, 2))
    p.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    try:
        rc = p.wait(180)  # each run gets the runner's 15-s grace; a machine busy with other tests is slow
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGUSR1)
        time.sleep(2)
        p.kill()
        rc = None
    assert rc == 130, p.stdout.read()[-3000:]
    print(f"Ctrl-C to exit with two runs in flight: {time.monotonic() - t0:.1f} s")
    assert not any(alive(f["pid"]) for f in fls)
    rows = read_tsv(d / "results.tsv")
    assert sorted((r["exp"], r["status"]) for r in rows[1:]) == [("exp-001", "interrupted"), ("exp-002", "interrupted")]
    assert json.loads((d / "state.json").read_text())["running"] == []

    # 2. resume, kill -9 with exp-003 and exp-004 in flight: their runs die with it, no row is written
    p = launch("search.resume=true")
    fls = wait_for(lambda: _running(d, 2))
    assert sorted(f["exp"] for f in fls) == ["exp-003", "exp-004"] and {f["worker"] for f in fls} == {0, 1}
    before = (d / "results.tsv").read_bytes()
    p.kill()
    p.wait(30)
    wait_for(lambda: not any(alive(f["pid"]) for f in fls), 30)
    assert (d / "results.tsv").read_bytes() == before

    # 3. resume to the end: exp-003 and exp-004 finished once each (second attempts), then exp-005
    start([*ovs, "search.resume=true"])
    rows = read_tsv(d / "results.tsv")
    exps = [r["exp"] for r in rows]
    # (a keep whose parent moved while it ran also has a re-run row, exp-005-c1: how the runs overlap decides)
    assert sorted(e for e in exps if e.count("-") == 1) == ["base-1", "exp-001", "exp-002", "exp-003", "exp-004",
                                                            "exp-005"]
    by = {r["exp"]: r for r in rows}
    assert by["exp-003"]["attempts"] == by["exp-004"]["attempts"] == "2"
    assert by["exp-005"]["attempts"] == "1" and by["exp-005"]["description"] == "lr 0.06"
    assert (d / "runs" / "exp-003-a2" / "summary.json").exists() and (d / "runs" / "exp-004-a2").exists()
    state = json.loads((d / "state.json").read_text())
    assert state["running"] == []
    children = session_children(os.environ["MLFLOW_TRACKING_URI"], state["parent_run_id"])
    tagged = [r.data.tags["search.exp"] for r in children if "search.exp" in r.data.tags]
    assert sorted(tagged) == sorted(exps)
    assert all(r.info.status != "RUNNING" for r in children)


@pytest.mark.slow
def test_a_killed_cpu_two_worker_session_resumed_bare_finishes_its_experiments(tmp_path):
    """`search.tag=w search.resume=true` and nothing else: the session's baseline config comes back whole (device=cpu,
    device.threads=1, which slot planning reads), so the two workers are planned as it started and both experiments
    that kill -9 left in flight are finished, once each."""
    repo = make_repo(tmp_path)
    ovs = search_overrides(tmp_path, repo, [lr(v) for v in (0.05, 0.03, 0.07)], "search.max_experiments=3")
    d = repo / "outputs" / "research" / "w"
    script = tmp_path / "session.py"
    script.write_text(SCRIPT.format(repo=str(REPO), ovs=ovs))
    env = {**os.environ, "FAKE_HOLD": "exp-001,exp-002", "FAKE_HOLD_FILE": str(tmp_path / "never")}  # held
    p = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    fls = wait_for(lambda: _running(d, 2))
    p.kill()
    p.wait(30)
    wait_for(lambda: not any(alive(f["pid"]) for f in fls), 30)
    bare = [f"search.repo={repo}", "search.tag=w", "search.resume=true"]
    cfg = compose_search(bare)
    assert cfg.device.threads is None  # what the bare command line alone would plan the slots with
    out = Search(cfg, train_overrides(bare), fake_command(), cli=bare).run()
    rows = read_tsv(d / "results.tsv")
    by = {r["exp"]: r for r in rows}
    # exp-003 runs while exp-001 or exp-002 is still in flight: if that one is kept meanwhile, exp-003 is rebased
    # on it and re-run there (one row of its own), whatever the timing of the two workers gave
    reruns = sorted(x for x in by if re.search(r"-c\d+$", x))
    assert sorted(set(by) - set(reruns)) == ["base-1", "exp-001", "exp-002", "exp-003"], out
    for x in reruns:
        assert "rebased on it" in by[x.rsplit("-", 1)[0]]["reason"], by[x.rsplit("-", 1)[0]]
    assert by["exp-001"]["attempts"] == by["exp-002"]["attempts"] == "2" and by["exp-003"]["attempts"] == "1"
    assert {by[x]["worker"] for x in ("exp-001", "exp-002", "exp-003")} <= {"0", "1"}
    assert cfg.device.type == "cpu" and cfg.device.threads == 1 and cfg.search.workers == 2
    state = json.loads((d / "state.json").read_text())
    assert state["running"] == [] and state["baseline"]["device"]["threads"] == 1


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything under it, as a scheduler ending a job would."""
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
                kids.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    todo, tree = [pid], []
    while todo:
        q = todo.pop()
        tree.append(q)
        todo += kids.get(q, [])
    for q in tree:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_submitit_jobs_survive_kill_9_are_reattached_and_a_job_killed_from_outside_is_run_again_once(tmp_path):
    pytest.importorskip("submitit")
    repo = make_repo(tmp_path)
    gate = tmp_path / "gate"
    proposals = [lr(v) for v in (0.05, 0.03, 0.07)]
    ovs = search_overrides(tmp_path, repo, proposals, "search.max_experiments=3", "launcher=submitit_local",
                           "launcher.poll_s=0.1")
    d = repo / "outputs" / "research" / "w"
    script = tmp_path / "session.py"
    env = {**os.environ, "FAKE_HOLD": "exp-001,exp-002", "FAKE_HOLD_FILE": str(gate)}

    def launch(*more):
        script.write_text(SCRIPT.format(repo=str(REPO), ovs=[*ovs, *more]))
        return subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def jobs():
        try:
            st = json.loads((d / "state.json").read_text())
        except (OSError, ValueError):
            return None
        fls = [f for f in st.get("running") or [] if f.get("job", "").startswith("local:")]
        return {f["exp"]: f["job"] for f in fls} if len(fls) == 2 else None

    # 1. two experiments run as submitit jobs; kill -9 the search: the jobs go on
    p = launch()
    first = wait_for(jobs)
    p.kill()
    p.wait(30)
    assert all(alive(int(j.split(":")[1])) for j in first.values())
    # 2. resume (here, in a thread): it re-attaches to both jobs (no new job, no second attempt)
    import threading

    done: list = []
    t = threading.Thread(target=lambda: done.append(start([*ovs, "search.resume=true"])), daemon=True)
    t.start()
    wait_for(lambda: (d / "search.log").exists() and (d / "search.log").read_text().count("re-attached to job") == 2)
    assert jobs() == first
    # 3. a scheduler kills exp-002's job: `killed`, submitted again once; exp-001's job finishes where it ran
    _kill_tree(int(first["exp-002"].split(":")[1]))
    wait_for(lambda: "killed from outside" in (d / "runs" / "exp-002" / "run.log").read_text())
    gate.write_text("go")
    t.join(120)
    assert done, "the resumed session did not finish"
    rows = read_tsv(d / "results.tsv")
    by = {r["exp"]: r for r in rows}
    assert sorted(by) == ["base-1", "exp-001", "exp-002", "exp-003"]
    assert by["exp-001"]["attempts"] == by["exp-002"]["attempts"] == "1"  # nothing run twice as an attempt
    assert not (d / "runs" / "exp-001-a2").exists() and not (d / "runs" / "exp-002-a2").exists()
    assert all(by[x]["status"] in ("keep", "discard") for x in ("exp-001", "exp-002", "exp-003"))
    assert (d / "runs" / "exp-001" / "run.log").read_text().count("fake train:") == 1  # its one run, re-attached
    assert (d / "runs" / "exp-002" / "run.log").read_text().count("fake train:") == 2  # killed, then run again
    assert json.loads((d / "state.json").read_text())["running"] == []


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a database backend (sqlite) and proxied artifacts."""
    import urllib.request

    from tests.support.helpers import free_port

    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200
            except OSError:
                assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-2000:]
                return False
        wait_for(up, 90)
        yield uri, tmp_path / "mlflow-server.log"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a throwaway server: no need for its graceful shutdown
        proc.wait(15)
        log.close()


@pytest.mark.slow
def test_two_workers_one_ledger_one_branch_one_parent_run_on_a_shared_mlflow_server(tmp_path, mlflow_server,
                                                                                    monkeypatch):
    """6 replay proposals on 2 workers logging to a real `mlflow server` (the runs log themselves, concurrently):
    each proposal run once; ledger, branch and MLflow agree row for row; no error from concurrent creation."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.tracking import MlflowClient

    from src.harness.tracking import ensure_experiment

    uri, server_log = mlflow_server
    with ThreadPoolExecutor(4) as ex:  # four processes' worth of first runs creating one experiment at once
        ids = set(ex.map(lambda _: ensure_experiment(MlflowClient(uri), "race", uri).experiment_id, range(4)))
    assert len(ids) == 1
    monkeypatch.setenv("FAKE_MLFLOW", "1")
    repo = make_repo(tmp_path)
    d = repo / "outputs" / "research" / "w"
    proposals = [lr(v) for v in (0.05, 0.03, 0.06, 0.07)]
    out = start(search_overrides(tmp_path, repo, proposals, f"tracking.uri={uri}", "tracking.experiment=shared"))
    rows = read_tsv(d / "results.tsv")
    own = [r for r in rows if r["exp"].startswith("exp-") and r["exp"].count("-") == 1]  # not confirmation runs
    assert sorted(r["exp"] for r in own) == [f"exp-{i:03d}" for i in range(1, 5)]  # each once (in finish order)
    for r in own:  # exp ids are the proposal order (the agent's file order)
        assert r["description"] == proposals[int(r["exp"][4:]) - 1]["description"]
        assert r["proposed"] and r["finished"] and r["parent"] and r["worker"] in ("0", "1")
    assert {r["worker"] for r in own} == {"0", "1"}
    # the branch: one commit per keep, in the ledger's order, linear; its tip is the best
    keeps = [r for r in rows if r["status"] == "keep"]
    log = git(repo, "log", "--format=%h %s", "main..research/w").splitlines()
    assert [line.split(":")[0].split()[1] for line in reversed(log)] == [r["exp"] for r in keeps]
    assert git(repo, "rev-list", "--merges", "--count", "main..research/w") == "0"
    assert git(repo, "rev-parse", "research/w") == out["best_commit"] and out["best_val_bpb"] == pytest.approx(3.0)
    best = git(repo, "rev-parse", "main")
    for k in keeps:  # each keep sits on the best of its time (rebased on it if it moved while it ran)
        assert git(repo, "rev-parse", f"{k['commit']}^") == best
        best = git(repo, "rev-parse", k["commit"])
    state = json.loads((d / "state.json").read_text())
    assert state["running"] == [] and state["in_flight"] is None
    warnings = [ln for ln in (d / "search.log").read_text().splitlines() if "MLflow" in ln]
    assert not warnings, warnings
    # MLflow: one parent, one child per row (the run's own, tagged by the search), nothing else
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("shared").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("search.role") == "session"]
    assert [p.info.run_id for p in parents] == [state["parent_run_id"]] and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"]]
    assert len(children) == len(runs) - 1 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.data.tags["search.exp"] for r in children) == sorted(r["exp"] for r in rows)
    assert all("val/bpb" in r.data.metrics for r in children)  # each logged by its own run
    workers = {r.data.tags["search.exp"]: r.data.tags.get("search.worker") for r in children}
    assert {w for x, w in workers.items() if x.startswith("exp")} == {"0", "1"}, workers
    if hasattr(os, "sched_getaffinity"):  # each worker's runs pinned to its own core, the same for all of them
        cores = sorted(os.sched_getaffinity(0))
        for r in (r for r in rows if workers[r["exp"]] is not None):  # the baselines run before the pool
            ran = json.loads((d / "runs" / r["exp"] / "summary.json").read_text())["cpus"]
            assert ran == [cores[int(workers[r["exp"]])]], (r["exp"], ran)
    text = server_log.read_text()
    assert "database is locked" not in text and " 500 " not in text
    # where the workers' time went, in workers.json and report.md
    u = json.loads((d / "workers.json").read_text())
    assert u["workers"] == 2 and u["experiments"] == 4 and u["experiments_per_hour"] > 0
    shares = [u[k] for k in ("training", "run_overhead", "scoring", "idle")]
    assert all(0 <= x <= 1 for x in shares) and sum(shares) == pytest.approx(1, abs=0.02)  # each second counted once
    assert [p["worker"] for p in u["per_worker"]] == [0, 1] and all(0 <= p["idle"] <= 1 for p in u["per_worker"])
    assert parents[0].data.metrics["workers/idle_share"] == pytest.approx(u["idle"])
    report = (d / "report.md").read_text()
    assert "- workers: 2 (w0 cpu x1 thread" in report and "per hour; worker time: training" in report


@pytest.mark.slow
def test_the_baseline_repeats_run_at_once_one_on_each_worker(tmp_path, monkeypatch):
    repo = make_repo(tmp_path)
    monkeypatch.setenv("FAKE_AFTER", "base-1:base-2/")  # base-1 ends only once base-2 has run: together, or 60 s late
    out = start(search_overrides(tmp_path, repo, [lr(0.05)], "search.baseline_repeats=2", "search.max_experiments=1"))
    d = repo / "outputs" / "research" / "w"
    rows = read_tsv(d / "results.tsv")
    assert [(r["exp"], r["status"]) for r in rows][:2] == [("base-2", "baseline"), ("base-1", "baseline")]
    assert {rows[0]["worker"], rows[1]["worker"]} == {"0", "1"}  # each slot measured (the tokens/s column)
    # base-2 finished while base-1 was still held: they ran at the same time
    assert (d / "runs" / "base-2" / "summary.json").stat().st_mtime < (d / "runs" / "base-1" / "summary.json").stat().st_mtime
    assert out["noise_dof"] >= 1


def test_leases_borrowers_go_first_and_a_worker_waiting_for_the_advance_lock_can_be_lent():
    import threading

    from src.lab.leases import Leases

    a, b = SimpleNamespace(index=0), SimpleNamespace(index=1)
    leases = Leases([a, b])
    assert leases.take() is a  # a new experiment on a
    with leases.borrow(a) as other:  # b is free: lent at once, and not free for a new experiment meanwhile
        assert other is b and leases.take() is None
    assert leases.take(prefer=1) is b  # back in the free list
    # both busy: a borrower waits; no new experiment starts while it waits; b's experiment waiting for the advance
    # lock makes b lendable, and b's experiment gets it back only after the borrower is done
    got, order = [], []

    def borrower():
        with leases.borrow(a) as w:
            got.append(w)
            order.append("borrowed")
            time.sleep(0.3)
            order.append("returned")

    t = threading.Thread(target=borrower)
    t.start()
    time.sleep(0.2)
    assert got == [] and leases.wanted == 1
    leases.release(a)  # (say a's experiment ended: but a borrower never takes its own owner)
    assert leases.take() is None  # the borrower goes first: no new experiment
    with leases.waiting(b):
        wait_for(lambda: got == [b], 5)
    order.append("b's experiment goes on")
    t.join()
    assert order == ["borrowed", "returned", "b's experiment goes on"]
    assert leases.take() is a and leases.take() is None  # b is not free: its experiment still holds it
    leases.close()
    with leases.borrow(b) as w:  # a closed pool lends nothing that is not free
        assert w is None
