"""What a night of agent=claude costs, and that it never idles: sessions against the local Messages API server.

Each scenario is a real research session (src/lab/loop.py, a throwaway git copy of the project, the
stand-in train script src/lab/fakes/train.py) with Claude played by src/lab/fakes/scripted_researcher.py:
every reply has a thinking block of ~3,600 characters and a proposal of ~600 (about 1,050 output tokens
by the server's count of ~4 characters per token). The server's clock advances by the length of one
run per answered request, so the prompt cache ages as in a real night; its usage accounting is what
the cost figures rest on (agent.prices: claude-sonnet-4-6 at $3 / $15 per million input / output
tokens, cache writes 1.25x (5m) or 2x (1h) input, reads 0.1x). Default agent options throughout.

Scenarios:
  night-5m   100 experiments, the default 120-s budget, 2.5 minutes between requests: 5-minute cache
  night-1h   100 experiments, budget.seconds=300, 5.5 minutes between requests: agent.cache_ttl=auto picks 1h
  night-1h-as-5m   the same night with agent.cache_ttl=5m forced: what the 1-hour lifetime saves
  outage     from the 9th request the server fails every request for --outage-s seconds: the fallback (tpe)
             proposes, Claude takes over again when the API answers (asked every --probe-s, doubling once)
  refusal    three refusals in a row on one turn: rephrased, dropped, then the fallback; the session goes on

Usage: python bench/claude_night.py                       # every scenario (~15 minutes on two cores)
       python bench/claude_night.py --scenarios night-5m --experiments 100
       python bench/claude_night.py --scenarios outage --outage-s 180 --probe-s 60   # a real-length outage
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from src.lab.fakes.scripted_researcher import ScriptedResearcher, cost_table, run_night  # noqa: E402

SCENARIOS = ("night-5m", "night-1h", "night-1h-as-5m", "outage", "refusal")


def timeline(rows: list[dict]) -> str:
    """Who proposed each experiment, in order: c = claude, t = tpe (the fallback)."""
    return "".join((r.get("agent") or "?")[0] for r in rows if r["exp"].count("-") == 1 and r["exp"].startswith("exp"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--experiments", type=int, default=100, help="per night scenario")
    ap.add_argument("--drill-experiments", type=int, default=40, help="per outage / refusal drill")
    ap.add_argument("--outage-s", type=float, default=15.0, help="real seconds the server fails every request "
                                                                 "(the stand-in runs take ~1 s: a 15-s outage spans many)")
    ap.add_argument("--probe-s", type=float, default=2.0, help="agent.probe_s during the outage drill")
    ap.add_argument("--tracking", action="store_true", help="log to MLflow too (slower; the costs are the same)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # the sessions log INFO to their search.log
    root = Path(tempfile.mkdtemp(prefix="claude-night-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")  # the data: your usual cache
    print(f"# agent=claude against the local Messages API (src/lab/fakes/messages_server.py); sessions under {root}\n")
    for name in args.scenarios:
        tmp = root / name
        tmp.mkdir()
        kw = dict(tracking=args.tracking)
        if name == "night-5m":
            out = run_night(tmp, args.experiments, seconds_per_run=150, budget_seconds=120, **kw)
        elif name == "night-1h":
            out = run_night(tmp, args.experiments, seconds_per_run=330, budget_seconds=300, **kw)
        elif name == "night-1h-as-5m":
            out = run_night(tmp, args.experiments, seconds_per_run=330, budget_seconds=300,
                            agent=("agent.cache_ttl=5m",), **kw)
        elif name == "outage":
            out = run_night(tmp, args.drill_experiments, outage=(8, args.outage_s),
                            agent=(f"agent.probe_s={args.probe_s}", f"agent.probe_max_s={2 * args.probe_s}",
                                   "agent.patience_s=2", "agent.retry_wait_s=0.2"), **kw)
        else:
            out = run_night(tmp, args.drill_experiments, researcher=ScriptedResearcher(refuse=(5, 6, 7)),
                            agent=("agent.probe_s=0",), **kw)
        print(cost_table(name, out))
        print(f"who proposed each experiment (c = claude, t = tpe fallback): {timeline(out['rows'])}")
        failed = sum(1 for r in out["requests"] if r["path"] == "/v1/messages" and r["status"] != 200)
        print(f"messages requests: {out['server']['requests']} answered, {failed} failed; "
              f"stop: {out['summary']['stop_reason']}\n", flush=True)


if __name__ == "__main__":
    main()
