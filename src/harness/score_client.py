"""The starting side of the scorer (src/harness/score.py): start it, hand it a checkpoint, read its verdict.

Kept apart from the scorer itself so that what starts it (the lab's runner, the search process) does not
import torch: the scorer's own process does.

Usage: scorer = Scorer(cwd, log_path, env, cpus).start(); ...; verdict = scorer.score(checkpoint)
       apply_verdict(summary, verdict)
"""
from __future__ import annotations

import json
import os
import secrets
import select
import sys
import time
from dataclasses import asdict
from pathlib import Path
from subprocess import PIPE, Popen, TimeoutExpired
from typing import Optional

from src.harness.pinning import pin
from src.harness.status import CRASH, OK, TAMPERED, TIMEOUT

MARKER = "OVERNIGHT-SCORE"
READY = "OVERNIGHT-SCORER-READY"
SPLIT_ENV = "OVERNIGHT_SCORE_SPLIT"  # val (every run) | test (the held-out split, at a session's end only)
CHECKPOINT = "checkpoint.pt"  # in the run dir
_now = time.perf_counter


def stop(proc, *pipes) -> None:
    """Close our ends of a child's pipes (its cue to exit), give it 5 s, then kill it."""
    for f in pipes:
        try:
            f.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def eval_spec(cfg) -> dict:
    """How a run is scored, fixed by whoever starts the scorer from a config no research code could touch (the lab's
    session config; a standalone run's own, before its research code is imported): the data set, the row length,
    the eval batch and the slot's threads. The judge takes these from here, never from the checkpoint, whose config
    the training process wrote after its research code ran (red team 2026-12-07: a model that set its own
    ModelConfig.sequence_len past the split's length was scored as one long row without a twin)."""
    d = cfg if isinstance(cfg, dict) else asdict(cfg)
    return {"data": dict(d["data"]), "sequence_len": int(d["model"]["sequence_len"]),
            "eval_batch_tokens": d.get("eval_batch_tokens"), "threads": (d.get("device") or {}).get("threads")}


def training_cost(cpu_s: Optional[float], tokens: Optional[float], floor_per_token_s: Optional[float] = None
                  ) -> Optional[dict]:
    """What a run's training cost, for the judge's bound on its model hosts: CPU seconds of its counted training (the
    launcher's kernel count in the lab; the process's own in a standalone run) and the tokens it trained on, and
    the session baseline's CPU seconds per token when known (the judge allows the larger). None when the run's
    figures are unknown or zero (the hosts are then bounded only by the scorer's timeout)."""
    if not cpu_s or not tokens or cpu_s <= 0 or tokens <= 0:
        return None
    out = {"cpu_s": float(cpu_s), "tokens": float(tokens)}
    if floor_per_token_s and floor_per_token_s > 0:
        out["floor_per_token_s"] = float(floor_per_token_s)
    return out


def apply_verdict(summary: dict, verdict: dict) -> None:
    """The scorer's verdict into a run's summary: val_bpb and the scoring figures, and for anything but ok the
    status tampered (or crash) with the scorer's reason. The one mapping a standalone run and the lab's runner share."""
    summary["val_bpb"] = verdict.get("val_bpb", float("nan"))
    summary["score_seconds"] = verdict.get("total_seconds", 0.0)
    summary["score_threads"] = verdict.get("threads")  # the scorer keeps to the run's device.threads
    for k, v in (verdict.get("seconds") or {}).items():  # load, score
        summary[f"score_{k}_seconds"] = v
    if verdict.get("checks"):  # what was checked on the scored batches, and the hosts' sandbox
        summary["score_checks"] = verdict["checks"]
    if verdict.get("status") != OK:
        summary.update(status=TAMPERED if verdict.get("status") == TAMPERED else CRASH,
                       error=f"scorer: {verdict.get('reason', '')}")


# ---------------------------------------------------------------------------- the starting side

class Scorer:
    """Starts `python -m src.harness.score` early (torch imports while training runs) and reads its verdict.

    Started by the harness (train.py for a standalone run) or the lab's runner, never by research code.
    """

    def __init__(self, cwd: Path, log_path: Optional[Path] = None, env: Optional[dict] = None, cpus: tuple = (),
                 split: str = "val", spec: Optional[dict] = None):
        """cpus: the cores to pin it to (a lab worker's slot, Linux); () = wherever the OS puts it.
        split: val, or test (the held-out split: the lab's end-of-session figure, never a training run's).
        spec: how to score (`eval_spec`); None: the checkpoint's own config says (tests of the scorer alone)."""
        self.cwd, self.log_path, self.env, self.cpus = Path(cwd), log_path, env, tuple(cpus)
        self.split, self.spec = split, spec
        self.nonce = secrets.token_hex(16)
        self.proc: Optional[Popen] = None

    def start(self) -> "Scorer":
        log = open(self.log_path, "ab") if self.log_path else None
        try:
            # numpy's BLAS would start a thread pool at import: one thread keeps the judge fit to fork its hosts
            env = {**(self.env if self.env is not None else os.environ), "OPENBLAS_NUM_THREADS": "1",
                   SPLIT_ENV: self.split}
            self.proc = Popen([sys.executable, "-m", "src.harness.score"], cwd=self.cwd, env=env, stdin=PIPE,
                              stdout=PIPE, stderr=log if log else None, start_new_session=True,
                              preexec_fn=(lambda: pin(self.cpus)) if self.cpus else None)
        finally:
            if log:
                log.close()
        self.proc.stdin.write(f"{self.nonce}\n{json.dumps(self.spec)}\n".encode())
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

    def score(self, checkpoint: Path, timeout_s: float = 1800.0, cost: Optional[dict] = None) -> dict:
        """The verdict on `checkpoint`: {status: ok|tampered|crash|nan|timeout, val_bpb, reason, ...}.
        cost: what the run's training cost (training_cost); it bounds the CPU time the model hosts may spend."""
        if self.proc is None:
            self.start()
        try:
            out, _ = self.proc.communicate(f"{Path(checkpoint).resolve()}\n{json.dumps(cost)}\n".encode(),
                                           timeout=timeout_s)
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
            stop(self.proc, self.proc.stdin)
