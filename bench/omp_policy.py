"""How the OpenMP wait policy trades quiet speed against what a busy neighbour costs: wall and CPU time.

Runs the same fixed-token CPU training (`python -m src.train budget=tokens score=caller`:
deterministic, the same tokens every time) under each OpenMP setting, quiet and beside one busy
process per core, interleaved in one sitting, and measures the training (clock start to checkpoint:
its wall seconds, CPU seconds and the budget's counted device seconds, from the run's summary) and the
whole process from outside (wall, and user + sys CPU seconds from the kernel's rusage). A budget
counted in CPU time is fair under load only if a neighbour leaves the CPU a given amount of training
costs where it was; a setting that spins burns CPU while it waits. Prints one row per setting and condition (medians).

Usage: python bench/omp_policy.py [--tokens 262144] [--repeats 2] [--settings gomp,passive,spin10k]
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
SETTINGS = {  # name -> environment of the train process (gomp: libgomp's own default, spin 300k, then sleep)
    "gomp": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "300000"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin1k": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "1000"},
    "spin10k": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"},
    "spin100k": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "100000"},
}
BUSY = "while True: pass"


def one_run(tokens: int, env_extra: dict, overrides: list[str]) -> dict:
    env = {**os.environ, **env_extra}
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "src.train", "budget=tokens", f"budget.tokens={tokens}", "device=cpu",
               "progress=false", "tracking.enabled=false", "score=caller", f"hydra.run.dir={d}", *overrides]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            sys.exit(f"run failed ({proc.returncode}):\n{proc.stderr.read().decode()[-3000:]}")
        s = json.loads((Path(d) / "summary.json").read_text())
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "train_wall": s["train_wall_seconds"],
            "counted": s["training_seconds"], "train_cpu": s.get("device_cpu_seconds", float("nan")),
            "tokens": s["total_tokens_M"] * 1e6}


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--settings", default="gomp,passive,spin10k,spin100k")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "omp_policy.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.repeats):
        for cond in ("quiet", "busy"):
            for name in names:
                hogs = busy(os.cpu_count() or 2) if cond == "busy" else []
                try:
                    res = one_run(args.tokens, SETTINGS[name], args.overrides)
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
                rows.setdefault((name, cond), []).append(res)
                print(f"  [{r + 1}/{args.repeats}] {name:>9} {cond:>5}: train wall {res['train_wall']:6.1f} s  train cpu "
                      f"{res['train_cpu']:6.1f} s  counted {res['counted']:6.1f} s  process wall {res['wall']:6.1f} s cpu {res['cpu']:6.1f} s", flush=True)
    print(f"\n{'setting':>9} {'cond':>5} {'train_wall':>10} {'train_cpu':>9} {'counted':>8} {'counted/wall':>12} "
          f"{'proc_wall':>9} {'proc_cpu':>8}   (medians, seconds; training = clock start to checkpoint; counted = "
          "the budget's device seconds)")
    table = []
    for (name, cond), rs in rows.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("wall", "cpu", "train_wall", "train_cpu", "counted")}
        table.append({"setting": name, "cond": cond, **med, "runs": rs})
        print(f"{name:>9} {cond:>5} {med['train_wall']:10.1f} {med['train_cpu']:9.1f} {med['counted']:8.1f} "
              f"{med['counted'] / med['train_wall']:12.2f} {med['wall']:9.1f} {med['cpu']:8.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "rows": table}, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
