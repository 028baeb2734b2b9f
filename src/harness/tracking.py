"""MLflow tracking: one store under mlruns/ (sqlite db + artifacts beside it), every run logged off the hot path.

A `Tracker` is one MLflow run. Its background thread imports mlflow, opens the store and
creates the run while the model is built (~2 s, overlapped), then sends the per-step
metrics buffered by `log_step` in `log_batch` calls every `tracking.flush_every_s`.
`finish` sends the rest, the final metrics and the artifacts (resolved config, run log,
summary.json, step-time histogram) and ends the run FINISHED or FAILED (src/harness/status.py), with
the reason in the `status` tag (ok, stalled, nan, crash, killed, timeout).

Faults: a store that cannot be opened is a `TrackingError` before training; an unreachable
tracking server is one too with `tracking.strict=true`, otherwise the run trains unlogged and
`not_logged` says what is missing. Sweeps (one parent run per multirun) are src/harness/sweep.py.

Usage:
    tracker = Tracker(cfg.tracking, out_dir).start()  # checks the store, opens it in the background
    tracker.wait_ready()                               # after warm-up; TrackingError for a bad store
    tracker.log_params(flatten(cfg)); tracker.log_step(step, {"loss": 2.1, ...})  # -> train/loss
    tracker.finish("ok", summary, files=[...], step_times=clock.step_times)
"""
from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from collections import deque
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable

from src.harness.config import TrackingConfig
from src.harness.paths import REPO
from src.harness.status import mlflow_status

log = logging.getLogger(__name__)
DEFAULT_STORE = REPO / "mlruns"
PARENT_ENV = "OVERNIGHT_PARENT_RUN_ID"  # set by src.harness.sweep.SweepCallback so every job of a sweep nests under one run
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
MAX_TAG_LEN = 5000  # ... and the length we keep of a tag value
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every sqlite database file
BUSY_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # waits before retrying a call that found the sqlite store locked


class TrackingError(RuntimeError):
    """The MLflow store cannot be used, and the run must not start."""


def resolve_uri(uri: str | None = None, store: Path = DEFAULT_STORE) -> str:
    """The tracking URI: explicit > $MLFLOW_TRACKING_URI > sqlite:///<repo>/mlruns/mlflow.db."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{store / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The db file of a sqlite URI (sqlite:///rel.db, sqlite:////abs.db), else None."""
    return Path(uri[len("sqlite:///"):]).resolve() if uri.startswith("sqlite:///") else None


def artifact_root(store: Path = DEFAULT_STORE) -> str:
    """Artifacts live beside the db, under mlruns/artifacts (used when creating experiments)."""
    return (store / "artifacts").as_uri()


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite db; a server decides for itself."""
    db = sqlite_path(uri)
    return artifact_root(db.parent) if db else None


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_server(uri: str, timeout: float) -> None:
    """Raise OSError unless the tracking server at `uri` answers its health check."""
    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
        if resp.status != 200:
            raise OSError(f"health check answered HTTP {resp.status}")


def ensure_experiment(client, name: str, uri: str):
    """The MLflow experiment `name`, created (artifacts beside a sqlite store) if missing; race-free
    when several processes (train runs, the search) create it at once."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            client.create_experiment(name, artifact_location=artifact_location(uri))
        except MlflowException:  # another process created it first
            pass
        exp = client.get_experiment_by_name(name)
    return exp


def is_busy(error: BaseException) -> bool:
    """Whether a failed store call met another writer's lock (sqlite's "database is locked")."""
    return "database is locked" in str(error) or "database is busy" in str(error)


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """A (nested) dataclass or dict as dotted keys -> string values, the form MLflow params take."""
    if is_dataclass(obj):
        obj = asdict(obj)
    out: dict[str, str] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM_LEN]
    return out


def final_metrics(summary: dict) -> dict[str, float]:
    """`val/bpb` plus every number of the summary as `summary/<key>` (so the runs table sorts by any)."""
    out = {"val/bpb": float(summary.get("val_bpb", float("nan")))}
    for k, v in summary.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"summary/{k}"] = float(v)
    return out


def step_time_figure(step_times: list[float], stalled_steps: list[int], first_step: int, path: Path) -> Path:
    """Histogram of step times (log bins, stalls in red, p50/p90/p99 marked) and step time per step."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    t = np.asarray(step_times, dtype=float)
    steps = np.arange(first_step, first_step + len(t))
    stalled = np.isin(steps, stalled_steps)
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2)
    if len(t):
        bins = np.geomspace(max(t.min(), 1e-4) * 0.9, t.max() * 1.1, 50) if t.max() > t.min() else 10
        ax.hist([t[~stalled], t[stalled]], bins=bins, stacked=True, color=["tab:blue", "tab:red"],
                label=["normal", f"stalled ({stalled.sum()})"])
        ax.set_xscale("log" if t.max() > t.min() else "linear")
        for q, style in ((50, "-"), (90, "--"), (99, ":")):
            v = float(np.percentile(t, q))
            ax.axvline(v, color="k", linestyle=style, linewidth=1, label=f"p{q} {v:.3g} s")
        ax.legend(fontsize=8)
        ax2.plot(steps, t, ".", markersize=3, color="tab:blue")
        ax2.plot(steps[stalled], t[stalled], "o", color="tab:red")
        ax2.set_yscale("log")
        for axis in (ax.xaxis, ax2.yaxis):  # plain numbers on the log axes, no crowded minor labels
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="step time (s)", ylabel="steps", title=f"step times ({len(t)} counted steps)")
    ax2.set(xlabel="step", ylabel="step time (s)", title="step time per step")
    fig.savefig(path, dpi=100)
    return path


class Tracker:
    """One MLflow run for one training run; cheap to call from the training loop."""

    def __init__(self, cfg: TrackingConfig, out_dir: Path | None = None, tags: dict | None = None):
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.uri = resolve_uri(cfg.uri)
        self.out_dir = out_dir
        self.tags = dict(tags or {})
        self.parent_run_id = cfg.parent_run_id or os.environ.get(PARENT_ENV) or None
        self.run_id: str | None = None
        self.not_logged: list[str] = []  # what did not reach MLflow, in words
        self._client = None
        self._open_error: str | None = None  # the store could not be opened (local) or reached (server)
        self._buf: deque = deque()  # (step, timestamp_ms, {name: value}); deque appends are thread-safe
        self._pending: list = []  # Metric objects not sent yet (touched only by whoever flushes)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._io = threading.Lock()  # one client call at a time
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._finished = False
        self._last_error = ""

    @property
    def finished(self) -> bool:
        """`finish` was called (the run is ended, or was never logged)."""
        return self._finished

    @property
    def active(self) -> bool:
        """Runs are being logged (enabled, store open)."""
        return self.enabled and self._client is not None and self.run_id is not None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Tracker":
        """Check the store now (cheap), then open it and create the run in the background."""
        if self.enabled:
            self.precheck()
            if is_remote(self.uri):  # fail fast on a dead server instead of retrying for minutes
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            self._thread.start()
        return self

    def precheck(self) -> None:
        """Raise TrackingError now for a local store that cannot be opened, or (strict) a dead server."""
        db = sqlite_path(self.uri)
        try:
            if db is not None:
                if db.exists() and (not db.is_file() or _head(db) not in (b"", SQLITE_MAGIC)):
                    raise OSError(f"{db} is not a sqlite database file")
                db.parent.mkdir(parents=True, exist_ok=True)
                if not os.access(db if db.exists() else db.parent, os.W_OK):
                    raise PermissionError(f"{db if db.exists() else db.parent} is not writable")
            elif self.cfg.strict and is_remote(self.uri):
                check_server(self.uri, self.cfg.timeout_s)
        except OSError as e:
            self._open_error = f"{type(e).__name__}: {e}"
            self._ready.set()
            self.wait_ready()  # raises with the message for this kind of store

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the run exists. Raises TrackingError for a store that cannot be opened,
        or an unreachable server with tracking.strict=true; otherwise logs what will be missing."""
        if not self.enabled:
            return
        if not self._ready.wait(timeout):
            self._open_error = f"opening the store took more than {timeout:.0f} s"
        if self._open_error is None:
            log.info("MLflow: run %s in experiment %r at %s", self.run_id, self.cfg.experiment, self.uri)
            return
        if not is_remote(self.uri):
            raise TrackingError(
                f"cannot open the MLflow store {self.uri}: {self._open_error}. Point tracking.uri (or "
                "$MLFLOW_TRACKING_URI) at a writable sqlite file such as sqlite:///mlruns/mlflow.db, "
                "or run with tracking.enabled=false")
        if self.cfg.strict:
            raise TrackingError(
                f"MLflow server {self.uri} is unreachable ({self._open_error}) and tracking.strict=true: "
                "refusing to train. Start the server, fix tracking.uri / $MLFLOW_TRACKING_URI, or set "
                "tracking.strict=false to train without logging")
        self._unlogged(f"the whole run (params, metrics, artifacts): server {self.uri} unreachable "
                       f"({self._open_error})")
        log.warning("MLflow: NOT logging this run: server %s is unreachable (%s); training goes on and "
                    "summary.json is still written locally", self.uri, self._open_error)

    def _work(self) -> None:
        try:
            self._open()
        except Exception as e:  # reported by wait_ready in the caller's thread
            self._open_error = f"{type(e).__name__}: {e}"
        finally:
            self._ready.set()
        if self._client is None:
            return
        while not self._stop.wait(self.cfg.flush_every_s):  # nothing heavier here: it would share the GIL
            self._flush()

    def _open(self) -> None:
        if is_remote(self.uri):
            check_server(self.uri, self.cfg.timeout_s)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        exp = ensure_experiment(client, self.cfg.experiment, self.uri)
        if exp.lifecycle_stage != "active":
            raise TrackingError(f"experiment {self.cfg.experiment!r} is deleted; restore it "
                                "(mlflow experiments restore) or pick another tracking.experiment")
        tags = {"status": "running", **self.tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = client.create_run(exp.experiment_id, run_name=self.cfg.run_name or None,
                                tags={k: str(v) for k, v in tags.items()})
        self.run_id, self._client = run.info.run_id, client

    # --- logging ---------------------------------------------------------------------------

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Buffer one step's metrics (logged as `train/<name>` with `step`); sent by the worker."""
        if self._open_error is None:
            self._buf.append((step, int(time.time() * 1000), values))

    def _flush(self) -> None:
        """Send the buffered steps; what fails stays pending for the next flush (the worker's, then finish's)."""
        from mlflow.entities import Metric

        while self._buf:
            step, ts, values = self._buf.popleft()
            self._pending.extend(Metric(f"train/{k}", float(v), ts, step) for k, v in values.items())
        while self._pending:
            if not self._call("log_batch", self.run_id, metrics=self._pending[:1000]):  # MLflow's limit per batch
                return
            del self._pending[:1000]

    def _call(self, name: str, *args, **kwargs) -> bool:
        """One client call; a failure is remembered, never raised into training. A local store busy
        with another writer (a sweep's parallel jobs, the lab beside a run) is retried with back-off."""
        for wait in (*BUSY_RETRY_S, None):
            try:
                with self._io:
                    getattr(self._client, name)(*args, **kwargs)
                return True
            except Exception as e:
                self._last_error = f"{type(e).__name__}: {str(e)[:300]}"
                if wait is None or not is_busy(e):
                    break
                log.info("MLflow: %s: the store is busy, retrying in %.1f s", name, wait)
                time.sleep(wait)
        log.warning("MLflow: %s failed: %s", name, self._last_error)
        return False

    def _unlogged(self, what: str) -> None:
        self.not_logged.append(what)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit per log_batch
            if not self._call("log_batch", self.run_id, params=items[i:i + 100]):
                self._unlogged(f"params ({self._last_error})")
                return

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        if not self._call("log_batch", self.run_id, tags=[RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]):
            self._unlogged(f"tags {sorted(tags)} ({self._last_error})")

    def finish(self, status: str, summary: dict, files: Iterable[Path] = (), texts: dict[str, str] | None = None,
               step_times: list[float] | None = None, stalled_steps: list[int] | None = None,
               first_step: int = 1, join_timeout: float = 60.0) -> None:
        """Send the rest and end the run: FINISHED (ok, stalled) or FAILED (nan, crash, killed, timeout)."""
        if self._finished or not self.enabled:
            return
        self._finished = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(join_timeout)
        if not self.active:
            return
        if self._thread.is_alive():
            self._unlogged(f"the last {len(self._buf)} steps of train/* metrics, final metrics, artifacts and "
                           f"the end status (the tracker thread hung: {self._last_error or 'no error seen'})")
            return
        if is_remote(self.uri):  # a server that died mid-run: say so at once instead of retrying every call
            try:
                check_server(self.uri, self.cfg.timeout_s)
            except OSError as e:
                self._unlogged(f"the rest of the run (unsent train/* metrics, final metrics, artifacts, end "
                               f"status): server {self.uri} went away ({type(e).__name__}: {e})")
                return
        from mlflow.entities import Metric

        self._flush()
        if self._pending:
            self._unlogged(f"{len(self._pending)} train/* metric values ({self._last_error})")
        step, now = int(summary.get("num_steps") or 0), int(time.time() * 1000)
        finals = [Metric(k, v, now, step) for k, v in final_metrics(summary).items()]
        if not self._call("log_batch", self.run_id, metrics=finals):
            self._unlogged(f"final metrics val/bpb, summary/* ({self._last_error})")
        artifacts = [Path(f) for f in files if Path(f).is_file()]
        if step_times is not None:
            fig_dir = self.out_dir or Path(os.environ.get("TMPDIR", "/tmp"))
            try:
                artifacts.append(step_time_figure(step_times, stalled_steps or [], first_step,
                                                  fig_dir / "step_times.png"))
            except Exception as e:  # a figure is never worth losing the run's record
                self._unlogged(f"step-time histogram ({type(e).__name__}: {e})")
        failed = [p.name for p in artifacts if not self._call("log_artifact", self.run_id, str(p))]
        failed += [n for n, text in (texts or {}).items() if not self._call("log_text", self.run_id, text, n)]
        if failed:
            self._unlogged(f"artifacts {', '.join(failed)} ({self._last_error})")
        tags = {"status": status}
        if summary.get("error"):
            tags["error"] = summary["error"]
        self.set_tags(tags)
        if not self._call("set_terminated", self.run_id, mlflow_status(status)):
            self._unlogged(f"the run's end status ({self._last_error})")

    def report(self) -> str:
        """One line for the console: where the run went, or what did not."""
        if not self.enabled:
            return "MLflow: tracking disabled (tracking.enabled=false)"
        if self.not_logged:
            return "MLflow: NOT logged: " + "; ".join(self.not_logged)
        if self.run_id is None:
            return f"MLflow: NOT logged: the store {self.uri} was not opened ({self._open_error or 'not started'})"
        return f"MLflow: run {self.run_id} logged to {self.uri}"
