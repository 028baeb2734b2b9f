"""A retest an agent asks for: an earlier near miss run again, in (best, candidate) pairs, instead of a new idea.

The lab retests a near miss on its own when its screen run came within search.retest_within of the margin
(src/lab/confirm.py). An agent may ask for one it judges worth it (`{"retest": "exp-007"}`; the near misses are
listed in what it sees): a discard whose screen run beat the best but not by the margin, with no pairs run for it
yet, and never retested before. The lab re-stages that experiment's change on the current best and runs the
near miss's retest on it, with no screen run of its own (the earlier one selected it, so it is no evidence):
pairs one at a time, keep as soon as the paired rule holds at search.retest_alpha / retest_pairs per look.
Under no real change such a retest keeps with probability at most search.retest_alpha; once per experiment, so
the false-keep rate of a change, asked about or not, rises by at most that.

Usage: p = asked(rows, proposal, "exp-012", cfg.search)   # the proposal filled with the change it retests
"""
from __future__ import annotations

from src.lab.decisions import CONFIRM, DISCARD, INTERRUPTED, INVALID
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal


def asked(rows: list[Experiment], p: Proposal, exp: str, s) -> Proposal:
    """Proposal `p` of experiment `exp`, which asks for a retest of p.retest, as the change it re-runs (the earlier
    experiment's overrides and patch, on the current best); InvalidProposal when that experiment may not have one.
    Overrides or a patch sent with the request are not used: a retest re-runs the change as it was."""
    x = p.retest
    if not s.retest:
        raise InvalidProposal(f"retests are off in this session (search.retest=false): {x} cannot be retested")
    target = next((e for e in rows if e.exp == x and e.is_experiment), None)
    if target is None:
        raise InvalidProposal(f"{x!r} is not an experiment of this session: give the id of a near miss "
                              "(exp-NNN, from the near-miss list)")
    if target.status != DISCARD or target.delta is None or target.delta >= 0:
        delta = f", {target.delta:+.4f} against the best" if target.delta is not None else ""
        raise InvalidProposal(f"{x} is `{target.status}`{delta}: only a near miss (a discard whose screen run beat "
                              "the best, inside the margin) can be retested")
    pairs = [e.exp for e in rows if e.exp.startswith(f"{x}-") and e.status == CONFIRM]
    if pairs:
        raise InvalidProposal(f"{x} already had pairs run against the best ({', '.join(pairs)}): its verdict stands")
    done = next((e for e in rows if e.exp != exp and e.proposal is not None and e.proposal.retest == x
                 and e.status not in (INVALID, INTERRUPTED)), None)  # one that ran at all: disturbed ones included
    if done is not None:
        raise InvalidProposal(f"{x} was retested already, as {done.exp} ({done.status}): an experiment is retested "
                              "once (each retest may keep a null change with probability search.retest_alpha)")
    if target.proposal is None:
        raise InvalidProposal(f"{x}'s proposal is not on record (proposals/{x}.json): it cannot be re-staged")
    o = target.proposal
    return Proposal(description=f"retest of {x}: {o.description}", hypothesis=p.hypothesis or o.hypothesis,
                    overrides=list(o.overrides), patch=o.patch, meta=dict(p.meta), retest=x)
