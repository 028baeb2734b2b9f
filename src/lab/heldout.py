"""The held-out test split: how much of the night's gain holds on data no decision saw.

Every keep, discard and confirmation of a session reads the validation split only; after ~100 such decisions
the kept best is selected for being lucky on that split too. prepare.py writes a test split that no run and no
decision reads (the training process hides it, src/harness/train.py; the scorer reads it only when the lab
starts it for it, src/harness/score_client.py SPLIT_ENV). Once, at the end of a session (and again from
`python -m src.report` when the best changed), the checkpoints of the baseline runs and of the best's runs are
scored on it, with the same checks as any score, each in a fresh scorer process in a detached worktree of the
commit that trained it. The result, heldout.json in the session directory, says "val gain X, test gain Y":
baseline minus best on the same runs, on each split (positive: the best is better).

Agents never see it: it is written after the last proposal, and no prompt or context reads heldout.json.

Usage: result = held_out(session_dir, rows, env=clean_env(os.environ))   # None: nothing to score
       describe(result) -> "val gain 0.4123, test gain 0.3987 (baseline minus best, 2 + 2 runs)"
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from src.harness.score_client import CHECKPOINT, Scorer, eval_spec
from src.harness.status import OK
from src.lab.decisions import BASELINE, CONFIRM, KEEP
from src.lab.ledger import Experiment, Ledger
from src.lab.runner import FROZEN
from src.lab.session import SessionState
from src.lab.standings import Standings

log = logging.getLogger(__name__)

RESULT = "heldout.json"
MAX_RUNS = 2  # checkpoints scored per side (the mean of two runs; each costs a scoring pass on the test split)


def run_checkpoints(runs_dir: Path, rows: list[Experiment], commit: str, baseline: bool,
                    limit: int = MAX_RUNS) -> list[tuple[str, Path, float, Optional[dict]]]:
    """(run name, checkpoint, val_bpb, what its training cost) of up to `limit` finished runs of `commit` whose
    checkpoint is still there: the baseline rows, or the best's own rows (its screen run and confirmation runs, not
    the baseline side of its pairs). Only a run whose summary says it ran that commit counts (a rebased screen run
    did not)."""
    found = []
    for e in rows:
        if e.commit != commit or e.val_bpb is None or not math.isfinite(e.val_bpb):
            continue
        if (e.status == BASELINE) != baseline or e.status not in (BASELINE, KEEP, CONFIRM):
            continue
        if not baseline and e.status == CONFIRM and not e.exp.rsplit("-", 1)[-1].startswith("c"):
            continue  # the b-runs of a confirmation ran the previous best
        for d in sorted([runs_dir / e.exp, *runs_dir.glob(f"{e.exp}-a*")], key=lambda p: p.name, reverse=True):
            try:
                summary = json.loads((d / "summary.json").read_text())
            except (OSError, ValueError):
                continue
            ckpt = d / FROZEN if (d / FROZEN).is_file() else d / CHECKPOINT
            if summary.get("status") == OK and summary.get("git_sha") == commit and ckpt.is_file():
                found.append((d.name, ckpt, float(summary.get("val_bpb", e.val_bpb)), summary.get("train_cost")))
                break
    return found[-limit:]


def _worktree(repo: Path, commit: str):
    """A detached worktree of `commit` (the research code that trained the checkpoints) and its remover."""
    path = Path(tempfile.mkdtemp(prefix="heldout-")) / "tree"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(path), commit], check=True,
                   capture_output=True, text=True)

    def remove() -> None:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path.parent, ignore_errors=True)
    return path, remove


def _score_side(repo: Path, commit: str, runs: list[tuple[str, Path, float, Optional[dict]]], log_dir: Path,
                env: Optional[dict],
                cpus: tuple, spec: Optional[dict] = None) -> list[dict]:
    tree, remove = _worktree(repo, commit)
    out = []
    try:
        for name, ckpt, val, cost in runs:
            t0 = time.monotonic()
            r = Scorer(tree, log_dir / f"test-{name}.log", env, cpus, split="test", spec=spec).start().score(
                ckpt, cost=cost)
            out.append({"run": name, "val_bpb": val, "test_bpb": r.get("val_bpb") if r.get("status") == OK else None,
                        "status": r.get("status"), "reason": r.get("reason", ""),
                        "seconds": round(time.monotonic() - t0, 1)})
            log.info("held-out test split: %s scored %s (%s, %.0f s)", name,
                     f"{r['val_bpb']:.6f}" if r.get("status") == OK else "-", r.get("status"), out[-1]["seconds"])
    finally:
        remove()
    return out


def _mean(xs: list[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def held_out(session_dir: Path, rows: Optional[list[Experiment]] = None, env: Optional[dict] = None,
             cpus: tuple = (), limit: int = MAX_RUNS, force: bool = False) -> Optional[dict]:
    """Score the baseline's and the best's checkpoints on the test split (cached in heldout.json while the
    baseline and best runs are the same); None when there is nothing to score (no checkpoints kept: the tests'
    stand-in runs, search.keep_checkpoints=none, or no finished baseline run)."""
    d = Path(session_dir)
    state = SessionState.from_json((d / "state.json").read_text())
    rows = Ledger(d).rows() if rows is None else rows
    knobs = state.search
    st = Standings.of(rows, state.base_commit, knobs.get("noise_sigmas", 2.0), knobs.get("min_delta", 0.0),
                      knobs.get("baseline_spread", 0.0))
    base = run_checkpoints(d / "runs", rows, state.base_commit, True, limit)
    best = [] if st.best.exp == "baseline" else run_checkpoints(d / "runs", rows, st.best.commit, False, limit)
    if not base:
        return None
    key = {"baseline": [r[0] for r in base], "best": [r[0] for r in best], "best_commit": st.best.commit}
    cached = read(d)
    if cached is not None and not force and cached.get("key") == key:
        return cached
    repo = Path(state.repo)
    spec = eval_spec(state.baseline) if state.baseline else None  # the session's config, not the checkpoints'
    log.info("held-out test split: scoring %d baseline and %d best checkpoint(s) (no decision read it)",
             len(base), len(best))
    sides = {"baseline": {"commit": state.base_commit, "exp": "baseline",
                          "runs": _score_side(repo, state.base_commit, base, d / "runs", env, cpus, spec)}}
    if best:
        sides["best"] = {"commit": st.best.commit, "exp": st.best.exp,
                         "runs": _score_side(repo, st.best.commit, best, d / "runs", env, cpus, spec)}
    else:  # the best is the baseline: no gain on either split
        sides["best"] = dict(sides["baseline"])
    for side in sides.values():
        side["val_bpb"] = _mean([r["val_bpb"] for r in side["runs"]])
        side["test_bpb"] = _mean([r["test_bpb"] for r in side["runs"]])
    b, k = sides["baseline"], sides["best"]
    result = {"key": key, **sides, "scored_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "val_gain": None if None in (b["val_bpb"], k["val_bpb"]) else b["val_bpb"] - k["val_bpb"],
              "test_gain": None if None in (b["test_bpb"], k["test_bpb"]) else b["test_bpb"] - k["test_bpb"]}
    (d / RESULT).write_text(json.dumps(result, indent=2) + "\n")
    return result


def read(session_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(session_dir) / RESULT).read_text())
    except (OSError, ValueError):
        return None


def describe(r: Optional[dict]) -> str:
    """'val gain X, test gain Y (...)', or why there is no test figure."""
    if r is None:
        return "held-out test split not scored (no baseline checkpoint kept)"

    def f(v: Optional[float]) -> str:
        return f"{v:+.4f}" if v is not None else "-"
    n = f"{len(r['baseline']['runs'])} + {len(r['best']['runs'])} runs" if r["best"]["exp"] != "baseline" else \
        f"the best is the baseline, {len(r['baseline']['runs'])} runs"
    return f"val gain {f(r['val_gain'])}, test gain {f(r['test_gain'])} (bpb, baseline minus best; {n})"


def metrics(r: Optional[dict]) -> dict:
    """The figures for the session's MLflow parent run."""
    if r is None:
        return {}
    out = {"heldout/baseline_val_bpb": r["baseline"]["val_bpb"], "heldout/baseline_test_bpb": r["baseline"]["test_bpb"],
           "heldout/best_val_bpb": r["best"]["val_bpb"], "heldout/best_test_bpb": r["best"]["test_bpb"],
           "heldout/val_gain": r["val_gain"], "heldout/test_gain": r["test_gain"]}
    return {k: v for k, v in out.items() if v is not None}
