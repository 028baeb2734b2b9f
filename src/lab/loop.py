"""The research loop: propose -> check -> commit -> run -> keep or discard -> record -> repeat.

Before a session exists, the preflight (src/lab/preflight.py) checks that its baseline composes,
its data is prepared and it dry-runs on the device. A session (src/lab/session.py) branches
research/<tag> off the current commit in a worktree under outputs/research/<tag>/, runs the
baseline until its repeats agree (src/lab/baseline.py: the noise floor), then asks the agent for
proposals until `search.max_experiments` have run, the agent has nothing left,
`search.max_hours` pass or Ctrl-C, through the pool of workers (src/lab/workers.py; search.workers=1 is a
pool of one). Each proposal becomes one experiment (src/lab/experiment.py):
checked, committed on the branch, run as `python -m src.train` in the worktree and kept only if it
beats the best by more than the noise margin (src/lab/standings.py), confirmed by paired re-runs
while the noise estimate is weak (src/lab/confirm.py); otherwise the branch is reset to the best.
Every experiment is one row of results.tsv and one nested MLflow run. Resume continues exactly
where it stopped, kill -9 included, with the knobs the session was started with (src/lab/resume.py).

Usage: summary = Search(cfg, base_overrides, cli=command_line).run()     (python -m src.search is the CLI)
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from src.harness.score_client import eval_spec
from src.lab.agents import Agent, build_agent
from src.lab.baseline import run_baseline
from src.lab.config import SearchAppConfig, check_search
from src.lab.context import Lab
from src.lab.experiment import new_row
from src.lab.heldout import describe, held_out, metrics
from src.lab.heldout import read as read_heldout
from src.lab.integrity import DeviceBudget
from src.lab.ledger import Ledger
from src.lab.preflight import code_at, preflight
from src.lab.proposal import override_key
from src.lab.resume import explicit_keys, reconcile, record_knobs, restore_baseline, restore_knobs
from src.lab.runner import Runner
from src.lab.runs import open_session_runs
from src.lab.session import Session, SessionError
from src.lab.slots import check_workers
from src.lab.workers import Pool, Worker, home

log = logging.getLogger(__name__)
# command-line keys that do not set the baseline
SEARCH_ROOTS = ("search", "agent", "search_space", "launcher", "hydra")


def train_overrides(task_overrides: list[str]) -> list[str]:
    """The train part of the search's command line (what sets the baseline): search/agent/hydra keys dropped."""
    return [o for o in task_overrides
            if override_key(o).lstrip("+~").split(".")[0].split("@")[0] not in SEARCH_ROOTS]


class Search:
    def __init__(self, cfg: SearchAppConfig, base_overrides: list[str], train_command: Optional[list[str]] = None,
                 cli: Optional[list[str]] = None):
        """cli: the whole command line (what a resume takes as given); None: every knob of cfg counts as given."""
        self.cfg = cfg
        self.train_command = train_command  # None: python -m src.train (tests substitute a stand-in)
        self.base_overrides = list(base_overrides)
        self.explicit = None if cli is None else explicit_keys(cli)
        self.agent: Optional[Agent] = None
        self.lab: Optional[Lab] = None
        self.session: Optional[Session] = None
        self.home: Optional[Worker] = None  # the session's own worktree and runner: the baseline, a pool of one
        self.stop_reason = ""
        self._log_handler: Optional[logging.Handler] = None

    # ------------------------------------------------------------------ open
    def open(self) -> None:
        """Check everything that can be checked (knobs, agent, preflight), then create or reopen the session."""
        s = self.cfg.search
        if s.resume:  # the session's own knobs first: they are what the checks below must pass
            self.session = Session.open(s.tag, True, self.base_overrides, s.repo, s.root, s.base)
            self._log_to_file()
            self._restore(self.session.state)
            s = self.cfg.search
        try:
            check_search(s)
        except ValueError as e:
            raise SessionError(str(e)) from None
        if s.workers > 1:
            check_workers(self.cfg)  # a device slot per worker (GPUs, or threads x workers <= cores)
            if getattr(self.cfg.agent, "constant_liar", False) is None:  # TPE: trials in flight count as running
                self.cfg.agent.constant_liar = True
        # the agent first, checked (agent=claude: key, API): a missing key costs no session and no run
        self.agent = build_agent(self.cfg.agent, self.cfg.search_space)
        self.agent.preflight()
        # the baseline's own code (not the worktree: a resume may find a half-run candidate checked out there)
        if s.resume:
            plan, repo, base = None, Path(self.session.state.repo), self.session.state.base_commit
        else:
            plan = Session.plan(s.tag, s.repo, s.root, s.base)
            repo, base = plan.repo, plan.base_commit
        with code_at(repo, base) as code:
            base_config = preflight(code, self.base_overrides, self._runner, f"commit {base[:7]}")
        if plan is not None:
            self.session = Session.create(plan, self.base_overrides)
            self._log_to_file()
        sess = self.session
        st = sess.state
        if sess.dirty_warning:
            log.warning("uncommitted changes in src/ or conf/ of %s are NOT part of session %s (it branches from "
                        "commit %s):\n%s", st.repo, st.tag, st.base_commit[:7], sess.dirty_warning)
        st.invocations += 1
        record_knobs(self.cfg, st)
        runs = open_session_runs(self.cfg, st, sess.dir)
        sess.save()
        self.lab = Lab(self.cfg, sess, Ledger(sess.dir), runs, self.base_overrides, base_config)
        self.home = home(self.lab, self._runner(sess.worktree))

    def _runner(self, cwd: Path) -> Runner:
        return self.make_runner(cwd)

    def make_runner(self, cwd: Path, env: Optional[dict] = None, cpus: tuple = ()) -> Runner:
        """The runner of a worktree (env, cpus: a worker's device slot); launcher=submitit_*: runs are submitit jobs
        (placed by submitit/SLURM, not pinned here)."""
        s, launcher = self.cfg.search, self.cfg.launcher
        if launcher.name != "local":
            from src.lab.launcher import SubmititRunner

            folder = launcher.folder or (str(self.session.dir / "submitit") if self.session is not None else None)
            return SubmititRunner(cwd, s.env_strip, s.env_keep, command=self.train_command, extra_env=env,
                                  launcher=launcher, folder=folder, eval_spec=self.eval_spec(),
                                  host_floor=self.host_floor, hide_roots=self.hide_roots())
        return Runner(cwd, s.env_strip, s.env_keep, command=self.train_command, extra_env=env, cpus=cpus,
                      budget=self.device_budget(), eval_spec=self.eval_spec(), host_floor=self.host_floor,
                      hide_roots=self.hide_roots())

    def hide_roots(self) -> tuple:
        """Where the saved models of other runs lie (the session's folder, the repo's outputs): each run hides them."""
        if self.session is None:
            return ()
        return (str(self.session.dir), str(Path(self.session.state.repo) / "outputs"))

    def host_floor(self) -> Optional[float]:
        """The median training CPU seconds per token of the session's scored baseline runs (their summary's
        train_cost): the least the judge allows any run's model hosts per token (src/harness/score.py HostBudget).
        None until a baseline run is in."""
        if self.session is None:
            return None
        rates = []
        for f in sorted((self.session.dir / "runs").glob("base-*/summary.json")):
            try:
                summary = json.loads(f.read_text())
                cost = summary.get("train_cost") or {}
                if summary.get("status") == "ok" and summary.get("git_sha") == self.session.state.base_commit:
                    rates.append(float(cost["cpu_s"]) / float(cost["tokens"]))
            except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
                continue
        return sorted(rates)[len(rates) // 2] if rates else None

    def eval_spec(self) -> Optional[dict]:
        """How every run of the session is scored (the data set, row length, eval batch, threads), from the session's
        config: the scorer never takes them from a checkpoint (src/harness/score_client.py eval_spec)."""
        return eval_spec(self.lab.base_config) if self.lab is not None else None

    def device_budget(self) -> Optional[DeviceBudget]:
        """The session's time budget as each run's device time is checked against it (tokens mode: not checked)."""
        b = self.lab.base_config.budget if self.lab is not None else None
        if b is None or b.mode != "time":
            return None
        s = self.cfg.search
        return DeviceBudget(b.seconds, s.device_allowance_s, s.device_allowance_share)

    def _restore(self, st) -> None:
        """A resume keeps the session's train overrides, search knobs, agent and search space; what this command
        line gives again explicitly wins, with a warning naming each change."""
        if self.base_overrides and self.base_overrides != st.base_overrides:
            log.warning("resume: the session's train overrides are fixed at %s; ignoring %s from this command",
                        st.base_overrides, self.base_overrides)
        self.base_overrides = list(st.base_overrides)
        restore_baseline(self.cfg, st)
        explicit = self.explicit if self.explicit is not None else \
            {f"{g}.{k}" for g in ("search", "agent", "search_space", "launcher")
             for k in asdict(getattr(self.cfg, g))} | {"agent", "search_space", "launcher"}
        changes = restore_knobs(self.cfg, st, explicit)
        if changes:
            log.warning("resume: session %s continues as it was started, except what this command line gives: %s",
                        st.tag, "; ".join(changes))

    def _log_to_file(self) -> None:
        h = logging.FileHandler(self.session.dir / "search.log")
        h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger("src").addHandler(h)
        logging.getLogger("src").setLevel(logging.INFO)
        self._log_handler = h

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            self.open()
        except BaseException:
            if self.session is not None:
                self.session.close()
            raise
        lab = self.lab
        lab.deadline = time.time() + self.cfg.search.max_hours * 3600
        jobs = reconcile(lab)
        rows = lab.rows()
        state = lab.state(rows, lab.deadline - time.time())
        state.in_flight = [new_row(j.exp, j.proposal, [], []) for j in jobs if j.proposal is not None]
        self.agent.restore(rows, state)
        log.info("session %s: branch %s, dir %s, %d rows so far", self.session.tag, self.session.state.branch,
                 self.session.dir, len(rows))
        total = self.cfg.search.max_experiments
        bar = tqdm(total=total, initial=min(lab.standings(rows).experiments_run, total), unit="exp",
                   desc=f"search {self.session.tag}", disable=None if self.cfg.search.progress else True,
                   dynamic_ncols=True)  # None: shown on a terminal only
        status, pool = "FINISHED", None
        try:
            pool = Pool(lab, self.agent, self.home, self.make_runner)
            with logging_redirect_tqdm():
                run_baseline(lab, pool.workers, [j for j in jobs if j.proposal is None])
                pool.run([j for j in jobs if j.proposal is not None], bar)
        except KeyboardInterrupt:
            status = "KILLED"
            self.stop_reason = "interrupted (Ctrl-C)"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            if pool is not None and status != "KILLED":
                self.stop_reason = pool.stop_reason
            bar.close()
            self.finish(status)
        return self.summary()

    # ------------------------------------------------------------------ finish
    def finish(self, status: str) -> None:
        if self.session is None:
            return
        try:
            if self.lab is not None:
                self._close_runs(status)
        except Exception as e:
            log.warning("while closing the session: %s", e)
        finally:
            if self.agent is not None:
                self.agent.close()
            self.session.close()
            if self._log_handler is not None:
                logging.getLogger("src").removeHandler(self._log_handler)
                self._log_handler.close()

    def _close_runs(self, status: str) -> None:
        """The report (a finished session), the stop reason and the end status on the parent run; the last words."""
        lab = self.lab
        rows = lab.rows()
        best = lab.standings(rows).best
        held, tags = None, {"search.stop_reason": self.stop_reason or status.lower()}
        if status == "FINISHED":
            if lab.cfg.search.test_split:  # after the last decision: nothing of it reaches an agent
                try:
                    runner = self.home.runner if self.home is not None else None
                    held = held_out(self.session.dir, rows, env=runner.env if runner else None,
                                    cpus=runner.cpus if runner else ())
                    tags["heldout"] = describe(held)
                except Exception as e:
                    log.warning("could not score the held-out test split: %s", e)
            try:
                from src.lab.report import write_report

                lab.runs.log_parent_files(write_report(self.session.dir, rows=rows))
            except Exception as e:
                log.warning("could not write the report: %s", e)
        lab.runs.log_parent(len(rows), metrics(held), tags)
        lab.runs.close_parent(status)
        if math.isfinite(best.val_bpb):
            log.info("session %s: %s. Best val_bpb %.6f (%s, commit %s) on branch %s; ledger %s; %s%s",
                     self.session.tag, self.stop_reason or status.lower(), best.val_bpb, best.exp,
                     best.commit[:7], self.session.state.branch, lab.ledger.path, lab.standings(rows).verdicts(),
                     f"; held out: {describe(held)}" if held is not None else "")
        if status != "FINISHED":
            log.info("resume with: python -m src.search search.tag=%s search.resume=true", self.session.tag)

    def summary(self) -> dict:
        st = self.lab.standings()
        best = st.best
        return {"tag": self.session.tag, "dir": str(self.session.dir), "branch": self.session.state.branch,
                "best_val_bpb": best.val_bpb, "best_commit": best.commit, "best_exp": best.exp,
                "rows": len(self.lab.rows()), "stop_reason": self.stop_reason, "noise_sigma": st.noise.sigma,
                "noise_dof": st.noise.dof, "margin": st.margin, "disturbed_runs": st.disturbed_runs,
                "verdicts": st.verdicts(), "heldout": read_heldout(self.session.dir), "mlflow_link": self._link(),
                "mlflow_uri": self.lab.runs.uri if self.lab.runs.enabled else None}

    def _link(self) -> Optional[str]:
        runs = self.lab.runs if self.lab is not None else None
        if runs is None or not runs.enabled:
            return None
        try:
            return runs.ui_link(self.session.tag)
        except Exception as e:
            log.debug("no MLflow link: %s", e)
            return None


def run(cfg: SearchAppConfig, base_overrides: list[str], train_command: Optional[list[str]] = None,
        cli: Optional[list[str]] = None) -> dict:
    """Run (or resume) a research session; returns its summary. Plain Python: tests call it directly."""
    return Search(cfg, base_overrides, train_command, cli).run()
