"""Probe 23 (adapters): bottleneck init_weights given as 0 / 1."""

from __future__ import annotations

import warnings

import pytest

from deltatune import BottleneckConfig
from deltatune.config import ConfigError


@pytest.mark.parametrize("value", [0, 1, 0.0])
def test_bottleneck_init_weights_number_refused(value):
    # 0 == False passed the membership check but ran True's init for W_down / W_up (``init is not False``) and
    # False's for the gate: half of each; a number is refused as the other switches are
    with pytest.raises(ConfigError, match="init_weights must be True, False"):
        BottleneckConfig(init_weights=value, use_gating=True)


def test_bottleneck_init_weights_number_in_a_file_loads():
    # a file saved with 0 / 1 (accepted before) still loads: its weights come from the file, not the init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert BottleneckConfig.from_dict({"init_weights": 1}).init_weights is True
        assert BottleneckConfig.from_dict({"init_weights": 0}).init_weights is False
    assert BottleneckConfig.from_dict({"init_weights": "bert"}).init_weights == "bert"
