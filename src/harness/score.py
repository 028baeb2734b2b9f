"""The scorer: val_bpb of a checkpoint, computed in its own process, after integrity checks.

The training process never opens the validation split and never computes the score. It saves
a checkpoint (weights + resolved config); this process loads the experiment's model code and
the checkpoint, checks the model, and scores it with the harness (src/harness/evaluate.py). The result
goes back on stdout as one line carrying a nonce that only the starter of this process knows
(it arrives on stdin before any research code is imported), so nothing the research code
prints can pass for it.

Checks, before scoring (a failure is the status `tampered` with the reason):
- library integrity: the functions of torch, torch.nn.functional, torch.Tensor, math, builtins
  and the harness modules are the same objects after the research code is imported and run;
- determinism: two forward passes on the same input agree;
- batch independence: a sequence's logits do not depend on the other rows of the batch;
- causality: logits at a position do not change when any later token changes (every position;
  random tokens in fp32, real validation text at the scoring dtype);
- no state across calls: the first scoring batch, re-scored at the end, gives the same nats.

Protocol: stdin line 1 = nonce (sent at start-up, so torch imports while training runs);
stdout `OVERNIGHT-SCORER-READY` once the imports are done (a standalone run waits for it before its
clock starts, so the scorer's start-up never competes with counted training); stdin line 2 =
checkpoint path (or EOF to quit). Stdout: `OVERNIGHT-SCORE <json>`.
Usage: scorer = Scorer(cwd, log_path).start(); ...train...; result = scorer.score(ckpt, timeout_s=600)
       python -m src.harness.score < (echo NONCE; echo run_dir/checkpoint.pt)
"""
from __future__ import annotations

import builtins
import json
import math
import os
import secrets
import select
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from subprocess import PIPE, Popen, TimeoutExpired  # bound now: research code imported later cannot swap them
from typing import Optional

import torch
import torch._dynamo  # noqa: F401  (importing it rebinds torch.manual_seed: import it before any snapshot)
import torch.nn.functional as F

import src.harness.data
import src.harness.evaluate
from src.harness.config import TrainConfig, to_object
from src.harness.data import load_prepared, val_tokens
from src.harness.device import DTYPES, Runtime
from src.harness.evaluate import evaluate_bpb, token_nats, windows
from src.harness.pinning import pin
from src.harness.status import CRASH, NAN, OK, TAMPERED, TIMEOUT

MARKER = "OVERNIGHT-SCORE"
READY = "OVERNIGHT-SCORER-READY"
CHECKPOINT = "checkpoint.pt"  # in the run dir
# Tolerance on logits: 20x the numeric noise measured between batch layouts of one input, at least
# FLOOR, at most CAP[dtype] (so a model cannot widen it for itself by being noisy on purpose).
FLOOR, NOISE_FACTOR = 1e-4, 20.0
CAP = {torch.float32: 1e-2, torch.bfloat16: 0.15, torch.float16: 0.05}
_now = time.perf_counter


class Tampered(Exception):
    """An integrity check failed: the reason, in words a researcher can act on."""


# ---------------------------------------------------------------------------- the checkpoint

def save_checkpoint(path: Path, model, cfg_dict: dict, device: str, dtype: str) -> Path:
    """Weights + the resolved config + the device type and autocast dtype the run trained with."""
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    tmp = Path(path).with_suffix(".tmp")
    torch.save({"model": state, "config": cfg_dict, "device": device, "dtype": dtype}, tmp)
    os.replace(tmp, path)
    return Path(path)


# ---------------------------------------------------------------------------- integrity

CLASSES = ("torch.Tensor", "torch._C.TensorBase", "torch.nn.Module")  # a new attribute here shadows a method


def _watched(extra: tuple = ()) -> dict:
    return {**{name: sys.modules[name] for name in extra if name in sys.modules},
            "torch": torch, "torch.nn.functional": F, "torch.Tensor": torch.Tensor,
            "torch._C.TensorBase": torch._C.TensorBase, "torch.nn.Module": torch.nn.Module, "torch.nn": torch.nn,
            "math": math, "builtins": builtins, "src.harness.evaluate": src.harness.evaluate, "src.harness.data": src.harness.data,
            "src.harness.score": sys.modules[__name__]}


def library_snapshot(extra: tuple = ()) -> dict:
    """Identity of every function and class of the watched modules and classes (plus the modules in `extra`).
    Plain data (time.tzname, ...) is left out: libraries update it as they run."""
    return {(name, attr): id(value) for name, mod in _watched(extra).items() for attr, value in list(vars(mod).items())
            if callable(value) or isinstance(value, (staticmethod, classmethod, property))}


def library_changes(before: dict) -> list[str]:
    """What was rebound or removed since `before` was taken, and what was added to a watched class.
    (Attributes added to modules are not compared: torch adds submodules as they are imported.)"""
    now = library_snapshot(tuple({name for name, _ in before}))
    changed = {f"{name}.{attr}" for (name, attr), ident in before.items() if now.get((name, attr)) != ident}
    changed |= {f"{name}.{attr}" for (name, attr) in now if name in CLASSES and (name, attr) not in before}
    return sorted(changed)


class Checker:
    """The integrity checks, in one numeric mode (the scoring autocast, or plain fp32)."""

    def __init__(self, model, vocab: int, seq_len: int, device, autocast, dtype, seed: int = 1234):
        self.model, self.vocab, self.T, self.device, self.autocast = model, vocab, seq_len, device, autocast
        self.cap = CAP.get(dtype, 0.15)
        self.atol = self.cap
        self.gen = torch.Generator().manual_seed(seed)

    def calibrate(self, rows: int) -> float:
        """Set the tolerance from the noise between batch layouts of the same sequence (an honest model's only)."""
        x = self.random_ids(1)
        alone, copies = self.logits(x)[0], self.logits(x.repeat(max(2, rows), 1))
        noise = max(self._same(alone, copies[0]), self._same(alone, copies[-1]))
        self.atol = min(self.cap, max(FLOOR, NOISE_FACTOR * noise))
        return self.atol

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.model(x.to(self.device))
        if not isinstance(out, torch.Tensor) or out.shape != (*x.shape, self.vocab):
            raise Tampered(f"the model returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))} for input "
                           f"ids {tuple(x.shape)}; the contract is logits (B, T, vocab={self.vocab})")
        return out.float().cpu()

    def random_ids(self, rows: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (rows, self.T), generator=self.gen)

    def _same(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max()) if a.numel() else 0.0

    def determinism(self) -> None:
        x = self.random_ids(2)
        d = self._same(self.logits(x), self.logits(x))
        if not d <= self.atol:
            raise Tampered(f"determinism: two forward passes on the same input differ by {d:.3g} (tolerance "
                           f"{self.atol}); the model must not keep state between calls or depend on randomness in eval")

    def batch_independence(self, x: torch.Tensor) -> None:
        """Row 0 alone, in the batch `x`, and in `x` with its other rows replaced, gives the same logits."""
        full = self.logits(x)
        alone = self.logits(x[:1])
        other = x.clone()
        other[1:] = self.random_ids(len(x) - 1) if len(x) > 1 else other[1:]
        mixed = self.logits(other)
        d = max(self._same(full[0], alone[0]), self._same(full[0], mixed[0]))
        if not d <= self.atol:
            raise Tampered(f"batch independence: a sequence's logits change by {d:.3g} with the other rows of the "
                           f"batch (tolerance {self.atol}); each sequence must be scored on its own tokens only")

    def causality(self, x: torch.Tensor, future: torch.Tensor, rows_per_pass: int) -> None:
        """For every position t: replace the tokens after t (with `future`'s) and compare logits up to t."""
        x, future = x.reshape(1, -1)[:, : self.T], future.reshape(1, -1)[:, : self.T]
        T = x.size(1)
        base = self.logits(x)[0]
        for c0 in range(0, T - 1, rows_per_pass):
            cuts = list(range(c0, min(T - 1, c0 + rows_per_pass)))
            batch = x.repeat(len(cuts), 1)
            for i, c in enumerate(cuts):
                batch[i, c + 1:] = future[0, c + 1:]
            out = self.logits(batch)
            for i, c in enumerate(cuts):
                d = self._same(out[i, : c + 1], base[: c + 1])
                if not d <= self.atol:
                    raise Tampered(f"causality: the logits at positions <= {c} change by {d:.3g} when the tokens after "
                                   f"position {c} change (tolerance {self.atol}); attention may only look back")


# ---------------------------------------------------------------------------- scoring

@contextmanager
def strict_fp32():
    """No TF32 (a research file may switch it on): fp32 checks then see fp32 noise only."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def build_model(ckpt: dict):
    """The experiment's model from its own code (imported here, after the snapshot) and the checkpoint."""
    from omegaconf import OmegaConf

    cfg = to_object(OmegaConf.create(ckpt["config"]), TrainConfig)
    from src.research.model import GPT, GPTConfig  # the research code: imported only now

    model = GPT(GPTConfig.from_model_config(cfg.model, cfg.data.vocab_size))
    model.load_state_dict(ckpt["model"], strict=True)
    return cfg, model


def score_checkpoint(path: Path, snapshot: dict, log=sys.stderr) -> dict:
    """Load, check and score one checkpoint; returns the result (status ok | tampered | crash)."""
    t0 = _now()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg, model = build_model(ckpt)
    if cfg.device.threads:  # the run's share of the machine (on a busy CPU, more threads than cores is far slower)
        torch.set_num_threads(cfg.device.threads)
    device, dtype = torch.device(ckpt["device"]), DTYPES[ckpt["dtype"]]
    rt = Runtime(device=device, dtype=dtype, compile=False, peak_flops=0.0, name=ckpt["device"])
    model.to(device).eval()
    changed = library_changes(snapshot)
    if changed:
        raise Tampered(f"library integrity: the research code rebinds {', '.join(changed[:5])}"
                       f"{' ...' if len(changed) > 5 else ''}; it may not change the harness or the libraries")
    data = load_prepared(cfg.data, splits=("val",))
    val = val_tokens(data, cfg.data.eval_tokens)
    T = cfg.model.sequence_len
    eval_bs = max(1, (cfg.eval_batch_tokens or rt.eval_batch_tokens) // T)
    t_load = _now()
    rows = max(2, min(64, eval_bs))
    fp32 = Checker(model, cfg.data.vocab_size, T, device, nullcontext, torch.float32)
    chk = Checker(model, cfg.data.vocab_size, T, device, rt.autocast, dtype)
    with strict_fp32():
        fp32.calibrate(rows)
        fp32.causality(fp32.random_ids(1), fp32.random_ids(1), rows)
    tolerances = {"fp32": fp32.atol, ckpt["dtype"]: chk.calibrate(rows)}
    chk.determinism()
    first = val[: min(eval_bs, max(1, (len(val) - 1) // T)) * T].view(-1, T) if len(val) > T else val[:T].view(1, -1)
    chk.batch_independence(first if len(first) > 1 else chk.random_ids(2))
    if len(val) >= 2 * T:  # real text at the scoring dtype (random tokens were checked in fp32 above)
        chk.causality(val[:T], val[T: 2 * T], rows)
    else:
        chk.causality(chk.random_ids(1), chk.random_ids(1), rows)
    t_checks = _now()
    first_nats = _first_batch_nats(chk, val, T, eval_bs)
    bpb = evaluate_bpb(model, val, torch.from_numpy(data.token_bytes), T, eval_bs, device, rt.autocast,
                       progress=log.isatty() if hasattr(log, "isatty") else False)
    again = _first_batch_nats(chk, val, T, eval_bs)
    if not abs(again - first_nats) <= 1e-6 * max(1.0, abs(first_nats)) + chk.atol:
        raise Tampered(f"state across calls: the first scoring batch gave {first_nats:.6f} nats before scoring and "
                       f"{again:.6f} after; the model must not remember earlier inputs")
    changed = library_changes(snapshot)
    if changed:
        raise Tampered(f"library integrity: the research code rebinds {', '.join(changed[:5])} while scoring")
    if not math.isfinite(bpb):
        return {"status": NAN, "val_bpb": float("nan"), "reason": "val_bpb is not finite"}
    t_end = _now()
    return {"status": OK, "val_bpb": bpb, "reason": "", "device": str(device), "dtype": ckpt["dtype"],
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "tolerances": tolerances,
            "seconds": {"load": t_load - t0, "checks": t_checks - t_load, "score": t_end - t_checks}}


def _first_batch_nats(chk: Checker, val: torch.Tensor, T: int, eval_bs: int) -> float:
    start, rows, length = windows(val.numel(), T, eval_bs)[0]
    chunk = val[start: start + rows * length + 1]
    x, y = chunk[:-1].view(rows, length), chunk[1:].view(rows, length)
    return float(token_nats(chk.logits(x), y).sum())


def main() -> int:
    nonce = sys.stdin.readline().strip()
    snapshot = library_snapshot()  # before any research code is imported
    out = sys.stdout
    out.write(f"{READY}\n")
    out.flush()
    path = sys.stdin.readline().strip()
    if not path:
        return 0
    t0 = _now()
    try:
        result = score_checkpoint(Path(path), snapshot)
    except Tampered as e:
        result = {"status": TAMPERED, "val_bpb": float("nan"), "reason": str(e)}
    except Exception as e:  # the research code crashed while being loaded, checked or scored
        import traceback

        traceback.print_exc(file=sys.stderr)
        result = {"status": CRASH, "val_bpb": float("nan"), "reason": f"scoring failed: {type(e).__name__}: {e}"}
    result.update(nonce=nonce, total_seconds=_now() - t0)
    out.write(f"\n{MARKER} {json.dumps(result)}\n")
    out.flush()
    return 0


def apply_verdict(summary: dict, verdict: dict) -> None:
    """The scorer's verdict into a run's summary: val_bpb and the scoring figures, and for anything but ok the
    status tampered (or crash) with the scorer's reason. The one mapping a standalone run and the lab's runner share."""
    summary["val_bpb"] = verdict.get("val_bpb", float("nan"))
    summary["score_seconds"] = verdict.get("total_seconds", 0.0)
    summary["score_threads"] = verdict.get("threads")  # the scorer keeps to the run's device.threads
    for k, v in (verdict.get("seconds") or {}).items():  # load, checks, score
        summary[f"score_{k}_seconds"] = v
    if verdict.get("status") != OK:
        summary.update(status=TAMPERED if verdict.get("status") == TAMPERED else CRASH,
                       error=f"scorer: {verdict.get('reason', '')}")


# ---------------------------------------------------------------------------- the starting side

class Scorer:
    """Starts `python -m src.harness.score` early (torch imports while training runs) and reads its verdict.

    Started by the harness (train.py for a standalone run) or the lab's runner, never by research code.
    """

    def __init__(self, cwd: Path, log_path: Optional[Path] = None, env: Optional[dict] = None, cpus: tuple = ()):
        """cpus: the cores to pin it to (a lab worker's slot, Linux); () = wherever the OS puts it."""
        self.cwd, self.log_path, self.env, self.cpus = Path(cwd), log_path, env, tuple(cpus)
        self.nonce = secrets.token_hex(16)
        self.proc: Optional[Popen] = None

    def start(self) -> "Scorer":
        log = open(self.log_path, "ab") if self.log_path else None
        try:
            self.proc = Popen([sys.executable, "-m", "src.harness.score"], cwd=self.cwd, env=self.env, stdin=PIPE,
                              stdout=PIPE, stderr=log if log else None, start_new_session=True,
                              preexec_fn=(lambda: pin(self.cpus)) if self.cpus else None)
        finally:
            if log:
                log.close()
        self.proc.stdin.write(f"{self.nonce}\n".encode())
        self.proc.stdin.flush()
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Block until the scorer has done its imports (its start-up then no longer competes for the
        cores); False when it did not say so in time (it may be slow or dead: score() reports that)."""
        if self.proc is None or self.proc.stdout is None:
            return False
        fd, got, deadline = self.proc.stdout.fileno(), b"", _now() + timeout_s
        while (left := deadline - _now()) > 0 and select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 1024)  # unbuffered: score()'s communicate() reads the same pipe later
            if not chunk:  # it exited
                return False
            got += chunk
            if READY.encode() in got:
                return True
        return False

    def score(self, checkpoint: Path, timeout_s: float = 1800.0) -> dict:
        """The verdict on `checkpoint`: {status: ok|tampered|crash|nan|timeout, val_bpb, reason, ...}."""
        if self.proc is None:
            self.start()
        try:
            out, _ = self.proc.communicate(f"{Path(checkpoint).resolve()}\n".encode(), timeout=timeout_s)
        except TimeoutExpired:
            self.close()
            return {"status": TIMEOUT, "val_bpb": float("nan"), "reason": f"scoring took over {timeout_s:.0f} s"}
        return self.verdict(out.decode(errors="replace"))

    def verdict(self, stdout: str) -> dict:
        """The one result line carrying our nonce; anything else the process printed is ignored."""
        for line in reversed(stdout.splitlines()):
            if line.startswith(MARKER + " "):
                try:
                    r = json.loads(line[len(MARKER) + 1:])
                except ValueError:
                    continue
                if isinstance(r, dict) and r.get("nonce") == self.nonce:
                    r.pop("nonce")
                    return r
        return {"status": CRASH, "val_bpb": float("nan"),
                "reason": f"the scorer gave no result (exit code {self.proc.returncode if self.proc else None}); "
                          "see score.log"}

    def close(self) -> None:
        """Stop a scorer that is still waiting or running (a failed run is never scored)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
