"""P-tuning (v1): MLP and LSTM prompt encoders on every task type, PEFT equivalence, folding, bad input, learning."""

from __future__ import annotations

import pytest
import torch
from _token_checks import (
    CASES,
    GENERATIVE,
    N,
    adapted,
    check_beam_search,
    check_forward,
    check_generate,
    check_left_padding,
    check_peft_equivalence,
    check_save_load,
    check_train_step,
    fresh,
    ids,
    logits,
)
from tiny import tiny_inputs

import deltatune as dt
from deltatune.config import ConfigError

MLP = dt.PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=16)
LSTM = dt.PTuningConfig(num_virtual_tokens=N, encoder_reparameterization_type="LSTM", encoder_hidden_size=8)
CONFIGS = [pytest.param(MLP, id="mlp"), pytest.param(LSTM, id="lstm")]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_forward(family, task, config):
    check_forward(family, task, config)


@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_train_step(family, task):
    check_train_step(family, task, MLP)


def test_train_step_lstm():
    check_train_step("llama", "causal_lm", LSTM)


@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_save_load(family, task, tmp_path):
    check_save_load(family, task, MLP, tmp_path)


@pytest.mark.parametrize(("family", "task"), GENERATIVE, ids=ids(GENERATIVE))
def test_generate_equals_greedy_loop(family, task):
    check_generate(family, task, MLP)


@pytest.mark.parametrize(("family", "task"), GENERATIVE, ids=ids(GENERATIVE))
def test_left_padded_batch(family, task):
    check_left_padding(family, task, MLP)


@pytest.mark.parametrize(("family", "task"), GENERATIVE, ids=ids(GENERATIVE))
def test_beam_search(family, task):
    check_beam_search(family, task, LSTM)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_peft_equivalence(family, task, config, tmp_path):
    check_peft_equivalence(family, task, config, tmp_path)


def test_peft_alias():
    assert dt.PromptEncoderConfig is dt.PTuningConfig
    assert dt.PTuningConfig().peft_type == "P_TUNING"


@pytest.mark.parametrize("config", CONFIGS)
def test_fold_keeps_outputs_and_drops_the_encoder(config):
    inputs = tiny_inputs("gpt2", "causal_lm")
    model = adapted("gpt2", "causal_lm", config)
    before = logits(model, inputs)
    dt.fold_virtual_tokens(model)
    encoder = model.base_model.virtual_tokens.prompt_encoder["default"]
    assert encoder.mlp_head is None and encoder.lstm_head is None
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-6, rtol=0)
    assert encoder.embedding.weight.requires_grad  # the folded table still trains


def test_loaded_adapter_is_folded(tmp_path):
    model = adapted("llama", "causal_lm", MLP)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(fresh("llama", "causal_lm"), tmp_path, is_trainable=True)
    encoder = loaded.base_model.virtual_tokens.prompt_encoder["default"]
    assert encoder.mlp_head is None and encoder.embedding.weight.requires_grad
    assert loaded.get_nb_trainable_parameters()[0] == N * 32


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
        ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
        ({"encoder_dropout": 1.0}, "encoder_dropout"),
        ({"encoder_num_layers": 0}, "encoder_num_layers"),
    ],
)
def test_bad_fields(fields, match):
    with pytest.raises(ConfigError, match=match):
        dt.PTuningConfig(**fields)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_learns_a_fixed_mapping(config):
    from _token_learning import assert_learns_mapping

    assert_learns_mapping(config.replace(num_virtual_tokens=8, encoder_hidden_size=32), lr=0.01)
