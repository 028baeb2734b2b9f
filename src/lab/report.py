"""The report of a research session: leaderboard, progress plot, best diff and overrides.

Written into the session directory (report.md, progress.png, best.diff, best_overrides.yaml) and
logged to the session's MLflow parent run. The plot follows the reference: val_bpb per
experiment, discarded ones faint, kept ones highlighted and labelled, the running best as a step.

Usage: files = write_report(session_dir)        (python -m src.report [tag] is the CLI)
"""
from __future__ import annotations

import json

import math
from pathlib import Path
from typing import Optional

from src.lab import heldout
from src.lab.config import SearchConfig
from src.lab.ledger import Experiment, Ledger
from src.lab.runs import SessionRuns
from src.lab.session import Git, SessionError, SessionState, preset_name
from src.lab.decision import weak
from src.lab.standings import Standings
from src.lab.decisions import (BASELINE, CONFIRM, CRASH, DISCARD, DISTURBED, INTERRUPTED, INVALID, KEEP, PRUNED,
                               TAMPERED)


def _fmt(v: Optional[float], spec: str = ".6f") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def leaderboard(rows: list[Experiment]) -> list[Experiment]:
    """Rows with a val_bpb, best first (baseline repeats and experiments alike)."""
    scored = [e for e in rows if e.val_bpb is not None and e.status in (BASELINE, KEEP, DISCARD)]
    return sorted(scored, key=lambda e: e.val_bpb)


def evidence(e: Experiment, rows: list[Experiment]) -> str:
    """What a leaderboard row's verdict rests on: its screen run alone, or that and its (best, candidate) pairs."""
    if e.status == BASELINE:
        return "baseline run"
    pairs = sum(1 for r in rows if r.status == CONFIRM and r.exp.startswith(f"{e.exp}-c"))
    if e.proposal is not None and e.proposal.retest:  # an agent's retest of a near miss: no screen run of its own
        return f"{pairs} pair(s), retesting {e.proposal.retest}"
    return f"screen + {pairs} pair(s)" if pairs else "screen only"


def progress_plot(rows: list[Experiment], path: Path, title: str, spread: float = 0.0) -> Path:
    """val_bpb per experiment (x = ledger order of runs), kept highlighted, running best as a step line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [i for i, e in enumerate(rows) if e.status not in (INVALID, CONFIRM)]  # confirmations repeat shown rows
    ran = [rows[i] for i in shown]
    fig = Figure(figsize=(11, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(ran)))
    vals = [e.val_bpb for e in ran]
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    best_xs, best_ys = [], []
    for x, i, e in zip(xs, shown, ran):
        best = running_best(rows[: i + 1], spread)
        v = e.val_bpb
        if e.status == BASELINE and v is not None:
            ax.scatter(x, v, s=36, color="#1f77b4", zorder=3, label="baseline" if "baseline" not in
                       [t.get_label() for t in ax.collections] else None)
        elif e.status == KEEP:
            ax.scatter(x, v, s=60, color="#2ca02c", edgecolor="black", linewidth=0.6, zorder=4,
                       label="kept" if "kept" not in [t.get_label() for t in ax.collections] else None)
            ax.annotate(e.description[:40], (x, v), textcoords="offset points", xytext=(6, 6), fontsize=7,
                        color="#2ca02c", rotation=20)
        elif e.status == DISCARD and v is not None:
            ax.scatter(x, v, s=22, color="#bbbbbb", zorder=2,
                       label="discarded" if "discarded" not in [t.get_label() for t in ax.collections] else None)
        best_xs.append(x)
        best_ys.append(best if math.isfinite(best) else float("nan"))
    if finite:  # crashes and interruptions sit on the top edge as red crosses
        lo, hi = min(finite), max(finite)
        pad = max(hi - lo, 1e-3) * 0.08
        top = hi + pad
        for x, e in zip(xs, ran):
            if e.status in (CRASH, INTERRUPTED, TAMPERED):
                ax.scatter(x, top, marker="x", s=40, color="#d62728", zorder=3,
                           label="crash / interrupted" if "crash / interrupted" not in
                           [t.get_label() for t in ax.collections] else None)
            elif e.status == DISTURBED:
                ax.scatter(x, top, marker="^", s=40, color="#ff7f0e", zorder=3,
                           label="disturbed (not judged)" if "disturbed (not judged)" not in
                           [t.get_label() for t in ax.collections] else None)
        ax.set_ylim(lo - pad, top + pad)
    ax.step(best_xs, best_ys, where="post", color="#2ca02c", linewidth=1.6, alpha=0.8, label="running best")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment (ledger order; invalid proposals not shown)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def running_best(rows: list[Experiment], spread: float = 0.0) -> float:
    """The session's best after these rows (src/lab/standings.py's rule; inf before any baseline run)."""
    return Standings.of(rows, "", 0.0, 0.0, spread).best.val_bpb if rows else math.inf


def workers_lines(d: Path, rows: list[Experiment]) -> list[str]:
    """search.workers > 1: throughput and where the workers' time went (workers.json of the last invocation)."""
    try:
        u = json.loads((d / "workers.json").read_text())
    except (OSError, ValueError):
        return []
    slots = ", ".join(f"w{p['worker']} {p['slot']} ({p['experiments']} exp., idle {100 * p.get('idle', 0):.0f}%)"
                      for p in u.get("per_worker", []))
    rebased = sum(1 for e in rows if e.status == KEEP and "rebased" in e.reason)
    return [f"- workers: {u['workers']} ({slots}); {u['experiments']} experiments in {u['elapsed_s'] / 3600:.2f} h of the "
            f"last invocation = {u['experiments_per_hour']:.1f} per hour; worker time: training "
            f"{100 * u['training']:.0f}%, rest of the runs {100 * u['run_overhead']:.0f}%, scoring "
            f"{100 * u['scoring']:.0f}%, idle {100 * u.get('idle', u.get('waiting', 0)):.0f}%; {rebased} keep(s) rebased on a newer best, "
            f"{sum(1 for e in rows if e.status == 'conflict')} conflict(s)"]


def write_report(session_dir: Path, rows: Optional[list[Experiment]] = None, mlflow: bool = False) -> list[Path]:
    """Write report.md, progress.png, best.diff and best_overrides.yaml; optionally log them to MLflow."""
    d = Path(session_dir)
    state = SessionState.from_json((d / "state.json").read_text())
    ledger = Ledger(d)
    rows = ledger.rows() if rows is None else rows
    knobs = SearchConfig(**{k: v for k, v in state.search.items() if k in SearchConfig.__dataclass_fields__})
    st = Standings.of(rows, state.base_commit, knobs.noise_sigmas, knobs.min_delta, knobs.baseline_spread)
    noise, margin, base_mean = st.noise, st.margin, st.baseline
    kept = [e for e in rows if e.status == KEEP]
    best = kept[-1] if kept else None
    best_commit, best_val = st.best.commit, st.best.val_bpb
    wt = Git(d / "worktree")
    preset = f"conf/experiment/{preset_name(state.tag)}.yaml"
    try:
        diff = wt("diff", state.base_commit, best_commit) if best else ""
        overrides = wt("show", f"{best_commit}:{preset}") if best and wt.ok("cat-file", "-e", f"{best_commit}:{preset}") else ""
    except SessionError:
        diff, overrides = "", ""
    files = []
    (d / "best.diff").write_text(diff + ("\n" if diff else ""))
    (d / "best_overrides.yaml").write_text(overrides + ("\n" if overrides else "") if overrides else
                                           "# no overrides kept: the best is the baseline config\n")
    files += [d / "best.diff", d / "best_overrides.yaml"]
    n_ran = st.experiments_run
    title = f"research/{state.tag}: {n_ran} experiments, {len(kept)} kept"
    if rows:
        files.append(progress_plot(rows, d / "progress.png", title, knobs.baseline_spread))
    repro = " ".join(state.base_overrides + ([f"+experiment={preset_name(state.tag)}"] if overrides else []))
    lines = [f"# Research session `{state.tag}`", "",
             f"- branch `{state.branch}` (from `{state.base_commit[:7]}`), best commit `{best_commit[:7]}`"
             f" ({best.exp if best else 'baseline'})",
             f"- baseline val_bpb {_fmt(base_mean)} (mean of {st.baseline_runs}), best {_fmt(best_val)}"
             + (f", improvement {_fmt(base_mean - best_val, '.4f')}" if best and base_mean else ""),
             f"- noise floor: {noise.describe()}; screen margin {_fmt(margin, '.4f')}",
             f"- {rule(knobs, noise)}",
             f"- experiments run: {n_ran}, kept {len(kept)}, discarded {st.count('discard')}, "
             f"crashed {st.count('crash')}, pruned {st.count(PRUNED)}, invalid {st.count('invalid')}, "
             f"interrupted {st.count('interrupted')}, "
             f"disturbed {st.count(DISTURBED)}; {st.count(CONFIRM)} confirmation runs, "
             f"{st.disturbed_runs} disturbed runs set aside",
             f"- reproduce the best: `git checkout {best_commit[:12]} && python -m src.train {repro}`",
             *heldout_lines(d),
             *workers_lines(d, rows),
             f"- proposed by: {by_agent(rows)}", "",
             "## Leaderboard (best first)", "",
             "| rank | exp | val_bpb | delta vs baseline | status | decided on | commit | description |",
             "|---:|---|---:|---:|---|---|---|---|"]
    for i, e in enumerate(leaderboard(rows), 1):
        dv = e.val_bpb - base_mean if base_mean is not None else None
        lines.append(f"| {i} | {e.exp} | {_fmt(e.val_bpb)} | {_fmt(dv, '+.4f')} | {e.status} | {evidence(e, rows)} | "
                     f"`{e.commit[:7]}` | "
                     f"{e.description.replace('|', '/')[:100]} |")
    bad = [e for e in rows if e.status in (INVALID, CRASH, PRUNED, INTERRUPTED, DISTURBED, TAMPERED) or e.disturbed_runs]
    if bad:
        lines += ["", "## Invalid, crashed, pruned, interrupted and disturbed", "", "| exp | status | reason | description |",
                  "|---|---|---|---|"]
        lines += [f"| {e.exp} | {e.status} ({e.run_status}) | {e.reason.replace('|', '/')[:200]} | "
                  f"{e.description.replace('|', '/')[:80]} |" for e in bad]
    journal = d / "journal.md"  # agent=claude's research journal (src/lab/agents/claude.py)
    if journal.exists() and journal.read_text().strip():
        lines += ["", "## Research journal", "", *journal.read_text().strip().splitlines()[1:]]
    lines += ["", "## Best overrides", "", "```yaml", overrides.strip() or "# none", "```", "",
              "## Best diff (vs the session's base commit)", "", "```diff", diff.strip() or "# no change", "```", "",
              "![progress](progress.png)", ""]
    (d / "report.md").write_text("\n".join(lines))
    files.insert(0, d / "report.md")
    if mlflow and state.parent_run_id and state.tracking_uri:
        runs = SessionRuns(state.tracking_uri, state.tracking_experiment)
        runs.parent_id = state.parent_run_id
        runs.log_parent_files(files)
        held = heldout.read(d)
        if held is not None:
            runs.log_parent(len(rows), heldout.metrics(held), {"heldout": heldout.describe(held)})
    return files


def heldout_lines(d: Path) -> list[str]:
    """The held-out test split's verdict (src/lab/heldout.py), when the session has one."""
    r = heldout.read(d)
    if r is None:
        return ["- held-out test split: not scored (the session has not finished, or kept no baseline checkpoint)"]
    b, k = r["baseline"], r["best"]
    return [f"- held-out test split (no decision read it): **{heldout.describe(r)}**; baseline val "
            f"{_fmt(b['val_bpb'])} / test {_fmt(b['test_bpb'])}, best ({k['exp']}) val {_fmt(k['val_bpb'])} / "
            f"test {_fmt(k['test_bpb'])}"]


def by_agent(rows: list[Experiment]) -> str:
    """How many experiments each agent proposed (agent=claude's fallback rows count for the fallback agent)."""
    counts: dict[str, int] = {}
    for e in rows:
        if e.is_experiment:
            counts[e.agent or "-"] = counts.get(e.agent or "-", 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def rule(knobs: SearchConfig, noise) -> str:
    """The keep rule the session ran with, in words (docs/verdicts.md)."""
    confirm = {True: "always", False: "never", None: f"while sigma has < {knobs.confirm_min_dof} dof"}[knobs.confirm]
    return (f"keep rule: screen val_bpb < best - max({knobs.noise_sigmas:g} sigma, {knobs.min_delta:g}); paired "
            f"confirmation ({confirm}; now {'on' if weak(noise, knobs.confirm, knobs.confirm_min_dof) else 'off'}): "
            f"{knobs.confirm_pairs} pair(s), keep iff the mean gain > max({knobs.min_delta:g}, "
            f"t(1-{knobs.confirm_alpha:g}, dof) sigma sqrt(2/pairs)); disturbed: {knobs.disturbed_factor:g}x slower "
            f"than the session's fastest run of a shape ({knobs.disturbed_factor_new_shape:g}x by MFU for a new one)")
