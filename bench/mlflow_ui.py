"""The MLflow UI as a researcher opens it in the morning, checked in a real headless browser.

Serves a session's MLflow store (`mlflow server`, 127.0.0.1, a free port), opens the link the session printed
(the runs table in the session's shared view, src/lab/runs.py) in headless Chromium, and checks what the
rendered page shows without a click: the runs table (not the GenAI overview), the val_bpb, delta and status
columns, every ledger row's run by name, flat (not folded under the parent), and the parent's held-out gains.
Saves a screenshot and the rendered DOM under outputs/bench/mlflow_ui/ and prints a table of the checks.

Needs Chromium (Debian: apt-get install chromium). Exit status 1 when a check fails.

Usage: python bench/mlflow_ui.py                                  # the newest session of mlruns/mlflow.db
       python bench/mlflow_ui.py --tag nov26 --store /path/to/mlflow.db --root outputs/research
       python bench/mlflow_ui.py --view readme                          # the README's link: every session's runs
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.lab.runs import SessionRuns, view_key  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no Chromium found: install it (Debian: apt-get install chromium) and run again")


def browse(browser: str, url: str, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url`, given 25 s of virtual time to fetch the runs and render the table."""
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=2000,900", "--virtual-time-budget=25000", *args, url],
                          capture_output=True, text=True, timeout=180)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=str(REPO / "mlruns" / "mlflow.db"), help="the session's sqlite store")
    ap.add_argument("--root", default=str(REPO / "outputs" / "research"), help="where the sessions live")
    ap.add_argument("--tag", help="the session (default: the newest under --root)")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "mlflow_ui"))
    ap.add_argument("--view", choices=("session", "readme"), default="session",
                    help="the link the session printed (its runs), or the README's (every session's runs)")
    args = ap.parse_args()
    root = Path(args.root)
    tags = sorted((p for p in root.iterdir() if (p / "state.json").exists()), key=lambda p: p.stat().st_mtime)
    d = root / args.tag if args.tag else tags[-1]
    state = json.loads((d / "state.json").read_text())
    with open(d / "results.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    uri = f"sqlite:///{Path(args.store).resolve()}"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        runs = SessionRuns(uri, state.get("tracking_experiment") or "overnight")
        link = runs.ui_link(state["tag"])
        if args.view == "readme":
            link = link.replace(f"={view_key(state['tag'])}", f"={view_key()}")
        link = re.sub(r"^https?://[^/#]+", base, link)  # the printed link, on the port served here
        browser = chromium()
        shot = out / f"{state['tag']}-{args.view}.png"
        browse(browser, link, f"--screenshot={shot}")
        dom = browse(browser, link, "--dump-dom").stdout
        (out / f"{state['tag']}-{args.view}.html").write_text(dom)
    finally:
        server.terminate()
        server.wait(30)
    text = re.sub(r"<[^>]+>", " ", dom)
    names = [r["exp"] for r in rows]
    checks = [
        ("the page is the runs table, in the shared view", "Training runs" in text and "shared view" in text),
        ("val_bpb column shown", "search/val_bpb" in text),
        ("delta column shown", "search/delta" in text),
        ("status column shown (search.status)", "search.status" in text),
        ("description column shown (search.description)", "search.description" in text),
        ("held-out gain columns shown", "heldout/test_gain" in text and "heldout/val_gain" in text),
        (f"every ledger row's run listed without a click ({len(names)})", all(f">{n}<" in dom for n in names)),
        ("the session's parent run listed", f"research/{state['tag']}" in text),
        ("every row's status shown", all(f">{r['status']}<" in dom for r in rows)),
    ]
    print(f"session {state['tag']}: {link}\n")
    print(f"| {'check':60s} | result |")
    print(f"|{'-' * 62}|--------|")
    for what, ok in checks:
        print(f"| {what:60s} | {'ok' if ok else 'FAILED':6s} |")
    print(f"\nscreenshot: {shot}\nrendered DOM: {out / (state['tag'] + '-' + args.view + '.html')}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
