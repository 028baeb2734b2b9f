"""Typed config schemas for every Hydra group, registered in Hydra's ConfigStore.

Each YAML option in conf/<group>/ extends the schema of its group, so a typo in a
key or a wrong type fails at compose time. Entry points convert the composed
DictConfig to these dataclasses (`to_object`); code below them sees typed objects.

Usage: from src.config import register_configs, to_object
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


@dataclass
class ModelConfig:
    name: str = "cpu"
    depth: int = 4  # transformer blocks; the one dial widths derive from
    aspect_ratio: int = 64  # width = depth * aspect_ratio, rounded up to head_dim
    head_dim: int = 64  # channels per attention head
    n_kv_head: Optional[int] = None  # key/value heads (GQA); None = same as query heads
    sequence_len: int = 256  # context length in tokens
    window_pattern: str = "SSSL"  # per-layer attention window: S = half context, L = full; last layer always L
    value_embeds: bool = True  # value embeddings on alternating layers (the last always)
    ve_gate_channels: int = 32  # channels of x read by the value-embedding gate
    softcap: float = 15.0  # logits soft-cap (tanh); 0 disables
    activation: str = "relu2"  # MLP activation: relu2 | gelu | silu
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * width
    rope_base: float = 10000.0
    x0_init: float = 0.1  # initial value of the per-layer x0 skip scalars


@dataclass
class OptimizerConfig:
    name: str = "muon"  # muon (Muon for matrices + AdamW for the rest) | adamw (AdamW for all)
    matrix_lr: float = 0.04  # transformer matrices (Muon, or AdamW when name=adamw)
    embedding_lr: float = 0.6  # token + value embeddings (AdamW)
    unembedding_lr: float = 0.004  # lm_head (AdamW)
    scalar_lr: float = 0.5  # per-layer residual / x0 scalars (AdamW)
    weight_decay: float = 0.2  # matrices only; decays linearly to 0 over the budget
    adam_betas: List[float] = field(default_factory=lambda: [0.8, 0.95])
    adam_eps: float = 1e-10
    momentum_start: float = 0.85  # Muon Nesterov momentum at step 0
    momentum_end: float = 0.95  # ... reached after momentum_warmup_steps
    momentum_warmup_steps: int = 300
    ns_steps: int = 5  # Polar Express orthogonalization iterations
    muon_beta2: float = 0.95  # NorMuon second-moment EMA
    warmup_ratio: float = 0.0  # share of the budget spent ramping the LR up
    warmdown_ratio: float = 0.5  # share of the budget at the end ramping the LR down
    final_lr_frac: float = 0.0  # LR multiplier reached at the end of warmdown


@dataclass
class BatchConfig:
    name: str = "cpu"
    total_tokens: int = 8192  # tokens per optimizer step
    device_tokens: int = 8192  # tokens per forward/backward (device step); grad accumulation derived


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32 (autocast dtype for matmuls)
    compile: str = "auto"  # auto (cuda only) | true | false
    peak_flops: Optional[float] = None  # device peak FLOP/s for MFU; None = look up or measure once
    threads: Optional[int] = None  # torch intra-op threads on CPU; None = torch default


@dataclass
class DataConfig:
    name: str = "shakespeare"  # shakespeare | text | climbmix | tinystories
    tokenizer: str = "byte"  # byte | bpe
    vocab_size: int = 257  # byte: 256 bytes + <|bos|>; bpe: trained vocabulary size
    # prepared shards, tokenizer and manifest; $OVERNIGHT_CACHE overrides the default
    cache_dir: str = field(default_factory=lambda: os.environ.get("OVERNIGHT_CACHE", "~/.cache/overnight"))
    paths: List[str] = field(default_factory=list)  # data=text: .txt files or folders
    val_fraction: float = 0.1  # data=text: share of bytes (whole documents) held out
    base_url: str = ""  # hub datasets: where the parquet shards are downloaded from
    train_shards: int = 1  # hub datasets: number of training shards to fetch
    val_shard: Optional[int] = None  # hub datasets: the pinned validation shard index
    text_column: str = "text"  # hub datasets: parquet column holding the document text
    bpe_train_bytes: int = 200_000_000  # cap on text fed to BPE training
    eval_tokens: Optional[int] = None  # tokens of the val split scored by val_bpb; None = the full split
    retries: int = 5  # download attempts per file
    timeout: float = 60.0  # seconds per HTTP request


@dataclass
class BudgetConfig:
    mode: str = "time"  # time | tokens
    seconds: float = 120.0  # training seconds (mode=time); warm-up steps are not counted
    tokens: int = 2_000_000  # training tokens (mode=tokens): a deterministic run
    warmup_steps: int = 3  # first optimizer steps, not counted (allocator, compile)
    max_nan_loss: float = 50.0  # a loss above this (or NaN/inf) fails the run fast
    stall_factor: float = 5.0  # a step slower than stall_factor x the running median step time is a stall
    stall_window: int = 50  # steps in the running median
    stall_max_share: float = 0.25  # stalled seconds above this share of the budget mark the run `stalled`
    wall_factor: float = 3.0  # hard ceiling (mode=time): training stops after seconds * wall_factor + wall_grace wall seconds
    wall_grace: float = 60.0  # ... and a step stuck that much past the ceiling ends the process (status timeout)
    max_wall_seconds: Optional[float] = None  # explicit ceiling for either mode; None = the formula above (time), none (tokens)


@dataclass
class TrackingConfig:
    enabled: bool = True  # log the run to MLflow
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db
    experiment: str = "overnight"  # MLflow experiment name
    run_name: Optional[str] = None
    parent_run_id: Optional[str] = None  # nest this run under a parent (sweeps, research sessions)
    strict: bool = False  # refuse to train when the tracking server cannot be reached
    flush_every_s: float = 10.0  # buffered per-step metrics are sent at most this often
    timeout_s: float = 5.0  # seconds to wait for a tracking server's health check


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 42
    dry_run: bool = False  # print the derived model and exit, touching no data
    eval_batch_tokens: Optional[int] = None  # tokens per evaluation forward pass; None = the device's default
    progress: bool = True  # progress bar over the budget


GROUPS = {
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "batch": BatchConfig,
    "device": DeviceConfig,
    "data": DataConfig,
    "budget": BudgetConfig,
}


def register_configs() -> None:
    """Register every group schema (as `<group>/schema`) and the train schema."""
    cs = ConfigStore.instance()
    for group, schema in GROUPS.items():
        cs.store(group=group, name="schema", node=schema)
    cs.store(name="train_schema", node=TrainConfig)


def to_object(cfg: DictConfig, schema: Any = TrainConfig) -> Any:
    """Convert a composed DictConfig to its dataclass, validating it against `schema`."""
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    return OmegaConf.to_object(merged)


# ---------------------------------------------------------------------------- the research loop
# python -m src.search: conf/search.yaml composes the train groups (the baseline) plus the
# groups below. Agents extend AgentConfig with their own knobs (one schema per agent module).


@dataclass
class AgentConfig:
    name: str = "tpe"  # module under src/agents/ (random and tpe share src/agents/tpe.py)
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
    env_strip: List[str] = field(default_factory=lambda: ["ANTHROPIC_API_KEY", "*_API_KEY", "*TOKEN*", "*SECRET*",
                                                          "*PASSWORD*"])  # env vars the run never sees
    env_keep: List[str] = field(default_factory=list)  # exceptions to env_strip (e.g. MLFLOW_TRACKING_TOKEN)
    progress: bool = True  # progress bar over experiments


@dataclass
class SearchAppConfig(TrainConfig):
    search: SearchConfig = field(default_factory=SearchConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)


AGENT_SCHEMAS = {"optuna": OptunaAgentConfig, "replay": ReplayAgentConfig}


def register_search_configs() -> None:
    """Register the train schemas plus the research loop's (`search_schema`, `agent/<kind>_schema`, ...)."""
    register_configs()
    cs = ConfigStore.instance()
    for kind, schema in AGENT_SCHEMAS.items():
        cs.store(group="agent", name=f"{kind}_schema", node=schema)
    cs.store(group="search_space", name="schema", node=SearchSpaceConfig)
    cs.store(name="search_schema", node=SearchAppConfig)


# ---------------------------------------------------------------------------- agent=claude
# src/agents/claude.py; options in conf/agent/claude.yaml. The API key is never a config value: it is
# read from the environment variable named by api_key_env.
from omegaconf import MISSING  # noqa: E402  (kept with the block it serves)


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


AGENT_SCHEMAS["claude"] = ClaudeAgentConfig
