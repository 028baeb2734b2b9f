"""The record of a session: results.tsv, one row per experiment (its MLflow runs: src/lab/runs.py).

results.tsv starts with the reference's columns (commit, val_bpb, memory_gb, status, description)
and adds ours. Rows are appended with one write + fsync, so a crash or kill -9 leaves every
earlier row intact; a torn last line (disk full mid-write) is cut off on the next read. Each
proposal is saved beside it (proposals/<exp>.json, plus .diff) before its run starts. Every row
stands for at most one run (its own val_bpb and throughput): a confirmation's re-runs of the
candidate and of the best are rows of their own (exp-004-c1, exp-004-b1) before the decision row.

Usage: ledger = Ledger(session_dir); ledger.save(exp, proposal, overrides); ledger.append(row); ledger.rows()
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Optional

from src.lab.proposal import Proposal
from src.lab.session import atomic_write, disk_error
from src.lab.decisions import COUNTED, SCORED

log = logging.getLogger("src.lab.ledger")

COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description", "exp", "hypothesis", "kind", "delta",
           "margin", "best_val_bpb", "run_status", "training_seconds", "stall_seconds", "num_steps",
           "wall_seconds", "attempts", "overrides", "reason", "mlflow_run_id", "finished",
           "tokens_per_sec", "step_time_p50", "mfu_percent", "shape", "disturbed_runs", "sigma", "dof", "agent",
           "worker", "proposed", "parent")
FLOATS = ("val_bpb", "memory_gb", "delta", "margin", "best_val_bpb", "training_seconds", "stall_seconds",
          "wall_seconds", "tokens_per_sec", "step_time_p50", "mfu_percent", "sigma")
PRECISE = ("val_bpb", "delta", "margin", "best_val_bpb", "sigma", "step_time_p50")  # 6 decimals in the TSV
INTS = ("num_steps", "attempts", "disturbed_runs", "dof", "worker")
EXPERIMENT_ID = re.compile(r"exp-(\d+)")  # an experiment's own row (not one of its confirmation runs)


@dataclass
class Experiment:
    exp: str  # base-1, base-2, exp-001, ...
    status: str  # the decision: one of src.harness.status.DECISIONS
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
    tokens_per_sec: Optional[float] = None  # the run's throughput: the disturbed detector compares it by shape
    step_time_p50: Optional[float] = None  # median seconds per optimizer step
    mfu_percent: Optional[float] = None  # throughput across shapes (FLOP/s over the device's peak)
    shape: str = ""  # what fixes the run's speed: code, model, batch, device, dtype (src/lab/disturbance.py)
    disturbed_runs: int = 0  # attempts behind this row found disturbed and re-run
    sigma: Optional[float] = None  # the noise floor the row was decided with ...
    dof: Optional[int] = None  # ... and its degrees of freedom
    worker: Optional[int] = None  # search.workers > 1: the worker slot (worktree, device) that ran it
    proposed: str = ""  # search.workers > 1: when it was proposed (row order is finish order; exp ids proposal order)
    parent: str = ""  # search.workers > 1: the best commit it was branched from (7 characters in the TSV)
    proposal: Optional[Proposal] = field(default=None, repr=False)  # from proposals/<exp>.json
    overrides_in_effect: list[str] = field(default_factory=list, repr=False)  # research overrides: the kept ones + this
    # full-precision val_bpb of each run behind it; None: not recorded (the TSV value stands), []: none (an
    # implausible screen run, which only its confirmation runs, on rows of their own, stand for)
    values: Optional[list[float]] = field(default=None, repr=False)

    @property
    def agent(self) -> str:
        """Who proposed the row (its proposal's meta: agent=claude's fallback rows say tpe); '' for the lab's own
        baseline and confirmation runs."""
        meta = self.proposal.meta if self.proposal is not None else {}
        return str(meta.get("proposed_by") or meta.get("agent") or "")

    @property
    def runs(self) -> list[float]:
        """Full-precision val_bpb of the undisturbed, finished runs behind this row (one, or none; two in
        ledgers written before confirmation runs had rows of their own)."""
        if self.status not in SCORED:
            return []
        if self.values is not None:
            return list(self.values)
        return [self.val_bpb] if self.val_bpb is not None else []

    @property
    def is_experiment(self) -> bool:
        """An experiment's own row (exp-004), not a baseline run nor one of its confirmation runs."""
        return EXPERIMENT_ID.fullmatch(self.exp) is not None

    @property
    def counted(self) -> bool:
        """Counts toward search.max_experiments: a finished experiment (not invalid, not interrupted)."""
        return self.is_experiment and self.status in COUNTED

    def to_row(self) -> str:
        cells = []
        for c in COLUMNS:
            v = getattr(self, c)
            if c in ("commit", "parent"):
                v = (v or "")[:7]
            if v is None:
                v = ""
            elif isinstance(v, float):
                v = "" if not math.isfinite(v) else (f"{v:.6f}" if c in PRECISE
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
            if f.name in FLOATS:
                v = float(v) if v not in ("", None) else None
            elif f.name in INTS:
                v = int(float(v)) if v not in ("", None) else (0 if f.name in ("attempts", "disturbed_runs") else None)
            kw[f.name] = v
        return cls(**kw)


class Ledger:
    def __init__(self, session_dir: Path):
        self.path = Path(session_dir) / "results.tsv"
        self.proposals = Path(session_dir) / "proposals"
        self.lock = threading.RLock()  # search.workers > 1: worker threads append while others read

    def rows(self) -> list[Experiment]:
        """Every recorded experiment, in order, with its proposal and overrides in effect joined in."""
        with self.lock:
            return self._rows()

    def _rows(self) -> list[Experiment]:
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
                e.overrides_in_effect = list(rec.get("config") or [])  # the file keeps its original key
                e.values = [float(v) for v in rec["values"]] if rec.get("values") is not None else None
                if rec.get("proposal"):
                    e.proposal = Proposal.from_dict(rec["proposal"])
            out.append(e)
        return out

    def append(self, e: Experiment) -> None:
        """Append one row: a single write, then fsync; on failure the file is left as it was."""
        with self.lock:
            self._append(e)

    def _append(self, e: Experiment) -> None:
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

    def amend(self, exp: str, **cells) -> Experiment:
        """Change cells of a recorded row (a baseline run found disturbed only once a faster repeat came in).

        The file is rewritten whole via temp + rename: a reader sees the old ledger or the new one.
        """
        with self.lock:
            return self._amend(exp, **cells)

    def _amend(self, exp: str, **cells) -> Experiment:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        header = lines[0].rstrip("\n").split("\t")
        for i, line in enumerate(lines[1:], 1):
            row = Experiment.from_row(dict(zip(header, line.rstrip("\n").split("\t"))))
            if row.exp == exp:
                for k, v in cells.items():
                    setattr(row, k, v)
                lines[i] = row.to_row()
                atomic_write(self.path, "".join(lines))
                return row
        raise KeyError(f"no row {exp} in {self.path}")

    # ------------------------------------------------------------------ proposals/<exp>.json
    def save(self, exp: str, proposal: Optional[Proposal], overrides: list[str], commit: str = "",
             values: Optional[list[float]] = None) -> None:
        """Persist what an experiment is (before it runs): proposal, research overrides in effect, commit;
        after it ran, the full-precision val_bpb of its runs (`values`)."""
        self.proposals.mkdir(parents=True, exist_ok=True)
        rec = {"exp": exp, "proposal": proposal.to_dict() if proposal else None, "config": list(overrides),
               "commit": commit, **({"values": list(values)} if values is not None else {})}
        atomic_write(self.proposals / f"{exp}.json", json.dumps(rec, indent=2))
        if proposal is not None and proposal.patch:
            atomic_write(self.proposals / f"{exp}.diff", proposal.patch)

    def load(self, exp: str) -> Optional[dict]:
        try:
            return json.loads((self.proposals / f"{exp}.json").read_text())
        except (OSError, ValueError):
            return None


def next_experiment(rows: list[Experiment], in_flight: Iterable[str] = ()) -> str:
    """The id of the next experiment, after every one recorded or in flight: exp-001, exp-002, ... (ids are the
    proposal order; baseline and confirmation rows do not count)."""
    nums = [int(m.group(1)) for x in [*(e.exp for e in rows), *in_flight] for m in [EXPERIMENT_ID.fullmatch(x)] if m]
    return f"exp-{max(nums, default=0) + 1:03d}"


def next_baselines(rows: list[Experiment], in_flight: Iterable[str], n: int) -> list[str]:
    """The ids of the next n baseline runs, after every one recorded or in flight: base-1, base-2, ..."""
    nums = [int(x[5:]) for x in [*(e.exp for e in rows), *in_flight] if x.startswith("base-") and x[5:].isdigit()]
    return [f"base-{max(nums, default=0) + i}" for i in range(1, n + 1)]


def confirmation_id(rows: list[Experiment], exp: str, side: str) -> str:
    """exp-004-c1 (the candidate re-run), exp-004-b1 (the best re-run); numbered on across resumes."""
    return f"{exp}-{side}{sum(1 for e in rows if e.exp.startswith(f'{exp}-{side}')) + 1}"


CONFIRMATION_ID = re.compile(r"(exp-\d+)-([bc])(\d+)$")


def parse_confirmation_id(exp: str) -> Optional[tuple[str, str, int]]:
    """'exp-004-c2' -> ('exp-004', 'c', 2): the experiment, the side (b: the best, c: the candidate) and the pair;
    None for any other row id."""
    m = CONFIRMATION_ID.match(exp)
    return (m[1], m[2], int(m[3])) if m else None
