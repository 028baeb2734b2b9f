"""A declared search space (conf/search_space/*.yaml) as Optuna distributions and overrides.

Each knob names a train config key and its range (float/int, optionally log or stepped), its
choices, or `same_as` another knob (batch.device_tokens follows batch.total_tokens).

Usage: dists = distributions(space); overrides = to_overrides(trial.params, space)
"""
from __future__ import annotations

import math
from typing import Any

from src.harness.config import TrainConfig
from src.lab.config import KnobConfig, SearchSpaceConfig
from src.lab.proposal import get_dotted


class SpaceError(ValueError):
    pass


def check_space(space: SearchSpaceConfig, roots: list[str]) -> None:
    """Fail at start-up, naming the knob, when the space is malformed or names a key that does not exist."""
    if not space.knobs:
        raise SpaceError(f"search_space={space.name} declares no knobs; add `knobs:` entries "
                         "({key, type, low/high | choices | same_as})")
    keys = [k.key for k in space.knobs]
    for k in space.knobs:
        where = f"search_space={space.name}, knob {k.key!r}"
        try:
            get_dotted(TrainConfig(), k.key)
        except AttributeError:
            raise SpaceError(f"{where}: no such train config key (see src/harness/config.py)") from None
        if k.key.split(".")[0] not in roots:
            raise SpaceError(f"{where}: outside search.override_roots {roots}")
        if k.type in ("float", "int"):
            if k.low is None or k.high is None or not k.low < k.high:
                raise SpaceError(f"{where}: type {k.type} needs low < high (got {k.low}, {k.high})")
            if k.log and k.low <= 0:
                raise SpaceError(f"{where}: log scale needs low > 0")
        elif k.type == "choice":
            if not k.choices:
                raise SpaceError(f"{where}: type choice needs a non-empty `choices` list")
        elif k.type == "same_as":
            if k.same_as not in keys or k.same_as == k.key:
                raise SpaceError(f"{where}: same_as must name another knob of the space")
        else:
            raise SpaceError(f"{where}: type {k.type!r}; expected float, int, choice or same_as")


def distributions(space: SearchSpaceConfig) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for k in space.knobs:
        if k.type == "float":
            out[k.key] = FloatDistribution(float(k.low), float(k.high), log=k.log, step=k.step)
        elif k.type == "int":
            out[k.key] = IntDistribution(int(k.low), int(k.high), log=k.log, step=int(k.step or 1))
        elif k.type == "choice":
            out[k.key] = CategoricalDistribution(list(k.choices))
    return out


def format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if v != 0 and math.isfinite(v) else str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def resolve(params: dict, space: SearchSpaceConfig) -> dict:
    """params plus the same_as knobs, in the space's order."""
    out = {}
    for k in space.knobs:
        out[k.key] = params[k.same_as] if k.type == "same_as" else params[k.key]
    return out


def to_overrides(params: dict, space: SearchSpaceConfig) -> list[str]:
    return [f"{key}={format_value(v)}" for key, v in resolve(params, space).items()]


def values_of(cfg: Any, space: SearchSpaceConfig) -> dict:
    """The sampled knobs' current values in a typed config (same_as knobs left out)."""
    return {k.key: get_dotted(cfg, k.key) for k in space.knobs if k.type != "same_as"}


def knob(space: SearchSpaceConfig, key: str) -> KnobConfig:
    return next(k for k in space.knobs if k.key == key)
