"""agent=claude's requests: the cached static prefix, the conversation, and a dashboard, within a token budget.

The `system` prompt is the static prefix (program.md, the editable files at the best commit, the
config it may override), cached and rebuilt only when it changes. Each user turn holds the outcome of
the last proposal (the tool_result of its tool_use), every other ledger row since, and any carried
notes; it ends with the dashboard, which is not kept (src/lab/agents/claude_context.py). A request
never passes agent.context_tokens (times the client's shrink factor after a too-large reply): the
conversation is condensed into a digest when it would.

Usage: prompt = Prompt(cfg, client); kw = prompt.request(state, conv, extras); user, seen = prompt.staged
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from src.lab.agents.base import AgentStop, SearchState
from src.lab.agents.claude_client import ClaudeClient
from src.lab.agents.claude_context import (Extras, dashboard, digest_text, editable_files, estimate_tokens,
                                           new_rows_text, outcome_text, system_text, tool_schema)
from src.lab.agents.claude_conversation import Conversation
from src.lab.config import ClaudeAgentConfig
from src.lab.ledger import Experiment
from src.lab.decisions import INVALID

log = logging.getLogger("src.lab.agents.claude")
ONE_HOUR_AFTER_S = 270.0  # a 5-minute cache entry would expire before the next request (with room for the request)


class Prompt:
    def __init__(self, cfg: ClaudeAgentConfig, client: ClaudeClient):
        self.cfg, self.client = cfg, client
        self._static: tuple[str, str] = ("", "")  # (key, text) of the system prompt
        self.staged: tuple[list[dict], list[str]] = ([], [])  # the user turn being asked, and the rows it shows

    def request(self, state: SearchState, conv: Conversation, extras: Extras) -> dict:
        """The next request (its user turn kept in self.staged), fitted to agent.context_tokens."""
        cfg, cpt, opts = self.cfg, self.cfg.chars_per_token, self.client.options()
        tool = tool_schema(analysis=opts.thinking == "off", strict=opts.strict)
        text = self.system_text(state)
        key = hashlib.sha256((text + json.dumps(tool, sort_keys=True) + json.dumps(opts.request(),
                                                                                    sort_keys=True)).encode()).hexdigest()
        budget = int(cfg.context_tokens * self.client.shrink)
        # sizes as sent (JSON: escaped newlines and quotes count), plus message wrappers and cache markers
        fixed = estimate_tokens([{"type": "text", "text": text}, tool], cpt) + 100
        if conv.turns and conv.static_key != key and conv.tokens(cpt) > 0.25 * (budget - fixed):
            conv.reset("the static prefix changed: every cached turn would be written again anyway")
        conv.static_key = key
        board = dashboard(state, extras)
        user, seen = self.user_turn(state, conv, budget - fixed - estimate_tokens([board], cpt))
        if conv.turns and fixed + conv.tokens(cpt) + estimate_tokens([user, board], cpt) > budget:
            conv.reset(f"the conversation outgrew agent.context_tokens={budget:,}")
            user, seen = self.user_turn(state, conv, budget - fixed - estimate_tokens([board], cpt))
        if fixed + estimate_tokens([board], cpt) > budget:
            log.warning("agent.context_tokens=%d is smaller than the static prefix and the state (~%d tokens); raise it",
                        budget, fixed + estimate_tokens([board], cpt))
        if not conv.ttl:
            conv.ttl = self.ttl(state)
        cc = ({"type": "ephemeral", **({"ttl": "1h"} if conv.ttl == "1h" else {})} if cfg.cache else None)
        self.staged = (user, seen)
        return {"model": cfg.model, "max_tokens": cfg.max_tokens,
                "system": [{"type": "text", "text": text, **({"cache_control": cc} if cc else {})}],
                "tools": [tool], "messages": conv.messages(user, board, cc), **opts.request()}

    def user_turn(self, state: SearchState, conv: Conversation, room: int) -> tuple[list[dict], list[str]]:
        """The next user turn's stable blocks (tool results first) and the ledger rows it shows."""
        rows = state.history
        everything = [e.exp for e in rows]
        if not conv.turns:  # a new, resumed-without-turns or condensed conversation opens with the digest
            chars = int(max(3000, min(12000, room * self.cfg.chars_per_token * 0.5)))
            return [{"type": "text", "text": digest_text(rows, chars, condensed=conv.resets > 0)}], everything
        blocks, answered = [], set()
        by_id = {e.proposal.meta.get("tool_use_id"): e for e in rows if e.proposal and e.proposal.meta.get("tool_use_id")}
        for tid in conv.open_ids():
            if tid in conv.results:
                text, err = conv.results[tid]
            elif tid in by_id:
                e = by_id[tid]
                text, err = outcome_text(e, invalid_streak(rows, e), self.cfg.fix_attempts)
                answered.add(e.exp)
            else:
                text, err = "No outcome was recorded for this proposal (the session stopped before it ran).", False
            blocks.append({"type": "tool_result", "tool_use_id": tid, "content": text, **({"is_error": True} if err
                                                                                         else {})})
        new = [e for e in rows if e.exp not in set(conv.seen) and e.exp not in answered]
        if new:
            blocks.append({"type": "text", "text": new_rows_text(new)})
        blocks += [{"type": "text", "text": c} for c in conv.carry]
        if not blocks:
            blocks = [{"type": "text", "text": "No new ledger rows since your last reply."}]
        return blocks, everything

    def ttl(self, state: SearchState) -> str:
        """agent.cache_ttl, or (auto) 1h when the time between requests is longer than a 5-minute entry lives:
        the time budget, the recent runs' wall time, the measured gaps between requests."""
        if self.cfg.cache_ttl != "auto":
            return self.cfg.cache_ttl
        b = state.best_config.budget
        walls = sorted(e.wall_seconds for e in state.history[-8:] if e.wall_seconds)
        est = walls[len(walls) // 2] if walls else 0.0
        if b.mode == "time":
            est = max(est, float(b.seconds))
        gaps = self.client.gaps
        if gaps:
            est = max(est, sorted(gaps)[len(gaps) // 2])
        return "1h" if est > ONE_HOUR_AFTER_S else "5m"

    def system_text(self, state: SearchState) -> str:
        program = self.program(state)
        key = hashlib.sha256(json.dumps([program, editable_files(state)]).encode()).hexdigest()
        if self._static[0] != key:
            self._static = (key, system_text(program, state))
        return self._static[1]

    def program(self, state: SearchState) -> str:
        """agent.program: absolute, relative to the cwd (your checkout), else the session's worktree copy."""
        p = Path(self.cfg.program).expanduser()
        for cand in ([p] if p.is_absolute() else [Path.cwd() / p, Path(state.worktree) / p]):
            if cand.is_file():
                return cand.read_text()
        raise AgentStop(f"agent.program={self.cfg.program}: no such file (looked in {Path.cwd()} and "
                        f"{state.worktree}); it holds the research strategy the model follows (see program.md)")


def invalid_streak(rows: list[Experiment], e: Experiment) -> int:
    """Invalid rows in a row, ending with `e` (the model is told to move on after agent.fix_attempts)."""
    n = 0
    for r in rows[: rows.index(e) + 1][::-1]:
        if not r.is_experiment:
            continue
        if r.status != INVALID:
            break
        n += 1
    return n
