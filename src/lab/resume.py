"""Resuming a session after Ctrl-C, a crash or kill -9: what was in flight, and putting things right.

state.json names the experiment in flight (persisted before its run started). On resume an
orphaned train process is stopped, the stale MLflow runs of its attempts are closed, the last
row's MLflow tags are re-applied (the search may have died between the ledger and MLflow), the
branch is put back at the best commit, and the unfinished experiment is handed back to the loop.

It also puts back the session's whole baseline config (the train part of the search app's config:
device, budget, tracking, ... as the session started; slot planning reads its device) and its own
search knobs, agent and agent options, and search space (restore_knobs): a resume continues the
session as it was started, unless told otherwise.

Usage: jobs = reconcile(lab)   # the experiments to finish first (none, one, or several in flight)
       changes = restore_knobs(cfg, session.state, explicit_keys(command_line))
"""
from __future__ import annotations

import logging
from dataclasses import asdict, fields, is_dataclass

from src.harness.config import TrainConfig
from src.lab.config import SearchAppConfig
from src.lab.context import Lab
from src.lab.experiment import Job
from src.lab.proposal import Proposal, override_key
from src.lab.session import SessionState
from src.lab.runner import alive, attempt_name, is_train_process, stop_group

log = logging.getLogger(__name__)


def reconcile(lab: Lab) -> list[Job]:
    """Stop orphaned runs, fix MLflow, put the branch at the best; the experiments to finish (in proposal order).

    state.json's `running` counts (and `in_flight`, the one entry of a session from before). A submitit job that
    is still running is not stopped: its Job carries it, and the resume re-attaches to it."""
    rows = lab.rows()
    st = lab.session.state
    jobs = []
    if rows and lab.runs.enabled:
        last = rows[-1]
        try:
            lab.runs.tag_row(last, len(rows), last.mlflow_run_id or None, lab.standings(rows).best)
        except Exception as e:
            log.warning("could not re-tag %s in MLflow: %s", last.exp, e)
    recorded = {e.exp for e in rows}
    flights = ([st.in_flight] if st.in_flight is not None else []) + list(st.running)
    for fl in flights:
        if fl.exp in recorded:
            log.info("resume: %s was recorded before the stop", fl.exp)
            continue
        job = fl.job if fl.job and fl.worker is not None and job_resumable(fl.job, fl.job_folder) else ""
        if job:
            log.warning("resume: %s (attempt %d) ran as job %s, still running or finished since: re-attaching to "
                        "it", fl.exp, fl.attempt, job)
        elif fl.job:  # a job nobody will wait on (the sequential loop's, a baseline run): cancel it
            from src.lab.launcher import JobHandle

            try:
                JobHandle(fl.job, fl.job_folder).cancel()
            except Exception as e:
                log.warning("resume: could not cancel job %s of %s: %s", fl.job, fl.exp, e)
        else:
            for pid in ([fl.pid] if fl.pid else []) + list(fl.others):  # its own run, and one on a borrowed worker
                if alive(pid) and is_train_process(pid, fl.run_dir):  # (exp-004-b1's dir starts with exp-004's)
                    log.warning("resume: stopping the orphaned run of %s (pid %d)", fl.exp, pid)
                    stop_group(pid, 5.0)
        rec = lab.ledger.load(fl.exp) or {}
        proposal = Proposal.from_dict(rec["proposal"]) if rec.get("proposal") else None
        jobs.append(Job(fl.exp, proposal, fl.attempt, fl.proposed, job, fl.job_folder if job else "", fl.worker,
                        fl.commit, fl.parent))
        if not job:
            log.warning("resume: %s was interrupted (attempt %d) and will be finished now", fl.exp, fl.attempt)
        for a in range(1, fl.attempt + (0 if job else 1)):
            try:
                lab.runs.close_stale(attempt_name(fl.exp, a))
            except Exception as e:
                log.warning("could not close the stale MLflow run of %s: %s", fl.exp, e)
    if flights:
        st.in_flight, st.running = None, []
        lab.session.save()
    lab.session.reset(lab.standings(rows).best.commit)
    return sorted(jobs, key=lambda j: j.exp)


def job_resumable(ref: str, folder: str) -> bool:
    """Is the submitit job still queued or running, or did it run to its end (launcher=submitit_*)?"""
    from src.lab.launcher import FINISHED, RUNNING, job_state

    return job_state(ref, folder) in RUNNING + FINISHED


# ---------------------------------------------------------------------------- the session's knobs
# A resume continues with the search knobs, agent (with its options) and search space the session
# last ran with, as recorded in state.json; a key given again on the resuming command line wins,
# and every difference is named in a warning. Where the session lives is this command line's.
WHERE = ("tag", "resume", "repo", "root", "base")


def explicit_keys(cli: list[str]) -> set[str]:
    """The config keys (and groups) a command line sets: 'agent', 'agent.file', 'search.max_experiments', ..."""
    return {override_key(o).lstrip("+~") for o in cli}


def _given(key: str, explicit: set[str]) -> bool:
    return key in explicit or any(k.startswith(key + ".") for k in explicit)


def _plain(v):
    """A config value as plain data (what state.json holds), for comparing and for messages."""
    if is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _typed(cls, stored: dict):
    """A `cls` instance from its stored plain form (keys the schema no longer has are dropped)."""
    from omegaconf import OmegaConf

    known = {f.name for f in fields(cls)}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), {k: v for k, v in stored.items() if k in known}))


def _restore(composed, stored: dict, cls, prefix: str, explicit: set[str], keep: tuple = ()) -> tuple[object, list[str]]:
    """`stored` as a `cls`, with the fields this command line gave (and `keep`) taken from `composed`."""
    restored = _typed(cls, stored)
    changes = []
    names = {f.name for f in fields(restored)}
    for name in sorted(names):
        if name in keep or (_given(f"{prefix}.{name}", explicit) and hasattr(composed, name)):
            new, old = getattr(composed, name), getattr(restored, name)
            if name not in keep and _plain(new) != _plain(old):
                changes.append(f"{prefix}.{name}: {_plain(old)!r} -> {_plain(new)!r}")
            setattr(restored, name, new)
    for k in sorted(explicit):
        if k.startswith(prefix + ".") and k.split(".")[1] not in names:
            changes.append(f"{k}: ignored ({prefix} {getattr(restored, 'name', '')} has no such option)")
    return restored, changes


def restore_knobs(cfg: SearchAppConfig, st: SessionState, explicit: set[str]) -> list[str]:
    """Put back into `cfg` the knobs, agent and search space session `st` last ran with (explicit keys win).

    Returns one line per difference from the session's own values, for the warning.
    """
    from src.lab.config import AGENT_SCHEMAS, AgentConfig, LauncherConfig, SearchConfig, SearchSpaceConfig

    changes = []
    if st.search:
        cfg.search, ch = _restore(cfg.search, st.search, SearchConfig, "search", explicit, keep=WHERE)
        changes += ch
    schemas = {c.__name__: c for c in (AgentConfig, *AGENT_SCHEMAS.values())}
    switched = (f"agent: session {st.tag} was run by agent={st.agent}; this invocation continues it with "
                f"agent={cfg.agent.name} (to keep the original: python -m src.search search.tag={st.tag} "
                f"search.resume=true agent={st.agent})")
    if "agent" in explicit and st.agent and cfg.agent.name != st.agent:
        changes.append(switched)
    elif st.agent_config and st.agent_schema in schemas:
        cfg.agent, ch = _restore(cfg.agent, st.agent_config, schemas[st.agent_schema], "agent", explicit)
        changes += ch
    elif st.agent and st.agent != cfg.agent.name:  # a session from before its agent's options were recorded
        changes.append(switched)
    if st.search_space and not ("search_space" in explicit and cfg.search_space.name != st.search_space.get("name")):
        cfg.search_space, ch = _restore(cfg.search_space, st.search_space, SearchSpaceConfig, "search_space", explicit)
        changes += ch
    elif st.search_space:
        changes.append(f"search_space: {st.search_space.get('name')!r} -> {cfg.search_space.name!r}")
    if st.launcher and not ("launcher" in explicit and cfg.launcher.name != st.launcher.get("name")):
        cfg.launcher, ch = _restore(cfg.launcher, st.launcher, LauncherConfig, "launcher", explicit)
        changes += ch
    elif st.launcher:
        changes.append(f"launcher: {st.launcher.get('name')!r} -> {cfg.launcher.name!r}")
    return changes


def restore_baseline(cfg: SearchAppConfig, st: SessionState) -> None:
    """Put back into `cfg` the train part the session started with (device, budget, tracking, ...): a resume's
    command line cannot change the baseline (its train overrides are the session's), so neither may the config
    the lab reads of it (slot planning: the device; preflight, MLflow). A session from before it was recorded
    keeps this command line's."""
    if not st.baseline:
        return
    restored = _typed(TrainConfig, st.baseline)
    for f in fields(TrainConfig):
        setattr(cfg, f.name, getattr(restored, f.name))


def record_knobs(cfg: SearchAppConfig, st: SessionState) -> None:
    """What the session runs with now: the next resume continues with it."""
    st.baseline = {f.name: _plain(getattr(cfg, f.name)) for f in fields(TrainConfig)}
    st.search, st.agent = asdict(cfg.search), cfg.agent.name
    st.agent_config, st.agent_schema = asdict(cfg.agent), type(cfg.agent).__name__
    st.search_space = asdict(cfg.search_space)
    st.launcher = asdict(cfg.launcher)
