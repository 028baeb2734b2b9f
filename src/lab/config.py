"""Config schemas of the research loop: search, agent (one schema per agent kind) and search_space.

`python -m src.search` composes conf/search.yaml: the train groups (the baseline every experiment
starts from, typed by src/config.py) plus the groups below. Agents extend AgentConfig with their
own knobs; an agent's options live in conf/agent/<name>.yaml.

Usage: from src.lab.config import SearchAppConfig, register_search_configs
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from src.config import TrainConfig, register_configs

# environment variables a training run never sees (case-insensitive globs); search.env_strip's default
ENV_STRIP = ("ANTHROPIC_API_KEY", "*_API_KEY", "*TOKEN*", "*SECRET*", "*PASSWORD*")

@dataclass
class AgentConfig:
    name: str = "tpe"  # module under src/lab/agents/ (random and tpe share src/lab/agents/tpe.py)
    seed: int = 0  # the agent's own randomness (which proposals), never the training seed


@dataclass
class OptunaAgentConfig(AgentConfig):
    sampler: str = "tpe"  # tpe | random
    n_startup_trials: int = 4  # TPE: random proposals before the density model takes over
    multivariate: bool = True  # TPE: model the knobs jointly (they interact: LR x batch)
    tell_baseline: bool = True  # give the baseline's knob values and val_bpb to the sampler as trial 0


@dataclass
class ReplayAgentConfig(AgentConfig):
    file: str = ""  # YAML (a list, or {proposals: [...]}) or JSONL of proposals; relative to the cwd


@dataclass
class KnobConfig:
    key: str = ""  # dotted train config key, e.g. optimizer.matrix_lr
    type: str = "float"  # float | int | choice | same_as
    low: Optional[float] = None  # float/int: inclusive range
    high: Optional[float] = None
    log: bool = False  # float/int: sample on a log scale
    step: Optional[float] = None  # float/int: grid spacing
    choices: Optional[List[Any]] = None  # choice: the allowed values
    same_as: Optional[str] = None  # same_as: copy the value another knob got (batch.device_tokens = total)


@dataclass
class SearchSpaceConfig:
    name: str = "cpu"
    knobs: List[KnobConfig] = field(default_factory=list)


@dataclass
class SearchConfig:
    tag: Optional[str] = None  # session name; None = today's date (nov26, then nov26b, ...)
    resume: bool = False  # continue the session `tag` (after Ctrl-C, a crash or kill -9)
    max_experiments: int = 10  # experiments that run (baseline and invalid proposals not counted)
    max_hours: float = 8.0  # wall-clock limit of this invocation; no experiment starts after it
    baseline_repeats: int = 2  # baseline runs measuring the noise floor
    noise_sigmas: float = 2.0  # keep only if val_bpb < best - max(noise_sigmas * sigma, min_delta)
    min_delta: float = 0.002  # smallest improvement (val_bpb) ever kept, whatever sigma says
    confirm: bool = False  # re-run a would-be keep; keep only if the mean of both still wins
    stall_retries: int = 1  # a run marked `stalled` is re-run this many times
    timeout_factor: float = 3.0  # hard kill after budget.seconds * timeout_factor + timeout_grace_s
    timeout_grace_s: float = 180.0  # startup, evaluation and slack (seconds)
    timeout_s: Optional[float] = None  # explicit hard timeout per run; None = the formula (tokens mode: from the baseline)
    editable: List[str] = field(default_factory=lambda: ["src/model.py", "src/optim.py"])  # files a patch may touch (globs)
    override_roots: List[str] = field(default_factory=lambda: ["model", "optimizer", "batch"])  # keys a proposal may override
    max_invalid_in_row: int = 10  # stop when the agent keeps proposing invalid changes
    preflight: bool = True  # dry-run each candidate (compose + build the model on the meta device) before its run
    repo: Optional[str] = None  # git checkout the session branches from; None = this project's checkout
    root: Optional[str] = None  # where sessions live; None = <repo>/outputs/research
    base: str = "HEAD"  # commit the research branch starts from (uncommitted changes are not included)
    env_strip: List[str] = field(default_factory=lambda: list(ENV_STRIP))  # env vars the run never sees
    env_keep: List[str] = field(default_factory=list)  # exceptions to env_strip (e.g. MLFLOW_TRACKING_TOKEN)
    progress: bool = True  # progress bar over experiments


def check_search(s: SearchConfig) -> None:
    """Refuse knobs that make no sense, before anything is created (ValueError naming the accepted range)."""
    if s.noise_sigmas < 0 or s.min_delta < 0 or s.baseline_repeats < 1 or s.max_experiments < 0:
        raise ValueError(f"search.noise_sigmas={s.noise_sigmas}, search.min_delta={s.min_delta}, "
                         f"search.baseline_repeats={s.baseline_repeats}, search.max_experiments="
                         f"{s.max_experiments}: expected noise_sigmas >= 0, min_delta >= 0, baseline_repeats "
                         ">= 1 (2 or more to measure the noise floor), max_experiments >= 0")


@dataclass
class SearchAppConfig(TrainConfig):
    search: SearchConfig = field(default_factory=SearchConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)


# ---------------------------------------------------------------------------- agent=claude
# src/lab/agents/claude.py; options in conf/agent/claude.yaml. The API key is never a config value: it is
# read from the environment variable named by api_key_env.


@dataclass
class ClaudePrice:
    """USD per million tokens; the cost caps are only as right as these (see anthropic.com/pricing)."""
    input: float = MISSING  # uncached input
    output: float = MISSING
    cache_write: float = MISSING  # input written to the 5-minute prompt cache (1.25 x input)
    cache_read: float = MISSING  # input read from the cache (0.1 x input)


@dataclass
class ClaudeAgentConfig(AgentConfig):
    name: str = "claude"
    model: str = "claude-sonnet-4-6"  # must have an entry in `prices` (or be a dated snapshot of one)
    max_tokens: int = 16000  # output tokens per reply (thinking included, on models that think)
    force_tool: bool = True  # tool_choice forces propose_experiment; off for the session if the model refuses it
    base_url: Optional[str] = None  # None: $ANTHROPIC_BASE_URL, else the SDK's default (api.anthropic.com)
    api_key_env: str = "ANTHROPIC_API_KEY"  # the environment variable holding the key (never the key itself)
    timeout_s: float = 600.0  # per HTTP request
    max_retries: int = 4  # the SDK's own retries, with backoff, on 408/409/429/5xx and connection errors
    patience_s: float = 900.0  # then keep retrying a failing API this long (waits from retry_wait_s, doubling) before pausing
    retry_wait_s: float = 30.0
    attempts: int = 3  # replies per proposal (end_turn without the tool, max_tokens, refusal, malformed input) before pausing
    fix_attempts: int = 2  # invalid proposals in a row the model is asked to correct before being told to move on
    context_tokens: int = 60000  # prompt budget (prefix + conversation); the oldest turns and history rows are condensed
    chars_per_token: float = 3.0  # prompt sizes are estimated from characters before sending (code is ~3 chars/token)
    log_tail_chars: int = 3000  # of the last failed run's log shown to the model
    program: str = "program.md"  # the research strategy; relative: the current directory, else the session's worktree
    cache: bool = True  # prompt caching (cache_control) on the static prefix
    preflight: bool = True  # before the baseline: check key, API and model with a free count_tokens request
    max_cost_usd: float = 5.0  # session cap (all invocations); no request that could cross it is sent
    max_session_tokens: Optional[int] = None  # session cap on input + output + cache tokens; None: none
    prices: dict[str, ClaudePrice] = field(default_factory=dict)  # model (or prefix of a dated name) -> price


AGENT_SCHEMAS = {"optuna": OptunaAgentConfig, "replay": ReplayAgentConfig, "claude": ClaudeAgentConfig}


def register_search_configs() -> None:
    """Register the train schemas plus the research loop's (`search_schema`, `agent/<kind>_schema`, ...)."""
    register_configs()
    cs = ConfigStore.instance()
    for kind, schema in AGENT_SCHEMAS.items():
        cs.store(group="agent", name=f"{kind}_schema", node=schema)
    cs.store(group="search_space", name="schema", node=SearchSpaceConfig)
    cs.store(name="search_schema", node=SearchAppConfig)
