"""Where things live: the repository root and the data cache, one definition each.

Usage: from src.harness.paths import REPO, cache_dir
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout (or a session's worktree) this code runs from
CACHE_ENV = "OVERNIGHT_CACHE"  # overrides the default data cache for every entry point and subprocess
DEFAULT_CACHE = "~/.cache/overnight"


def default_cache_dir() -> str:
    """The data cache as configured (unexpanded): $OVERNIGHT_CACHE, else ~/.cache/overnight."""
    return os.environ.get(CACHE_ENV, DEFAULT_CACHE)


def cache_dir() -> Path:
    """The data cache, expanded: prepared shards, tokenizer, downloads and the device probe."""
    return Path(default_cache_dir()).expanduser()

HIDE_ROOTS_ENV = "OVERNIGHT_HIDE_ROOTS"  # set by the lab's runner: folders of saved models a run hides (train.py)
