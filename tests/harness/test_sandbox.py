"""The training process's sandbox: the held-out splits hidden by the kernel (Landlock), processes refused from
research code, and what stays allowed (everything else it reads, torch's own compiler).

Run: python -m pytest -q tests/harness/test_sandbox.py
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from src.harness.landlock import available
from tests.support.helpers import TINY, git, make_repo, read_summary, run_cli

needs_landlock = pytest.mark.skipif(not available(), reason="the kernel has no Landlock")


@pytest.mark.slow
@needs_landlock
def test_hide_makes_only_the_hidden_files_unreadable(tmp_path):
    data = tmp_path / "cache" / "shakespeare-byte"
    data.mkdir(parents=True)
    for name in ("train.bin", "val.bin", "manifest.json"):
        (data / name).write_text(name)
    (tmp_path / "elsewhere.txt").write_text("ok")
    (tmp_path / "out").mkdir()
    code = textwrap.dedent(f"""
        import os
        from src.harness.landlock import hide
        r = hide([{str(data / 'val.bin')!r}])
        print(r.reason)
        for f in ("train.bin", "manifest.json"):
            assert open(os.path.join({str(data)!r}, f)).read() == f
        assert open({str(tmp_path / 'elsewhere.txt')!r}).read() == "ok"
        import json, torch  # libraries still load
        for what, attempt in (("val.bin", lambda: open({str(data / 'val.bin')!r}).read()),
                              ("the data dir", lambda: os.listdir({str(data)!r})),
                              ("the cache", lambda: os.listdir({str(tmp_path / 'cache')!r}))):
            try:
                attempt()
            except PermissionError:
                continue
            raise SystemExit(f"read {{what}}, which was hidden")
        for what, attempt in (("val.bin", lambda: open({str(data / 'val.bin')!r}, "ab")),
                              ("the manifest beside it", lambda: open({str(data / 'manifest.json')!r}, "w")),
                              ("a link to it", lambda: os.link({str(data / 'val.bin')!r}, {str(tmp_path / 'v')!r}))):
            try:
                attempt()
            except PermissionError:
                continue
            raise SystemExit(f"wrote {{what}}, which was read-only")
        open({str(tmp_path / 'out' / 'new.txt')!r}, "w").write("still writable outside the data's way")
        print("hidden")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path.parent)
    assert proc.returncode == 0 and "hidden" in proc.stdout, proc.stdout + proc.stderr
    assert "1 files hidden, 2 beside them read-only" in proc.stdout


@pytest.mark.slow
@needs_landlock
@pytest.mark.usefixtures("shakespeare")
@pytest.mark.parametrize("split", ["val.bin", "test.bin"])
def test_research_code_that_reads_the_validation_or_test_split_while_training_is_tampered(tmp_path, shakespeare,
                                                                                         split):
    repo = make_repo(tmp_path)
    model = repo / "src" / "research" / "model.py"
    anchor = "import torch.nn.functional as F\n"
    val = shakespeare / split
    model.write_text(model.read_text().replace(anchor, anchor + f"_VAL = open({str(val)!r}, 'rb').read()\n", 1))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "read val")
    run_cli("src.train", *TINY, "device=cpu", "budget.mode=tokens", "budget.tokens=8192", "tracking.enabled=false",
            f"hydra.run.dir={tmp_path / 'run'}", cwd=repo, check=False)
    s = read_summary(tmp_path / "run")
    assert s["status"] == "tampered" and "PermissionError" in s["error"] and split in s["error"], s
    assert s["sandbox"].startswith("Landlock ABI")

