"""The training process's check that research code left the harness and the libraries alone.

A snapshot of the identity of every function and class of torch, torch.nn.functional, torch.Tensor, math,
builtins and the harness modules, taken before research code is imported and compared at the checkpoint: a
rebinding is the status `tampered` (src/harness/train.py). (The scorer needs none of this: research code never
runs in its process, src/harness/score.py.)

Usage: before = library_snapshot(extra=("time", ...)); ...; changed = library_changes(before)
"""
from __future__ import annotations

import builtins
import math
import sys

import torch
import torch._dynamo  # noqa: F401  (importing it rebinds torch.manual_seed: import it before any snapshot)
import torch.nn.functional as F

import src.harness.data
import src.harness.evaluate

CLASSES = ("torch.Tensor", "torch._C.TensorBase", "torch.nn.Module")  # a new attribute here shadows a method


def _watched(extra: tuple = ()) -> dict:
    return {**{name: sys.modules[name] for name in extra if name in sys.modules},
            "torch": torch, "torch.nn.functional": F, "torch.Tensor": torch.Tensor,
            "torch._C.TensorBase": torch._C.TensorBase, "torch.nn.Module": torch.nn.Module, "torch.nn": torch.nn,
            "math": math, "builtins": builtins, "src.harness.evaluate": src.harness.evaluate,
            "src.harness.data": src.harness.data, "src.harness.snapshot": sys.modules[__name__]}


def library_snapshot(extra: tuple = ()) -> dict:
    """Identity of every function and class of the watched modules and classes (plus the modules in `extra`).
    Plain data (time.tzname, ...) is left out: libraries update it as they run."""
    return {(name, attr): id(value) for name, mod in _watched(extra).items() for attr, value in list(vars(mod).items())
            if callable(value) or isinstance(value, (staticmethod, classmethod, property))}


def library_changes(before: dict) -> list[str]:
    """What was rebound or removed since `before` was taken, and what was added to a watched class.
    (Attributes added to modules are not compared: torch adds submodules as they are imported.)"""
    now = library_snapshot(tuple({name for name, _ in before}))
    changed = {f"{name}.{attr}" for (name, attr), ident in before.items() if now.get((name, attr)) != ident}
    changed |= {f"{name}.{attr}" for (name, attr) in now if name in CLASSES and (name, attr) not in before}
    return sorted(changed)
