"""Shared helpers for the tests (not a test module; fixtures live in tests/conftest.py).

- paths and tiny run settings: REPO, CONF, TINY, TINY_ONE_THREAD, TINY_TRAIN
- the real CLIs: run_cli (`python -m <module>` as a subprocess), read_summary (a run's summary.json)
- composed configs: compose_train_cfg (the typed TrainConfig), compose_search (the typed SearchAppConfig),
  config_options (the options of a config group)
- the research loop: make_repo (a throwaway git copy of the project), git, fake_command (the stand-in
  train script src/lab/fakes/train.py), make_patch / crash_patch / comment_patch, read_tsv (the ledger),
  session_children (a session's MLflow child runs); those the benches need too live in src/lab/fakes/project.py
- free_port (a local TCP port with nothing listening on it)

Run: python -m pytest -q   (the suite imports this module; it holds no tests)
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from src.lab.fakes.project import (CONF, REPO, comment_patch, compose_search, fake_command,  # noqa: F401
                           git, make_patch, make_repo, read_tsv)  # shared with bench/ (src/lab/fakes/scripted_researcher.py)

# Tiny, fast runs of the real CLI: 2 layers, a few seconds, a slice of the validation split.
TINY = ["model.depth=2", "data.eval_tokens=8192", "progress=false"]
# ... on one thread: steady step times on a shared 2-core machine.
TINY_ONE_THREAD = [*TINY, "device.threads=1"]
# A real, tiny, deterministic train run for the research loop (token budget): a few seconds.
TINY_TRAIN = ["model.depth=2", "budget.mode=tokens", "budget.tokens=32768", "data.eval_tokens=8192", "device=cpu"]


# ---------------------------------------------------------------------------- the real CLIs


def run_cli(module: str, *args: str, cwd: Path = REPO, timeout: float = 300, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` for real (environment: ours plus `env`); on failure show its output."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def read_summary(run_dir: Path) -> dict:
    """The summary.json a train run (real or stand-in) wrote into its output directory."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


# ---------------------------------------------------------------------------- composed configs


def config_options(group: str) -> list[str]:
    """The options of a config group: the names of conf/<group>/*.yaml."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train_cfg(overrides: list[str]):
    """The typed TrainConfig, composed like `python -m src.train <overrides>` (Hydra errors propagate)."""
    from hydra import compose, initialize_config_dir

    from src.harness.config import register_configs, to_object

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_object(compose(config_name="train", overrides=overrides))


# ---------------------------------------------------------------------------- the research loop


def crash_patch(repo: Path) -> str:
    """src/research/model.py raising at the first forward pass (imports and builds fine: passes the dry run)."""
    def t(text: str) -> str:
        lines = text.splitlines(keepends=True)
        k = next(n for n, line in enumerate(lines) if line.startswith("    def forward(self, idx"))  # GPT.forward
        while not lines[k].rstrip().endswith(":"):  # to the end of its signature
            k += 1
        lines.insert(k + 1, '        raise RuntimeError("patched model crashes")\n')
        return "".join(lines)
    return make_patch(repo, "src/research/model.py", t)


def session_children(uri: str, parent_id: str) -> list:
    """The MLflow runs nested under a session's parent run (any experiment of the store)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


# ---------------------------------------------------------------------------- network


def free_port() -> int:
    """A local TCP port that was free a moment ago; nothing listens there (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float = 60, what: str = "the condition"):
    """cond()'s first truthy value, polled until `timeout` seconds; AssertionError naming `what` after that."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
