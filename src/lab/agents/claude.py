"""agent=claude: Claude proposes each experiment as a tool call (forced where the model allows it), on the SDK.

One conversation per session. The `system` prompt is the static prefix (program.md, the
editable files at the best commit, the config it may override), cached with cache_control; each
propose() is a user turn with the fresh state (history table, last failure, margin, budget) and
the outcome of the previous proposal as the tool_result of its tool_use (is_error for a proposal
the loop refused, so the model can correct it; after `fix_attempts` invalid ones in a row it is
told to move on). tool_choice forces `propose_experiment`, so every reply should be a proposal.
Models that always think refuse forced tool use: they get tool_choice auto plus the instruction,
and their thinking blocks are sent back unchanged. Replies that are not a proposal (end_turn
text, max_tokens, refusal, malformed input) are re-asked up to `attempts` times, then the session
pauses. The oldest turns are dropped to fit `context_tokens`.

Accounting: every reply's input/output/cache tokens and cost (agent.prices, USD per million
tokens) go into the proposal's meta (-> proposals/<exp>.json, the MLflow child's agent/*
metrics, the commit message) and into <session>/agent_usage.json, so the caps
(agent.max_cost_usd, agent.max_session_tokens) hold across resumes. A request that could cross a
cap is not sent: the session stops cleanly (AgentStop) and resumes with a higher cap.

The key comes from $ANTHROPIC_API_KEY (agent.api_key_env) only: it is never a config value,
never logged, and the runner strips it from every training process's environment.

Usage: ANTHROPIC_API_KEY=... python -m src.search agent=claude device=mps
       python -m src.search search.tag=nov26 search.resume=true agent=claude agent.max_cost_usd=20
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from src.lab.agents.base import Agent, AgentStop, SearchState
from src.lab.agents.claude_context import (FIELDS, TOOL, TOOL_NAME, estimate_tokens, outcome_text, state_text,
                                       system_text)
from src.lab.config import ClaudeAgentConfig, ClaudePrice
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal

log = logging.getLogger("src.lab.agents.claude")
OFFLINE = ("agent=tpe or agent=random (Optuna over search_space=...), or agent=replay "
           "agent.file=<proposals.yaml>")
USAGE_FILE = "agent_usage.json"


def build(cfg: ClaudeAgentConfig, space) -> "ClaudeAgent":
    return ClaudeAgent(cfg)


# ---------------------------------------------------------------------------- accounting


@dataclass
class Usage:
    """Tokens and dollars of one proposal, or of the whole session."""
    calls: int = 0  # API replies paid for
    input_tokens: int = 0  # uncached input
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0  # input written to the prompt cache (1.25x input price)
    cache_read_input_tokens: int = 0  # input read from the cache (0.1x input price)
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return (self.input_tokens + self.output_tokens + self.cache_creation_input_tokens
                + self.cache_read_input_tokens)

    def add(self, other: "Usage") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @classmethod
    def of_reply(cls, u: Any, price: ClaudePrice) -> "Usage":
        """From the API's `usage` (missing cache fields count as 0)."""
        n = cls(calls=1, input_tokens=int(getattr(u, "input_tokens", 0) or 0),
                output_tokens=int(getattr(u, "output_tokens", 0) or 0),
                cache_creation_input_tokens=int(getattr(u, "cache_creation_input_tokens", 0) or 0),
                cache_read_input_tokens=int(getattr(u, "cache_read_input_tokens", 0) or 0))
        n.cost_usd = (n.input_tokens * price.input + n.output_tokens * price.output
                      + n.cache_creation_input_tokens * price.cache_write
                      + n.cache_read_input_tokens * price.cache_read) / 1e6
        return n

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Usage":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{k}": float(v) for k, v in self.to_dict().items()} | {f"{prefix}/tokens": float(self.tokens)}

    def line(self) -> str:
        cached = f" ({self.cache_read_input_tokens:,} cached)" if self.cache_read_input_tokens else ""
        return (f"{self.calls} call{'s' if self.calls != 1 else ''}, "
                f"{self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens:,} in{cached} "
                f"+ {self.output_tokens:,} out tokens, ${self.cost_usd:.4f}")


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
                    "(or edit conf/agent/claude.yaml)")


# ---------------------------------------------------------------------------- the conversation


@dataclass
class Turn:
    role: str  # user | assistant
    blocks: list[dict]  # API content blocks (tool_result blocks first in a user turn)
    episode: int  # which propose() it belongs to
    state: str = ""  # user turns opening an episode: the full state (sent only for the latest episode)


def _reply_blocks(content: list) -> list[dict]:
    """The assistant's reply as request blocks: thinking (sent back unchanged, as the API requires with tool
    use), text and tool_use; anything else is dropped."""
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


def parse_input(data: Any) -> Proposal:
    """The tool call's input as a Proposal, or InvalidProposal saying what is malformed."""
    if not isinstance(data, dict):
        raise InvalidProposal(f"the input must be an object with {sorted(FIELDS)}; got {type(data).__name__}")
    unknown = set(data) - FIELDS
    if unknown:
        raise InvalidProposal(f"unknown field(s) {sorted(unknown)}; the fields are {sorted(FIELDS)}")
    for k in ("description", "hypothesis"):
        if not isinstance(data.get(k), str) or not data[k].strip():
            raise InvalidProposal(f"`{k}` is required and must be a non-empty string")
    ovs = data.get("overrides", [])
    if not isinstance(ovs, list) or not all(isinstance(o, str) and o.strip() for o in ovs):
        raise InvalidProposal(f"`overrides` must be a list of 'key=value' strings; got {json.dumps(ovs)[:200]}")
    patch = data.get("patch")
    if patch is not None and not isinstance(patch, str):
        raise InvalidProposal("`patch` must be one string holding a unified diff")
    if not ovs and not (patch or "").strip():
        raise InvalidProposal("the proposal has neither overrides nor a patch; give at least one")
    return Proposal.from_dict({k: v for k, v in data.items() if k in FIELDS})


class _TooLong(Exception):
    """The API said the prompt is too long: condense harder and ask again."""


class ClaudeAgent(Agent):
    name = "claude"

    def __init__(self, cfg: ClaudeAgentConfig):
        import anthropic

        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise AgentStop(f"agent=claude needs an Anthropic API key in ${cfg.api_key_env}, which is not set. "
                            f"Export it (export {cfg.api_key_env}=sk-ant-...) and start again, or run an offline "
                            f"agent that needs no key: {OFFLINE}.")
        self.price = price_for(cfg.model, dict(cfg.prices))
        for k in ("max_tokens", "context_tokens", "attempts"):
            if getattr(cfg, k) < 1:
                raise AgentStop(f"agent.{k}={getattr(cfg, k)} must be at least 1")
        # the key goes to the SDK only (sent as a request header); base_url None: $ANTHROPIC_BASE_URL or the default
        self.client = anthropic.Anthropic(api_key=key, base_url=cfg.base_url or None, max_retries=cfg.max_retries,
                                          timeout=cfg.timeout_s)
        self.turns: list[Turn] = []
        self.episode = 0
        self.pending_ids: list[str] = []  # tool_use ids the next turn must answer (the accepted one first)
        self.outcomes: dict[str, tuple[str, bool]] = {}  # tool_use id -> (tool_result text, is_error)
        self.fix_streak = 0  # invalid proposals in a row
        self.spent = Usage()  # the whole session, across invocations (agent_usage.json)
        self.proposals = 0
        self.usage_path: Optional[Path] = None
        self.shrink = 1.0  # < 1 after the API said the prompt was too long
        self.forced = cfg.force_tool  # tool_choice forces the tool (until a model refuses forced tool use)
        self._system: tuple[str, str] = ("", "")  # (key, text) of the cached prefix

    # ------------------------------------------------------------------ the loop's hooks
    @property
    def where(self) -> str:
        return str(self.client.base_url).rstrip("/")

    def preflight(self) -> None:
        """Before any training: is the API reachable, the key accepted and the model known? (free request)"""
        if not self.cfg.preflight:
            return
        import anthropic

        try:
            self.client.with_options(max_retries=min(self.cfg.max_retries, 2), timeout=30.0).messages.count_tokens(
                model=self.cfg.model, messages=[{"role": "user", "content": "ping"}])
        except anthropic.APIStatusError as e:
            raise AgentStop(self._status_message(e, "checking the API before the session (agent.preflight)")) from None
        except anthropic.APIConnectionError as e:
            raise AgentStop(f"agent=claude cannot reach the Anthropic API at {self.where} ({_cause(e)}). Check the "
                            "network, $ANTHROPIC_BASE_URL / agent.base_url, or run an offline agent that needs no "
                            f"API: {OFFLINE}.") from None
        log.info("agent=claude: %s answers; model %s, caps $%.2f%s", self.where, self.cfg.model,
                 self.cfg.max_cost_usd, f", {self.cfg.max_session_tokens:,} tokens" if self.cfg.max_session_tokens
                 else "")

    def restore(self, history: list[Experiment], state: SearchState) -> None:
        self._bind(state)
        if self.usage_path.exists():
            try:
                d = json.loads(self.usage_path.read_text())
                self.spent = Usage.from_dict(d.get("session"))
                self.proposals = int(d.get("proposals", 0))
            except (OSError, ValueError) as e:
                log.warning("could not read %s (%s); counting the spend from the ledger", self.usage_path, e)
        if not self.spent.calls:  # no file (or unreadable): what the ledger's proposals recorded
            for e in history:
                meta = e.proposal.meta if e.proposal else {}
                if meta.get("agent") == "claude":
                    self.spent.add(Usage.from_dict(meta.get("usage")))
                    self.proposals += 1
        self.fix_streak = 0
        for e in reversed(history):
            if e.status != "invalid":
                break
            self.fix_streak += 1
        if self.spent.calls:
            log.info("agent=claude: resumed; the session has spent $%.4f (%s tokens) on %d proposals", self.spent.cost_usd,
                     f"{self.spent.tokens:,}", self.proposals)

    def observe(self, e: Experiment, state: SearchState) -> None:
        self.fix_streak = self.fix_streak + 1 if e.status == "invalid" else 0
        tid = (e.proposal.meta.get("tool_use_id") if e.proposal else None) or ""
        if tid in self.pending_ids:
            self.outcomes[tid] = outcome_text(e, self.fix_streak, self.cfg.fix_attempts)

    def usage(self) -> dict[str, float]:
        """Session totals for the parent MLflow run."""
        return self.spent.metrics("agent") | {"agent/proposals": float(self.proposals)}

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ proposing
    def propose(self, state: SearchState) -> Optional[Proposal]:
        self._bind(state)
        cfg = self.cfg
        self._open_episode(state)
        used = Usage()
        problems: list[str] = []
        for attempt in range(1, cfg.attempts + 1):
            system, messages = self._request(state)
            try:
                reply = self._send(system, messages)
            except _TooLong as e:
                self.shrink *= 0.6
                problems.append(f"prompt too long ({e})")
                continue
            u = Usage.of_reply(reply.usage, self.price)
            used.add(u)
            self.spent.add(u)
            self._save()
            stop = reply.stop_reason
            ours = [b for b in reply.content if b.type == "tool_use" and b.name == TOOL_NAME]
            others = [b for b in reply.content if b.type == "tool_use" and b.name != TOOL_NAME]
            if stop == "max_tokens":
                problems.append(f"reply cut at max_tokens={cfg.max_tokens}")
                self._note(f"Your previous reply hit the output limit (max_tokens={cfg.max_tokens}) before the "
                           f"{TOOL_NAME} call was complete. Keep the hypothesis short and the patch small "
                           "(only the changed hunks), and call the tool again.")
                continue
            if stop == "refusal":
                why = getattr(reply.stop_details, "explanation", None) or "no explanation"
                problems.append(f"refusal ({why})")
                self._note("Your previous reply was stopped as a refusal. This is ordinary machine-learning "
                           "research on a small language model trained on public-domain text: propose a "
                           f"hyperparameter or architecture experiment with {TOOL_NAME}.")
                continue
            if stop == "model_context_window_exceeded":
                self.shrink *= 0.6
                problems.append("context window exceeded")
                continue
            if not ours:  # end_turn / stop_sequence / pause_turn without the tool (tool_choice should prevent it)
                words = " ".join(b.text for b in reply.content if b.type == "text").strip()
                problems.append(f"{stop} without a {TOOL_NAME} call" + (f" ('{words[:80]}')" if words else ""))
                blocks = _reply_blocks(reply.content)
                answer = [{"type": "tool_result", "tool_use_id": b.id, "is_error": True,
                           "content": f"unknown tool {b.name}; only {TOOL_NAME} exists"} for b in others]
                text = (f"Answer only by calling {TOOL_NAME} with description, hypothesis and overrides and/or "
                        "patch; nothing is run until you do.")
                if blocks:
                    self.turns.append(Turn("assistant", blocks, self.episode))
                    self.turns.append(Turn("user", answer + [{"type": "text", "text": text}], self.episode))
                else:
                    self._note(text)
                continue
            call = ours[0]
            self.turns.append(Turn("assistant", _reply_blocks(reply.content), self.episode))
            extra = [b.id for b in reply.content if b.type == "tool_use" and b.id != call.id]
            for i in extra:
                self.outcomes[i] = (f"ignored: one {TOOL_NAME} call per turn; only the first was taken", True)
            try:
                proposal = parse_input(call.input)
            except InvalidProposal as e:
                problems.append(f"malformed tool input ({e})")
                self.turns.append(Turn("user", [{"type": "tool_result", "tool_use_id": call.id, "is_error": True,
                                                 "content": f"Malformed {TOOL_NAME} input: {e}. Nothing was run; "
                                                            "call the tool again with valid input."}]
                                       + self._results(extra), self.episode))
                continue
            for i in self.pending_ids:  # answered in this episode's first turn
                self.outcomes.pop(i, None)
            self.pending_ids = [call.id, *extra]
            self.proposals += 1
            self._save()
            proposal.meta = {"agent": "claude", "model": cfg.model, "tool_use_id": call.id,
                             "attempts": attempt, "usage": used.to_dict(),
                             "session_cost_usd": round(self.spent.cost_usd, 6),
                             "metrics": used.metrics("agent") | {"agent/attempts": float(attempt),
                                                                 "agent/session_cost_usd": self.spent.cost_usd,
                                                                 "agent/session_tokens": float(self.spent.tokens)},
                             "commit_note": f"{cfg.model}: {used.line()}; session ${self.spent.cost_usd:.4f}",
                             **({"problems": problems} if problems else {})}
            log.info("agent=claude: %s (%s; session $%.4f of $%.2f)", proposal.description[:100], used.line(),
                     self.spent.cost_usd, cfg.max_cost_usd)
            return proposal
        raise AgentStop(f"agent=claude: no usable proposal after {cfg.attempts} replies ({'; '.join(problems)}); "
                        f"${used.cost_usd:.4f} spent on them. The session is paused and resumable: "
                        f"{self._resume_cmd(state)} (agent.attempts raises the number of tries).")

    # ------------------------------------------------------------------ conversation plumbing
    def _bind(self, state: SearchState) -> None:
        if self.usage_path is None:
            self.session_dir = Path(getattr(state, "session_dir", None) or Path(state.worktree).parent)
            self.usage_path = self.session_dir / USAGE_FILE

    def _results(self, ids: list[str]) -> list[dict]:
        """tool_result blocks answering `ids` (kept until a proposal succeeds: a failed episode is re-sent)."""
        out = []
        for i in ids:
            text, err = self.outcomes.get(i, ("no outcome was recorded for this proposal (see the history table)",
                                             False))
            out.append({"type": "tool_result", "tool_use_id": i, "content": text, **({"is_error": True} if err else {})})
        return out

    def _open_episode(self, state: SearchState) -> None:
        """A new user turn: the outcome of the last proposal (tool_result) and the fresh state."""
        if self.turns and self.turns[-1].role == "user":  # an earlier propose() gave up: drop its unanswered turns
            self.turns = [t for t in self.turns if t.episode != self.episode]
        self.episode += 1
        self.turns.append(Turn("user", self._results(self.pending_ids), self.episode, state="(state)"))
        self._state = state

    def _note(self, text: str) -> None:
        """Add an instruction to the pending (last, user) turn."""
        self.turns[-1].blocks.append({"type": "text", "text": text})

    def _system_text(self, state: SearchState) -> str:
        program = self._program(state)
        key = f"{state.best.commit}|{hash(program)}"
        if self._system[0] != key:
            self._system = (key, system_text(program, state))
        return self._system[1]

    def _program(self, state: SearchState) -> str:
        """agent.program: absolute, relative to the cwd (your checkout), else the session's worktree copy."""
        p = Path(self.cfg.program).expanduser()
        for cand in ([p] if p.is_absolute() else [Path.cwd() / p, Path(state.worktree) / p]):
            if cand.is_file():
                return cand.read_text()
        raise AgentStop(f"agent.program={self.cfg.program}: no such file (looked in {Path.cwd()} and "
                        f"{state.worktree}); it holds the research strategy the model follows (see program.md)")

    def _request(self, state: SearchState) -> tuple[list[dict], list[dict]]:
        """system blocks and messages fitted to context_tokens (oldest episodes dropped first)."""
        cfg, cpt = self.cfg, self.cfg.chars_per_token
        text = self._system_text(state)
        system = [{"type": "text", "text": text, **({"cache_control": {"type": "ephemeral"}} if cfg.cache else {})}]
        budget = int(cfg.context_tokens * self.shrink)
        fixed = estimate_tokens(text, cpt) + estimate_tokens([TOOL], cpt)
        latest = [t for t in self.turns if t.episode == self.episode]
        room = budget - fixed - sum(estimate_tokens(t.blocks, cpt) for t in latest) - 500
        if room < 2000:
            log.warning("agent.context_tokens=%d leaves %d tokens for the state after the prefix (~%d tokens: "
                        "program.md, the editable files, the config); raise it", budget, room, fixed)
        history_chars = max(1500, int(room * cpt * 0.5))  # at most half the room: the rest keeps recent turns
        st = state_text(state, self.spent.cost_usd, cfg.max_cost_usd, history_chars,
                        self.session_dir / "runs", cfg.log_tail_chars)
        # the newest episodes that fit (the latest always), oldest dropped first
        episodes = sorted({t.episode for t in self.turns})
        used = fixed + estimate_tokens(st, cpt) + sum(estimate_tokens(t.blocks, cpt) for t in latest)
        keep = {self.episode}
        for ep in reversed(episodes[:-1]):
            size = sum(estimate_tokens(t.blocks, cpt) + 20 for t in self.turns if t.episode == ep)
            if used + size > budget:
                break
            used += size
            keep.add(ep)
        turns = [t for t in self.turns if t.episode in keep]
        messages: list[dict] = []
        seen_ids: set[str] = set()
        for i, t in enumerate(turns):
            blocks = [dict(b) for b in t.blocks]
            if t.role == "assistant":
                seen_ids |= {b["id"] for b in blocks if b["type"] == "tool_use"}
            else:
                # a tool_result whose tool_use was dropped with its episode becomes plain text
                blocks = [b if b["type"] != "tool_result" or b["tool_use_id"] in seen_ids else
                          {"type": "text", "text": f"(Outcome of an earlier proposal) {b['content']}"} for b in blocks]
                if t.state:
                    blocks.append({"type": "text", "text": st if t.episode == self.episode else
                                   "(The state at that time is omitted; the latest state is in the last turn.)"})
                blocks = [b for b in blocks if b["type"] == "tool_result"] + [b for b in blocks if b["type"] != "tool_result"]
            messages.append({"role": t.role, "content": blocks})
        return system, messages

    def _projected(self, system: list[dict], messages: list[dict]) -> tuple[int, float]:
        """Worst case for the next request: estimated input (all of it written to the cache) + max_tokens out."""
        n_in = estimate_tokens(system, self.cfg.chars_per_token) + estimate_tokens([TOOL], self.cfg.chars_per_token) \
            + estimate_tokens(messages, self.cfg.chars_per_token)
        cost = (n_in * max(self.price.input, self.price.cache_write) + self.cfg.max_tokens * self.price.output) / 1e6
        return n_in + self.cfg.max_tokens, cost

    def _check_caps(self, system: list[dict], messages: list[dict]) -> None:
        cfg, s = self.cfg, self.spent
        tokens, cost = self._projected(system, messages)
        state = self._state
        if s.cost_usd + cost > cfg.max_cost_usd:
            raise AgentStop(f"agent=claude: the session has spent ${s.cost_usd:.4f}; the next request could cost up to "
                            f"${cost:.4f}, which would cross agent.max_cost_usd=${cfg.max_cost_usd:.2f}. The session "
                            f"is paused and resumable with a higher cap: {self._resume_cmd(state)} "
                            f"agent.max_cost_usd={_next_cap(cfg.max_cost_usd)}")
        if cfg.max_session_tokens and s.tokens + tokens > cfg.max_session_tokens:
            raise AgentStop(f"agent=claude: the session has used {s.tokens:,} tokens; the next request could use "
                            f"{tokens:,} more, crossing agent.max_session_tokens={cfg.max_session_tokens:,}. The "
                            f"session is paused and resumable with a higher cap: {self._resume_cmd(state)} "
                            f"agent.max_session_tokens={2 * cfg.max_session_tokens}")

    def _send(self, system: list[dict], messages: list[dict]):
        """One reply; the SDK retries 408/409/429/5xx itself, and this retries those for agent.patience_s more."""
        import anthropic

        cfg = self.cfg
        first_failure: Optional[float] = None
        wait = cfg.retry_wait_s
        while True:
            self._check_caps(system, messages)
            choice = ({"type": "tool", "name": TOOL_NAME} if self.forced else {"type": "auto"})
            try:
                return self.client.messages.create(
                    model=cfg.model, max_tokens=cfg.max_tokens, system=system, tools=[TOOL],
                    tool_choice={**choice, "disable_parallel_tool_use": True}, messages=messages)
            except anthropic.APIStatusError as e:
                if e.status_code in (400, 413) and _too_long(e):
                    raise _TooLong(_api_message(e)) from None
                if e.status_code == 400 and self.forced and _no_forced_tools(e):
                    # models that always think (claude-sonnet-5-5, ...) refuse a forced tool: let the model
                    # choose (tool_choice auto); a reply without the tool call is re-asked
                    log.warning("agent=claude: %s refuses forced tool use (%s); using tool_choice auto for this "
                                "session", cfg.model, _api_message(e))
                    self.forced = False
                    continue
                if e.status_code < 500 and e.status_code not in (408, 409, 429):
                    raise AgentStop(self._status_message(e, "asking for a proposal")) from None
                problem = f"HTTP {e.status_code} {_api_message(e)}"
            except anthropic.APIConnectionError as e:
                problem = f"cannot connect ({_cause(e)})"
            now = time.monotonic()
            first_failure = first_failure or now
            left = cfg.patience_s - (now - first_failure)
            if left <= 0:
                raise AgentStop(f"agent=claude: the API at {self.where} kept failing after the SDK's "
                                f"{cfg.max_retries} retries per request and {cfg.patience_s:.0f} s of patience "
                                f"(last: {problem}). The session is paused and resumable once it answers again: "
                                f"{self._resume_cmd(self._state)}") from None
            log.warning("agent=claude: %s after %d SDK retries; trying again in %.0f s (pausing after %.0f s more)",
                        problem, cfg.max_retries, min(wait, left), left)
            time.sleep(min(wait, left))
            wait = min(wait * 2, 300.0)

    def _status_message(self, e, doing: str) -> str:
        msg = _api_message(e)
        if e.status_code == 401:
            return (f"agent=claude: the API at {self.where} rejected the key in ${self.cfg.api_key_env} (401: {msg}). "
                    f"Set a valid key, or run an offline agent that needs no key: {OFFLINE}.")
        if e.status_code == 403:
            return (f"agent=claude: the key in ${self.cfg.api_key_env} may not use {self.cfg.model} (403: {msg}). "
                    f"Pick another agent.model, or an offline agent: {OFFLINE}.")
        if e.status_code == 404:
            return (f"agent=claude: {self.where} does not know model {self.cfg.model!r} or the endpoint (404: {msg}). "
                    f"Check agent.model and agent.base_url; offline agents: {OFFLINE}.")
        if e.status_code == 402:
            return (f"agent=claude: the account behind ${self.cfg.api_key_env} cannot pay for requests (402: {msg}). "
                    f"Add credit, then resume: {self._resume_cmd(getattr(self, '_state', None))}")
        return (f"agent=claude: the API refused the request while {doing} (HTTP {e.status_code}: {msg}). "
                f"The session is paused and resumable: {self._resume_cmd(getattr(self, '_state', None))}")

    @staticmethod
    def _resume_cmd(state: Optional[SearchState]) -> str:
        tag = state.tag if state is not None else "<tag>"
        return f"python -m src.search search.tag={tag} search.resume=true agent=claude"

    def _save(self) -> None:
        """The session's spend, next to its ledger (temp file + rename)."""
        if self.usage_path is None:
            return
        from src.lab.session import atomic_write

        atomic_write(self.usage_path, json.dumps({"agent": "claude", "model": self.cfg.model,
                                                   "proposals": self.proposals, "session": self.spent.to_dict(),
                                                   "max_cost_usd": self.cfg.max_cost_usd,
                                                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))


def _api_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error") if isinstance(body.get("error"), dict) else body
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    return str(getattr(e, "message", e))[:300]


def _no_forced_tools(e) -> bool:
    m = _api_message(e).lower()
    return "tool_choice" in m or "forced tool" in m or "forces tool" in m


def _too_long(e) -> bool:
    m = _api_message(e).lower()
    return "too long" in m or "too large" in m or "context" in m and "exceed" in m


def _cause(e: BaseException) -> str:
    c = e.__cause__ or e.__context__
    return f"{type(c).__name__}: {c}"[:200] if c else str(e)[:200]


def _next_cap(cap: float) -> str:
    return f"{max(cap * 2, cap + 1):g}"
