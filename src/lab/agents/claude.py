"""agent=claude: Claude proposes each experiment as a tool call, after reasoning, and keeps a research journal.

One conversation per session (src/lab/agents/claude_conversation.py), saved in the session directory
so a resume continues it. The `system` prompt is the static prefix (program.md, the editable files at
the best commit, the config it may override); each turn appends the outcome of the last proposal (the
tool_result of its tool_use) and every other ledger row since, and ends with a dashboard that is not
kept (src/lab/agents/claude_context.py). The model reasons first: adaptive or extended thinking where
it supports it (then tool_choice is auto: the API does not allow thinking with a forced tool), else an
`analysis` field that comes first in a forced tool call; strict tool schemas and an effort level where
the model takes them (read from GET /v1/models/<model>; src/lab/agents/claude_api.py). Each proposal
also carries `learned` and `next_ideas`: the research journal, shown every turn and written to
<session>/journal.md.

Never idle: while the API is down, rate-limited, refusing or unusable, the offline `agent.fallback`
(TPE by default) proposes, so the device keeps training; Claude is asked again after `probe_s` (doubling
while it keeps failing) and takes over when it answers. Such rows say who proposed them (the ledger's
`agent` column, proposals/<exp>.json). Failures are classified by status, type and error code: a spend
limit, a billing problem, a rejected key or unknown model stop Claude for the session (the fallback goes
on); transient ones (429, 5xx, 529, timeouts) are retried briefly. A refusal is answered by rephrasing,
then by dropping the refused turn (a fresh conversation from the digest), then by the fallback.
agent.fallback=none restores the old behaviour: the session pauses, resumable.

Accounting: every reply's tokens and cost (agent.prices; 1-hour cache writes at 2x input) go into the
proposal's meta (-> proposals/<exp>.json, MLflow agent/* metrics, the commit message) and into
<session>/agent_usage.json with the session's cache-read share and cost per proposal, so the caps
(agent.max_cost_usd, agent.max_session_tokens) hold across resumes.

The key comes from $ANTHROPIC_API_KEY (agent.api_key_env) only: it is never a config value, never
logged, and the runner strips it from every training process's environment.

Usage: ANTHROPIC_API_KEY=... python -m src.search agent=claude device=mps
       python -m src.search search.tag=nov26 search.resume=true agent=claude agent.max_cost_usd=20
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from src.lab.agents.base import Agent, AgentStop, SearchState
from src.lab.agents.claude_api import Capabilities, Options, Usage, classify, price_for, write_price
from src.lab.agents.claude_context import (FIELDS, TOOL_NAME, Extras, LossCurves, dashboard, digest_text,
                                           editable_files, estimate_tokens, journal_markdown, new_rows_text,
                                           outcome_text, system_text, tool_schema)
from src.lab.agents.claude_conversation import Conversation, reply_blocks
from src.lab.config import ClaudeAgentConfig, OptunaAgentConfig, ReplayAgentConfig
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal

log = logging.getLogger("src.lab.agents.claude")
OFFLINE = ("agent=tpe or agent=random (Optuna over search_space=...), or agent=replay "
           "agent.file=<proposals.yaml>")
USAGE_FILE = "agent_usage.json"
CONVERSATION_FILE = "claude_conversation.json"
JOURNAL_FILE = "journal.md"
FALLBACKS = ("tpe", "random", "replay", "none")
ONE_HOUR_AFTER_S = 270.0  # a 5-minute cache entry would expire before the next request (with room for the request)
REPHRASE = ("Note: your previous reply to this turn was stopped as a refusal. This is ordinary machine-learning "
            "research: tuning the hyperparameters and code of a small GPT trained for a few minutes on public-domain "
            "text, to lower its validation loss. Propose one such experiment with propose_experiment.")
CUT = ("Your previous reply hit the output limit (max_tokens) before the propose_experiment call was complete. "
       "Think briefly, keep the hypothesis short and the patch small (only the changed hunks), and call the tool.")
REMIND = ("Answer only by calling propose_experiment (description, hypothesis, learned, next_ideas, and overrides "
          "and/or a patch); nothing is run until you do.")


def build(cfg: ClaudeAgentConfig, space) -> "ClaudeAgent":
    return ClaudeAgent(cfg, space)


def parse_input(data: Any) -> Proposal:
    """The tool call's input as a Proposal (analysis, learned and next_ideas in its meta), or InvalidProposal
    saying what is malformed."""
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
    ideas = data.get("next_ideas") or []
    if isinstance(ideas, str):
        ideas = [ideas]
    if not isinstance(ideas, list):
        raise InvalidProposal("`next_ideas` must be a list of short strings")
    p = Proposal.from_dict({"description": data["description"], "hypothesis": data["hypothesis"],
                            "overrides": ovs, "patch": patch if (patch or "").strip() else None})
    p.meta = {"learned": str(data.get("learned") or "").strip()[:2000],
              "next_ideas": [str(i).strip()[:500] for i in ideas if str(i).strip()][:12]}
    if str(data.get("analysis") or "").strip():
        p.meta["analysis"] = str(data["analysis"]).strip()[:4000]
    return p


class _Unavailable(Exception):
    """Claude cannot answer this proposal now (API down, rate-limited, refusing, no usable reply): the
    fallback proposes it, and Claude is asked again later."""


class _Stopped(Exception):
    """Claude cannot go on in this session (cost cap, spend limit, billing, key, model): the fallback goes on."""


class ClaudeAgent(Agent):
    name = "claude"

    def __init__(self, cfg: ClaudeAgentConfig, space=None):
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
        if cfg.fallback not in FALLBACKS:
            raise AgentStop(f"agent.fallback={cfg.fallback!r}; expected one of {', '.join(FALLBACKS)}")
        if cfg.cache_ttl not in ("auto", "5m", "1h"):
            raise AgentStop(f"agent.cache_ttl={cfg.cache_ttl!r}; expected auto, 5m or 1h")
        # retries are ours (classified first: a spend-limit 429 is never retried); the key goes to the SDK only
        self.client = anthropic.Anthropic(api_key=key, base_url=cfg.base_url or None, max_retries=0,
                                          timeout=anthropic.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s)))
        self.space = space
        self.fallback: Optional[Agent] = self._build_fallback()
        self.caps: Optional[Capabilities] = None
        self.opts: Optional[Options] = None
        self.conv = Conversation()
        self.spent = Usage()  # the whole session, across invocations (agent_usage.json)
        self.proposals = 0  # by Claude, this session
        self.fallback_proposals = 0
        self.stopped = ""  # why Claude is done for this invocation ("" while it may be asked)
        self.down_reason = ""  # the last failure, while Claude is unavailable
        self.retry_at = 0.0  # time.monotonic() before which the fallback proposes without asking Claude
        self.probe_wait = cfg.probe_s
        self.shrink = 1.0  # < 1 after the API said the request was too large
        self.gaps: list[float] = []  # seconds between the starts of consecutive requests
        self.last_request = 0.0
        self.session_dir: Optional[Path] = None
        self.usage_path: Optional[Path] = None
        self.curves: Optional[LossCurves] = None
        self._state: Optional[SearchState] = None
        self._static: tuple[str, str] = ("", "")  # (key, text) of the system prompt
        self._staged: tuple[list[dict], list[str]] = ([], [])  # the user turn being asked, and the rows it shows

    # ------------------------------------------------------------------ the loop's hooks
    @property
    def where(self) -> str:
        return str(self.client.base_url).rstrip("/")

    def preflight(self) -> None:
        """Before any training: is the key accepted and the model known (free count_tokens request), and what does
        the model accept (GET /v1/models/<model>, free)? An API that does not answer now is left to the fallback."""
        if not self.cfg.preflight:
            return
        import anthropic

        try:
            self.client.with_options(timeout=30.0).messages.count_tokens(
                model=self.cfg.model, messages=[{"role": "user", "content": "ping"}])
        except (anthropic.APIStatusError, anthropic.APIConnectionError) as err:
            f = classify(err)
            if f.kind == "stop":
                raise AgentStop(self._stop_message(err)) from None
            if self.fallback is None:
                raise AgentStop(f"agent=claude cannot reach the Anthropic API at {self.where} ({f.what}). Check the "
                                "network, $ANTHROPIC_BASE_URL / agent.base_url, or run an offline agent that needs "
                                f"no API: {OFFLINE}.") from None
            log.warning("agent=claude: the API at %s does not answer now (%s); the session starts anyway: agent.fallback"
                        "=%s proposes until Claude answers", self.where, f.what, self.cfg.fallback)
            return
        self._capabilities()
        log.info("agent=claude: %s answers; model %s (%s), caps $%.2f%s", self.where, self.cfg.model,
                 self.options().describe(), self.cfg.max_cost_usd,
                 f", {self.cfg.max_session_tokens:,} tokens" if self.cfg.max_session_tokens else "")

    def restore(self, history: list[Experiment], state: SearchState) -> None:
        self._bind(state)
        if self.usage_path.exists():
            try:
                d = json.loads(self.usage_path.read_text())
                self.spent = Usage.from_dict(d.get("session"))
                self.proposals = int(d.get("proposals", 0))
                self.fallback_proposals = int(d.get("fallback_proposals", 0))
            except (OSError, ValueError) as e:
                log.warning("could not read %s (%s); counting the spend from the ledger", self.usage_path, e)
        if not self.spent.calls:  # no file (or unreadable): what the ledger's proposals recorded
            for e in history:
                meta = e.proposal.meta if e.proposal else {}
                if meta.get("agent") == "claude":
                    self.spent.add(Usage.from_dict(meta.get("usage")))
                    self.proposals += 1
        if self.fallback is not None:
            from src.lab.agents.space import check_space

            if self.cfg.fallback in ("tpe", "random"):  # a broken space fails now, not in the middle of an outage
                check_space(self.space, state.override_roots)
            self.fallback.restore(history, state)
        if self.spent.calls:
            log.info("agent=claude: resumed; the session has spent $%.4f (%s tokens) on %d proposals; the conversation "
                     "has %d turns", self.spent.cost_usd, f"{self.spent.tokens:,}", self.proposals, len(self.conv.turns))
        self._write_journal(state)

    def observe(self, e: Experiment, state: SearchState) -> None:
        self._bind(state)
        if self.fallback is not None:
            self.fallback.observe(e, state)
        self._write_journal(state)

    def usage(self) -> dict[str, float]:
        """Session totals for the parent MLflow run: tokens, cost, cache-read share, cost per proposal and per
        experiment run (by any agent: the fallback's cost nothing)."""
        ran = sum(1 for e in self._state.history if e.counted) if self._state is not None else 0
        return self.spent.metrics("agent") | {
            "agent/proposals": float(self.proposals), "agent/fallback_proposals": float(self.fallback_proposals),
            "agent/cost_per_proposal": self.spent.cost_usd / self.proposals if self.proposals else 0.0,
            "agent/cost_per_experiment": self.spent.cost_usd / ran if ran else 0.0}

    def close(self) -> None:
        if self.spent.calls:
            log.info("agent=claude: %s; cache-read share %.0f%% of input tokens; %d proposals by Claude ($%.4f each), "
                     "%d by the fallback%s", self.spent.line(), 100 * self.spent.cache_read_share, self.proposals,
                     self.spent.cost_usd / max(1, self.proposals), self.fallback_proposals,
                     f"; Claude stopped: {self.stopped}" if self.stopped else "")
        try:
            self.client.close()
        except Exception:
            pass
        if self.fallback is not None:
            self.fallback.close()

    # ------------------------------------------------------------------ proposing
    def propose(self, state: SearchState) -> Optional[Proposal]:
        self._bind(state)
        if self.stopped:
            return self._fall_back(state, self.stopped)
        if time.monotonic() < self.retry_at:
            return self._fall_back(state, f"{self.down_reason}; Claude is asked again in "
                                          f"{self.retry_at - time.monotonic():.0f} s")
        try:
            p = self._ask(state)
        except _Stopped as s:
            self.stopped = str(s)
            log.warning("agent=claude: Claude stops for this session: %s", s)
            self._save()
            return self._fall_back(state, self.stopped)
        except _Unavailable as u:
            self.down_reason = str(u)
            self.retry_at = time.monotonic() + self.probe_wait
            log.warning("agent=claude: %s; agent.fallback=%s proposes, Claude is asked again in %.0f s",
                        u, self.cfg.fallback, self.probe_wait)
            self.probe_wait = min(self.probe_wait * 2, self.cfg.probe_max_s)
            return self._fall_back(state, self.down_reason)
        if self.down_reason:
            log.info("agent=claude: Claude answers again; it proposes from here on")
        self.down_reason, self.probe_wait = "", self.cfg.probe_s
        return p

    def _fall_back(self, state: SearchState, reason: str) -> Optional[Proposal]:
        """The fallback agent's proposal, marked as such; without one, the session pauses (resumable)."""
        if self.fallback is None:
            raise AgentStop(f"agent=claude: {reason}. The session is paused and resumable: {self._resume_cmd(state)}")
        p = self.fallback.propose(state)
        if p is None:
            return None
        p.meta.update({"proposed_by": self.fallback.name, "fallback_for": "claude", "fallback_reason": reason[:500]})
        self.fallback_proposals += 1
        self._save()
        return p

    def _ask(self, state: SearchState) -> Proposal:
        """Claude's proposal: up to agent.attempts replies (re-asked after a cut, a refusal, a reply without the
        tool call or malformed input); raises _Unavailable or _Stopped."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.patience_s
        used, problems = Usage(), []
        notes: list[str] = []
        plain, refusals = False, 0
        for attempt in range(1, cfg.attempts + 1):
            reply = self._send(lambda: self._request(state, notes, plain), deadline)
            u = Usage.of_reply(reply.usage, self.price, self.conv.ttl)
            used.add(u)
            self.spent.add(u)
            self._save()
            user, seen = self._staged
            stop = reply.stop_reason
            if stop == "refusal":
                details = getattr(reply, "stop_details", None)
                why = getattr(details, "category", None) or getattr(details, "explanation", None) or "no category"
                problems.append(f"refusal ({why})")
                refusals += 1
                plain, notes = True, [REPHRASE]  # 1st: rephrase this turn (plain state, a note)
                if refusals >= 2:  # 2nd: drop the refused turn, as the docs advise: a fresh conversation from the digest
                    self.conv.reset("a refused turn was dropped")
                continue
            if stop == "max_tokens":
                problems.append(f"reply cut at max_tokens={cfg.max_tokens}")
                notes = [CUT]
                continue
            if stop == "model_context_window_exceeded":
                problems.append("context window exceeded")
                self.shrink *= 0.7
                self.conv.reset("the context window was exceeded")
                continue
            blocks = reply_blocks(reply.content)
            ours = [b for b in reply.content if b.type == "tool_use" and b.name == TOOL_NAME]
            if not ours:  # end_turn / pause_turn without the tool (possible under tool_choice auto)
                words = " ".join(b.text for b in reply.content if b.type == "text").strip()
                problems.append(f"{stop} without a {TOOL_NAME} call" + (f" ('{words[:80]}')" if words else ""))
                if blocks:
                    self.conv.commit(user, blocks, seen)
                    for b in reply.content:
                        if b.type == "tool_use":
                            self.conv.results[b.id] = [f"unknown tool {b.name}; only {TOOL_NAME} exists", True]
                    self.conv.carry = [REMIND]
                    self.conv.save()
                else:
                    notes = [REMIND]
                continue
            call = ours[0]
            self.conv.commit(user, blocks, seen)
            for b in reply.content:
                if b.type == "tool_use" and b.id != call.id:
                    self.conv.results[b.id] = [f"ignored: one {TOOL_NAME} call per turn; only the first was taken", True]
            try:
                proposal = parse_input(call.input)
            except InvalidProposal as e:
                problems.append(f"malformed tool input ({e})")
                self.conv.results[call.id] = [f"Malformed {TOOL_NAME} input: {e}. Nothing was run; call the tool "
                                              "again with valid input.", True]
                self.conv.save()
                notes = []
                continue
            self.proposals += 1
            self._save()
            proposal.meta.update({
                "agent": "claude", "proposed_by": "claude", "model": cfg.model, "tool_use_id": call.id,
                "attempts": attempt, "reasoning": self.options().describe(), "usage": used.to_dict(),
                "session_cost_usd": round(self.spent.cost_usd, 6),
                "metrics": used.metrics("agent") | {"agent/attempts": float(attempt),
                                                    "agent/session_cost_usd": self.spent.cost_usd,
                                                    "agent/session_tokens": float(self.spent.tokens),
                                                    "agent/session_cache_read_share": self.spent.cache_read_share},
                "commit_note": f"{cfg.model}: {used.line()}; session ${self.spent.cost_usd:.4f}",
                **({"problems": problems} if problems else {})})
            log.info("agent=claude: %s (%s; session $%.4f of $%.2f, cache-read share %.0f%%)",
                     proposal.description[:100], used.line(), self.spent.cost_usd, cfg.max_cost_usd,
                     100 * self.spent.cache_read_share)
            return proposal
        raise _Unavailable(f"no usable proposal after {cfg.attempts} replies ({'; '.join(problems)}); "
                           f"${used.cost_usd:.4f} spent on them")

    # ------------------------------------------------------------------ the request
    def _request(self, state: SearchState, notes: list[str], plain: bool) -> dict:
        """The next request (the staged user turn in self._staged), fitted to agent.context_tokens."""
        cfg, cpt, opts = self.cfg, self.cfg.chars_per_token, self.options()
        tool = tool_schema(analysis=opts.thinking == "off", strict=opts.strict)
        text = self._system_text(state)
        key = hashlib.sha256((text + json.dumps(tool, sort_keys=True) + json.dumps(opts.request(),
                                                                                    sort_keys=True)).encode()).hexdigest()
        budget = int(cfg.context_tokens * self.shrink)
        # sizes as sent (JSON: escaped newlines and quotes count), plus message wrappers and cache markers
        fixed = estimate_tokens([{"type": "text", "text": text}, tool], cpt) + 100
        if self.conv.turns and self.conv.static_key != key and self.conv.tokens(cpt) > 0.25 * (budget - fixed):
            self.conv.reset("the static prefix changed: every cached turn would be written again anyway")
        self.conv.static_key = key
        extras = Extras(spent_usd=self.spent.cost_usd, cap_usd=cfg.max_cost_usd, runs_dir=self.session_dir / "runs",
                        tail_chars=cfg.log_tail_chars, journal_chars=cfg.journal_chars, curves=self.curves,
                        notes=list(notes), plain=plain)
        board = dashboard(state, extras)
        user, seen = self._user_turn(state, budget - fixed - estimate_tokens([board], cpt))
        if self.conv.turns and fixed + self.conv.tokens(cpt) + estimate_tokens([user, board], cpt) > budget:
            self.conv.reset(f"the conversation outgrew agent.context_tokens={budget:,}")
            user, seen = self._user_turn(state, budget - fixed - estimate_tokens([board], cpt))
        if fixed + estimate_tokens([board], cpt) > budget:
            log.warning("agent.context_tokens=%d is smaller than the static prefix and the state (~%d tokens); raise it",
                        budget, fixed + estimate_tokens([board], cpt))
        if not self.conv.ttl:
            self.conv.ttl = self._ttl(state)
        cc = ({"type": "ephemeral", **({"ttl": "1h"} if self.conv.ttl == "1h" else {})} if cfg.cache else None)
        self._staged = (user, seen)
        return {"model": cfg.model, "max_tokens": cfg.max_tokens,
                "system": [{"type": "text", "text": text, **({"cache_control": cc} if cc else {})}],
                "tools": [tool], "messages": self.conv.messages(user, board, cc), **opts.request()}

    def _user_turn(self, state: SearchState, room: int) -> tuple[list[dict], list[str]]:
        """The next user turn's stable blocks (tool results first) and the ledger rows it shows."""
        rows = state.history
        everything = [e.exp for e in rows]
        if not self.conv.turns:  # a new, resumed-without-turns or condensed conversation opens with the digest
            chars = int(max(3000, min(12000, room * self.cfg.chars_per_token * 0.5)))
            return [{"type": "text", "text": digest_text(rows, chars, condensed=self.conv.resets > 0)}], everything
        blocks, answered = [], set()
        by_id = {e.proposal.meta.get("tool_use_id"): e for e in rows if e.proposal and e.proposal.meta.get("tool_use_id")}
        for tid in self.conv.open_ids():
            if tid in self.conv.results:
                text, err = self.conv.results[tid]
            elif tid in by_id:
                e = by_id[tid]
                text, err = outcome_text(e, _invalid_streak(rows, e), self.cfg.fix_attempts)
                answered.add(e.exp)
            else:
                text, err = "No outcome was recorded for this proposal (the session stopped before it ran).", False
            blocks.append({"type": "tool_result", "tool_use_id": tid, "content": text, **({"is_error": True} if err
                                                                                         else {})})
        new = [e for e in rows if e.exp not in set(self.conv.seen) and e.exp not in answered]
        if new:
            blocks.append({"type": "text", "text": new_rows_text(new)})
        blocks += [{"type": "text", "text": c} for c in self.conv.carry]
        if not blocks:
            blocks = [{"type": "text", "text": "No new ledger rows since your last reply."}]
        return blocks, everything

    def _send(self, build: Callable[[], dict], deadline: float):
        """One reply. Transient failures are retried (agent.max_retries, within agent.patience_s); a 400 first
        condenses the conversation, then drops one optional feature at a time (strict, effort, thinking, the
        forced tool); a spend limit, billing or key problem stops Claude."""
        import anthropic

        cfg = self.cfg
        tries, wait, condensed = 0, cfg.retry_wait_s, False
        kw = build()
        while True:
            self._check_caps(kw)
            now = time.monotonic()
            if self.last_request:
                self.gaps = (self.gaps + [now - self.last_request])[-8:]
            self.last_request = now
            try:
                return self.client.messages.create(**kw)
            except (anthropic.APIStatusError, anthropic.APIConnectionError) as e:
                err, f = e, classify(e)
            if f.kind == "stop":
                raise _Stopped(self._stop_message(err))
            if f.kind in ("too_large", "bad_request") and self.conv.turns and not condensed:
                condensed = True
                if f.kind == "too_large":
                    self.shrink *= 0.7
                log.warning("agent=claude: the API refused the request (%s); condensing the conversation", f.what)
                self.conv.reset(f"the API refused the request: {f.what[:100]}")
                kw = build()
                continue
            if f.kind == "too_large":
                self.shrink *= 0.7
                if self.shrink < 0.2:
                    raise _Unavailable(f"the API keeps refusing the request as too large ({f.what})")
                kw = build()
                continue
            if f.kind == "bad_request":
                dropped = self.options().degrade()
                if dropped is None:
                    raise _Unavailable(f"the API refused every form of the request ({f.what})")
                log.warning("agent=claude: the API refused the request (%s); asking without the %s from now on",
                            f.what, dropped)
                if dropped.startswith("thinking"):  # the turns hold thinking blocks: start afresh without them
                    self.conv.reset("thinking was turned off")
                kw = build()
                continue
            tries += 1
            left = deadline - time.monotonic()
            if tries > cfg.max_retries or left <= 0:
                raise _Unavailable(f"the API is not answering ({f.what}; {tries} tries)")
            pause = min(f.retry_after if f.retry_after is not None else wait, left, 60.0)
            log.info("agent=claude: %s; retrying in %.1f s", f.what, pause)
            time.sleep(pause)
            wait *= 2

    # ------------------------------------------------------------------ pieces
    def options(self) -> Options:
        if self.opts is None:
            self.opts = Options.choose(self.cfg, self._capabilities())
        return self.opts

    def _capabilities(self) -> Capabilities:
        """What the model accepts, asked once (free); unknown if the endpoint does not answer."""
        import anthropic

        if self.caps is None:
            try:
                self.caps = Capabilities.of(self.client.with_options(timeout=30.0).models.retrieve(self.cfg.model))
            except (anthropic.APIStatusError, anthropic.APIConnectionError) as err:
                log.info("agent=claude: the model's capabilities are unknown (%s); asking without thinking, with an "
                         "`analysis` field first", classify(err).what)
                self.caps = Capabilities()
        return self.caps

    def _ttl(self, state: SearchState) -> str:
        """agent.cache_ttl, or (auto) 1h when the time between requests is longer than a 5-minute entry lives:
        the time budget, the recent runs' wall time, the measured gaps between requests."""
        if self.cfg.cache_ttl != "auto":
            return self.cfg.cache_ttl
        b = state.best_config.budget
        walls = sorted(e.wall_seconds for e in state.history[-8:] if e.wall_seconds)
        est = walls[len(walls) // 2] if walls else 0.0
        if b.mode == "time":
            est = max(est, float(b.seconds))
        if self.gaps:
            est = max(est, sorted(self.gaps)[len(self.gaps) // 2])
        return "1h" if est > ONE_HOUR_AFTER_S else "5m"

    def _bind(self, state: SearchState) -> None:
        self._state = state
        if self.session_dir is None:
            self.session_dir = Path(state.worktree).parent
            self.usage_path = self.session_dir / USAGE_FILE
            self.conv = Conversation.load(self.session_dir / CONVERSATION_FILE, self.cfg.model)
            self.curves = LossCurves(self.session_dir)

    def _build_fallback(self) -> Optional[Agent]:
        from src.lab.agents import build_agent

        name = self.cfg.fallback
        if name == "none":
            return None
        if name == "replay":
            return build_agent(ReplayAgentConfig(name="replay", seed=self.cfg.seed, file=self.cfg.fallback_file),
                               self.space)
        if self.space is None:
            raise AgentStop(f"agent.fallback={name} needs a search space (search_space=...)")
        return build_agent(OptunaAgentConfig(name=name, seed=self.cfg.seed, sampler=name), self.space)

    def _system_text(self, state: SearchState) -> str:
        program = self._program(state)
        key = hashlib.sha256(json.dumps([program, editable_files(state)]).encode()).hexdigest()
        if self._static[0] != key:
            self._static = (key, system_text(program, state))
        return self._static[1]

    def _program(self, state: SearchState) -> str:
        """agent.program: absolute, relative to the cwd (your checkout), else the session's worktree copy."""
        p = Path(self.cfg.program).expanduser()
        for cand in ([p] if p.is_absolute() else [Path.cwd() / p, Path(state.worktree) / p]):
            if cand.is_file():
                return cand.read_text()
        raise AgentStop(f"agent.program={self.cfg.program}: no such file (looked in {Path.cwd()} and "
                        f"{state.worktree}); it holds the research strategy the model follows (see program.md)")

    def _check_caps(self, kw: dict) -> None:
        """No request that could cross a cap: its worst case is all input written to the cache + max_tokens out."""
        cfg, s = self.cfg, self.spent
        cpt = cfg.chars_per_token
        n_in = estimate_tokens(kw["system"], cpt) + estimate_tokens(kw["tools"], cpt) + \
            estimate_tokens(kw["messages"], cpt)
        cost = (n_in * max(self.price.input, write_price(self.price, self.conv.ttl or "5m"))
                + cfg.max_tokens * self.price.output) / 1e6
        if s.cost_usd + cost > cfg.max_cost_usd:
            raise _Stopped(f"the session has spent ${s.cost_usd:.4f}; the next request could cost up to ${cost:.4f}, "
                           f"which would cross agent.max_cost_usd=${cfg.max_cost_usd:.2f} (resume with a higher cap "
                           f"to go on with Claude: agent.max_cost_usd={_next_cap(cfg.max_cost_usd)})")
        tokens = n_in + cfg.max_tokens
        if cfg.max_session_tokens and s.tokens + tokens > cfg.max_session_tokens:
            raise _Stopped(f"the session has used {s.tokens:,} tokens; the next request could use {tokens:,} more, "
                           f"crossing agent.max_session_tokens={cfg.max_session_tokens:,} (resume with a higher cap to "
                           f"go on with Claude: agent.max_session_tokens={2 * cfg.max_session_tokens})")

    def _stop_message(self, e) -> str:
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

    @staticmethod
    def _resume_cmd(state: Optional[SearchState]) -> str:
        tag = state.tag if state is not None else "<tag>"
        return f"python -m src.search search.tag={tag} search.resume=true agent=claude"

    def _save(self) -> None:
        """The session's spend, next to its ledger (temp file + rename)."""
        if self.usage_path is None:
            return
        from src.lab.session import atomic_write

        s = self.spent
        ran = sum(1 for e in self._state.history if e.counted) if self._state is not None else 0
        atomic_write(self.usage_path, json.dumps({
            "agent": "claude", "model": self.cfg.model, "proposals": self.proposals,
            "fallback_proposals": self.fallback_proposals, "session": s.to_dict(),
            "cache_read_share": round(s.cache_read_share, 4),
            "cost_per_proposal_usd": round(s.cost_usd / self.proposals, 6) if self.proposals else None,
            "experiments_run": ran, "cost_per_experiment_usd": round(s.cost_usd / ran, 6) if ran else None,
            "max_cost_usd": self.cfg.max_cost_usd, "options": self.opts.describe() if self.opts else None,
            "stopped": self.stopped or None, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))

    def _write_journal(self, state: SearchState) -> None:
        from src.lab.session import atomic_write

        try:
            atomic_write(self.session_dir / JOURNAL_FILE, journal_markdown(state.history, state.tag))
        except OSError as e:
            log.warning("could not write %s: %s", self.session_dir / JOURNAL_FILE, e)


def _invalid_streak(rows: list[Experiment], e: Experiment) -> int:
    """Invalid rows in a row, ending with `e` (the model is told to move on after agent.fix_attempts)."""
    n = 0
    for r in rows[: rows.index(e) + 1][::-1]:
        if not r.is_experiment:
            continue
        if r.status != "invalid":
            break
        n += 1
    return n


def _next_cap(cap: float) -> str:
    return f"{max(cap * 2, cap + 1):g}"
