"""What agent=claude shows the model: the static prefix, the per-turn state, outcomes, the tool.

The static prefix (the `system` prompt, cached) is program.md, the editable files at the best
commit, and the config the model may override (schemas and group options). It changes only when
the best commit changes. Each turn then carries the fresh state: the best and its config, the
noise margin, the budget and what is left, the history as a compact table (oldest rows condensed
to fit a character budget) and the last failure's log tail. Outcomes of earlier proposals come
back as tool results. Sizes are estimated in characters (chars_per_token), before sending.

Usage: system = system_text(program, state); text = state_text(state, spent, cap, max_chars)
"""
from __future__ import annotations

import glob
import inspect
import math
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

TOOL_NAME = "propose_experiment"
TOOL = {
    "name": TOOL_NAME,
    "description": (
        "Propose the next experiment: one idea, as Hydra config overrides and/or a code patch, with a "
        "one-line description and a hypothesis. The lab checks it (overrides must compose, the patch must "
        "apply to the files as shown and touch only editable files), trains it for the fixed budget and "
        "tells you the outcome (val_bpb, delta to the best, kept or discarded) in the next turn."),
    "input_schema": {
        "type": "object",
        "properties": {
            "description": {"type": "string",
                            "description": "One line (at most ~100 characters): what this experiment changes."},
            "hypothesis": {"type": "string",
                           "description": "Why it should lower val_bpb at this budget, and what you expect to see."},
            "overrides": {"type": "array", "items": {"type": "string"},
                          "description": "Hydra overrides applied on top of the current best, e.g. "
                                         "[\"optimizer.matrix_lr=0.03\", \"batch=small\"]. Empty for a pure code change."},
            "patch": {"type": "string",
                      "description": "A unified diff in git format (--- a/src/model.py, +++ b/src/model.py, "
                                     "@@ hunks with 3 lines of context) against the editable files exactly as "
                                     "shown. Omit for a pure config change."},
        },
        "required": ["description", "hypothesis"],
        "additionalProperties": False,
    },
}
FIELDS = set(TOOL["input_schema"]["properties"])


def estimate_tokens(obj: Any, chars_per_token: float) -> int:
    """Tokens of a prompt part, estimated from its characters (text) or its JSON (structures)."""
    import json

    n = len(obj) if isinstance(obj, str) else len(json.dumps(obj))
    return math.ceil(n / chars_per_token)


# ---------------------------------------------------------------------------- the static prefix


def editable_files(state) -> dict[str, str]:
    """The editable files (globs expanded) at the best commit, path -> text."""
    root = Path(state.worktree)
    out: dict[str, str] = {}
    for pat in state.editable:
        for p in sorted(glob.glob(str(root / pat), recursive=True)):
            rel = Path(p).relative_to(root).as_posix()
            if Path(p).is_file() and rel not in out:
                out[rel] = state.read(rel)
    return out


def config_reference(state) -> str:
    """The schemas of the config roots a proposal may override, and every option of their groups."""
    from src import config as config_mod

    parts = []
    for root in state.override_roots:
        schema = config_mod.GROUPS.get(root)
        if schema is not None:
            parts.append(f"### {root}.* (schema {schema.__name__} in src/config.py)\n```python\n"
                         f"{inspect.getsource(schema).strip()}\n```")
        group_dir = Path(state.worktree) / "conf" / root
        if group_dir.is_dir():
            opts = sorted(group_dir.glob("*.yaml"))
            if opts:
                parts.append(f"Options of the group `{root}` (select one with `{root}=<option>`; keys set "
                             "in the same proposal apply on top):")
                for p in opts:
                    parts.append(f"conf/{root}/{p.name}:\n```yaml\n{p.read_text().strip()}\n```")
    return "\n\n".join(parts)


def system_text(program: str, state) -> str:
    """program.md + the lab as it is at the best commit (cached while the best does not change)."""
    files = editable_files(state)
    blocks = [program.strip(), "", "# The lab as it is now", "",
              f"Best commit: {state.best.commit[:7]} ({state.best.exp}). A patch must apply with `git apply` to "
              f"these files exactly as shown and may touch only: {', '.join(state.editable)}. An override may set "
              f"keys under: {', '.join(state.override_roots)}."
              + (f" Fixed by the session's command line (do not set): {', '.join(state.pinned)}." if state.pinned
                 else ""), ""]
    for path, text in files.items():
        blocks += [f"## {path}", f"```python\n{text.rstrip()}\n```", ""]
    blocks += ["## The config you may override", "", config_reference(state)]
    return "\n".join(blocks).strip() + "\n"


# ---------------------------------------------------------------------------- the state of each turn


def _fmt(v: Optional[float], spec: str = ".6f", signed: bool = False) -> str:
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return format(v, ("+" if signed else "") + spec)


def _one_line(s: str, n: int) -> str:
    s = " ".join(str(s or "").split())
    return s if len(s) <= n else s[: n - 3] + "..."


def history_table(rows: list, max_chars: int, recent_full: int = 12) -> str:
    """The ledger as a table (exp, status, val_bpb, delta, kind, description, note), fitted to max_chars.

    Condensing, oldest first: rows older than the `recent_full` last lose their note and get a shorter
    description; then whole runs of old non-kept rows collapse into one counted line. Kept rows and the
    baseline always stay (they are the path to the current best).
    """
    head = "| exp | status | val_bpb | delta | kind | description | note |\n|---|---|---|---|---|---|---|"

    def line(e, full: bool) -> str:
        note = ""
        if e.status in ("invalid", "crash", "interrupted") or (e.run_status not in ("", "ok", "-") and e.run_status):
            note = (e.run_status + ": " if e.run_status and e.run_status not in ("-", "ok") else "") + (e.reason or "")
        elif e.status == "keep":
            note = "NEW BEST"
        return (f"| {e.exp} | {e.status} | {_fmt(e.val_bpb)} | {_fmt(e.delta, '.4f', True)} | {e.kind or '-'} | "
                f"{_one_line(e.description, 100 if full else 50)} | {_one_line(note, 160 if full else 0)} |")

    if not rows:
        return head + "\n| (no experiments yet) | | | | | | |"
    n = len(rows)
    full = [i >= n - recent_full for i in range(n)]
    lines = [line(e, f) for e, f in zip(rows, full)]

    def size() -> int:
        return len(head) + sum(len(s) + 1 for s in lines if s)

    if size() <= max_chars:
        return "\n".join([head, *lines])
    for i in range(n):  # shorten old rows first
        if size() <= max_chars:
            break
        if full[i]:
            full[i] = False
            lines[i] = line(rows[i], False)
    # collapse the oldest condensable rows (not baseline, not kept) into counted summary lines
    out, dropped = list(lines), []
    for i in range(n):
        if len(head) + sum(len(s) + 1 for s in out if s) + 120 <= max_chars:
            break
        if rows[i].status in ("baseline", "keep") or i >= n - 3:
            continue
        dropped.append(rows[i])
        out[i] = ""
    if dropped:
        counts: dict[str, int] = {}
        for e in dropped:
            counts[e.status] = counts.get(e.status, 0) + 1
        summary = (f"| ({len(dropped)} older rows condensed: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                   + f"; {dropped[0].exp}..{dropped[-1].exp}) | | | | | | |")
        first = next(i for i, s in enumerate(out) if s == "")
        out[first] = summary
    return "\n".join([head, *[s for s in out if s]])


def research_config(cfg, roots: list[str]) -> str:
    """The values of the research config (model, optimizer, batch) in effect at the best, as YAML."""
    parts = {}
    for r in roots:
        v = getattr(cfg, r, None)
        if v is not None:
            parts[r] = OmegaConf.to_container(OmegaConf.structured(v))
    return OmegaConf.to_yaml(OmegaConf.create(parts)).strip()


def budget_line(cfg) -> str:
    b, d = cfg.budget, cfg.device
    if b.mode == "tokens":
        what = f"{b.tokens:,} training tokens per run (budget.mode=tokens)"
    else:
        what = f"{b.seconds:g} training seconds per run (budget.mode=time: slower steps mean fewer steps)"
    return f"{what}; device {d.type}, dtype {d.dtype}; data {cfg.data.name}"


def last_failure(rows: list, runs_dir: Optional[Path], tail_chars: int) -> str:
    """The most recent crash/nan/timeout/stalled run and its log tail (or '' if none failed since the best)."""
    for e in reversed(rows):
        if e.status == "keep":
            return ""
        if e.status == "crash" or e.run_status in ("nan", "timeout", "stalled", "crash", "killed"):
            text = f"## Last failure: {e.exp} ({e.run_status or e.status}): {_one_line(e.reason, 400)}"
            tail = ""
            if runs_dir is not None and tail_chars > 0:
                last = e.exp if e.attempts <= 1 else f"{e.exp}-a{e.attempts}"  # the search's attempt dirs
                for name in dict.fromkeys([last, e.exp]):
                    p = Path(runs_dir) / name / "run.log"
                    if p.exists():
                        data = p.read_bytes()
                        tail = data[-tail_chars:].decode(errors="replace")
                        if len(data) > tail_chars and "\n" in tail:
                            tail = tail.split("\n", 1)[1]  # start at a whole line
                        break
            if tail.strip():
                text += f"\nLog tail ({e.exp}):\n```\n{tail.strip()}\n```"
            return text
    return ""


def state_text(state, spent_usd: float, cap_usd: float, history_chars: int, runs_dir: Optional[Path],
               tail_chars: int) -> str:
    """The fresh state for one turn: best, margin, budget, history table, last failure."""
    b = state.best
    ran = [e for e in state.history if e.exp.startswith("exp-")]
    threshold = b.val_bpb - state.margin if math.isfinite(b.val_bpb) else float("nan")
    lines = [
        f"# Session {state.tag}: proposal {len(ran) + 1} ({state.experiments_left} runs and "
        f"{state.seconds_left / 3600:.1f} h left)",
        f"Best: val_bpb {_fmt(b.val_bpb)} ({b.exp}, commit {b.commit[:7]}).",
        f"Noise: sigma {_fmt(state.sigma, '.4f')} between identical runs; margin {_fmt(state.margin, '.4f')}. "
        f"A proposal is kept only if its val_bpb < {_fmt(threshold)}.",
        f"Budget: {budget_line(state.best_config)}.",
        f"Overrides in effect at the best (on top of the session's baseline): "
        f"{' '.join(b.overrides) if b.overrides else '(none: the best is the baseline config)'}",
        f"Session command line (fixed): {' '.join(state.base_overrides) or '(defaults)'}",
        f"Agent spend so far: ${spent_usd:.2f} of the ${cap_usd:.2f} cap (agent.max_cost_usd).",
        "",
        "## Research config at the best",
        "```yaml", research_config(state.best_config, state.override_roots), "```",
        "",
        f"## History ({len(state.history)} rows, oldest first; delta = val_bpb - best before it, negative is better)",
        history_table(state.history, history_chars),
    ]
    fail = last_failure(state.history, runs_dir, tail_chars)
    if fail:
        lines += ["", fail]
    lines += ["", f"Propose the next experiment by calling {TOOL_NAME}."]
    return "\n".join(lines)


def outcome_text(e, fix_streak: int, fix_attempts: int) -> tuple[str, bool]:
    """The tool result for a proposal's ledger row: (text, is_error)."""
    if e.status == "invalid":
        if fix_streak >= fix_attempts:
            advice = (f"That is {fix_streak} invalid proposals in a row: drop this idea and propose a different, "
                      "simpler experiment.")
        else:
            advice = "Nothing was run. Correct exactly that and propose again."
        return f"INVALID ({e.exp}): {e.reason}\n{advice}", True
    val, delta, margin = _fmt(e.val_bpb), _fmt(e.delta, ".4f", True), _fmt(e.margin, ".4f")
    steps = f", {e.num_steps} steps" if e.num_steps else ""
    if e.status == "keep":
        return (f"KEPT ({e.exp}): val_bpb {val} (delta {delta}, margin {margin}{steps}). It is the new best "
                f"(commit {e.commit[:7]}); the next experiment starts from it."), False
    if e.status == "discard":
        return (f"DISCARDED ({e.exp}): val_bpb {val} (delta {delta}; needed below -{margin}{steps}). The branch "
                "was reset to the best." + (f" {e.reason}" if e.reason else "")), False
    if e.status == "crash":
        return (f"CRASHED ({e.exp}, run status {e.run_status}): {_one_line(e.reason, 600)}. The branch was reset "
                "to the best; the log tail is in the state below."), False
    return f"{e.status.upper()} ({e.exp}): {_one_line(e.reason, 400) or 'no result'}", False
