"""The record of a session: results.tsv (one row per experiment) and its MLflow runs.

results.tsv starts with the reference's columns (commit, val_bpb, memory_gb, status, description)
and adds ours. Rows are appended with one write + fsync, so a crash or kill -9 leaves every
earlier row intact; a torn last line (disk full mid-write) is cut off on the next read. Each
proposal is saved beside it (proposals/<exp>.json, plus .diff) before its run starts.

In MLflow the session is one parent run; each row is a nested child: the train run itself (it
logs itself with tracking.parent_run_id) tagged by the search afterwards, or a run the search
creates when the train side logged nothing (invalid proposals, crashes before tracking started).

Usage: ledger = Ledger(session_dir); ledger.append(exp); rows = ledger.rows()
       runs = SessionRuns(uri, "overnight"); pid = runs.open_parent(...); runs.record(exp, ...)
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from src.proposal import Proposal
from src.session import atomic_write, disk_error
from src.tracking import artifact_location

log = logging.getLogger("src.ledger")

# decisions (the `status` column, the reference's keep/discard/crash plus ours)
STATUSES = ("baseline", "keep", "discard", "crash", "invalid", "interrupted")
COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description", "exp", "hypothesis", "kind", "delta",
           "margin", "best_val_bpb", "run_status", "training_seconds", "stall_seconds", "num_steps",
           "wall_seconds", "attempts", "overrides", "reason", "mlflow_run_id", "finished")


@dataclass
class Experiment:
    exp: str  # base-1, base-2, exp-001, ...
    status: str  # one of STATUSES
    description: str
    commit: str = ""  # the commit that ran (full sha; the TSV shows 7 characters)
    val_bpb: Optional[float] = None
    memory_gb: Optional[float] = None
    hypothesis: str = ""
    kind: str = ""  # baseline | overrides | patch | patch+overrides
    delta: Optional[float] = None  # val_bpb - best before this experiment (negative = better)
    margin: Optional[float] = None  # the noise margin it had to beat
    best_val_bpb: Optional[float] = None  # the best after this row
    run_status: str = ""  # train's status (ok, nan, crash, timeout, stalled, killed) or interrupted / -
    training_seconds: Optional[float] = None
    stall_seconds: Optional[float] = None
    num_steps: Optional[int] = None
    wall_seconds: Optional[float] = None
    attempts: int = 0
    overrides: str = ""  # the proposal's overrides, space-separated
    reason: str = ""  # why invalid / why it failed / confirmation figures
    mlflow_run_id: str = ""
    finished: str = ""
    proposal: Optional[Proposal] = field(default=None, repr=False)  # from proposals/<exp>.json
    config: list[str] = field(default_factory=list, repr=False)  # research overrides in effect (kept + this)
    values: list[float] = field(default_factory=list, repr=False)  # full-precision val_bpb of each run behind it

    @property
    def score(self) -> Optional[float]:
        """val_bpb at full precision (the mean of its runs), else the TSV's 6 decimals."""
        return sum(self.values) / len(self.values) if self.values else self.val_bpb

    @property
    def ran(self) -> bool:
        """A training run happened (or was started) for this row."""
        return self.status not in ("invalid",)

    @property
    def counts(self) -> bool:
        """Counts toward search.max_experiments: a finished experiment (not invalid, not interrupted)."""
        return self.exp.startswith("exp-") and self.status in ("keep", "discard", "crash")

    def to_row(self) -> str:
        cells = []
        for c in COLUMNS:
            v = getattr(self, c)
            if c == "commit":
                v = (v or "")[:7]
            if v is None:
                v = ""
            elif isinstance(v, float):
                v = "" if not math.isfinite(v) else (f"{v:.6f}" if c in ("val_bpb", "delta", "margin", "best_val_bpb")
                                                      else f"{v:.1f}" if c == "memory_gb" else f"{v:.2f}")
            cells.append(" ".join(str(v).split()))  # no tabs or newlines inside a cell
        return "\t".join(cells) + "\n"

    @classmethod
    def from_row(cls, cells: dict) -> "Experiment":
        kw = {}
        for f in fields(cls):
            if f.name not in cells:
                continue
            v = cells[f.name]
            if f.name in ("val_bpb", "memory_gb", "delta", "margin", "best_val_bpb", "training_seconds",
                          "stall_seconds", "wall_seconds"):
                v = float(v) if v not in ("", None) else None
            elif f.name in ("num_steps", "attempts"):
                v = int(float(v)) if v not in ("", None) else (0 if f.name == "attempts" else None)
            kw[f.name] = v
        return cls(**kw)


class LedgerError(RuntimeError):
    pass


class Ledger:
    def __init__(self, session_dir: Path):
        self.path = Path(session_dir) / "results.tsv"
        self.proposals = Path(session_dir) / "proposals"

    def rows(self) -> list[Experiment]:
        """Every recorded experiment, in order, with its proposal and config joined in."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a torn append (disk full, power loss): drop the partial line
            keep = data[: data.rfind(b"\n") + 1]
            log.warning("results.tsv ended in a partial row; removing it (%d bytes)", len(data) - len(keep))
            with open(self.path, "r+b") as f:
                f.truncate(len(keep))
                os.fsync(f.fileno())
            data = keep
        lines = data.decode("utf-8").splitlines()
        if not lines:
            return []
        header = lines[0].split("\t")
        out = []
        for line in lines[1:]:
            if not line.strip():
                continue
            cells = dict(zip(header, line.split("\t")))
            e = Experiment.from_row(cells)
            rec = self.load(e.exp)
            if rec:
                e.commit = rec.get("commit") or e.commit
                e.config = list(rec.get("config") or [])
                e.values = [float(v) for v in rec.get("values") or []]
                if rec.get("proposal"):
                    e.proposal = Proposal.from_dict(rec["proposal"])
            out.append(e)
        return out

    def append(self, e: Experiment) -> None:
        """Append one row: a single write, then fsync; on failure the file is left as it was."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        text = ("\t".join(COLUMNS) + "\n" if new else "") + e.to_row()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise disk_error(err, str(self.path)) from err
        size = os.fstat(fd).st_size
        try:
            data = text.encode("utf-8")
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write")
            os.fsync(fd)
        except OSError as err:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise disk_error(err, f"{self.path} (row {e.exp})") from err
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ proposals/<exp>.json
    def save(self, exp: str, proposal: Optional[Proposal], config: list[str], commit: str = "", **extra) -> None:
        """Persist what an experiment is (before it runs): proposal, research overrides, commit."""
        self.proposals.mkdir(parents=True, exist_ok=True)
        rec = {"exp": exp, "proposal": proposal.to_dict() if proposal else None, "config": list(config),
               "commit": commit, **extra}
        atomic_write(self.proposals / f"{exp}.json", json.dumps(rec, indent=2))
        if proposal is not None and proposal.patch:
            atomic_write(self.proposals / f"{exp}.diff", proposal.patch)

    def load(self, exp: str) -> Optional[dict]:
        try:
            return json.loads((self.proposals / f"{exp}.json").read_text())
        except (OSError, ValueError):
            return None


# ---------------------------------------------------------------------------- MLflow


class SessionRuns:
    """The session's parent run and its children. Every method is a no-op when tracking is disabled."""

    def __init__(self, uri: Optional[str], experiment: str, enabled: bool = True):
        self.enabled = enabled and uri is not None
        self.uri = uri
        self.experiment_name = experiment
        self.parent_id: Optional[str] = None
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
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    self._exp_id = self.client.create_experiment(self.experiment_name,
                                                                 artifact_location=artifact_location(self.uri))
                except Exception:  # created meanwhile by a train run
                    self._exp_id = self.client.get_experiment_by_name(self.experiment_name).experiment_id
            else:
                self._exp_id = exp.experiment_id
        return self._exp_id

    def open_parent(self, parent_id: Optional[str], tag: str, params: dict, tags: dict) -> Optional[str]:
        """Create the session's parent run, or reopen it (resume); returns its id."""
        if not self.enabled:
            return None
        if parent_id:
            self.client.update_run(parent_id, status="RUNNING")
            self.parent_id = parent_id
            return parent_id
        run = self.client.create_run(self.experiment_id(), run_name=f"research/{tag}",
                                     tags={"search.tag": tag, "search.role": "session", **tags})
        self.parent_id = run.info.run_id
        for k, v in params.items():
            self.client.log_param(self.parent_id, k, str(v)[:6000])
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

    def create_child(self, name: str) -> str:
        run = self.client.create_run(self.experiment_id(), run_name=name, tags={"mlflow.parentRunId": self.parent_id})
        return run.info.run_id

    def record(self, e: Experiment, step: int, run_id: str, summary: dict, artifacts: dict[str, str],
               files: dict[str, Path], created: bool = False) -> None:
        """Tag the child run of ledger row `e` (created: the search made it, so it also gets the summary)."""
        if not self.enabled:
            return
        c = self.client
        tags = {"search.exp": e.exp, "search.status": e.status, "search.description": e.description,
                "search.hypothesis": e.hypothesis, "search.kind": e.kind, "search.commit": e.commit,
                "search.run_status": e.run_status, "search.reason": e.reason, "search.overrides": e.overrides,
                "mlflow.note.content": f"{e.description}\n\n{e.hypothesis}".strip()}
        for k, v in tags.items():
            c.set_tag(run_id, k, str(v)[:5000])
        metrics = {"search/val_bpb": e.val_bpb, "search/delta": e.delta, "search/margin": e.margin,
                   "search/best_val_bpb": e.best_val_bpb}
        if created:  # the train side logged nothing: carry its summary here
            metrics.update({f"summary/{k}": v for k, v in summary.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for ov in (e.proposal.overrides if e.proposal else []):
                k, _, v = ov.partition("=")
                c.log_param(run_id, k.lstrip("+~"), v[:6000])
        for k, v in metrics.items():
            if v is not None and math.isfinite(float(v)):
                c.log_metric(run_id, k, float(v), step=step)
        for name, text in artifacts.items():
            if text:
                c.log_text(run_id, text, f"search/{name}")
        for name, path in files.items():
            if path and Path(path).exists():
                c.log_artifact(run_id, str(path), "search")
        status = c.get_run(run_id).info.status
        if status == "RUNNING":
            c.set_terminated(run_id, status="FINISHED" if e.status in ("baseline", "keep", "discard")
                             else "KILLED" if e.status == "interrupted" else "FAILED")
        return run_id

    def log_parent(self, step: int, metrics: dict, tags: Optional[dict] = None) -> None:
        if not self.enabled or not self.parent_id:
            return
        for k, v in metrics.items():
            if v is not None and math.isfinite(float(v)):
                self.client.log_metric(self.parent_id, k, float(v), step=step)
        for k, v in (tags or {}).items():
            self.client.set_tag(self.parent_id, k, str(v)[:5000])

    def log_parent_files(self, files: list[Path], artifact_path: str = "report") -> None:
        if not self.enabled or not self.parent_id:
            return
        for p in files:
            if Path(p).exists():
                self.client.log_artifact(self.parent_id, str(p), artifact_path)

    def close_parent(self, status: str) -> None:
        if self.enabled and self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)


def experiment_dict(e: Experiment) -> dict:
    d = asdict(e)
    d.pop("proposal", None)
    return d
