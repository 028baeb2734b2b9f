"""Disturbed runs: a run whose throughput is far below what the session measured for its shape.

A busy machine (another program on the cores, a noisy neighbour, thermal throttling) slows a
whole run down uniformly; the stall detector, which looks for single slow steps, does not see
it, yet in a time budget the run trains on fewer tokens and scores worse. Such a run says
nothing about the code, so it is re-run (search.disturbed_retries) and never feeds the noise
floor nor a keep or a discard.

The shape of a run is what fixes its speed: the code (the tree of src/ at its commit), the model
and batch configs, the device and dtype. A busy machine only ever slows a run down, so the
reference for a shape is the fastest undisturbed run the session has of it:
    slowdown = max(reference tokens/s / tokens/s, step_time_p50 / reference step_time_p50)
and the run is disturbed when slowdown > search.disturbed_factor. A shape the session has not
run yet is compared by MFU (FLOP/s over the device's peak, which is comparable across shapes)
with the session's best MFU, with the looser search.disturbed_factor_new_shape. A re-run that is
as slow again is no proof that the code itself is slow (a busy machine often stays busy for
minutes): code that really is that inefficient stays `disturbed`, with its MFU in the reason.
Token budgets are not judged: there a slow run trains on the same tokens and scores the same.

Usage: tp = Throughput.of(summary); j = judge(tp, shape, rows, factor=2.0, factor_new=3.0)
       if j.disturbed: ...re-run...
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Optional

from src.lab.ledger import Experiment


@dataclass(frozen=True)
class Throughput:
    tokens_per_sec: float
    step_time_p50: float  # seconds; 0 when unknown
    mfu: float  # percent; 0 when unknown (no peak FLOP/s for the device)

    @classmethod
    def of(cls, summary: dict) -> Optional["Throughput"]:
        """From a run's summary.json; None when the run reported no throughput."""
        def num(k):
            v = summary.get(k)
            return float(v) if isinstance(v, (int, float)) and v == v and v > 0 else 0.0

        tps = num("tokens_per_sec")
        return cls(tps, num("step_time_p50"), num("mfu_percent")) if tps > 0 else None

    @classmethod
    def of_row(cls, e: Experiment) -> Optional["Throughput"]:
        return cls(e.tokens_per_sec, e.step_time_p50 or 0.0, e.mfu_percent or 0.0) if e.tokens_per_sec else None

    def describe(self) -> str:
        return f"{self.tokens_per_sec:,.0f} tokens/s, step p50 {self.step_time_p50:.3f} s, MFU {self.mfu:.1f}%"


@dataclass(frozen=True)
class Judgement:
    disturbed: bool
    slowdown: float  # times slower than the reference (1.0: as fast); 0 when there was nothing to compare with
    note: str  # the figures, for the ledger's reason, the log and MLflow


def shape_key(code: str, model_cfg, batch_cfg, summary: dict) -> str:
    """A short id of what fixes a run's speed: code tree, model and batch configs, device and dtype."""
    fields = {"code": code, "model": asdict(model_cfg), "batch": asdict(batch_cfg),
              "device": str(summary.get("device", "")), "dtype": str(summary.get("dtype", ""))}
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]


def slowdown(run: Throughput, ref: Throughput) -> float:
    """How many times slower `run` is than `ref`, by tokens/s and (when both have it) median step time."""
    s = ref.tokens_per_sec / run.tokens_per_sec
    if run.step_time_p50 > 0 and ref.step_time_p50 > 0:
        s = max(s, run.step_time_p50 / ref.step_time_p50)
    return s


def reference(rows: list[Experiment], shape: str) -> tuple[Optional[Throughput], str]:
    """The fastest undisturbed run of `shape` in the ledger (and its exp), or (None, '')."""
    same = [(Throughput.of_row(e), e.exp) for e in rows if e.shape == shape and e.runs and e.tokens_per_sec]
    if not same:
        return None, ""
    tp, exp = max(same, key=lambda x: x[0].tokens_per_sec)
    p50s = [t.step_time_p50 for t, _ in same if t.step_time_p50 > 0]
    return Throughput(tp.tokens_per_sec, min(p50s) if p50s else 0.0, tp.mfu), exp


def judge(run: Optional[Throughput], shape: str, rows: list[Experiment], factor: float, factor_new: float) -> Judgement:
    """Is this run disturbed? rows: the ledger so far (its undisturbed runs are the reference)."""
    if run is None:
        return Judgement(False, 0.0, "no throughput reported: not judged")
    ref, ref_exp = reference(rows, shape)
    if ref is not None:
        s = slowdown(run, ref)
        note = (f"{s:.2f}x slower than {ref_exp}, the session's fastest run of this shape ({run.describe()} vs "
                f"{ref.tokens_per_sec:,.0f} tokens/s)")
        return Judgement(s > factor, s, note)
    mfus = [(e.mfu_percent, e.exp) for e in rows if e.runs and e.mfu_percent]
    if run.mfu <= 0 or not mfus:
        return Judgement(False, 0.0, "the session's first run of its kind: nothing to compare with")
    best_mfu, best_exp = max(mfus)
    s = best_mfu / run.mfu
    note = (f"a new shape: MFU {run.mfu:.1f}% is {s:.2f}x below the session's best ({best_mfu:.1f}%, {best_exp})")
    return Judgement(s > factor_new, s, note)
