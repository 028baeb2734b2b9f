"""The prompt cache of the local Messages API (messages_server.py): which prefix a request reads, which it writes.

A breakpoint writes the prefix up to it (tools, system, messages, in that order; the message part also
keyed by thinking and tool_choice) with its lifetime (`ttl` 5m or 1h, refreshed by each read); a read
looks at each breakpoint and up to LOOKBACK blocks before it; prefixes shorter than the model's minimum
cacheable length are neither written nor read. Time is whatever clock the server passes in.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
from typing import Any, Optional

from src.lab.fakes.conversation import TTL_SECONDS, _blocks, _cacheable

LOOKBACK = 20  # blocks before a breakpoint the cache looks at for an earlier entry
MIN_CACHE_TOKENS = {"claude-opus-4-5": 4096, "claude-opus-4-6": 4096, "claude-haiku-4-5": 4096,
                    "claude-opus-4-7": 2048, "default": 1024}


def _tokens(obj: Any) -> int:
    """A stand-in tokenizer: ~4 characters of JSON per token."""
    return max(1, math.ceil(len(json.dumps(obj, sort_keys=True)) / 4))


class PromptCache:
    """Cache entries by prefix hash, and the usage (read / written / fresh input tokens) of each request."""

    def __init__(self, min_cache_tokens: Optional[dict] = None):
        self.min_cache_tokens = {**MIN_CACHE_TOKENS, **(min_cache_tokens or {})}
        self.entries: dict[str, tuple[float, str]] = {}  # prefix key -> (expires at, ttl)
        self._lock = threading.Lock()

    def minimum(self, model: str) -> int:
        for k, v in self.min_cache_tokens.items():
            if k != "default" and (model == k or model.startswith(k + "-")):
                return v
        return self.min_cache_tokens["default"]

    def usage(self, body: dict, content: list, scripted: Optional[dict], now: float) -> dict:
        """Input tokens split into read / written (5m, 1h) / fresh, like prompt caching does."""
        parts = _cacheable(body)
        n_static = len(body.get("tools") or []) + len(_blocks(body.get("system")))
        salt = json.dumps([body["model"], body.get("thinking"), body.get("tool_choice")], sort_keys=True)
        keys, cum, h, total = [], [], hashlib.sha256(body["model"].encode()), 0
        for i, p in enumerate(parts):
            if i == n_static:
                h.update(salt.encode())  # changing thinking or tool_choice invalidates the cached messages
            bare = {k: v for k, v in p.items() if k != "cache_control"} if isinstance(p, dict) else p
            h.update(json.dumps(bare, sort_keys=True).encode())
            keys.append(h.copy().hexdigest())
            total += _tokens(bare)
            cum.append(total)
        marks = [(i, p["cache_control"].get("ttl", "5m")) for i, p in enumerate(parts)
                 if isinstance(p, dict) and p.get("cache_control")]
        floor = self.minimum(body["model"])
        hit = -1
        with self._lock:
            for i, _ in marks:
                for j in range(i, max(-1, i - LOOKBACK - 1), -1):
                    entry = self.entries.get(keys[j])
                    if entry and entry[0] > now and cum[j] >= floor:
                        hit = max(hit, j)
                        break
            if hit >= 0:
                _, ttl = self.entries[keys[hit]]
                self.entries[keys[hit]] = (now + TTL_SECONDS[ttl], ttl)  # a read refreshes the entry
            written = {"5m": 0, "1h": 0}
            top = hit
            for i, ttl in marks:
                if i > hit and cum[i] >= floor:
                    self.entries[keys[i]] = (now + TTL_SECONDS[ttl], ttl)
                    written[ttl] += cum[i] - cum[top] if top >= 0 else cum[i]
                    top = i
        cached = cum[hit] if hit >= 0 else 0
        created = written["5m"] + written["1h"]
        usage = {"input_tokens": total - cached - created, "output_tokens": _tokens(content),
                 "cache_creation_input_tokens": created, "cache_read_input_tokens": cached,
                 "cache_creation": {"ephemeral_5m_input_tokens": written["5m"],
                                    "ephemeral_1h_input_tokens": written["1h"]}}
        usage.update(scripted or {})
        return usage
