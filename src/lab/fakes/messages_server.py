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

Prompt caching is modelled (prompt_cache.py: breakpoints, lifetimes, minimum lengths, lookback), the
conversation rules live in conversation.py and the HTTP side in messages_http.py. Time is the server's
clock (real time + `advance()` + `seconds_per_request` per answered request), so a test can let a night
pass in milliseconds. Usage reports input, cache writes (5m and 1h), reads and output tokens; `totals()`
sums them. `outage(seconds)` fails every messages request for that long (real seconds).

Usage (tests):  with MessagesServer(api_key="sk-test") as srv:
                    srv.script(tool_use({...}, thinking="..."), error(529), refusal(), tool_use({...}))
                    Anthropic(api_key="sk-test", base_url=srv.url) ...; srv.requests[-1]["body"]
Usage (by hand): python -m src.lab.fakes.messages_server --script replies.json [--port 8765] [--key K]
                 replies.json: a JSON list of replies, each {"tool_use": {...}} | {"text": "..."} |
                 {"max_tokens": {...}} | {"refusal": "..."} | {"error": 529, "repeat": 3}
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import itertools
import json
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any, Callable, Optional

from src.lab.fakes.conversation import ConversationError, _blocks, _thinking_on
from src.lab.fakes.messages_http import Handler, _error_body
from src.lab.fakes.prompt_cache import PromptCache

TOOL = "propose_experiment"
# minimum cacheable prompt length (tokens) by model; the docs list 1024-4096 depending on the model
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


class MessagesServer:
    """The server, its script and what it received. Use as a context manager (starts and stops it)."""

    def __init__(self, api_key: Optional[str] = None, models: Optional[list[str]] = None,
                 forced_tools: bool = True, capabilities: Optional[dict] = MODERN,
                 min_cache_tokens: Optional[dict] = None, seconds_per_request: float = 0.0):
        self.api_key = api_key  # None: any key (but some key) is accepted
        self.models = models  # None: any model name
        self.forced_tools = forced_tools  # False: refuse tool_choice tool/any (a model that always thinks)
        self.capabilities = capabilities  # None: GET /v1/models/<id> answers 404 (capabilities unknown)
        self.prompt_cache = PromptCache(min_cache_tokens)
        self.seconds_per_request = seconds_per_request  # the clock advances this much per answered request
        self.requests: list[dict] = []  # every request: {path, method, headers (lower-case names), body, status}
        self.responder: Optional[Callable[[dict, int], dict]] = None  # replies once the script is empty
        self.fallback: Optional[dict] = None  # the reply when the script is empty and no responder (None: a 500)
        self.secret = b"messages-server-signing-key"
        self._script: list[dict] = []
        self._thought: dict[str, str] = {}  # tool_use id -> signature of the thinking that preceded it
        self._offset = 0.0
        self._down_until = 0.0
        self._down_status = 529
        self._ids = itertools.count(1)
        self._answered = 0
        self._usage: list[dict] = []
        self._lock = threading.Lock()
        self.httpd = self._bind(0)
        self._thread: Optional[threading.Thread] = None

    def _bind(self, port: int) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        httpd.fake = self  # what Handler answers from
        httpd.daemon_threads = True
        return httpd

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
        usage = self.prompt_cache.usage(body, content, r.get("usage"), self.now())
        msg = {"id": f"msg_{mid:04d}", "type": "message", "role": "assistant", "model": body["model"],
               "content": content, "stop_reason": stop, "stop_sequence": None, "stop_details": stop_details,
               "usage": usage}
        with self._lock:
            self._usage.append(usage)
            self._answered += 1
            self._offset += self.seconds_per_request
        return 200, msg, {}

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
        srv.httpd = srv._bind(args.port)
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
