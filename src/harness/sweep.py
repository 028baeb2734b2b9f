"""Hydra multirun sweeps of `python -m src.train -m ...`: one MLflow parent run, a child per job, a results table.

`SweepCallback` (conf/train.yaml, hydra.callbacks) opens the parent run when the multirun starts,
hands its id to the jobs through $OVERNIGHT_PARENT_RUN_ID (in-process and joblib jobs inherit
it), names each job's run by the values it sweeps, and prints the sweep's results, best first.

Usage: python -m src.train -m optimizer.matrix_lr=0.02,0.04 [hydra/launcher=joblib]
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
from pathlib import Path

from src.harness.config import TrackingConfig, to_object
from src.harness.status import CRASH, KILLED, OK
from src.harness.tracking import PARENT_ENV, Tracker, TrackingError

log = logging.getLogger(__name__)
SWEEP_KEYS_ENV = "OVERNIGHT_SWEEP_KEYS"  # the keys the sweep varies, which name its jobs' runs


def sweep_table(sweep_dir: Path) -> list[dict]:
    """The sweep's jobs (their summary.json and overrides), best val_bpb first, failures last."""
    rows = []
    for path in sorted(sweep_dir.rglob("summary.json")):
        s = json.loads(path.read_text())
        ov = path.parent / ".hydra" / "overrides.yaml"
        s["overrides"] = " ".join(l[2:].strip() for l in ov.read_text().splitlines() if l.startswith("- ")) \
            if ov.exists() else ""
        s["job"] = path.parent.relative_to(sweep_dir).as_posix()
        rows.append(s)
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
    for r in rows:  # what the sweep varied, for the table
        r["changes"] = " ".join(o for o in r["overrides"].split() if o not in common)
    def rank(s: dict) -> tuple:
        bpb = s.get("val_bpb")
        return s.get("status") != OK, bpb if isinstance(bpb, (int, float)) and math.isfinite(bpb) else math.inf

    return sorted(rows, key=rank)


def format_table(rows: list[dict]) -> str:
    cols = [("job", "job", "{}"), ("val_bpb", "val_bpb", "{:.6f}"), ("status", "status", "{}"),
            ("steps", "num_steps", "{}"), ("tok/s", "tokens_per_sec", "{:.0f}"), ("p50 s", "step_time_p50", "{:.3f}"),
            ("p99 s", "step_time_p99", "{:.3f}"), ("stalls", "stalls", "{}"), ("overrides", "changes", "{}")]
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a multirun varies: those of its sweep overrides (`a=1,2`, `x=range(3)`, `group=a,b`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.get_key_element() for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]


def job_run_name(job_overrides: list[str]) -> str | None:
    """A sweep job's run name: its values of the swept keys (`optimizer.matrix_lr=0.02,batch=small`)."""
    keys = set(filter(None, os.environ.get(SWEEP_KEYS_ENV, "").split(",")))
    name = ",".join(o for o in job_overrides if o.split("=", 1)[0] in keys)
    return name[:250] or None


try:
    from hydra.experimental.callback import Callback
except ImportError:  # hydra is a dependency; keep the module importable without it
    Callback = object


class SweepCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun, its jobs nested under it, a results table at the end.

    The parent's id reaches the jobs through $OVERNIGHT_PARENT_RUN_ID, which the basic launcher's
    in-process jobs and the joblib launcher's worker processes both inherit.
    """

    def __init__(self) -> None:
        self.tracker: Tracker | None = None

    def __getstate__(self) -> dict:  # joblib pickles callbacks for its workers; the parent run stays here
        return {"tracker": None}

    def on_multirun_start(self, config, **kwargs) -> None:
        tcfg = to_object(config.tracking, TrackingConfig) if "tracking" in config else TrackingConfig()
        if not tcfg.enabled:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        tcfg.run_name = tcfg.run_name or f"sweep {sweep_dir.parent.name}/{sweep_dir.name}"
        overrides = " ".join(config.hydra.overrides.task)
        os.environ[SWEEP_KEYS_ENV] = ",".join(swept_keys(list(config.hydra.overrides.task)))
        self.tracker = Tracker(tcfg, tags={"sweep": "true", "sweep_dir": str(config.hydra.sweep.dir),
                                           "sweep_overrides": overrides})
        self.tracker.start()
        try:
            self.tracker.wait_ready()
        except TrackingError as e:
            log.error("%s", e)
            raise
        if self.tracker.active:
            os.environ[PARENT_ENV] = self.tracker.run_id
            print(f"MLflow: sweep parent run {self.tracker.run_id} ({tcfg.run_name})", flush=True)
            atexit.register(self._abandoned)

    def _abandoned(self) -> None:
        """The sweep ended without on_multirun_end (Ctrl-C, a crashed job): mark the parent killed."""
        if self.tracker is not None and not self.tracker.finished:
            self.tracker.finish(KILLED, {"error": "the sweep stopped before all jobs finished"})

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = sweep_table(sweep_dir)
        table = format_table(rows)
        print(f"\nsweep results ({len(rows)} jobs, best first) in {sweep_dir}:\n{table}", flush=True)
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEEP_KEYS_ENV, None)
        if self.tracker is None or not self.tracker.active:
            return
        best = rows[0] if rows and rows[0].get("status") == OK else {}
        summary = {"val_bpb": best.get("val_bpb", float("nan")), "jobs": len(rows),
                   "jobs_ok": sum(r.get("status") == OK for r in rows)}
        self.tracker.set_tags({"best_run_id": best.get("mlflow_run_id", ""),
                               "best_overrides": best.get("overrides", "")})
        self.tracker.finish(OK if best else CRASH, summary, texts={"sweep_results.txt": table + "\n"})
        print(self.tracker.report(), flush=True)
