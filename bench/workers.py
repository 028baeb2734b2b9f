"""search.workers=2 vs search.workers=1 on the same replay proposals: experiments per hour, side by side.

Two real sessions (`python -m src.search agent=replay|tpe`, real training, device=cpu device.threads=1) in a
throwaway clone of this checkout's HEAD, both logging to one `mlflow server` (sqlite backend) started
here on 127.0.0.1, run one after the other: the same N proposals, with the defaults (confirmation on:
each would-be keep is confirmed by paired runs, which the 2-worker session runs side by side). The
headline is the whole session's wall time, baselines and confirmations included (`wall s`, `ratio`);
`--no-confirm` gives the older measure, confirmation off (both sessions then run exactly the same N
experiments), over the experiments only: from the end of the last baseline row to the last
experiment's finish, as the ledger records them (`exp/hour`). The table also checks what must
agree row for row: the ledger holds each proposal once (nothing lost, nothing run twice), every row
has one MLflow child under the session's one parent, the branch has one commit per keep and its tip
is the best; and where the 2-worker session's worker time went (workers.json).

Two sets of proposals:
- replay (the default): the hand-written list below, lr / schedule / shape variations of the CPU
  default at threads=1, half of which are keeps: a keep-heavy night, where keeps that finish
  together must be rebased and re-run (a cost only the 2-worker session pays);
- tpe: `agent=tpe agent.seed=0 agent.n_startup_trials=N` over search_space=cpu, i.e. the same N
  seeded random points in both sessions (Optuna's start-up trials do not depend on what it is told).

Run it on a quiet machine (nothing else on the cores):
    python bench/workers.py --agent tpe --proposals 12     # 12 seeded TPE proposals, 30-s runs (about an hour)
    python bench/workers.py --proposals 6 --seconds 8      # the six-proposal learning-rate list, 8-s runs
    python bench/workers.py --no-confirm                   # confirmation off: experiments per hour
Must show: whole-session wall time workers=1 / workers=2 >= 1.7 (12 TPE proposals, 30-s runs, the defaults).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from sessions import REPO, clone, outcome, run_search, table

# lr / schedule / shape variations around the CPU default: most discard, some keep; each a real run
PROPOSALS = [
    {"description": "matrix lr 0.03", "overrides": ["optimizer.matrix_lr=0.03"]},
    {"description": "matrix lr 0.06", "overrides": ["optimizer.matrix_lr=0.06"]},
    {"description": "warmdown 0.4", "overrides": ["optimizer.warmdown_ratio=0.4"]},
    {"description": "embedding lr 0.3", "overrides": ["optimizer.embedding_lr=0.3"]},
    {"description": "batch 4096", "overrides": ["batch.total_tokens=4096", "batch.device_tokens=4096"]},
    {"description": "unembedding lr 0.008", "overrides": ["optimizer.unembedding_lr=0.008"]},
    {"description": "weight decay 0.1", "overrides": ["optimizer.weight_decay=0.1"]},
    {"description": "matrix lr 0.05", "overrides": ["optimizer.matrix_lr=0.05"]},
    {"description": "warmdown 0.3", "overrides": ["optimizer.warmdown_ratio=0.3"]},
    {"description": "scalar lr 0.3", "overrides": ["optimizer.scalar_lr=0.3"]},
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=open(root / "mlflow-server.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200:
                return proc, uri
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow server did not start; see {root / 'mlflow-server.log'}")


# what each run's summary.json says about where its process time went (the train process; scoring is the scorer's)
PHASES = ("startup_seconds", "warmup_seconds", "training_seconds", "score_seconds", "process_seconds", "tokens_per_sec")


def ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def measure(repo: Path, tag: str, uri: str, n: int) -> dict:
    from mlflow.tracking import MlflowClient

    o = outcome(repo, tag)
    d = repo / "outputs" / "research" / tag
    state = json.loads((d / "state.json").read_text())
    exps = [e for e in o.rows if e.is_experiment]
    base_end = max(ts(e.finished) for e in o.rows if e.exp.startswith("base-"))
    end = max(ts(e.finished) for e in exps)
    window = end - base_end
    c = MlflowClient(uri)
    exp_ids = [x.experiment_id for x in c.search_experiments()]
    children = c.search_runs(exp_ids, filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'",
                             max_results=5000)
    tagged = sorted(r.data.tags.get("search.exp", "?") for r in children)
    keeps = [e for e in o.rows if e.status == "keep"]
    branch = f"research/{tag}"
    commits = subprocess.run(["git", "rev-list", "--count", f"{state['base_commit']}..{branch}"], cwd=repo,
                             capture_output=True, text=True).stdout.strip()
    tip = subprocess.run(["git", "rev-parse", branch], cwd=repo, capture_output=True, text=True).stdout.strip()
    ids = [e.exp for e in exps]
    u = json.loads((d / "workers.json").read_text()) if (d / "workers.json").exists() else {}
    runs = [json.loads(f.read_text()) for f in sorted((d / "runs").glob("*/summary.json"))
            if not f.parent.name.startswith("base-")]
    phases = {k: statistics.median(float(r.get(k) or 0) for r in runs) if runs else float("nan") for k in PHASES}
    return {"tag": tag, "experiments": len(exps), "window_s": window, "per_hour": len(exps) / (window / 3600),
            "lost": n - len(set(ids)), "twice": len(ids) - len(set(ids)),
            "mlflow_agrees": tagged == sorted(e.exp for e in o.rows),
            "branch_agrees": commits == str(len(keeps)) and tip == o.standings.best.commit,
            "kept": len(keeps), "best": o.standings.best.val_bpb, "statuses": o.statuses,
            "training_share": u.get("training"), "idle_share": u.get("idle"), "runs": len(runs),
            "ledger_runs": sum(1 for e in o.rows if e.status != "invalid"),
            "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proposals", type=int, default=8, help="proposals per session (6 or more)")
    ap.add_argument("--agent", choices=("replay", "tpe"), default="replay",
                    help="replay: the list in this file; tpe: TPE's seeded start-up points (the same in both sessions)")
    ap.add_argument("--seconds", type=float, default=30, help="budget.seconds of each run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--no-confirm", action="store_true", help="search.confirm=false (default: the session's own "
                    "default, on while the noise estimate is weak)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    repo = clone(root)
    if not 6 <= a.proposals <= (len(PROPOSALS) if a.agent == "replay" else 100):
        raise SystemExit(f"--proposals: 6 to {len(PROPOSALS)} (replay)")
    import yaml

    pfile = root / "proposals.yaml"
    pfile.write_text(yaml.safe_dump(PROPOSALS[: a.proposals]))
    agent = [f"agent.file={pfile}"] if a.agent == "replay" else \
        ["agent.seed=0", f"agent.n_startup_trials={a.proposals}", "search_space=cpu"]
    server, uri = start_server(root)
    results = []
    try:
        for workers in (1, 2):
            tag = f"w{workers}"
            args = [f"agent={a.agent}", *agent, "device=cpu", "device.threads=1",
                    f"budget.seconds={a.seconds:g}", f"search.tag={tag}", f"search.workers={workers}",
                    *(["search.confirm=false"] if a.no_confirm else []), f"search.max_experiments={a.proposals}",
                    f"tracking.uri={uri}"]
            env_log = root / f"{tag}.log"
            t0 = time.time()
            rc = run_search(repo, args, env_log)
            wall = time.time() - t0
            print(f"{tag}: exit {rc} after {wall:.0f} s (log {env_log})", flush=True)
            results.append({**measure(repo, tag, uri, a.proposals), "wall_s": wall})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
    w1, w2 = results
    rows = [[r["tag"][1:], r["experiments"], r["ledger_runs"], f"{r['wall_s']:.0f}", f"{w1['wall_s'] / r['wall_s']:.2f}",
             f"{r['window_s']:.0f}", f"{r['per_hour']:.1f}",
             f"{r['per_hour'] / w1['per_hour']:.2f}", r["lost"], r["twice"], "yes" if r["mlflow_agrees"] else "NO",
             "yes" if r["branch_agrees"] else "NO", r["kept"], f"{r['best']:.4f}",
             "-" if r["training_share"] is None else f"{100 * r['training_share']:.0f}%",
             "-" if r["idle_share"] is None else f"{100 * r['idle_share']:.0f}%"] for r in results]
    print(f"\n{a.proposals} {a.agent} proposals, budget.seconds={a.seconds:g}, device=cpu device.threads=1, "
          f"{'search.confirm=false' if a.no_confirm else 'confirmation as by default'}; one mlflow server (sqlite) at "
          f"{uri}; {os.cpu_count()} CPUs\n")
    print(table(["workers", "experiments", "runs", "wall s", "wall ratio", "window s", "exp/hour", "ratio", "lost",
                 "run twice", "MLflow agrees",
                 "branch agrees", "kept", "best val_bpb", "training", "idle"], rows))
    print("\nper run (medians over the experiments' runs, re-runs included; seconds):\n")
    print(table(["workers", "runs", *PHASES], [[r["tag"][1:], r["runs"], *(
        f"{r['phases'][k]:,.0f}" if k == "tokens_per_sec" else f"{r['phases'][k]:.1f}" for k in PHASES)]
        for r in results]))
    print(f"\nwhole-session wall time workers=1 / workers=2: {w1['wall_s'] / w2['wall_s']:.2f} (must be >= 1.7 for 12 "
          f"TPE proposals at 30-s runs); experiments per hour after the baselines: "
          f"{w2['per_hour'] / w1['per_hour']:.2f}")
    for r in results:
        print(f"  {r['tag']}: {r['statuses']}")
    if not a.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"kept: {root}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
