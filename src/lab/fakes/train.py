"""A stand-in for `python -m src.train` in the search loop's fast tests and benches: the same CLI contract
(Hydra-style overrides in, <hydra.run.dir>/summary.json out, exit 0 iff status ok), no torch.

val_bpb is a deterministic function of the effective overrides (the command line plus the
committed preset named by +experiment=): 3.0, lower for batch.total_tokens 4096 (-0.2) or 2048
(-0.1), plus 0.5 * ln(matrix_lr / 0.06)^2 (best at 0.06), plus FAKE_NOISE * a hash of the run
dir in [-0.5, 0.5]. Fault drills, by override: model.activation=crash (traceback, exit 1),
model.activation=sleep (sleeps 600 s), model.activation=stall (status stalled while the file
$FAKE_STALL_FILE does not exist yet; creates it). dry_run=true prints and exits 0.
Throughput: 20,000 tokens/s (MFU 30%), except runs named in $FAKE_SLOW ("base-1:4,exp-002-a2:3":
run dir name -> slowdown), which are that many times slower and, as fewer tokens fit the time
budget, score 0.3 * ln(slowdown) worse: the disturbed-run drill. $FAKE_SHIFT ("base-1:1.2") adds to the
val_bpb of the runs it names and nothing else: a wild score that throughput cannot explain.
$FAKE_COUNTED ("exp-001:500") reports that many counted training seconds for the runs it names:
a budget clock that was slowed (the process lived far shorter than what it counted).
$FAKE_AFTER ("exp-002:exp-003") holds the runs it names until the session's results.tsv records the other
experiment ("exp-004:exp-005/": until 2 s after the other's first run wrote its summary; at most 60 s): the order in which
parallel workers finish (search.workers > 1).
$FAKE_HOLD ("exp-001,exp-002") holds the runs it names until the file $FAKE_HOLD_FILE exists (at most 60 s).
Every run prints a learning curve like the harness's (a point every 5% of the budget, loss 0.7 val_bpb + 2.5 (1-f)^2),
$FAKE_CURVE_S seconds apart (default 0).
$FAKE_MLFLOW=1 makes each run log itself like src.train does (tracking.*: an MLflow child run of the session's
parent, its experiment created race-free with src.harness.tracking.ensure_experiment): the shared-server drill.
Env var names it saw are written to summary.json (`env`), for the env-stripping tests.
"""
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path


def effective_overrides(argv: list[str]) -> tuple[dict, dict]:
    """(the command-line overrides, those merged over the named experiment presets)."""
    ovs = {}
    experiments = []
    for a in argv:
        k, _, v = a.partition("=")
        v = v.strip("'")
        if k.lstrip("+") == "experiment":
            experiments += v.strip("[]").split(",")
        else:
            ovs[k] = v
    eff = {}
    for name in experiments:
        import yaml

        def flat(d, prefix=""):
            for kk, vv in d.items():
                if kk == "defaults":
                    continue
                if isinstance(vv, dict):
                    flat(vv, f"{prefix}{kk}.")
                else:
                    eff[f"{prefix}{kk}"] = str(vv)

        flat(yaml.safe_load(Path("conf/experiment", name + ".yaml").read_text()) or {})
    eff.update(ovs)
    return ovs, eff


def hold(out: Path) -> None:
    """$FAKE_AFTER (name:exp) holds a run until exp is in the ledger (name:exp/ until exp's first run has written
    its summary); $FAKE_HOLD until $FAKE_HOLD_FILE exists."""
    after = dict(p.split(":", 1) for p in os.environ.get("FAKE_AFTER", "").split(",") if ":" in p).get(out.name)
    if after:  # hold this run until the other experiment is recorded (or has run)
        ledger, t0 = out.parent.parent / "results.tsv", time.time()
        ran = out.parent / after.rstrip("/") / "summary.json"
        while time.time() - t0 < 60 and not (ran.exists() if after.endswith("/") else
                                             ledger.exists() and f"\t{after}\t" in ledger.read_text()):
            time.sleep(0.05)
        if after.endswith("/"):  # the other's run has ended: give its experiment 2 s to be judged first
            time.sleep(2.0)
    if out.name in os.environ.get("FAKE_HOLD", "").split(","):  # hold this run until the test lets it go
        gate, t0 = Path(os.environ["FAKE_HOLD_FILE"]), time.time()
        while time.time() - t0 < 60 and not gate.exists():
            time.sleep(0.05)


def log_to_mlflow(eff: dict, bpb: float, summary: dict) -> None:
    """$FAKE_MLFLOW: a child run under tracking.parent_run_id, like the real train logs."""
    from mlflow.tracking import MlflowClient

    sys.path.insert(0, os.getcwd())  # the worktree's src/
    from src.harness.tracking import ensure_experiment

    uri = eff["tracking.uri"]
    client = MlflowClient(uri)
    exp = ensure_experiment(client, eff.get("tracking.experiment", "overnight"), uri)
    tags = {"mlflow.parentRunId": eff["tracking.parent_run_id"]} if eff.get("tracking.parent_run_id") else {}
    run = client.create_run(exp.experiment_id, run_name=eff.get("tracking.run_name"), tags=tags)
    client.log_metric(run.info.run_id, "val/bpb", bpb, step=0)
    client.set_terminated(run.info.run_id)
    summary["mlflow_run_id"] = run.info.run_id


def main() -> int:
    ovs, eff = effective_overrides(sys.argv[1:])
    if eff.get("dry_run") == "true":
        print("dry run ok")
        return 0
    out = Path(ovs["hydra.run.dir"])
    out.mkdir(parents=True, exist_ok=True)
    act = eff.get("model.activation", "relu2")
    print(f"fake train: {sorted(eff.items())}", flush=True)
    if act == "crash":
        raise RuntimeError("boom: the patched model does not run")
    if act == "sleep":
        time.sleep(600)
    status = "ok"
    if act == "stall":
        flag = Path(os.environ["FAKE_STALL_FILE"])
        if not flag.exists():
            flag.write_text("stalled once")
            status = "stalled"
    bpb = 3.0 + {"4096": -0.2, "2048": -0.1}.get(eff.get("batch.total_tokens", "8192"), 0.0)
    bpb += 0.5 * math.log(float(eff.get("optimizer.matrix_lr", "0.04")) / 0.06) ** 2
    noise = float(os.environ.get("FAKE_NOISE", "0"))
    if noise:
        h = int(hashlib.sha256(out.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF - 0.5
        bpb += noise * h
    def by_run(var: str, default: float) -> float:  # "name:value,name:value" -> this run's value
        pairs = (s.partition(":") for s in os.environ.get(var, "").split(",") if s)
        return dict((k, float(v)) for k, _, v in pairs).get(out.name, default)

    hold(out)
    slowdown = by_run("FAKE_SLOW", 1.0)
    bpb += 0.3 * math.log(slowdown) + by_run("FAKE_SHIFT", 0.0)
    tps = 20000.0 / slowdown
    curve, pause = [], float(os.environ.get("FAKE_CURVE_S", "0"))
    for i in range(1, 21):  # the harness's learning curve: a point every 5% of the budget, FAKE_CURVE_S apart
        f = i / 20
        curve.append([f, 0.7 * bpb + 2.5 * (1 - f) ** 2])
        print(f"overnight-curve fraction={f:.2f} loss={curve[-1][1]:.6f} step={i}", flush=True)
        time.sleep(pause)
    summary = {"status": status, "val_bpb": bpb, "training_seconds": by_run("FAKE_COUNTED", 1.0), "total_seconds": 1.2,
               "peak_vram_mb": 512.0, "num_steps": 10, "stalled_seconds": 3.0 if status == "stalled" else 0.0,
               "depth": 4, "env": sorted(os.environ),
               "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None, "tokens_per_sec": tps, "mfu_percent": 30.0 / slowdown,
               "step_time_p50": float(eff.get("batch.total_tokens", "8192")) / tps, "device": "cpu", "dtype": "fp32",
               "curve": curve}
    if os.environ.get("FAKE_MLFLOW") and eff.get("tracking.uri") and eff.get("tracking.enabled") != "false":
        log_to_mlflow(eff, bpb, summary)
    (out / "summary.json").write_text(json.dumps(summary))
    print(f"---\nval_bpb: {bpb:.6f}\nstatus: {status}", flush=True)
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
