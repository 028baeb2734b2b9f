"""The model host: the one process of scoring that runs research code, and all it does is turn ids into logits.

The scorer (src/harness/score.py, "the judge") never imports research code. It starts two hosts, sends each
batches of input ids and gets logits back; it alone holds the validation targets, the token byte lengths, the
loss arithmetic, the checks and the verdict. Whatever the research code does in a host (rebind torch, patch a
class, keep state, look at the clock) it can change only the logits that host returns, and those are checked
on the scored batches themselves (score.py). A host cannot reach the judge, the other host or the data:
- it loads the checkpoint and then, before the research code is imported, closes itself in: Landlock (Linux)
  lets it read only Python, the libraries and the experiment's own code (not the data cache, not the run
  dirs, not /proc of other processes), write nothing, execute nothing, open no TCP connection, signal or
  ptrace no process outside itself; an audit hook refuses processes and sockets;
- it has no gradient machinery (no_gradients), and the judge counts its CPU time from the kernel (a few batches'
  worth beyond its forward passes, score.py): it cannot train while it is being scored;
- it talks only through the two pipes it was given.

Protocol (binary, on the fds given by --req-fd/--rep-fd): the judge first sends one JSON line
{"checkpoint", "threads", "read"}; the host replies with a JSON line {"stage": "research", "cpu_s": its CPU
seconds so far} just before it imports the research code (what follows is the research code's CPU time, which
the judge bounds), then one JSON line {"ok": true, "vocab": V, "sandbox": ..., "threads": N} or {"ok": false,
"error"} (the stage line is missing when it failed before). Then for each request a 16-byte header (rows,
length as two little-endian int64) and rows x length int64 ids; the reply is an 8-byte status (0 ok, 1 the model
raised, 2 not logits) and rows x length x V float32 logits, or on error a nonzero status followed by one JSON line.
Requests are answered in order (the judge may send the next before it has judged a reply). EOF on the request
pipe ends the host.

Usage: python -m src.harness.host --req-fd R --rep-fd W   (started by src/harness/score.py, never by hand)
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import torch

from src.harness.config import TrainConfig, to_object
from src.harness.device import DTYPES, Runtime
from src.harness.landlock import restrict
from src.harness.sandbox import SandboxError, install as install_sandbox

HEADER = struct.Struct("<qq")
STATUS = struct.Struct("<q")
OK, FAILED, BROKEN = 0, 1, 2  # reply statuses: logits follow | the model raised | it broke the logits contract


def read_exact(f, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise EOFError
        got += k
    return buf


NO_GRADIENTS = ("the model host computes logits and nothing else: no gradients here (training while being scored "
                "is compute outside the run's budget)")


def no_gradients() -> None:
    """Take the gradient machinery away from this process before the research code is imported: backward passes,
    torch.autograd.grad and its functional forms, forward-mode AD and torch.func's transforms all raise. Red team
    of 2026-12-07: a model that stashed training batches in a buffer trained on them in its first scored forward
    call (enable_grad inside no_grad, 25 Adam steps) and was kept; the judge's checks pass on such a model, since
    every later call sees the same trained weights. (Training by forward passes alone, hand-written gradients
    included, stays possible: the judge bounds it by the host's CPU time, score.HOST_FACTOR and CALL_FACTOR.)"""
    import torch.autograd.forward_ad
    import torch.autograd.functional
    import torch.func

    def refuser(name: str):  # one function object per name: torch's compiler keys its rules by object
        def refuse(*args, **kwargs):
            raise SandboxError(f"{name}: {NO_GRADIENTS}")
        refuse.__name__ = refuse.__qualname__ = name
        return refuse

    torch.Tensor.backward = refuser("Tensor.backward")
    for mod, names in ((torch.autograd, ("backward", "grad")), (torch.autograd.forward_ad, ("make_dual",)),
                       (torch.autograd.functional, ("vjp", "jvp", "jacobian", "hessian", "vhp", "hvp")),
                       (torch.func, ("grad", "grad_and_value", "vjp", "jvp", "jacrev", "jacfwd", "hessian",
                                     "linearize"))):
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, refuser(f"{mod.__name__}.{name}"))
    # the engine itself, which the entry points above call (red team, eighth session: `_engine_run_backward` called
    # directly). A speed bump, not the wall: a reverse pass by hand is always possible; the judge's CPU bound is the wall
    import torch.autograd.graph

    if hasattr(torch.autograd.graph, "_engine_run_backward"):
        torch.autograd.graph._engine_run_backward = refuser("torch.autograd.graph._engine_run_backward")

    class NoEngine:
        def __getattr__(self, name):
            raise SandboxError(f"the autograd engine ({name}): {NO_GRADIENTS}")

    torch.autograd.Variable._execution_engine = NoEngine()


def build(ckpt: dict, research_dir: Path):
    """The experiment's model from its own code (imported only now, inside the sandbox) and the checkpoint."""
    from omegaconf import OmegaConf

    cfg = to_object(OmegaConf.create(ckpt["config"]), TrainConfig)
    from src.research.model import GPT, GPTConfig  # the research code

    model = GPT(GPTConfig.from_model_config(cfg.model, cfg.data.vocab_size))
    model.load_state_dict(ckpt["model"], strict=True)
    return cfg, model


def reply(rep, status: int, error: str) -> None:
    rep.write(STATUS.pack(status) + (json.dumps({"error": error}) + "\n").encode())
    rep.flush()


def serve(req, rep, model, vocab: int, device, autocast) -> None:
    """Answer logits requests until EOF."""
    while True:
        try:
            rows, length = HEADER.unpack(read_exact(req, HEADER.size))
        except EOFError:
            return
        ids = torch.frombuffer(read_exact(req, rows * length * 8), dtype=torch.int64).view(rows, length)
        try:
            with torch.no_grad(), autocast():
                out = model(ids.to(device))
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows, length, vocab):
                why = (f"the model returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))} for input ids "
                       f"({rows}, {length}); the contract is logits (B, T, vocab={vocab})")
                reply(rep, BROKEN, why)
                continue
            data = memoryview(out.detach().float().cpu().contiguous().numpy()).cast("B")  # no copy
        except (PermissionError, SandboxError) as e:  # it reached for what the sandbox keeps from it
            reply(rep, BROKEN, f"the sandbox refused the model: {type(e).__name__}: {e}")
            continue
        except Exception as e:  # the research code failed on this batch: the judge says so
            reply(rep, FAILED, f"{type(e).__name__}: {e}")
            continue
        rep.write(STATUS.pack(0))
        rep.write(data)
        rep.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.harness.host")
    ap.add_argument("--req-fd", type=int, required=True)
    ap.add_argument("--rep-fd", type=int, required=True)
    args = ap.parse_args(argv)
    req, rep = os.fdopen(args.req_fd, "rb", buffering=0), os.fdopen(args.rep_fd, "wb")
    line = req.readline()
    if not line:
        return 0
    hello = json.loads(line)
    try:
        ckpt = torch.load(hello["checkpoint"], map_location="cpu", weights_only=True)
        threads = hello.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        research_dir = Path.cwd() / "src"
        sandbox = restrict([research_dir, *hello.get("read", [])], deny_tcp=True, scope_signals=True,
                           cuda=ckpt["device"] == "cuda")
        install_sandbox(research_dir / "research", sockets=True, any_process=True)
        no_gradients()
        # the CPU time spent so far is the harness's; from here on it is the research code's (the judge bounds it)
        rep.write((json.dumps({"stage": "research", "cpu_s": time.process_time()}) + "\n").encode())
        rep.flush()
        cfg, model = build(ckpt, research_dir)
        device, dtype = torch.device(ckpt["device"]), DTYPES[ckpt["dtype"]]
        rt = Runtime(device=device, dtype=dtype, compile=False, peak_flops=0.0, name=ckpt["device"])
        model.to(device).eval()
    except Exception as e:
        refused = isinstance(e, (PermissionError, SandboxError))
        rep.write((json.dumps({"ok": False, "refused": refused, "error": f"{type(e).__name__}: {e}"}) + "\n").encode())
        rep.flush()
        return 1
    rep.write((json.dumps({"ok": True, "vocab": cfg.data.vocab_size, "sandbox": sandbox.reason,
                           "threads": torch.get_num_threads()}) + "\n").encode())
    rep.flush()
    serve(req, rep, model, cfg.data.vocab_size, device, rt.autocast)
    return 0


if __name__ == "__main__":
    sys.exit(main())
