"""Config schemas of the research loop: search, agent (one schema per agent kind) and search_space.

`python -m src.search` composes conf/search.yaml: the train groups (the baseline every experiment
starts from, typed by src/harness/config.py) plus the groups below. Agents extend AgentConfig with their
own knobs; an agent's options live in conf/agent/<name>.yaml.

Usage: from src.lab.config import SearchAppConfig, register_search_configs
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from src.harness.config import TrainConfig, register_configs

# environment variables a training run never sees (case-insensitive globs); search.env_strip's default
ENV_STRIP = ("ANTHROPIC_API_KEY", "*_API_KEY", "*TOKEN*", "*SECRET*", "*PASSWORD*")

@dataclass
class AgentConfig:
    name: str = "tpe"  # module under src/lab/agents/ (random and tpe share src/lab/agents/tpe.py)
    seed: int = 0  # the agent's own randomness (which proposals), never the training seed


@dataclass
class OptunaAgentConfig(AgentConfig):
    sampler: str = "tpe"  # tpe | random | cmaes (CMA-ES: agent=hybrid agent.tuner=cmaes, or sampler=cmaes here)
    n_startup_trials: int = 4  # TPE: random proposals before the density model takes over
    multivariate: bool = True  # TPE: model the knobs jointly (they interact: LR x batch)
    tell_baseline: bool = True  # give the baseline's knob values and val_bpb to the sampler as trial 0
    constant_liar: Optional[bool] = None  # TPE: running trials count as bad while in flight; None: when search.workers > 1


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
class ContractConfig:
    """The static contract of the editable files (src/lab/contract.py), checked before a candidate runs.

    An allow-list: research code may import and name only the modules in allowed_imports and, in them,
    only the members allowed_names matches (less forbidden_attrs); every chain, alias and import-from
    name is resolved against the installed libraries, so a module re-exported by an allowed one
    (torch.os, typing.sys) is refused like an import of it."""
    enabled: bool = True
    allowed_imports: List[str] = field(default_factory=lambda: [  # modules research code may import or name (exact)
        "__future__", "math", "dataclasses", "typing", "functools", "itertools", "collections", "collections.abc",
        "operator", "numbers", "enum", "abc",
        "torch", "torch.nn", "torch.nn.functional", "torch.nn.init", "torch.nn.utils", "torch.nn.attention",
        "torch.nn.attention.flex_attention", "torch.optim", "torch.optim.lr_scheduler", "torch.autograd",
        "torch.linalg", "torch.fft", "torch.special", "torch.amp", "torch.cuda", "torch.cpu", "torch.mps",
        "torch.backends", "torch.backends.*", "torch.compiler",
        "src.harness.config", "src.research", "src.research.*"])
    allowed_names: List[str] = field(default_factory=lambda: [  # members of those modules (dotted globs)
        "__future__.*", "math.*", "torch.*", "itertools.*", "collections.abc.*", "operator.*", "numbers.*",
        "src.research.*",
        *(f"dataclasses.{n}" for n in ("dataclass", "field", "fields", "replace", "asdict", "astuple",
                                        "is_dataclass", "InitVar", "MISSING", "KW_ONLY")),
        *(f"typing.{n}" for n in ("Any", "Optional", "Union", "List", "Dict", "Tuple", "Set", "FrozenSet", "Type",
                                   "Callable", "Sequence", "Iterable", "Iterator", "Mapping", "NamedTuple",
                                   "Literal", "ClassVar", "Final", "TypeVar", "Generic", "Protocol", "cast",
                                   "overload", "TYPE_CHECKING")),
        *(f"functools.{n}" for n in ("partial", "reduce", "lru_cache", "cache", "cached_property", "wraps",
                                      "total_ordering")),
        *(f"collections.{n}" for n in ("OrderedDict", "defaultdict", "namedtuple", "deque", "Counter", "ChainMap")),
        *(f"enum.{n}" for n in ("Enum", "IntEnum", "Flag", "IntFlag", "auto")),
        "abc.ABC", "abc.abstractmethod",
        # the schemas research code needs, not the harness's data locations (DataConfig, cache paths)
        "src.harness.config.ModelConfig", "src.harness.config.OptimizerConfig"])
    forbidden_names: List[str] = field(default_factory=lambda: [  # builtins research code may not name
        "open", "exec", "eval", "compile", "__import__", "globals", "locals", "vars", "dir", "type", "setattr",
        "delattr", "breakpoint", "input", "memoryview", "help", "exit", "quit"])
    allowed_dunders: List[str] = field(default_factory=lambda: [  # dunder attributes and method names allowed
        "__init__", "__post_init__", "__name__", "__doc__", "__call__", "__repr__", "__str__", "__len__",
        "__iter__", "__next__", "__getitem__", "__contains__", "__enter__", "__exit__"])
    forbidden_attrs: List[str] = field(default_factory=lambda: [  # allowed modules' members that leave the model
        "torch.load", "torch.save", "torch.from_file", "torch.*Storage*", "torch.storage*",
        "torch.random*", "torch.manual_seed", "torch.seed", "torch.initial_seed", "torch.*rng_state*",
        "torch.cuda.manual_seed*", "torch.cuda.seed*", "torch.cuda.*rng_state*",
        "torch.set_default_dtype", "torch.set_default_device", "torch.set_default_tensor_type",
        "torch.set_num_threads", "torch.set_num_interop_threads",  # threads are the device slot's, not the patch's
        "operator.attrgetter", "operator.methodcaller"])  # getattr with a computed name
    forbidden_value_attrs: List[str] = field(default_factory=lambda: [  # attribute names refused on any object
        "f_globals", "f_locals", "f_builtins", "f_back", "f_code", "gi_frame", "gi_code", "cr_frame", "cr_code",
        "ag_frame", "ag_code", "tb_frame", "tb_next", "co_code", "mro", "from_file", "tofile", "dump"])
    allowed_private: List[str] = field(default_factory=lambda: ["_foreach_"])  # torch._foreach_* ops
    assignable: List[str] = field(default_factory=lambda: [  # library settings a patch may set
        "torch.backends.*"])


@dataclass
class SearchConfig:
    tag: Optional[str] = None  # session name; None = today's date (nov26, then nov26b, ...)
    resume: bool = False  # continue the session `tag` (after Ctrl-C, a crash or kill -9)
    max_experiments: int = 10  # experiments that run (baseline and invalid proposals not counted)
    max_hours: float = 8.0  # wall-clock limit of this invocation; no experiment starts after it
    baseline_repeats: int = 2  # consistent, undisturbed baseline runs measuring the noise floor
    baseline_max_repeats: int = 5  # ... more of them (up to this many) while the repeats disagree
    baseline_spread: float = 0.01  # identical runs disagreeing by more than this fraction of val_bpb are implausible
    noise_sigmas: float = 2.0  # screen: a keep candidate has val_bpb < best - max(noise_sigmas * sigma, min_delta)
    min_delta: float = 0.002  # smallest improvement (val_bpb) ever kept, whatever sigma says
    confirm: Optional[bool] = None  # paired confirmation of a would-be keep; None: while the noise has < confirm_min_dof dof
    confirm_min_dof: int = 10  # the noise estimate counts as weak below this many degrees of freedom
    confirm_pairs: int = 1  # (best, candidate) re-run pairs per confirmation (2 while sigma has < 2 dof)
    confirm_alpha: float = 0.05  # the paired t-test's one-sided level: its false-keep rate under no real change
    # near misses (src/lab/confirm.py): a screen run below the best by more than retest_within x the margin but not
    # the margin, or a failed confirmation whose pairs still favour the candidate, earns more (best, candidate) pairs,
    # one at a time up to retest_pairs in all; keep as soon as the paired rule holds at retest_alpha / retest_pairs
    # (each look its share of retest_alpha), stop as soon as the pairs' mean no longer favours the candidate.
    retest: bool = True
    retest_pairs: int = 8
    retest_alpha: float = 0.02
    retest_within: float = 0.75
    stall_retries: int = 1  # a run marked `stalled`, or starved past its wall ceiling (timeout), is re-run this many times; then it is `disturbed`
    disturbed_factor: float = 2.0  # a run this many times slower than the session's fastest of its shape is disturbed
    disturbed_factor_new_shape: float = 3.0  # a shape not run yet: its MFU this many times below the session's best
    disturbed_retries: int = 2  # a disturbed run is re-run this many times before its experiment is left undecided
    timeout_factor: float = 3.0  # hard kill after budget.seconds * timeout_factor + timeout_grace_s
    timeout_grace_s: float = 180.0  # startup, evaluation and slack (seconds)
    timeout_s: Optional[float] = None  # explicit hard timeout per run; None = the formula (tokens mode: from the baseline)
    editable: List[str] = field(default_factory=lambda: ["src/research/*.py"])  # files a patch may touch (globs): the research room
    override_roots: List[str] = field(default_factory=lambda: ["model", "optimizer", "batch"])  # keys a proposal may override
    max_invalid_in_row: int = 10  # stop when the agent keeps proposing invalid changes
    preflight: bool = True  # a candidate whose run crashes before its first step (config, imports, model) is `invalid`
    repo: Optional[str] = None  # git checkout the session branches from; None = this project's checkout
    root: Optional[str] = None  # where sessions live; None = <repo>/outputs/research
    base: str = "HEAD"  # commit the research branch starts from (uncommitted changes are not included)
    env_strip: List[str] = field(default_factory=lambda: list(ENV_STRIP))  # env vars the run never sees
    env_keep: List[str] = field(default_factory=list)  # exceptions to env_strip (e.g. MLFLOW_TRACKING_TOKEN)
    progress: bool = True  # progress bar over experiments
    contract: ContractConfig = field(default_factory=ContractConfig)  # what the editable files may do
    # the device time of a run, counted from outside (src/harness/launch.py), may pass budget.seconds by this much
    # (the last step's variance and the checkpoint write); beyond it the run is `tampered` (src/lab/integrity.py)
    device_allowance_s: float = 0.25
    device_allowance_share: float = 0.02
    plausible_gain: float = 0.5  # a gain over the best beyond this (bpb; 120-s CPU TPE gains were 0.16-0.24) ...
    plausible_factor: float = 5.0  # ... and beyond this x the largest kept gain is re-scored and re-run first
    keep_checkpoints: str = "best"  # checkpoints kept once an experiment is decided: all | best (kept + baselines) | none
    # pruning (src/lab/prune.py): stop a screen run whose smoothed train loss is worse than the best's at the same
    # fraction of the budget by more than max(prune_min_delta, prune_sigmas x the session's curve noise), at two
    # points in a row from prune_min_fraction on. Off by default: it saved 11-28% of device time on proposals of known
    # fate, but with TPE moving the LR schedule it stopped real gains (docs/verdicts.md).
    prune: bool = False
    prune_min_fraction: float = 0.3
    prune_sigmas: float = 4.0
    prune_min_delta: float = 0.02  # nats per token of smoothed train loss
    test_split: bool = True  # at the end, score the baseline's and the best's checkpoints on the held-out test split
    # many experiments at once (src/lab/workers.py): each worker its own worktree and device slot
    workers: int = 1  # experiments in flight; 1 = one after another (the sequential loop)
    gpus: Optional[List[int]] = None  # CUDA: the GPU ids the workers get, one each; None = every visible GPU


# knob -> (test, what is accepted): every one is checked before anything is created
KNOB_RANGES = {
    "noise_sigmas": (lambda v, s: v >= 0, ">= 0"),
    "min_delta": (lambda v, s: v >= 0, ">= 0"),
    "baseline_repeats": (lambda v, s: v >= 1, ">= 1 (2 or more to measure the noise floor)"),
    "baseline_max_repeats": (lambda v, s: v >= s.baseline_repeats, ">= search.baseline_repeats"),
    "baseline_spread": (lambda v, s: v >= 0, ">= 0 (a fraction of val_bpb, e.g. 0.01)"),
    "max_experiments": (lambda v, s: v >= 0, ">= 0"),
    "confirm_min_dof": (lambda v, s: v >= 0, ">= 0"),
    "confirm_pairs": (lambda v, s: v >= 1, ">= 1"),
    "confirm_alpha": (lambda v, s: 0 < v < 0.5, "between 0 and 0.5 (e.g. 0.05)"),
    "retest_pairs": (lambda v, s: v >= 2, ">= 2"),
    "retest_alpha": (lambda v, s: 0 < v < 0.5, "between 0 and 0.5 (e.g. 0.02)"),
    "retest_within": (lambda v, s: 0 <= v <= 1, "between 0 and 1 (a share of the screen margin)"),
    "disturbed_factor": (lambda v, s: v > 1, "> 1 (e.g. 2: half the session's throughput)"),
    "disturbed_factor_new_shape": (lambda v, s: v > 1, "> 1"),
    "disturbed_retries": (lambda v, s: v >= 0, ">= 0"),
    "stall_retries": (lambda v, s: v >= 0, ">= 0"),
    "device_allowance_s": (lambda v, s: v >= 0, ">= 0"),
    "device_allowance_share": (lambda v, s: 0 <= v <= 1, "in [0, 1]"),
    "plausible_gain": (lambda v, s: v > 0, "> 0 (bpb)"),
    "plausible_factor": (lambda v, s: v >= 1, ">= 1"),
    "keep_checkpoints": (lambda v, s: v in ("all", "best", "none"), "all, best or none"),
    "prune_min_fraction": (lambda v, s: 0.0 < v < 1.0, "between 0 and 1 (a share of the budget)"),
    "prune_sigmas": (lambda v, s: v > 0, "> 0"),
    "prune_min_delta": (lambda v, s: v >= 0, ">= 0"),
    "workers": (lambda v, s: v >= 1, ">= 1"),
}


def check_search(s: SearchConfig) -> None:
    """Refuse knobs that make no sense, before anything is created (ValueError naming the accepted range)."""
    bad = [f"search.{k}={getattr(s, k)} (expected {what})" for k, (ok, what) in KNOB_RANGES.items()
           if not ok(getattr(s, k), s)]
    if bad:
        raise ValueError("; ".join(bad))


@dataclass
class LauncherConfig:
    """How an experiment's run is started (conf/launcher/): `local` (a subprocess of the search, the default),
    `submitit_local` or `submitit_slurm` (one submitit job per run; the other fields are submitit's own
    parameter names, passed through where set)."""
    name: str = "local"  # local | submitit_local | submitit_slurm
    folder: Optional[str] = None  # submitit's job folder; None = <session dir>/submitit
    timeout_min: Optional[int] = None  # None = the run's hard timeout (search.timeout_*), rounded up
    poll_s: float = 1.0  # how often a job's state is polled
    requeue_killed: int = 1  # a job killed from outside (scheduler, preemption) is run again this many times
    # submitit_slurm (as submitit names them; None = not passed)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    mem: Optional[str] = None  # slurm_mem, e.g. 16G
    constraint: Optional[str] = None
    comment: Optional[str] = None
    additional_parameters: dict = field(default_factory=dict)  # more slurm_* settings, passed as is
    setup: List[str] = field(default_factory=list)  # shell lines run before the job (module load, source venv)


@dataclass
class SearchAppConfig(TrainConfig):
    search: SearchConfig = field(default_factory=SearchConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)


# ---------------------------------------------------------------------------- agent=claude
# src/lab/agents/claude.py; options in conf/agent_common/claude.yaml. The API key is never a config value: it is
# read from the environment variable named by api_key_env.


@dataclass
class ClaudePrice:
    """USD per million tokens; the cost caps are only as right as these (see anthropic.com/pricing)."""
    input: float = MISSING  # uncached input
    output: float = MISSING  # output, thinking included
    cache_write: float = MISSING  # input written to the 5-minute prompt cache (1.25 x input)
    cache_read: float = MISSING  # input read from the cache, either lifetime (0.1 x input)
    cache_write_1h: Optional[float] = None  # input written to the 1-hour cache; None: 2 x input (the published rule)


@dataclass
class ClaudeAgentConfig(AgentConfig):
    name: str = "claude"
    model: str = "claude-sonnet-4-6"  # must have an entry in `prices` (or be a dated snapshot of one)
    max_tokens: int = 8000  # output tokens per reply, thinking included
    # reasoning before the proposal: `auto` reads the model's capabilities (GET /v1/models/<model>, free):
    # adaptive thinking where supported, else extended thinking with thinking_budget, else none; without
    # thinking the tool asks for an `analysis` first. Thinking allows only tool_choice auto (not a forced tool).
    thinking: str = "auto"  # auto | adaptive | enabled | off
    thinking_budget: int = 3000  # thinking=enabled: budget_tokens (>= 1024 and < max_tokens)
    effort: Optional[str] = "medium"  # output_config.effort where the model supports it: low | medium | high | xhigh | max
    strict: Optional[bool] = None  # strict tool schema (grammar-constrained input); None: where the model supports it
    force_tool: bool = True  # without thinking, tool_choice forces propose_experiment
    base_url: Optional[str] = None  # None: $ANTHROPIC_BASE_URL, else the SDK's default (api.anthropic.com)
    api_key_env: str = "ANTHROPIC_API_KEY"  # the environment variable holding the key (never the key itself)
    timeout_s: float = 180.0  # read timeout per HTTP request (an 8k-token reply takes ~2 min); connect: 10 s
    max_retries: int = 2  # quick retries of a transient failure (429, 5xx, 529, timeout, connection) per proposal
    retry_wait_s: float = 5.0  # first wait between them (doubling; a retry-after header wins)
    patience_s: float = 60.0  # longest one proposal waits on a failing API before the fallback agent proposes it
    probe_s: float = 120.0  # after a failure the fallback proposes until this many seconds passed, then Claude is
    probe_max_s: float = 1800.0  # asked again (the wait doubles while it keeps failing, up to probe_max_s)
    fallback: str = "tpe"  # offline agent while Claude is unavailable, refusing or stopped: tpe | random | replay | none
    fallback_file: str = ""  # fallback=replay: its file of proposals
    attempts: int = 3  # replies per proposal (no tool call, max_tokens, refusal, malformed input) before the fallback
    fix_attempts: int = 2  # invalid proposals in a row the model is asked to correct before being told to move on
    context_tokens: int = 36000  # prompt budget; past it the conversation is condensed into a digest, in one step
    chars_per_token: float = 3.0  # prompt sizes are estimated from characters before sending (code is ~3 chars/token)
    log_tail_chars: int = 2000  # of the last failed run's log, shown while that failure is recent
    journal_chars: int = 3000  # of the research journal shown every turn (journal.md keeps it all)
    program: str = "program.md"  # the research strategy; relative: the current directory, else the session's worktree
    cache: bool = True  # prompt caching: breakpoints on the static prefix and on the stable conversation
    cache_ttl: str = "auto"  # auto | 5m | 1h; auto: 1h when the time between requests (a run) passes ~4.5 minutes
    preflight: bool = True  # before the baseline: check key, API and model with free requests
    max_cost_usd: float = 10.0  # session cap (all invocations); past it Claude stops and the fallback goes on
    max_session_tokens: Optional[int] = None  # session cap on input + output + cache tokens; None: none
    prices: dict[str, ClaudePrice] = field(default_factory=dict)  # model (or prefix of a dated name) -> price


@dataclass
class HybridAgentConfig(ClaudeAgentConfig):
    """agent=hybrid (src/lab/agents/hybrid.py): Claude's knobs, plus the tuner's and the share of turns."""
    name: str = "hybrid"
    claude_share: float = 0.3  # share of the proposals Claude makes (spread evenly); the tuner makes the rest
    tuner: str = "tpe"  # tpe | cmaes (Optuna's CmaEsSampler; categorical knobs by its independent TPE sampler)
    n_startup_trials: int = 4  # the tuner's random start-up points
    multivariate: bool = True  # TPE: model the knobs jointly


AGENT_SCHEMAS = {"optuna": OptunaAgentConfig, "replay": ReplayAgentConfig, "claude": ClaudeAgentConfig,
                 "hybrid": HybridAgentConfig}


def register_search_configs() -> None:
    """Register the train schemas plus the research loop's (`search_schema`, `agent/<kind>_schema`, ...)."""
    register_configs()
    cs = ConfigStore.instance()
    for kind, schema in AGENT_SCHEMAS.items():
        cs.store(group="agent", name=f"{kind}_schema", node=schema)
    cs.store(group="search_space", name="schema", node=SearchSpaceConfig)
    cs.store(group="launcher", name="schema", node=LauncherConfig)
    cs.store(name="search_schema", node=SearchAppConfig)
