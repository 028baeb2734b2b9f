"""The night's yardstick: what a session of k experiments finds, per agent, per hour.

For each configuration (an agent and its settings) and each seed, runs one real research session
(`python -m src.search`, real training and scoring, in a throwaway clone of this checkout's HEAD) of k
experiments on the same setup (by default the CPU 30-s one), `--parallel` sessions at a time (each on its own
core: device.threads=1; sessions side by side share the machine's conditions). Claude is played by the
scripted researcher (src/lab/fakes/scripted_researcher.py) behind a local Messages API server: no key, no
network. Prints per configuration, median and range over seeds:
- decided experiments per hour (keeps + discards) and the session's wall time
- the device-time share of training (counted training seconds of every run / the session's wall seconds)
- training runs and counted device seconds per decided experiment (baselines and confirmation runs included; a
  pruned experiment is decided)
- the best val_bpb after k experiments and the gain against the session's own baseline
- the held-out test gain (src/lab/heldout.py): how much of the gain holds on data no decision saw
and writes table.md, results.json and best_after_k.png (the running best against the experiment count) under
outputs/bench/research/<stamp>/.

Configurations: tpe, random, cmaes, replay (a learning-rate list), scripted (the scripted researcher as
agent=claude), hybrid (agent=hybrid with the scripted researcher on 30% of the turns), tpe+prune, tpe-bare / tpe+both
(TPE with pruning and near-miss retests both off / both on), and known / known+prune: twelve proposals of known fate
(real gains and clearly bad ones) without and with search.prune (retests off in both); for
each X+prune beside X the table says which runs pruning stopped, which of them X kept (real gains lost) and the
device seconds per decided experiment. Add your own with --config 'name=agent=tpe search.confirm=false ...'.

Usage: python bench/research.py                                  # hybrid, tpe, scripted; 3 seeds; k=10; 30-s runs
       python bench/research.py --configs tpe random --seeds 0 1 --k 10 --budget 30 --parallel 2
       python bench/research.py --configs hybrid --config 'hybrid50=agent=hybrid agent.claude_share=0.5'
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sessions import REPO, clone, outcome, table  # noqa: E402

from src.lab.fakes.messages_server import MessagesServer  # noqa: E402
from src.lab.fakes.scripted_researcher import KEY, ScriptedResearcher  # noqa: E402

LR_LIST = [0.05, 0.03, 0.06, 0.025, 0.08, 0.035, 0.045, 0.07, 0.02, 0.1]
# proposals whose fate at 30-s CPU runs is known from sessions without pruning: real gains among them (the smaller
# batch, the learning rates near the CPU optimum) and clearly bad ones (a tiny or huge LR, a far deeper model)
KNOWN = [
    (["batch.total_tokens=4096", "batch.device_tokens=4096"], "the batch-4,096 change: twice the steps"),
    (["optimizer.matrix_lr=0.005"], "a far too low Muon LR"),
    (["optimizer.matrix_lr=0.06"], "a higher Muon LR"),
    (["optimizer.embedding_lr=0.05"], "a far too low embedding LR"),
    (["optimizer.matrix_lr=0.08"], "a higher Muon LR again"),
    (["model.depth=12"], "three times deeper: far fewer steps in the budget"),
    (["optimizer.warmdown_ratio=0.3"], "a shorter warmdown"),
    (["optimizer.matrix_lr=0.5"], "a far too high Muon LR"),
    (["optimizer.unembedding_lr=0.008"], "a faster unembedding"),
    (["optimizer.embedding_lr=0.02"], "an even lower embedding LR"),
    (["batch.total_tokens=2048", "batch.device_tokens=2048"], "four times the steps"),
    (["optimizer.unembedding_lr=0.0002"], "a far too low unembedding LR"),
]
CONFIGS = {
    "tpe": ["agent=tpe"],
    "random": ["agent=random"],
    "cmaes": ["agent=tpe", "agent.sampler=cmaes"],
    "replay": ["agent=replay"],  # agent.file: the learning-rate list, written per session
    "scripted": ["agent=claude", "agent.fallback=tpe"],  # Claude alone (the scripted researcher)
    "hybrid": ["agent=hybrid"],  # the tuner (TPE) and the scripted researcher on 30% of the turns
    "tpe+prune": ["agent=tpe", "search.prune=true"],
    "tpe-bare": ["agent=tpe", "search.prune=false", "search.retest=false"],  # TPE without pruning and retests ...
    "tpe+both": ["agent=tpe", "search.prune=true", "search.retest=true"],  # ... and with both
    # the proposals of known fate, pruning off and on (retests off in both): what it kills, what it saves
    "known": ["agent=replay", "agent.file=KNOWN", "search.retest=false"],
    "known+prune": ["agent=replay", "agent.file=KNOWN", "search.prune=true", "search.retest=false"],
}
CLAUDE_AGENTS = ("agent=claude", "agent=hybrid")


def session_args(name: str, extra: list[str], seed: int, k: int, budget: int, tag: str, work: Path,
                 server: MessagesServer | None) -> list[str]:
    args = [*extra, f"agent.seed={seed}", f"search.tag={tag}", f"search.max_experiments={k}", "device=cpu",
            "device.threads=1", f"budget.seconds={budget}", "search.max_hours=24"]
    import yaml

    if "agent=replay" in extra and not any(a.startswith("agent.file=") for a in extra):
        f = work / "lr_list.yaml"
        f.write_text(yaml.safe_dump([{"description": f"matrix lr {v}", "overrides": [f"optimizer.matrix_lr={v}"]}
                                     for v in LR_LIST]))
        args.append(f"agent.file={f}")
    if "agent.file=KNOWN" in args:
        f = work / "known.yaml"
        f.write_text(yaml.safe_dump([{"description": d, "hypothesis": d, "overrides": ovs} for ovs, d in KNOWN]))
        args[args.index("agent.file=KNOWN")] = f"agent.file={f}"
    if server is not None:
        args += [f"agent.base_url={server.url}", "agent.probe_s=5"]
    return args


def run_one(name: str, extra: list[str], seed: int, k: int, budget: int, work: Path) -> dict:
    """One session, in a clone of its own (sessions side by side share no git locks); its figures read back from
    its ledger, state and held-out result."""
    tag = f"{name}-s{seed}".replace("+", "_")  # a session name: letters, digits, _ - .
    repo = clone(work / tag)
    uses_claude = any(a in extra for a in CLAUDE_AGENTS)
    server = MessagesServer(api_key=KEY).__enter__() if uses_claude else None
    try:
        if server is not None:
            server.responder = ScriptedResearcher(seed=seed, repo=repo, patch_every=0, retest_share=0.5)
        args = session_args(name, extra, seed, k, budget, tag, work, server)
        env = {**os.environ, "ANTHROPIC_API_KEY": KEY}
        log = work / f"{tag}.log"
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "src.search", "search.progress=false", *args], cwd=repo,
                                stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        wall = time.time() - t0
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    return figures(repo, tag, name, seed, rc, wall, log)


def figures(repo: Path, tag: str, name: str, seed: int, rc: int, wall: float, log: Path) -> dict:
    o = outcome(repo, tag)
    d = repo / "outputs" / "research" / tag
    rows = o.rows
    decided = [e for e in rows if e.is_experiment and e.status in ("keep", "discard", "pruned")]  # pruned: decided
    runs = [e for e in rows if e.training_seconds is not None and e.status != "invalid"]
    train_s = sum(e.training_seconds or 0.0 for e in runs)  # counted device seconds, baselines and confirmations too
    running, curve = o.standings.baseline, []
    for e in rows:  # the running best after each experiment (kept rows move it)
        if e.status == "keep" and e.val_bpb is not None:
            running = e.val_bpb if running is None else min(running, e.val_bpb)
        if e.is_experiment and e.counted:
            curve.append(running)
    held = {}
    try:
        held = json.loads((d / "heldout.json").read_text())
    except (OSError, ValueError):
        pass
    base, best = o.standings.baseline, o.standings.best.val_bpb
    return {"config": name, "seed": seed, "tag": tag, "returncode": rc, "wall_s": wall,
            "experiments": sum(1 for e in rows if e.is_experiment and e.counted),
            "decided": len(decided),
            "kept": sum(1 for e in rows if e.status == "keep"), "runs": len(runs),
            "decided_per_hour": len(decided) / (wall / 3600) if wall > 0 else 0.0,
            "training_share": train_s / wall if wall > 0 else 0.0,
            "runs_per_decision": len(runs) / len(decided) if decided else float("nan"),
            "device_s_per_decision": train_s / len(decided) if decided else float("nan"),
            "pruned": sum(1 for e in rows if e.status == "pruned"),
            "fates": {e.exp: [e.status, e.delta] for e in rows if e.is_experiment},
            "baseline": base, "best": best, "gain": (base - best) if base is not None else float("nan"),
            "test_gain": held.get("test_gain"), "val_gain_scored": held.get("val_gain"),
            "statuses": o.statuses, "agents": sorted({e.agent for e in rows if e.agent}), "curve": curve,
            "log": str(log)}


def spread(xs: list, fmt: str = ".4f") -> str:
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return "-"
    m = statistics.median(xs)
    return f"{m:{fmt}}" if len(xs) == 1 else f"{m:{fmt}} [{min(xs):{fmt}}, {max(xs):{fmt}}]"


def summarize(results: list[dict], k: int, budget: int) -> str:
    header = ["config", "seeds", "decided/h", "wall min", "training share", "runs/decision", "device s/decision",
              f"best after {k}", "gain vs baseline", "test gain", "kept", "pruned"]
    rows = []
    for name in dict.fromkeys(r["config"] for r in results):
        rs = [r for r in results if r["config"] == name]
        rows.append([name, len(rs), spread([r["decided_per_hour"] for r in rs], ".1f"),
                     spread([r["wall_s"] / 60 for r in rs], ".1f"), spread([r["training_share"] for r in rs], ".2f"),
                     spread([r["runs_per_decision"] for r in rs], ".2f"),
                     spread([r["device_s_per_decision"] for r in rs], ".1f"), spread([r["best"] for r in rs]),
                     spread([r["gain"] for r in rs]), spread([r["test_gain"] for r in rs]),
                     spread([r["kept"] for r in rs], ".0f"), spread([r["pruned"] for r in rs], ".0f")])
    per = [[r["config"], r["seed"], r["returncode"], f"{r['wall_s'] / 60:.1f}", r["experiments"], r["decided"],
            r["runs"], f"{r['baseline']:.4f}" if r["baseline"] else "-", f"{r['best']:.4f}",
            f"{r['test_gain']:+.4f}" if r["test_gain"] is not None else "-", r["statuses"]] for r in results]
    return (f"k={k} experiments per session, {budget}-s CPU runs (device.threads=1), median [min, max] over seeds\n\n"
            + table(header, rows) + pruning_lines(results) + "\n\nper session:\n" +
            table(["config", "seed", "rc", "wall min", "experiments", "decided", "runs", "baseline", "best",
                   "test gain", "statuses"], per))


def pruning_lines(results: list[dict]) -> str:
    """For each 'X+prune' beside an 'X' of the same seed: what pruning stopped, and what those proposals did when
    they ran to the end (a keep, or a gain beyond the margin, pruned is a real gain lost)."""
    out = []
    for r in results:
        if not r["config"].endswith("+prune"):
            continue
        off = next((o for o in results if o["config"] == r["config"][:-len("+prune")] and o["seed"] == r["seed"]), None)
        if off is None:
            continue
        pruned = [x for x, (st, _) in r["fates"].items() if st == "pruned"]
        lost = [x for x in pruned if off["fates"].get(x, ["", None])[0] == "keep"]
        fates = ", ".join(f"{x} ({off['fates'].get(x, ['?'])[0]}"
                          + (f" {off['fates'][x][1]:+.3f}" if x in off["fates"] and off["fates"][x][1] is not None
                             else "") + ")" for x in pruned)
        change = r["device_s_per_decision"] / off["device_s_per_decision"] - 1 if off["device_s_per_decision"] else 0
        out.append(f"{r['config']} seed {r['seed']}: pruned {len(pruned)}: {fates or 'none'}; of them kept without "
                   f"pruning: {len(lost)} (real gains lost); device s per decided experiment {r['device_s_per_decision']:.1f} "
                   f"against {off['device_s_per_decision']:.1f} ({change:+.0%}); wall {r['wall_s'] / 60:.1f} against "
                   f"{off['wall_s'] / 60:.1f} min")
    return ("\n\npruning against the same proposals without it:\n" + "\n".join(out)) if out else ""


def plot(results: list[dict], path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {}
    for r in results:
        c = colors.setdefault(r["config"], f"C{len(colors)}")
        xs = list(range(1, len(r["curve"]) + 1))
        ax.plot(xs, r["curve"], color=c, alpha=0.8, drawstyle="steps-post",
                label=r["config"] if r["config"] not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xlabel("experiments run")
    ax.set_ylabel("best val_bpb so far")
    ax.set_title(f"best after k (k={k}); one line per seed")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="*", default=["hybrid", "tpe", "scripted"], help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--config", action="append", default=[], help="name=overrides (space-separated) of your own")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=10, help="experiments per session")
    ap.add_argument("--budget", type=int, default=30, help="budget.seconds of every run")
    ap.add_argument("--parallel", type=int, default=2, help="sessions at once (one core each)")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "research" / time.strftime("%Y%m%d-%H%M%S")))
    ap.add_argument("overrides", nargs="*", help="more overrides for every session (search.* or train)")
    args = ap.parse_args()
    configs = {n: CONFIGS[n] for n in args.configs}
    for c in args.config:
        n, _, ovs = c.partition("=")
        configs[n] = ovs.split()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-research-"))
    env_cache = os.environ.get("OVERNIGHT_CACHE")
    print(f"sessions under: {work}\ncache: {env_cache or '~/.cache/overnight'}\nout: {out}", flush=True)
    subprocess.run([sys.executable, "prepare.py"], cwd=REPO, check=True, capture_output=True)
    jobs = [(n, ovs + args.overrides, s) for s in args.seeds for n, ovs in configs.items()]  # seeds outer: mixed
    results: list[dict] = []
    failed: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                name, ovs, seed = jobs.pop(0)
            t0 = time.time()
            try:
                r = run_one(name, ovs, seed, args.k, args.budget, work)
            except Exception as err:  # a session that left no ledger: said, and the others go on
                with lock:
                    failed.append(f"{name} seed {seed}: {type(err).__name__}: {err} (log: {work})")
                    print(f"[{time.strftime('%H:%M:%S')}] {failed[-1]}", flush=True)
                continue
            with lock:
                results.append(r)
                print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: rc {r['returncode']}, {r['decided']} decided "
                      f"in {(time.time() - t0) / 60:.1f} min, best {r['best']:.4f}, gain {r['gain']:+.4f}, test gain "
                      f"{r['test_gain'] if r['test_gain'] is None else round(r['test_gain'], 4)}", flush=True)
                (out / "results.json").write_text(json.dumps(results, indent=2))

    threads = [threading.Thread(target=worker) for _ in range(max(1, args.parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = {n: i for i, n in enumerate(configs)}
    results.sort(key=lambda r: (order[r["config"]], r["seed"]))
    text = summarize(results, args.k, args.budget)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "best_after_k.png", args.k)
    print("\n" + text + f"\n\nwritten: {out / 'table.md'}, {out / 'results.json'}, {out / 'best_after_k.png'}")
    for f in failed:
        print(f"FAILED: {f}")
    return 0 if not failed and all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
