"""agent=claude's conversation: append-only turns, cache breakpoints, condensing in one step, saved to disk.

Committed turns alternate user/assistant, start with a user turn and end with the assistant's reply;
nothing already sent is ever edited, so every request's prefix is the previous request's prefix plus
the new turns (what prompt caching needs). The next user turn is staged for each request and
committed only with the reply it got: a failed or refused request leaves no trace. Three cache
breakpoints: the static prefix (system, with the tools before it), the end of the last committed user
turn (exactly where the previous request's last breakpoint was: its entry is read back) and the end of
the staged turn's stable blocks (written for the next request); the dashboard block after it is not
cached. When the conversation outgrows its budget, or a kept patch changes the static prefix (which
invalidates every cached turn anyway), it is reset: the next user turn is a digest of the whole
ledger, so one rewrite replaces many small ones.

Saved to <session>/claude_conversation.json after every change, so a resume continues the same
conversation (its thinking blocks included, sent back unchanged).

Usage: conv = Conversation.load(path, model); msgs = conv.messages(user_blocks, dashboard, cache_control)
       conv.commit(user_blocks, reply_blocks, seen)
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("src.lab.agents.claude")
VERSION = 1


def reply_blocks(content: list) -> list[dict]:
    """The assistant's reply as request blocks: thinking (sent back unchanged, signature included, as the API
    requires with tool use), text and tool_use; anything else is dropped."""
    out = []
    for b in content:
        if b.type == "thinking":
            out.append({"type": "thinking", "thinking": b.thinking, "signature": b.signature})
        elif b.type == "redacted_thinking":
            out.append({"type": "redacted_thinking", "data": b.data})
        elif b.type == "text" and b.text.strip():
            out.append({"type": "text", "text": b.text})
        elif b.type == "tool_use":
            out.append({"type": "tool_use", "id": b.id, "name": b.name, "input": b.input})
    return out


class Conversation:
    def __init__(self, path: Optional[Path] = None, model: str = ""):
        self.path = path
        self.model = model
        self.turns: list[dict] = []  # {"role", "content": [blocks]}, committed
        self.seen: list[str] = []  # ledger rows (exp ids) the conversation has shown
        self.results: dict[str, list] = {}  # tool_use id -> [text, is_error] for calls that ran nothing
        self.carry: list[str] = []  # texts the next user turn must include (e.g. "answer with the tool")
        self.static_key = ""  # the static prefix the turns were cached after
        self.ttl = ""  # cache lifetime of this conversation ("" until its first request)
        self.resets = 0  # times it was condensed or dropped

    # ------------------------------------------------------------------ state
    def open_ids(self) -> list[str]:
        """tool_use ids of the last assistant turn: the next user turn answers each, in order."""
        if not self.turns or self.turns[-1]["role"] != "assistant":
            return []
        return [b["id"] for b in self.turns[-1]["content"] if b.get("type") == "tool_use"]

    def reset(self, why: str) -> None:
        """Drop every turn: the next user turn opens with a digest of the ledger."""
        if self.turns:
            log.info("agent=claude: conversation condensed into a digest (%s; %d turns dropped)", why, len(self.turns))
        self.turns, self.seen, self.results, self.carry, self.ttl = [], [], {}, [], ""
        self.resets += 1
        self.save()

    def commit(self, user: list[dict], assistant: list[dict], seen: list[str]) -> None:
        """Append a user turn and the reply it got (both as sent / received, never edited afterwards)."""
        self.turns += [{"role": "user", "content": copy.deepcopy(user)},
                       {"role": "assistant", "content": copy.deepcopy(assistant)}]
        answered = {b["tool_use_id"] for b in user if b.get("type") == "tool_result"}
        self.results = {k: v for k, v in self.results.items() if k not in answered}
        self.carry = []
        self.seen = list(dict.fromkeys([*self.seen, *seen]))
        self.save()

    # ------------------------------------------------------------------ requests
    def messages(self, user: list[dict], dashboard: str, cache_control: Optional[dict]) -> list[dict]:
        """The request's messages: the committed turns, then the staged user turn plus the dashboard, with the
        conversation's two cache breakpoints when cache_control is given."""
        msgs = copy.deepcopy(self.turns)
        final = copy.deepcopy(user)
        if cache_control is not None:
            last_user = next((m for m in reversed(msgs) if m["role"] == "user"), None)
            if last_user is not None:
                last_user["content"][-1]["cache_control"] = dict(cache_control)
            final[-1]["cache_control"] = dict(cache_control)
        final.append({"type": "text", "text": dashboard})
        return msgs + [{"role": "user", "content": final}]

    def tokens(self, chars_per_token: float) -> int:
        return int(len(json.dumps(self.turns)) / chars_per_token)

    # ------------------------------------------------------------------ disk
    def to_dict(self) -> dict:
        return {"version": VERSION, "model": self.model, "turns": self.turns, "seen": self.seen,
                "results": self.results, "carry": self.carry, "static_key": self.static_key, "ttl": self.ttl,
                "resets": self.resets, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save(self) -> None:
        if self.path is None:
            return
        from src.lab.session import atomic_write

        try:
            atomic_write(self.path, json.dumps(self.to_dict()))
        except OSError as e:  # a full disk must not stop the proposal; the next save tries again
            log.warning("could not save the conversation to %s: %s", self.path, e)

    @classmethod
    def load(cls, path: Path, model: str) -> "Conversation":
        """The saved conversation of this session, or a new one (none saved, unreadable, or another model's:
        thinking blocks are only sent back to the model that wrote them)."""
        conv = cls(path, model)
        if not path.exists():
            return conv
        try:
            d: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("could not read %s (%s); starting a new conversation from the ledger", path, e)
            return conv
        if d.get("version") != VERSION or d.get("model") != model:
            log.info("agent=claude: the saved conversation is %s's; starting a new one for %s", d.get("model"), model)
            return conv
        turns = d.get("turns") or []
        if turns and (turns[0].get("role") != "user" or turns[-1].get("role") != "assistant"):
            log.warning("%s does not end with a reply; starting a new conversation from the ledger", path)
            return conv
        conv.turns, conv.seen, conv.results = turns, list(d.get("seen") or []), dict(d.get("results") or {})
        conv.carry, conv.static_key = list(d.get("carry") or []), str(d.get("static_key") or "")
        conv.ttl, conv.resets = str(d.get("ttl") or ""), int(d.get("resets") or 0)
        return conv
