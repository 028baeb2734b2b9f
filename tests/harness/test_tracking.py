"""MLflow tracking of `python -m src.train`: what a run records, the real server's REST API, faults.

One 30-s run with a 5-s stall injected at step 10 (via $OVERNIGHT_INJECT_STALL) is shared by the
tests that read its record: from summary.json and from the sqlite store. Only the tests that talk to
a real `mlflow server` (127.0.0.1, on the same store) start one: the REST API reading that run back,
and a run logged through the server and killed. Every test uses a store in a tmp dir.

Run: python -m pytest -q tests/harness/test_tracking.py   (without the real runs and the server: -m "not slow")
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest

from src.harness.config import TrackingConfig
from src.harness.sweep import format_table, sweep_table
from src.harness.tracking import Tracker, TrackingError, artifact_location, final_metrics, flatten, resolve_uri
from tests.support.helpers import (REPO, TINY_ONE_THREAD as FAST, compose_train_cfg, free_port, read_summary, run_cli,
                                   wait_for)

STALL_STEP, STALL_S, BUDGET_S = 10, 3.0, 15.0
WARMUP_STEPS = compose_train_cfg(FAST).budget.warmup_steps  # not counted; the MLflow run is ready after them


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A fresh store, created before the server and the runs use it (no race on its tables)."""
    from mlflow import MlflowClient

    d = tmp_path_factory.mktemp("store")
    MlflowClient(f"sqlite:///{d}/mlflow.db").search_experiments()  # creates the tables
    return d


@pytest.fixture(scope="module")
def mlflow_server(store):
    """The real `mlflow server` on 127.0.0.1 and a free port, on the module's store: its URL, once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{store}/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            start_new_session=True)  # its own process group: its workers end with it
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_up(url: str, proc, timeout: float = 120) -> None:
    def up() -> bool:
        assert proc.poll() is None, "mlflow server exited"
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return True
        except OSError:
            return False
    wait_for(up, timeout, f"the mlflow server at {url} to come up")


@pytest.fixture(scope="module")
def stalled_run(store, shakespeare, tmp_path_factory):
    """The shared 30-s run with a 5-s stall, logged straight to the sqlite store: (summary, stdout, run dir)."""
    out = tmp_path_factory.mktemp("stalled")
    proc = run_cli("src.train", *FAST, f"budget.seconds={BUDGET_S}", f"tracking.uri=sqlite:///{store}/mlflow.db",
                   f"hydra.run.dir={out}", env={"OVERNIGHT_INJECT_STALL": f"{STALL_STEP}:{STALL_S}"})
    return read_summary(out), proc.stdout, out


@pytest.mark.slow
def test_a_stall_does_not_steal_the_budget_and_is_reported(stalled_run):
    s, stdout, _ = stalled_run
    assert s["status"] == "ok" and math.isfinite(s["val_bpb"])
    assert s["stalls"] == 1 and s["stalled_steps"] == [STALL_STEP]
    assert STALL_S - s["step_time_p50"] <= s["stalled_seconds"] <= STALL_S + s["step_time_p90"]
    # the budget is device time: the stall (asleep) costs none of it; the run stops within one step of it
    assert BUDGET_S - s["step_time_max"] <= s["training_seconds"] <= BUDGET_S + s["step_time_p90"]
    assert s["train_wall_seconds"] >= s["training_seconds"] + STALL_S - s["step_time_p50"]
    assert s["step_time_max"] >= STALL_S > s["step_time_p90"]  # the histogram's tail is the stall
    for line in ("stalls:             1", "stalled_seconds:", "MLflow: run "):
        assert line in stdout


@pytest.mark.slow
def test_every_run_is_recorded_in_mlflow(store, stalled_run):
    from mlflow import MlflowClient

    s, _, out = stalled_run
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"
    assert run.data.tags["mlflow.source.git.commit"] == s["git_sha"]
    p = run.data.params
    assert p["model.depth"] == "2" and p["budget.seconds"] == str(BUDGET_S) and p["device.threads"] == "1"
    assert p["derived.num_params"] == str(round(s["num_params_M"] * 1e6))
    assert p["derived.grad_accum_steps"] == "1" and p["derived.device"] == "cpu" and p["derived.dtype"] == s["dtype"]
    assert p["git.sha"] == s["git_sha"] and p["git.dirty"] == str(s["git_dirty"])
    for lib in ("torch", "mlflow", "hydra-core"):
        assert p[f"version.{lib}"] == metadata.version(lib), lib
    m = run.data.metrics
    assert m["val/bpb"] == pytest.approx(s["val_bpb"])
    for key in ("step_time_p50", "step_time_p90", "step_time_p99", "step_time_max", "training_seconds",
                "total_seconds", "tokens_per_sec", "num_steps", "stalled_seconds"):
        assert m[f"summary/{key}"] == pytest.approx(s[key]), key
    assert m["summary/stalls"] == 1
    for key in ("train/loss", "train/lr_mult", "train/step_time", "train/tokens_per_sec"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert sorted(h.step for h in hist) == list(range(1, s["num_steps"] + 1)), key
    step_time = {h.step: h.value for h in client.get_metric_history(run.info.run_id, "train/step_time")}
    assert step_time[STALL_STEP] >= STALL_S and max(step_time.values()) == step_time[STALL_STEP]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.yaml", "summary.json", "train.log", "step_times.png"} <= arts
    assert artifact_location(f"sqlite:///{store}/mlflow.db") in run.info.artifact_uri  # beside the db
    assert (out / "step_times.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_real_server_serves_a_finished_run_over_rest(mlflow_server, stalled_run):
    url = mlflow_server
    s, _, _ = stalled_run
    rid = s["mlflow_run_id"]
    run = get_json(f"{url}/api/2.0/mlflow/runs/get?run_id={rid}")["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m for m in run["data"]["metrics"]}
    assert metrics["val/bpb"]["value"] == pytest.approx(s["val_bpb"])
    assert metrics["summary/step_time_p99"]["value"] == pytest.approx(s["step_time_p99"])
    assert metrics["summary/stalls"]["value"] == 1
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.depth"] == "2" and params["derived.dtype"] == s["dtype"]
    hist = get_json(f"{url}/api/2.0/mlflow/metrics/get-history?run_id={rid}&metric_key="
                    + urllib.parse.quote("train/step_time"))["metrics"]
    assert len(hist) == s["num_steps"] and max(hist, key=lambda h: h["value"])["step"] == STALL_STEP
    files = {f["path"] for f in get_json(f"{url}/api/2.0/mlflow/artifacts/list?run_id={rid}")["files"]}
    assert {"summary.json", "step_times.png", "config.yaml", "train.log"} <= files
    with urllib.request.urlopen(f"{url}/get-artifact?path=summary.json&run_uuid={rid}", timeout=30) as r:
        assert json.loads(r.read())["val_bpb"] == pytest.approx(s["val_bpb"])
    with urllib.request.urlopen(f"{url}/get-artifact?path=step_times.png&run_uuid={rid}", timeout=30) as r:
        assert r.read()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_a_killed_run_logged_through_the_server_is_failed_with_reason_killed(mlflow_server, tmp_path):
    url = mlflow_server
    p = subprocess.Popen([sys.executable, "-m", "src.train", *FAST, "budget.seconds=60", f"tracking.uri={url}",
                          f"hydra.run.dir={tmp_path}"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in p.stdout:  # the run exists (on CPU before the clock starts) ...
            lines.append(line)
            if "MLflow: run" in line:
                break
        assert p.poll() is None, "".join(lines)
        rid = lines[-1].split("MLflow: run ")[1].split()[0]

        def warmed_up():  # ... and its params are logged once the warm-up steps are done
            return p.poll() is not None or get_json(f"{url}/api/2.0/mlflow/runs/get?run_id={rid}")["run"]["data"].get("params")

        wait_for(warmed_up, 120, "the run's params (logged after the warm-up steps)")
        assert p.poll() is None
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1
    s = read_summary(tmp_path)
    assert s["status"] == "killed" and "SIGTERM" in s["error"] and s["num_steps"] >= WARMUP_STEPS
    run = get_json(f"{url}/api/2.0/mlflow/runs/get?run_id={s['mlflow_run_id']}")["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run["info"]["status"] == "FAILED" and tags["status"] == "killed" and "SIGTERM" in tags["error"]
    # the buffered steps were sent: every step from 1 on, all but at most the one the signal cut short
    hist = get_json(f"{url}/api/2.0/mlflow/metrics/get-history?run_id={s['mlflow_run_id']}&metric_key="
                    + urllib.parse.quote("train/loss"))["metrics"]
    steps = sorted(h["step"] for h in hist)
    assert steps == list(range(1, len(steps) + 1)) and s["num_steps"] - 1 <= len(steps) <= s["num_steps"]


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_an_unreachable_server_costs_the_log_not_the_run(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_cli("src.train", *FAST, "budget.seconds=2", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}")
    s = read_summary(tmp_path)
    assert s["status"] == "ok" and math.isfinite(s["val_bpb"])
    assert s["training_seconds"] >= 2.0 - s["step_time_max"] and s["num_steps"] > WARMUP_STEPS  # the whole budget
    assert "not logged to MLflow" in s["tracking_error"] and uri in s["tracking_error"]
    assert "MLflow: NOT logged: the whole run (params, metrics, artifacts)" in proc.stdout
    assert "unreachable" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_strict_tracking_refuses_to_train_without_its_server(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_cli("src.train", *FAST, "budget.seconds=2", f"tracking.uri={uri}", "tracking.strict=true",
                   f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert "unreachable" in proc.stderr and "refusing to train" in proc.stderr
    assert read_summary(tmp_path)["num_steps"] == 0


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
@pytest.mark.parametrize("kind", ["garbage", "directory"])
def test_a_store_that_cannot_be_opened_is_a_clear_error_before_training(tmp_path, kind):
    db = tmp_path / "mlflow.db"
    db.mkdir() if kind == "directory" else db.write_text("not a database")
    proc = run_cli("src.train", *FAST, "budget.seconds=2", f"tracking.uri=sqlite:///{db}",
                   f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1
    assert f"cannot open the MLflow store sqlite:///{db}" in proc.stderr and "tracking.enabled=false" in proc.stderr
    assert read_summary(tmp_path / "run")["num_steps"] == 0


def test_the_uri_is_the_argument_then_the_env_then_the_repo_store_with_artifacts_beside_the_db(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri() == f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_uri() == "http://tracking:5000"
    assert resolve_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert artifact_location(f"sqlite:///{tmp_path}/m.db") == (tmp_path / "artifacts").as_uri()
    assert artifact_location("http://tracking:5000") is None  # a server decides where artifacts go


def test_params_are_dotted_config_keys_and_only_summary_numbers_become_metrics():
    from src.harness.config import TrainConfig

    p = flatten(TrainConfig())
    assert p["model.depth"] == "4" and p["optimizer.adam_betas"] == "[0.8, 0.95]" and p["tracking.enabled"] == "True"
    m = final_metrics({"val_bpb": 1.5, "num_steps": 10, "git_dirty": True, "device": "cpu", "stalls": 0})
    assert m == {"val/bpb": 1.5, "summary/val_bpb": 1.5, "summary/num_steps": 10.0, "summary/stalls": 0.0}


def test_sweep_table_is_best_first_with_failures_last(tmp_path):
    for job, bpb, status in (("0", 2.5, "ok"), ("1", float("nan"), "crash"), ("2", 2.1, "ok"), ("3", 1.9, "stalled")):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / "summary.json").write_text(json.dumps({"val_bpb": bpb, "status": status, "num_steps": 3}))
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
    rows = sweep_table(tmp_path)
    assert [r["job"] for r in rows] == ["2", "0", "3", "1"]
    table = format_table(rows).splitlines()
    assert table[0].split()[:3] == ["job", "val_bpb", "status"] and table[1].startswith("2 ") and "seed=2" in table[1]


def test_a_tracker_that_is_off_touches_nothing(tmp_path):
    t = Tracker(TrackingConfig(enabled=False, uri=f"sqlite:///{tmp_path}/x/mlflow.db")).start()
    t.wait_ready()
    t.log_step(1, {"loss": 1.0})
    t.finish("ok", {"val_bpb": 1.0})
    assert not (tmp_path / "x").exists() and "disabled" in t.report()
    with pytest.raises(TrackingError, match="cannot open the MLflow store"):
        Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}")).start()  # a directory, not a db file


@pytest.mark.slow
def test_statuses_map_to_finished_or_failed_with_the_reason_as_a_tag(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ended = {}
    for status in ("ok", "stalled", "nan", "crash", "timeout"):
        t = Tracker(TrackingConfig(uri=uri, run_name=status)).start()
        t.wait_ready()
        t.log_step(1, {"loss": 3.0})
        t.finish(status, {"val_bpb": 2.0, "num_steps": 1, "error": None if status == "ok" else f"why {status}"})
        run = MlflowClient(uri).get_run(t.run_id)
        ended[status] = (run.info.status, run.data.tags["status"], run.data.tags.get("error"))
        assert [m.step for m in MlflowClient(uri).get_metric_history(t.run_id, "train/loss")] == [1]
    assert ended == {"ok": ("FINISHED", "ok", None), "stalled": ("FINISHED", "stalled", "why stalled"),
                     "nan": ("FAILED", "nan", "why nan"), "crash": ("FAILED", "crash", "why crash"),
                     "timeout": ("FAILED", "timeout", "why timeout")}



def test_a_call_that_meets_another_writers_lock_is_retried_not_dropped(tmp_path, monkeypatch):
    """A sweep's parallel jobs share one sqlite file, and sqlite answers "database is locked" at once,
    without its busy wait, when two writers could deadlock (a joblib sweep once lost a child's params).
    The call is retried with back-off; any other error is reported after one try."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    import src.harness.tracking as tracking

    monkeypatch.setattr(tracking, "BUSY_RETRY_S", (0.01, 0.01, 0.01))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = Tracker(TrackingConfig(uri=uri, run_name="locked")).start()
    t.wait_ready()
    real, calls = t._client.log_batch, []

    def flaky(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) <= 2:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        if "tags" in kwargs:
            raise MlflowException("something else")
        return real(*args, **kwargs)

    monkeypatch.setattr(t._client, "log_batch", flaky)
    t.log_params({"seed": 7})
    assert len(calls) == 3 and not t.not_logged
    t.set_tags({"x": 1})
    assert len(calls) == 4 and "something else" in t.not_logged[0]  # not retried
    monkeypatch.setattr(t._client, "log_batch", real)
    t.finish("ok", {"val_bpb": 2.0, "num_steps": 1})
    assert MlflowClient(uri).get_run(t.run_id).data.params["seed"] == "7"


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_a_run_that_ends_before_its_warm_up_does_still_has_its_params(tmp_path):
    """Params are logged at the end of warm-up; a run that never gets there (here: one step of a five-step
    warm-up; under load, a 2-s budget spent by the model build and the first step) logs them at its end."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_cli("src.train", *FAST, "budget.mode=tokens", "budget.tokens=8192", "budget.warmup_steps=5",
            f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}")
    s = read_summary(tmp_path / "run")
    assert s["num_steps"] == 1 and s["status"] == "ok"
    run = MlflowClient(uri).get_run(s["mlflow_run_id"])
    assert run.data.params["budget.warmup_steps"] == "5" and run.data.params["seed"] == str(s["seed"])
    assert run.data.tags["mlflow.source.git.commit"] == s["git_sha"]


def test_mlflow_telemetry_is_off_unless_the_user_asked_for_it():
    """Its thread sets and pops an environment variable while the lab's threads copy os.environ (a session lost its
    tracking to that race at start); the user's own setting wins."""
    import subprocess
    import sys

    from src.harness.paths import REPO

    code = ("import src, os; from mlflow.telemetry.utils import is_telemetry_disabled; "
            "print(os.environ['MLFLOW_DISABLE_TELEMETRY'], is_telemetry_disabled())")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "PYTEST_CURRENT_TEST")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["true", "True"]
    out = subprocess.run([sys.executable, "-c", "import src, os; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"],
                         cwd=REPO, env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["false"]
