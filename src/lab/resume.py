"""Resuming a session after Ctrl-C, a crash or kill -9: what was in flight, and putting things right.

state.json names the experiment in flight (persisted before its run started). On resume an
orphaned train process is stopped, the stale MLflow runs of its attempts are closed, the last
row's MLflow tags are re-applied (the search may have died between the ledger and MLflow), the
branch is put back at the best commit, and the unfinished experiment is handed back to the loop.

Usage: pending = reconcile(lab)   # None, or the experiment to finish first
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from src.lab.context import Lab
from src.lab.proposal import Proposal
from src.lab.runner import alive, attempt_name, is_train_process, stop_group

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """An experiment the previous invocation started but did not record (resume finishes it)."""
    exp: str
    proposal: Optional[Proposal]  # None: a baseline run
    attempt: int  # attempts already started
    commit: str
    run_dir: str


def reconcile(lab: Lab) -> Optional[Pending]:
    """Stop an orphaned run, fix MLflow, put the branch at the best; the experiment to finish, if any."""
    rows = lab.rows()
    st = lab.session.state
    fl = st.in_flight
    pending = None
    if rows and lab.runs.enabled:
        last = rows[-1]
        try:
            lab.runs.tag_row(last, len(rows), last.mlflow_run_id or None, lab.standings(rows).best)
        except Exception as e:
            log.warning("could not re-tag %s in MLflow: %s", last.exp, e)
    if fl is not None:
        if any(e.exp == fl.exp for e in rows):
            log.info("resume: %s was recorded before the stop", fl.exp)
        else:
            if fl.pid and alive(fl.pid) and is_train_process(fl.pid, fl.run_dir):
                log.warning("resume: stopping the orphaned run of %s (pid %d)", fl.exp, fl.pid)
                stop_group(fl.pid, 5.0)
            rec = lab.ledger.load(fl.exp) or {}
            proposal = Proposal.from_dict(rec["proposal"]) if rec.get("proposal") else None
            pending = Pending(fl.exp, proposal, fl.attempt, fl.commit, fl.run_dir)
            log.warning("resume: %s was interrupted (attempt %d) and will be finished now", fl.exp, fl.attempt)
            for a in range(1, fl.attempt + 1):
                try:
                    lab.runs.close_stale(attempt_name(fl.exp, a))
                except Exception as e:
                    log.warning("could not close the stale MLflow run of %s: %s", fl.exp, e)
        st.in_flight = None
        lab.session.save()
    lab.session.reset(lab.standings(rows).best.commit)
    return pending
