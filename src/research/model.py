"""The GPT: the reference architecture of karpathy/autoresearch, one readable file.

RoPE, QK-norm, weightless RMSNorm, ReLU^2 MLP, untied embeddings, value embeddings on
alternating layers (gated per head), per-layer residual and x0 scalars, tanh-capped
logits, and a sliding-window pattern: FlexAttention with a block mask where the blocks are
compiled on CUDA (fused, at flash speed), SDPA with a boolean mask elsewhere (CPU, MPS, eager,
and so the scorer's eager pass), numerically the same. This file is part of the editable
research surface.

The contract with the harness (all of it: src/research/__init__.py): `model(idx)` takes token ids
(B, T) and returns logits (B, T, vocab_size), nothing else. The harness computes the loss and
val_bpb from those logits (src/harness/evaluate.py) in its own scorer process; targets never reach
the model. The scorer checks that the logits at a position do not depend on later tokens or on the
other rows of the batch, and that two passes over the same input agree. Parameter counts and FLOPs
are the harness's, from the config (src/harness/model_facts.py).

Usage: model = GPT(GPTConfig.from_model_config(cfg.model, vocab_size)); logits = model(idx)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.harness.config import ModelConfig

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None


@dataclass
class GPTConfig(ModelConfig):
    """The model knobs (ModelConfig, conf/model/) plus what code derives from them."""
    vocab_size: int = 0  # from the prepared tokenizer
    n_head: int = 0  # query heads = width / head_dim
    n_embd: int = 0  # width = depth * aspect_ratio, rounded up to head_dim
    attention: str = "auto"  # sliding windows: auto (FlexAttention if compiled on CUDA, else SDPA masks) | flex | sdpa

    @property
    def n_layer(self) -> int:
        return self.depth

    @classmethod
    def from_model_config(cls, m: ModelConfig, vocab_size: int) -> "GPTConfig":
        """Derive widths and heads from the knobs: width = depth * aspect_ratio rounded up to head_dim."""
        width = math.ceil(m.depth * m.aspect_ratio / m.head_dim) * m.head_dim
        n_head = width // m.head_dim
        n_kv_head = m.n_kv_head or n_head
        if n_head % n_kv_head:
            raise ValueError(f"model.n_kv_head={n_kv_head} must divide the {n_head} query heads (width {width} / head_dim {m.head_dim})")
        if m.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={m.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if not m.window_pattern or set(m.window_pattern.upper()) - set("SL"):
            raise ValueError(f"model.window_pattern={m.window_pattern!r}; expected letters S (half context) and L (full)")
        knobs = {f.name: getattr(m, f.name) for f in fields(ModelConfig)}
        knobs.update(n_kv_head=n_kv_head, window_pattern=m.window_pattern.upper())
        return cls(**knobs, vocab_size=vocab_size, n_head=n_head, n_embd=width)

    def window_sizes(self) -> list[int]:
        """Attention window per layer in tokens; the last layer always sees the full context."""
        sizes = {"L": self.sequence_len, "S": self.sequence_len // 2}
        out = [sizes[self.window_pattern[i % len(self.window_pattern)]] for i in range(self.n_layer)]
        out[-1] = self.sequence_len
        return out

    def has_ve(self, layer: int) -> bool:
        """Value embeddings on alternating layers, the last one always included."""
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2


ACTIVATIONS = {
    "relu2": lambda x: F.relu(x).square(),
    "gelu": F.gelu,
    "silu": F.silu,
}


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2  # x: (B, T, H, D); rotate the two halves
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        self.ve_gate_channels = config.ve_gate_channels
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False) if config.has_ve(layer) else None
        self.attention = config.attention
        if self.attention not in ("auto", "flex", "sdpa") or (self.attention == "flex" and flex_attention is None):
            raise ValueError(f"attention={self.attention!r}; expected auto, sdpa or flex (flex needs torch >= 2.5)")
        self.masks: dict = {}  # (T, window, device) -> boolean SDPA mask, built once in eager mode

    def use_flex(self, device) -> bool:
        """FlexAttention compiled on CUDA runs fused at flash speed; eager it would materialize every score (and on
        CPU it has no backward), so everywhere else sliding windows go through SDPA with a boolean mask."""
        if self.attention != "auto":
            return self.attention == "flex"
        return flex_attention is not None and device.type == "cuda" and torch.compiler.is_compiling()

    def sliding_mask(self, T: int, window: int, device):
        """Query q sees keys q - window + 1 .. q: a BlockMask for FlexAttention or a boolean (T, T) mask for SDPA."""
        if self.use_flex(device):  # built inside the compiled graph (cheap there): not cached
            return create_block_mask(lambda b, h, q, k: (q >= k) & (q - k < window), None, None, T, T, device=device)
        key = (T, window, str(device))
        if key not in self.masks:
            i = torch.arange(T, device=device)
            d = i[:, None] - i[None, :]  # query minus key position
            self.masks[key] = (d >= 0) & (d < window)
        return self.masks[key]

    def forward(self, x, ve, cos_sin, window):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # mix the value embedding into V through a per-head gate in (0, 2)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if window >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.use_flex(q.device):
            if torch.is_autocast_enabled(q.device.type):  # one low-precision dtype, as autocast gives SDPA
                dt = torch.get_autocast_dtype(q.device.type)
                q, k, v = q.to(dt), k.to(dt), v.to(dt)
            y = flex_attention(q, k, v, block_mask=self.sliding_mask(T, window, q.device))
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.sliding_mask(T, window, q.device))
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.window_sizes = config.window_sizes()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if config.has_ve(i)})
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), config.x0_init))
        cos, sin = self._rotary(config.sequence_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary(self, seq_len: int, device=None):
        hd = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform bound with std 1/sqrt(width)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(self.config.x0_init)
        self.cos, self.sin = self._rotary(self.config.sequence_len, self.wte.weight.device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))  # (B, T, C)
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i])
        logits = self.lm_head(norm(x)).float()  # (B, T, vocab)
        if self.config.softcap > 0:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits
