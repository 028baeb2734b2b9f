"""One timed training run: build the GPT, train it for a fixed budget, score val_bpb.

compose config -> resolve device/dtype -> start the device clock -> build model + optimizer ->
warm up -> train until the budget is spent (all of it counted) -> evaluate val_bpb -> print the summary
block and write summary.json in the run's Hydra output dir -> end the MLflow run.

Every run is an MLflow run (src/harness/tracking.py); a sweep (-m) is one parent run with a child
per job. SIGTERM/SIGINT, NaN, a crash or the hard wall-clock ceiling still leave a
summary.json and a FAILED run with the reason in its `status` tag.

Usage: python -m src.train (the entry point, src/train.py; this module is its body)
       python -m src.train [model=small] [budget.seconds=60] [dry_run=true] ...
       python -m src.train -m optimizer.matrix_lr=0.02,0.04 [hydra/launcher=joblib]
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from time import perf_counter  # bound before the research code is imported: it cannot slow our clock
from types import SimpleNamespace

from src.harness import threads

threads.apply()  # how OpenMP threads wait, before torch is imported (src/harness/threads.py)
import torch  # noqa: E402

# the harness first ...
from src.harness.budget import (CURVE_LINE, START_LINE, STALL_ENV, BudgetClock, Curve, CpuTime, DeviceTime, device_time, inject_stalls,
                                lr_multiplier)
from src.harness.config import TrainConfig
from src.harness.data import held_out_files, load_prepared, train_batches
from src.harness.device import Runtime, compile_model, process_age, resolve
from src.harness.landlock import hide
from src.harness.launch import FREEZE_ENV
from src.harness.memory import Memory, cache_path, candidates, is_oom, oom_message
from src.harness.model_facts import ModelFacts, model_facts
from src.harness.paths import HIDE_ROOTS_ENV, REPO
from src.harness.provenance import provenance
from src.harness.sandbox import SandboxError, install as install_sandbox
from src.harness.score import CHECKPOINT, Scorer, apply_verdict, save_checkpoint
from src.harness.score_client import eval_spec, training_cost
from src.harness.snapshot import library_changes, library_snapshot
from src.harness.status import CRASH, DRY_RUN, KILLED, NAN, OK, OOM, STALLED, TAMPERED, TIMEOUT
from src.harness.sweep import job_run_name
from src.harness.tracking import Tracker, TrackingError, flatten

HARNESS_MODULES = ("time", "os", "signal", "src.harness.budget", "src.harness.data", "src.harness.model_facts",
                   "src.harness.launch", "src.harness.score", __name__)
_HARNESS = library_snapshot(extra=HARNESS_MODULES)
RESEARCH_DIR = REPO / "src" / "research"


def research() -> SimpleNamespace:
    """The research surface: all the harness asks of it is the research contract (src/research/__init__.py).
    Imported only once the budget clock runs (TimedRun.start_clock): importing it runs research code."""
    from src.research.model import GPT, GPTConfig
    from src.research.optim import build_optimizer
    from src.research.step import train_step

    return SimpleNamespace(GPT=GPT, GPTConfig=GPTConfig, build_optimizer=build_optimizer, train_step=train_step)

log = logging.getLogger("src.train")
SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth")
# Beyond ~4 passes over the same data, extra tokens are worth little more than none (Muennighoff et al. 2023,
# "Scaling Data-Constrained Language Models"): a run that repeats its train split more than this says so.
EPOCHS_WARNING = 4.0
BIGGER_DATA = ("data=climbmix (python prepare.py data=climbmix data.train_shards=N: more shards, more tokens), "
               "data=tinystories, or data=text 'data.paths=[your .txt files or folders]'")


class RunFailed(Exception):
    """Training stopped early for a reason the summary records (status, e.g. 'nan')."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def derive_batch(cfg: TrainConfig) -> tuple[int, int]:
    """Sequences per device step and gradient-accumulation steps, with errors a user can act on.
    (0, 0) while batch.device_tokens is auto: the probe at the start of the run decides."""
    T, b = cfg.model.sequence_len, cfg.batch
    if b.device_tokens == "auto":
        if b.total_tokens % T:
            raise ValueError(f"batch.total_tokens={b.total_tokens} must be a multiple of model.sequence_len={T}")
        return 0, 0
    if b.device_tokens % T:
        raise ValueError(f"batch.device_tokens={b.device_tokens} must be a multiple of model.sequence_len={T}")
    if b.total_tokens % b.device_tokens:
        raise ValueError(f"batch.total_tokens={b.total_tokens} must be a multiple of batch.device_tokens={b.device_tokens}")
    return b.device_tokens // T, b.total_tokens // b.device_tokens


def describe(facts: ModelFacts, cfg: TrainConfig, accum: int) -> str:
    lines = [facts.describe()]
    if cfg.batch.device_tokens == "auto":
        lines.append(f"batch: {cfg.batch.total_tokens:,} tokens/step; tokens/device step auto (the largest "
                     "micro-batch that fits, probed at the start of the run)")
    else:
        lines.append(f"batch: {cfg.batch.total_tokens:,} tokens/step = {accum} x {cfg.batch.device_tokens:,} "
                     "tokens/device step")
    return "\n".join(lines)


def runtime_line(rt: Runtime) -> str:
    compiled = f"compile {rt.compile}" + (f" (mode {rt.compile_mode}, scope {rt.compile_scope})" if rt.compile else "")
    return f"device {rt.device} ({rt.name}), dtype {rt.dtype_name}, {compiled}"


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


def train_loop(model, opt, batches, clock: BudgetClock, cfg: TrainConfig, rt: Runtime, accum: int, on_step=None,
               memory: Memory | None = None, train_step=None):
    """Train until the budget clock says done, one `train_step` (src/research/step.py) at a time, each timed here.

    Raises RunFailed on NaN or exploding loss. The tokens of a step are those the recipe actually drew.
    `memory` enforces a simulated CPU memory limit (device.memory_limit_mb) around each step.
    """
    from tqdm import tqdm

    timed = cfg.budget.mode == "time"
    bar = tqdm(total=cfg.budget.seconds if timed else cfg.budget.tokens, unit="s" if timed else "tok",
               desc="train", disable=not cfg.progress, mininterval=1.0 if sys.stderr.isatty() else 10.0,
               unit_scale=not timed, bar_format=None if not timed else
               "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")
    drawn = [0]

    def next_batch():
        x, y = next(batches)
        drawn[0] += x.numel()
        if memory is not None:
            memory.new_micro_batch()
        return x, y

    guard = memory.guard if memory is not None else contextlib.nullcontext
    train_step = train_step or research().train_step
    model.train()
    while not clock.done:
        drawn[0] = 0
        lr_mult = lr_multiplier(clock.progress, cfg.optimizer)  # the LR schedule is the harness's, by budget progress
        t0 = perf_counter()
        with guard():
            loss = train_step(model, opt, next_batch, step=clock.step, progress=clock.progress, lr_mult=lr_mult,
                              accum=accum, optim_cfg=cfg.optimizer, autocast=rt.autocast)
        loss_f = float(loss)  # one sync per step: the step time is real and NaN is caught at once
        dt = perf_counter() - t0
        if not math.isfinite(loss_f) or loss_f > cfg.budget.max_nan_loss:
            bar.close()
            raise RunFailed(NAN, f"loss {loss_f} at step {clock.step} is not finite or above "
                                   f"budget.max_nan_loss={cfg.budget.max_nan_loss}: training diverged; "
                                   "lower the learning rates or check the last change")
        before = clock.training_seconds if timed else clock.tokens
        clock.tick(dt, tokens=drawn[0])
        bar.update(min(clock.training_seconds if timed else clock.tokens, bar.total) - min(before, bar.total))
        bar.set_postfix(loss=f"{loss_f:.3f}", step=clock.step, refresh=False)
        if on_step is not None:
            on_step(clock.step, dict(loss=loss_f, lr_mult=lr_mult, step_time=dt, tokens_per_sec=drawn[0] / dt))
    bar.close()
    if not clock.spent:  # done without the budget spent: the wall-clock ceiling
        raise RunFailed(TIMEOUT, f"hard wall-clock ceiling of {clock.deadline:.0f} s hit after "
                                   f"{clock.training_seconds:.1f} counted device seconds and {clock.stalls} stalls "
                                   f"({clock.stalled_seconds:.0f} s): the machine is starving the run; re-run it")


@contextlib.contextmanager
def killed_by_signals():
    """SIGTERM/SIGINT raise RunFailed('killed') in the main thread, so the run is recorded before exiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise RunFailed(KILLED, f"killed by {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_params(cfg: TrainConfig, facts: ModelFacts, rt: Runtime, accum: int, B: int, prov: dict) -> dict:
    """MLflow params: the resolved config as dotted keys plus what the harness derived from it."""
    derived = {"num_params": facts.num_params, "grad_accum_steps": accum, "device_batch_size": B,
               "device": str(rt.device), "device_name": rt.name, "dtype": rt.dtype_name, "compile": rt.compile,
               "peak_flops": rt.peak_flops, "flops_per_token": facts.flops_per_token}
    return {**flatten(cfg), **flatten(derived, "derived."), "git.sha": prov["git_sha"],
            "git.dirty": prov["git_dirty"], "host": prov["host"], **flatten(prov["versions"], "version.")}


def run_texts(cfg: TrainConfig, prov: dict, out_dir: Path | None) -> dict[str, str]:
    """Text artifacts: the resolved config, the command-line overrides and, if dirty, the git diff."""
    from omegaconf import OmegaConf

    texts = {"config.yaml": OmegaConf.to_yaml(OmegaConf.structured(cfg))}
    overrides = out_dir / ".hydra" / "overrides.yaml" if out_dir else None
    if overrides and overrides.exists():
        texts["overrides.yaml"] = overrides.read_text()
    if prov.get("git_dirty"):
        try:
            diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD"], capture_output=True, text=True,
                                  timeout=30).stdout
            texts["git.diff"] = diff[:1_000_000]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return texts


def fill_summary(summary: dict, cfg: TrainConfig, rt: Runtime, clock: BudgetClock | None,
                 facts: ModelFacts | None, t_start: float) -> None:
    """The summary's numbers, from as far as the run got (no clock or facts: it failed before training).
    MFU and num_params are the harness's (src/harness/model_facts.py), from the config, never the model's."""
    train_s = clock.training_seconds if clock else 0.0
    flops = facts.flops_per_token * clock.tokens if clock and facts else 0.0
    summary.setdefault("val_bpb", float("nan"))
    summary.update(
        training_seconds=train_s, total_seconds=time.time() - t_start, peak_vram_mb=rt.peak_memory_mb(),
        mfu_percent=100 * flops / (train_s * rt.peak_flops) if train_s > 0 and rt.peak_flops > 0 else 0.0,
        total_tokens_M=clock.tokens / 1e6 if clock else 0.0, num_steps=clock.step if clock else 0,
        num_params_M=facts.num_params / 1e6 if facts else 0.0,
        depth=cfg.model.depth, tokens_per_sec=clock.tokens_per_sec if clock else 0.0,
        **quantiles(clock.step_times if clock else []),
        step_device_max=max(clock.device_step_times, default=0.0) if clock else 0.0,  # what the last step was judged by
        stalls=clock.stalls if clock else 0, stalled_seconds=clock.stalled_seconds if clock else 0.0,
        train_wall_seconds=clock.wall_seconds if clock else 0.0, stalled_steps=clock.stalled_steps if clock else [],
        wall_ratio=clock.wall_ratio if clock else 0.0)


def run(cfg: TrainConfig, out_dir: Path | None = None, hide_held_out: bool = True) -> dict:
    """Run one timed training run; returns the summary dict (also written to out_dir/summary.json).
    hide_held_out=False: leave the held-out splits readable (a sweep's jobs share processes, and a later job's
    scorer, started by this process, must read them)."""
    if cfg.dry_run:
        return dry_run(cfg, hide_held_out)
    return TimedRun(cfg, out_dir, hide_held_out).run()


def dry_run(cfg: TrainConfig, hide_held_out: bool = True) -> dict:
    """Build the model on the meta device (its own checks of the knobs) and print what it is: no data, no training.
    The research code is imported behind the same sandbox as in a timed run (red team 2026-12-07: it was not)."""
    rt = resolve(cfg.device)
    _, accum = derive_batch(cfg)
    if hide_held_out:
        hide(held_out_files(cfg.data))
    install_sandbox(RESEARCH_DIR)
    r = research()
    with torch.device("meta"):
        r.GPT(r.GPTConfig.from_model_config(cfg.model, cfg.data.vocab_size))
    facts = model_facts(cfg.model, cfg.data.vocab_size)
    print(describe(facts, cfg, accum))
    print(runtime_line(rt))
    print(f"num_params: {facts.num_params:,} ({facts.num_params / 1e6:.1f}M)")
    return {"status": DRY_RUN, "num_params": facts.num_params, "num_params_M": facts.num_params / 1e6,
            "flops_per_token": facts.flops_per_token, "depth": cfg.model.depth}


class TimedRun:
    """One run: data, model, the budgeted loop, the checkpoint and its score, then the summary and MLflow.

    finish() runs once whatever happens (a crash, NaN, a signal, the watchdog), so every run leaves a
    summary.json and an ended MLflow run with its status.
    """

    def __init__(self, cfg: TrainConfig, out_dir: Path | None, hide_held_out: bool = True):
        self.t_start = time.time()
        self.hide_held_out = hide_held_out
        self.cfg, self.out_dir = cfg, out_dir
        if cfg.score not in ("process", "caller"):
            raise ValueError(f"score={cfg.score!r}; expected process (this run starts the scorer) or caller")
        self.rt = resolve(cfg.device)
        torch.manual_seed(cfg.seed)
        self.B, self.accum = derive_batch(cfg)
        # the scorer process imports torch now, while this one trains; it sees only the checkpoint
        self.scorer = Scorer(REPO, out_dir / "score.log" if out_dir else None, spec=eval_spec(cfg)).start() \
            if cfg.score == "process" else None  # how to score: this config, before any research code could edit it
        self.memory = Memory(self.rt)  # device.memory_limit_mb, enforced from here on
        self.tracker = Tracker(cfg.tracking, out_dir, tags={"mlflow.source.name": "src.train",
                                                            "output_dir": str(out_dir or "")})
        self.prov = provenance(REPO)
        self.summary = {"status": OK, "device": str(self.rt.device), "device_name": self.rt.name,
                        "dtype": self.rt.dtype_name, "compile": self.rt.compile, "seed": cfg.seed,
                        "grad_accum_steps": self.accum, "device_batch_size": self.B,
                        **{k: v for k, v in self.prov.items() if k != "versions"}, "mlflow_run_id": None}
        self.model = self.clock = self.facts = None
        self.curve = Curve()  # the loss at every 5% of the counted budget: printed for the lab, kept in the summary
        self.device: DeviceTime | None = None  # the budget's clock, started before any research code runs
        self.research: SimpleNamespace | None = None
        self.train_tokens = 0
        self.harness = _HARNESS  # the library snapshot the end of the run is checked against
        self._lock, self._result = threading.Lock(), {}
        self._params_logged = False

    def run(self) -> dict:
        try:
            with killed_by_signals():
                self.tracker.start()  # checks the store now; imports mlflow and opens it in the background
                if self.rt.device.type == "cpu":  # on CPU that import would be CPU time of the budget: before it
                    self.tracker.wait_ready()
                opt, fwd, batches = self.build()
                self.train(fwd, opt, batches)
                self.checkpoint_and_score()
        except RunFailed as e:
            log.error("run failed (%s): %s", e.status, e)
            return self.finish(e.status, str(e))
        except (SandboxError, PermissionError) as e:  # research code reached for what the sandbox keeps from it
            message = f"the sandbox refused the research code: {type(e).__name__}: {e}"
            log.error("run failed (%s): %s", TAMPERED, message)
            return self.finish(TAMPERED, message)
        except BaseException as e:  # out of memory: the status oom with the fix; anything else: a crash, propagated
            if not is_oom(e):
                self.finish(CRASH, f"{type(e).__name__}: {e}")
                raise
            message = oom_message(self.rt, self.B, self.cfg.model.sequence_len,
                                  self.summary.get("device_tokens_auto", False))
            log.error("run failed (%s): %s", OOM, message)
            return self.finish(OOM, message)
        finally:
            if self.scorer is not None:
                self.scorer.close()
        return self.finish()

    def build(self):
        """Data (the train split only), the micro-batch, the model, the optimizer, the compiled forward."""
        cfg, rt, vocab = self.cfg, self.rt, self.cfg.data.vocab_size
        data = load_prepared(cfg.data, splits=("train",))  # the validation split is the scorer's alone
        if data.vocab_size != vocab:
            raise ValueError(f"data.vocab_size={vocab} but the prepared tokenizer in {data.dir} has "
                             f"{data.vocab_size}; set data.vocab_size={data.vocab_size} or re-run prepare.py "
                             "with the same data options")
        self.train_tokens = len(data.train)
        if cfg.budget.mode == "tokens":
            warn_epochs(cfg.budget.tokens, len(data.train))
        r = self.start_clock()
        if cfg.batch.device_tokens == "auto":
            B = pick_micro_batch(cfg, rt, self.memory, vocab)
            torch.manual_seed(cfg.seed)  # the probe drew random numbers: the run starts as if it had not
            cfg.batch.device_tokens = B * cfg.model.sequence_len
            self.B, self.accum = derive_batch(cfg)
            self.summary.update(grad_accum_steps=self.accum, device_batch_size=self.B, device_tokens_auto=True)
        model = self.model = r.GPT(r.GPTConfig.from_model_config(cfg.model, vocab)).to(rt.device)
        model.init_weights()
        self.facts = model_facts(cfg.model, vocab)
        log.info("%s", describe(self.facts, cfg, self.accum))
        log.info("%s", runtime_line(rt))
        opt = r.build_optimizer(model, cfg.optimizer)
        self.summary["built"] = True  # config, research code, model, optimizer: a crash before this is an invalid candidate
        if rt.compile:
            self.harness = prime_compiler(_HARNESS)
        fwd = compile_model(model, rt)
        if self.tracker.enabled and cfg.budget.warmup_steps == 0:
            self.tracking_ready()
        batches = train_batches(data, self.B, cfg.model.sequence_len, cfg.seed, rt.device)
        if os.environ.get(STALL_ENV):  # fault drill for tests; the loop itself stays untouched
            batches = inject_stalls(batches, self.accum, os.environ[STALL_ENV])
        return opt, fwd, batches

    def start_clock(self) -> SimpleNamespace:
        """Start the budget's device clock, say so on stdout (the lab's runner counts from this line), close the
        sandbox, and only then import the research surface: everything it does from here on is counted."""
        n = torch.get_num_threads()
        if hasattr(os, "sched_getaffinity"):
            n = min(n, len(os.sched_getaffinity(0)))
        self.device = device_time(self.rt.device.type, max(1, n))
        start, main = getattr(self.device, "start_cpu", 0.0), getattr(self.device, "start_main", 0.0)
        print(f"{START_LINE} cpu_seconds={start:.6f} main_cpu_seconds={main:.6f} threads={max(1, n)} "
              f"device={self.device.kind}", flush=True)
        self.summary.update(budget_clock=self.device.kind, budget_threads=max(1, n))
        private_tmp()  # temporary files go where the sandbox leaves writing alone
        with contextlib.suppress(OSError):
            cache_path().parent.mkdir(parents=True, exist_ok=True)  # the micro-batch cache's folder, likewise
        if self.hide_held_out:  # the held-out splits and other runs' checkpoints: unreadable from here on (Landlock)
            self.summary["sandbox"] = hide(held_out_files(self.cfg.data) + other_checkpoints(self.out_dir)).reason
        else:
            self.summary["sandbox"] = "held-out splits not hidden: a sweep's jobs share processes (a session never does)"
        install_sandbox(RESEARCH_DIR)
        self.research = research()
        return self.research

    def train(self, fwd, opt, batches) -> None:
        """The budgeted loop, under the wall-clock watchdog; `stalled` when stalls ate too much of it."""
        cfg = self.cfg
        if self.scorer is not None and not self.scorer.wait_ready():
            log.warning("the scorer process did not finish starting within 60 s; training starts anyway")
        self.rt.reset_peak_memory()
        self.summary["startup_seconds"] = process_age()  # process start to the first step: imports, data, model, probe
        clock = self.clock = BudgetClock(cfg.budget, cfg.batch.total_tokens, self.device)
        watchdog = threading.Timer(clock.deadline + cfg.budget.wall_grace, self.on_stuck) if clock.deadline else None
        if watchdog:
            watchdog.daemon = True
            watchdog.start()
        try:
            train_loop(fwd, opt, batches, clock, cfg, self.rt, self.accum, self.on_step,
                       self.memory if self.memory.simulated else None, self.research.train_step)
        finally:
            if watchdog:
                watchdog.cancel()
        if clock.stalled:
            self.summary.update(status=STALLED, error=(
                f"{clock.stalls} stalls took {clock.stalled_seconds:.1f} s of the device, more than "
                f"budget.stall_max_share={cfg.budget.stall_max_share} of the budget: the score is suspect; re-run "
                "the experiment"))

    def checkpoint_and_score(self) -> None:
        """Check that the harness was left alone, save the checkpoint, and (score=process) have it scored."""
        changed = library_changes(self.harness)
        if changed:
            raise RunFailed(TAMPERED, f"the research code rebinds {', '.join(changed[:5])}: the harness, its clock "
                                      "and the libraries are not part of the research surface")
        t0 = time.time()
        ckpt = save_checkpoint((self.out_dir or Path(tempfile.mkdtemp())) / CHECKPOINT, self.model,
                               config_dict(self.cfg), self.rt.device.type, self.rt.dtype_name)
        self.summary.update(checkpoint=str(ckpt), checkpoint_seconds=time.time() - t0,
                            device_seconds=self.device.seconds())  # the clock stops with the checkpoint written
        if isinstance(self.device, CpuTime):  # what the CPU clock's two figures were at the checkpoint
            cpu, loop = self.device.parts()
            self.summary.update(device_cpu_seconds=cpu, device_loop_thread_seconds=loop)
        if os.environ.get(FREEZE_ENV) == "1":  # the launcher counts the process tree and copies the checkpoint
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.scorer is not None:
            cpu = self.summary.get("device_cpu_seconds")  # this process's own count (a standalone run is not a verdict)
            score(self.scorer, ckpt, self.summary, training_cost(cpu, self.clock.tokens if self.clock else 0))

    # ------------------------------------------------------------------ callbacks
    def tracking_ready(self) -> None:
        """mlflow was imported and the run created while the model was built and warmed up."""
        self.tracker.wait_ready()  # a store that cannot be opened stops the run here, before counted training
        self.summary.update(mlflow_run_id=self.tracker.run_id, tracking_uri=self.tracker.uri)
        self.log_params()

    def log_params(self) -> None:
        """The run's params and source commit, once (at the end of warm-up, or at the end of a run that never got
        there: a budget spent during warm-up, a crash in the first steps)."""
        if self._params_logged or not self.tracker.active or self.facts is None:
            return
        self._params_logged = True
        self.summary.update(mlflow_run_id=self.tracker.run_id, tracking_uri=self.tracker.uri)
        self.tracker.log_params(run_params(self.cfg, self.facts, self.rt, self.accum, self.B, self.prov))
        self.tracker.set_tags({"mlflow.source.git.commit": self.prov["git_sha"]})

    def on_step(self, step: int, values: dict) -> None:
        clock, cfg = self.clock, self.cfg
        for f, loss in self.curve.add(clock.progress, values["loss"]):  # the lab reads these while the run trains
            print(f"{CURVE_LINE} fraction={f:.2f} loss={loss:.6f} step={step}", flush=True)
        if step == cfg.budget.warmup_steps:
            self.summary["warmup_seconds"] = clock.wall_seconds  # compilation and the first steps (counted; not in the step statistics)
            if self.tracker.enabled:
                self.tracking_ready()
        if len(clock.step_times) == 1 and cfg.budget.mode == "time":  # the first step after warm-up: a throughput
            warn_epochs(clock.tokens + clock.tokens_per_sec * (cfg.budget.seconds - clock.training_seconds),
                        self.train_tokens)
        if self.tracker.enabled:
            self.tracker.log_step(step, values)

    def on_stuck(self) -> None:
        """The watchdog: a step still running long after the ceiling (a hung device)."""
        self.finish(TIMEOUT, f"a training step was still running {self.clock.elapsed():.0f} s after training "
                               "began, past the hard wall-clock ceiling: the device hung; re-run the experiment")
        sys.stderr.write("run ended by the wall-clock watchdog (status timeout)\n")
        sys.stderr.flush()
        os._exit(3)

    def finish(self, status: str | None = None, error: str | None = None) -> dict:
        """Fill in the numbers, print the block, write summary.json, end the MLflow run; once only."""
        with self._lock:
            if self._result:
                return self._result
            s, clock, out_dir = self.summary, self.clock, self.out_dir
            if status:
                s.update(status=status, error=error, val_bpb=float("nan"))
            if "warmup_seconds" not in s:  # the run ended before its warm-up did (or never began)
                s["warmup_seconds"] = clock.wall_seconds if clock else 0.0
            fill_summary(s, self.cfg, self.rt, clock, self.facts, self.t_start)
            s.update(train_epochs=clock.tokens / self.train_tokens if clock and self.train_tokens else 0.0,
                     process_seconds=process_age(), curve=[list(p) for p in self.curve.points])
            print(format_summary(s), flush=True)
            self.log_params()  # a run that ended before its warm-up did still has its params
            path = out_dir / "summary.json" if out_dir is not None else None
            if path is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(s, indent=2, default=str))
            logs = sorted(out_dir.glob("*.log")) if out_dir is not None else []
            self.tracker.finish(s["status"], s, files=[p for p in [path, *logs] if p],
                                texts=run_texts(self.cfg, self.prov, out_dir),
                                step_times=clock.step_times if clock else None,
                                stalled_steps=clock.stalled_steps if clock else None,
                                first_step=self.cfg.budget.warmup_steps + 1)
            print(self.tracker.report(), flush=True)
            if self.tracker.not_logged and path is not None:
                s["tracking_error"] = "not logged to MLflow: " + "; ".join(self.tracker.not_logged)
                path.write_text(json.dumps(s, indent=2, default=str))
            self._result.update(s)
            return s


CHECKPOINTS = (".pt", ".pth", ".safetensors", ".ckpt", ".bin")


def other_checkpoints(out_dir: Path | None) -> list[Path]:
    """Every saved model under this project's output folders (and those the lab names in $OVERNIGHT_HIDE_ROOTS) but
    this run's own: what the training process hides from itself with the held-out splits. Red team of 2026-12-07
    (eighth session): a step recipe loaded the best earlier run's frozen checkpoint and was kept at -0.47, each
    confirmation run starting from the best so far: training outside the budget."""
    roots = {REPO / "outputs", *(Path(r) for r in os.environ.get(HIDE_ROOTS_ENV, "").split(os.pathsep) if r)}
    own = Path(os.path.realpath(out_dir)) if out_dir else None
    found = set()
    for root in roots:
        for d, _, files in os.walk(root):
            for name in files:
                if name.endswith(CHECKPOINTS):
                    real = Path(os.path.realpath(os.path.join(d, name)))
                    if not (own is not None and own in real.parents) and real.is_file():
                        found.add(real)
    return sorted(found)


def private_tmp() -> None:
    """A temporary directory of this run's own (made now, before the sandbox: its directory may be one the sandbox
    freezes, as /tmp is when the data cache lies below it), for Python's tempfile users (MLflow's artifact uploads)."""
    d = tempfile.mkdtemp(prefix="overnight-run-")
    os.environ["TMPDIR"] = d
    tempfile.tempdir = None  # gettempdir() reads $TMPDIR again


def prime_compiler(snapshot: dict) -> dict:
    """Dynamo patches nn.Module.__init__ and __setstate__ the first time a compiled function is entered (its
    mutation tracking). Check that nothing has been rebound so far, let Dynamo patch (a compiled no-op: only
    torch's code runs), and return the snapshot the end of the run is checked against."""
    changed = library_changes(snapshot)
    if changed:
        raise RunFailed(TAMPERED, f"the research code rebinds {', '.join(changed[:5])}: the harness, its clock "
                                  "and the libraries are not part of the research surface")
    torch.compile(lambda: None, backend="eager")()
    return library_snapshot(extra=HARNESS_MODULES)


def warn_epochs(tokens: float, train_tokens: int) -> None:
    """Say so in the log when a run will see its train split more than EPOCHS_WARNING times."""
    epochs = tokens / max(1, train_tokens)
    if epochs > EPOCHS_WARNING:
        log.warning("this run will see the train split about %.0f times (%.1fM tokens of training on %.2fM train "
                    "tokens): past ~%.0f epochs val_bpb measures memorisation more than learning; for this device use "
                    "more data: %s", epochs, tokens / 1e6, train_tokens / 1e6, EPOCHS_WARNING, BIGGER_DATA)


def pick_micro_batch(cfg: TrainConfig, rt: Runtime, memory: Memory, vocab: int) -> int:
    """batch.device_tokens=auto: the most sequences per micro-batch whose training step fits (src/harness/memory.py),
    probed on a throwaway model with the run's own model, optimizer and step recipe."""
    r = research()
    T, gcfg = cfg.model.sequence_len, r.GPTConfig.from_model_config(cfg.model, vocab)

    def try_step(b: int) -> None:
        model = r.GPT(gcfg).to(rt.device)
        model.init_weights()
        opt = r.build_optimizer(model, cfg.optimizer)
        x = torch.randint(0, vocab, (b, T), device=rt.device)
        r.train_step(model, opt, lambda: (x, x), step=0, progress=0.0, lr_mult=lr_multiplier(0.0, cfg.optimizer),
                   accum=1, optim_cfg=cfg.optimizer, autocast=rt.autocast)

    key = {"model": flatten(cfg.model), "vocab": vocab, "optimizer": flatten(cfg.optimizer),
           "total_tokens": cfg.batch.total_tokens}
    t0 = time.time()
    found, probed = memory.largest_fitting(key, candidates(cfg.batch.total_tokens, T), try_step)
    if found is None:
        raise RunFailed(OOM, oom_message(rt, 1, T, auto=True))
    how = (f"probed {', '.join(map(str, probed))} in {time.time() - t0:.1f} s" if probed else
           f"cached in {cache_path()}")
    log.info("batch.device_tokens=auto: %d sequences of %d tokens per micro-batch (%s)", found, T, how)
    return found


def config_dict(cfg: TrainConfig) -> dict:
    """The resolved config as plain data (what the checkpoint carries for the scorer)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def score(scorer: Scorer, ckpt: Path, summary: dict, cost: dict | None = None) -> None:
    """The scorer's verdict into the summary: val_bpb, or the status tampered/crash with its reason."""
    apply_verdict(summary, scorer.score(ckpt, cost=cost))


def main():
    """python -m src.train: compose conf/train.yaml, run, exit non-zero unless the run is ok."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from src.harness.config import register_configs, to_object
    from src.harness.data import PrepareError

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="train")
    def main(dcfg) -> float:
        cfg = to_object(dcfg)
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:  # name each job of a sweep by what it changes
            cfg.tracking.run_name = cfg.tracking.run_name or job_run_name(list(hc.overrides.task))
        try:
            summary = run(cfg, Path(hc.runtime.output_dir), hide_held_out=hc.mode == RunMode.RUN)
        except TrackingError as e:
            sys.exit(f"error: {e}")
        except PrepareError as e:  # e.g. data not prepared: the message names the prepare.py command
            if hc.mode == RunMode.RUN:
                sys.exit(f"error: {e}")
            raise
        except Exception:
            if hc.mode == RunMode.RUN:
                raise
            log.exception("job %s crashed (recorded in its summary.json and MLflow); the sweep goes on", hc.job.num)
            return float("nan")
        if summary["status"] == KILLED or (hc.mode == RunMode.RUN and summary["status"] not in (OK, DRY_RUN)):
            sys.exit(1)
        return summary.get("val_bpb", float("nan"))

    try:
        main()
    finally:
        gc.freeze()  # the run is over: spare the exit-time GC scan of torch's and mlflow's objects (~1-2 s)

