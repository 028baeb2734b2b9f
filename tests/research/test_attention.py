"""Sliding-window attention: FlexAttention (the CUDA compiled path) and SDPA masks (everywhere else) agree.

On CPU FlexAttention runs eagerly and forward only (torch has no CPU backward for it), so the
equivalence of values is tested here and that of gradients on a GPU (the CUDA test below, and
bench/gpu.py's check). The scorer's twin check (bitwise logits before a change) passes a windowed model
on either path, and a compiled model gives the eager model's logits.

Run: python -m pytest -q tests/research/test_attention.py   (compiling on CPU is marked slow)
"""
from __future__ import annotations

import dataclasses
import random
import warnings

import pytest
import torch

from src.harness.config import ModelConfig
from src.harness.device import Runtime, compile_model
from src.research.model import GPT, GPTConfig
from src.harness.score import make_twin, twin_mismatch

V = 257


def pair(depth=2, seq=96, pattern="S", n_kv_head=None, head_dim=32, seed=0) -> tuple[GPT, GPT]:
    """The same weights twice: sliding windows through SDPA masks, and through FlexAttention."""
    torch.manual_seed(seed)
    cfg = GPTConfig.from_model_config(ModelConfig(depth=depth, aspect_ratio=32, head_dim=head_dim, sequence_len=seq,
                                                  window_pattern=pattern, n_kv_head=n_kv_head), V)
    sdpa = GPT(dataclasses.replace(cfg, attention="sdpa"))
    sdpa.init_weights()
    for p in sdpa.parameters():  # break the zero-init identity so attention actually mixes
        p.data.add_(0.05 * torch.randn_like(p))
    flex = GPT(dataclasses.replace(cfg, attention="flex"))
    flex.load_state_dict(sdpa.state_dict())
    return sdpa.eval(), flex.eval()


@torch.no_grad()
def logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # eager FlexAttention warns that it is unfused: that is the point here
        warnings.simplefilter("ignore")
        return model(x)


@pytest.mark.parametrize("kw,T", [
    (dict(), 96),  # a window of 48 on a context that is no multiple of FlexAttention's 128-token blocks
    # windows across blocks, a full middle layer (slow: a deeper model over 256 tokens)
    pytest.param(dict(seq=256, pattern="SSL", depth=3), 256, marks=pytest.mark.slow),
    # grouped-query attention (slow: 256 tokens)
    pytest.param(dict(seq=256, pattern="S", head_dim=16, n_kv_head=1), 256, marks=pytest.mark.slow),
    (dict(seq=256), 200),  # a shorter input (the scorer's last window): windows clipped to it
    (dict(seq=256), 100),  # shorter than the window: plain causal attention
])
def test_flexattention_gives_the_logits_of_the_sdpa_mask(kw, T):
    sdpa, flex = pair(**kw)
    x = torch.randint(0, V, (3, T))
    a, b = logits(sdpa, x), logits(flex, x)
    assert a.shape == b.shape == (3, T, V)
    assert (a - b).abs().max().item() < 1e-4


def test_under_bf16_autocast_both_paths_agree_to_bf16_precision():
    """Value embeddings are fp32 parameters, so V of a windowed layer with one is fp32 under autocast while Q and K
    are bf16: FlexAttention gets the one dtype SDPA's autocast rule gives it."""
    sdpa, flex = pair(depth=3, seq=128, pattern="S")  # layer 0: window 64 and a value embedding
    assert flex.config.has_ve(0) and flex.window_sizes[0] < 128
    x = torch.randint(0, V, (2, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = logits(sdpa, x), logits(flex, x)
    assert (a - b).abs().max().item() < 0.05  # bf16 carries ~3 significant digits; the scorer allows 0.15


def test_the_window_is_the_same_on_both_paths_a_token_just_outside_it_changes_nothing():
    sdpa, flex = pair(depth=1, seq=128, pattern="S")
    x = torch.randint(0, V, (1, 128))
    for model in (sdpa, flex):
        model.window_sizes = [64]  # the one layer (a last layer, so full by default) gets a window of 64
        outside, inside = x.clone(), x.clone()
        outside[0, 127 - 64] = (x[0, 127 - 64] + 1) % V  # 64 back from the last query: outside its window
        inside[0, 127 - 63] = (x[0, 127 - 63] + 1) % V  # 63 back: the oldest key it sees
        last = logits(model, x)[0, -1]
        assert torch.allclose(last, logits(model, outside)[0, -1], atol=1e-6)
        assert not torch.allclose(last, logits(model, inside)[0, -1], atol=1e-4)


def test_auto_takes_flexattention_only_inside_a_compiled_graph_on_cuda():
    cfg = GPTConfig.from_model_config(ModelConfig(depth=1, aspect_ratio=32, head_dim=32), V)
    auto = GPT(cfg).blocks[0].attn
    assert not auto.use_flex(torch.device("cpu")) and not auto.use_flex(torch.device("cuda"))  # eager: SDPA
    assert GPT(dataclasses.replace(cfg, attention="flex")).blocks[0].attn.use_flex(torch.device("cpu"))
    assert not GPT(dataclasses.replace(cfg, attention="sdpa")).blocks[0].attn.use_flex(torch.device("cuda"))
    with pytest.raises(ValueError, match="attention='flash'"):
        GPT(dataclasses.replace(cfg, attention="flash"))


@pytest.mark.parametrize("path", ["sdpa", "flex"])
def test_the_scorers_twin_check_passes_a_windowed_model_on_either_path(path):
    """The scorer's check (src/harness/score.py): a twin of a batch, rows permuted and each row's future replaced
    after its own cut, gives bitwise the same logits up to the cuts."""
    sdpa, flex = pair(depth=2, seq=64, pattern="S")
    model = sdpa if path == "sdpa" else flex
    x = torch.randint(0, V, (8, 64), generator=torch.Generator().manual_seed(0))
    twin = make_twin(x, torch.randint(0, V, (4096,), generator=torch.Generator().manual_seed(1)), random.Random(2))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        assert twin_mismatch(model(x), model(twin.ids), twin) is None


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks"])  # scope=model, the default: the CLI test in tests/harness/test_device.py
def test_a_compiled_model_trains_and_scores_like_the_eager_one(scope):
    """Compiled on CPU (SDPA masks inside the graph): the same logits, loss and gradients as eager."""
    sdpa, _ = pair(depth=2, seq=128, pattern="SL")
    eager = GPT(sdpa.config)
    eager.load_state_dict(sdpa.state_dict())
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, compile=True, peak_flops=0.0, name="cpu",
                 compile_scope=scope)
    fwd = compile_model(sdpa.train(), rt)
    x, y = torch.randint(0, V, (2, 128)), torch.randint(0, V, (2, 128))
    losses = []
    for model in (fwd, eager.train()):
        loss = torch.nn.functional.cross_entropy(model(x).view(-1, V), y.view(-1))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (name, p), q in zip(sdpa.named_parameters(), eager.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    with torch.no_grad():
        assert (fwd(x) - eager(x)).abs().max().item() < 1e-4


@pytest.mark.slow
def test_flexattention_compiled_gives_the_eager_sdpa_logits():
    """The fused FlexAttention kernel (compiled; on CPU forward only) against the scorer's eager SDPA path."""
    sdpa, flex = pair(depth=2, seq=256, pattern="SL")
    x = torch.randint(0, V, (2, 256))
    with torch.no_grad():
        compiled = torch.compile(flex, dynamic=False)(x)
    assert (compiled - logits(sdpa, x)).abs().max().item() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlexAttention's backward)")
def test_on_cuda_the_compiled_flex_path_matches_the_mask_path_in_values_and_gradients():
    torch.manual_seed(0)
    cfg = GPTConfig.from_model_config(ModelConfig(depth=2, aspect_ratio=64, head_dim=64, sequence_len=512,
                                                  window_pattern="SL"), V)
    auto = GPT(cfg).cuda()
    auto.init_weights()
    with torch.no_grad():
        for p in auto.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = GPT(dataclasses.replace(cfg, attention="sdpa")).cuda()
    ref.load_state_dict(auto.state_dict())
    x, y = torch.randint(0, V, (4, 512), device="cuda"), torch.randint(0, V, (4, 512), device="cuda")
    out = []
    for model in (torch.compile(auto, dynamic=False), ref):  # auto compiled on CUDA takes FlexAttention
        loss = torch.nn.functional.cross_entropy(model(x).view(-1, V), y.view(-1))
        loss.backward()
        out.append(loss.item())
    assert out[0] == pytest.approx(out[1], abs=1e-4)
    for p, q in zip(auto.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3)
