"""Token methods, probe 19 (prompt tuning, P-tuning, prefix tuning, VPT against peft 0.21.2). Each test failed before
its fix."""

from __future__ import annotations

import pytest
import torch
from tiny import minilm_path, tiny_model

import deltatune as dt
from deltatune.config import ConfigError


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_prefix_projection_that_is_not_a_boolean_is_refused_naming_the_field(value):
    # "false" was taken as true (a non-empty string): the MLP reparametrisation was built against the user's word.
    with pytest.raises(ConfigError, match=r"^prefix_projection must be true or false, got "):
        dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=value)


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"tokenizer_kwargs": "use_fast=False"}, "tokenizer_kwargs"),
        ({"tokenizer_kwargs": ["use_fast"]}, "tokenizer_kwargs"),
        ({"prompt_tuning_init_text": 123}, "prompt_tuning_init_text"),
        ({"prompt_tuning_init_text": ["the cat"]}, "prompt_tuning_init_text"),
    ],
)
def test_a_text_init_field_of_the_wrong_type_is_refused_in_one_line_and_the_model_is_left_as_it_was(fields, key):
    # Before: the config was accepted and inject failed deep inside (AttributeError "'str' object has no attribute
    # 'items'", tokenizers' ValueError listing its input types, TypeError "'>=' not supported ... 'list' and 'int'").
    base = dict(
        task_type="CAUSAL_LM",
        num_virtual_tokens=3,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="the cat",
        tokenizer_name_or_path=minilm_path(),  # a real tokenizer: the failure was past it
    )
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"^{key} must be "):
        dt.get_delta_model(model, dt.PromptTuningConfig(**{**base, **fields}))
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "virtual_tokens" not in dict(model.named_children())
