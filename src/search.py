"""The research loop: propose -> check -> commit -> run -> keep or discard -> record -> repeat.

A session (src/session.py) branches research/<tag> off the current commit in a worktree under
outputs/research/<tag>/, runs the baseline `search.baseline_repeats` times to measure the noise
floor, then asks the agent for proposals until `search.max_experiments` have run, the agent has
nothing left, `search.max_hours` pass or Ctrl-C. Each proposal is checked (overrides compose,
patch applies and touches only editable files), committed on the branch, run as
`python -m src.train` in the worktree and kept only if it beats the best by more than the noise
margin; otherwise the branch is reset to the best. Every experiment is one row of results.tsv and
one nested MLflow run. Resume continues exactly where it stopped (kill -9 included).

Usage: python -m src.search agent=tpe device=cpu budget.seconds=30 search.max_experiments=10
       python -m src.search search.tag=nov26 search.resume=true
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from src.agents import Agent, AgentStop, Best, SearchState, build_agent
from src.config import SearchAppConfig, TrainConfig
from src.decision import NoiseFloor, decide
from src.ledger import Experiment, Ledger, SessionRuns
from src.proposal import (InvalidProposal, Proposal, check_overrides, check_patch_paths, compose_train,
                          merge_overrides, override_key, preset_yaml)
from src.runner import Outcome, RunInterrupted, Runner, alive, stop_group
from src.session import InFlight, Session, SessionError
from src.tracking import resolve_uri

log = logging.getLogger("src.search")
SEARCH_ROOTS = ("search", "agent", "search_space", "hydra")
GROUPS = {"model", "optimizer", "batch", "device", "data", "budget", "experiment"}


def train_overrides(task_overrides: list[str]) -> list[str]:
    """The train part of the search's command line (what sets the baseline): search/agent/hydra keys dropped."""
    out = []
    for o in task_overrides:
        key = override_key(o).lstrip("+~")
        if key.split(".")[0].split("@")[0] not in SEARCH_ROOTS:
            out.append(o)
    return out


def quote(v: str) -> str:
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Pending:
    """An experiment the previous invocation started but did not record (resume finishes it)."""
    exp: str
    proposal: Optional[Proposal]  # None: a baseline run
    attempt: int  # attempts already started
    commit: str
    run_dir: str


class Search:
    def __init__(self, cfg: SearchAppConfig, base_overrides: list[str], train_command: Optional[list[str]] = None):
        self.cfg = cfg
        self.train_command = train_command  # None: python -m src.train (tests substitute a stand-in)
        self.s = cfg.search
        self.base_overrides = list(base_overrides)
        self.session: Optional[Session] = None
        self.stop_reason = ""

    # ================================================================== set-up
    def open(self) -> None:
        s = self.s
        if s.noise_sigmas < 0 or s.min_delta < 0 or s.baseline_repeats < 1 or s.max_experiments < 0:
            raise SessionError(f"search.noise_sigmas={s.noise_sigmas}, search.min_delta={s.min_delta}, "
                               f"search.baseline_repeats={s.baseline_repeats}, search.max_experiments="
                               f"{s.max_experiments}: expected noise_sigmas >= 0, min_delta >= 0, baseline_repeats "
                               ">= 1 (2 or more to measure the noise floor), max_experiments >= 0")
        # the agent first, checked (agent=claude: key, API): a missing key costs no session and no run
        self.agent: Agent = build_agent(self.cfg.agent, self.cfg.search_space)
        self.agent.preflight()
        self.session = Session.open(s.tag, s.resume, self.base_overrides, s.repo, s.root, s.base)
        st = self.session.state
        self._log_to_file()
        if s.resume:
            if self.base_overrides and self.base_overrides != st.base_overrides:
                log.warning("resume: the session's train overrides are fixed at %s; ignoring %s from this command",
                            st.base_overrides, self.base_overrides)
            self.base_overrides = list(st.base_overrides)
            if st.agent and st.agent != self.cfg.agent.name:  # a resume does not restore the agent by itself
                log.warning("resume: session %s was run by agent=%s; this invocation continues it with agent=%s "
                            "(to keep the original: python -m src.search search.tag=%s search.resume=true agent=%s)",
                            st.tag, st.agent, self.cfg.agent.name, st.tag, st.agent)
        if getattr(self.session, "dirty_warning", ""):
            log.warning("uncommitted changes in src/ or conf/ of %s are NOT part of session %s (it branches from "
                        "commit %s):\n%s", st.repo, st.tag, st.base_commit[:7], self.session.dirty_warning)
        st.invocations += 1
        self.ledger = Ledger(self.session.dir)
        self.pinned = [override_key(o).lstrip("+~") for o in self.base_overrides]
        try:
            self.base_config = compose_train(self.session.conf_dir, self.base_overrides)
        except InvalidProposal as e:
            if not s.resume:  # leave no half-made session (branch, worktree) behind to trip the next attempt
                self.session.discard()
                self.session = None
            raise SessionError(f"the session's train overrides {self.base_overrides} do not compose in the worktree "
                               f"(commit {st.base_commit[:7]}): {e}") from None
        uri = resolve_uri(self.cfg.tracking.uri)
        self.uri = uri
        self.runs = SessionRuns(uri, self.cfg.tracking.experiment, self.cfg.tracking.enabled)
        st.tracking_uri, st.tracking_experiment = uri, self.cfg.tracking.experiment
        st.agent = self.cfg.agent.name
        try:
            st.parent_run_id = self.runs.open_parent(
                st.parent_run_id, st.tag,
                params={"agent": self.cfg.agent.name, "search_space": self.cfg.search_space.name,
                        "base_overrides": " ".join(self.base_overrides) or "(none)", "base_commit": st.base_commit,
                        "baseline_repeats": s.baseline_repeats, "noise_sigmas": s.noise_sigmas,
                        "min_delta": s.min_delta, "confirm": s.confirm, "editable": " ".join(s.editable)},
                tags={"search.branch": st.branch, "search.dir": str(self.session.dir)})
        except Exception as e:  # an unreachable tracking server must not cost the night
            if self.cfg.tracking.strict:
                raise SessionError(f"MLflow at {uri} is not usable ({e}); fix it or drop tracking.strict") from None
            log.warning("MLflow at %s is not usable (%s): the session continues without tracking", uri, e)
            self.runs.enabled = False
        self.session.save()
        self.runner = Runner(self.session.worktree, s.env_strip, s.env_keep, command=self.train_command)
        self._best_cfg_cache: dict = {}

    def _log_to_file(self) -> None:
        h = logging.FileHandler(self.session.dir / "search.log")
        h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger("src").addHandler(h)
        logging.getLogger("src").setLevel(logging.INFO)
        self._log_handler = h

    # ================================================================== state from the ledger
    def rows(self) -> list[Experiment]:
        return self.ledger.rows()

    def best(self, rows: list[Experiment]) -> Best:
        base = [e.score for e in rows if e.status == "baseline" and e.score is not None]
        best = Best("baseline", self.session.state.base_commit, sum(base) / len(base) if base else math.inf, [])
        for e in rows:
            if e.status == "keep":
                best = Best(e.exp, e.commit, e.score, list(e.config))
        return best

    def noise(self, rows: list[Experiment]) -> NoiseFloor:
        groups = [[e.score for e in rows if e.status == "baseline" and e.score is not None]]
        groups += [e.values for e in rows if e.status != "baseline" and len(e.values) > 1]
        return NoiseFloor.pooled(groups)

    def margin(self, rows: list[Experiment]) -> float:
        return self.noise(rows).margin(self.s.noise_sigmas, self.s.min_delta)

    def best_config(self, best: Best) -> TrainConfig:
        key = tuple(best.config)
        if key not in self._best_cfg_cache:
            self._best_cfg_cache = {key: compose_train(self.session.conf_dir, self.base_overrides + best.config)}
        return self._best_cfg_cache[key]

    def state(self, rows: list[Experiment]) -> SearchState:
        best = self.best(rows)
        noise = self.noise(rows)
        n_run = sum(1 for e in rows if e.counts)
        return SearchState(tag=self.session.tag, best=best, margin=noise.margin(self.s.noise_sigmas, self.s.min_delta),
                           sigma=noise.sigma, history=rows, editable=list(self.s.editable),
                           override_roots=list(self.s.override_roots), pinned=list(self.pinned),
                           base_overrides=list(self.base_overrides), worktree=self.session.worktree,
                           base_config=self.base_config, best_config=self.best_config(best),
                           experiments_left=max(0, self.s.max_experiments - n_run),
                           seconds_left=max(0.0, self.deadline - time.time()))

    # ================================================================== resume
    def reconcile(self, rows: list[Experiment]) -> Optional[Pending]:
        """After Ctrl-C, a crash or kill -9: stop an orphaned run, fix MLflow, put the branch at the best."""
        st = self.session.state
        fl = st.in_flight
        pending = None
        if rows and self.runs.enabled:  # re-apply the last row's MLflow tags (the search may have died before)
            last = rows[-1]
            try:
                self._tag_run(last, len(rows), last.mlflow_run_id or None, {})
            except Exception as e:
                log.warning("could not re-tag %s in MLflow: %s", last.exp, e)
        if fl is not None:
            if any(e.exp == fl.exp for e in rows):
                log.info("resume: %s was recorded before the stop", fl.exp)
            else:
                if fl.pid and alive(fl.pid) and _is_train(fl.pid, fl.run_dir):
                    log.warning("resume: stopping the orphaned run of %s (pid %d)", fl.exp, fl.pid)
                    stop_group(fl.pid, 5.0)
                rec = self.ledger.load(fl.exp) or {}
                proposal = Proposal.from_dict(rec["proposal"]) if rec.get("proposal") else None
                pending = Pending(fl.exp, proposal, fl.attempt, fl.commit, fl.run_dir)
                log.warning("resume: %s was interrupted (attempt %d) and will be finished now", fl.exp, fl.attempt)
                for a in range(1, fl.attempt + 1):
                    try:
                        self.runs.close_stale(_attempt_name(fl.exp, a))
                    except Exception as e:
                        log.warning("could not close the stale MLflow run of %s: %s", fl.exp, e)
            st.in_flight = None
            self.session.save()
        self.session.reset(self.best(rows).commit)
        return pending

    # ================================================================== main loop
    def run(self) -> dict:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            self.open()
        except BaseException:
            if self.session is not None:
                self.session.close()
            raise
        self.t0 = time.time()
        self.deadline = self.t0 + self.s.max_hours * 3600
        rows = self.rows()
        pending = self.reconcile(rows)
        rows = self.rows()
        self.agent.restore(rows, self.state(rows))
        log.info("session %s: branch %s, dir %s, %d rows so far", self.session.tag, self.session.state.branch,
                 self.session.dir, len(rows))
        n_run = sum(1 for e in rows if e.counts)
        bar = tqdm(total=self.s.max_experiments, initial=min(n_run, self.s.max_experiments), unit="exp",
                   desc=f"search {self.session.tag}", disable=None if self.s.progress else True,
                   dynamic_ncols=True)  # None: shown on a terminal only
        status = "FINISHED"
        try:
            with logging_redirect_tqdm():
                pending = self.baseline(pending)
                self.loop(pending, bar)
        except KeyboardInterrupt:
            status = "KILLED"
            self.stop_reason = "interrupted (Ctrl-C)"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            bar.close()
            self.finish(status)
        return self.summary()

    def baseline(self, pending: Optional[Pending]) -> Optional[Pending]:
        """Run the baseline until `baseline_repeats` runs succeeded (the noise floor needs >= 2)."""
        while True:
            rows = self.rows()
            ok = [e for e in rows if e.status == "baseline"]
            if len(ok) >= self.s.baseline_repeats:
                return pending
            if pending is not None and pending.proposal is None:
                exp, attempt, pending = pending.exp, pending.attempt, None
            else:
                exp, attempt = f"base-{sum(1 for e in rows if e.exp.startswith('base-')) + 1}", 0
            e = self.execute(exp, None, rows, attempt)
            if e.status != "baseline":
                raise SessionError(f"the baseline run {exp} failed ({e.run_status}: {e.reason}); see "
                                   f"{self.session.runs_dir / exp / 'run.log'}. Fix the session's train overrides or "
                                   f"the code, then resume (search.tag={self.session.tag} search.resume=true)")

    def loop(self, pending: Optional[Pending], bar) -> None:
        invalid_streak = 0
        while True:
            rows = self.rows()
            n_run = sum(1 for e in rows if e.counts)
            if pending is None:
                if n_run >= self.s.max_experiments:
                    self.stop_reason = f"search.max_experiments={self.s.max_experiments} reached"
                    return
                if time.time() >= self.deadline:
                    self.stop_reason = f"search.max_hours={self.s.max_hours} reached"
                    return
                state = self.state(rows)
                try:
                    proposal = self.agent.propose(state)
                except AgentStop as err:  # a cost cap, an API down for long: stop cleanly, resumable
                    log.warning("%s", err)
                    self.stop_reason = f"paused: {err}"
                    return
                if proposal is None:
                    self.stop_reason = f"agent {self.cfg.agent.name} has nothing more to propose"
                    return
                exp = f"exp-{sum(1 for e in rows if e.exp.startswith('exp-')) + 1:03d}"
                attempt = 0
            else:
                exp, proposal, attempt, pending = pending.exp, pending.proposal, pending.attempt, None
            e = self.execute(exp, proposal, rows, attempt)
            rows = self.rows()
            self.agent.observe(e, self.state(rows))
            try:  # the agent's session totals (agent=claude: tokens, cost) on the parent run
                self.runs.log_parent(len(rows), self.agent.usage())
            except Exception as err:
                log.warning("MLflow: could not log the agent's usage: %s", err)
            if e.counts:
                bar.update(1)
            best = self.best(rows)
            bar.set_postfix(best=f"{best.val_bpb:.4f}", last=e.status, refresh=True)
            invalid_streak = invalid_streak + 1 if e.status == "invalid" else 0
            if invalid_streak >= self.s.max_invalid_in_row:
                self.stop_reason = (f"{invalid_streak} invalid proposals in a row (search.max_invalid_in_row); "
                                    "see the `reason` column of results.tsv")
                return

    # ================================================================== one experiment
    def execute(self, exp: str, proposal: Optional[Proposal], rows: list[Experiment], attempt: int) -> Experiment:
        """Check, commit, run, decide and record one experiment (a baseline run when proposal is None)."""
        sess, st = self.session, self.session.state
        best = self.best(rows)
        config = merge_overrides(best.config, proposal.overrides) if proposal else []
        self.ledger.save(exp, proposal, config)
        st.in_flight = InFlight(exp=exp, attempt=attempt, commit="", run_dir="", started=time.time())
        sess.save()
        e = Experiment(exp=exp, status="", description=proposal.description if proposal else "baseline",
                       hypothesis=proposal.hypothesis if proposal else "the starting point; repeats measure the noise floor",
                       kind=proposal.kind if proposal else "baseline",
                       overrides=" ".join(proposal.overrides) if proposal else " ".join(self.base_overrides),
                       proposal=proposal, config=config)
        margin = self.margin(rows)
        try:
            if proposal is None:
                commit = st.base_commit
            else:
                try:
                    commit = self.prepare(exp, proposal, best, config)
                except InvalidProposal as err:
                    sess.reset(best.commit)
                    e.status, e.run_status, e.reason, e.commit = "invalid", "-", str(err), best.commit
                    e.best_val_bpb = best.val_bpb if math.isfinite(best.val_bpb) else None
                    return self.record(e, rows, None, best)
            e.commit = commit
            self.ledger.save(exp, proposal, config, commit=commit)
            out, attempts = self.run_attempts(exp, commit, attempt, has_preset=bool(config))
        except RunInterrupted as ri:  # Ctrl-C / SIGTERM: the run was stopped; record it, then stop the session
            out = ri.outcome
            e.status, e.run_status, e.reason, e.attempts = "interrupted", "interrupted", out.error_line, attempt + 1
            e.commit = e.commit or best.commit
            e.best_val_bpb = best.val_bpb if math.isfinite(best.val_bpb) else None
            self._fill(e, out)
            sess.reset(best.commit)
            self.record(e, rows, out, best)
            raise KeyboardInterrupt from None
        e.attempts = attempts
        self._fill(e, out)
        values = []
        if proposal is None:  # baseline
            e.run_status = out.status
            if out.ok and out.val_bpb is not None:
                e.status, e.val_bpb = "baseline", out.val_bpb
                values = [out.val_bpb]
            else:
                e.status, e.reason = "crash", out.error_line
            done = self.rows() + [e]
            e.best_val_bpb = self.best(done).val_bpb if e.status == "baseline" else None
            return self.record(e, rows, out, best, values)
        e.run_status = out.status
        if out.ok and out.val_bpb is not None:
            values = [out.val_bpb]
            verdict = decide(out.val_bpb, best.val_bpb, margin)
            if verdict.keep and self.s.confirm:
                second, _ = self.run_attempts(exp, commit, 0, has_preset=bool(config), confirm=True)
                self._mark_attempt(f"{exp}-confirm", second, f"confirmation re-run of {exp}")
                if second.ok and second.val_bpb is not None:
                    values.append(second.val_bpb)
                    verdict = decide(sum(values) / len(values), best.val_bpb, margin)
                    e.reason = f"confirmation re-run: {values[0]:.6f}, {values[1]:.6f} (mean {sum(values) / 2:.6f})"
                else:
                    verdict = replace(verdict, decision="discard")
                    e.reason = f"confirmation re-run failed ({second.status}: {second.error_line})"
            e.val_bpb = sum(values) / len(values)
            e.delta, e.margin = verdict.delta, verdict.margin
            e.status = verdict.decision
        else:
            e.status = "crash"
            e.reason = out.error_line
            e.val_bpb = out.val_bpb
        if e.status != "keep":
            sess.reset(best.commit)
        e.best_val_bpb = e.val_bpb if e.status == "keep" else best.val_bpb
        return self.record(e, rows, out, best, values)

    def prepare(self, exp: str, p: Proposal, best: Best, config: list[str]) -> str:
        """Validate the proposal against the best commit and commit it as the candidate; InvalidProposal if not."""
        sess = self.session
        check_overrides(p.overrides, list(self.s.override_roots), self.pinned)
        if p.patch:
            check_patch_paths(p.patch, list(self.s.editable))
            why = sess.check_patch(p.patch)
            if why:
                raise InvalidProposal(f"the patch does not apply to the best commit {best.commit[:7]}: {why}. "
                                      "Write it against the current code (state.read(path))")
        elif not p.overrides:
            raise InvalidProposal("the proposal has neither overrides nor a patch")
        cand = compose_train(sess.conf_dir, self.base_overrides + config)
        if not p.patch and cand == self.best_config(best):
            raise InvalidProposal("the proposal changes nothing relative to the best (every override restates the "
                                  "current value); propose different values")
        header = (f"research/{sess.tag}: the kept overrides as of {exp} (generated by src.search).\n"
                  f"Reproduce: git checkout <this commit> && python -m src.train "
                  f"{' '.join(self._with_preset(self.base_overrides, True))}")
        preset = preset_yaml(config, GROUPS, header) if config else None
        msg = (f"{exp}: {p.description}\n\n" + (f"Hypothesis: {p.hypothesis}\n" if p.hypothesis else "")
               + (f"Overrides: {' '.join(p.overrides)}\n" if p.overrides else "")
               + f"Session: research/{sess.tag} (src.search, agent {self.cfg.agent.name})\n"
               + (f"Agent: {p.meta['commit_note']}\n" if p.meta.get("commit_note") else ""))  # agent=claude: tokens, cost
        commit = sess.commit_candidate(msg, p.patch, preset)
        sess.keep_ref(exp, commit)
        if self.s.preflight:
            d = sess.runs_dir / exp / "preflight"
            out = self.runner.run(self._with_preset(self.base_overrides, bool(config))
                                  + ["dry_run=true", "tracking.enabled=false", "progress=false"], d, timeout_s=300)
            if out.returncode != 0:
                raise InvalidProposal(f"the candidate fails its dry run (python -m src.train ... dry_run=true): "
                                      f"{out.error_line}; see {d / 'run.log'}")
        return commit

    def _with_preset(self, base: list[str], has_preset: bool) -> list[str]:
        """base overrides + the committed preset (+experiment=<tag>_best), merged with a preset the user gave."""
        if not has_preset:
            return list(base)
        name = self.session.preset_name
        out, merged = [], False
        for o in base:
            if override_key(o).lstrip("+") == "experiment":
                val = o.split("=", 1)[1].strip("[]")
                out.append(f"+experiment=[{val},{name}]")
                merged = True
            else:
                out.append(o)
        return out if merged else out + [f"+experiment={name}"]

    def timeout_s(self) -> float:
        s, b = self.s, self.base_config.budget
        if s.timeout_s:
            return s.timeout_s
        if b.mode == "time":
            return b.seconds * s.timeout_factor + s.timeout_grace_s
        walls = [e.wall_seconds for e in self.rows() if e.status == "baseline" and e.wall_seconds]
        return max(walls) * s.timeout_factor + s.timeout_grace_s if walls else 3600.0

    def run_attempts(self, exp: str, commit: str, done: int, has_preset: bool,
                     confirm: bool = False) -> tuple[Outcome, int]:
        """Run the committed candidate; a `stalled` run is re-run up to search.stall_retries times."""
        sess, st = self.session, self.session.state
        base = self._with_preset(self.base_overrides, has_preset)
        attempt = done
        retries = 0
        while True:
            attempt += 1
            name = _attempt_name(f"{exp}-confirm" if confirm else exp, attempt)
            run_dir = sess.runs_dir / name
            if not confirm:
                st.in_flight = InFlight(exp=exp, attempt=attempt, commit=commit, run_dir=str(run_dir),
                                        started=time.time())
                sess.save()
            own = [f"tracking.uri={quote(self.uri)}", f"tracking.experiment={quote(self.cfg.tracking.experiment)}",
                   f"tracking.run_name={quote(name)}", "progress=false"]
            if self.runs.parent_id:
                own.append(f"tracking.parent_run_id={quote(self.runs.parent_id)}")
            ovs = merge_overrides(base, own)  # ours replace the same keys of the command line

            def started(pid: int) -> None:
                if st.in_flight is not None:
                    st.in_flight.pid = pid
                    sess.save()

            log.info("%s: running (attempt %d, commit %s, timeout %.0f s) -> %s", name, attempt, commit[:7],
                     self.timeout_s(), run_dir)
            out = self.runner.run(ovs, run_dir, self.timeout_s(), on_start=started)
            if out.status == "stalled" and retries < self.s.stall_retries:
                retries += 1
                log.warning("%s stalled (%s); re-running (%d of %d)", name, out.error_line, retries, self.s.stall_retries)
                self._mark_attempt(name, out, "stalled, re-run")
                continue
            return out, attempt

    def _mark_attempt(self, name: str, out: Outcome, what: str) -> None:
        if not self.runs.enabled:
            return
        try:
            rid = out.summary.get("mlflow_run_id") or self.runs.find_child(name)
            if rid:
                self.runs.client.set_tag(rid, "search.attempt", what)
                if self.runs.client.get_run(rid).info.status == "RUNNING":
                    self.runs.client.set_terminated(rid, status="FAILED")
        except Exception as e:
            log.warning("could not tag attempt %s in MLflow: %s", name, e)

    @staticmethod
    def _fill(e: Experiment, out: Outcome) -> None:
        s = out.summary
        e.memory_gb = s["peak_vram_mb"] / 1024 if isinstance(s.get("peak_vram_mb"), (int, float)) else None
        e.training_seconds = s.get("training_seconds")
        e.stall_seconds = s.get("stall_seconds", s.get("stalled_seconds"))
        e.num_steps = s.get("num_steps")
        e.wall_seconds = out.wall_seconds or s.get("total_seconds")

    # ================================================================== recording
    def record(self, e: Experiment, rows: list[Experiment], out: Optional[Outcome], best: Best,
               values: Optional[list[float]] = None) -> Experiment:
        """Ledger row (the commit point), then MLflow tags, then the branch and state follow."""
        import datetime as dt

        sess, st = self.session, self.session.state
        e.finished = dt.datetime.now().isoformat(timespec="seconds")
        if e.status != "invalid" and e.margin is None:
            e.margin = self.margin(rows)
        if values:
            self.ledger.save(e.exp, e.proposal, e.config, commit=e.commit, values=values)
        run_id, created = None, False
        summary = out.summary if out is not None else {}
        if self.runs.enabled:
            try:
                name = _attempt_name(e.exp, e.attempts)
                run_id = summary.get("mlflow_run_id") or (self.runs.find_child(name) if out is not None else None)
                if not run_id:  # the train side logged nothing (invalid proposal, early crash, tracking off)
                    run_id, created = self.runs.create_child(e.exp), True
            except Exception as err:
                log.warning("MLflow: could not find or create the run of %s: %s", e.exp, err)
        e.mlflow_run_id = run_id or ""
        self.ledger.append(e)
        if run_id:
            try:
                self._tag_run(e, len(rows) + 1, run_id, summary if created else {}, out, created)
            except Exception as err:
                log.warning("MLflow: could not tag the run of %s: %s", e.exp, err)
        st.in_flight = None
        sess.save()
        self._say(e)
        return e

    def _tag_run(self, e: Experiment, step: int, run_id: Optional[str], summary: dict,
                 out: Optional[Outcome] = None, created: bool = False) -> None:
        if not run_id:
            return
        arts = {"overrides.txt": "\n".join(e.proposal.overrides) + "\n" if e.proposal and e.proposal.overrides else "",
                "config.txt": "\n".join(e.config) + "\n" if e.config else "",
                "patch.diff": e.proposal.patch if e.proposal and e.proposal.patch else ""}
        if out is not None and out.status != "ok" and out.log_tail:
            arts["log_tail.txt"] = out.log_tail
        files = {}
        if out is not None and (out.run_dir / "run.log").exists():
            files["run.log"] = out.run_dir / "run.log"
        self.runs.record(e, step, run_id, summary, arts, files, created)
        for k, v in ((e.proposal.meta.get("metrics") if e.proposal else None) or {}).items():  # agent=claude: tokens, cost
            self.runs.client.log_metric(run_id, k, float(v), step=step)
        best = self.best(self.rows())
        self.runs.log_parent(step, {"search/val_bpb": e.val_bpb, "search/best_val_bpb": best.val_bpb},
                             {"search.best_commit": best.commit, "search.best_exp": best.exp})

    def _say(self, e: Experiment) -> None:
        val = f"{e.val_bpb:.6f}" if e.val_bpb is not None else "-"
        extra = ""
        if e.delta is not None:
            extra = f" (delta {e.delta:+.4f}, margin {e.margin:.4f})"
        elif e.status in ("invalid", "crash", "interrupted"):
            extra = f" ({e.reason[:200]})"
        log.info("%-8s %-11s val_bpb %s%s  %s", e.exp, e.status, val, extra, e.description[:120])

    # ================================================================== the end
    def finish(self, status: str) -> None:
        if self.session is None:
            return
        try:
            rows = self.rows()
            best = self.best(rows)
            if status == "FINISHED":
                try:
                    from src.report import write_report

                    files = write_report(self.session.dir, rows=rows)
                    self.runs.log_parent_files(files)
                except Exception as e:
                    log.warning("could not write the report: %s", e)
            self.runs.log_parent(len(rows), {}, {"search.stop_reason": self.stop_reason or status.lower()})
            self.runs.close_parent(status)
            if math.isfinite(best.val_bpb):
                log.info("session %s: %s. Best val_bpb %.6f (%s, commit %s) on branch %s; ledger %s",
                         self.session.tag, self.stop_reason or status.lower(), best.val_bpb, best.exp,
                         best.commit[:7], self.session.state.branch, self.ledger.path)
            if status != "FINISHED":
                log.info("resume with: python -m src.search search.tag=%s search.resume=true", self.session.tag)
        except Exception as e:
            log.warning("while closing the session: %s", e)
        finally:
            self.agent.close() if hasattr(self, "agent") else None
            self.session.close()
            if getattr(self, "_log_handler", None):
                logging.getLogger("src").removeHandler(self._log_handler)
                self._log_handler.close()

    def summary(self) -> dict:
        rows = self.rows()
        best = self.best(rows)
        return {"tag": self.session.tag, "dir": str(self.session.dir), "branch": self.session.state.branch,
                "best_val_bpb": best.val_bpb, "best_commit": best.commit, "best_exp": best.exp,
                "rows": len(rows), "stop_reason": self.stop_reason}


def _attempt_name(exp: str, attempt: int) -> str:
    return exp if attempt <= 1 else f"{exp}-a{attempt}"


def _is_train(pid: int, run_dir: str) -> bool:
    """Is pid the train process of run_dir (and not some unrelated process that reused the pid)?"""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        import subprocess

        cmd = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True).stdout
    return "src.train" in cmd and (not run_dir or run_dir in cmd)


def run(cfg: SearchAppConfig, base_overrides: list[str], train_command: Optional[list[str]] = None) -> dict:
    """Run (or resume) a research session; returns its summary. Plain Python: tests call it directly."""
    return Search(cfg, base_overrides, train_command).run()


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def _hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from src.config import register_search_configs, to_object

    register_search_configs()

    @hydra.main(version_base="1.3", config_path="../conf", config_name="search")
    def main(dcfg) -> None:
        cfg = to_object(dcfg, SearchAppConfig)
        base = train_overrides(list(HydraConfig.get().overrides.task))
        signal.signal(signal.SIGTERM, _sigterm)
        try:
            out = run(cfg, base)
        except (SessionError, AgentStop) as e:
            log.error("%s", e)
            sys.exit(2)
        except ValueError as e:  # a malformed search space, replay file or agent option
            log.debug("details", exc_info=True)
            log.error("%s", e)
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)
        print(f"session {out['tag']}: best val_bpb {out['best_val_bpb']:.6f} ({out['best_exp']}, commit "
              f"{out['best_commit'][:7]}) on branch {out['branch']}; {out['stop_reason']}\n"
              f"report: python -m src.report {out['tag']}", flush=True)

    main()


if __name__ == "__main__":
    _hydra_main()
