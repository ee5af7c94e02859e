"""Fixes after the review of pref probe 21: align.loss_weights past a float refused in one line; a resumed dpo / kto
run training the base in place keeps the base (scored before its first step) as its reference; the report names
that reference."""

import sys

import pytest

from deltatune.config import ConfigError
from deltatune.train.config import build


@pytest.mark.parametrize("weights", [[10**400], [1, -(10**400)]])
def test_dpo_loss_weights_past_a_float_are_one_line(weights, tmp_path):
    """An int too large for a float (YAML reads 1000...0 as one) gave OverflowError from math.isfinite, deep in the
    check meant to refuse it: refused naming the key, as NaN and inf are; the largest float still passes."""
    kinds = ["sigmoid", "sft"][: len(weights)]
    recipe = {"stage": "dpo", "model": {"name_or_path": "x"}, "data": {"train": str(tmp_path / "p.jsonl")}}
    with pytest.raises(ConfigError, match=r"^align\.loss_weights must be \d numbers, one per align\.loss_type"):
        build({**recipe, "align": {"loss_type": kinds, "loss_weights": weights}})
    largest = [int(sys.float_info.max)] * len(kinds)  # (exactly a float: not refused)
    assert build({**recipe, "align": {"loss_type": kinds, "loss_weights": largest}}).align.loss_weights == largest
