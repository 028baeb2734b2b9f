"""The Landlock file sandbox (src/harness/landlock.py): what a restricted process can still open, list and run.

Each check runs in a fresh subprocess: a ruleset cannot be lifted, so it must never land on pytest itself.
Skipped where the kernel has no Landlock (macOS, old kernels), where restrict() is a no-op that says why.

Run: python -m pytest -q tests/harness/test_landlock.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from src.harness import landlock
from tests.support.helpers import REPO

needs_landlock = pytest.mark.skipif(not landlock.available(), reason=landlock.unavailable_reason() or "no Landlock")


def run_restricted(code: str, timeout: float = 120) -> dict:
    """Run `code` in a fresh interpreter from the repo; it prints one JSON line, returned as a dict."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_abi_is_read_from_the_kernel_and_the_reason_is_empty_only_where_it_works():
    assert landlock.abi_version() >= 0
    assert (landlock.unavailable_reason() == "") == landlock.available()


@needs_landlock
def test_a_restricted_process_reads_and_lists_only_beneath_its_paths(tmp_path):
    """The training process's view: its own split readable, the validation split and the cache listing not."""
    allowed, cache, out = tmp_path / "train", tmp_path / "cache", tmp_path / "out"
    for d in (allowed, cache, out):
        d.mkdir()
    (allowed / "train.bin").write_bytes(b"\x01\x02")
    (cache / "val.bin").write_bytes(b"\x03\x04")
    r = run_restricted(f"""
        import json, os
        from src.harness.landlock import restrict
        r = restrict([{str(allowed)!r}, {str(REPO / "src")!r}], [{str(out)!r}])
        def denied(f):
            try:
                f()
            except PermissionError:
                return True
            return False
        print(json.dumps(dict(
            applied=r.applied, abi=r.abi, seconds=r.seconds,
            train=open({str(allowed / "train.bin")!r}, "rb").read().hex(),
            val_denied=denied(lambda: open({str(cache / "val.bin")!r}, "rb").read()),
            list_denied=denied(lambda: os.listdir({str(cache)!r})),
            write_outside_denied=denied(lambda: open({str(tmp_path / "x.txt")!r}, "w")),
            exec_denied=denied(lambda: __import__("subprocess").run(["/bin/true"])),
            wrote=open({str(out / "w.txt")!r}, "w").write("ok"),
            stdlib_import=bool(__import__("decimal")))))
    """)
    assert r["applied"] and r["abi"] >= 1 and r["train"] == "0102"
    assert r["val_denied"] and r["list_denied"] and r["write_outside_denied"] and r["exec_denied"]
    assert r["wrote"] == 2 and r["stdlib_import"]
    assert r["seconds"] < 0.5, r  # measured ~0.01 s


@needs_landlock
def test_a_ruleset_cannot_be_widened_by_a_second_one(tmp_path):
    (tmp_path / "val.bin").write_bytes(b"x")
    r = run_restricted(f"""
        import json
        from src.harness.landlock import restrict
        restrict([{str(REPO / "src")!r}], [])
        restrict([{str(tmp_path)!r}, {str(REPO / "src")!r}], [])  # asks for more: the first still holds
        try:
            open({str(tmp_path / "val.bin")!r}).read()
            print(json.dumps(dict(denied=False)))
        except PermissionError:
            print(json.dumps(dict(denied=True)))
    """)
    assert r["denied"]


@pytest.mark.slow  # imports torch in a subprocess
@needs_landlock
def test_torch_trains_the_research_model_under_the_ruleset(tmp_path):
    """Installed after the imports, as the harness would: a forward and backward need no file beyond the system paths."""
    (tmp_path / "val.bin").write_bytes(b"x")
    r = run_restricted(f"""
        import json, time
        import torch
        from src.research.model import GPT, GPTConfig
        from src.harness.config import ModelConfig
        from src.harness.landlock import restrict
        r = restrict([{str(REPO / "src")!r}], [])
        m = GPT(GPTConfig.from_model_config(ModelConfig(depth=2), 64)); m.init_weights()
        x = torch.randint(0, 64, (2, 16))
        m(x).float().mean().backward()
        try:
            open({str(tmp_path / "val.bin")!r}).read(); denied = False
        except PermissionError:
            denied = True
        print(json.dumps(dict(applied=r.applied, seconds=r.seconds, denied=denied)))
    """)
    assert r["applied"] and r["denied"]


def test_off_linux_or_without_landlock_restrict_is_a_no_op_that_says_why(monkeypatch):
    monkeypatch.setattr(landlock, "abi_version", lambda: 0)
    monkeypatch.setattr(landlock.sys, "platform", "darwin")
    r = landlock.restrict(["/nowhere"], [])
    assert not r.applied and "macOS" in r.reason
    with pytest.raises(landlock.LandlockError, match="macOS"):
        landlock.restrict(["/nowhere"], [], strict=True)
