"""A local stand-in for the Anthropic Messages API, for tests: POST /v1/messages from a script.

A real `http.server.ThreadingHTTPServer` on 127.0.0.1 (a free port) that the official SDK talks
to through `base_url`. Each POST /v1/messages takes the next scripted reply (a tool call, a text
answer, a max_tokens cut, a refusal, an HTTP error) and records the request so a test can check
what was sent. Like the real API it refuses malformed conversations with a 400: roles must
alternate starting with the user, every tool_use must be answered by a tool_result in the next
user turn, a forced tool must exist, and the removed sampling knobs (temperature, top_p) are
rejected. It checks the key (Authorization: Bearer <key>, or x-api-key) when given one, emulates
prompt caching (a repeated prefix up to a cache_control breakpoint is read from the cache) and
answers POST /v1/messages/count_tokens.

Usage (tests):  with MessagesServer(api_key="sk-test") as srv:
                    srv.script(tool_use({...}), error(529), tool_use({...}))
                    Anthropic(api_key="sk-test", base_url=srv.url) ...; srv.requests[-1]["body"]
Usage (by hand): python -m tests.messages_server --script replies.json [--port 8765] [--key K]
                 replies.json: a JSON list of replies, each {"tool_use": {...}} | {"text": "..."} |
                 {"max_tokens": {...}} | {"refusal": "..."} | {"error": 529, "repeat": 3}
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

TOOL = "propose_experiment"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "api_error", 529: "overloaded_error"}
REMOVED_PARAMS = ("temperature", "top_p", "top_k")

# ---------------------------------------------------------------------------- scripted replies


def tool_use(input: dict, text: str = "", usage: Optional[dict] = None, name: str = TOOL,
             thinking: str = "") -> dict:
    """The model calls `name` with `input` (stop_reason tool_use), after a thinking block if given."""
    return {"kind": "tool_use", "input": input, "text": text, "usage": usage, "name": name, "thinking": thinking}


def text(message: str = "I think we should try a lower learning rate.", stop_reason: str = "end_turn",
         usage: Optional[dict] = None) -> dict:
    """A text answer without a tool call (end_turn, or another stop reason)."""
    return {"kind": "text", "text": message, "stop_reason": stop_reason, "usage": usage}


def max_tokens(partial: Optional[dict] = None, usage: Optional[dict] = None) -> dict:
    """Output cut off at max_tokens in the middle of a tool call (its input is incomplete)."""
    return {"kind": "max_tokens", "input": partial or {"description": "a long patch"}, "usage": usage}


def refusal(explanation: str = "declined") -> dict:
    return {"kind": "refusal", "text": explanation}


def error(status: int = 500, message: str = "", repeat: int = 1, retry_after_ms: int = 5) -> dict:
    """An HTTP error `repeat` times in a row (retry-after-ms keeps the SDK's backoff short)."""
    return {"kind": "error", "status": status, "message": message or f"scripted {status}", "repeat": repeat,
            "retry_after_ms": retry_after_ms}


def from_json(item: Any) -> dict:
    """A reply written in the by-hand script format ({"tool_use": {...}}, {"error": 529}, ...)."""
    if not isinstance(item, dict):
        raise ValueError(f"a scripted reply must be an object, got {item!r:.100}")
    if "kind" in item:
        return item
    if "tool_use" in item:
        return tool_use(item["tool_use"], item.get("text", ""), item.get("usage"))
    if "text" in item:
        return text(item["text"], item.get("stop_reason", "end_turn"), item.get("usage"))
    if "max_tokens" in item:
        return max_tokens(item["max_tokens"] or None, item.get("usage"))
    if "refusal" in item:
        return refusal(item["refusal"] or "declined")
    if "error" in item:
        return error(int(item["error"]), item.get("message", ""), int(item.get("repeat", 1)))
    raise ValueError(f"unknown scripted reply {item!r:.200}")


# ---------------------------------------------------------------------------- the server


def _tokens(obj: Any) -> int:
    """A stand-in tokenizer: ~4 characters of JSON per token."""
    return max(1, math.ceil(len(json.dumps(obj, sort_keys=True)) / 4))


class ConversationError(ValueError):
    """The request is one the real API would refuse with a 400."""


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
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not blocks:
            raise ConversationError(f"messages.{i}: content must be a non-empty string or list of blocks")
        for b in blocks:
            if b.get("type") == "text" and not str(b.get("text", "")).strip():
                raise ConversationError(f"messages.{i}: text content blocks must be non-empty")
        if role == "user":
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
    choice = body.get("tool_choice")
    if choice and choice.get("type") == "tool" and choice.get("name") not in names:
        raise ConversationError(f"tool_choice: tool {choice.get('name')!r} not found in tools")
    for t in tools:
        if not isinstance(t.get("input_schema"), dict) or t["input_schema"].get("type") != "object":
            raise ConversationError(f"tools: {t.get('name')}: input_schema must be a JSON schema of type object")


class MessagesServer:
    """The server, its script and what it received. Use as a context manager (starts and stops it)."""

    def __init__(self, api_key: Optional[str] = None, models: Optional[list[str]] = None,
                 forced_tools: bool = True):
        self.api_key = api_key  # None: any key (but some key) is accepted
        self.models = models  # None: any model name
        self.forced_tools = forced_tools  # False: like models that always think, refuse tool_choice tool/any
        self.requests: list[dict] = []  # every POST: {path, headers (lower-case names), body, status}
        self.fallback: Optional[dict] = None  # the reply when the script is empty (None: a 500 saying so)
        self._script: list[dict] = []
        self._cache: set[str] = set()
        self._ids = itertools.count(1)
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

    def messages_requests(self) -> list[dict]:
        """The POST /v1/messages requests the script answered (count_tokens and refused ones left out)."""
        return [r for r in self.requests if r["path"] == "/v1/messages" and r["status"] != 400]

    # ------------------------------------------------------------------ answering
    def _next(self) -> dict:
        with self._lock:
            if self._script:
                return self._script.pop(0)
        return self.fallback or error(500, "the test script is exhausted: no reply left", retry_after_ms=1)

    def _usage(self, body: dict, content: list, scripted: Optional[dict]) -> dict:
        """Input tokens split into cached / cache-written / fresh, like prompt caching does."""
        prefix: list = []  # tools, system, messages up to the last cache_control breakpoint
        seen: list = []
        for part in [*(body.get("tools") or []), *(_blocks(body.get("system")) or []),
                     *[b for m in body["messages"] for b in (_blocks(m["content"]) or [])]]:
            seen.append(part)
            if isinstance(part, dict) and part.get("cache_control"):
                prefix = list(seen)
        total = _tokens({k: body.get(k) for k in ("tools", "system", "messages")})
        cached = created = 0
        if prefix:
            key = hashlib.sha256(json.dumps(prefix, sort_keys=True).encode()).hexdigest()
            n = min(_tokens(prefix), total - 1)
            with self._lock:
                hit = key in self._cache
                self._cache.add(key)
            cached, created = (n, 0) if hit else (0, n)
        usage = {"input_tokens": total - cached - created, "output_tokens": _tokens(content),
                 "cache_creation_input_tokens": created, "cache_read_input_tokens": cached}
        usage.update(scripted or {})
        return usage

    def answer(self, body: dict) -> tuple[int, dict, dict]:
        """(status, JSON body, extra headers) for one POST /v1/messages."""
        r = self._next()
        kind = r["kind"]
        if kind == "error":
            status = r["status"]
            return status, _error_body(status, r["message"]), {"retry-after-ms": str(r["retry_after_ms"])}
        mid = next(self._ids)
        content: list[dict]
        stop_details = None
        if kind == "tool_use":
            content = ([{"type": "thinking", "thinking": r["thinking"], "signature": f"sig{mid}"}]
                       if r.get("thinking") else [])
            content += ([{"type": "text", "text": r["text"]}] if r["text"] else []) + [
                {"type": "tool_use", "id": f"toolu_{mid:04d}", "name": r["name"], "input": r["input"]}]
            stop = "tool_use"
        elif kind == "max_tokens":
            content = [{"type": "tool_use", "id": f"toolu_{mid:04d}", "name": TOOL, "input": r["input"]}]
            stop = "max_tokens"
        elif kind == "refusal":
            content, stop = [], "refusal"
            stop_details = {"type": "refusal", "category": None, "explanation": r["text"]}
        else:
            content, stop = [{"type": "text", "text": r["text"]}], r["stop_reason"]
        msg = {"id": f"msg_{mid:04d}", "type": "message", "role": "assistant", "model": body["model"],
               "content": content, "stop_reason": stop, "stop_sequence": None, "stop_details": stop_details,
               "usage": self._usage(body, content, r.get("usage"))}
        return 200, msg, {}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: tests read server.requests instead
                pass

            def _send(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", f"req_{time.monotonic_ns()}")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(n)
                headers = {k.lower(): v for k, v in self.headers.items()}
                rec = {"path": self.path.split("?")[0], "headers": headers, "status": None}
                try:
                    rec["body"] = body = json.loads(raw or b"{}")
                except ValueError:
                    rec["body"] = raw.decode(errors="replace")
                    body = None
                with server._lock:
                    server.requests.append(rec)
                status, out, extra = self._route(rec["path"], headers, body)
                rec["status"] = status
                self._send(status, out, extra)

            def _route(self, path: str, headers: dict, body: Optional[dict]) -> tuple[int, dict, dict]:
                auth = headers.get("authorization", "")
                key = auth[len("Bearer "):] if auth.startswith("Bearer ") else headers.get("x-api-key")
                if not key or (server.api_key is not None and key != server.api_key):
                    return 401, _error_body(401, "invalid x-api-key"), {}
                if body is None:
                    return 400, _error_body(400, "request body is not valid JSON"), {}
                if path not in ("/v1/messages", "/v1/messages/count_tokens"):
                    return 404, _error_body(404, f"Not found: {path}"), {}
                if server.models is not None and body.get("model") not in server.models:
                    return 404, _error_body(404, f"model: {body.get('model')}"), {}
                if path.endswith("/count_tokens"):
                    return 200, {"input_tokens": _tokens({k: body.get(k) for k in ("tools", "system",
                                                                                   "messages")})}, {}
                try:
                    check_request(body)
                    if not server.forced_tools and (body.get("tool_choice") or {}).get("type") in ("tool", "any"):
                        raise ConversationError("tool_choice: forced tool use is not supported with this model "
                                                "(thinking is always on); use {\"type\": \"auto\"}")
                except ConversationError as e:
                    return 400, _error_body(400, str(e)), {}
                return server.answer(body)

        return Handler


def _blocks(content: Any) -> Optional[list]:
    if content is None:
        return None
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


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
