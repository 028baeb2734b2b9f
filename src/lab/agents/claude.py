"""agent=claude: Claude proposes each experiment as a tool call, after reasoning, and keeps a research journal.

One conversation per session (src/lab/agents/claude_conversation.py), saved in the session directory
so a resume continues it. The `system` prompt is the static prefix (program.md, the editable files at
the best commit, the config it may override); each turn appends the outcome of the last proposal (the
tool_result of its tool_use) and every other ledger row since, and ends with a dashboard that is not
kept (src/lab/agents/claude_prompt.py, claude_context.py). The model reasons first: adaptive or extended thinking where
it supports it (then tool_choice is auto: the API does not allow thinking with a forced tool), else an
`analysis` field that comes first in a forced tool call; strict tool schemas and an effort level where
the model takes them (read from GET /v1/models/<model>; src/lab/agents/claude_api.py). Each proposal
also carries `learned` and `next_ideas`: the research journal, shown every turn and written to
<session>/journal.md.

Never idle: while the API is down, rate-limited, refusing or unusable, the offline `agent.fallback`
(TPE by default) proposes, so the device keeps training; Claude is asked again after `probe_s` (doubling
while it keeps failing) and takes over when it answers. Such rows say who proposed them (the ledger's
`agent` column, proposals/<exp>.json). Failures are classified by status, type and error code
(src/lab/agents/claude_client.py): a spend limit, a billing problem, a rejected key or unknown model stop
Claude for the session (the fallback goes on); transient ones (429, 5xx, 529, timeouts) are retried
briefly. A refusal is answered by rephrasing,
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

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from src.lab.agents.base import Agent, AgentStop, SearchState
from src.lab.agents.claude_api import Usage
from src.lab.agents.claude_client import OFFLINE, ClaudeClient, Stopped, Unavailable
from src.lab.agents.claude_context import FIELDS, TOOL_NAME, Extras, LossCurves, journal_markdown
from src.lab.agents.claude_conversation import Conversation, reply_blocks
from src.lab.agents.claude_prompt import Prompt
from src.lab.config import ClaudeAgentConfig, OptunaAgentConfig, ReplayAgentConfig
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal

log = logging.getLogger("src.lab.agents.claude")
USAGE_FILE = "agent_usage.json"
CONVERSATION_FILE = "claude_conversation.json"
JOURNAL_FILE = "journal.md"
FALLBACKS = ("tpe", "random", "replay", "none")
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
    retest = data.get("retest") or ""
    if not isinstance(retest, str):
        raise InvalidProposal("`retest` must be the id of a near miss, e.g. \"exp-007\"")
    ovs = data.get("overrides", [])
    if not isinstance(ovs, list) or not all(isinstance(o, str) and o.strip() for o in ovs):
        raise InvalidProposal(f"`overrides` must be a list of 'key=value' strings; got {json.dumps(ovs)[:200]}")
    patch = data.get("patch")
    if patch is not None and not isinstance(patch, str):
        raise InvalidProposal("`patch` must be one string holding a unified diff")
    if not ovs and not (patch or "").strip() and not retest.strip():
        raise InvalidProposal("the proposal has neither overrides nor a patch; give at least one (or `retest`)")
    ideas = data.get("next_ideas") or []
    if isinstance(ideas, str):
        ideas = [ideas]
    if not isinstance(ideas, list):
        raise InvalidProposal("`next_ideas` must be a list of short strings")
    p = Proposal.from_dict({"description": data["description"], "hypothesis": data["hypothesis"],
                            "overrides": ovs, "patch": patch if (patch or "").strip() else None,
                            "retest": retest.strip()})
    p.meta = {"learned": str(data.get("learned") or "").strip()[:2000],
              "next_ideas": [str(i).strip()[:500] for i in ideas if str(i).strip()][:12]}
    if str(data.get("analysis") or "").strip():
        p.meta["analysis"] = str(data["analysis"]).strip()[:4000]
    return p


def build_fallback(cfg: ClaudeAgentConfig, space) -> Optional[Agent]:
    """agent.fallback: the offline agent that proposes while Claude cannot (None: the session pauses)."""
    from src.lab.agents import build_agent

    name = cfg.fallback
    if name == "none":
        return None
    if name == "replay":
        return build_agent(ReplayAgentConfig(name="replay", seed=cfg.seed, file=cfg.fallback_file), space)
    if space is None:
        raise AgentStop(f"agent.fallback={name} needs a search space (search_space=...)")
    return build_agent(OptunaAgentConfig(name=name, seed=cfg.seed, sampler=name), space)


@dataclass
class _Asking:
    """One proposal's replies so far: what they cost, what went wrong, what the next request adds."""
    used: Usage = field(default_factory=Usage)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plain: bool = False  # after a refusal: the state without the log tail and journal
    refusals: int = 0

    def stopped_short(self, reply, conv: Conversation, client: ClaudeClient, max_tokens: int) -> bool:
        """A reply that ended before a proposal could be in it (refusal, max_tokens, context window): what the
        next request does about it."""
        stop = reply.stop_reason
        if stop == "refusal":
            details = getattr(reply, "stop_details", None)
            why = getattr(details, "category", None) or getattr(details, "explanation", None) or "no category"
            self.problems.append(f"refusal ({why})")
            self.refusals += 1
            self.plain, self.notes = True, [REPHRASE]  # 1st: rephrase this turn (plain state, a note)
            if self.refusals >= 2:  # 2nd: drop the refused turn, as the docs advise: a fresh conversation from the digest
                conv.reset("a refused turn was dropped")
            return True
        if stop == "max_tokens":
            self.problems.append(f"reply cut at max_tokens={max_tokens}")
            self.notes = [CUT]
            return True
        if stop == "model_context_window_exceeded":
            self.problems.append("context window exceeded")
            client.shrink *= 0.7
            conv.reset("the context window was exceeded")
            return True
        return False


class Spend:
    """What Claude cost this session, across invocations: <session>/agent_usage.json (the caps hold on resume)."""

    def __init__(self):
        self.spent = Usage()
        self.proposals = 0  # by Claude
        self.fallback_proposals = 0
        self.path: Optional[Path] = None

    def load(self, path: Path, history: list[Experiment]) -> None:
        """agent_usage.json, else what the ledger's proposals recorded."""
        self.path = path
        if path.exists():
            try:
                d = json.loads(path.read_text())
                self.spent = Usage.from_dict(d.get("session"))
                self.proposals = int(d.get("proposals", 0))
                self.fallback_proposals = int(d.get("fallback_proposals", 0))
            except (OSError, ValueError) as e:
                log.warning("could not read %s (%s); counting the spend from the ledger", path, e)
        if not self.spent.calls:
            for e in history:
                meta = e.proposal.meta if e.proposal else {}
                if meta.get("agent") == "claude":
                    self.spent.add(Usage.from_dict(meta.get("usage")))
                    self.proposals += 1

    def metrics(self, ran: int) -> dict[str, float]:
        s = self.spent
        return s.metrics("agent") | {
            "agent/proposals": float(self.proposals), "agent/fallback_proposals": float(self.fallback_proposals),
            "agent/cost_per_proposal": s.cost_usd / self.proposals if self.proposals else 0.0,
            "agent/cost_per_experiment": s.cost_usd / ran if ran else 0.0}

    def save(self, ran: int, extra: dict) -> None:
        """Temp file + rename, next to the ledger."""
        if self.path is None:
            return
        from src.lab.session import atomic_write

        s = self.spent
        atomic_write(self.path, json.dumps({
            "agent": "claude", "model": extra.pop("model"), "proposals": self.proposals,
            "fallback_proposals": self.fallback_proposals, "session": s.to_dict(),
            "cache_read_share": round(s.cache_read_share, 4),
            "cost_per_proposal_usd": round(s.cost_usd / self.proposals, 6) if self.proposals else None,
            "experiments_run": ran, "cost_per_experiment_usd": round(s.cost_usd / ran, 6) if ran else None,
            **extra, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))


class ClaudeAgent(Agent):
    name = "claude"

    def __init__(self, cfg: ClaudeAgentConfig, space=None):
        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise AgentStop(f"agent=claude needs an Anthropic API key in ${cfg.api_key_env}, which is not set. "
                            f"Export it (export {cfg.api_key_env}=sk-ant-...) and start again, or run an offline "
                            f"agent that needs no key: {OFFLINE}.")
        for k in ("max_tokens", "context_tokens", "attempts"):
            if getattr(cfg, k) < 1:
                raise AgentStop(f"agent.{k}={getattr(cfg, k)} must be at least 1")
        if cfg.fallback not in FALLBACKS:
            raise AgentStop(f"agent.fallback={cfg.fallback!r}; expected one of {', '.join(FALLBACKS)}")
        if cfg.cache_ttl not in ("auto", "5m", "1h"):
            raise AgentStop(f"agent.cache_ttl={cfg.cache_ttl!r}; expected auto, 5m or 1h")
        self.client = ClaudeClient(cfg, key)
        self.prompt = Prompt(cfg, self.client)
        self.space = space
        self.fallback: Optional[Agent] = build_fallback(cfg, space)
        self.conv = Conversation()
        self.account = Spend()  # the whole session, across invocations (agent_usage.json)
        self.stopped = ""  # why Claude is done for this invocation ("" while it may be asked)
        self.down_reason = ""  # the last failure, while Claude is unavailable
        self.retry_at = 0.0  # time.monotonic() before which the fallback proposes without asking Claude
        self.probe_wait = cfg.probe_s
        self.session_dir: Optional[Path] = None
        self.curves: Optional[LossCurves] = None
        self._state: Optional[SearchState] = None

    # ------------------------------------------------------------------ the loop's hooks
    @property
    def spent(self) -> Usage:
        return self.account.spent

    @property
    def proposals(self) -> int:
        return self.account.proposals

    @property
    def fallback_proposals(self) -> int:
        return self.account.fallback_proposals

    @property
    def where(self) -> str:
        return self.client.where

    def options(self):
        return self.client.options()

    def preflight(self) -> None:
        """Before any training: is the key accepted and the model known (free count_tokens request), and what does
        the model accept (GET /v1/models/<model>, free)? An API that does not answer now is left to the fallback."""
        if not self.cfg.preflight:
            return
        if not self.client.ping():
            if self.fallback is None:
                raise AgentStop(f"agent=claude cannot reach the Anthropic API at {self.where} ({self.client.down}). "
                                "Check the network, $ANTHROPIC_BASE_URL / agent.base_url, or run an offline agent "
                                f"that needs no API: {OFFLINE}.")
            log.warning("agent=claude: the API at %s does not answer now (%s); the session starts anyway: agent.fallback"
                        "=%s proposes until Claude answers", self.where, self.client.down, self.cfg.fallback)
            return
        log.info("agent=claude: %s answers; model %s (%s), caps $%.2f%s", self.where, self.cfg.model,
                 self.options().describe(), self.cfg.max_cost_usd,
                 f", {self.cfg.max_session_tokens:,} tokens" if self.cfg.max_session_tokens else "")

    def restore(self, history: list[Experiment], state: SearchState) -> None:
        self._bind(state)
        self.account.load(self.session_dir / USAGE_FILE, history)
        if self.fallback is not None:
            from src.lab.agents.space import check_space

            if self.cfg.fallback in ("tpe", "random"):  # a broken space fails now, not in the middle of an outage
                check_space(self.space, state.override_roots)
            self.fallback.restore(history, state)
        if self.spent.calls:
            log.info("agent=claude: resumed; the session has spent $%.4f (%s tokens) on %d proposals; the conversation "
                     "has %d turns", self.spent.cost_usd, f"{self.spent.tokens:,}", self.account.proposals,
                     len(self.conv.turns))
        self._write_journal(state)

    def observe(self, e: Experiment, state: SearchState) -> None:
        self._bind(state)
        if self.fallback is not None:
            self.fallback.observe(e, state)
        self._write_journal(state)

    def usage(self) -> dict[str, float]:
        """Session totals for the parent MLflow run: tokens, cost, cache-read share, cost per proposal and per
        experiment run (by any agent: the fallback's cost nothing)."""
        return self.account.metrics(self._ran())

    def close(self) -> None:
        if self.spent.calls:
            log.info("agent=claude: %s; cache-read share %.0f%% of input tokens; %d proposals by Claude ($%.4f each), "
                     "%d by the fallback%s", self.spent.line(), 100 * self.spent.cache_read_share, self.proposals,
                     self.spent.cost_usd / max(1, self.proposals), self.account.fallback_proposals,
                     f"; Claude stopped: {self.stopped}" if self.stopped else "")
        self.client.close()
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
        except Stopped as s:
            self.stopped = str(s)
            log.warning("agent=claude: Claude stops for this session: %s", s)
            self._save()
            return self._fall_back(state, self.stopped)
        except Unavailable as u:
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
        self.account.fallback_proposals += 1
        self._save()
        return p

    def _ask(self, state: SearchState) -> Proposal:
        """Claude's proposal: up to agent.attempts replies (re-asked after a cut, a refusal, a reply without the
        tool call or malformed input); raises Unavailable or Stopped."""
        deadline = time.monotonic() + self.cfg.patience_s
        ask = _Asking()
        for attempt in range(1, self.cfg.attempts + 1):
            reply = self.client.send(lambda: self._request(state, ask), deadline, self.conv, self.spent)
            u = Usage.of_reply(reply.usage, self.client.price, self.conv.ttl)
            ask.used.add(u)
            self.spent.add(u)
            self._save()
            if not ask.stopped_short(reply, self.conv, self.client, self.cfg.max_tokens):
                proposal = self._take(reply, ask)
                if proposal is not None:
                    self.account.proposals += 1
                    self._save()
                    return stamp(proposal, self.cfg, attempt, ask, self.spent, self.options().describe())
        raise Unavailable(f"no usable proposal after {self.cfg.attempts} replies ({'; '.join(ask.problems)}); "
                          f"${ask.used.cost_usd:.4f} spent on them")

    def _take(self, reply, ask: _Asking) -> Optional[Proposal]:
        """The reply's propose_experiment call as a Proposal, committed to the conversation; None (and what to
        tell the model) when it has none or its input is malformed."""
        user, seen = self.prompt.staged
        blocks = reply_blocks(reply.content)
        ours = [b for b in reply.content if b.type == "tool_use" and b.name == TOOL_NAME]
        if not ours:  # end_turn / pause_turn without the tool (possible under tool_choice auto)
            words = " ".join(b.text for b in reply.content if b.type == "text").strip()
            ask.problems.append(f"{reply.stop_reason} without a {TOOL_NAME} call" +
                                (f" ('{words[:80]}')" if words else ""))
            if blocks:
                self.conv.commit(user, blocks, seen)
                for b in reply.content:
                    if b.type == "tool_use":
                        self.conv.results[b.id] = [f"unknown tool {b.name}; only {TOOL_NAME} exists", True]
                self.conv.carry = [REMIND]
                self.conv.save()
            else:
                ask.notes = [REMIND]
            return None
        call = ours[0]
        self.conv.commit(user, blocks, seen)
        for b in reply.content:
            if b.type == "tool_use" and b.id != call.id:
                self.conv.results[b.id] = [f"ignored: one {TOOL_NAME} call per turn; only the first was taken", True]
        try:
            proposal = parse_input(call.input)
        except InvalidProposal as e:
            ask.problems.append(f"malformed tool input ({e})")
            self.conv.results[call.id] = [f"Malformed {TOOL_NAME} input: {e}. Nothing was run; call the tool "
                                          "again with valid input.", True]
            self.conv.save()
            ask.notes = []
            return None
        proposal.meta["tool_use_id"] = call.id
        return proposal

    def _request(self, state: SearchState, ask: _Asking) -> dict:
        extras = Extras(spent_usd=self.spent.cost_usd, cap_usd=self.cfg.max_cost_usd, runs_dir=self.session_dir / "runs",
                        tail_chars=self.cfg.log_tail_chars, journal_chars=self.cfg.journal_chars, curves=self.curves,
                        notes=list(ask.notes), plain=ask.plain, tuner=self.tuner_state())
        return self.prompt.request(state, self.conv, extras)

    def tuner_state(self) -> str:
        """An optimizer's state to show beside the ledger ('' here; agent=hybrid's tuner: src/lab/agents/hybrid.py)."""
        return ""

    # ------------------------------------------------------------------ pieces
    def _bind(self, state: SearchState) -> None:
        self._state = state
        if self.session_dir is None:
            self.session_dir = Path(state.worktree).parent
            self.conv = Conversation.load(self.session_dir / CONVERSATION_FILE, self.cfg.model)
            self.curves = LossCurves(self.session_dir)

    @staticmethod
    def _resume_cmd(state: Optional[SearchState]) -> str:
        tag = state.tag if state is not None else "<tag>"
        return f"python -m src.search search.tag={tag} search.resume=true agent=claude"

    def _ran(self) -> int:
        return sum(1 for e in self._state.history if e.counted) if self._state is not None else 0

    def _save(self) -> None:
        self.account.save(self._ran(), {"model": self.cfg.model, "max_cost_usd": self.cfg.max_cost_usd,
                                        "options": self.client.opts.describe() if self.client.opts else None,
                                        "stopped": self.stopped or None})

    def _write_journal(self, state: SearchState) -> None:
        from src.lab.session import atomic_write

        try:
            atomic_write(self.session_dir / JOURNAL_FILE, journal_markdown(state.history, state.tag))
        except OSError as e:
            log.warning("could not write %s: %s", self.session_dir / JOURNAL_FILE, e)


def stamp(proposal: Proposal, cfg: ClaudeAgentConfig, attempt: int, ask: _Asking, spent: Usage,
          reasoning: str) -> Proposal:
    """Who proposed it and what it cost, in its meta (-> proposals/<exp>.json, MLflow, the commit message)."""
    used = ask.used
    proposal.meta.update({
        "agent": "claude", "proposed_by": "claude", "model": cfg.model, "attempts": attempt, "reasoning": reasoning,
        "usage": used.to_dict(), "session_cost_usd": round(spent.cost_usd, 6),
        "metrics": used.metrics("agent") | {"agent/attempts": float(attempt), "agent/session_cost_usd": spent.cost_usd,
                                            "agent/session_tokens": float(spent.tokens),
                                            "agent/session_cache_read_share": spent.cache_read_share},
        "commit_note": f"{cfg.model}: {used.line()}; session ${spent.cost_usd:.4f}",
        **({"problems": ask.problems} if ask.problems else {})})
    log.info("agent=claude: %s (%s; session $%.4f of $%.2f, cache-read share %.0f%%)", proposal.description[:100],
             used.line(), spent.cost_usd, cfg.max_cost_usd, 100 * spent.cache_read_share)
    return proposal
