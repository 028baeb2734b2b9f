"""The real `python -m src.train` CLI: a short run, the budget, dry runs, fast failure.

Run: python -m pytest -q tests/harness/test_train.py   (all slow: real CLI runs)
"""
import math

import pytest

from tests.support.helpers import TINY, compose_train_cfg, read_summary, run_cli

pytestmark = pytest.mark.slow


@pytest.mark.usefixtures("shakespeare")
def test_short_run_prints_a_finite_val_bpb_and_honours_the_budget(tmp_path):
    overrides = [*TINY, "budget.seconds=4", "device.threads=1"]
    cfg = compose_train_cfg(overrides)
    proc = run_cli("src.train", *overrides, f"hydra.run.dir={tmp_path}")
    s = read_summary(tmp_path)
    assert s["status"] == "ok"
    assert math.isfinite(s["val_bpb"]) and 0 < s["val_bpb"] < 8.1
    for key in ("val_bpb:", "training_seconds:", "total_seconds:", "peak_vram_mb:", "mfu_percent:",
                "total_tokens_M:", "num_steps:", "num_params_M:", "depth:", "tokens_per_sec:", "step_time_p50:"):
        assert key in proc.stdout, key
    # the budget is honoured within one step: it stops before the step that would not fit in 4 device seconds
    # (judged by the slowest recent step's device seconds, which a busy machine can push past its wall seconds)
    step = max(s["step_time_max"], s["step_device_max"])
    assert 0 < s["step_device_max"] and 4.0 - step <= s["training_seconds"] <= 4.0 + step
    # the steps: the uncounted warm-up, then at least one counted step; each of batch.total_tokens
    assert s["depth"] == 2 and s["grad_accum_steps"] == cfg.batch.total_tokens // cfg.batch.device_tokens
    counted = s["num_steps"] - cfg.budget.warmup_steps
    assert counted >= 1
    assert s["total_tokens_M"] == pytest.approx(s["num_steps"] * cfg.batch.total_tokens / 1e6)
    # throughput per device second of the counted steps; training_seconds also holds the model's build and warm-up
    assert s["tokens_per_sec"] >= counted * cfg.batch.total_tokens / s["training_seconds"]
    assert s["peak_vram_mb"] > 0 and s["mfu_percent"] > 0
    assert s["device"] == "cpu" and s["dtype"] in ("fp32", "bf16") and s["compile"] is False  # eager on CPU
    assert s["score_threads"] == 1  # the scorer process keeps to the run's share of the machine
    # the learning curve the lab reads while the run trains: a point at each 5% of the counted budget reached
    printed = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("overnight-curve ")]
    fractions = [float(p[1].split("=")[1]) for p in printed]
    assert fractions == [round(0.05 * i, 2) for i in range(1, len(fractions) + 1)]
    assert len(fractions) >= int(s["training_seconds"] / 4.0 / 0.05) - 1 and len(fractions) <= 20
    assert [pt[0] for pt in s["curve"]] == fractions and all(math.isfinite(pt[1]) for pt in s["curve"])


def test_the_curve_is_the_smoothed_loss_at_every_5_percent_of_the_budget():
    from src.harness.budget import Curve

    c = Curve()
    assert c.add(0.02, 5.0) == [] and c.add(0.05, 5.0) == [(0.05, 5.0)]  # bias-corrected: the mean of equal losses
    jumped = c.add(0.25, 3.0)  # one long step crosses four points: read between its smoothed value and the last's
    smooth = c.points[-1][1]
    assert [f for f, _ in jumped] == [0.1, 0.15, 0.2, 0.25] and 3.0 < smooth < 5.0
    assert [v for _, v in jumped] == pytest.approx([5.0 + (smooth - 5.0) * k / 4 for k in (1, 2, 3, 4)])
    c.add(1.0, 1.0)
    assert len(c.points) == 20 and c.points[-1][0] == 1.0 and c.add(1.0, 1.0) == []
    # two runs of the same losses whose steps land at different fractions read (nearly) the same at each point
    a, b = Curve(), Curve()
    for k in range(1, 31):
        a.add(k / 30, 5.0 - 3.0 * k / 30)
        b.add(min(1.0, (k + 0.5) / 30), 5.0 - 3.0 * (k + 0.5) / 30)
    gap = max(abs(x[1] - y[1]) for x, y in zip(a.points[:-1], b.points[:-1]))
    assert gap < 0.025  # a step's drop in loss is 0.1; read at the step after each fraction, they were 0.05 apart


def test_dry_run_reports_the_reference_sizes_without_data():
    from src.harness.model_facts import model_facts

    small = compose_train_cfg(["model=small", "data=climbmix"])  # the figure the dry run prints, without a process
    assert model_facts(small.model, small.data.vocab_size).num_params == 11_534_472
    out = run_cli("src.train", "model=h100", "data=climbmix", "dry_run=true").stdout
    assert "50,332,176" in out and "(50.3M)" in out and "FLOPs per token" in out


@pytest.mark.usefixtures("shakespeare")
def test_exploding_loss_fails_fast_with_a_clear_status(tmp_path):
    proc = run_cli("src.train", *TINY, "budget.seconds=30", "budget.max_nan_loss=0.5",
                   f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    s = read_summary(tmp_path)
    assert s["status"] == "nan" and s["num_steps"] <= 1
    assert "diverged" in s["error"]


def test_a_batch_that_is_not_a_multiple_of_the_sequence_is_explained(tmp_path):
    proc = run_cli("src.train", *TINY, "batch.device_tokens=1000", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert "batch.device_tokens=1000 must be a multiple of model.sequence_len=128" in proc.stderr


def test_missing_data_names_the_prepare_command(tmp_path):
    proc = run_cli("src.train", *TINY, f"data.cache_dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert "python prepare.py data=shakespeare" in proc.stderr
    assert "Traceback" not in proc.stderr  # a user error, not a crash dump


def test_a_dry_run_imports_the_research_code_behind_the_sandbox(shakespeare, tmp_path):
    """dry_run=true imports the research code too (the lab's preflight): behind the same sandbox as a timed run, so
    research code that reads the validation split at import fails there (red team 2026-12-07: it did not)."""
    import subprocess
    import sys

    from src.lab.fakes.project import make_repo
    repo = make_repo(tmp_path)
    model = repo / "src" / "research" / "model.py"
    val = next(shakespeare.glob("val*"))
    imports = "import torch.nn.functional as F\n"
    model.write_text(model.read_text().replace(imports, imports + f"_VAL = open({str(val)!r}, 'rb').read()\n", 1))
    out = subprocess.run([sys.executable, "-m", "src.train", "dry_run=true", "tracking.enabled=false"], cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "PermissionError" in out.stdout + out.stderr, (out.stdout + out.stderr)[-2000:]
