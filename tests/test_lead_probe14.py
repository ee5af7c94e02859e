"""Review findings of probe 14 fixed by the lead: resume-harmless Trainer keys, a missing absolute model path, an
adapter config that is not UTF-8, a resumed preference run's paired metrics."""

from __future__ import annotations

import os

import pytest

from deltatune.config import ConfigError


@pytest.mark.parametrize("key, value", [("logging_first_step", True), ("eval_accumulation_steps", 4)])
def test_trainer_keys_that_change_no_training_are_harmless_on_resume(key, value):
    """train.logging_first_step and train.eval_accumulation_steps (recipe keys since 5847216) change what is logged
    or how evaluation batches are gathered, not the training: --resume takes them as logging_steps (it refused)."""
    from deltatune.train.runfolder import recipe_changes

    old = {"stage": "sft", "train": {"lr": 1e-3}}
    assert recipe_changes(old, {"stage": "sft", "train": {"lr": 1e-3, key: value}}) == []
    assert recipe_changes(old, {"stage": "sft", "train": {"lr": 2e-3, key: value}}) != []


def test_a_missing_absolute_model_path_is_named_a_missing_folder_not_a_hub_id(tmp_path):
    from deltatune.train.models import not_loaded

    gone = str(tmp_path / "gone")
    assert str(not_loaded(gone, OSError("x"))) == f"model {gone!r}: no such folder"
    assert "the hub could not provide it" in str(not_loaded("org/name", OSError("x")))


def test_an_adapter_config_that_is_not_utf8_is_one_line(tmp_path):
    from deltatune.config import read_config_file

    (tmp_path / "adapter_config.json").write_bytes(b'{"peft_type": "LORA\xff"}')
    with pytest.raises(ConfigError, match=r"adapter_config.json is not UTF-8 text \(byte 19\); an adapter config is JSON$"):
        read_config_file(str(tmp_path))
    assert os.listdir(tmp_path) == ["adapter_config.json"]
