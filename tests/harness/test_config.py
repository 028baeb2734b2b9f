"""Every option of every config group composes against its schema; typos fail at compose time.

Run: python -m pytest -q tests/harness/test_config.py
"""
import re

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from src.harness.config import GROUPS, TrainConfig
from tests.support.helpers import compose_train_cfg, config_options


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in config_options(g)])
def test_every_option_of_every_group_composes_to_its_schema(group, option):
    cfg = compose_train_cfg([f"{group}={option}"])
    assert isinstance(cfg, TrainConfig)
    assert isinstance(getattr(cfg, group), GROUPS[group])


def test_every_group_has_options():
    for group in GROUPS:
        assert config_options(group), f"conf/{group}/ has no options"


def test_defaults_are_the_cpu_recipe():
    cfg = compose_train_cfg([])
    assert (cfg.model.name, cfg.batch.name, cfg.device.type, cfg.data.name) == ("cpu", "cpu", "auto", "shakespeare")
    assert cfg.budget.mode == "time" and cfg.budget.seconds == 120


@pytest.mark.parametrize("bad,key", [("model.depht=3", "model.depht"), ("optimizer.matrix_lr=fast", "optimizer.matrix_lr"),
                                     ("batch.total_tokens=1.5", "batch.total_tokens"), ("nosuchkey=1", "nosuchkey")])
def test_typos_and_bad_types_fail_at_compose_time_naming_the_key(bad, key):
    with pytest.raises(ConfigCompositionException, match=re.escape(key)):
        compose_train_cfg([bad])


def test_an_unknown_group_option_fails_listing_the_valid_ones():
    with pytest.raises(MissingConfigException, match=r"Could not find 'model/nosuch'(.|\n)*Available options in 'model'"):
        compose_train_cfg(["model=nosuch"])
