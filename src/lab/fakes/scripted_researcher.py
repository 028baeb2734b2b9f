"""Whole research sessions with agent=claude against the local Messages API server, for tests and benches.

`ScriptedResearcher` plays Claude: it answers every request with a proposal of realistic size (a
thinking block, the journal fields, a hypothesis, valid overrides and now and then a patch), drawn
deterministically from a seed. `run_night` runs a real session in-process (src/lab/loop.py's Search
on a throwaway git copy of the project, the real MLflow store of the test session) with the stand-in
train script (src/lab/fakes/train.py), so a 100-experiment night takes minutes on two cores,
while the server's clock lets each run last as long as a real one for the prompt cache.

Not a test module: tests/lab/agents/test_claude_night.py and bench/claude_night.py use it.

Usage: out = run_night(tmp_path, experiments=100, seconds_per_run=150)
       out["usage"]["session"]["cost_usd"], out["rows"], out["server"]
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from typing import Callable, Optional

from src.lab.agents.claude_context import NEAR_MISSES
from src.lab.fakes.messages_server import MessagesServer, error, refusal, tool_use
from src.lab.fakes.project import comment_patch, compose_search, fake_command, make_repo, read_tsv

KEY = "sk-ant-test-night-0000"
# (overrides, what it tests): every one composes with the cpu presets and changes the baseline
IDEAS = [
    (["optimizer.matrix_lr=0.05"], "a higher Muon LR: more progress per step at this short budget"),
    (["optimizer.matrix_lr=0.06"], "the Muon LR a little higher again"),
    (["optimizer.matrix_lr=0.03"], "a lower Muon LR in case 0.04 is already past the edge"),
    (["optimizer.matrix_lr=0.08"], "bracket the Muon LR from above"),
    (["optimizer.embedding_lr=0.4"], "the embedding LR may be too high for a byte vocabulary"),
    (["optimizer.embedding_lr=0.8"], "or too low"),
    (["optimizer.unembedding_lr=0.006"], "a faster unembedding"),
    (["optimizer.warmdown_ratio=0.3"], "more steps at the peak LR"),
    (["optimizer.warmdown_ratio=0.7"], "a longer cool-down"),
    (["optimizer.weight_decay=0.1"], "less decay at a short budget"),
    (["batch.total_tokens=4096", "batch.device_tokens=4096"], "twice the optimizer steps with half the batch"),
    (["batch.total_tokens=2048", "batch.device_tokens=2048"], "four times the steps"),
    (["model.depth=3"], "a shallower, faster model gets more steps"),
    (["model.activation=gelu"], "GELU instead of ReLU^2"),
    (["model.window_pattern=L"], "full attention everywhere: the context is short anyway"),
    (["optimizer.momentum_warmup_steps=100"], "reach the final momentum sooner"),
]


def near_miss_ids(text: str) -> list[str]:
    """The experiment ids of the prompt's near-miss list, best first (what a researcher would read there)."""
    if NEAR_MISSES not in text:
        return []
    section = text.split(NEAR_MISSES, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- (exp-\d+) ", section, flags=re.M)


def prompt_text(content) -> str:
    """The text of a user message's content (a string, or text and tool-result blocks)."""
    if isinstance(content, str):
        return content
    out = []
    for b in content:
        inner = b.get("content") if b.get("type") == "tool_result" else b.get("text")
        out.append(inner if isinstance(inner, str) else prompt_text(inner or []))
    return "\n".join(out)


class ScriptedResearcher:
    """A responder for MessagesServer: proposal i is IDEAS[...] with thinking of ~thinking_chars characters.
    `refuse`: request numbers answered with a refusal; `patch_every`: every n-th proposal is a patch too;
    `retest_share`: when the prompt lists a near miss not asked about before, the share of turns that ask for
    its retest instead (the top one), as a researcher reading the list might."""

    def __init__(self, seed: int = 0, thinking_chars: int = 3600, repo: Optional[Path] = None, patch_every: int = 0,
                 refuse: tuple[int, ...] = (), retest_share: float = 0.0):
        self.rng = random.Random(seed)
        self.thinking_chars = thinking_chars
        self.repo = repo
        self.patch_every = patch_every
        self.refuse = set(refuse)
        self.retest_share = retest_share
        self.asked: list[str] = []  # near misses it asked to retest
        self.proposals = 0

    def __call__(self, body: dict, n: int) -> dict:
        if n in self.refuse:
            return refusal("This request was declined.", category="frontier_llm")
        i = self.proposals
        self.proposals += 1
        ovs, why = IDEAS[self.rng.randrange(len(IDEAS))]
        last = body["messages"][-1]["content"]
        fresh = [x for x in near_miss_ids(prompt_text(last)) if x not in self.asked]
        if fresh and self.retest_share > 0 and self.rng.random() < self.retest_share:  # no draw when off
            self.asked.append(fresh[0])
            return tool_use({"learned": f"Outcome {i}: {fresh[0]} beat the best inside the margin.",
                             "next_ideas": [d for _, d in self.rng.sample(IDEAS, 3)],
                             "description": f"retest {fresh[0]}", "retest": fresh[0],
                             "hypothesis": f"H{i}: {fresh[0]} is a real small gain that one run could not show."},
                            thinking=f"{fresh[0]} is the best near miss; more runs will tell.")
        seen = next((b["content"][:60] for b in last if b.get("type") == "tool_result"), "the baseline")
        words = ("Looking at the latest outcome and the history table: the margin is what matters, and in a "
                 "time budget throughput decides the number of steps. ")
        thinking = (f"{seen}. " + words * (self.thinking_chars // len(words) + 1))[: self.thinking_chars]
        proposal = {"learned": f"Outcome {i}: {seen}; a change inside the margin is noise, not a finding.",
                    "next_ideas": [d for _, d in self.rng.sample(IDEAS, 3)],
                    "description": f"{' '.join(ovs)[:80]}", "hypothesis": f"H{i}: {why}.", "overrides": list(ovs)}
        if self.patch_every and self.repo is not None and i % self.patch_every == self.patch_every - 1:
            proposal["patch"] = comment_patch(self.repo, "src/research/model.py", f"note {i}")
            proposal["description"] = f"annotate the model ({i})"
        return tool_use(proposal, thinking=thinking)


def night_overrides(repo: Path, uri: str, tag: str, experiments: int, server: MessagesServer,
                    agent: tuple[str, ...] = (), tracking: bool = True) -> list[str]:
    return [f"search.repo={repo}", "search.progress=false", f"tracking.uri={uri}", f"tracking.enabled={tracking}",
            "device=cpu", f"search.tag={tag}",
            "search.timeout_s=60", "search.preflight=false", f"search.max_experiments={experiments}", "agent=claude",
            f"agent.base_url={server.url}", *agent]


def run_night(tmp: Path, experiments: int = 100, seconds_per_run: float = 150.0, budget_seconds: int = 120,
              agent: tuple[str, ...] = (), researcher: Optional[Callable] = None, outage: Optional[tuple] = None,
              tag: str = "night", server_kw: Optional[dict] = None, tracking: bool = True) -> dict:
    """One session of `experiments` runs, Claude played by `researcher` (ScriptedResearcher by default).

    seconds_per_run: what the server's clock advances per answered request (the run between two requests);
    budget_seconds: the session's budget.seconds (what agent.cache_ttl=auto reads); outage: (at request n,
    for s real seconds): the server fails every messages request in that window; tracking: MLflow on (off: faster,
    the same agent and costs).
    """
    from src.lab.loop import Search, train_overrides

    repo = make_repo(tmp)
    researcher = researcher or ScriptedResearcher(repo=repo)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    saved = os.environ.get("ANTHROPIC_API_KEY")
    os.environ["ANTHROPIC_API_KEY"] = KEY
    outage_log: list[float] = []
    try:
        with MessagesServer(api_key=KEY, seconds_per_request=seconds_per_run, **(server_kw or {})) as srv:
            def respond(body: dict, n: int) -> dict:
                if outage is not None and n == outage[0] and not outage_log:
                    srv.outage(outage[1])
                    outage_log.append(time.monotonic())
                    return error(529, "Overloaded")
                return researcher(body, n)

            srv.responder = respond
            ovs = [*night_overrides(repo, uri, tag, experiments, srv, agent, tracking), f"budget.seconds={budget_seconds}"]
            t0 = time.monotonic()
            s = Search(compose_search(ovs), train_overrides(ovs), fake_command())
            summary = s.run()
            wall = time.monotonic() - t0
            server = srv.totals()
            requests = list(srv.requests)
    finally:
        if saved is None:
            os.environ.pop("ANTHROPIC_API_KEY", None)
        else:
            os.environ["ANTHROPIC_API_KEY"] = saved
    sdir = Path(summary["dir"])
    return {"summary": summary, "rows": read_tsv(sdir / "results.tsv"), "dir": sdir, "wall_s": wall,
            "usage": json.loads((sdir / "agent_usage.json").read_text()), "server": server, "requests": requests,
            "outage_started": outage_log[0] if outage_log else None, "repo": repo}


def cost_table(title: str, out: dict) -> str:
    """The figures of one night as a small Markdown table."""
    u, rows = out["usage"]["session"], out["rows"]
    exps = [r for r in rows if r["exp"].startswith("exp-") and r["exp"].count("-") == 1]
    by: dict[str, int] = {}
    for r in exps:
        by[r.get("agent") or "-"] = by.get(r.get("agent") or "-", 0) + 1
    counted = [r for r in exps if r["status"] not in ("invalid", "interrupted")]
    prompt = u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"]
    return "\n".join([
        f"### {title}", "",
        "| experiments run (+ invalid) | proposed by | API calls | total cost | cost / experiment run | "
        "cost / API call | cache-read share of input | 1h cache writes | output tokens | wall |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {len(counted)} (+{len(exps) - len(counted)}) | {', '.join(f'{k} {v}' for k, v in sorted(by.items()))} | "
        f"{u['calls']} | ${u['cost_usd']:.2f} | ${u['cost_usd'] / max(1, len(counted)):.4f} | "
        f"${u['cost_usd'] / max(1, u['calls']):.4f} | {u['cache_read_input_tokens'] / max(1, prompt):.1%} | "
        f"{u['cache_creation_1h_input_tokens']:,} | {u['output_tokens']:,} | {out['wall_s']:.0f} s |", ""])
