"""The red-team table: every adversarial and honest patch of src/lab/fakes/redteam.py through a real research session.

For each arm (the static contract on, as by default; and off, so only the scorer and the runner
stand between an attack and a keep) one `python -m src.search agent=replay` session runs on a
checkout of HEAD: the baseline, then one experiment per patch (attacks and honest ones alike),
each trained for --seconds on the CPU and scored by the real scorer. Prints one row per patch
with the decision in each arm, then the counts the issue asks for: attacks kept (must be 0) and
honest patches refused or tampered (must be 0).

Usage: python bench/redteam.py [--seconds 5] [--arms on,off] [session overrides, e.g. search.baseline_max_repeats=3]
"""
from __future__ import annotations

import argparse
import csv
import difflib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from src.lab.fakes.redteam import ATTACKS, LEGIT  # noqa: E402


def unified(repo: Path, p) -> str:
    old = (repo / p.path).read_text()
    lines = difflib.unified_diff(old.splitlines(keepends=True), p.transform(old).splitlines(keepends=True),
                                 fromfile=f"a/{p.path}", tofile=f"b/{p.path}")
    return "".join(lines)


def session(arm: str, seconds: float, tmp: Path, extra: list[str]) -> dict[str, dict]:
    """Run one replay session over every patch; the ledger rows by description."""
    repo, tag = tmp / f"repo-{arm}", f"redteam-{arm}-{int(time.time())}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(repo), "HEAD"], check=True,
                   capture_output=True)
    try:
        patches = ATTACKS + LEGIT
        proposals = [{"description": p.name, "hypothesis": p.kind, "patch": unified(repo, p)} for p in patches]
        (tmp / f"proposals-{arm}.yaml").write_text(yaml.safe_dump(proposals, sort_keys=False))
        args = [sys.executable, "-m", "src.search", "agent=replay", f"agent.file={tmp / f'proposals-{arm}.yaml'}",
                "device=cpu", f"budget.seconds={seconds}", "data.eval_tokens=65536", f"search.tag={tag}",
                f"search.max_experiments={len(patches)}", f"search.max_invalid_in_row={len(patches) + 1}",
                f"search.contract.enabled={'true' if arm == 'on' else 'false'}", "tracking.enabled=false",
                "search.progress=false", f"hydra.run.dir={tmp / f'hydra-{arm}'}", *extra]
        proc = subprocess.run(args, cwd=repo, capture_output=True, text=True)
        ledger = repo / "outputs" / "research" / tag / "results.tsv"
        if not ledger.exists():
            sys.exit(f"session {arm} wrote no ledger ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(ledger, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return {r["description"]: r for r in rows if r["kind"] != "baseline"}
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(repo)], capture_output=True)
        # the session's own worktree (inside the one just removed) holds its branch until pruned
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)
        subprocess.run(["git", "-C", str(REPO), "branch", "-D", f"research/{tag}"], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--arms", default="on,off")
    ap.add_argument("overrides", nargs="*", help="extra overrides for the sessions (search.*, budget.*, ...)")
    args = ap.parse_args()
    arms = args.arms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        results = {arm: session(arm, args.seconds, Path(tmp), args.overrides) for arm in arms}
    print("| patch | class | attack? | " + " | ".join(f"contract {a}" for a in arms) + " |")
    print("|---|---|---|" + "---|" * len(arms))
    kept_attacks = refused_honest = 0
    for p in ATTACKS + LEGIT:
        attack = p in ATTACKS
        cells = []
        for arm in arms:
            r = results[arm].get(p.name, {})
            status = r.get("status", "?")
            cells.append(status + (f" ({r.get('val_bpb')})" if status in ("keep", "discard") else ""))
            kept_attacks += attack and status == "keep"
            refused_honest += (not attack) and status in ("invalid", "tampered", "crash")
        print(f"| {p.name} | {p.kind} | {'yes' if attack else 'no'} | " + " | ".join(cells) + " |")
    print(f"\nattacks tried: {len(ATTACKS)} x {len(arms)} arms, kept: {kept_attacks}; "
          f"honest patches tried: {len(LEGIT)} x {len(arms)} arms, refused/tampered/crashed: {refused_honest}")


if __name__ == "__main__":
    main()
