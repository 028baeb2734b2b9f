"""Every option of every config group composes against its schema; typos fail at compose time.

Run: python -m pytest tests/test_config.py -q
"""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from src.config import GROUPS, TrainConfig, register_configs, to_object

CONF = Path(__file__).resolve().parent.parent / "conf"
register_configs()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_object(compose(config_name="train", overrides=overrides))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_train([f"{group}={option}"])
    assert isinstance(cfg, TrainConfig)
    assert isinstance(getattr(cfg, group), GROUPS[group])


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


def test_defaults_are_the_cpu_recipe():
    cfg = compose_train([])
    assert (cfg.model.name, cfg.batch.name, cfg.device.type, cfg.data.name) == ("cpu", "cpu", "auto", "shakespeare")
    assert cfg.budget.mode == "time" and cfg.budget.seconds == 120


@pytest.mark.parametrize("bad", ["model.depht=3", "optimizer.matrix_lr=fast", "batch.total_tokens=1.5", "nosuchkey=1"])
def test_typos_and_bad_types_fail_at_compose_time(bad):
    with pytest.raises(ConfigCompositionException) as e:
        compose_train([bad])
    assert "depht" in str(e.value) or "matrix_lr" in str(e.value) or "total_tokens" in str(e.value) \
        or "nosuchkey" in str(e.value)


def test_unknown_option_fails():
    with pytest.raises(Exception, match="nosuch"):
        compose_train(["model=nosuch"])
