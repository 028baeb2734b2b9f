"""The experiment runner (src/lab/runner.py): subprocess in its own process group, hard timeout,
Ctrl-C, no secrets in the child's environment, crash log tails. Uses small stand-in scripts, not src.train.

Run: python -m pytest -q tests/lab/test_runner.py
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from src.lab.runner import RunInterrupted, Runner, alive, clean_env
from tests.support.helpers import fake_command, wait_for


def script(tmp_path: Path, body: str) -> list[str]:
    f = tmp_path / "child.py"
    f.write_text("import json, os, subprocess, sys, time\n"
                 "out = [a.split('=', 1)[1] for a in sys.argv if a.startswith('hydra.run.dir=')][0]\n" + body)
    return [sys.executable, str(f)]


def test_clean_env_strips_keys_tokens_secrets_but_keeps_exceptions():
    env = {"ANTHROPIC_API_KEY": "x", "OPENAI_API_KEY": "x", "GITHUB_TOKEN": "x", "hf_token": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "DB_PASSWORD": "x", "MLFLOW_RUN_ID": "x", "MLFLOW_TRACKING_TOKEN": "x",
           "PATH": "/bin", "OVERNIGHT_CACHE": "/c", "KEYBOARD": "us"}
    out = clean_env(env, keep=["MLFLOW_TRACKING_TOKEN"])
    assert sorted(out) == ["KEYBOARD", "MLFLOW_TRACKING_TOKEN", "OVERNIGHT_CACHE", "PATH"]


def test_child_sees_no_secrets_and_writes_its_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("SOME_SERVICE_API_KEY", "k")
    monkeypatch.setenv("MY_TOKEN_FILE", "t")
    monkeypatch.setenv("VISIBLE_SETTING", "1")
    out = Runner(tmp_path, command=fake_command()).run(["model.depth=2"], tmp_path / "run", timeout_s=60)
    assert out.ok and out.val_bpb == pytest.approx(3.0 + 0.5 * 0.4054651 ** 2, abs=1e-5)
    seen = set(out.summary["env"])
    assert "VISIBLE_SETTING" in seen and not seen & {"ANTHROPIC_API_KEY", "SOME_SERVICE_API_KEY", "MY_TOKEN_FILE"}
    assert "model.depth=2" in (tmp_path / "run" / "command.txt").read_text()
    assert "val_bpb" in (tmp_path / "run" / "run.log").read_text()


def test_a_crash_keeps_the_log_tail_and_the_error_line(tmp_path):
    cmd = script(tmp_path, "print('step 1 loss 3.2', flush=True)\nraise ValueError('shape mismatch in attention')\n")
    out = Runner(tmp_path, command=cmd).run([], tmp_path / "run", timeout_s=60)
    assert out.status == "crash" and out.returncode == 1  # Python's exit status for an uncaught exception
    assert "ValueError: shape mismatch in attention" in out.error_line
    assert "step 1 loss 3.2" in out.log_tail and "Traceback" in out.log_tail


@pytest.mark.slow
def test_timeout_kills_the_whole_process_group(tmp_path):
    cmd = script(tmp_path, "g = subprocess.Popen(['sleep', '300'])\n"
                           "open(os.path.join(out, 'grandchild.pid'), 'w').write(str(g.pid))\n"
                           "signal = __import__('signal'); signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                           "time.sleep(300)\n")
    t0 = time.monotonic()
    out = Runner(tmp_path, command=cmd, stop_grace_s=1.0).run([], tmp_path / "run", timeout_s=2)
    assert out.status == "timeout" and "timeout" in out.error_line
    assert time.monotonic() - t0 < 30
    gpid = int((tmp_path / "run" / "grandchild.pid").read_text())
    wait_for(lambda: not alive(gpid), 10, "the grandchild to be killed with its group")
    assert out.hung and "not starved by the machine" in out.note  # it slept: the code's doing, not the machine's


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/schedstat").exists(), reason="the kernel's schedstat (Linux)")
def test_a_run_starved_of_its_core_at_its_timeout_is_the_machines_not_a_hang(tmp_path):
    """The kernel counts the time a runnable process waited for a CPU: a run that shares its one core with a busy
    neighbour (pinned to the same core) times out `starved`, and the lab re-runs it instead of calling it a crash."""
    core = sorted(os.sched_getaffinity(0))[0]
    burner = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        cmd = script(tmp_path, "while True: pass\n")
        out = Runner(tmp_path, command=cmd, stop_grace_s=1.0, cpus=(core,)).run([], tmp_path / "run", timeout_s=3)
    finally:
        burner.kill()
        burner.wait()
    assert out.status == "timeout" and not out.hung, out.note
    assert "starved by the machine" in out.note


def test_ctrl_c_stops_the_run_and_reports_it_interrupted(tmp_path):
    cmd = script(tmp_path, "open(os.path.join(out, 'started'), 'w').write('1')\ntime.sleep(300)\n")
    started = tmp_path / "run" / "started"

    def interrupt():
        try:
            wait_for(started.exists, 30, "the run to start")
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(RunInterrupted) as e:
        Runner(tmp_path, command=cmd, stop_grace_s=2.0).run([], tmp_path / "run", timeout_s=120)
    assert e.value.outcome.status == "interrupted"
    assert e.value.outcome.returncode == -signal.SIGINT  # the child was reaped, ended by the SIGINT passed on


def test_the_summary_status_wins_and_a_missing_summary_is_a_crash(tmp_path):
    cmd = script(tmp_path, "json.dump({'status': 'nan', 'val_bpb': float('nan'), 'error': 'loss is nan at step 3'},"
                           " open(os.path.join(out, 'summary.json'), 'w'))\nsys.exit(1)\n")
    out = Runner(tmp_path, command=cmd).run([], tmp_path / "a", timeout_s=60)
    assert out.status == "nan" and out.val_bpb is None and out.error_line == "loss is nan at step 3"
    out = Runner(tmp_path, command=script(tmp_path, "pass\n")).run([], tmp_path / "b", timeout_s=60)
    assert out.status == "crash" and "no summary.json" in out.error_line


def test_the_learning_curve_reaches_the_lab_while_the_run_trains(tmp_path, monkeypatch):
    """The run prints a point every 5% of its budget; on_curve gets each one before the run has ended, once, in
    order; the outcome keeps the whole curve."""
    monkeypatch.setenv("FAKE_CURVE_S", "0.1")  # 2 s of points: the runner polls its log every 0.5 s
    seen = []
    runner = Runner(tmp_path, command=fake_command())

    def on_curve(f: float, loss: float) -> None:
        seen.append((f, loss, (tmp_path / "run" / "summary.json").exists()))

    out = runner.run([], tmp_path / "run", timeout_s=60, on_curve=on_curve)
    assert [round(f, 2) for f, _, _ in seen] == [round(0.05 * i, 2) for i in range(1, 21)]
    assert not seen[0][2]  # the first points arrived while the run was still training
    assert [p[1] for p in seen] == sorted([p[1] for p in seen], reverse=True)  # a falling loss
    assert [list(p) for p in out.curve] == [[f, loss] for f, loss, _ in seen] and out.ok


def test_curve_lines_out_of_order_or_repeated_are_dropped(tmp_path):
    from src.lab.runner import CurveReader

    log = tmp_path / "run.log"
    log.write_text("overnight-curve fraction=0.05 loss=3.1 step=1\nnoise\noverni")
    r = CurveReader(log)
    assert r.poll() == [(0.05, 3.1)]
    with open(log, "a") as f:  # the rest of a half-written line, a repeat, then the next point
        f.write("ght-curve fraction=0.10 loss=3.0 step=2\novernight-curve fraction=0.10 loss=1.0 step=2\n"
                "overnight-curve fraction=0.05 loss=0.5 step=3\novernight-curve fraction=0.15 loss=2.9 step=4\n")
    assert r.poll() == [(0.10, 3.0), (0.15, 2.9)] and r.points == [(0.05, 3.1), (0.10, 3.0), (0.15, 2.9)]
