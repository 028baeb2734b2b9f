"""The budget clock: counted time, stalls counted as normal steps, the wall-clock ceiling, deterministic token runs.

Unit tests drive BudgetClock with a fake clock; the CLI tests run `python -m src.train` for real
(tiny model, one thread) and inject faults with $OVERNIGHT_INJECT_STALL.

Run: python -m pytest -q tests/harness/test_budget.py   (without the CLI runs: -m "not slow")
"""
import math

import pytest

from src.harness.budget import BudgetClock, inject_stalls, lr_multiplier, parse_stalls
from src.harness.config import BudgetConfig, OptimizerConfig
from tests.support.helpers import TINY_ONE_THREAD as FAST, read_summary, run_cli



def test_the_lr_schedule_warms_up_holds_and_warms_down_by_budget_progress():
    cfg = OptimizerConfig(warmup_ratio=0.1, warmdown_ratio=0.5, final_lr_frac=0.1)
    assert lr_multiplier(0.05, cfg) == pytest.approx(0.5, rel=1e-6)
    assert lr_multiplier(0.3, cfg) == 1.0
    assert lr_multiplier(0.75, cfg) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lr_multiplier(1.0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(0.0, OptimizerConfig()) == 1.0  # the default: no warm-up, warmdown over the last half

class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def clock_for(times, now=None, **budget):
    """A clock after steps of the given durations (the fake wall clock advances with them)."""
    now = now or FakeTime()
    clock = BudgetClock(BudgetConfig(**{"seconds": 100.0, "warmup_steps": 2, **budget}), 1000, now=now)
    for dt in times:
        now.t += dt
        clock.tick(dt)
    return clock


def test_warmup_steps_are_not_counted():
    clock = clock_for([9.0, 9.0, 1.0, 1.0])
    assert clock.step == 4 and clock.tokens == 4000
    assert clock.training_seconds == 2.0 and clock.step_times == [1.0, 1.0]
    assert clock.wall_seconds == 20.0


def test_a_stall_counts_as_a_median_step_and_its_excess_is_reported():
    clock = clock_for([5, 5] + [1.0, 1.2, 0.8, 1.0] + [30.0] + [1.0], stall_factor=5.0)
    assert clock.stalls == 1 and clock.stalled_steps == [7]
    assert clock.stalled_seconds == pytest.approx(29.0)  # 30 s minus the median 1.0 s
    assert clock.training_seconds == pytest.approx(4.0 + 1.0 + 1.0)
    assert clock.step_times[-2] == 30.0  # the measured time is kept for the histogram
    assert clock.progress == pytest.approx(6.0 / 100)


def test_slow_but_not_stalled_steps_count_in_full():
    clock = clock_for([5, 5] + [1.0] * 4 + [4.9], stall_factor=5.0)
    assert clock.stalls == 0 and clock.training_seconds == pytest.approx(8.9)


def test_no_stall_is_called_before_the_median_has_history():
    clock = clock_for([5, 5, 1.0, 50.0, 1.0, 1.0], stall_factor=5.0)
    assert clock.stalls == 0  # only one normal step of history when the slow one came


def test_stalls_do_not_raise_the_median():
    clock = clock_for([5, 5] + [1.0] * 3 + [20.0] * 5, stall_factor=5.0, stall_window=3)
    assert clock.stalls == 5 and clock.training_seconds == pytest.approx(8.0)


def test_stalls_over_the_max_share_of_the_budget_mark_the_run():
    assert not clock_for([5, 5] + [1.0] * 3 + [25.0], stall_max_share=0.25).stalled  # 24 s of 100
    assert clock_for([5, 5] + [1.0] * 3 + [27.0], stall_max_share=0.25).stalled  # 26 s of 100


def test_the_wall_ceiling_ends_a_run_that_keeps_stalling():
    now = FakeTime()
    clock = clock_for([1.0] * 5, now=now, seconds=10.0, wall_factor=2.0, wall_grace=5.0)
    assert clock.deadline == 25.0 and not clock.done
    now.t += 30.0  # a stall of 30 s: counted as 1 s, but the wall clock is past the ceiling
    clock.tick(30.0)
    assert clock.progress < 1.0 and clock.timed_out and clock.done


def test_the_ceiling_is_explicit_in_tokens_mode():
    assert BudgetClock(BudgetConfig(mode="tokens"), 1000).deadline is None
    assert BudgetClock(BudgetConfig(mode="tokens", max_wall_seconds=50.0), 1000).deadline == 50.0


def test_bad_budgets_are_explained():
    with pytest.raises(ValueError, match="budget.mode"):
        BudgetClock(BudgetConfig(mode="steps"), 1)
    with pytest.raises(ValueError, match="stall_factor"):
        BudgetClock(BudgetConfig(stall_factor=1.0), 1)


def test_stall_injection_sleeps_in_the_named_optimizer_steps(monkeypatch):
    slept = []
    monkeypatch.setattr("src.harness.budget.time.sleep", slept.append)
    assert parse_stalls("3:5,10:0.5") == {3: 5.0, 10: 0.5}
    seen = [(b, len(slept)) for b in inject_stalls(iter(range(12)), accum=2, spec="3:5")]
    assert slept == [5.0] and [b for b, _ in seen] == list(range(12))
    assert seen[3] == (3, 0) and seen[4] == (4, 1)  # step 3 = micro-batches 4 and 5: the sleep comes before 4
    with pytest.raises(ValueError, match="OVERNIGHT_INJECT_STALL"):
        parse_stalls("three")


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_two_token_budget_runs_of_one_config_give_identical_val_bpb(tmp_path):
    args = [*FAST, "budget.mode=tokens", "budget.tokens=40000", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    runs = []
    for name in ("a", "b"):
        run_cli("src.train", *args, f"hydra.run.dir={tmp_path / name}")
        runs.append(read_summary(tmp_path / name))
    assert runs[0]["num_steps"] == runs[1]["num_steps"] == 5  # ceil(40000 / 8192)
    for k in ("dtype", "grad_accum_steps", "device_batch_size"):  # what decides the arithmetic, then the result
        assert runs[0][k] == runs[1][k], k
    assert math.isfinite(runs[0]["val_bpb"]) and runs[0]["val_bpb"] == runs[1]["val_bpb"]


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_a_step_that_never_ends_is_cut_by_the_watchdog(tmp_path):
    """A 1000-s 'hung device' step: the process ends at ceiling + grace with status timeout, recorded."""
    proc = run_cli("src.train", *FAST, "budget.seconds=30", "budget.max_wall_seconds=10", "budget.wall_grace=2",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path / 'run'}",
                   env={"OVERNIGHT_INJECT_STALL": "6:1000"}, check=False, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    s = read_summary(tmp_path / "run")
    assert s["status"] == "timeout" and "hung" in s["error"] and math.isnan(s["val_bpb"])
    assert s["num_steps"] <= 5  # the hung sixth step never completed (on a loaded machine fewer fit the ceiling)
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(s["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["status"] == "timeout"


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
def test_a_run_mostly_stalled_is_marked_for_a_rerun(tmp_path):
    proc = run_cli("src.train", *FAST, "budget.seconds=3", "tracking.enabled=false",
                   f"hydra.run.dir={tmp_path}", env={"OVERNIGHT_INJECT_STALL": "8:3"}, check=False)
    s = read_summary(tmp_path)
    assert proc.returncode == 1 and s["status"] == "stalled" and "re-run" in s["error"]
    assert s["stalls"] == 1 and s["stalled_steps"] == [8] and math.isfinite(s["val_bpb"])
    # the 3-s stall counts as a median step: its excess, about 3 s, is over stall_max_share (25%) of the 3-s budget
    assert 3.0 - s["step_time_p50"] <= s["stalled_seconds"] <= 3.0 + s["step_time_p90"]
    assert s["stalled_seconds"] > 0.25 * 3
