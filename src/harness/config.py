"""Typed config schemas for every Hydra group, registered in Hydra's ConfigStore.

Each YAML option in conf/<group>/ extends the schema of its group, so a typo in a
key or a wrong type fails at compose time. The defaults are the CPU default presets
(conf/model/cpu.yaml, conf/batch/cpu.yaml, ...). The research loop's schemas (search, agent,
search_space) extend these in src/lab/config.py. Entry points convert the composed
DictConfig to these dataclasses (`to_object`); code below them sees typed objects.

Usage: from src.harness.config import register_configs, to_object
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from src.harness.paths import default_cache_dir


@dataclass
class ModelConfig:
    name: str = "cpu"
    depth: int = 4  # transformer blocks; the one dial widths derive from
    aspect_ratio: int = 32  # width = depth * aspect_ratio, rounded up to head_dim
    head_dim: int = 64  # channels per attention head
    n_kv_head: Optional[int] = None  # key/value heads (GQA); None = same as query heads
    sequence_len: int = 128  # context length in tokens
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
    # tokens per forward/backward (device step); grad accumulation = total / device. `auto`: the largest
    # micro-batch that fits (a forward/backward probe at start, cached per model shape and device)
    device_tokens: Union[int, str] = 8192

    def __post_init__(self) -> None:
        if isinstance(self.device_tokens, str):
            word = self.device_tokens.strip().lower()
            if not (word == "auto" or word.isdigit()):
                raise ValueError(f"batch.device_tokens={self.device_tokens!r}; expected a number of tokens or auto")
            self.device_tokens = "auto" if word == "auto" else int(word)


# the words device.compile and device.dtype accept; Hydra hands true/false over as booleans
COMPILE_WORDS = {True: True, False: False, "true": True, "false": False, "auto": "auto"}
DTYPE_WORDS = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
               "half": "fp16", "fp32": "fp32", "float32": "fp32", "float": "fp32",
               False: "fp32", "false": "fp32", True: "mixed", "true": "mixed", "mixed": "mixed"}


def _word(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    # autocast dtype for matmuls: auto | bf16 | fp16 | fp32 (or bfloat16, float16, float32);
    # false = fp32 (no autocast), true = mixed precision (bf16, fp16 where the GPU lacks bf16)
    dtype: Union[bool, str] = "auto"
    compile: Union[bool, str] = "auto"  # torch.compile: auto (cuda only) | true | false
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | ...
    compile_scope: str = "model"  # model (one graph) | blocks (each transformer block; the rest runs eagerly)
    # Inductor/Triton caches kept across runs (a session's experiments compile the same graphs again);
    # None = <data cache>/compile (this sets $TORCHINDUCTOR_CACHE_DIR for the run)
    compile_cache: Optional[str] = None
    # memory the run may use, MB. CUDA/MPS: enforced by the allocator; CPU: simulated (the bytes autograd
    # saves for backward in one forward may not exceed it). None = the whole device
    memory_limit_mb: Optional[float] = None
    peak_flops: Optional[float] = None  # device peak FLOP/s for MFU; None = look up or measure once
    threads: Optional[int] = None  # torch intra-op threads on CPU; None = torch default

    def __post_init__(self) -> None:
        """Canonical values (compile: True | False | 'auto'; dtype: auto | mixed | bf16 | fp16 | fp32), or an error
        naming the knob, so a typo fails before anything runs."""
        if _word(self.compile) not in COMPILE_WORDS:
            raise ValueError(f"device.compile={self.compile!r}; expected auto, true or false")
        if _word(self.dtype) not in DTYPE_WORDS:
            raise ValueError(f"device.dtype={self.dtype!r}; expected auto, bf16, fp16, fp32 (or bfloat16, float16, "
                             "float32), true or mixed (mixed precision), false (fp32)")
        self.compile, self.dtype = COMPILE_WORDS[_word(self.compile)], DTYPE_WORDS[_word(self.dtype)]
        if self.compile_scope not in ("model", "blocks"):
            raise ValueError(f"device.compile_scope={self.compile_scope!r}; expected model or blocks")


@dataclass
class DataConfig:
    name: str = "shakespeare"  # shakespeare | text | climbmix | tinystories
    tokenizer: str = "byte"  # byte | bpe
    vocab_size: int = 257  # byte: 256 bytes + <|bos|>; bpe: trained vocabulary size
    # prepared shards, tokenizer and manifest; $OVERNIGHT_CACHE overrides the default
    cache_dir: str = field(default_factory=default_cache_dir)
    paths: List[str] = field(default_factory=list)  # data=text: .txt files or folders
    val_fraction: float = 0.1  # data=text: share of bytes (whole documents) held out for validation
    test_fraction: float = 0.05  # data=text: share of bytes (whole documents) in the held-out test split
    base_url: str = ""  # hub datasets: where the parquet shards are downloaded from
    train_shards: int = 1  # hub datasets: number of training shards to fetch
    val_shard: Optional[int] = None  # hub datasets: the pinned validation shard index
    test_shard: Optional[int] = None  # climbmix: the pinned held-out test shard index
    text_column: str = "text"  # hub datasets: parquet column holding the document text
    bpe_train_bytes: int = 200_000_000  # cap on text fed to BPE training
    eval_tokens: Optional[int] = None  # tokens of the val split scored by val_bpb; None = the full split
    bpb_floor: Optional[float] = None  # a val_bpb below this is implausible here (re-scored, re-run before a keep)
    retries: int = 5  # download attempts per file
    timeout: float = 60.0  # seconds per HTTP request


@dataclass
class BudgetConfig:
    mode: str = "time"  # time | tokens
    seconds: float = 120.0  # device seconds (mode=time): CPU seconds / threads on CPU, device time on a GPU, everything
                            # from before the model is built to the written checkpoint (src/harness/budget.py)
    tokens: int = 2_000_000  # training tokens (mode=tokens): a deterministic run
    warmup_steps: int = 3  # first optimizer steps left out of the step-time statistics (allocator, compile); counted in the budget
    max_nan_loss: float = 50.0  # a loss above this (or NaN/inf) fails the run fast
    stall_factor: float = 5.0  # a step slower than stall_factor x the running median step time is a stall
    stall_window: int = 50  # steps in the running median
    stall_max_share: float = 0.25  # GPU: stalled seconds above this share of the budget mark the run `stalled`
    wall_factor: float = 3.0  # hard ceiling (mode=time): a run still training after seconds * wall_factor + wall_grace wall seconds stops (timeout: the machine starved it)
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
    score: str = "process"  # process: this run starts the scorer process on its checkpoint; caller: the caller does (the lab's runner)


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
