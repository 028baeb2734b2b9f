"""Paired confirmation of a would-be keep: the best and the candidate re-run side by side, or back to back.

A run that passed the screen was selected for being low, so it cannot confirm itself. Instead
the current best (B) and the candidate (C) run in pairs, together in time so that the machine's
drift (throughput moves within minutes on a shared CPU) hits both alike. With a second worker to
borrow (search.workers > 1, src/lab/leases.py) the two runs of a pair run at the same time, one on
each worker, the workers swapping sides from one pair to the next (pair 1: B here, C there; pair 2:
C here, B there); with one worker they run back to back, in alternating order (B C, then C B, ...).
Either way every run is a ledger row of its own (exp-004-b1, exp-004-c1, status `confirm`; the
`worker` column says where it ran) and the decision is src/lab/decision.py's paired rule on the
differences C - B, the same pairs and the same rule. A disturbed confirmation run leaves the
experiment undecided (`disturbed`); a crashed one discards it.

Usage: result = Confirmation(lab, attempts, record, second).run(row, best, commit, overrides, rows, noise)
       (record(row, rows, out, worker) writes a row; second(commit): a context giving another worker's
       Attempts, or None)
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

from src.lab.attempts import Attempts
from src.lab.context import Lab
from src.lab.decision import NoiseFloor, Verdict, decide, paired, retest_batch, retest_look
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

    def apply(self, e: Experiment, runs: list[float]) -> None:
        """Onto the experiment's row: the decision, the paired rule's mean difference and threshold (none for an
        undecided one), and val_bpb the mean of `runs` (the candidate's runs that stand for it; each stays on its
        own row)."""
        e.status = self.decision
        if self.verdict is not None:
            e.delta, e.margin = self.verdict.delta, self.verdict.margin
        if self.decision == DISTURBED:
            e.delta = None
        if runs:
            e.val_bpb = sum(runs) / len(runs)


class Confirmation:
    def __init__(self, lab: Lab, attempts: Attempts, record: Callable[..., Experiment],
                 second: Optional[Callable[[str], ContextManager[Optional[Attempts]]]] = None):
        self.lab, self.attempts, self.record = lab, attempts, record
        self.second = second or (lambda commit: nullcontext(None))

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
        """Run the pairs of experiment row `e` (screened) and apply the paired rule; a failed confirmation whose pairs
        still favour the candidate goes on as a near miss's retest (search.retest).

        noise: the floor from the runs before this experiment, independent of its pairs.
        """
        s = self.lab.cfg.search
        diffs, cand = [], []
        n = self.pairs(noise)
        with self.second(best.commit) as other:
            log.info("%s beat the best by %.4f (margin %.4f): confirming with %d pair(s) %s", e.exp,
                     -(e.delta or 0.0), e.margin or 0.0, n,
                     f"side by side on w{self.attempts.worker.index} and w{other.worker.index}" if other
                     else "back to back")
            stop = self._more(e, best, commit, overrides, other, diffs, cand, n, f"of {n}")
            if stop is not None:
                return stop
            v = paired(diffs, noise, s.confirm_alpha, s.min_delta)
            if v.keep or not (s.retest and sum(diffs) < 0 and len(diffs) < s.retest_pairs):
                return Confirmed(v.decision, v, v.note, cand)
            r = self._retest(e, best, commit, overrides, other, diffs, cand, noise)
            return Confirmed(r.decision, r.verdict, f"{v.note}; still favours it: {r.reason}", cand)

    def retest(self, e: Experiment, best: Best, commit: str, overrides: list[str], noise: NoiseFloor) -> Confirmed:
        """A near miss (its screen run beat the best, by less than the margin): (best, candidate) pairs, one at a time,
        until the paired rule at search.retest_alpha / retest_pairs keeps it, the pairs' mean could not pass it even
        after retest_pairs pairs (out_of_reach: a mean that no longer favours it, or too small a gain), or
        retest_pairs pairs ran. Each look spends its share of retest_alpha (Bonferroni), so under no real change the
        retest keeps with probability at most retest_alpha whatever it saw on the way; the screen run is not part of
        the evidence (it was selected for being low)."""
        diffs, cand = [], []
        with self.second(best.commit) as other:
            log.info("%s: a near miss (%.4f below the best, margin %.4f): retesting in pairs %s", e.exp,
                     -(e.delta or 0.0), e.margin or 0.0, "side by side" if other else "back to back")
            return self._retest(e, best, commit, overrides, other, diffs, cand, noise)

    def _retest(self, e: Experiment, best: Best, commit: str, overrides: list[str], other: Optional[Attempts],
                diffs: list[float], cand: list[float], noise: NoiseFloor) -> Confirmed:
        s = self.lab.cfg.search
        k = s.retest_pairs
        while True:  # at least one look: the callers leave room for one more pair (len(diffs) < k)
            stop = self._more(e, best, commit, overrides, other, diffs, cand, retest_batch(diffs, noise),
                              f"of up to {k} (retest)")
            if stop is not None:
                return stop
            v, done = retest_look(diffs, noise, s)
            if done:
                break
        why = ("kept" if v.keep else "stopped: the pairs no longer favour it" if sum(diffs) >= 0
               else f"not kept after {len(diffs)} pairs" if len(diffs) >= k
               else f"stopped after {len(diffs)} pairs: their mean could not pass the rule even at {k}")
        return Confirmed(v.decision, v, f"retest ({why}, each look at alpha {s.retest_alpha}/{k}): {v.note}", cand)

    def _more(self, e: Experiment, best: Best, commit: str, overrides: list[str], other: Optional[Attempts],
              diffs: list[float], cand: list[float], n: int, of: str) -> Optional[Confirmed]:
        """n more pairs, their differences appended to diffs (the candidate's runs to cand); a run that does not
        stand ends it (returned)."""
        sides = {"b": (best.commit, best.overrides, f"the best ({best.exp}) re-run"),
                 "c": (commit, overrides, "the candidate re-run")}
        for _ in range(n):
            i = len(diffs)
            got = {}
            for side, row in self._pair(e, "bc" if i % 2 == 0 else "cb", sides, f"pair {i + 1} {of}", other):
                if row.status != CONFIRM:
                    return self._not_standing(row, cand)
                got[side] = row.runs[0]
            cand.append(got["c"])
            diffs.append(got["c"] - got["b"])
        return None

    def _pair(self, e: Experiment, order: str, sides: dict, which: str, other: Optional[Attempts]):
        """One pair's (side, row)s: order[0] on this worker and order[1] on the other at the same time, or (no
        other worker) one after the other, stopping at the first that does not stand."""
        def one(side: str, attempts: Attempts) -> Experiment:
            c, ovs, what = sides[side]
            return self._one(e, side, c, ovs, f"confirmation of {e.exp}, {which}: {what}", attempts)

        if other is None:
            for side in order:
                row = one(side, self.attempts)
                yield side, row
                if row.status != CONFIRM:
                    return
            return
        with cf.ThreadPoolExecutor(1, thread_name_prefix="pair") as ex:
            there = ex.submit(one, order[1], other)
            try:
                here = one(order[0], self.attempts)
            except BaseException:  # Ctrl-C stops both runs: the other one records itself, then this one raises
                cf.wait([there])
                raise
            rows = [(order[0], here), (order[1], there.result())]
        yield from rows

    def rerun(self, e: Experiment, best: Best, commit: str, overrides: list[str], margin: float) -> Confirmed:
        """One run of a rebased candidate, screened against the best (when no paired confirmation is due):
        the screen run ran on an older parent, so the candidate as it would be kept needs a score of its own."""
        row = self._one(e, "c", commit, overrides, f"re-run of {e.exp} rebased on the best ({best.exp}), screened",
                        self.attempts)
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

    def _one(self, e: Experiment, side: str, commit: str, overrides: list[str], description: str,
             attempts: Attempts) -> Experiment:
        """One confirmation run on `attempts`' worker, recorded as its own ledger row."""
        lab = self.lab
        rows = lab.rows()
        cid = confirmation_id(rows, e.exp, side)
        lab.ledger.save(cid, None, overrides, commit=commit)
        row = Experiment(exp=cid, status=PENDING, description=description, commit=commit, kind=CONFIRM,
                         hypothesis=f"re-run together with its pair, for {e.exp}'s paired confirmation",
                         overrides=" ".join(overrides), overrides_in_effect=list(overrides))
        a = attempts.run(cid, commit, overrides, 0, rows)
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
        return self.record(row, rows, out, attempts.worker)
