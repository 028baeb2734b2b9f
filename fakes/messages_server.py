"""A local stand-in for the Anthropic Messages API, for tests and benches: POST /v1/messages from a script.

A real `http.server.ThreadingHTTPServer` on 127.0.0.1 (a free port) that the official SDK talks to
through `base_url`. Each POST /v1/messages takes the next scripted reply (a tool call, a text
answer, a max_tokens cut, a refusal, an HTTP error, a hang), or asks `responder(body, n)` when the
script is empty, and records the request so a test can check what was sent. Like the real API it
refuses malformed requests with a 400 invalid_request_error:
- roles alternate starting with the user; every tool_use is answered by a tool_result in the next
  user turn, and tool_result blocks come first in that turn;
- thinking blocks come back unchanged (their signature is checked), and the last assistant turn
  keeps the thinking that preceded its tool call;
- thinking is not allowed with a forced tool (tool_choice any/tool); effort, thinking types and
  strict tool schemas only where the model's capabilities say so (GET /v1/models/<id> answers them);
- at most 4 cache breakpoints, 1-hour ones before 5-minute ones; no temperature/top_p/top_k.
Errors carry the API's `error.type` and, when scripted, `error.details.error_code` (a spend limit is
a 429 rate_limit_error with error_code enforced_spend_limit_reached and no retry-after).

Prompt caching is modelled: a breakpoint writes the prefix up to it (tools, system, messages, in that
order; the message part also keyed by thinking and tool_choice, whose changes invalidate it) with its
lifetime (`ttl` 5m or 1h, refreshed by each read), a read looks at each breakpoint and up to 20 blocks
before it, and prefixes shorter than the model's minimum cacheable length are neither written nor
read. Time is the server's clock (real time + `advance()` + `seconds_per_request` per answered
request), so a test can let a night pass in milliseconds. Usage reports input, cache writes (split into
5m and 1h) and reads, and output tokens (~4 characters of JSON per token); `totals()` sums them.
`outage(seconds)` fails every messages request for that long (real seconds).

Usage (tests):  with MessagesServer(api_key="sk-test") as srv:
                    srv.script(tool_use({...}, thinking="..."), error(529), refusal(), tool_use({...}))
                    Anthropic(api_key="sk-test", base_url=srv.url) ...; srv.requests[-1]["body"]
Usage (by hand): python -m fakes.messages_server --script replies.json [--port 8765] [--key K]
                 replies.json: a JSON list of replies, each {"tool_use": {...}} | {"text": "..."} |
                 {"max_tokens": {...}} | {"refusal": "..."} | {"error": 529, "repeat": 3}
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import itertools
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

TOOL = "propose_experiment"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 408: "timeout_error", 409: "conflict_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "api_error",
               504: "timeout_error", 529: "overloaded_error"}
REMOVED_PARAMS = ("temperature", "top_p", "top_k")
LOOKBACK = 20  # blocks before a breakpoint the cache looks at for an earlier entry
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
# minimum cacheable prompt length (tokens) by model; the docs list 1024-4096 depending on the model
MIN_CACHE_TOKENS = {"claude-opus-4-5": 4096, "claude-opus-4-6": 4096, "claude-haiku-4-5": 4096,
                    "claude-opus-4-7": 2048, "default": 1024}
MODERN = {"thinking": ["adaptive", "enabled", "disabled"], "effort": ["low", "medium", "high"],
          "structured_outputs": True}  # the capabilities a model has unless told otherwise

# ---------------------------------------------------------------------------- scripted replies


def tool_use(input: dict, text: str = "", usage: Optional[dict] = None, name: str = TOOL,
             thinking: str = "") -> dict:
    """The model calls `name` with `input` (stop_reason tool_use), after a thinking block when the request
    enables thinking and `thinking` is given."""
    return {"kind": "tool_use", "input": input, "text": text, "usage": usage, "name": name, "thinking": thinking}


def text(message: str = "I think we should try a lower learning rate.", stop_reason: str = "end_turn",
         usage: Optional[dict] = None, thinking: str = "") -> dict:
    """A text answer without a tool call (end_turn, or another stop reason)."""
    return {"kind": "text", "text": message, "stop_reason": stop_reason, "usage": usage, "thinking": thinking}


def max_tokens(partial: Optional[dict] = None, usage: Optional[dict] = None) -> dict:
    """Output cut off at max_tokens in the middle of a tool call (its input is incomplete)."""
    return {"kind": "max_tokens", "input": partial or {"description": "a long patch"}, "usage": usage}


def refusal(explanation: str = "declined", category: Optional[str] = "frontier_llm", partial: str = "") -> dict:
    """stop_reason refusal with stop_details (category, explanation); `partial` text streamed before it."""
    return {"kind": "refusal", "text": explanation, "category": category, "partial": partial}


def error(status: int = 500, message: str = "", repeat: int = 1, retry_after_ms: Optional[int] = 5,
          code: Optional[str] = None, type: Optional[str] = None, should_retry: Optional[bool] = None) -> dict:
    """An HTTP error `repeat` times in a row: error.type from the status (or `type`), error.details.error_code
    `code` when given; retry-after-ms keeps the SDK's backoff short (None: no retry-after header)."""
    return {"kind": "error", "status": status, "message": message or f"scripted {status}", "repeat": repeat,
            "retry_after_ms": retry_after_ms, "code": code, "type": type, "should_retry": should_retry}


def spend_limit(repeat: int = 1) -> dict:
    """The organization's monthly spend limit: a 429 that no retry fixes."""
    return error(429, "You have reached your API usage limits for this month.", repeat, retry_after_ms=None,
                 code="enforced_spend_limit_reached")


def hang(seconds: float) -> dict:
    """Accept the request and answer nothing for `seconds` (then the next scripted reply): a hung request."""
    return {"kind": "hang", "seconds": seconds}


def from_json(item: Any) -> dict:
    """A reply written in the by-hand script format ({"tool_use": {...}}, {"error": 529}, ...)."""
    if not isinstance(item, dict):
        raise ValueError(f"a scripted reply must be an object, got {item!r:.100}")
    if "kind" in item:
        return item
    if "tool_use" in item:
        return tool_use(item["tool_use"], item.get("text", ""), item.get("usage"), thinking=item.get("thinking", ""))
    if "text" in item:
        return text(item["text"], item.get("stop_reason", "end_turn"), item.get("usage"))
    if "max_tokens" in item:
        return max_tokens(item["max_tokens"] or None, item.get("usage"))
    if "refusal" in item:
        return refusal(item["refusal"] or "declined")
    if "error" in item:
        return error(int(item["error"]), item.get("message", ""), int(item.get("repeat", 1)),
                     code=item.get("code"))
    raise ValueError(f"unknown scripted reply {item!r:.200}")


# ---------------------------------------------------------------------------- the checks


def _tokens(obj: Any) -> int:
    """A stand-in tokenizer: ~4 characters of JSON per token."""
    return max(1, math.ceil(len(json.dumps(obj, sort_keys=True)) / 4))


class ConversationError(ValueError):
    """The request is one the real API would refuse with a 400."""


def _blocks(content: Any) -> list:
    if content is None:
        return []
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


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


def _cacheable(body: dict) -> list:
    """tools, system blocks and message blocks in the order the API caches them."""
    return [*(body.get("tools") or []), *_blocks(body.get("system")),
            *[b for m in body["messages"] for b in _blocks(m["content"])]]


# ---------------------------------------------------------------------------- the server


class MessagesServer:
    """The server, its script and what it received. Use as a context manager (starts and stops it)."""

    def __init__(self, api_key: Optional[str] = None, models: Optional[list[str]] = None,
                 forced_tools: bool = True, capabilities: Optional[dict] = MODERN,
                 min_cache_tokens: Optional[dict] = None, seconds_per_request: float = 0.0):
        self.api_key = api_key  # None: any key (but some key) is accepted
        self.models = models  # None: any model name
        self.forced_tools = forced_tools  # False: refuse tool_choice tool/any (a model that always thinks)
        self.capabilities = capabilities  # None: GET /v1/models/<id> answers 404 (capabilities unknown)
        self.min_cache_tokens = {**MIN_CACHE_TOKENS, **(min_cache_tokens or {})}
        self.seconds_per_request = seconds_per_request  # the clock advances this much per answered request
        self.requests: list[dict] = []  # every request: {path, method, headers (lower-case names), body, status}
        self.responder: Optional[Callable[[dict, int], dict]] = None  # replies once the script is empty
        self.fallback: Optional[dict] = None  # the reply when the script is empty and no responder (None: a 500)
        self.secret = b"messages-server-signing-key"
        self._script: list[dict] = []
        self._cache: dict[str, tuple[float, str]] = {}  # prefix key -> (expires at, ttl)
        self._thought: dict[str, str] = {}  # tool_use id -> signature of the thinking that preceded it
        self._offset = 0.0
        self._down_until = 0.0
        self._down_status = 529
        self._ids = itertools.count(1)
        self._answered = 0
        self._usage: list[dict] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ control
    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "MessagesServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="messages-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "MessagesServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def script(self, *replies: dict) -> None:
        """Queue replies (an error with repeat=n counts n times)."""
        with self._lock:
            for r in replies:
                r = from_json(r)
                self._script.extend([r] * int(r.get("repeat", 1)) if r["kind"] == "error" else [r])

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._script)

    def now(self) -> float:
        """The server's clock (seconds): real time plus what advance() and seconds_per_request added."""
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass on the server's clock (cache entries age; nothing else waits)."""
        with self._lock:
            self._offset += seconds

    def outage(self, seconds: float, status: int = 529) -> None:
        """From now on, for `seconds` of real time, every POST /v1/messages fails with `status`."""
        self._down_until = time.monotonic() + seconds
        self._down_status = status

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def messages_requests(self) -> list[dict]:
        """The POST /v1/messages requests the script answered (count_tokens, models and refused ones left out)."""
        return [r for r in self.requests if r["path"] == "/v1/messages" and r["status"] == 200]

    def usage_log(self) -> list[dict]:
        """The `usage` of every answered messages request, in order."""
        with self._lock:
            return [dict(u) for u in self._usage]

    def totals(self) -> dict:
        """Usage summed over every answered messages request (what the account would be billed for)."""
        with self._lock:
            out = {"requests": len(self._usage), "input_tokens": 0, "output_tokens": 0,
                   "cache_creation_input_tokens": 0, "cache_creation_1h_input_tokens": 0,
                   "cache_read_input_tokens": 0}
            for u in self._usage:
                for k in out:
                    if k in u:
                        out[k] += u[k]
                out["cache_creation_1h_input_tokens"] += u["cache_creation"]["ephemeral_1h_input_tokens"]
            return out

    def sign(self, thinking: str) -> str:
        return hmac.new(self.secret, thinking.encode(), hashlib.sha256).hexdigest()[:40]

    # ------------------------------------------------------------------ answering
    def _next(self, body: dict) -> dict:
        with self._lock:
            if self._script:
                return self._script.pop(0)
            n = self._answered
        if self.responder is not None:
            return from_json(self.responder(body, n))
        return self.fallback or error(500, "the test script is exhausted: no reply left", retry_after_ms=1)

    def _min_cache(self, model: str) -> int:
        for k, v in self.min_cache_tokens.items():
            if k != "default" and (model == k or model.startswith(k + "-")):
                return v
        return self.min_cache_tokens["default"]

    def _usage_of(self, body: dict, content: list, scripted: Optional[dict]) -> dict:
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
        floor = self._min_cache(body["model"])
        now = self.now()
        hit = -1
        with self._lock:
            for i, _ in marks:
                for j in range(i, max(-1, i - LOOKBACK - 1), -1):
                    entry = self._cache.get(keys[j])
                    if entry and entry[0] > now and cum[j] >= floor:
                        hit = max(hit, j)
                        break
            if hit >= 0:
                _, ttl = self._cache[keys[hit]]
                self._cache[keys[hit]] = (now + TTL_SECONDS[ttl], ttl)  # a read refreshes the entry
            written = {"5m": 0, "1h": 0}
            top = hit
            for i, ttl in marks:
                if i > hit and cum[i] >= floor:
                    self._cache[keys[i]] = (now + TTL_SECONDS[ttl], ttl)
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

    def _check_model(self, body: dict) -> None:
        """What only some models accept: effort levels, thinking types, strict tools, forced tools."""
        if not self.forced_tools and (body.get("tool_choice") or {}).get("type") in ("tool", "any"):
            raise ConversationError("tool_choice: forced tool use is not supported with this model "
                                    "(thinking is always on); use {\"type\": \"auto\"}")
        caps = self.capabilities
        if caps is None:
            return
        th = (body.get("thinking") or {}).get("type")
        if th and th not in caps.get("thinking", []):
            raise ConversationError(f"thinking.type: {th!r} is not supported by this model")
        effort = (body.get("output_config") or {}).get("effort")
        if effort is not None and effort not in caps.get("effort", []):
            raise ConversationError(f"output_config.effort: {effort!r} is not supported by this model")
        if any(t.get("strict") for t in body.get("tools") or []) and not caps.get("structured_outputs"):
            raise ConversationError("tools.strict: strict tool use is not supported by this model")

    def _check_thinking(self, body: dict) -> None:
        """Thinking blocks come back unchanged; the last assistant turn keeps the thinking of its tool call."""
        msgs = body["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            blocks = _blocks(m["content"])
            for b in blocks:
                if b.get("type") == "thinking" and b.get("signature") != self.sign(str(b.get("thinking", ""))):
                    raise ConversationError(f"messages.{i}.content: invalid `signature` in `thinking` block")
            if i == last and _thinking_on(body) and any(b.get("type") == "tool_use" for b in blocks):
                produced = self._thought.get(next(b["id"] for b in blocks if b.get("type") == "tool_use"))
                if produced and blocks[0].get("type") not in ("thinking", "redacted_thinking"):
                    raise ConversationError(f"messages.{i}.content.0.type: Expected `thinking` or "
                                            "`redacted_thinking`, but found `tool_use`. When `thinking` is enabled, "
                                            "a final `assistant` message must start with a thinking block.")

    def answer(self, body: dict) -> tuple[int, dict, dict]:
        """(status, JSON body, extra headers) for one POST /v1/messages."""
        if self.down:
            return self._down_status, _error_body(self._down_status, "Overloaded (scripted outage)"), \
                {"retry-after-ms": "5"}
        r = self._next(body)
        kind = r["kind"]
        if kind == "hang":
            time.sleep(r["seconds"])
            return self.answer(body)
        if kind == "error":
            status = r["status"]
            headers = {} if r.get("retry_after_ms") is None else {"retry-after-ms": str(r["retry_after_ms"])}
            if r.get("should_retry") is not None:
                headers["x-should-retry"] = "true" if r["should_retry"] else "false"
            return status, _error_body(status, r["message"], r.get("code"), r.get("type")), headers
        mid = next(self._ids)
        content: list[dict]
        stop_details = None
        thinking = [{"type": "thinking", "thinking": r["thinking"], "signature": self.sign(r["thinking"])}] \
            if r.get("thinking") and _thinking_on(body) else []
        if kind == "tool_use":
            tid = f"toolu_{mid:04d}"
            content = thinking + ([{"type": "text", "text": r["text"]}] if r["text"] else []) + [
                {"type": "tool_use", "id": tid, "name": r["name"], "input": r["input"]}]
            if thinking:
                self._thought[tid] = thinking[0]["signature"]
            stop = "tool_use"
        elif kind == "max_tokens":
            content = [{"type": "tool_use", "id": f"toolu_{mid:04d}", "name": TOOL, "input": r["input"]}]
            stop = "max_tokens"
        elif kind == "refusal":
            content = [{"type": "text", "text": r["partial"]}] if r.get("partial") else []
            stop = "refusal"
            stop_details = {"type": "refusal", "category": r.get("category"), "explanation": r["text"]}
        else:
            content, stop = thinking + [{"type": "text", "text": r["text"]}], r["stop_reason"]
        usage = self._usage_of(body, content, r.get("usage"))
        msg = {"id": f"msg_{mid:04d}", "type": "message", "role": "assistant", "model": body["model"],
               "content": content, "stop_reason": stop, "stop_sequence": None, "stop_details": stop_details,
               "usage": usage}
        with self._lock:
            self._usage.append(usage)
            self._answered += 1
            self._offset += self.seconds_per_request
        return 200, msg, {}

    def model_info(self, model: str) -> tuple[int, dict]:
        caps = self.capabilities
        if caps is None:
            return 404, _error_body(404, f"model capabilities are not available for {model}")
        yes = lambda b: {"supported": bool(b)}  # noqa: E731
        effort = caps.get("effort", [])
        return 200, {
            "type": "model", "id": model, "display_name": model, "created_at": "2026-01-01T00:00:00Z",
            "lifecycle": "active", "max_input_tokens": 200_000, "max_tokens": 64_000,
            "capabilities": {
                "batch": yes(True), "citations": yes(True), "code_execution": yes(False),
                "context_management": {"supported": False}, "image_input": yes(True), "pdf_input": yes(True),
                "server_tools": {"supported": False}, "structured_outputs": yes(caps.get("structured_outputs")),
                "effort": {"supported": bool(effort), **{k: yes(k in effort) for k in
                                                         ("low", "medium", "high", "xhigh", "max")}},
                "thinking": {"supported": any(t != "disabled" for t in caps.get("thinking", [])),
                             "types": {t: yes(t in caps.get("thinking", []))
                                       for t in ("adaptive", "enabled", "disabled", "between_tools")}}}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: tests read server.requests instead
                pass

            def _send(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.send_header("request-id", f"req_{time.monotonic_ns()}")
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

            def _record(self, method: str) -> tuple[dict, dict, Optional[dict]]:
                n = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(n) if n else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                rec = {"path": self.path.split("?")[0], "method": method, "headers": headers, "status": None,
                       "time": time.monotonic()}
                try:
                    rec["body"] = body = json.loads(raw or b"{}")
                except ValueError:
                    rec["body"] = raw.decode(errors="replace")
                    body = None
                with server._lock:
                    server.requests.append(rec)
                return rec, headers, body

            def _authorized(self, headers: dict) -> bool:
                auth = headers.get("authorization", "")
                key = auth[len("Bearer "):] if auth.startswith("Bearer ") else headers.get("x-api-key")
                return bool(key) and (server.api_key is None or key == server.api_key)

            def do_GET(self) -> None:
                rec, headers, _ = self._record("GET")
                path = rec["path"]
                if not self._authorized(headers):
                    status, out = 401, _error_body(401, "invalid x-api-key")
                elif not path.startswith("/v1/models/"):
                    status, out = 404, _error_body(404, f"Not found: {path}")
                else:
                    model = path[len("/v1/models/"):]
                    if server.models is not None and model not in server.models:
                        status, out = 404, _error_body(404, f"model: {model}")
                    else:
                        status, out = server.model_info(model)
                rec["status"] = status
                self._send(status, out)

            def do_POST(self) -> None:
                rec, headers, body = self._record("POST")
                status, out, extra = self._route(rec["path"], headers, body)
                rec["status"] = status
                self._send(status, out, extra)

            def _route(self, path: str, headers: dict, body: Optional[dict]) -> tuple[int, dict, dict]:
                if not self._authorized(headers):
                    return 401, _error_body(401, "invalid x-api-key"), {}
                if body is None:
                    return 400, _error_body(400, "request body is not valid JSON"), {}
                if path not in ("/v1/messages", "/v1/messages/count_tokens"):
                    return 404, _error_body(404, f"Not found: {path}"), {}
                if server.models is not None and body.get("model") not in server.models:
                    return 404, _error_body(404, f"model: {body.get('model')}"), {}
                if path.endswith("/count_tokens"):
                    return 200, {"input_tokens": sum(_tokens(p) for p in _cacheable(body))}, {}
                try:
                    check_request(body)
                    server._check_model(body)
                    server._check_thinking(body)
                except ConversationError as e:
                    return 400, _error_body(400, str(e)), {}
                return server.answer(body)

        return Handler


def _error_body(status: int, message: str, code: Optional[str] = None, type: Optional[str] = None) -> dict:
    err = {"type": type or ERROR_TYPES.get(status, "api_error"), "message": message}
    if code:
        err["details"] = {"error_code": code}
    return {"type": "error", "error": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--script", required=True, help="JSON list of replies (see the module docstring)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--key", default=None, help="the only API key accepted (default: any)")
    args = ap.parse_args()
    with open(args.script) as f:
        replies = json.load(f)
    srv = MessagesServer(api_key=args.key)
    if args.port:
        srv.httpd.server_close()
        srv.httpd = ThreadingHTTPServer(("127.0.0.1", args.port), srv._handler())
        srv.httpd.daemon_threads = True
    srv.script(*replies)
    print(f"messages server on {srv.url} with {srv.pending} scripted replies", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()
        n = len([r for r in srv.requests if r["path"] == "/v1/messages"])
        print(f"served {n} messages requests; {srv.pending} replies left", flush=True)


if __name__ == "__main__":
    main()
