"""The conversation rules of the local Messages API (messages_server.py): what the real API refuses with a 400.

Roles alternate starting with the user; every tool_use is answered by a tool_result in the next user
turn, tool_result blocks first; thinking is not allowed with a forced tool; at most 4 cache
breakpoints, 1-hour ones before 5-minute ones; no temperature/top_p/top_k; strict tool schemas closed.
"""
from __future__ import annotations

from typing import Any

REMOVED_PARAMS = ("temperature", "top_p", "top_k")
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


def _blocks(content: Any) -> list:
    if content is None:
        return []
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _cacheable(body: dict) -> list:
    """tools, system blocks and message blocks in the order the API caches them."""
    return [*(body.get("tools") or []), *_blocks(body.get("system")),
            *[b for m in body["messages"] for b in _blocks(m["content"])]]


class ConversationError(ValueError):
    """The request is one the real API would refuse with a 400."""


def _thinking_on(body: dict) -> bool:
    return (body.get("thinking") or {}).get("type") in ("adaptive", "enabled")


def check_request(body: dict) -> None:
    """Raise ConversationError for what the Messages API refuses (the subset an agent can get wrong)."""
    for k in ("model", "max_tokens", "messages"):
        if k not in body:
            raise ConversationError(f"{k}: Field required")
    if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
        raise ConversationError("max_tokens: must be a positive integer")
    for k in REMOVED_PARAMS:
        if k in body:
            raise ConversationError(f"{k}: is not supported by this model")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ConversationError("messages: at least one message is required")
    if msgs[0].get("role") != "user":
        raise ConversationError("messages: first message must use the \"user\" role")
    pending: set[str] = set()
    for i, m in enumerate(msgs):
        role, content = m.get("role"), m.get("content")
        if i and role == msgs[i - 1].get("role"):
            raise ConversationError(f"messages.{i}: roles must alternate between \"user\" and \"assistant\"")
        blocks = _blocks(content)
        if not blocks:
            raise ConversationError(f"messages.{i}: content must be a non-empty string or list of blocks")
        for b in blocks:
            if b.get("type") == "text" and not str(b.get("text", "")).strip():
                raise ConversationError(f"messages.{i}: text content blocks must be non-empty")
        if role == "user":
            kinds = [b.get("type") for b in blocks]
            first_other = next((j for j, k in enumerate(kinds) if k != "tool_result"), len(kinds))
            if "tool_result" in kinds[first_other:]:
                raise ConversationError(f"messages.{i}: tool_result blocks must come first in the content, before "
                                        "any other block")
            results = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
            if results - pending:
                raise ConversationError(f"messages.{i}: unexpected `tool_use_id` found in `tool_result` blocks: "
                                        f"{sorted(results - pending)}. Each `tool_result` block must have a "
                                        "corresponding `tool_use` block in the previous message.")
            if pending - results:
                raise ConversationError(f"messages.{i}: `tool_use` ids were found without `tool_result` blocks "
                                        f"immediately after: {sorted(pending - results)}")
            pending = set()
        elif role == "assistant":
            pending = {b.get("id") for b in blocks if b.get("type") == "tool_use"}
        else:
            raise ConversationError(f"messages.{i}: unknown role {role!r}")
    if pending:
        raise ConversationError("messages: the conversation ends with an assistant tool_use and no tool_result")
    tools = body.get("tools") or []
    names = {t.get("name") for t in tools}
    choice = body.get("tool_choice") or {}
    if choice.get("type") == "tool" and choice.get("name") not in names:
        raise ConversationError(f"tool_choice: tool {choice.get('name')!r} not found in tools")
    if _thinking_on(body) and choice.get("type") in ("tool", "any"):
        raise ConversationError("tool_choice: thinking may not be enabled when tool_choice forces tool use; "
                                "use {\"type\": \"auto\"} or {\"type\": \"none\"}")
    th = body.get("thinking") or {}
    if th.get("type") == "enabled":
        budget = th.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024 or budget >= body["max_tokens"]:
            raise ConversationError("thinking.budget_tokens: must be >= 1024 and less than max_tokens")
    for t in tools:
        if not isinstance(t.get("input_schema"), dict) or t["input_schema"].get("type") != "object":
            raise ConversationError(f"tools: {t.get('name')}: input_schema must be a JSON schema of type object")
        if t.get("strict"):
            _check_strict(t["input_schema"], f"tools.{t.get('name')}.input_schema")
    marks = [b["cache_control"] for b in _cacheable(body) if isinstance(b, dict) and b.get("cache_control")]
    if len(marks) > 4:
        raise ConversationError(f"A maximum of 4 blocks with cache_control may be provided. Found {len(marks)}.")
    ttls = [m.get("ttl", "5m") for m in marks]
    if any(t not in TTL_SECONDS for t in ttls):
        raise ConversationError(f"cache_control.ttl: must be one of {sorted(TTL_SECONDS)}")
    if "1h" in ttls and "5m" in ttls and ttls.index("5m") < len(ttls) - 1 - ttls[::-1].index("1h"):
        raise ConversationError("cache_control: a ttl='1h' cache_control block must not come after a ttl='5m' one")


def _check_strict(schema: Any, where: str) -> None:
    """Strict tool use: every object says additionalProperties: false (the grammar needs a closed schema)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and schema.get("additionalProperties") is not False:
            raise ConversationError(f"{where}: strict tool schemas need \"additionalProperties\": false on every object")
        for k, v in schema.items():
            _check_strict(v, f"{where}.{k}")
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            _check_strict(v, f"{where}[{i}]")


# ---------------------------------------------------------------------------- the server
