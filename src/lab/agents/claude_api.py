"""agent=claude's side of the wire: prices and usage, the model's capabilities, the request options, and
API failures classified by status, `error.type` and `error.details.error_code` (never by message text,
whose wording the SDK documents as unstable).

- Usage: tokens and dollars of a reply or a session (cache writes at their lifetime's price).
- Capabilities: what the model accepts (thinking types, effort levels, strict tools), read once from
  GET /v1/models/<model> (free); unknown when that fails, and then the request stays conservative.
- Options: thinking / effort / strict / tool_choice for the next request, and the ladder that drops
  one optional feature at a time when the API answers 400 to them.
- classify(err): `transient` (retry, then the fallback agent), `stop` (Claude cannot go on in this
  session: spend limit, billing, key, model), `bad_request` (adapt the request), `too_large` (condense).

Usage: opts = Options.choose(cfg, caps); kind, why = classify(err); Usage.of_reply(reply.usage, price, ttl)
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from src.lab.agents.base import AgentStop
from src.lab.config import ClaudeAgentConfig, ClaudePrice

# error.details.error_code of the 429s that no retry fixes: the organization's spend is capped
SPEND_LIMIT_CODES = ("enforced_spend_limit_reached", "contract_spend_limit_reached",
                     "linked_organization_spend_limit_reached")
EFFORTS = ("low", "medium", "high", "xhigh", "max")
THINKING = ("auto", "adaptive", "enabled", "off")


# ---------------------------------------------------------------------------- prices and usage


def price_for(model: str, prices: dict) -> ClaudePrice:
    """The price of `model`: its own entry, or the entry it is a dated snapshot of (claude-x-4-5-20250929)."""
    if model in prices:
        return prices[model]
    for k in prices:
        if re.fullmatch(re.escape(k) + r"[-@]\d{8}(-v\d+(:\d+)?)?", model):
            return prices[k]
    raise AgentStop(f"agent.model={model!r} has no price in agent.prices ({', '.join(sorted(prices)) or 'empty'}), "
                    "so its cost cannot be capped. Add it, in USD per million tokens: "
                    f"'+agent.prices={{{model}: {{input: 3, output: 15, cache_write: 3.75, cache_read: 0.3}}}}' "
                    "(or edit conf/agent_common/claude.yaml)")


def write_price(price: ClaudePrice, ttl: str) -> float:
    """USD per million tokens written to the cache with lifetime `ttl` (1h: 2 x input unless priced)."""
    if ttl == "1h":
        return price.cache_write_1h if price.cache_write_1h is not None else 2.0 * price.input
    return price.cache_write


@dataclass
class Usage:
    """Tokens and dollars of one proposal, or of the whole session."""
    calls: int = 0  # API replies paid for
    input_tokens: int = 0  # uncached input
    output_tokens: int = 0  # thinking included
    cache_creation_input_tokens: int = 0  # input written to the prompt cache (5m: 1.25x input, 1h: 2x)
    cache_creation_1h_input_tokens: int = 0  # ... of which with the 1-hour lifetime
    cache_read_input_tokens: int = 0  # input read from the cache (0.1x input)
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return (self.input_tokens + self.output_tokens + self.cache_creation_input_tokens
                + self.cache_read_input_tokens)

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    @property
    def cache_read_share(self) -> float:
        """Fraction of the input tokens read from the cache (the cache hit rate, by tokens)."""
        return self.cache_read_input_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def add(self, other: "Usage") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @classmethod
    def of_reply(cls, u: Any, price: ClaudePrice, ttl: str = "5m") -> "Usage":
        """From the API's `usage` (missing fields count as 0). Cache writes are priced by the lifetime the API
        reports (usage.cache_creation), else by the lifetime the request asked for."""
        get = lambda o, k: int(getattr(o, k, 0) or 0) if not isinstance(o, dict) else int(o.get(k) or 0)  # noqa: E731
        n = cls(calls=1, input_tokens=get(u, "input_tokens"), output_tokens=get(u, "output_tokens"),
                cache_creation_input_tokens=get(u, "cache_creation_input_tokens"),
                cache_read_input_tokens=get(u, "cache_read_input_tokens"))
        split = getattr(u, "cache_creation", None) if not isinstance(u, dict) else u.get("cache_creation")
        if split is not None:
            n.cache_creation_1h_input_tokens = get(split, "ephemeral_1h_input_tokens")
        elif ttl == "1h":
            n.cache_creation_1h_input_tokens = n.cache_creation_input_tokens
        w5 = n.cache_creation_input_tokens - n.cache_creation_1h_input_tokens
        n.cost_usd = (n.input_tokens * price.input + n.output_tokens * price.output + w5 * price.cache_write
                      + n.cache_creation_1h_input_tokens * write_price(price, "1h")
                      + n.cache_read_input_tokens * price.cache_read) / 1e6
        return n

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Usage":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{k}": float(v) for k, v in self.to_dict().items()} | {
            f"{prefix}/tokens": float(self.tokens), f"{prefix}/cache_read_share": self.cache_read_share}

    def line(self) -> str:
        cached = f" ({self.cache_read_input_tokens:,} cached)" if self.cache_read_input_tokens else ""
        return (f"{self.calls} call{'s' if self.calls != 1 else ''}, {self.prompt_tokens:,} in{cached} "
                f"+ {self.output_tokens:,} out tokens, ${self.cost_usd:.4f}")


# ---------------------------------------------------------------------------- what the model accepts


@dataclass
class Capabilities:
    """What the model accepts; `known` False when GET /v1/models/<model> did not say (then stay conservative)."""
    known: bool = False
    thinking_types: tuple[str, ...] = ()  # of adaptive, enabled, disabled
    efforts: tuple[str, ...] = ()
    strict: bool = False
    max_input_tokens: Optional[int] = None

    @classmethod
    def of(cls, info: Any) -> "Capabilities":
        caps = getattr(info, "capabilities", None)
        if caps is None:
            return cls(known=False, max_input_tokens=getattr(info, "max_input_tokens", None))

        def on(obj: Any, name: str) -> bool:
            return bool(getattr(getattr(obj, name, None), "supported", False))

        types = getattr(getattr(caps, "thinking", None), "types", None)
        effort = getattr(caps, "effort", None)
        return cls(known=True,
                   thinking_types=tuple(t for t in ("adaptive", "enabled", "disabled") if on(types, t)),
                   efforts=tuple(e for e in EFFORTS if getattr(effort, "supported", False) and on(effort, e)),
                   strict=on(caps, "structured_outputs"), max_input_tokens=getattr(info, "max_input_tokens", None))


@dataclass
class Options:
    """How the next request asks: thinking, effort, strict schema, tool choice. `dropped` lists what the
    ladder took away after the API refused it (400), for the log and the proposal's meta."""
    thinking: str = "off"  # adaptive | enabled | off
    thinking_budget: int = 0
    effort: Optional[str] = None
    strict: bool = False
    forced: bool = True  # tool_choice forces the tool (never together with thinking)
    dropped: list[str] = field(default_factory=list)

    @classmethod
    def choose(cls, cfg: ClaudeAgentConfig, caps: Capabilities) -> "Options":
        """agent.thinking/effort/strict resolved against what the model accepts."""
        if cfg.thinking not in THINKING:
            raise AgentStop(f"agent.thinking={cfg.thinking!r}; expected one of {', '.join(THINKING)}")
        if cfg.effort is not None and cfg.effort not in EFFORTS:
            raise AgentStop(f"agent.effort={cfg.effort!r}; expected one of {', '.join(EFFORTS)} or null")
        thinking = cfg.thinking
        if thinking == "auto":
            thinking = ("adaptive" if "adaptive" in caps.thinking_types else
                        "enabled" if "enabled" in caps.thinking_types else "off")
        if thinking != "off" and caps.known and thinking not in caps.thinking_types:
            thinking = "off"
        if thinking == "off" and caps.known and caps.thinking_types and "disabled" not in caps.thinking_types:
            thinking = "adaptive" if "adaptive" in caps.thinking_types else "enabled"  # a model that always thinks
        budget = 0
        if thinking == "enabled":  # budget_tokens >= 1024 and < max_tokens (the API's rule)
            budget = max(1024, min(cfg.thinking_budget, cfg.max_tokens - 1024))
            if budget >= cfg.max_tokens:
                thinking, budget = "off", 0
        effort = cfg.effort if cfg.effort in caps.efforts else None
        strict = caps.strict if cfg.strict is None else bool(cfg.strict)
        return cls(thinking=thinking, thinking_budget=budget, effort=effort, strict=strict,
                   forced=cfg.force_tool and thinking == "off")

    def request(self) -> dict:
        """The request's keyword arguments for these options (tool_choice included)."""
        kw: dict[str, Any] = {}
        if self.thinking == "adaptive":
            kw["thinking"] = {"type": "adaptive"}
        elif self.thinking == "enabled":
            kw["thinking"] = {"type": "enabled", "budget_tokens": self.thinking_budget}
        if self.effort:
            kw["output_config"] = {"effort": self.effort}
        # thinking allows only tool_choice auto/none (forced tool use prefills the reply and so skips thinking)
        choice = {"type": "tool", "name": "propose_experiment"} if self.forced and self.thinking == "off" else \
            {"type": "auto"}
        kw["tool_choice"] = {**choice, "disable_parallel_tool_use": True}
        return kw

    def degrade(self) -> Optional[str]:
        """Drop the next optional feature after a 400 the request's content does not explain; None: nothing left."""
        if self.strict:
            self.strict = False
            what = "strict tool schema"
        elif self.effort:
            what, self.effort = f"effort={self.effort}", None
        elif self.thinking != "off":
            what, self.thinking, self.thinking_budget = f"thinking={self.thinking}", "off", 0
        elif self.forced:
            what, self.forced = "forced tool choice", False
        else:
            return None
        self.dropped.append(what)
        return what

    def describe(self) -> str:
        parts = [f"thinking {self.thinking}" + (f" ({self.thinking_budget} tokens)" if self.thinking_budget else "")]
        if self.effort:
            parts.append(f"effort {self.effort}")
        parts.append("strict tool" if self.strict else "tool")
        parts.append("forced" if self.forced and self.thinking == "off" else "tool_choice auto")
        return ", ".join(parts)


# ---------------------------------------------------------------------------- failures


@dataclass
class Failure:
    kind: str  # transient | stop | bad_request | too_large
    what: str  # for people: status, type, code and the API's message
    retry_after: Optional[float] = None  # seconds, from the response's headers


def classify(err: BaseException) -> Failure:
    """An SDK error as what to do about it, from its status, error.type and error.details.error_code."""
    import anthropic

    if isinstance(err, anthropic.APITimeoutError):
        return Failure("transient", "request timed out")
    if isinstance(err, anthropic.APIConnectionError):
        cause = err.__cause__ or err.__context__
        return Failure("transient", f"cannot connect ({type(cause).__name__ if cause else 'connection error'})")
    if not isinstance(err, anthropic.APIStatusError):
        raise err
    status, etype, code = err.status_code, getattr(err, "type", None), getattr(err, "error_code", None)
    msg = (getattr(err, "api_message", None) or "")[:300]
    what = f"HTTP {status} {etype or ''}{f' ({code})' if code else ''}: {msg}".strip()
    if code in SPEND_LIMIT_CODES:
        return Failure("stop", f"the organization's API spend limit is reached ({what})")
    if status == 402 or etype == "billing_error":
        return Failure("stop", f"the account cannot pay for requests ({what})")
    if status in (401, 403, 404) or etype in ("authentication_error", "permission_error", "not_found_error"):
        return Failure("stop", what)
    if status == 413 or etype == "request_too_large":
        return Failure("too_large", what)
    if status in (408, 409, 429) or status >= 500 or etype in ("rate_limit_error", "overloaded_error", "api_error",
                                                                 "timeout_error", "conflict_error"):
        return Failure("transient", what, _retry_after(err))
    return Failure("bad_request", what)


def _retry_after(err: Any) -> Optional[float]:
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            v = headers.get(name)
            if v is not None:
                return max(0.0, float(v) * scale)
        except (TypeError, ValueError):
            continue
    return None
