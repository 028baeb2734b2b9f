"""Replays a file of proposals in order: reproducible sessions, demos and tests.

The file is YAML (a list of proposals, or a mapping with a `proposals:` list) or JSONL (one
proposal per line). Each proposal: description, hypothesis, overrides (list of key=value),
patch (a unified diff) or patch_file (a path relative to the replay file); or retest: exp-NNN, a near miss
to run again in pairs against the best (src/lab/retest.py). On resume it
continues after the last proposal the ledger holds.

Usage: python -m src.search agent=replay agent.file=demo.yaml
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from src.lab.agents.base import Agent, SearchState
from src.lab.config import ReplayAgentConfig, SearchSpaceConfig
from src.lab.ledger import Experiment
from src.lab.proposal import InvalidProposal, Proposal


def build(cfg: ReplayAgentConfig, space: SearchSpaceConfig) -> "ReplayAgent":
    return ReplayAgent(cfg)


def load_proposals(path: Path) -> list[Proposal]:
    if not path.is_file():
        raise ValueError(f"agent.file={path}: no such file; expected a YAML or JSONL file of proposals")
    text = path.read_text()
    if path.suffix == ".jsonl":
        items = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e})") from None
    else:
        import yaml

        items = yaml.safe_load(text)
        if isinstance(items, dict):
            items = items.get("proposals")
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of proposals (YAML list, `proposals:` list or JSONL)")
    out = []
    for i, d in enumerate(items):
        if isinstance(d, dict) and "patch_file" in d:
            d = dict(d)
            d["patch"] = (path.parent / d.pop("patch_file")).read_text()
        try:
            out.append(Proposal.from_dict(d))
        except InvalidProposal as e:
            raise ValueError(f"{path}: proposal {i + 1}: {e}") from None
    return out


class ReplayAgent(Agent):
    name = "replay"

    def __init__(self, cfg: ReplayAgentConfig):
        if not cfg.file or cfg.file == "???":
            raise ValueError("agent=replay needs agent.file=<proposals.yaml|.jsonl>")
        self.path = Path(cfg.file).expanduser().resolve()
        self.proposals = load_proposals(self.path)
        self.cursor = 0

    def _seen(self, e: Experiment) -> None:
        idx = e.proposal.meta.get("replay_index") if e.proposal else None
        if isinstance(idx, int):
            self.cursor = max(self.cursor, idx + 1)

    def restore(self, history: list[Experiment], state: SearchState) -> None:
        for e in [*history, *state.in_flight]:  # in flight: a resume finishes them; the file goes on after them
            self._seen(e)

    def observe(self, e: Experiment, state: SearchState) -> None:
        self._seen(e)

    def propose(self, state: SearchState) -> Optional[Proposal]:
        if self.cursor >= len(self.proposals):
            return None
        p = self.proposals[self.cursor]
        p = Proposal(p.description, p.hypothesis, list(p.overrides), p.patch,
                     {**p.meta, "agent": "replay", "replay_index": self.cursor, "file": str(self.path)}, p.retest)
        self.cursor += 1
        return p
