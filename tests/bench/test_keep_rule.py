"""bench/keep_rule.py: the keep rule's rates by simulation, through its own functions. The retest may raise a null
change's chance of being kept by at most P(near miss) x retest_alpha, and must keep more two-sigma gains.

Run: python -m pytest -q tests/bench/test_keep_rule.py
"""
from __future__ import annotations

import re
import subprocess
import sys

from tests.support.helpers import REPO


def test_retests_keep_more_two_sigma_gains_and_null_changes_barely_more():
    out = subprocess.run([sys.executable, "bench/keep_rule.py", "--trials", "3000"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    cells = {(m[1], m[2]): (float(m[3]), float(m[4])) for m in
             re.finditer(r"\| (\w+) \(.*?\) \| (\d) sigma \| ([\d.]+) \| ([\d.]+) \|", out)}
    assert len(cells) == 9, out
    for setting in ("fresh", "early", "mature"):
        off, on = cells[(setting, "0")]
        assert on - off <= 0.02 + 0.005  # retest_alpha bounds it (3,000 trials: a little sampling noise)
        off, on = cells[(setting, "2")]
        assert on > off + 0.08, (setting, off, on)
