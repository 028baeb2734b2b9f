"""The device-time budget beside a busy neighbour: what one busy process per core does to runs and to a session.

Two parts (issue 19's measurements), each in a throwaway clone of this checkout's HEAD:

runs     the default 30-s CPU run (`python -m src.train +experiment=cpu30`), `--repeats` times quiet and
         `--repeats` times with one busy process per core (`while True: pass`) beside it the whole run,
         interleaved (quiet, loaded, quiet, loaded, ...). Prints one row per run (val_bpb, counted device
         seconds, tokens, whole-process wall seconds) and the checks: the sigma of val_bpb under load within
         1.5x of the quiet sigma, the loaded mean within 2 quiet sigmas or 0.01 (whichever is larger).
session  the quick start's session (`agent=tpe +experiment=cpu30 search.max_experiments=6`) with one busy
         process per core running from before it starts to after it ends. Prints the ledger's statuses and
         the checks: no experiment `tampered` or `crash`, at least 5 of 6 decided (keep or discard).

Usage: python bench/budget_load.py runs [--repeats 4] [--seconds 30]
       python bench/budget_load.py session [--experiments 6] [--seconds 30]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sessions import REPO, clone, outcome, run_search, table, timed_train


class Busy:
    """One `while True: pass` process per core, for as long as the `with` block lasts."""

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def one_run(repo: Path, out: Path, seconds: float) -> dict:
    s = timed_train(repo, ["+experiment=cpu30", f"budget.seconds={seconds}", "progress=false", "tracking.enabled=false"],
                    out)
    s["whole_wall"] = s["wall"]
    return s


def runs(args, repo: Path) -> int:
    rows, by = [], {"quiet": [], "loaded": []}
    for i in range(args.repeats):
        for cond in ("quiet", "loaded"):
            out = args.out / f"{cond}-{i + 1}"
            if cond == "loaded":
                with Busy():
                    s = one_run(repo, out, args.seconds)
            else:
                s = one_run(repo, out, args.seconds)
            by[cond].append(s)
            rows.append([cond, i + 1, s["status"], f"{s['val_bpb']:.4f}", f"{s.get('training_seconds', 0):.2f}",
                         f"{s.get('total_tokens_M', 0):.3f}", s.get("num_steps", 0), f"{s['whole_wall']:.1f}",
                         f"{s.get('wall_ratio', 0):.2f}"])
            print(table(["condition", "#", "status", "val_bpb", "device_s", "tokens_M", "steps", "wall_s", "wall/device"],
                        rows[-1:]) if len(rows) == 1 else "  ".join(map(str, rows[-1])), flush=True)
    print()
    print(table(["condition", "#", "status", "val_bpb", "device_s", "tokens_M", "steps", "wall_s", "wall/device"], rows))
    vq = [s["val_bpb"] for s in by["quiet"]]
    vl = [s["val_bpb"] for s in by["loaded"]]
    sq, sl = statistics.stdev(vq), statistics.stdev(vl)
    mq, ml = statistics.mean(vq), statistics.mean(vl)
    print(f"\nquiet:  mean {mq:.4f} sigma {sq:.4f} | tokens {statistics.mean(s['total_tokens_M'] for s in by['quiet']):.3f}M"
          f" | wall {statistics.mean(s['whole_wall'] for s in by['quiet']):.1f} s")
    print(f"loaded: mean {ml:.4f} sigma {sl:.4f} | tokens {statistics.mean(s['total_tokens_M'] for s in by['loaded']):.3f}M"
          f" | wall {statistics.mean(s['whole_wall'] for s in by['loaded']):.1f} s")
    ok_sigma = sl <= 1.5 * sq
    ok_mean = abs(ml - mq) <= max(2 * sq, 0.01)
    print(f"sigma under load <= 1.5x quiet sigma: {'met' if ok_sigma else 'MISSED'} ({sl / sq if sq else float('inf'):.2f}x)")
    print(f"mean within max(2 quiet sigmas, 0.01) = {max(2 * sq, 0.01):.4f}: {'met' if ok_mean else 'MISSED'} "
          f"({ml - mq:+.4f})")
    return 0 if ok_sigma and ok_mean else 1


def session(args, repo: Path) -> int:
    t0 = time.time()
    with Busy():
        rc = run_search(repo, ["agent=tpe", "+experiment=cpu30", f"budget.seconds={args.seconds}",
                               f"search.max_experiments={args.experiments}", "search.tag=loaded"],
                        args.out / "loaded.log")
    o = outcome(repo, "loaded")
    exps = [e for e in o.rows if re.fullmatch(r"exp-\d+", e.exp)]  # the experiments, not their confirmation runs
    print(f"session: exit {rc}, {time.time() - t0:.0f} s beside {os.cpu_count()} busy processes")
    print(table(["exp", "status", "val_bpb", "reason"],
                [[e.exp, e.status, f"{e.val_bpb:.4f}" if e.val_bpb is not None else "-", (e.reason or "")[:90]]
                 for e in o.rows]))
    bad = [e.exp for e in exps if e.status in ("tampered", "crash")]
    decided = [e.exp for e in exps if e.status in ("keep", "discard")]
    print(f"tampered or crash: {len(bad)} {bad or ''} ({'met' if not bad else 'MISSED'})")
    print(f"decided: {len(decided)} of {len(exps)} ({'met' if len(decided) >= len(exps) - 1 else 'MISSED'})")
    return 0 if not bad and len(decided) >= len(exps) - 1 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["runs", "session"])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--experiments", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.out = args.out or REPO / "outputs" / "bench" / "budget_load" / f"{args.part}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.out.mkdir(parents=True, exist_ok=True)
    repo = clone(args.out)
    return runs(args, repo) if args.part == "runs" else session(args, repo)


if __name__ == "__main__":
    sys.exit(main())
