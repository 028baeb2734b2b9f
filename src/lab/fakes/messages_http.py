"""The HTTP side of the local Messages API (messages_server.py): routing, authentication, records.

`Handler` serves the `MessagesServer` stored as `fake` on its `ThreadingHTTPServer`: GET /v1/models/<id>
answers the model's capabilities, POST /v1/messages and /v1/messages/count_tokens are checked
(key, JSON, model, conversation rules) and answered by the server's script. Every request is
recorded in the server's `requests`.
"""
from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from typing import Optional

from src.lab.fakes.conversation import ConversationError, check_request
from src.lab.fakes.prompt_cache import _cacheable, _tokens

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 408: "timeout_error", 409: "conflict_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "api_error",
               504: "timeout_error", 529: "overloaded_error"}

def _error_body(status: int, message: str, code: Optional[str] = None, type: Optional[str] = None) -> dict:
    err = {"type": type or ERROR_TYPES.get(status, "api_error"), "message": message}
    if code:
        err["details"] = {"error_code": code}
    return {"type": "error", "error": err}


def check_model(body: dict, forced_tools: bool, caps: Optional[dict]) -> None:
    """What only some models accept: effort levels, thinking types, strict tools, forced tools."""
    if not forced_tools and (body.get("tool_choice") or {}).get("type") in ("tool", "any"):
        raise ConversationError("tool_choice: forced tool use is not supported with this model "
                                "(thinking is always on); use {\"type\": \"auto\"}")
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


def model_info(caps: Optional[dict], model: str) -> tuple[int, dict]:
    """GET /v1/models/<id>: the capabilities the server was given (None: 404, unknown)."""
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def fake(self):
        """The MessagesServer this HTTP server answers for."""
        return self.server.fake

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
        with self.fake._lock:
            self.fake.requests.append(rec)
        return rec, headers, body

    def _authorized(self, headers: dict) -> bool:
        auth = headers.get("authorization", "")
        key = auth[len("Bearer "):] if auth.startswith("Bearer ") else headers.get("x-api-key")
        return bool(key) and (self.fake.api_key is None or key == self.fake.api_key)

    def do_GET(self) -> None:
        rec, headers, _ = self._record("GET")
        path = rec["path"]
        if not self._authorized(headers):
            status, out = 401, _error_body(401, "invalid x-api-key")
        elif not path.startswith("/v1/models/"):
            status, out = 404, _error_body(404, f"Not found: {path}")
        else:
            model = path[len("/v1/models/"):]
            if self.fake.models is not None and model not in self.fake.models:
                status, out = 404, _error_body(404, f"model: {model}")
            else:
                status, out = model_info(self.fake.capabilities, model)
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
        if self.fake.models is not None and body.get("model") not in self.fake.models:
            return 404, _error_body(404, f"model: {body.get('model')}"), {}
        if path.endswith("/count_tokens"):
            return 200, {"input_tokens": sum(_tokens(p) for p in _cacheable(body))}, {}
        try:
            check_request(body)
            check_model(body, self.fake.forced_tools, self.fake.capabilities)
            self.fake._check_thinking(body)
        except ConversationError as e:
            return 400, _error_body(400, str(e)), {}
        return self.fake.answer(body)
