"""Prefix tuning (MLP reparametrisation, folded after training) and P-tuning v2 (deep prompts).

Every task type on several families, PEFT equivalence, folding, bad input (unsupported attention, too many
positions, adapters made for another model), learning.
"""

from __future__ import annotations

import copy

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
    unchanged,
)
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.config import ConfigError

PREFIX = dt.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16)
PTV2 = dt.PrefixTuningConfig(num_virtual_tokens=N)  # P-tuning v2: prefix_projection=False
CONFIGS = [pytest.param(PREFIX, id="prefix"), pytest.param(PTV2, id="ptv2")]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_forward(family, task, config):
    check_forward(family, task, config)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_train_step(family, task, config):
    check_train_step(family, task, config)


@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_save_load(family, task, tmp_path):
    check_save_load(family, task, PREFIX, tmp_path)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("family", "task"), GENERATIVE, ids=ids(GENERATIVE))
def test_generate_equals_greedy_loop(family, task, config):
    check_generate(family, task, config)


@pytest.mark.parametrize(("family", "task"), GENERATIVE, ids=ids(GENERATIVE))
def test_left_padded_batch(family, task):
    check_left_padding(family, task, PTV2)


@pytest.mark.parametrize(("family", "task"), GENERATIVE, ids=ids(GENERATIVE))
def test_beam_search(family, task):
    check_beam_search(family, task, PREFIX)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_peft_equivalence(family, task, config, tmp_path):
    check_peft_equivalence(family, task, config, tmp_path)


def test_saved_form_is_the_folded_prefix(tmp_path):
    """Only the flat prefixes are saved, (n, layers * 2 * kv_heads * head_dim): llama tiny has 2 kv heads of 8."""
    from safetensors.torch import load_file

    model = adapted("llama", "causal_lm", PREFIX)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (N, 2 * 2 * 16)
    config = model.peft_config["default"]
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (2, 2, 16)


@pytest.mark.parametrize(("family", "task"), [("llama", "causal_lm"), ("bert", "seq_cls"), ("t5", "seq2seq")])
def test_folded_equals_unfolded(family, task):
    inputs = tiny_inputs(family, task)
    model = adapted(family, task, PREFIX)
    before = logits(model, inputs)
    dt.fold_virtual_tokens(model)
    encoder = model.base_model.virtual_tokens.prompt_encoder["default"]
    assert encoder.transform is None
    assert encoder.embedding.weight.shape[1] == model.peft_config["default"].num_layers * 2 * encoder_width(model)
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-6, rtol=0)


def encoder_width(model: dt.DeltaModel) -> int:
    return model.peft_config["default"].token_dim


def test_zero_init_keeps_outputs_of_zero_prefixes():
    model = dt.get_delta_model(fresh("llama", "causal_lm"), PTV2.replace(init_weights="zero", task_type="CAUSAL_LM"))
    prefixes = model.base_model.virtual_tokens.prompt_encoder["default"]()
    assert torch.count_nonzero(prefixes) == 0


def test_attention_that_cannot_take_a_prefix():
    base = tiny_model("deberta-v2", "seq_cls")
    reference = copy.deepcopy(base)
    with pytest.raises(ConfigError, match="'deberta-v2' cannot take a key/value prefix"):
        dt.get_delta_model(base, PTV2.replace(task_type="SEQ_CLS"))
    unchanged(base, reference, "deberta-v2", "seq_cls")


@pytest.mark.parametrize("config", [dt.PromptTuningConfig(num_virtual_tokens=2), dt.PTuningConfig(num_virtual_tokens=2),
                                    PTV2], ids=["prompt_tuning", "p_tuning", "prefix_tuning"])  # fmt: skip
def test_token_methods_on_a_vision_model_point_to_vpt(config):
    """A ViT has a patch embedding, no tokens: prompt tuning and P-tuning failed with an AttributeError from
    inside torch, prefix tuning suggested those two. One refusal now, naming vpt, the model left as it was."""
    base = tiny_model("vit", "image_cls")
    reference = copy.deepcopy(base)
    with pytest.raises(
        ConfigError, match=r"model type 'vit' has no token embedding \(ViTPatchEmbeddings\): .*use vpt"
    ):
        dt.get_delta_model(base, config.replace(task_type=None))
    for (name, p), (_, q) in zip(base.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name
    assert [n for n, _ in base.named_modules()] == [n for n, _ in reference.named_modules()]


def test_prefix_longer_than_max_positions():
    """bert tiny has 64 learned positions, and a prefix shifts the real tokens' positions by n."""
    base = fresh("bert", "seq_cls")
    reference = copy.deepcopy(base)
    with pytest.raises(ConfigError, match="max_position_embeddings=64"):
        dt.get_delta_model(base, PTV2.replace(num_virtual_tokens=100, task_type="SEQ_CLS"))
    unchanged(base, reference, "bert", "seq_cls")
    model = dt.get_delta_model(base, PTV2.replace(num_virtual_tokens=60, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="67 positions needed"):
        model(**tiny_inputs("bert", "seq_cls"))


@pytest.mark.parametrize(
    ("other", "match"),
    [({"num_hidden_layers": 3}, "num_layers=2 does not fit"), ({"num_key_value_heads": 4}, "does not fit")],
    ids=["layers", "heads"],
)
def test_load_for_another_model_is_refused(other, match, tmp_path):
    adapted("llama", "causal_lm", PTV2).save_pretrained(tmp_path)
    base = tiny_model("llama", "causal_lm", **other)
    reference = copy.deepcopy(base)
    model = dt.DeltaModel(base)
    with pytest.raises(ConfigError, match=match):
        model.load_adapter(tmp_path, "default")
    assert not model.peft_config
    unchanged(base, reference, "llama", "causal_lm")


def test_merge_and_unload_refuses():
    with pytest.raises(TypeError, match="nothing to merge"):
        adapted("gpt2", "causal_lm", PTV2).merge_and_unload()


def test_prefix_and_prompt_adapters_switch():
    inputs = tiny_inputs("gpt2", "causal_lm")
    model = adapted("gpt2", "causal_lm", PTV2)
    prefix_out = logits(model, inputs)
    model.add_adapter("prompt", dt.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    model.set_adapter("prompt")
    prompt_out = logits(model, inputs)
    assert not torch.allclose(prompt_out, prefix_out, atol=1e-4)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, inputs), prefix_out, atol=0, rtol=0)


@pytest.mark.parametrize("bad", [{"num_virtual_tokens": 0}, {"init_weights": "ones"}, {"encoder_hidden_size": -1}])
def test_bad_fields(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        dt.PrefixTuningConfig(**bad)


@pytest.mark.slow
@pytest.mark.parametrize(("config", "lr"), [(PREFIX, 0.01), (PTV2, 0.1)], ids=["prefix", "ptv2"])
def test_learns_a_fixed_mapping(config, lr):
    from _token_learning import assert_learns_mapping

    assert_learns_mapping(config.replace(num_virtual_tokens=8, encoder_hidden_size=32), lr=lr)


@pytest.mark.slow
def test_ptuning_v2_learns_sst2_on_minilm():
    """P-tuning v2 on the real pre-trained MiniLM encoder and real SST-2 rows: the loss falls."""
    from _sst2_learning import check_learns

    check_learns(dt.PrefixTuningConfig(num_virtual_tokens=10, task_type="SEQ_CLS"), lr=0.05)


def test_gradient_checkpointing_is_refused():
    model = adapted("llama", "causal_lm", PTV2)
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**tiny_inputs("llama", "causal_lm"))


def test_training_forward_asks_no_deprecated_attribute():
    """The check for checkpointing reads transformers' current property, not the one 5.24 deprecates (a warning on
    every training forward)."""
    import warnings

    model = adapted("llama", "causal_lm", PTV2).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**tiny_inputs("llama", "causal_lm"))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_checkpointing_reads_the_current_property_then_the_old_one():
    """``layer.checkpointing``: transformers >= 5.24's ``is_activation_checkpointing`` when the class has it (the old
    name is not touched), else the old ``is_gradient_checkpointing``, else off."""
    from torch import nn

    from deltatune.layer import checkpointing

    class Current(nn.Module):
        is_activation_checkpointing = True

        @property
        def is_gradient_checkpointing(self):
            raise AssertionError("the deprecated property was read")

    class Old(nn.Module):
        is_gradient_checkpointing = True

    assert checkpointing(Current()) and checkpointing(Old()) and not checkpointing(nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_explicit_position_ids(family):
    """Position ids 0..L-1 for the real tokens are shifted by n, as the model does by itself after the prefix."""
    model = adapted(family, "causal_lm", PTV2)
    inputs = tiny_inputs(family, "causal_lm")
    with torch.no_grad():
        with_positions = model(**inputs, position_ids=torch.arange(7).expand(2, -1)).logits
    torch.testing.assert_close(with_positions, logits(model, inputs), atol=1e-5, rtol=0)


def test_legacy_tuple_cache_is_refused():
    model = adapted("llama", "causal_lm", PTV2)
    legacy = tuple((torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8)) for _ in range(2))
    with pytest.raises(TypeError, match="legacy tuple"):
        model(**tiny_inputs("llama", "causal_lm"), past_key_values=legacy)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_empty_cache_under_either_name(name):
    """An empty cache passed by the caller is filled with the prefix, under the name it came in or the other one
    (transformers 5.24 renamed ``past_key_values`` to ``cache`` and refuses a call that passes both)."""
    from transformers import DynamicCache

    model = adapted("llama", "causal_lm", PTV2)
    inputs = tiny_inputs("llama", "causal_lm")
    with torch.no_grad():
        given = model(**inputs, **{name: DynamicCache()}).logits
    torch.testing.assert_close(given, logits(model, inputs), atol=1e-6, rtol=0)
