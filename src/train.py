"""One timed training run: build the GPT, train it for a fixed budget, score val_bpb.

compose config -> resolve device/dtype -> build model + optimizer -> warm up (not
counted) -> train until the budget is spent -> evaluate val_bpb -> print the summary
block and write summary.json in the run's Hydra output dir.

Usage: python -m src.train [model=small] [budget.seconds=60] [dry_run=true] ...
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from src.budget import BudgetClock
from src.config import TrainConfig
from src.device import Runtime, resolve
from src.model import GPT, GPTConfig
from src.optim import build_optimizer
from src.provenance import provenance

log = logging.getLogger("src.train")
REPO = Path(__file__).resolve().parent.parent
SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth")


class RunFailed(Exception):
    """Training stopped early for a reason the summary records (status, e.g. 'nan')."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def derive_batch(cfg: TrainConfig) -> tuple[int, int]:
    """Sequences per device step and gradient-accumulation steps, with errors a user can act on."""
    T, b = cfg.model.sequence_len, cfg.batch
    if b.device_tokens % T:
        raise ValueError(f"batch.device_tokens={b.device_tokens} must be a multiple of model.sequence_len={T}")
    if b.total_tokens % b.device_tokens:
        raise ValueError(f"batch.total_tokens={b.total_tokens} must be a multiple of batch.device_tokens={b.device_tokens}")
    return b.device_tokens // T, b.total_tokens // b.device_tokens


def describe(model: GPT, cfg: TrainConfig, accum: int) -> str:
    c = model.config
    counts = model.param_counts()
    lines = [f"model: depth {c.n_layer}, width {c.n_embd}, heads {c.n_head} (kv {c.n_kv_head}) x {c.head_dim}, "
             f"seq {c.sequence_len}, vocab {c.vocab_size}, windows {model.window_sizes}, "
             f"value embeds on layers {sorted(int(k) for k in model.value_embeds)}",
             "parameters:"]
    lines += [f"  {k:22s} {v:>14,}" for k, v in counts.items()]
    lines.append(f"FLOPs per token: {model.flops_per_token():.4e}")
    lines.append(f"batch: {cfg.batch.total_tokens:,} tokens/step = {accum} x {cfg.batch.device_tokens:,} tokens/device step")
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    keys = list(SUMMARY_KEYS) + [k for k in s if k not in SUMMARY_KEYS]
    rows = []
    for k in keys:
        v = s.get(k)
        if isinstance(v, float):
            v = f"{v:.6f}" if k == "val_bpb" else f"{v:.2f}"
        if isinstance(v, (dict, list)):
            continue
        rows.append(f"{k + ':':20s}{v}")
    return "---\n" + "\n".join(rows)


def quantiles(xs: list[float]) -> dict:
    if not xs:
        return {"step_time_p50": 0.0, "step_time_p90": 0.0, "step_time_p99": 0.0, "step_time_max": 0.0}
    t = torch.tensor(xs, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"step_time_p50": q[0], "step_time_p90": q[1], "step_time_p99": q[2], "step_time_max": float(t.max())}


def train_loop(model, opt, batches, clock: BudgetClock, cfg: TrainConfig, rt: Runtime, accum: int, on_step=None):
    """Train until the budget clock says done. Raises RunFailed on NaN or exploding loss."""
    from tqdm import tqdm

    timed = cfg.budget.mode == "time"
    bar = tqdm(total=cfg.budget.seconds if timed else cfg.budget.tokens, unit="s" if timed else "tok",
               desc="train", disable=not cfg.progress, mininterval=1.0 if sys.stderr.isatty() else 10.0,
               unit_scale=not timed)
    model.train()
    while not clock.done:
        t0 = time.perf_counter()
        lrm = opt.schedule(clock.progress, clock.step, cfg.optimizer)
        for _ in range(accum):
            x, y = next(batches)
            with rt.autocast():
                loss = model(x, y)
            (loss / accum).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        loss_f = loss.item()  # one sync per step: the step time is real and NaN is caught at once
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_f) or loss_f > cfg.budget.max_nan_loss:
            bar.close()
            raise RunFailed("nan", f"loss {loss_f} at step {clock.step} is not finite or above "
                                   f"budget.max_nan_loss={cfg.budget.max_nan_loss}: training diverged; "
                                   "lower the learning rates or check the last change")
        before = clock.training_seconds if timed else clock.tokens
        clock.tick(dt)
        bar.update((clock.training_seconds if timed else clock.tokens) - before)
        bar.set_postfix(loss=f"{loss_f:.3f}", step=clock.step, refresh=False)
        if on_step is not None:
            on_step(clock.step, dict(loss=loss_f, lr_mult=lrm, step_time=dt, tokens_per_sec=clock.tokens_per_step / dt))
    bar.close()


def run(cfg: TrainConfig, out_dir: Path | None = None) -> dict:
    """Run one timed training run; returns the summary dict (also written to out_dir/summary.json)."""
    t_start = time.time()
    rt = resolve(cfg.device)
    torch.manual_seed(cfg.seed)
    B, accum = derive_batch(cfg)
    vocab = cfg.data.vocab_size
    if cfg.dry_run:
        with torch.device("meta"):
            model = GPT(GPTConfig.from_model_config(cfg.model, vocab))
        print(describe(model, cfg, accum))
        counts = model.param_counts()
        print(f"num_params: {counts['total']:,} ({counts['total'] / 1e6:.1f}M)")
        return {"status": "dry_run", "num_params": counts["total"], "num_params_M": counts["total"] / 1e6,
                "flops_per_token": model.flops_per_token(), "depth": cfg.model.depth}

    from src.data import load_prepared, train_batches, val_tokens
    from src.evaluate import evaluate_bpb

    data = load_prepared(cfg.data)
    if data.vocab_size != vocab:
        raise ValueError(f"data.vocab_size={vocab} but the prepared tokenizer in {data.dir} has {data.vocab_size}; "
                         f"set data.vocab_size={data.vocab_size} or re-run prepare.py with the same data options")
    model = GPT(GPTConfig.from_model_config(cfg.model, vocab)).to(rt.device)
    model.init_weights()
    log.info("%s", describe(model, cfg, accum))
    log.info("device %s (%s), dtype %s, compile %s", rt.device, rt.name, rt.dtype_name, rt.compile)
    opt = build_optimizer(model, cfg.optimizer)
    fwd = torch.compile(model, dynamic=False) if rt.compile else model
    counts = model.param_counts()
    summary = {"status": "ok", "device": str(rt.device), "device_name": rt.name, "dtype": rt.dtype_name,
               "seed": cfg.seed, "grad_accum_steps": accum, "device_batch_size": B,
               **{k: v for k, v in provenance(REPO).items() if k != "versions"}}
    clock = BudgetClock(cfg.budget, cfg.batch.total_tokens)
    rt.reset_peak_memory()
    try:
        train_loop(fwd, opt, train_batches(data, B, cfg.model.sequence_len, cfg.seed, rt.device),
                   clock, cfg, rt, accum)
        val = val_tokens(data, cfg.data.eval_tokens)
        eval_bs = max(1, cfg.eval_batch_tokens // cfg.model.sequence_len)
        summary["val_bpb"] = evaluate_bpb(model, val, torch.from_numpy(data.token_bytes), cfg.model.sequence_len,
                                          eval_bs, rt.device, rt.autocast, progress=cfg.progress)
    except RunFailed as e:
        log.error("run failed (%s): %s", e.status, e)
        summary.update(status=e.status, error=str(e), val_bpb=float("nan"))
    train_s = clock.training_seconds
    flops = model.flops_per_token() * clock.tokens
    summary.update(
        training_seconds=train_s, total_seconds=time.time() - t_start, peak_vram_mb=rt.peak_memory_mb(),
        mfu_percent=100 * flops / (train_s * rt.peak_flops) if train_s > 0 and rt.peak_flops > 0 else 0.0,
        total_tokens_M=clock.tokens / 1e6, num_steps=clock.step, num_params_M=counts["total"] / 1e6,
        depth=cfg.model.depth, tokens_per_sec=clock.tokens_per_sec,
        **quantiles(clock.step_times))
    print(format_summary(summary), flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from src.config import register_configs, to_object

    register_configs()

    @hydra.main(version_base="1.3", config_path="../conf", config_name="train")
    def main(dcfg) -> float:
        cfg = to_object(dcfg)
        hc = HydraConfig.get()
        summary = run(cfg, Path(hc.runtime.output_dir))
        if hc.mode == RunMode.RUN and summary["status"] not in ("ok", "dry_run"):
            sys.exit(1)
        return summary.get("val_bpb", float("nan"))

    main()


if __name__ == "__main__":
    _hydra_main()
