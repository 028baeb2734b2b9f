"""agent=claude's link to the Messages API: one reply per call, with retries, caps and graceful degradation.

What the model accepts is asked once (GET /v1/models/<model>, free) and turned into request options
(src/lab/agents/claude_api.py). A reply is asked for at most once per cap check: no request is sent
that could cross agent.max_cost_usd or agent.max_session_tokens. Failures are classified by status,
type and error code (never by message text): transient ones (429, 5xx, 529, timeouts) are retried
within agent.patience_s; a request the API refuses is condensed, then stripped of one optional
feature at a time (strict schemas, effort, thinking, the forced tool); a spend limit, billing, a
rejected key or an unknown model raise Stopped.

Usage: client = ClaudeClient(cfg, key); reply = client.send(build_request, deadline, conv, spent)
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from src.lab.agents.base import AgentStop
from src.lab.agents.claude_api import Capabilities, Options, Usage, classify, price_for, write_price
from src.lab.agents.claude_context import estimate_tokens
from src.lab.agents.claude_conversation import Conversation
from src.lab.config import ClaudeAgentConfig

log = logging.getLogger("src.lab.agents.claude")
OFFLINE = ("agent=tpe or agent=random (Optuna over search_space=...), or agent=replay "
           "agent.file=<proposals.yaml>")


class Unavailable(Exception):
    """Claude cannot answer this proposal now (API down, rate-limited, refusing, no usable reply): the
    fallback proposes it, and Claude is asked again later."""


class Stopped(Exception):
    """Claude cannot go on in this session (cost cap, spend limit, billing, key, model): the fallback goes on."""


class ClaudeClient:
    def __init__(self, cfg: ClaudeAgentConfig, key: str):
        import anthropic

        self.cfg = cfg
        self.price = price_for(cfg.model, dict(cfg.prices))
        # retries are ours (classified first: a spend-limit 429 is never retried); the key goes to the SDK only
        self.api = anthropic.Anthropic(api_key=key, base_url=cfg.base_url or None, max_retries=0,
                                       timeout=anthropic.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s)))
        self.caps: Optional[Capabilities] = None
        self.opts: Optional[Options] = None
        self.shrink = 1.0  # < 1 after the API said the request was too large
        self.gaps: list[float] = []  # seconds between the starts of consecutive requests
        self.last_request = 0.0
        self.down = ""  # why the API did not answer the preflight

    @property
    def where(self) -> str:
        return str(self.api.base_url).rstrip("/")

    def ping(self) -> bool:
        """Is the key accepted and the model known (a free count_tokens request)? False when the API does not
        answer now; AgentStop when it answers no."""
        import anthropic

        try:
            self.api.with_options(timeout=30.0).messages.count_tokens(
                model=self.cfg.model, messages=[{"role": "user", "content": "ping"}])
        except (anthropic.APIStatusError, anthropic.APIConnectionError) as err:
            f = classify(err)
            if f.kind == "stop":
                raise AgentStop(self.stop_message(err)) from None
            self.down = f.what
            return False
        self.capabilities()
        return True

    def options(self) -> Options:
        if self.opts is None:
            self.opts = Options.choose(self.cfg, self.capabilities())
        return self.opts

    def capabilities(self) -> Capabilities:
        """What the model accepts, asked once (free); unknown if the endpoint does not answer."""
        import anthropic

        if self.caps is None:
            try:
                self.caps = Capabilities.of(self.api.with_options(timeout=30.0).models.retrieve(self.cfg.model))
            except (anthropic.APIStatusError, anthropic.APIConnectionError) as err:
                log.info("agent=claude: the model's capabilities are unknown (%s); asking without thinking, with an "
                         "`analysis` field first", classify(err).what)
                self.caps = Capabilities()
        return self.caps

    def send(self, build: Callable[[], dict], deadline: float, conv: Conversation, spent: Usage):
        """One reply to the request `build()` makes. Transient failures are retried (agent.max_retries, within
        the deadline); a 400 first condenses the conversation, then drops one optional feature at a time."""
        import anthropic

        cfg = self.cfg
        tries, wait, condensed = 0, cfg.retry_wait_s, False
        kw = build()
        while True:
            self.check_caps(kw, spent, conv.ttl)
            now = time.monotonic()
            if self.last_request:
                self.gaps = (self.gaps + [now - self.last_request])[-8:]
            self.last_request = now
            try:
                return self.api.messages.create(**kw)
            except (anthropic.APIStatusError, anthropic.APIConnectionError) as e:
                err, f = e, classify(e)
            if f.kind == "stop":
                raise Stopped(self.stop_message(err))
            if f.kind in ("too_large", "bad_request") and conv.turns and not condensed:
                condensed = True
                if f.kind == "too_large":
                    self.shrink *= 0.7
                log.warning("agent=claude: the API refused the request (%s); condensing the conversation", f.what)
                conv.reset(f"the API refused the request: {f.what[:100]}")
            elif f.kind == "too_large":
                self.shrink *= 0.7
                if self.shrink < 0.2:
                    raise Unavailable(f"the API keeps refusing the request as too large ({f.what})")
            elif f.kind == "bad_request":
                self._degrade(f.what, conv)
            else:
                tries += 1
                left = deadline - time.monotonic()
                if tries > cfg.max_retries or left <= 0:
                    raise Unavailable(f"the API is not answering ({f.what}; {tries} tries)")
                pause = min(f.retry_after if f.retry_after is not None else wait, left, 60.0)
                log.info("agent=claude: %s; retrying in %.1f s", f.what, pause)
                time.sleep(pause)
                wait *= 2
                continue
            kw = build()

    def _degrade(self, what: str, conv: Conversation) -> None:
        dropped = self.options().degrade()
        if dropped is None:
            raise Unavailable(f"the API refused every form of the request ({what})")
        log.warning("agent=claude: the API refused the request (%s); asking without the %s from now on", what, dropped)
        if dropped.startswith("thinking"):  # the turns hold thinking blocks: start afresh without them
            conv.reset("thinking was turned off")

    def check_caps(self, kw: dict, spent: Usage, ttl: str) -> None:
        """No request that could cross a cap: its worst case is all input written to the cache + max_tokens out."""
        cfg, s = self.cfg, spent
        cpt = cfg.chars_per_token
        n_in = estimate_tokens(kw["system"], cpt) + estimate_tokens(kw["tools"], cpt) + \
            estimate_tokens(kw["messages"], cpt)
        cost = (n_in * max(self.price.input, write_price(self.price, ttl or "5m"))
                + cfg.max_tokens * self.price.output) / 1e6
        if s.cost_usd + cost > cfg.max_cost_usd:
            raise Stopped(f"the session has spent ${s.cost_usd:.4f}; the next request could cost up to ${cost:.4f}, "
                          f"which would cross agent.max_cost_usd=${cfg.max_cost_usd:.2f} (resume with a higher cap "
                          f"to go on with Claude: agent.max_cost_usd={next_cap(cfg.max_cost_usd)})")
        tokens = n_in + cfg.max_tokens
        if cfg.max_session_tokens and s.tokens + tokens > cfg.max_session_tokens:
            raise Stopped(f"the session has used {s.tokens:,} tokens; the next request could use {tokens:,} more, "
                          f"crossing agent.max_session_tokens={cfg.max_session_tokens:,} (resume with a higher cap to "
                          f"go on with Claude: agent.max_session_tokens={2 * cfg.max_session_tokens})")

    def stop_message(self, e) -> str:
        f = classify(e)
        status, key_env, model = getattr(e, "status_code", 0), self.cfg.api_key_env, self.cfg.model
        if status == 401:
            return (f"the API at {self.where} rejected the key in ${key_env} ({f.what}). Set a valid key, or run an "
                    f"offline agent that needs no key: {OFFLINE}.")
        if status == 403:
            return f"the key in ${key_env} may not use {model} ({f.what}). Pick another agent.model, or: {OFFLINE}."
        if status == 404:
            return (f"{self.where} does not know model {model!r} or the endpoint ({f.what}). Check agent.model and "
                    f"agent.base_url; offline agents: {OFFLINE}.")
        return f.what

    def close(self) -> None:
        try:
            self.api.close()
        except Exception:
            pass


def next_cap(cap: float) -> str:
    return f"{max(cap * 2, cap + 1):g}"
