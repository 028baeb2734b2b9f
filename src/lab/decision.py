"""Keep or discard: the noise floor from repeated runs, the screen margin and the paired confirmation rule.

Re-running identical code moves val_bpb (time budgets on a shared machine, MPS stalls), so a
single lower number is not a finding. The noise floor is the pooled standard deviation of every
group of runs of one identical configuration (the baseline repeats, confirmation re-runs), each
group first cleared of runs that lie implausibly far from its median (`inliers`), so that one
wild run cannot inflate sigma. Two rules use it:

- the screen: a run is a candidate for keeping when val_bpb < best - margin, margin =
  max(noise_sigmas * sigma, min_delta); without confirmation this is the decision;
- the paired confirmation (`paired`): the candidate and the best are re-run together in n
  pairs; with d = mean(candidate - best) over the pairs, keep iff
      -d > max(min_delta, t(1 - alpha, dof) * sigma * sqrt(2 / n)),
  a one-sided t-test whose sigma pools the noise floor with the pairs' own spread. Under the null
  (no real change) it keeps with probability alpha at any dof, a weak estimate included: a small
  dof makes t large (t(0.95, 1) = 6.31).

Usage: noise = NoiseFloor.pooled([[2.61, 2.64]]); margin = noise.margin(2.0, 0.002)
       verdict = decide(2.55, best=2.625, margin=margin)   # -> Verdict("keep", -0.075, ...)
       verdict = paired([-0.05], noise, alpha=0.05, min_delta=0.002)
"""
from __future__ import annotations

from src.lab.decisions import DISCARD, KEEP
import math
from dataclasses import dataclass
from statistics import median
from typing import Optional

MAD_SCALE = 1.4826  # median absolute deviation -> standard deviation, for normal noise
OUTLIER_MADS = 3.0  # a run further than this many (MAD-)sigmas from its group's median is an outlier


def inliers(values: list[float], spread: float = 0.0) -> list[float]:
    """The runs of one configuration that agree with each other: all of them, except (with 3 or more) those
    further from the median than max(OUTLIER_MADS robust sigmas, the plausible spread).

    spread: the largest disagreement between identical runs that is plausible, as a fraction of
    the median (search.baseline_spread); it keeps two runs that agree closely by chance from
    casting out a third that is merely normal.
    """
    v = [x for x in values if x is not None and math.isfinite(x)]
    if len(v) < 3:
        return v
    m = median(v)
    tol = max(OUTLIER_MADS * MAD_SCALE * median(abs(x - m) for x in v), spread * abs(m))
    return [x for x in v if abs(x - m) <= tol]


def consistent(values: list[float], spread: float) -> bool:
    """Do these repeats agree within the plausible spread (max - min <= spread x |median|)?"""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return len(v) < 2 or max(v) - min(v) <= spread * abs(median(v))


@dataclass(frozen=True)
class NoiseFloor:
    sigma: float  # pooled standard deviation of val_bpb between identical runs
    dof: int  # degrees of freedom behind it (0: no repeats yet, sigma unknown)
    outliers: int = 0  # runs set aside as implausibly far from their group's median

    @classmethod
    def pooled(cls, groups: list[list[float]], spread: float = 0.0) -> "NoiseFloor":
        """Pooled sigma over groups of repeated runs of one configuration each (groups of 1 add nothing)."""
        ss, dof, out = 0.0, 0, 0
        for g in groups:
            g = [x for x in g if x is not None and math.isfinite(x)]
            kept = inliers(g, spread)
            out += len(g) - len(kept)
            if len(kept) < 2:
                continue
            m = sum(kept) / len(kept)
            ss += sum((x - m) ** 2 for x in kept)
            dof += len(kept) - 1
        return cls(sigma=math.sqrt(ss / dof) if dof else 0.0, dof=dof, outliers=out)

    def margin(self, noise_sigmas: float, min_delta: float) -> float:
        """How much lower than the best a val_bpb must be to count as an improvement (the screen)."""
        return max(noise_sigmas * self.sigma, min_delta)

    def describe(self) -> str:
        text = f"sigma {self.sigma:.4f} ({self.dof} dof)"
        return text + (f", {self.outliers} outlier run(s) set aside" if self.outliers else "")


@dataclass(frozen=True)
class Verdict:
    decision: str  # keep | discard
    delta: float  # val_bpb - best (negative = better); the mean paired difference after a confirmation
    margin: float  # what -delta had to exceed
    note: str = ""  # how it was decided, with the figures

    @property
    def keep(self) -> bool:
        return self.decision == KEEP


def decide(val_bpb: float, best: float, margin: float) -> Verdict:
    """The screen: keep when val_bpb beats the best by more than the margin."""
    delta = val_bpb - best
    return Verdict(KEEP if delta < -margin else DISCARD, delta, margin)


def paired(diffs: list[float], floor: NoiseFloor, alpha: float, min_delta: float) -> Verdict:
    """The paired confirmation rule over differences candidate - best of pairs run together (see the module doc).

    floor: the noise floor from runs independent of these pairs (every earlier group), pooled here
    with the pairs' own spread (sd of the differences / sqrt 2, n - 1 dof).
    """
    n = len(diffs)
    d = sum(diffs) / n
    sigma, dof = pooled_sigma(diffs, floor)
    t = t_quantile(1 - alpha, dof)
    threshold = max(min_delta, t * sigma * math.sqrt(2 / n))
    note = (f"paired confirmation: mean difference {d:+.4f} over {n} pair(s) "
            f"({', '.join(f'{x:+.4f}' for x in diffs)}); keep iff it is below -max(min_delta, t({1 - alpha:.2f}, "
            f"{dof} dof) {t:.2f} x sigma {sigma:.4f} x sqrt(2/{n})) = -{threshold:.4f}")
    return Verdict(KEEP if d < -threshold else DISCARD, d, threshold, note)


def pooled_sigma(diffs: list[float], floor: NoiseFloor) -> tuple[float, int]:
    """The paired rule's sigma and dof: the floor pooled with the pairs' own spread (sd of the differences / sqrt 2)."""
    n = len(diffs)
    d = sum(diffs) / n
    ss, dof = floor.sigma ** 2 * floor.dof, floor.dof
    if n > 1:
        ss += sum((x - d) ** 2 for x in diffs) / 2  # Var(c - b) = 2 sigma^2
        dof += n - 1
    if dof == 0:
        raise ValueError("the paired rule needs a noise estimate: a second pair, or repeats of the baseline")
    return math.sqrt(ss / dof), dof


def out_of_reach(diffs: list[float], floor: NoiseFloor, alpha: float, min_delta: float, pairs: int) -> bool:
    """Is the paired rule out of reach for these pairs: their mean no longer favours the candidate, or (from half of
    `pairs` on) it is below the threshold the rule would have after `pairs` pairs in all (it shrinks as
    sqrt(2 / n))? A retest stops then: a stop that only ever discards can only lower the false-keep rate."""
    n = len(diffs)
    if sum(diffs) >= 0:
        return True
    if 2 * n < pairs:  # a mean of fewer than half the pairs is too noisy to give up on a gain it still shows
        return False
    sigma, dof = pooled_sigma(diffs, floor)
    final = max(min_delta, t_quantile(1 - alpha, dof + pairs - n) * sigma * math.sqrt(2 / pairs))
    return -sum(diffs) / n <= final


def retest_batch(diffs: list[float], floor: NoiseFloor) -> int:
    """Pairs to run before a retest's next look: two at the first look while the noise floor has fewer than two
    degrees of freedom (the pairs' own spread is the estimate then), else one."""
    return 2 if not diffs and floor.dof < 2 else 1


def retest_look(diffs: list[float], floor: NoiseFloor, s) -> tuple[Verdict, bool]:
    """A retest's look after its latest pair (search config `s`): the paired rule at retest_alpha / retest_pairs
    (Bonferroni over the looks), and whether the retest ends here (kept, all pairs run, or out of reach). The
    session (src/lab/confirm.py) and the simulation (bench/keep_rule.py) both run retests through this."""
    k, alpha = s.retest_pairs, s.retest_alpha / s.retest_pairs
    v = paired(diffs, floor, alpha, s.min_delta)
    return v, v.keep or len(diffs) >= k or out_of_reach(diffs, floor, alpha, s.min_delta, k)


# ---------------------------------------------------------------------------- Student's t


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with an integer dof, exact (Abramowitz & Stegun 26.7.3-4)."""
    if dof < 1:
        raise ValueError(f"dof={dof}: Student's t needs at least 1 degree of freedom")
    theta = math.atan2(abs(t), math.sqrt(dof))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if dof % 2:  # odd: 2/pi * (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, acc = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            acc += term
        a = 2 / math.pi * (theta + s * math.cos(theta) * acc)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, acc = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            acc += term
        a = s * acc
    return 0.5 + math.copysign(a / 2, t)


def t_quantile(p: float, dof: int, tol: float = 1e-10) -> float:
    """The t with P(T <= t) = p (0.5 < p < 1), by bisection on the exact CDF."""
    if not 0.5 < p < 1:
        raise ValueError(f"p={p}: expected 0.5 < p < 1 (a one-sided upper quantile)")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        hi *= 2
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, dof) < p else (lo, mid)
    return (lo + hi) / 2


def weak(floor: NoiseFloor, confirm: Optional[bool], min_dof: int) -> bool:
    """Does a would-be keep need a paired confirmation? confirm None (auto): while the floor has < min_dof dof."""
    return floor.dof < min_dof if confirm is None else bool(confirm)
