"""What MLflow tracking costs a run: tokens/s, total_seconds, process wall and CPU time, tracking on vs off.

Runs the real CLI (`python -m src.train budget.seconds=<s>`) in pairs, one with tracking on and
one off, into a throwaway sqlite store that already exists (as the repo's mlruns/ does after the
first run). Sequential pairs alternate their order (on/off, off/on) so drift hits both sides
alike; --concurrent runs the two of a pair at the same time, one thread each, so that a shared
machine's load hits both at once. Then it times the hot path in-process: the per-step
`log_step` call and the background `log_batch` flush, per training step.

Prints one row per run, per-pair ratios and their median: tokens/s on/off (target: within 2%)
and the seconds tracking adds to total_seconds, to the process's wall time and to its CPU time.

Usage: python bench/tracking_overhead.py [--seconds 30] [--pairs 3] [--concurrent] [extra overrides ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
COLS = ["tokens_per_sec", "step_time_p50", "total_seconds", "wall_seconds", "cpu_seconds", "num_steps", "val_bpb"]


def start_run(seconds: float, tracking: bool, store: Path, out: Path, extra: list[str]) -> tuple:
    cmd = [sys.executable, "-m", "src.train", f"budget.seconds={seconds}", "progress=false",
           f"tracking.enabled={str(tracking).lower()}", f"tracking.uri=sqlite:///{store}/mlflow.db",
           f"hydra.run.dir={out}", *extra]
    err = open(f"{out}.stderr", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    err.close()
    return proc, time.perf_counter(), out


def wait_runs(started: dict) -> dict:
    """Reap the runs as they end: each one's wall time, its own CPU time (wait4) and its summary."""
    by_pid, results = {p.pid: (key, p, t0, out) for key, (p, t0, out) in started.items()}, {}
    while by_pid:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in by_pid:
            continue
        key, proc, t0, out = by_pid.pop(pid)
        wall, code = time.perf_counter() - t0, os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code != 0:
            sys.exit(f"run failed ({code}):\n{Path(f'{out}.stderr').read_text()[-3000:]}")
        s = json.loads((out / "summary.json").read_text())
        results[key] = {**s, "wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime}
    return results


def hot_path_cost(store: Path, steps: int = 5000) -> tuple[float, float]:
    """Seconds per step spent in log_step (training thread) and in the flush (tracker thread)."""
    from src.harness.config import TrackingConfig
    from src.harness.tracking import Tracker

    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{store}/mlflow.db", flush_every_s=3600)).start()
    tracker.wait_ready()
    t0 = time.perf_counter()
    for i in range(steps):  # what train_loop does per step with tracking on
        tracker.log_step(i + 1, dict(loss=2.0, lr_mult=1.0, step_time=0.4, tokens_per_sec=20000.0))
    t_log = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    tracker._flush()  # what the tracker thread does every flush_every_s, here for all steps at once
    t_flush = (time.perf_counter() - t0) / steps
    tracker.finish("ok", {"val_bpb": 0.0})
    return t_log, t_flush


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--concurrent", action="store_true", help="run each pair at once (adds device.threads=1)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for src.train")
    args = ap.parse_args()
    extra = args.overrides + (["device.threads=1"] if args.concurrent else [])
    print(f"{'pair':>4} {'tracking':>8} " + " ".join(f"{c:>15}" for c in COLS), flush=True)
    pairs = []
    with tempfile.TemporaryDirectory() as d:
        store = Path(d)
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{store}/mlflow.db").search_experiments()  # an existing store, as in real use
        for i in range(args.pairs):
            order = (True, False) if i % 2 == 0 else (False, True)
            if args.concurrent:
                pair = wait_runs({t: start_run(args.seconds, t, store, store / f"{i}-{t}", extra) for t in order})
            else:
                pair = {t: wait_runs({t: start_run(args.seconds, t, store, store / f"{i}-{t}", extra)})[t]
                        for t in order}
            for t in order:
                s = pair[t]
                print(f"{i + 1:>4} {'on' if t else 'off':>8} "
                      + " ".join(f"{s[c]:>15.4f}" if isinstance(s[c], float) else f"{s[c]:>15}" for c in COLS),
                      flush=True)
            pairs.append(pair)
        t_log, t_flush = hot_path_cost(store)
    ratio = [p[True]["tokens_per_sec"] / p[False]["tokens_per_sec"] for p in pairs]
    deltas = {c: [p[True][c] - p[False][c] for p in pairs] for c in ("total_seconds", "wall_seconds", "cpu_seconds")}
    print(f"\n{'pair':>6}  {'tokens/s on/off':>15}  {'total_seconds +':>15}  {'wall +':>9}  {'CPU +':>9}")
    for i, r in enumerate(ratio):
        print(f"{i + 1:>6}  {r:>15.4f}  {deltas['total_seconds'][i]:>+13.2f} s  "
              f"{deltas['wall_seconds'][i]:>+7.2f} s  {deltas['cpu_seconds'][i]:>+7.2f} s")
    med = statistics.median(ratio)
    print(f"{'median':>6}  {med:>15.4f}  {statistics.median(deltas['total_seconds']):>+13.2f} s  "
          f"{statistics.median(deltas['wall_seconds']):>+7.2f} s  {statistics.median(deltas['cpu_seconds']):>+7.2f} s")
    p50 = statistics.median(p[True]["step_time_p50"] for p in pairs)
    print(f"\nhot path per step: log_step {t_log * 1e6:.1f} us (training thread) + log_batch flush "
          f"{t_flush * 1e6:.1f} us (tracker thread) = {100 * (t_log + t_flush) / p50:.3f}% of a {p50:.3f} s step")
    print(f"end to end: tokens/s with tracking is {100 * (med - 1):+.2f}% of without: "
          f"{'within' if abs(med - 1) <= 0.02 else 'OUTSIDE'} the 2% target")


if __name__ == "__main__":
    main()
