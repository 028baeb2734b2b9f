"""The cost of scoring in a separate process: the default run before and after, side by side.

Runs `python -m src.train` (the default config, 120 s) from a checkout of a BEFORE commit (in-process
evaluation) and from this checkout (the scorer process), interleaved in pairs (before, after,
then after, before, ...) so drift hits both alike. Reports per run val_bpb and the whole-process
wall time, the paired wall differences and their median, and, for each AFTER run, the val_bpb of
the same checkpoint scored in this process (same dtype) next to the scorer's.

Usage: python bench/scoring_overhead.py [--before b043477] [--pairs 3] [--seconds 120] [overrides ...]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sessions import REPO, timed_train, worktree


def one_run(cwd: Path, seconds: float, extra: list[str], out: Path) -> dict:
    s = timed_train(cwd, [f"budget.seconds={seconds}", "progress=false", *extra], out)
    if s["returncode"] != 0:
        sys.exit(f"run in {cwd} failed ({s['returncode']}):\n{s['output_tail']}")
    return s


def in_process_bpb(checkpoint: Path) -> float:
    """The same checkpoint scored here, with the harness in this process (same device and dtype)."""
    import torch

    sys.path.insert(0, str(REPO))
    from omegaconf import OmegaConf

    from src.harness.config import TrainConfig, to_object
    from src.harness.data import load_prepared, val_tokens
    from src.harness.device import DTYPES, Runtime
    from src.harness.evaluate import evaluate_bpb
    from src.research.model import GPT, GPTConfig

    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = to_object(OmegaConf.create(ck["config"]), TrainConfig)
    model = GPT(GPTConfig.from_model_config(cfg.model, cfg.data.vocab_size))
    model.load_state_dict(ck["model"])
    rt = Runtime(torch.device(ck["device"]), DTYPES[ck["dtype"]], False, 0.0, ck["device"])
    data = load_prepared(cfg.data, splits=("val",))
    T = cfg.model.sequence_len
    bs = max(1, (cfg.eval_batch_tokens or rt.eval_batch_tokens) // T)
    return evaluate_bpb(model, val_tokens(data, cfg.data.eval_tokens), torch.from_numpy(data.token_bytes), T, bs,
                        rt.device, rt.autocast)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="b043477", help="commit with in-process evaluation")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = worktree(args.before, Path(tmp) / "before")
        try:
            rows = []
            print(f"{'pair':>4} {'side':>6} {'val_bpb':>9} {'wall s':>8} {'train s':>8} {'tok/s':>8} "
                  f"{'in-process':>11}", flush=True)
            for i in range(args.pairs):
                order = [("before", before), ("after", REPO)]
                if i % 2:
                    order.reverse()
                pair = {}
                for side, cwd in order:
                    out = Path(tmp) / f"{side}-{i}"
                    s = one_run(cwd, args.seconds, args.overrides, out)
                    ip = in_process_bpb(out / "checkpoint.pt") if side == "after" else None
                    s["in_process"] = ip
                    pair[side] = s
                    print(f"{i + 1:>4} {side:>6} {s['val_bpb']:>9.4f} {s['wall']:>8.1f} {s['training_seconds']:>8.1f} "
                          f"{s['tokens_per_sec']:>8.0f} {'' if ip is None else f'{ip:.6f}':>11}", flush=True)
                rows.append(pair)
            diffs = [p["after"]["wall"] - p["before"]["wall"] for p in rows]
            print("\npaired wall difference (after - before), s: " + ", ".join(f"{d:+.1f}" for d in diffs))
            print(f"median: {statistics.median(diffs):+.2f} s (target <= +3 s)")
            bpb = {k: statistics.median(p[k]["val_bpb"] for p in rows) for k in ("before", "after")}
            print(f"median val_bpb: before {bpb['before']:.4f}, after {bpb['after']:.4f}")
            gaps = [abs(p["after"]["val_bpb"] - p["after"]["in_process"]) for p in rows]
            print(f"scorer vs in-process on the same checkpoint: max |difference| {max(gaps):.2e}")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], capture_output=True)


if __name__ == "__main__":
    main()
