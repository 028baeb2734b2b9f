"""The real `python -m src.train` CLI: a short run, the budget, dry runs, fast failure.

Run: python -m pytest tests/test_train.py -q
"""
import json
import math

from tests.conftest import TINY, run_cli


def summary_of(out_dir):
    return json.loads((out_dir / "summary.json").read_text())


def test_short_run_prints_a_finite_val_bpb_and_honours_the_budget(tmp_path):
    proc = run_cli("src.train", *TINY, "budget.seconds=4", f"hydra.run.dir={tmp_path}")
    s = summary_of(tmp_path)
    assert s["status"] == "ok"
    assert math.isfinite(s["val_bpb"]) and 0 < s["val_bpb"] < 8.1
    for key in ("val_bpb:", "training_seconds:", "total_seconds:", "peak_vram_mb:", "mfu_percent:",
                "total_tokens_M:", "num_steps:", "num_params_M:", "depth:", "tokens_per_sec:", "step_time_p50:"):
        assert key in proc.stdout, key
    # the budget is honoured within one step: it stops at the first step that crosses 4 s
    assert 4.0 <= s["training_seconds"] <= 4.0 + s["step_time_max"]
    assert s["depth"] == 2 and s["num_steps"] > s["grad_accum_steps"] * 0
    assert s["peak_vram_mb"] > 0 and s["tokens_per_sec"] > 0 and s["mfu_percent"] > 0
    assert s["device"] == "cpu" and s["dtype"] in ("fp32", "bf16")


def test_token_budget_counts_tokens(tmp_path):
    run_cli("src.train", *TINY, "budget.mode=tokens", "budget.tokens=40000", f"hydra.run.dir={tmp_path}")
    s = summary_of(tmp_path)
    assert s["num_steps"] == 5  # ceil(40000 / 8192)
    assert abs(s["total_tokens_M"] - 5 * 8192 / 1e6) < 1e-9


def test_dry_run_reports_the_reference_sizes_without_data():
    out = run_cli("src.train", "model=small", "data=climbmix", "dry_run=true").stdout
    assert "11,534,472" in out
    out = run_cli("src.train", "model=h100", "data=climbmix", "dry_run=true").stdout
    assert "50,332,176" in out and "(50.3M)" in out and "FLOPs per token" in out


def test_exploding_loss_fails_fast_with_a_clear_status(tmp_path):
    proc = run_cli("src.train", *TINY, "budget.seconds=30", "budget.max_nan_loss=0.5",
                   f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    s = summary_of(tmp_path)
    assert s["status"] == "nan" and s["num_steps"] <= 1
    assert "diverged" in s["error"]


def test_bad_batch_is_explained(tmp_path):
    proc = run_cli("src.train", *TINY, "batch.device_tokens=1000", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "batch.device_tokens=1000 must be a multiple of model.sequence_len=128" in proc.stderr


def test_missing_data_names_the_prepare_command(tmp_path):
    proc = run_cli("src.train", *TINY, f"data.cache_dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "python prepare.py data=shakespeare" in proc.stderr
    assert "Traceback" not in proc.stderr  # a user error, not a crash dump
