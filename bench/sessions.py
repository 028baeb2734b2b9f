"""Helpers for the research-session benchmarks (bench/disturbance_drill.py, bench/false_keeps.py).

A benchmark runs real sessions (`python -m src.search`) in a throwaway clone of this checkout's
HEAD, so its branches, worktrees and MLflow store never touch the project's, and reads back what
the session itself computed (src/lab/standings.py), so the table shows the facts the verdicts used.

Usage (from a bench script): from sessions import clone, run_search, outcome, table
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def clone(dest: Path) -> Path:
    """A fresh clone of this checkout's HEAD (committed code only) at dest/repo."""
    repo = dest / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(repo)], check=True)
    return repo


def run_search(repo: Path, args: list[str], log: Path, watch: Optional[Callable[[], None]] = None) -> int:
    """`python -m src.search <args>` in the clone, output to `log`; watch() is called every 0.5 s while it runs."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "src.search", "search.progress=false", *args], cwd=repo,
                                stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if watch is not None:
                watch()
            time.sleep(0.5)
    return proc.returncode


@dataclass
class Outcome:
    tag: str
    rows: list = field(default_factory=list)  # src.lab.ledger.Experiment
    standings: object = None  # src.lab.standings.Standings
    knobs: dict = field(default_factory=dict)  # the session's search.* knobs (state.json)

    @property
    def statuses(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.standings.by_status.items()))

    @property
    def kept(self) -> list:
        return [e for e in self.rows if e.status == "keep"]

    @property
    def runs(self) -> int:
        """Training runs behind the ledger: every row with a run, plus the attempts that were re-run."""
        return sum(e.attempts or 0 for e in self.rows if e.status not in ("invalid",))


def outcome(repo: Path, tag: str) -> Outcome:
    from src.lab.ledger import Ledger
    from src.lab.standings import Standings

    d = repo / "outputs" / "research" / tag
    state = json.loads((d / "state.json").read_text())
    k = state["search"]
    rows = Ledger(d).rows()
    st = Standings.of(rows, state["base_commit"], k["noise_sigmas"], k["min_delta"], k.get("baseline_spread", 0.0))
    return Outcome(tag, rows, st, k)


def table(header: list[str], rows: list[list]) -> str:
    """A plain text table, columns as wide as their widest cell."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


RULE_KNOBS = ("baseline_repeats", "baseline_max_repeats", "baseline_spread", "noise_sigmas", "min_delta", "confirm",
              "confirm_min_dof", "confirm_pairs", "confirm_alpha", "disturbed_factor", "disturbed_factor_new_shape",
              "disturbed_retries")


def rule(knobs: dict) -> str:
    return " ".join(f"{k}={knobs.get(k)}" for k in RULE_KNOBS)


def worktree(commit: str, where: Path) -> Path:
    """`commit` checked out (detached) as a git worktree at `where`; `.` is this checkout as it stands."""
    if commit == ".":
        return REPO
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), commit], check=True,
                   capture_output=True)
    return where


def timed_train(cwd: Path, args: list[str], out: Path, env: dict | None = None) -> dict:
    """`python -m src.train <args> hydra.run.dir=<out>` in `cwd` (with `env` added to the environment): its summary,
    plus the whole process's wall seconds (`wall`), exit code and output tail (no summary: the status says so)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "src.train", *args, f"hydra.run.dir={out}"], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    try:
        s = json.loads((Path(out) / "summary.json").read_text())
    except (OSError, ValueError):
        s = {"status": f"no summary (exit {proc.returncode})", "val_bpb": float("nan")}
    s.update(wall=time.perf_counter() - t0, returncode=proc.returncode, output_tail=(proc.stdout + proc.stderr)[-3000:])
    return s
