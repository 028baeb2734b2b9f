"""Reproduce the CPU-default figures: val_bpb, wall time, tokens/s and MFU of the default run.

Runs the real CLI (`python -m src.train budget.seconds=<s>`) --repeats times, timing each whole
process from start to exit (eval included), and prints one row per run plus the median.

Usage: python bench/cpu_default.py [--seconds 120] [--repeats 1] [extra overrides ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_BPB, TARGET_WALL = 2.45, 145.0


def one_run(seconds: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "src.train", f"budget.seconds={seconds}", "progress=false",
                               f"hydra.run.dir={d}", *extra], cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        s = json.loads((Path(d) / "summary.json").read_text())
    s["wall_seconds"] = wall
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for src.train")
    args = ap.parse_args()
    cols = ["val_bpb", "training_seconds", "wall_seconds", "tokens_per_sec", "mfu_percent", "num_steps", "dtype"]
    rows = []
    print(f"{'run':>4} " + " ".join(f"{c:>16}" for c in cols), flush=True)
    for i in range(args.repeats):
        s = one_run(args.seconds, args.overrides)
        rows.append(s)
        print(f"{i + 1:>4} " + " ".join(f"{s[c]:>16.4f}" if isinstance(s[c], float) else f"{s[c]:>16}"
                                        for c in cols), flush=True)
    med = {c: statistics.median(r[c] for r in rows) for c in cols if isinstance(rows[0][c], (int, float))}
    print(f"{'med':>4} " + " ".join(f"{med[c]:>16.4f}" if c in med else f"{'':>16}" for c in cols))
    if args.seconds == 120 and not args.overrides:
        ok_bpb, ok_wall = med["val_bpb"] <= TARGET_BPB, med["wall_seconds"] <= TARGET_WALL
        print(f"targets: val_bpb <= {TARGET_BPB}: {'met' if ok_bpb else 'MISSED'}; "
              f"wall <= {TARGET_WALL:.0f} s: {'met' if ok_wall else 'MISSED'}")


if __name__ == "__main__":
    main()
