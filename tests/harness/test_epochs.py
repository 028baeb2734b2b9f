"""Epochs: the summary's train_epochs, and the log's warning when a run will repeat its train split many times.

Run: python -m pytest -q tests/harness/test_epochs.py   (real CLI runs: marked slow)
"""
from __future__ import annotations

import random

import pytest

from tests.support.helpers import TINY, read_summary, run_cli

pytestmark = pytest.mark.slow
WARNING = "this run will see the train split about"


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> list[str]:
    """A prepared data=text set of ~3 KB of train text, and the overrides that select it."""
    folder = tmp_path_factory.mktemp("texts")
    rng = random.Random(0)
    words = ["winter", "tale", "night", "twelfth", "gentle", "verona", "storm", "crown", "the", "a", "of"]
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(180)) + "\n")
    data = ["data=text", f"data.paths=[{folder}]"]
    run_cli("prepare", *data)
    return data


def train_tokens(data_overrides: list[str]) -> int:
    from src.harness.data import load_prepared
    from tests.support.helpers import compose_train_cfg

    return len(load_prepared(compose_train_cfg(data_overrides).data, splits=("train",)).train)


def test_a_token_budget_of_many_epochs_is_warned_about_and_the_summary_counts_them(tmp_path, small_text):
    proc = run_cli("src.train", *TINY, *small_text, "device=cpu", "budget.mode=tokens", "budget.tokens=32768",
                   "tracking.enabled=false", f"hydra.run.dir={tmp_path}")
    s = read_summary(tmp_path)
    log = (tmp_path / "train.log").read_text()
    assert s["status"] == "ok" and s["train_epochs"] == pytest.approx(32768 / train_tokens(small_text)) and \
        s["train_epochs"] > 4
    assert WARNING in log and "data=climbmix" in log and "data=tinystories" in log and "data=text" in log
    assert WARNING in proc.stdout + proc.stderr  # and on the console


def test_a_time_budget_forecasts_its_epochs_after_a_few_steps(tmp_path, small_text):
    run_cli("src.train", *TINY, *small_text, "device=cpu", "budget.seconds=3", "tracking.enabled=false",
            "budget.stall_max_share=1.0", f"hydra.run.dir={tmp_path}")  # a busy machine's stall is not the point here
    s = read_summary(tmp_path)
    assert s["status"] == "ok" and s["train_epochs"] > 4 and WARNING in (tmp_path / "train.log").read_text()


@pytest.mark.usefixtures("shakespeare")
def test_a_run_within_an_epoch_says_nothing_and_reports_its_share(tmp_path):
    run_cli("src.train", *TINY, "device=cpu", "budget.mode=tokens", "budget.tokens=16384", "tracking.enabled=false",
            f"hydra.run.dir={tmp_path}")
    s = read_summary(tmp_path)
    assert s["train_epochs"] == pytest.approx(16384 / train_tokens([])) and s["train_epochs"] < 0.01  # of 4.5M
    assert WARNING not in (tmp_path / "train.log").read_text()
