"""Token methods, probe 16: bad input of the TEXT init. Each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.config import ConfigError


@pytest.mark.parametrize("where", ["missing", "empty", "hub"])
def test_a_tokenizer_that_does_not_load_is_refused_in_one_line_naming_the_field(where, tmp_path, monkeypatch):
    """A TEXT init whose tokenizer_name_or_path gives no tokenizer raised transformers' OSError ("Repo id must be in
    the form ...", from huggingface_hub) or a ValueError of eight lines ("Couldn't instantiate the backend tokenizer")
    naming neither the field nor the path; now one ConfigError naming both, and the model is left as it was."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = {"missing": str(tmp_path / "nowhere"), "empty": str(tmp_path), "hub": "no-such-org/no-such-tokenizer"}
    base = tiny_model("llama", "causal_lm")
    inputs = tiny_inputs("llama", "causal_lm")
    with torch.no_grad():
        before = base(**inputs).logits
    config = dt.PromptTuningConfig(
        num_virtual_tokens=3,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="the cat",
        tokenizer_name_or_path=path[where],
    )
    with pytest.raises(ConfigError) as err:
        dt.get_delta_model(base, config)
    message = str(err.value)
    assert message.startswith(
        f"tokenizer_name_or_path={path[where]!r} (for prompt_tuning_init='TEXT') gives no tokenizer"
    )
    assert "\n" not in message
    assert "virtual_tokens" not in base._modules and not base._forward_pre_hooks and not base._forward_hooks
    assert "prepare_inputs_for_generation" not in base.__dict__
    assert config.token_dim is None  # the caller's config is not filled in either
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).logits, before, atol=0, rtol=0)
