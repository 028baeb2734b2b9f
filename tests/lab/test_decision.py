"""Noise floor and keep/discard (src/lab/decision.py).

Run: python -m pytest -q tests/lab/test_decision.py
"""
import math

import pytest

from src.lab.decision import NoiseFloor, decide


def test_sigma_is_pooled_over_groups_of_repeats_ignoring_nan():
    n = NoiseFloor.pooled([[2.60, 2.64], [2.50], [3.0, 3.02, 3.04]])
    # (0.02^2*2 + (0.02^2*2)) / (1 + 2) pooled
    assert n.dof == 3 and n.sigma == pytest.approx(math.sqrt((0.0008 + 0.0008) / 3))
    assert NoiseFloor.pooled([[2.5]]).dof == 0 and NoiseFloor.pooled([]).sigma == 0.0
    assert NoiseFloor.pooled([[1.0, float("nan"), 1.2]]).dof == 1


def test_the_margin_is_k_sigmas_or_the_minimum_delta_when_there_is_no_noise():
    n = NoiseFloor(sigma=0.01, dof=1)
    assert n.margin(2.0, 0.002) == pytest.approx(0.02)
    assert NoiseFloor(0.0, 1).margin(2.0, 0.002) == 0.002


def test_keep_only_beyond_the_margin():
    assert decide(2.50, best=2.60, margin=0.05).keep
    v = decide(2.56, best=2.60, margin=0.05)
    assert not v.keep and v.delta == pytest.approx(-0.04)
    assert not decide(2.25, best=2.5, margin=0.25).keep  # exactly the margin is not enough (binary-exact values)
    assert not decide(2.70, best=2.60, margin=0.0).keep
