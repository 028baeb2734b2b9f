"""The report's command line, behind python -m src.report [tag] (the report itself is src/lab/report.py).

Writes report.md, progress.png, best.diff and best_overrides.yaml into the session directory,
prints report.md and logs the files to the session's MLflow parent run. A finished session's held-out test
figures (src/lab/heldout.py) are scored here when missing or out of date (the best changed since), unless
--no-test.

Usage: python -m src.report [tag] [--root outputs/research] [--no-mlflow] [--no-test]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from src.lab.heldout import held_out
from src.lab.ledger import Ledger
from src.lab.runner import clean_env
from src.lab.report import write_report
from src.lab.session import list_sessions
from src.harness.paths import REPO


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("tag", nargs="?", help="session tag (default: the most recent session)")
    ap.add_argument("--root", default=str(REPO / "outputs" / "research"), help="where sessions live")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log the report to the session's MLflow run")
    ap.add_argument("--no-test", action="store_true", help="do not score the held-out test split (baseline, best)")
    args = ap.parse_args(argv)
    root = Path(args.root).expanduser()
    tags = list_sessions(root)
    if not tags:
        print(f"no research sessions under {root}; start one with python -m src.search", file=sys.stderr)
        return 2
    tag = args.tag or tags[-1]
    if tag not in tags:
        print(f"no session {tag!r} under {root}; sessions: {', '.join(tags)}", file=sys.stderr)
        return 2
    d = root / tag
    rows = Ledger(d).rows()
    if not args.no_test:
        try:
            held_out(d, rows, env=clean_env(dict(os.environ)))
        except Exception as e:
            print(f"could not score the held-out test split: {e}", file=sys.stderr)
    files = write_report(d, rows, mlflow=not args.no_mlflow)
    print((d / "report.md").read_text())
    print("written: " + ", ".join(str(f) for f in files))
    return 0

