"""Where the noise of a score comes from: how much of the spread between runs of identical code is the number of
optimizer steps that fit in the budget, and whether a confirmation's pairs share their noise.

Reads the ledgers (results.tsv) of finished sessions, e.g. the throwaway clones a bench/research.py or
bench/false_keeps.py sitting leaves under /tmp, and groups the runs of identical code and overrides (baseline
repeats, confirmation runs, the screen run of the experiment they confirm). Prints:
- per group: its runs as steps / counted seconds / val_bpb;
- pooled over the groups: the sigma of val_bpb between identical runs, the sigma left between identical runs that
  took the same number of steps, the share of the variance the step count explains, and what one step more is
  worth (the pooled within-group slope of val_bpb on steps);
- for experiments with at least 3 confirmation pairs: the pairs' own spread (sd of candidate - best over sqrt 2)
  against the runs' spread; a ratio near 1 says the runs of a pair share no noise (the case the paired rule's
  error rates are stated for), well below 1 that pairing cancels part of it.

Usage: python bench/noise_sources.py /tmp/bench-research-*        # directories searched for results.tsv
       python bench/noise_sources.py outputs/research/my-session --min-runs 4
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.lab.decisions import BASELINE, CONFIRM, DISCARD, KEEP  # noqa: E402
from src.lab.ledger import Ledger, parse_confirmation_id  # noqa: E402



def runs_of(session: Path) -> list[tuple[tuple, int, float, float, str]]:
    """(group key, steps, counted seconds, val_bpb, row id) of every single scored run in one session's ledger: the
    baselines, the confirmation runs and each experiment's screen run (its first value; the row's val_bpb is a mean
    once confirmation runs joined it)."""
    out = []
    for e in Ledger(session).rows():
        if e.status not in (BASELINE, CONFIRM, KEEP, DISCARD) or not e.num_steps:
            continue
        v = e.values[0] if e.values else e.val_bpb
        if v is None or not math.isfinite(v):
            continue
        key = (str(session), e.commit, tuple(sorted(e.overrides_in_effect or e.overrides.split())))
        out.append((key, e.num_steps, e.training_seconds or 0.0, v, e.exp))
    return out


def pooled(groups: list[list[float]]) -> tuple[float, int]:
    """Pooled variance and its dof over groups of values (groups of one add nothing)."""
    ss, dof = 0.0, 0
    for g in groups:
        if len(g) > 1:
            m = sum(g) / len(g)
            ss += sum((x - m) ** 2 for x in g)
            dof += len(g) - 1
    return (ss / dof if dof else float("nan")), dof


def step_slope(groups: list[list[tuple[int, float]]]) -> float:
    """Pooled within-group least-squares slope of val_bpb on the step count (bpb per step)."""
    sxy = sxx = 0.0
    for g in groups:
        ms = sum(s for s, _ in g) / len(g)
        mv = sum(v for _, v in g) / len(g)
        sxy += sum((s - ms) * (v - mv) for s, v in g)
        sxx += sum((s - ms) ** 2 for s, _ in g)
    return sxy / sxx if sxx else float("nan")


def pairs_of(session: Path) -> dict[str, list[tuple[float, float]]]:
    """Per experiment, its confirmation pairs (best's run, candidate's run), in pair order."""
    sides: dict[str, dict[tuple[str, int], float]] = defaultdict(dict)
    for e in Ledger(session).rows():
        m = parse_confirmation_id(e.exp)
        if m and e.status == CONFIRM and e.val_bpb is not None:
            sides[m[0]][(m[1], m[2])] = e.values[0] if e.values else e.val_bpb
    out = {}
    for exp, d in sides.items():
        n = max(i for _, i in d)
        out[exp] = [(d[("b", i)], d[("c", i)]) for i in range(1, n + 1) if ("b", i) in d and ("c", i) in d]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", type=Path, help="directories searched (recursively) for results.tsv")
    ap.add_argument("--min-runs", type=int, default=3, help="groups with fewer runs are left out")
    ap.add_argument("--min-pairs", type=int, default=3, help="experiments with fewer confirmation pairs are left out")
    args = ap.parse_args()
    sessions = sorted({p.parent for r in args.roots for p in ([r / "results.tsv"] if (r / "results.tsv").exists()
                                                                else r.rglob("results.tsv"))})
    if not sessions:
        sys.exit(f"no results.tsv under {', '.join(map(str, args.roots))}")
    groups: dict[tuple, list[tuple[int, float, float, str]]] = defaultdict(list)
    for s in sessions:
        for key, steps, secs, v, exp in runs_of(s):
            groups[key].append((steps, secs, v, exp))
    groups = {k: sorted(g) for k, g in groups.items() if len(g) >= args.min_runs}
    print(f"{len(sessions)} session(s); {len(groups)} group(s) of at least {args.min_runs} identical runs\n")
    print("| session | commit | runs (steps / counted s / val_bpb) |")
    print("|---|---|---|")
    for (sess, commit, _), g in groups.items():
        print(f"| {Path(sess).name} | {commit[:7]} | {', '.join(f'{s}/{t:.1f}/{v:.4f}' for s, t, v, _ in g)} |")
    if not groups:
        return
    var_all, dof_all = pooled([[v for _, _, v, _ in g] for g in groups.values()])
    by_steps = [[v for s2, _, v, _ in g if s2 == s] for g in groups.values() for s in {s for s, _, _, _ in g}]
    var_in, dof_in = pooled(by_steps)
    slope = step_slope([[(s, v) for s, _, v, _ in g] for g in groups.values()])
    print("\n| figure | value |")
    print("|---|---|")
    print(f"| sigma between identical runs | {math.sqrt(var_all):.4f} ({dof_all} dof) |")
    print(f"| sigma between identical runs of the same step count | {math.sqrt(var_in):.4f} ({dof_in} dof) |")
    print(f"| share of the variance the step count explains | {1 - var_in / var_all:.0%} |")
    print(f"| val_bpb per step more (pooled within-group slope) | {slope:+.4f} |")
    ratios = []
    for s in sessions:
        for exp, prs in pairs_of(s).items():
            if len(prs) < args.min_pairs:
                continue
            d = [c - b for b, c in prs]
            var_d, _ = pooled([d])
            var_r, _ = pooled([[b for b, _ in prs], [c for _, c in prs]])
            ratios.append((f"{s.name} {exp}", len(prs), var_d / 2, var_r))
    if ratios:
        print("\n| experiment | pairs | sd(c - b) / sqrt 2 | sd of the runs | ratio of variances |")
        print("|---|---|---|---|---|")
        for name, n, vd, vr in ratios:
            print(f"| {name} | {n} | {math.sqrt(vd):.4f} | {math.sqrt(vr):.4f} | {vd / vr:.2f} |")
        print(f"\npooled ratio of variances (pairs / runs): {sum(r[2] for r in ratios) / sum(r[3] for r in ratios):.2f}")


if __name__ == "__main__":
    main()
