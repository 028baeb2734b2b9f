"""The keep rule's operating characteristics, by simulation: how often it keeps a null change and a real gain of
1 or 2 sigmas, with and without near-miss retests, and what the retests cost in runs.

Each trial is one experiment against a best whose runs and noise floor are drawn like a session's (val_bpb of a run =
its commit's true value + N(0, sigma^2)): `fresh` is the default session's start (two baseline runs, 1 dof), `early`
3 runs of the best and 4 dof, `mature` 4 runs and 10 dof (no confirmation: the screen decides). The rule is the
session's own code path in miniature, with its own functions and the search defaults (src/lab/decision.py decide and
paired, Confirmation.pairs' two pairs under 2 dof, experiment.near_miss, the retest's looks at retest_alpha /
retest_pairs and its stop when the pairs' mean no longer favours the candidate). The runs of a pair are independent
here (no shared drift), which is the case the paired rule's error rate is stated for.

Usage: python bench/keep_rule.py [--trials 20000] [search.retest_pairs=8 search.retest_alpha=0.01 ...]
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.lab.decision import NoiseFloor, decide, paired, retest_batch, retest_look, weak  # noqa: E402
from src.lab.experiment import near_miss  # noqa: E402
from src.lab.fakes.project import compose_search  # noqa: E402

SETTINGS = {"fresh": (2, 1), "early": (3, 4), "mature": (4, 10)}  # runs of the best, dof of the noise floor


def experiment(gain: float, best_runs: int, dof: int, s, retest: bool, rng: random.Random) -> tuple[bool, int]:
    """One experiment of true gain `gain` (in sigmas, sigma = 1): (kept, runs after its screen run)."""
    noise = NoiseFloor(math.sqrt(sum(rng.gauss(0, 1) ** 2 for _ in range(dof)) / dof), dof)
    best = sum(rng.gauss(0, 1) for _ in range(best_runs)) / best_runs
    v = decide(rng.gauss(-gain, 1), best, noise.margin(s.noise_sigmas, s.min_delta))
    diffs: list[float] = []

    def more(n: int) -> None:
        diffs.extend(rng.gauss(-gain, 1) - rng.gauss(0, 1) for _ in range(n))

    def retests() -> bool:  # the session's loop (src/lab/confirm.py _retest): a look after each batch of pairs
        while True:
            more(retest_batch(diffs, noise))
            v, done = retest_look(diffs, noise, s)
            if done:
                return v.keep

    if v.keep:
        if not weak(noise, s.confirm, s.confirm_min_dof):
            return True, 0
        more(s.confirm_pairs if noise.dof >= 2 else max(2, s.confirm_pairs))
        if paired(diffs, noise, s.confirm_alpha, s.min_delta).keep:
            return True, 2 * len(diffs)
        kept = retest and s.retest and sum(diffs) < 0 and len(diffs) < s.retest_pairs and retests()
        return kept, 2 * len(diffs)
    if retest and near_miss(v, s):
        return retests(), 2 * len(diffs)
    return False, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20000, help="experiments per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="search.* overrides of the rule's parameters")
    args = ap.parse_args()
    s = compose_search(list(args.overrides)).search
    t0 = time.time()
    print(f"keep rule: noise_sigmas {s.noise_sigmas}, min_delta {s.min_delta} (sigma = 1 here), confirm_alpha "
          f"{s.confirm_alpha}, confirm_pairs {s.confirm_pairs}; retests: within {s.retest_within} of the margin, up to "
          f"{s.retest_pairs} pairs, alpha {s.retest_alpha}; {args.trials} experiments per cell\n")
    print("| setting | true gain | kept, retests off | kept, retests on | runs per experiment, off / on |")
    print("|---|---|---|---|---|")
    for name, (best_runs, dof) in SETTINGS.items():
        for gain in (0.0, 1.0, 2.0):
            cells = []
            for retest in (False, True):
                rng = random.Random(args.seed)
                got = [experiment(gain, best_runs, dof, s, retest, rng) for _ in range(args.trials)]
                cells.append((sum(k for k, _ in got) / len(got), 1 + sum(r for _, r in got) / len(got)))
            (k0, r0), (k1, r1) = cells
            print(f"| {name} ({best_runs} runs of the best, {dof} dof) | {gain:g} sigma | {k0:.4f} | {k1:.4f} "
                  f"| {r0:.2f} / {r1:.2f} |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
