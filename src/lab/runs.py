"""The MLflow runs of a research session: one parent run, one nested child per ledger row.

A child is the train run itself (it logs itself with tracking.parent_run_id) tagged by the search
afterwards, or a run the search creates when the train side logged nothing (invalid proposals,
crashes before tracking started). Every method is a no-op when tracking is disabled.

Usage: runs = SessionRuns(uri, "overnight"); runs.open_parent(None, tag, params, tags)
       run_id, created = runs.row_run(row, outcome); runs.tag_row(row, step, run_id, best, outcome, created)
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from src.lab.ledger import Experiment
from src.lab.runner import Outcome, attempt_name
from src.lab.decisions import OK, mlflow_status
from src.harness.tracking import MAX_PARAM_LEN, MAX_TAG_LEN, ensure_experiment

if TYPE_CHECKING:
    from src.lab.config import SearchAppConfig
    from src.lab.session import SessionState
    from src.lab.standings import Best

# the search knobs logged as params of the session's parent run (the verdict rule and the disturbed detector)
PARENT_PARAMS = ("baseline_repeats", "baseline_max_repeats", "baseline_spread", "noise_sigmas", "min_delta", "confirm",
                 "confirm_min_dof", "confirm_pairs", "confirm_alpha", "disturbed_factor", "disturbed_factor_new_shape",
                 "disturbed_retries")

log = logging.getLogger(__name__)

VIEW_TAG = "mlflow.sharedViewState."  # MLflow's UI loads a runs-table view from this experiment tag ...
VIEW_PARAM = "viewStateShareKey"  # ... named by this URL parameter (MLflow 3's shared views)
VIEW_COLUMNS = ["metrics.`search/val_bpb`", "metrics.`search/delta`", "tags.`search.status`",
                "tags.`search.description`", "metrics.`heldout/val_gain`", "metrics.`heldout/test_gain`",
                "tags.`search.agent`"]
VIEW_WIDTHS = {"tags.`search.description`": 260}
UI_DEFAULT = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def view_state(tag: Optional[str] = None) -> dict:
    """The runs table as a researcher wants it on opening: val_bpb, delta, status, description and the held-out
    gains as columns, best first, the rows flat (sorted by a metric, MLflow lists children beside their parent);
    tag: one session's runs only."""
    return {"searchFilter": f"tags.`search.session` = '{tag}'" if tag else "",
            "orderByKey": "metrics.`search/val_bpb`", "orderByAsc": True, "startTime": "ALL", "lifecycleFilter": "Active",
            "selectedColumns": VIEW_COLUMNS, "columnOrder": VIEW_COLUMNS,
            "columnWidths": {c: VIEW_WIDTHS.get(c, 110) for c in VIEW_COLUMNS}}


def view_key(tag: Optional[str] = None) -> str:
    return "overnight" + (f"-{tag}" if tag else "")


class SessionRuns:
    """The session's parent run and its children. Every method is a no-op when tracking is disabled."""

    def __init__(self, uri: Optional[str], experiment: str, enabled: bool = True):
        self.enabled = enabled and uri is not None
        self.uri = uri
        self.experiment_name = experiment
        self.parent_id: Optional[str] = None
        self.tag: Optional[str] = None
        self._client = None
        self._exp_id: Optional[str] = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self) -> str:
        if self._exp_id is None:
            self._exp_id = ensure_experiment(self.client, self.experiment_name, self.uri).experiment_id
        return self._exp_id

    def open_parent(self, parent_id: Optional[str], tag: str, params: dict, tags: dict) -> Optional[str]:
        """Create the session's parent run, or reopen it (resume); returns its id."""
        if not self.enabled:
            return None
        self.tag = tag
        self.publish_views(tag)
        if parent_id:
            self.client.update_run(parent_id, status="RUNNING")
            self.parent_id = parent_id
            return parent_id
        run = self.client.create_run(self.experiment_id(), run_name=f"research/{tag}",
                                     tags={"search.tag": tag, "search.session": tag, "search.role": "session", **tags})
        self.parent_id = run.info.run_id
        for k, v in params.items():
            self.client.log_param(self.parent_id, k, str(v)[:MAX_PARAM_LEN])
        return self.parent_id

    def find_child(self, run_name: str) -> Optional[str]:
        """The newest child of the session named `run_name` (what a train run created for an attempt)."""
        if not self.enabled:
            return None
        runs = self.client.search_runs([self.experiment_id()],
                                       filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and "
                                                     f"tags.mlflow.runName = '{run_name}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def children(self) -> list:
        if not self.enabled:
            return []
        return self.client.search_runs([self.experiment_id()],
                                       filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'",
                                       order_by=["attributes.start_time ASC"], max_results=5000)

    def close_stale(self, run_name: str, keep: Optional[str] = None) -> None:
        """Runs of an earlier, abandoned attempt (the search was killed): mark them KILLED, not RUNNING."""
        if not self.enabled:
            return
        for r in self.children():
            if r.info.run_name == run_name and r.info.run_id != keep and r.info.status == "RUNNING":
                self.client.set_tag(r.info.run_id, "search.attempt", "abandoned")
                self.client.set_terminated(r.info.run_id, status="KILLED")

    def publish_views(self, tag: str) -> None:
        """The experiment's shared runs-table views: every session's runs, and this session's (ui_link)."""
        try:
            for t in (None, tag):
                self.client.set_experiment_tag(self.experiment_id(), VIEW_TAG + view_key(t), json.dumps(view_state(t)))
        except Exception as e:  # a view is a convenience: the runs are recorded without it
            log.warning("could not publish the MLflow runs view of session %s: %s", tag, e)

    def ui_link(self, tag: Optional[str] = None) -> str:
        """The MLflow UI address of the runs table in the session's view (a local store: as `mlflow ui` serves it)."""
        base = self.uri.rstrip("/") if self.uri and self.uri.startswith(("http://", "https://")) else UI_DEFAULT
        return f"{base}/#/experiments/{self.experiment_id()}/runs?{VIEW_PARAM}={view_key(tag or self.tag)}"

    def create_child(self, name: str) -> str:
        run = self.client.create_run(self.experiment_id(), run_name=name, tags={"mlflow.parentRunId": self.parent_id})
        return run.info.run_id

    def record(self, e: Experiment, step: int, run_id: str, summary: dict, artifacts: dict[str, str],
               files: dict[str, Path], created: bool = False) -> None:
        """Tag the child run of ledger row `e` (created: the search made it, so it also gets the summary)
        and end it with the status its decision implies."""
        if not self.enabled:
            return
        c = self.client
        tags = {"search.exp": e.exp, "search.status": e.status, "search.description": e.description,
                "search.hypothesis": e.hypothesis, "search.kind": e.kind, "search.commit": e.commit,
                "search.run_status": e.run_status, "search.reason": e.reason, "search.overrides": e.overrides,
                "search.disturbed_runs": e.disturbed_runs, "search.shape": e.shape, "search.agent": e.agent,
                "search.session": self.tag or "",
                "mlflow.note.content": f"{e.description}\n\n{e.hypothesis}".strip()}
        if e.worker is not None:  # search.workers > 1: where it ran, on what, when it was proposed
            tags.update({"search.worker": e.worker, "search.parent": e.parent, "search.proposed": e.proposed})
        from mlflow.entities import RunTag

        # one request (a shared server with many workers: fewer round trips, all of the row's tags or none)
        c.log_batch(run_id, tags=[RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()])
        metrics = {"search/val_bpb": e.val_bpb, "search/delta": e.delta, "search/margin": e.margin,
                   "search/best_val_bpb": e.best_val_bpb, "search/noise_sigma": e.sigma, "search/noise_dof": e.dof,
                   "search/tokens_per_sec": e.tokens_per_sec}
        if created:  # the train side logged nothing: carry its summary here
            metrics.update({f"summary/{k}": v for k, v in summary.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for ov in (e.proposal.overrides if e.proposal else []):
                k, _, v = ov.partition("=")
                c.log_param(run_id, k.lstrip("+~"), v[:MAX_PARAM_LEN])
        for k, v in metrics.items():
            if v is not None and math.isfinite(float(v)):
                c.log_metric(run_id, k, float(v), step=step)
        for name, text in artifacts.items():
            if text:
                c.log_text(run_id, text, f"search/{name}")
        for name, path in files.items():
            if path and Path(path).exists():
                c.log_artifact(run_id, str(path), "search")
        if c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, status=mlflow_status(e.status))

    def log_parent(self, step: int, metrics: dict, tags: Optional[dict] = None) -> None:
        if not self.enabled or not self.parent_id:
            return
        for k, v in metrics.items():
            if v is not None and math.isfinite(float(v)):
                self.client.log_metric(self.parent_id, k, float(v), step=step)
        for k, v in (tags or {}).items():
            self.client.set_tag(self.parent_id, k, str(v)[:MAX_TAG_LEN])

    def log_parent_files(self, files: list[Path], artifact_path: str = "report") -> None:
        if not self.enabled or not self.parent_id:
            return
        for p in files:
            if Path(p).exists():
                self.client.log_artifact(self.parent_id, str(p), artifact_path)

    def close_parent(self, status: str) -> None:
        if self.enabled and self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)

    def mark_attempt(self, name: str, out: Outcome, what: str) -> None:
        """An attempt that will not stand for its row (stalled and re-run, a confirmation re-run): say so."""
        if not self.enabled:
            return
        try:
            rid = out.summary.get("mlflow_run_id") or self.find_child(name)
            if not rid:  # the train side logged nothing: the attempt still shows in the session, with why
                rid = self.create_child(name)
                for k in ("val_bpb", "tokens_per_sec", "step_time_p50", "mfu_percent"):
                    v = out.summary.get(k)
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self.client.log_metric(rid, f"summary/{k}", float(v))
            self.client.set_tag(rid, "search.attempt", what)
            if self.client.get_run(rid).info.status == "RUNNING":
                self.client.set_terminated(rid, status="FAILED")
        except Exception as e:
            log.warning("could not tag attempt %s in MLflow: %s", name, e)

    def row_run(self, e: Experiment, out: Optional[Outcome]) -> tuple[Optional[str], bool]:
        """The child run of a ledger row: the train run of its last attempt, or a new one when the train
        side logged nothing (invalid proposal, early crash, tracking off). (run id, created by us)."""
        if not self.enabled:
            return None, False
        try:
            summary = out.summary if out is not None else {}
            run_id = summary.get("mlflow_run_id") or (self.find_child(attempt_name(e.exp, e.attempts))
                                                      if out is not None else None)
            if run_id:
                return run_id, False
            return self.create_child(e.exp), True
        except Exception as err:
            log.warning("MLflow: could not find or create the run of %s: %s", e.exp, err)
            return None, False

    def tag_row(self, e: Experiment, step: int, run_id: Optional[str], best: "Best",
                out: Optional[Outcome] = None, created: bool = False) -> None:
        """Everything the session knows about row `e` on its child run, and the running best on the parent."""
        if not run_id or not self.enabled:
            return
        p = e.proposal
        arts = {"overrides.txt": "\n".join(p.overrides) + "\n" if p and p.overrides else "",
                "config.txt": "\n".join(e.overrides_in_effect) + "\n" if e.overrides_in_effect else "",
                "patch.diff": p.patch if p and p.patch else ""}
        if out is not None and out.status != OK and out.log_tail:
            arts["log_tail.txt"] = out.log_tail
        files = {}
        if out is not None and (out.run_dir / "run.log").exists():
            files["run.log"] = out.run_dir / "run.log"
        summary = out.summary if out is not None and created else {}
        self.record(e, step, run_id, summary, arts, files, created)
        for k, v in ((p.meta.get("metrics") if p else None) or {}).items():  # agent=claude: tokens, cost
            self.client.log_metric(run_id, k, float(v), step=step)
        self.log_parent(step, {"search/val_bpb": e.val_bpb, "search/best_val_bpb": best.val_bpb,
                               "search/noise_sigma": e.sigma, "search/noise_dof": e.dof},
                        {"search.best_commit": best.commit, "search.best_exp": best.exp})


def open_session_runs(cfg: "SearchAppConfig", st: "SessionState", session_dir: Path) -> SessionRuns:
    """The session's MLflow parent run (created, or reopened on resume); tracking off if the store fails
    (SessionError instead with tracking.strict)."""
    from src.lab.session import SessionError
    from src.harness.tracking import resolve_uri

    s, t = cfg.search, cfg.tracking
    uri = resolve_uri(t.uri)
    runs = SessionRuns(uri, t.experiment, t.enabled)
    st.tracking_uri, st.tracking_experiment = uri, t.experiment
    params = {"agent": cfg.agent.name, "search_space": cfg.search_space.name,
              "base_overrides": " ".join(st.base_overrides) or "(none)", "base_commit": st.base_commit,
              **{k: getattr(s, k) for k in PARENT_PARAMS}, "editable": " ".join(s.editable)}
    try:
        st.parent_run_id = runs.open_parent(st.parent_run_id, st.tag, params,
                                            {"search.branch": st.branch, "search.dir": str(session_dir)})
    except Exception as e:  # an unreachable tracking server must not cost the night
        if t.strict:
            raise SessionError(f"MLflow at {uri} is not usable ({e}); fix it or drop tracking.strict") from None
        log.warning("MLflow at %s is not usable (%s): the session continues without tracking", uri, e)
        runs.enabled = False
    return runs
