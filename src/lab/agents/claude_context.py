"""What agent=claude shows the model: the static prefix, the tool, outcomes, digests and the dashboard.

- The static prefix (`system`, cached): program.md, how the conversation works, the editable files
  at the best commit and the config the model may override. It changes only when a kept patch
  changes the editable files.
- Outcomes (appended to the conversation, never edited): the result of the model's last proposal
  (the tool_result) and every other ledger row since (baseline and confirmation runs, rows the
  fallback agent proposed while the API was unavailable), each with its overrides, steps, tokens/s,
  memory and status reason.
- The digest opens a conversation (a new one, a resumed one without its saved turns, or one
  condensed in a single step): every ledger row so far as a table, oldest rows condensed to fit.
- The dashboard (the last block of each request, not cached, never kept): the best and its config,
  noise margin, budget and spend, learning curves of the best and the last run, near misses, the
  last failure's log tail while it is recent, and the research journal.
- The research journal is the `learned` and `next_ideas` of each proposal (kept in its
  proposals/<exp>.json), joined with the outcome: shown every turn, written to journal.md.
Sizes are estimated from characters (chars_per_token) before sending.

Usage: system = system_text(program, state); tool = tool_schema(analysis=False, strict=True)
       text = dashboard(state, Extras(...)); journal_markdown(rows, tag)
"""
from __future__ import annotations

from src.lab.decisions import BASELINE, CRASH, DISCARD, INVALID, KEEP, KILLED, NAN, OK, STALLED, TIMEOUT
import glob
import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

log = logging.getLogger("src.lab.agents.claude")

TOOL_NAME = "propose_experiment"
# one field per line: the order is the order the model writes them in (reasoning first, then the proposal)
_PROPERTIES = {
    "analysis": {"type": "string",
                 "description": "Think first: what the latest outcomes show (delta against the margin, steps and "
                                "tokens/s in this time budget, learning curves), which hypotheses are still alive, and "
                                "why this experiment is the most informative next one. A few sentences."},
    "learned": {"type": "string",
                "description": "For your research journal: what the outcomes since your last proposal taught (one or "
                               "two sentences; 'nothing new' is fine). It is kept across condensed conversations "
                               "and resumes."},
    "next_ideas": {"type": "array", "items": {"type": "string"},
                   "description": "Your queue of ideas to try after this one, best first (a few short items). The "
                                  "journal shows the latest queue every turn."},
    "description": {"type": "string",
                    "description": "One line (at most ~100 characters): what this experiment changes."},
    "hypothesis": {"type": "string",
                   "description": "Why it should lower val_bpb at this budget, and what you expect to see."},
    "overrides": {"type": "array", "items": {"type": "string"},
                  "description": "Hydra overrides applied on top of the current best, e.g. "
                                 "[\"optimizer.matrix_lr=0.03\", \"batch=small\"]. Empty for a pure code change."},
    "patch": {"type": "string",
              "description": "A unified diff in git format (--- a/src/research/model.py, +++ b/src/research/model.py, @@ hunks with 3 "
                             "lines of context) against the editable files exactly as shown. Empty or omitted for a "
                             "pure config change."},
    "retest": {"type": "string",
               "description": "Instead of a new change: the id of a near miss from the near-miss list (e.g. "
                              "\"exp-007\") to run again in (best, candidate) pairs against the current best; the lab "
                              "re-runs its change as it was (leave overrides and patch empty). Once per experiment. "
                              "Empty or omitted otherwise."},
}
FIELDS = set(_PROPERTIES)
DESCRIPTION = (
    "Propose the next experiment: one idea, as Hydra config overrides and/or a code patch, with a one-line "
    "description and a hypothesis, plus what you learned and your next ideas (your research journal). The lab "
    "checks it (overrides must compose, the patch must apply to the files as shown and touch only editable "
    "files), trains it for the fixed budget and tells you the outcome (val_bpb, delta to the best, kept or "
    "discarded, steps, tokens/s, memory) in the next turn. Or, instead of a new change, ask for a retest of a "
    "near miss (`retest`).")


def tool_schema(analysis: bool, strict: bool) -> dict:
    """The tool: `analysis` first when the model does not think before answering; `strict` constrains its input
    to the schema (then every object is closed and the list fields are required, possibly empty)."""
    props = {k: v for k, v in _PROPERTIES.items() if analysis or k != "analysis"}
    required = [k for k in props if k not in ("patch", "retest")] if strict else \
        [k for k in ("analysis", "learned", "description", "hypothesis") if k in props]
    tool = {"name": TOOL_NAME, "description": DESCRIPTION,
            "input_schema": {"type": "object", "properties": props, "required": required,
                             "additionalProperties": False}}
    if strict:
        tool["strict"] = True
    return tool


def estimate_tokens(obj: Any, chars_per_token: float) -> int:
    """Tokens of a prompt part, estimated from its characters (text) or its JSON (structures)."""
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
    from src.harness import config as config_mod

    parts = []
    for root in state.override_roots:
        schema = config_mod.GROUPS.get(root)
        if schema is not None:
            parts.append(f"### {root}.* (schema {schema.__name__} in src/harness/config.py)\n```python\n"
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


CONVERSATION_NOTES = f"""# How this conversation works

- Each of my turns starts with the outcome of your last proposal (the result of your {TOOL_NAME} call)
  and the other ledger rows since then: baseline and confirmation runs of the lab, and rows that an
  offline fallback agent (e.g. tpe) proposed while the API was unavailable. Each row says who proposed it.
- The last block of each turn is the current state: the best and its config, the margin, the budget,
  learning curves, near misses, the last failure, and your research journal.
- Your journal is the `learned` and `next_ideas` fields of your proposals. Earlier turns are condensed
  into a digest from time to time (and the session may be resumed later): the journal and the history
  table are what survives, so write there what you want to remember.
- Think before you propose; then answer with exactly one {TOOL_NAME} call.
"""


def system_text(program: str, state) -> str:
    """program.md + how the conversation works + the editable files and the config reference."""
    blocks = [program.strip(), "", CONVERSATION_NOTES, "# The lab", "",
              f"A patch must apply with `git apply` to the editable files exactly as shown below (they are the best "
              f"commit's) and may touch only: {', '.join(state.editable)}. An override may set keys under: "
              f"{', '.join(state.override_roots)}."
              + (f" Fixed by the session's command line (do not set): {', '.join(state.pinned)}." if state.pinned
                 else ""), ""]
    for path, text in editable_files(state).items():
        blocks += [f"## {path}", f"```python\n{text.rstrip()}\n```", ""]
    blocks += ["## The config you may override", "", config_reference(state)]
    return "\n".join(blocks).strip() + "\n"


# ---------------------------------------------------------------------------- rows


def _fmt(v: Optional[float], spec: str = ".6f", signed: bool = False) -> str:
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return format(v, ("+" if signed else "") + spec)


def _one_line(s: str, n: int) -> str:
    s = " ".join(str(s or "").split())
    return s if len(s) <= n or n <= 0 else s[: n - 3] + "..."


def proposed_by(e) -> str:
    """Who proposed a row: the agent named in its proposal's meta; `lab` for baseline and confirmation runs."""
    meta = e.proposal.meta if e.proposal is not None else {}
    return str(meta.get("proposed_by") or meta.get("agent") or ("lab" if e.proposal is None else "-"))


def figures(e) -> str:
    """steps, throughput, memory: in a time budget throughput decides how many steps a change gets."""
    parts = []
    if e.num_steps:
        parts.append(f"{e.num_steps} steps")
    if e.tokens_per_sec:
        parts.append(f"{e.tokens_per_sec / 1000:.1f}k tok/s")
    if e.memory_gb:
        parts.append(f"{e.memory_gb:.2f} GB")
    return ", ".join(parts)


def status_reason(e) -> str:
    rs = e.run_status if e.run_status not in ("", OK, "-") else ""
    return "; ".join(s for s in (rs, _one_line(e.reason, 300)) if s)


def row_line(e) -> str:
    """One ledger row in full: who, verdict, score, what it changed, its figures and why it ended so."""
    score = f"val_bpb {_fmt(e.val_bpb)}"
    if e.delta is not None:
        score += f" (delta {_fmt(e.delta, '.4f', True)}, margin {_fmt(e.margin, '.4f')})"
    what = " ".join(filter(None, [e.overrides or "", "+patch" if e.kind and "patch" in e.kind else ""]))
    bits = [f"{e.exp} [{proposed_by(e)}] {e.status}: {score}", _one_line(e.description, 100)]
    if what and e.kind != BASELINE:
        bits.append(f"overrides: {_one_line(what, 200)}")
    if figures(e):
        bits.append(figures(e))
    if status_reason(e):
        bits.append(status_reason(e))
    return "- " + " | ".join(bits)


def history_table(rows: list, max_chars: int, recent_full: int = 12) -> str:
    """The ledger as a table, fitted to max_chars.

    Condensing, oldest first: rows older than the `recent_full` last lose their note and get a shorter
    description; then whole runs of old non-kept rows collapse into one counted line. Kept rows and the
    baseline always stay (they are the path to the current best).
    """
    head = ("| exp | by | status | val_bpb | delta | steps | tok/s | overrides | description | note |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    empty = "| | | | | | | | | | |"

    def line(e, full: bool) -> str:
        note = status_reason(e) if e.status != KEEP else "NEW BEST"
        ovs = e.overrides if e.kind != BASELINE else ""
        tps = f"{e.tokens_per_sec / 1000:.1f}k" if e.tokens_per_sec else "-"
        return (f"| {e.exp} | {proposed_by(e)} | {e.status} | {_fmt(e.val_bpb)} | {_fmt(e.delta, '.4f', True)} | "
                f"{e.num_steps or '-'} | {tps} | "
                f"{_one_line(ovs, 120 if full else 60) or '-'} | {_one_line(e.description, 100 if full else 50)} | "
                f"{_one_line(note, 160 if full else 0)} |")

    if not rows:
        return head + "\n| (no experiments yet) " + empty[1:]
    n = len(rows)
    full = [i >= n - recent_full for i in range(n)]
    lines = [line(e, f) for e, f in zip(rows, full)]

    def size(ls) -> int:
        return len(head) + sum(len(s) + 1 for s in ls if s)

    for i in range(n):  # shorten old rows first
        if size(lines) <= max_chars:
            break
        if full[i]:
            full[i] = False
            lines[i] = line(rows[i], False)
    out, dropped = list(lines), []
    for i in range(n):  # collapse the oldest condensable rows (not baseline, not kept) into a counted line
        if size(out) + 120 <= max_chars:
            break
        if rows[i].status in (BASELINE, KEEP) or i >= n - 3:
            continue
        dropped.append(rows[i])
        out[i] = ""
    if dropped:
        counts: dict[str, int] = {}
        for e in dropped:
            counts[e.status] = counts.get(e.status, 0) + 1
        summary = (f"| ({len(dropped)} older rows condensed: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                   + f"; {dropped[0].exp}..{dropped[-1].exp}) " + empty[1:])
        out[next(i for i, s in enumerate(out) if s == "")] = summary
    return "\n".join([head, *[s for s in out if s]])


def outcome_text(e, fix_streak: int, fix_attempts: int) -> tuple[str, bool]:
    """The tool result for the ledger row of the model's proposal: (text, is_error)."""
    if e.status == INVALID:
        if fix_streak >= fix_attempts:
            advice = (f"That is {fix_streak} invalid proposals in a row: drop this idea and propose a different, "
                      "simpler experiment.")
        else:
            advice = "Nothing was run. Correct exactly that and propose again."
        return f"INVALID ({e.exp}): {e.reason}\n{advice}", True
    val, delta, margin = _fmt(e.val_bpb), _fmt(e.delta, ".4f", True), _fmt(e.margin, ".4f")
    figs = f" | {figures(e)}" if figures(e) else ""
    if e.status == KEEP:
        return (f"KEPT ({e.exp}): val_bpb {val} (delta {delta}, margin {margin}){figs}. It is the new best "
                f"(commit {e.commit[:7]}); the next experiment starts from it." +
                (f" {_one_line(e.reason, 400)}" if e.reason else "")), False
    if e.status == DISCARD:
        return (f"DISCARDED ({e.exp}): val_bpb {val} (delta {delta}; needed below -{margin}){figs}. The branch was "
                "reset to the best." + (f" {_one_line(e.reason, 400)}" if e.reason else "")), False
    if e.status == CRASH:
        return (f"CRASHED ({e.exp}, run status {e.run_status}): {_one_line(e.reason, 600)}{figs}. The branch was "
                "reset to the best; the log tail is in the state below."), False
    return f"{e.status.upper()} ({e.exp}): {_one_line(status_reason(e), 400) or 'no result'}{figs}", False


def new_rows_text(rows: list) -> str:
    if not rows:
        return ""
    return ("Ledger rows since your last proposal (the lab's runs, or proposals of the fallback agent while the "
            "API was unavailable):\n" + "\n".join(row_line(e) for e in rows))


def digest_text(rows: list, table_chars: int, condensed: bool) -> str:
    why = ("Earlier turns of this conversation were condensed into this digest; your research journal is in the "
           "state below." if condensed else "This is the start of the conversation for this session (or of a "
           "resumed one).")
    return (f"# The session so far\n{why}\n\n## History ({len(rows)} rows, oldest first; delta = val_bpb - best "
            f"before it, negative is better; by = who proposed it)\n{history_table(rows, table_chars)}")


# ---------------------------------------------------------------------------- the journal


def journal_entries(rows: list) -> list[tuple[Any, str, list[str]]]:
    """(row, learned, next_ideas) of every proposal that wrote to the journal, oldest first."""
    out = []
    for e in rows:
        meta = e.proposal.meta if e.proposal is not None else {}
        if meta.get("learned") or meta.get("next_ideas"):
            ideas = meta.get("next_ideas") or []
            out.append((e, str(meta.get("learned") or "").strip(),
                        [str(i) for i in (ideas if isinstance(ideas, list) else [ideas])]))
    return out


def _verdict(e) -> str:
    if e.status in (KEEP, DISCARD) and e.val_bpb is not None:
        return f"{e.status} {_fmt(e.val_bpb, '.4f')} ({_fmt(e.delta, '.4f', True)})"
    return e.status or "running"


def journal_text(rows: list, max_chars: int) -> str:
    """The journal for the dashboard: the latest idea queue, then entries newest first until max_chars."""
    entries = journal_entries(rows)
    if not entries:
        return "(empty: fill `learned` and `next_ideas` in your proposals)"
    last_ideas = entries[-1][2]
    lines = ["Idea queue (your latest next_ideas): " + ("; ".join(_one_line(i, 160) for i in last_ideas[:8]) or "-")]
    used = len(lines[0])
    shown = 0
    for e, learned, _ in reversed(entries):
        line = f"- before {e.exp} ({_one_line(e.description, 60)} -> {_verdict(e)}): {_one_line(learned, 300)}"
        if used + len(line) > max_chars and shown:
            lines.append(f"- ({len(entries) - shown} older entries in journal.md)")
            break
        lines.append(line)
        used += len(line) + 1
        shown += 1
    return "\n".join(lines)


def journal_markdown(rows: list, tag: str) -> str:
    """journal.md: every entry with the experiment it led to and that experiment's outcome."""
    lines = [f"# Research journal: session {tag}", "",
             "Written by agent=claude: with each proposal, what the outcomes so far taught (`learned`) and the "
             "ideas queued next. Each heading is the experiment the entry led to, and its outcome.", ""]
    for e, learned, ideas in journal_entries(rows):
        lines += [f"## {e.exp}: {_one_line(e.description, 100)} -> {_verdict(e)}", "",
                  f"Learned: {learned or '-'}", ""]
        if ideas:
            lines += ["Next ideas:", *[f"{i}. {_one_line(s, 300)}" for i, s in enumerate(ideas, 1)], ""]
    if len(lines) == 4:
        lines.append("(no entries yet)")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- the dashboard


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


NEAR_MISSES = "## Near misses since the best"  # the dashboard's heading of the list (the benches' stand-in reads it)


def near_misses(rows: list, best, margin: float, n: int = 5) -> list:
    """Rows since the best was set that beat it, but inside the margin: noise, or a real small gain worth
    combining with another or re-running."""
    start = next((i for i, e in enumerate(rows) if e.exp == best.exp), -1) + 1
    out = [e for e in rows[start:] if e.is_experiment and e.status == DISCARD and e.delta is not None
           and e.delta < 0 and -e.delta <= (e.margin if e.margin is not None else margin)]
    return sorted(out, key=lambda e: e.delta)[:n]


def last_failure(rows: list, runs_dir: Optional[Path], tail_chars: int, recent: int = 2) -> str:
    """The latest crash/nan/timeout among the last `recent` experiments (none since a keep), with its log tail.
    An older failure is history (the table keeps its reason), not news."""
    exps = [e for e in rows if e.is_experiment]
    for e in reversed(exps[-recent:]):
        if e.status == KEEP:
            return ""
        if e.status == CRASH or e.run_status in (NAN, TIMEOUT, STALLED, CRASH, KILLED):
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


class LossCurves:
    """train/loss of a run at 25/50/75/100% of its steps, from the session's MLflow store (the child run of
    the row). Each run is read once; a store that cannot be read gives no curve."""
    POINTS = (0.25, 0.5, 0.75, 1.0)

    def __init__(self, session_dir: Optional[Path]):
        self.uri: Optional[str] = None
        if session_dir is not None:
            try:
                self.uri = json.loads((Path(session_dir) / "state.json").read_text()).get("tracking_uri")
            except (OSError, ValueError):
                self.uri = None
        self._cache: dict[str, Optional[list[float]]] = {}

    def of(self, run_id: str) -> Optional[list[float]]:
        if not run_id or not self.uri:
            return None
        if run_id not in self._cache:
            self._cache[run_id] = self._read(run_id)
        return self._cache[run_id]

    def _read(self, run_id: str) -> Optional[list[float]]:
        try:
            from mlflow.tracking import MlflowClient

            hist = MlflowClient(tracking_uri=self.uri).get_metric_history(run_id, "train/loss")
        except Exception as e:  # no store, no run: no curve (the dashboard just omits it)
            log.debug("no learning curve for run %s: %s", run_id, e)
            return None
        pts = sorted((m.step, m.value) for m in hist if math.isfinite(m.value))
        if len(pts) < 4:
            return None
        out = []
        n = len(pts)
        w = max(1, n // 40)  # average over ~2.5% of the steps: one step's loss is noisy
        for q in self.POINTS:
            i = min(n - 1, max(0, round(q * n) - 1))
            window = [v for _, v in pts[max(0, i - w + 1): i + 1]]
            out.append(sum(window) / len(window))
        return out


@dataclass
class Extras:
    """What the dashboard needs beyond the SearchState."""
    spent_usd: float = 0.0
    cap_usd: float = 0.0
    runs_dir: Optional[Path] = None
    tail_chars: int = 2000
    journal_chars: int = 3000
    curves: Optional[LossCurves] = None
    notes: list[str] = field(default_factory=list)  # e.g. the previous reply was cut at max_tokens
    plain: bool = False  # after a refusal: the essentials only (no log tail, no journal text)
    tuner: str = ""  # agent=hybrid: the optimizer's state (src/lab/agents/hybrid.py)


def curve_lines(state, curves: Optional[LossCurves]) -> list[str]:
    if curves is None:
        return []
    rows = [e for e in state.history if e.mlflow_run_id and e.status in (BASELINE, KEEP, DISCARD, CRASH)]
    best = next((e for e in reversed(rows) if e.exp == state.best.exp), None) or \
        next((e for e in rows if e.status == BASELINE), None)
    last = next((e for e in reversed(rows) if e.is_experiment), None)
    out = []
    for label, e in (("best", best), ("last", last)):
        if e is None or (label == "last" and best is not None and e.exp == best.exp):
            continue
        c = curves.of(e.mlflow_run_id)
        if c:
            figs = f" ({figures(e)})" if figures(e) else ""
            out.append(f"- {label} {e.exp}: " + " ".join(f"{v:.3f}" for v in c) + figs)
    return (["## Learning curves (train loss at 25 / 50 / 75 / 100% of the budget)", *out] if out else [])


def in_flight_line(e) -> str:
    """One experiment running on another worker: its id, description, overrides, whether it patches code."""
    p = e.proposal
    ovs = " ".join(p.overrides) if p is not None and p.overrides else ""
    return (f"- {e.exp}: {_one_line(e.description, 120)}" + (f"; overrides: {ovs}" if ovs else "")
            + ("; with a code patch" if p is not None and p.patch else ""))


def dashboard(state, x: Extras) -> str:
    """The state of this turn (not cached, not kept): what changed least first, the journal last."""
    b = state.best
    ran = [e for e in state.history if e.is_experiment]
    threshold = b.val_bpb - state.margin if math.isfinite(b.val_bpb) else float("nan")
    lines = [
        f"# State now: before proposal {len(ran) + 1} of session {state.tag} ({state.experiments_left} runs and "
        f"{state.seconds_left / 3600:.1f} h left)",
        f"Best: val_bpb {_fmt(b.val_bpb)} ({b.exp}, commit {b.commit[:7]}); baseline mean {_fmt(state.baseline)}.",
        f"Noise: sigma {_fmt(state.sigma, '.4f')} between identical runs; margin {_fmt(state.margin, '.4f')}. "
        f"A proposal is kept only if its val_bpb < {_fmt(threshold)}.",
        f"Budget: {budget_line(state.best_config)}.",
        f"Overrides in effect at the best (on top of the session's baseline): "
        f"{' '.join(b.overrides) if b.overrides else '(none: the best is the baseline config)'}",
        f"Session command line (fixed): {' '.join(state.base_overrides) or '(defaults)'}",
        f"Agent spend so far: ${x.spent_usd:.2f} of the ${x.cap_usd:.2f} cap (agent.max_cost_usd).",
    ]
    if not x.plain:
        lines += ["", "## Research config at the best", "```yaml",
                  research_config(state.best_config, state.override_roots), "```"]
    curves = curve_lines(state, x.curves)
    if curves:
        lines += ["", *curves]
    if x.tuner:
        lines += ["", x.tuner]
    near = near_misses(state.history, b, state.margin)
    if near:
        lines += ["", f"{NEAR_MISSES} (better, but inside the margin; the lab retests one that beat the "
                      "best by over search.retest_within of the margin, and its row says how that went: combine them, "
                      "or ask for a retest of one with no pairs yet, `retest`: its id, once per experiment)",
                  *[row_line(e) for e in near]]
    flying = getattr(state, "in_flight", None) or []
    if flying:  # search.workers > 1
        lines += ["", "## In flight now (running on other workers, no result yet: do not propose these again)",
                  *[in_flight_line(e) for e in flying]]
    if not x.plain:
        fail = last_failure(state.history, x.runs_dir, x.tail_chars)
        if fail:
            lines += ["", fail]
        lines += ["", "## Your research journal (newest first; journal.md keeps all of it)",
                  journal_text(state.history, x.journal_chars)]
    lines += ["", *x.notes, f"Propose the next experiment by calling {TOOL_NAME}."]
    return "\n".join(s for s in lines if s is not None).replace("\n\n\n", "\n\n")
