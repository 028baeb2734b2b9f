"""The budget clock: device time counted from the start, stalls reported, the wall ceiling, deterministic token runs.

Unit tests drive BudgetClock with fake wall and device clocks; the CLI tests run `python -m src.train` for real
(tiny model, one thread) and inject faults with $OVERNIGHT_INJECT_STALL.

Run: python -m pytest -q tests/harness/test_budget.py   (without the CLI runs: -m "not slow")
"""
import math

import time

import pytest

from src.harness.budget import BudgetClock, CpuTime, FakeTime, slot_seconds, inject_stalls, lr_multiplier, parse_stalls
from src.harness.config import BudgetConfig, OptimizerConfig
from tests.support.helpers import TINY_ONE_THREAD as FAST, read_summary, run_cli



def test_the_lr_schedule_warms_up_holds_and_warms_down_by_budget_progress():
    cfg = OptimizerConfig(warmup_ratio=0.1, warmdown_ratio=0.5, final_lr_frac=0.1)
    assert lr_multiplier(0.05, cfg) == pytest.approx(0.5, rel=1e-6)
    assert lr_multiplier(0.3, cfg) == 1.0
    assert lr_multiplier(0.75, cfg) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lr_multiplier(1.0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(0.0, OptimizerConfig()) == 1.0  # the default: no warm-up, warmdown over the last half

class Wall:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def clock_for(steps, kind="cpu", build=0.0, **budget):
    """A clock after steps of (wall seconds, device seconds) each (a bare number: both the same). `build`: device
    seconds spent before the clock was made (model construction: counted)."""
    wall, dev = Wall(), FakeTime(kind)
    dev.t = build
    clock = BudgetClock(BudgetConfig(**{"seconds": 100.0, "warmup_steps": 2, **budget}), 1000, dev, now=wall)
    for st in steps:
        w, d = st if isinstance(st, tuple) else (st, st)
        wall.t += w
        dev.t += d
        clock.tick(w)
    return clock


def test_every_step_counts_warm_up_and_model_construction_included():
    clock = clock_for([9.0, 9.0, 1.0, 1.0], build=3.0)
    assert clock.step == 4 and clock.tokens == 4000
    assert clock.training_seconds == 23.0  # 3 s building the model + all four steps
    assert clock.step_times == clock.device_step_times == [1.0, 1.0]  # the statistics leave the warm-up steps out
    assert clock.wall_seconds == 20.0


def test_the_cpu_clock_is_the_loops_time_or_the_other_threads_spread_over_the_slot():
    cpu, main = [10.0], [4.0]
    dev = CpuTime(threads=2, read=lambda: cpu[0], read_main=lambda: main[0])
    cpu[0], main[0] = 16.0, 7.0  # two threads busy for 3 s: 6 CPU seconds, 3 of them the loop's
    assert dev.seconds() == 3.0 and dev.start_cpu == 10.0 and dev.start_main == 4.0
    cpu[0], main[0] = 20.0, 11.0  # the loop's thread ran 4 s more while the other slept: the slot was held
    assert dev.parts() == (10.0, 7.0) and dev.seconds() == 7.0
    cpu[0] = 40.0  # a helper thread burnt 20 CPU seconds more while the loop waited: 23 s of other threads
    assert dev.seconds() == 23.0
    assert slot_seconds(12.0, 2.0, 4) == 10.0 / 3 and slot_seconds(12.0, 2.0, 1) == 12.0
    assert all(slot_seconds(c, l, t) >= c / t for c, l, t in [(10, 0, 2), (10, 5, 2), (10, 10, 2), (9, 1, 3)])
    with pytest.raises(ValueError, match="at least one thread"):
        CpuTime(threads=0)


def test_the_loop_threads_clock_is_that_thread_read_from_any_thread():
    """The main thread's count does not grow while it sleeps, and reading it from a helper gives the same."""
    import threading

    dev = CpuTime(threads=2)
    time.sleep(0.3)
    _, loop = dev.parts()
    assert loop < 0.1
    seen = []
    t = threading.Thread(target=lambda: seen.append(dev.parts()[1]))
    t.start()
    t.join()
    assert abs(seen[0] - loop) < 0.05


def test_a_real_cpu_clock_sees_a_second_thread_working():
    """Compute on another thread is the process's CPU time: it is counted, whoever starts it."""
    import threading

    dev = CpuTime(threads=1)
    t = threading.Thread(target=lambda: sum(i * i for i in range(3_000_000)))
    t.start()
    t.join()
    assert dev.seconds() > 0.05


def test_the_loop_stops_before_a_step_that_would_not_fit():
    clock = clock_for([1.0, 1.0] + [2.0] * 4, seconds=10.0)
    assert clock.training_seconds == 10.0 and clock.done  # the budget, exactly
    clock = clock_for([1.0, 1.0] + [2.0] * 3 + [1.5], seconds=10.0)
    assert clock.training_seconds == 9.5 and clock.spent  # 9.5 + a 2-s median step would pass 10
    clock = clock_for([1.0, 1.0] + [2.0] * 2, seconds=10.0)
    assert not clock.done and clock.progress == pytest.approx(0.6)


def test_a_stall_is_wall_time_it_costs_a_cpu_run_no_budget():
    """A descheduled process uses no CPU: 30 s of wall, 1 s of device time. Reported, never counted as training."""
    clock = clock_for([5, 5] + [1.0, 1.2, 0.8, 1.0] + [(30.0, 1.0)] + [1.0], stall_factor=5.0)
    assert clock.stalls == 1 and clock.stalled_steps == [7]
    assert clock.stalled_seconds == pytest.approx(29.0)  # 30 s minus the median 1.0 s
    assert clock.training_seconds == pytest.approx(10 + 4.0 + 1.0 + 1.0)
    assert not clock.stalled  # on CPU the budget lost nothing
    assert clock.wall_ratio == pytest.approx(45.0 / 16.0)


def test_on_a_gpu_stalls_eat_the_budget_and_too_many_mark_the_run():
    assert not clock_for([5, 5] + [1.0] * 3 + [25.0], kind="cuda", stall_max_share=0.25).stalled  # 24 s of 100
    assert clock_for([5, 5] + [1.0] * 3 + [27.0], kind="cuda", stall_max_share=0.25).stalled  # 26 s of 100
    assert not clock_for([5, 5] + [1.0] * 3 + [27.0], kind="cpu", stall_max_share=0.25).stalled


def test_no_stall_is_called_before_the_median_has_history():
    clock = clock_for([5, 5, 1.0, 50.0, 1.0, 1.0], stall_factor=5.0)
    assert clock.stalls == 0  # only one normal step of history when the slow one came


def test_stalls_do_not_raise_the_median():
    clock = clock_for([5, 5] + [1.0] * 3 + [(20.0, 1.0)] * 5, stall_factor=5.0, stall_window=3)
    assert clock.stalls == 5 and clock.training_seconds == pytest.approx(18.0)


def test_an_expensive_step_costs_what_it_cost():
    """A periodic expensive step (a preconditioner refresh) is booked at its full device time, never a median."""
    clock = clock_for([1, 1] + [1.0] * 4 + [8.0] + [1.0] * 4, stall_factor=5.0)
    assert clock.training_seconds == pytest.approx(2 + 8 + 8)


def test_the_wall_ceiling_ends_a_run_the_machine_starves():
    clock = clock_for([1.0] * 5, seconds=10.0, wall_factor=2.0, wall_grace=5.0)
    assert clock.deadline == 25.0 and not clock.done
    clock = clock_for([1.0] * 5 + [(30.0, 1.0)], seconds=10.0, wall_factor=2.0, wall_grace=5.0)
    assert not clock.spent and clock.timed_out and clock.done


def test_the_ceiling_is_explicit_in_tokens_mode():
    assert BudgetClock(BudgetConfig(mode="tokens"), 1000, FakeTime()).deadline is None
    assert BudgetClock(BudgetConfig(mode="tokens", max_wall_seconds=50.0), 1000, FakeTime()).deadline == 50.0


def test_bad_budgets_are_explained():
    with pytest.raises(ValueError, match="budget.mode"):
        BudgetClock(BudgetConfig(mode="steps"), 1, FakeTime())
    with pytest.raises(ValueError, match="stall_factor"):
        BudgetClock(BudgetConfig(stall_factor=1.0), 1, FakeTime())


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
    args = [*FAST, "budget.mode=tokens", "budget.tokens=40000", "tracking.enabled=false"]  # tracking: its own tests
    runs = []
    for name in ("a", "b"):
        run_cli("src.train", *args, f"hydra.run.dir={tmp_path / name}")
        runs.append(read_summary(tmp_path / name))
    assert runs[0]["num_steps"] == runs[1]["num_steps"] == 5  # ceil(40000 / 8192)
    assert runs[0]["total_tokens_M"] == pytest.approx(5 * 8192 / 1e6, abs=1e-9)  # whole steps: 40,960 tokens
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
def test_a_stalled_cpu_run_loses_no_budget_to_the_stall(tmp_path):
    """A 3-s stall (the process sleeps, as a descheduled one would) in a 4-s budget: reported, the run is ok, and
    its counted device time is the budget's, not the wall's. (Step 6: the earliest a stall can be told, after one
    warm-up step and three normal ones; a 4-s budget runs ~10 steps here, fewer on a loaded machine.)"""
    proc = run_cli("src.train", *FAST, "budget.seconds=4", "budget.warmup_steps=1", "tracking.enabled=false",
                   f"hydra.run.dir={tmp_path}", env={"OVERNIGHT_INJECT_STALL": "6:3"}, check=False)
    s = read_summary(tmp_path)
    assert proc.returncode == 0 and s["status"] == "ok" and math.isfinite(s["val_bpb"]), proc.stderr[-2000:]
    assert s["num_steps"] >= 6, s["num_steps"]
    assert s["stalls"] == 1 and s["stalled_steps"] == [6] and s["stalled_seconds"] > 2.5
    assert s["training_seconds"] <= 4.0 + 0.1 and s["train_wall_seconds"] > s["training_seconds"] + 2.5
    assert s["budget_clock"] == "cpu" and s["budget_threads"] == 1
