"""Paired confirmation of a would-be keep: the best and the candidate re-run back to back.

A run that passed the screen was selected for being low, so it cannot confirm itself. Instead
the current best (B) and the candidate (C) run in pairs, adjacent in time so that the machine's
drift (throughput moves within minutes on a shared CPU) hits both alike, in alternating order
(B C, then C B, ...); every run is a ledger row of its own (exp-004-b1, exp-004-c1, status
`confirm`). The decision is src/lab/decision.py's paired rule on the differences C - B. A
disturbed confirmation run leaves the experiment undecided (`disturbed`); a crashed one
discards it.

Usage: result = Confirmation(lab, attempts, record).run(row, best, commit, overrides, rows, noise)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

from src.lab.attempts import Attempts
from src.lab.context import Lab
from src.lab.decision import NoiseFloor, Verdict, decide, paired
from src.lab.ledger import Experiment, confirmation_id
from src.lab.standings import Best
from src.lab.decisions import CONFIRM, CRASH, DISCARD, DISTURBED, OK, PENDING

log = logging.getLogger(__name__)


@dataclass
class Confirmed:
    decision: str  # keep | discard | disturbed
    verdict: Optional[Verdict]  # the paired rule's, when all pairs ran
    reason: str
    candidate_runs: list[float] = field(default_factory=list)  # val_bpb of the candidate's confirmation runs


class Confirmation:
    def __init__(self, lab: Lab, attempts: Attempts, record: Callable[[Experiment, list[Experiment]], Experiment]):
        self.lab, self.attempts, self.record = lab, attempts, record

    def pairs(self, noise: NoiseFloor) -> int:
        """search.confirm_pairs, or 2 while sigma has under 2 dof.

        With 0 dof the pairs must measure sigma themselves. With 1 dof (the default two baseline
        runs) a single pair faces t(0.95, 1) = 6.31 on a sigma from one difference: a real gain of
        ten sigmas can be turned down (measured: a 0.09 bpb gain against a threshold of 0.128). A
        second pair brings the dof to 2 (t = 2.92) and halves the variance of d.
        """
        n = self.lab.cfg.search.confirm_pairs
        return n if noise.dof >= 2 else max(2, n)

    def run(self, e: Experiment, best: Best, commit: str, overrides: list[str], rows: list[Experiment],
            noise: NoiseFloor) -> Confirmed:
        """Run the pairs of experiment row `e` (screened) and apply the paired rule.

        noise: the floor from the runs before this experiment, independent of its pairs.
        """
        s = self.lab.cfg.search
        sides = {"b": (best.commit, best.overrides, f"the best ({best.exp}) re-run"),
                 "c": (commit, overrides, "the candidate re-run")}
        diffs, cand = [], []
        n = self.pairs(noise)
        log.info("%s beat the best by %.4f (margin %.4f): confirming with %d back-to-back pair(s)", e.exp,
                 -(e.delta or 0.0), e.margin or 0.0, n)
        for i in range(n):
            got = {}
            for side in ("bc" if i % 2 == 0 else "cb"):
                c, ovs, what = sides[side]
                row = self._one(e, side, c, ovs, f"confirmation of {e.exp}, pair {i + 1} of {n}: {what}")
                if row.status != CONFIRM:
                    return self._not_standing(row, cand)
                got[side] = row.runs[0]
            cand.append(got["c"])
            diffs.append(got["c"] - got["b"])
        v = paired(diffs, noise, s.confirm_alpha, s.min_delta)
        return Confirmed(v.decision, v, v.note, cand)

    def rerun(self, e: Experiment, best: Best, commit: str, overrides: list[str], margin: float) -> Confirmed:
        """One run of a rebased candidate, screened against the best (when no paired confirmation is due):
        the screen run ran on an older parent, so the candidate as it would be kept needs a score of its own."""
        row = self._one(e, "c", commit, overrides, f"re-run of {e.exp} rebased on the best ({best.exp}), screened")
        if row.status != CONFIRM:
            return self._not_standing(row, [])
        v = decide(row.runs[0], best.val_bpb, margin)
        return Confirmed(v.decision, v, f"re-run on the best: {v.delta:+.4f} against the margin {margin:.4f}",
                         [row.runs[0]])

    @staticmethod
    def _not_standing(row: Experiment, cand: list[float]) -> Confirmed:
        """A confirmation run that did not give a score: disturbed leaves the experiment undecided, else discard."""
        if row.status == DISTURBED:
            return Confirmed(DISTURBED, None, f"confirmation run {row.exp} was disturbed ({row.reason}): "
                                              "left undecided", cand)
        return Confirmed(DISCARD, None, f"confirmation run {row.exp} failed ({row.run_status}: {row.reason})", cand)

    def _one(self, e: Experiment, side: str, commit: str, overrides: list[str], description: str) -> Experiment:
        """One confirmation run, recorded as its own ledger row."""
        lab = self.lab
        rows = lab.rows()
        cid = confirmation_id(rows, e.exp, side)
        lab.ledger.save(cid, None, overrides, commit=commit)
        row = Experiment(exp=cid, status=PENDING, description=description, commit=commit, kind=CONFIRM,
                         hypothesis=f"re-run back to back with its pair, for {e.exp}'s paired confirmation",
                         overrides=" ".join(overrides), overrides_in_effect=list(overrides))
        a = self.attempts.run(cid, commit, overrides, 0, rows)
        a.fill(row)
        out = a.out
        if out.status == OK and out.val_bpb is not None:
            row.status, row.val_bpb, row.values = CONFIRM, out.val_bpb, [out.val_bpb]
        elif out.status == DISTURBED:
            row.status, row.reason = DISTURBED, a.disturbed_note
        else:
            row.status, row.reason = CRASH, out.error_line
        if a.rerun_note and row.status != DISTURBED:
            row.reason = a.rerun_note + "; re-run"
        return self.record(row, rows, out)
