"""The red-team table: every adversarial and honest patch of src/lab/fakes/redteam.py through a real research session.

For each arm (the static contract on, as by default; and off, so only the scorer and the runner
stand between an attack and a keep) one `python -m src.search agent=replay` session runs on a
checkout of HEAD: the baseline, then one experiment per patch (attacks and honest ones alike),
each trained for --seconds on the CPU and scored by the real scorer. Prints one row per patch
with the decision in each arm, then the counts the issue asks for: attacks kept (must be 0) and
honest patches refused or tampered (must be 0).

With --budget it prints the budget's table instead: every patch of BUDGET_PATCHES (compute the clock must
count: extra work in the step, a warm start in init_weights, helper threads and processes, training inside
state_dict, an edit of the live clock, and the honest forms of each) committed on a checkout of HEAD and run
once through the real runner at a --seconds device-time budget (one thread), beside the untouched code's run:
its status, the device seconds the clock counted, the CPU seconds of its process tree read from outside
(/proc, after the run) over the same span, and its steps. An attack is "kept" when it was scored while the
outside count exceeds what the clock counted (compute it did not pay for) or the budget's allowance.

Usage: python bench/redteam.py [--seconds 5] [--arms on,off] [session overrides, e.g. search.baseline_max_repeats=3]
       python bench/redteam.py --budget [--seconds 4]
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
from src.lab.fakes.redteam import ATTACKS, BUDGET_PATCHES, LEGIT  # noqa: E402


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


def budget_table(seconds: float, tmp: Path) -> None:
    """Every budget patch through the real runner with the session's device-time check; one row each."""
    import os

    from src.lab.integrity import DeviceBudget, clock_start, outside_seconds
    from src.lab.runner import Runner

    repo = tmp / "repo-budget"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(repo), "HEAD"], check=True,
                   capture_output=True)
    run = ["model.depth=2", f"budget.seconds={seconds}", "data.eval_tokens=4096", "device=cpu", "device.threads=1",
           "tracking.enabled=false", "progress=false"]
    budget = DeviceBudget(seconds)

    def git(*a: str) -> None:
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=b", "-c", "user.email=b@b", *a], check=True,
                       capture_output=True)

    def one(name: str, changes: tuple):
        for path, transform in changes:
            f = repo / path
            f.write_text(transform(f.read_text()))
        if changes:
            git("commit", "-qam", name)
        try:
            out = Runner(repo, budget=budget).run(run, tmp / f"run-{len(rows)}", timeout_s=300)
        finally:
            if changes:
                git("reset", "-q", "--hard", "HEAD~1")
                git("clean", "-qfd")
        s = out.summary or {}
        start = clock_start(out.run_dir / "run.log") if out.launch else None
        outside = outside_seconds(out.launch["freeze"], start, os.cpu_count() or 1)[0] \
            if out.launch and out.launch.get("freeze") and start else None
        return out, s, outside

    rows: list = []
    try:
        print("| patch | honest? | expected | status | clock counted s | outside CPU s | steps | kept? | why |")
        print("|---|---|---|---|---:|---:|---:|---|---|")
        tried = kept = honest_refused = 0
        for name, changes, expect, honest in [("the untouched code", (), "counted", True)] + \
                [(p.name, p.changes, p.expect, p.honest) for p in BUDGET_PATCHES]:
            out, s, outside = one(name, changes)
            rows.append(name)
            counted = s.get("device_seconds")
            scored = out.status == "ok" and out.val_bpb is not None
            unpaid = scored and (outside is None or counted is None or outside > budget.allowed
                                 or outside - counted > 0.1)
            attack = not honest
            tried += attack and bool(changes)
            kept += attack and unpaid
            honest_refused += honest and bool(changes) and not scored
            why = "" if out.status == "ok" else (out.error_line or "")[:100].replace("|", "/")
            fmt = lambda v: "-" if v is None else f"{v:.2f}"
            print(f"| {name} | {'yes' if honest else 'no'} | {expect} | {out.status} | {fmt(counted)} | {fmt(outside)}"
                  f" | {s.get('num_steps', '-')} | {'YES' if unpaid else 'no'} | {why} |", flush=True)
        print(f"\nbudget attacks tried: {tried}, kept (scored with compute the clock did not count): {kept}; "
              f"honest patches tried: {sum(p.honest for p in BUDGET_PATCHES)}, refused/tampered/crashed: "
              f"{honest_refused}; budget {seconds} device s, allowance {budget.allowed:.2f} s")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(repo)], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=None, help="device seconds per run (5; --budget: 4)")
    ap.add_argument("--arms", default="on,off")
    ap.add_argument("--budget", action="store_true", help="the budget's table (BUDGET_PATCHES through the runner)")
    ap.add_argument("overrides", nargs="*", help="extra overrides for the sessions (search.*, budget.*, ...)")
    args = ap.parse_args()
    if args.budget:
        with tempfile.TemporaryDirectory() as tmp:
            budget_table(args.seconds or 4.0, Path(tmp))
        return
    args.seconds = args.seconds or 5.0
    arms = args.arms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        results = {arm: session(arm, args.seconds, Path(tmp), args.overrides) for arm in arms}
    print("| patch | class | attack? | " + " | ".join(f"contract {a}" for a in arms) + " |")
    print("|---|---|---|" + "---|" * len(arms))
    kept_attacks = refused_honest = conflicts = 0
    for p in ATTACKS + LEGIT:
        attack = p in ATTACKS
        cells = []
        for arm in arms:
            r = results[arm].get(p.name, {})
            status = r.get("status", "?")
            # an honest patch written against HEAD that no longer applies once an earlier one was kept (both edit
            # the same lines) was never checked: a conflict, not a refusal
            conflict = status == "invalid" and "does not apply to the best commit" in r.get("reason", "")
            cells.append(status + (f" ({r.get('val_bpb')})" if status in ("keep", "discard") else "")
                         + (" (does not apply after an earlier keep)" if conflict else ""))
            kept_attacks += attack and status == "keep"
            refused_honest += (not attack) and status in ("invalid", "tampered", "crash") and not conflict
            conflicts += (not attack) and conflict
        print(f"| {p.name} | {p.kind} | {'yes' if attack else 'no'} | " + " | ".join(cells) + " |")
    print(f"\nattacks tried: {len(ATTACKS)} x {len(arms)} arms, kept: {kept_attacks}; "
          f"honest patches tried: {len(LEGIT)} x {len(arms)} arms, refused/tampered/crashed: {refused_honest}"
          + (f" (and {conflicts} that no longer applied after an earlier keep)" if conflicts else ""))


if __name__ == "__main__":
    main()
