"""The device group: device.compile and device.dtype words from the CLI and YAML, compilation and its cache.

Hydra turns `true`/`false` into booleans before the schema sees them; the schema takes both the
booleans and the words, so `device.compile=false` works from the command line, from YAML, and quoted.

Run: python -m pytest -q tests/harness/test_device.py   (the real CLI runs are marked slow)
"""
from __future__ import annotations

import os

import pytest
import torch
from hydra.errors import ConfigCompositionException

from src.harness.config import DeviceConfig
from src.harness.device import COMPILE_CACHE_ENV, compile_model, resolve, use_compile_cache
from src.harness.paths import cache_dir
from tests.support.helpers import TINY, compose_train_cfg, read_summary, run_cli


@pytest.mark.parametrize("word,value", [("false", False), ("true", True), ("auto", "auto"), ("'false'", False),
                                        ("'True'", True), ("AUTO", "auto")])
def test_device_compile_takes_true_false_and_auto_from_the_command_line(word, value):
    got = compose_train_cfg([f"device.compile={word}"]).device.compile
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("word,value", [("auto", "auto"), ("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16"),
                                        ("float16", "fp16"), ("fp32", "fp32"), ("float32", "fp32"),
                                        ("false", "fp32"), ("true", "mixed")])
def test_device_dtype_takes_the_dtype_names_and_true_false(word, value):
    assert compose_train_cfg([f"device.dtype={word}"]).device.dtype == value


@pytest.mark.parametrize("override,knob", [("device.compile=yes", "device.compile"), ("device.dtype=int8", "device.dtype"),
                                           ("device.compile_scope=layers", "device.compile_scope"),
                                           ("batch.device_tokens=lots", "batch.device_tokens")])
def test_a_wrong_word_fails_at_compose_time_naming_the_knob(override, knob):
    with pytest.raises((ValueError, ConfigCompositionException), match=knob.replace(".", r"\.")):
        compose_train_cfg([override])


def test_yaml_booleans_and_words_give_the_same_config():
    from omegaconf import OmegaConf

    from src.harness.config import TrainConfig, to_object

    for raw in ("compile: false\ndtype: false", "compile: 'false'\ndtype: fp32"):
        cfg = to_object(OmegaConf.create({"device": OmegaConf.to_container(OmegaConf.create(raw))}), TrainConfig)
        assert cfg.device.compile is False and cfg.device.dtype == "fp32"


def test_resolve_maps_the_words_to_a_runtime_on_cpu():
    rt = resolve(DeviceConfig(type="cpu", dtype="float32", compile="false", peak_flops=1e9))
    assert (rt.dtype, rt.compile) == (torch.float32, False)
    rt = resolve(DeviceConfig(type="cpu", dtype=True, compile=True, peak_flops=1e9, compile_scope="blocks"))
    assert (rt.dtype, rt.compile, rt.compile_scope) == (torch.bfloat16, True, "blocks")
    assert resolve(DeviceConfig(type="cpu", compile="auto", peak_flops=1e9)).compile is False  # auto: CUDA only


def test_compile_scope_blocks_compiles_each_repeated_block_and_nothing_else():
    """No attribute of the model is named: every module of an nn.ModuleList directly under it is a block."""
    from src.harness.config import ModelConfig
    from src.research.model import GPT, GPTConfig

    model = GPT(GPTConfig.from_model_config(ModelConfig(depth=2), 257))
    rt = resolve(DeviceConfig(type="cpu", dtype="fp32", compile=True, compile_scope="blocks", peak_flops=1e9))
    assert compile_model(model, rt) is model  # compiled in place, lazily: nothing is traced here
    compiled = [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == ["blocks.0", "blocks.1"]


def test_the_compile_cache_is_one_directory_under_the_data_cache_unless_configured(tmp_path, monkeypatch):
    monkeypatch.setenv(COMPILE_CACHE_ENV, "/tmp/torchinductor_someone")  # what importing torch._dynamo sets
    default = use_compile_cache()
    assert default == (cache_dir() / "compile").resolve() and default.is_dir()
    assert os.environ[COMPILE_CACHE_ENV] == str(default)
    assert use_compile_cache(str(tmp_path / "mine")) == (tmp_path / "mine").resolve()
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare")
@pytest.mark.parametrize("word", ["true"])  # false: what every other CLI test runs (tests/harness/test_train.py)
def test_the_cli_trains_with_device_compile_true(tmp_path, word):
    """The real CLI end to end, compiled; a compiled run scores like an eager one (its logits are the same)."""
    run_cli("src.train", *TINY, "model.depth=1", "device=cpu", "budget.mode=tokens", "budget.tokens=16384",
            "tracking.enabled=false",  # one layer, two steps: the compile (Inductor's C++ build) is the cost
            f"device.compile={word}", "device.dtype=float32", f"device.compile_cache={tmp_path / 'inductor'}",
            f"hydra.run.dir={tmp_path / 'run'}")
    s = read_summary(tmp_path / "run")
    assert s["status"] == "ok" and s["compile"] is (word == "true") and s["dtype"] == "fp32"
    assert 0 < s["val_bpb"] < 8.1 and s["warmup_seconds"] > 0 and s["startup_seconds"] > 0
    assert f"dtype fp32, compile {word.capitalize()}" in (tmp_path / "run" / "train.log").read_text()
    cache = tmp_path / "inductor"
    assert (cache.is_dir() and any(cache.iterdir())) is (word == "true")  # compiled artifacts land in the cache


def test_the_cpu_probe_is_measured_once_per_thread_count_and_kept_for_each(tmp_path, monkeypatch):
    """Runs at one thread and at two on one machine share the cache file: neither measures again after the other
    (each measurement of a CPU without bf16 units cost ~16 CPU seconds when the key was one per file)."""
    import src.harness.device as device

    monkeypatch.setattr(device, "PROBE_CACHE", tmp_path / "device_probe.json")
    measured = []
    monkeypatch.setattr(device, "_measure_probe", lambda: measured.append(torch.get_num_threads()) or
                        {"fp32": 1e9 * torch.get_num_threads(), "bf16": 1e8})
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            p = device.cpu_probe()
            assert p["fp32"] == 1e9 * n and p["key"].split("|")[2] == str(n)
    finally:
        torch.set_num_threads(before)
    assert measured == [1, 2]


def test_the_bf16_probe_measures_the_full_product_only_when_bf16_is_in_the_running(monkeypatch):
    import src.harness.device as device

    for bf16_speed, full in ((0.01, False), (1.0, True), (4.0, True)):  # no bf16 units (this project's CPUs so
        # far); bf16 units about as fast as fp32 (its small product looks 4x slower, still in the running); AMX
        calls = []

        def flops(dtype, n=1024, reps=6):  # a small product at a quarter of the large one's speed
            calls.append((dtype, n))
            return 1e10 * (bf16_speed if dtype == torch.bfloat16 else 1.0) * (0.25 if n < 1024 else 1.0)

        monkeypatch.setattr(device, "_matmul_flops", flops)
        p = device._measure_probe()
        assert ((torch.bfloat16, 1024) in calls) is full and (torch.bfloat16, 256) in calls
        assert p["bf16"] == 1e10 * bf16_speed * (1.0 if full else 0.25) and p["fp32"] == 1e10
