"""The same timed run from several commits, interleaved in rounds: what a change of the harness does to a run.

Each arm is a commit checked out as a git worktree (`.` is this checkout as it stands). Every round runs
`python -m src.train budget.seconds=S <overrides>` once per arm, in an order that rotates from round to round,
so drift hits every arm alike. An arm at another commit reads its own data cache, prepared by its own
prepare.py before the first round (the prepared format changes between commits). Reports per run the status, val_bpb, tokens trained, counted training seconds,
the scorer's seconds and the whole-process wall time (start to exit); then per arm the medians, and for each
arm against the first its paired median differences (wall seconds, val_bpb) and token ratio.

Usage: python bench/paired_runs.py --arm wallclock=4459143 --arm now=. [--rounds 2] [--seconds 120] [overrides ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sessions import REPO, table, timed_train, worktree


def own_cache(cwd: Path, cache: Path) -> dict:
    """The environment of an arm with its own data cache, prepared there by the arm's own prepare.py."""
    env = {"OVERNIGHT_CACHE": str(cache)}
    subprocess.run([sys.executable, "prepare.py"], cwd=cwd, env={**os.environ, **env}, check=True,
                   capture_output=True)
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", action="append", required=True, help="name=commit (`.`: this checkout)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("overrides", nargs="*", help="train overrides for every run (e.g. tracking.enabled=false)")
    args = ap.parse_args()
    arms = [a.split("=", 1) for a in args.arm]
    tmp = Path(tempfile.mkdtemp(prefix="paired-runs-"))
    dirs = {name: worktree(commit, tmp / name) for name, commit in arms}
    envs = {name: own_cache(dirs[name], tmp / f"{name}-cache") for name, commit in arms if commit != "."}
    runs: dict[str, list[dict]] = {name: [] for name, _ in arms}
    rows = []
    try:
        for r in range(args.rounds):
            order = arms[r % len(arms):] + arms[: r % len(arms)]
            for name, _ in order:
                s = timed_train(dirs[name], [f"budget.seconds={args.seconds}", "progress=false", *args.overrides],
                                tmp / "runs" / f"{name}-{r + 1}", envs.get(name))
                runs[name].append(s)
                row = [name, r + 1, s.get("status"), f"{s.get('val_bpb', float('nan')):.4f}",
                       f"{s.get('total_tokens_M', 0):.3f}", f"{s.get('training_seconds', 0):.1f}",
                       f"{s.get('score_seconds', 0) or 0:.1f}", f"{s['wall']:.1f}"]
                rows.append(row)
                print("  ".join(map(str, row)), flush=True)
    finally:
        for name, commit in arms:
            if commit != ".":
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(dirs[name])],
                               capture_output=True)
    print()
    print(table(["arm", "round", "status", "val_bpb", "tokens_M", "train_s", "score_s", "wall_s"], rows))
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print()
    first = arms[0][0]
    out = []
    for name, _ in arms:
        rs = runs[name]
        line = [name, f"{med([s['val_bpb'] for s in rs]):.4f}", f"{med([s.get('total_tokens_M', 0) for s in rs]):.3f}",
                f"{med([s['wall'] for s in rs]):.1f}"]
        if name != first:
            base = runs[first]
            line += [f"{med([a['wall'] - b['wall'] for a, b in zip(rs, base)]):+.1f}",
                     f"{med([a['val_bpb'] - b['val_bpb'] for a, b in zip(rs, base)]):+.4f}",
                     f"{med([a.get('total_tokens_M', 0) / max(b.get('total_tokens_M', 0), 1e-9) for a, b in zip(rs, base)]):.3f}"]
        else:
            line += ["-", "-", "-"]
        out.append(line)
    print(table(["arm", "val_bpb", "tokens_M", "wall_s", f"wall - {first}", f"val_bpb - {first}",
                 f"tokens / {first}"], out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
