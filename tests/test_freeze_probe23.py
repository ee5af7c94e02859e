"""Full fine-tuning against LLaMA-Factory (its get_forbidden_modules): freeze_language_model, which keeps the
language tower of a vision-language model frozen (with freeze_multi_modal_projector false: the projector alone trains,
the alignment stage)."""

from __future__ import annotations

import json
import os
import sys

import pytest

import deltatune as dt
from tests.tiny import tiny_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))
from tiny_vlm import tiny_vlm  # noqa: E402

# LLaMA-Factory's COMPOSITE_MODELS["llava"]: vision_model_keys, projector_key, language_model_keys
_LLAVA = {
    "vision": ("vision_tower",),
    "projector": ("multi_modal_projector",),
    "language": ("language_model", "lm_head"),
}


def _llamafactory_full(model, vision: bool, projector: bool, language: bool) -> set[str]:
    """The parameters LLaMA-Factory's _setup_full_tuning leaves trainable: every one under no forbidden module."""
    forbidden = [k for on, part in ((vision, "vision"), (projector, "projector"), (language, "language")) if on
                 for k in _LLAVA[part]]  # fmt: skip
    return {n for n, _ in model.named_parameters() if not any(f in n for f in forbidden)}


@pytest.mark.parametrize(("vision", "projector"), [(True, False), (False, False), (False, True)])
def test_full_freeze_language_model_trains_what_llamafactory_trains(tmp_path, vision, projector):
    """LLaMA-Factory's full tuning with freeze_language_model: true trains the vision tower and projector its other
    switches leave (the projector alone: the pre-alignment stage); deltatune had no such field (a TypeError)."""
    base = tiny_vlm("llava")
    expected = _llamafactory_full(base, vision, projector, True)
    config = dt.FullConfig(
        freeze_vision_tower=vision, freeze_multi_modal_projector=projector, freeze_language_model=True
    )
    model = dt.get_delta_model(base, config)
    assert {k for k, p in model.base_model.named_parameters() if p.requires_grad} == expected
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["freeze_language_model"] is True
    loaded = dt.DeltaModel.from_pretrained(tiny_vlm("llava"), tmp_path, is_trainable=True)
    assert {k for k, p in loaded.base_model.named_parameters() if p.requires_grad} == expected


def test_full_freeze_language_model_false_is_the_default_as_llamafactory():
    base = tiny_vlm("llava")
    model = dt.get_delta_model(base, dt.FullConfig())
    assert {k for k, p in model.base_model.named_parameters() if p.requires_grad} == _llamafactory_full(
        tiny_vlm("llava"), True, True, False
    )


def test_full_freeze_language_model_refusals_change_nothing():
    """Every tower frozen, or a text model (one tower, which LLaMA-Factory leaves as it is: the run would train the
    language model the user froze): one line, the model untouched."""
    vlm = tiny_vlm("llava")
    with pytest.raises(dt.ConfigError, match="^full: freeze_language_model, freeze_vision_tower and freeze_multi_"):
        dt.get_delta_model(vlm, dt.FullConfig(freeze_language_model=True))
    llama = tiny_model("llama")
    with pytest.raises(dt.ConfigError, match="^full: freeze_language_model needs a vision-language model"):
        dt.get_delta_model(llama, dt.FullConfig(freeze_language_model=True))
    assert all(p.requires_grad for p in vlm.parameters()) and all(p.requires_grad for p in llama.parameters())
    with pytest.raises(dt.ConfigError, match="^freeze_language_model must be true or false, got 'yes'"):
        dt.FullConfig(freeze_language_model="yes")


@pytest.mark.parametrize(("family", "name"), [("t5", "T5ForConditionalGeneration"), ("mistral", "MistralForCausalLM")])
def test_bitfit_without_bias_terms_names_the_model_not_llama(family, name):
    """T5 and Mistral have no bias term (BitFit's paper trains biases alone): the refusal named "LLaMA-style models"
    for every model; it names the model's class and the families without biases."""
    with pytest.raises(dt.ConfigError, match=rf"^bitfit: the model has no bias parameters to train \({name}; LLaMA,"):
        dt.get_delta_model(tiny_model(family), dt.BitFitConfig())


def _llamafactory_freeze(model, n: int, vision: bool, projector: bool, language: bool) -> set[str]:
    """LLaMA-Factory's _setup_freeze_tuning: parameters holding ".{idx}." for the last n of the text config's layers,
    and the projector's (projector_keys, where not frozen), under no forbidden module."""
    layers = model.config.text_config.num_hidden_layers
    trainable = [f".{i}." for i in range(max(0, layers - n), layers)] + (
        [] if projector else list(_LLAVA["projector"])
    )
    forbidden = [k for on, part in ((vision, "vision"), (projector, "projector"), (language, "language")) if on
                 for k in _LLAVA[part]]  # fmt: skip
    names = [n for n, _ in model.named_parameters()]
    return {p for p in names if any(t in p for t in trainable) and not any(f in p for f in forbidden)}


@pytest.mark.parametrize(("vision", "projector"), [(True, False), (False, False), (False, True)])
def test_freeze_freeze_language_model_trains_what_llamafactory_trains(tmp_path, vision, projector):
    """LLaMA-Factory's freeze tuning with freeze_language_model: true: the language tower's blocks stay frozen, the
    vision tower's last block and the projector train as its other switches say (deltatune had no such field)."""
    base = tiny_vlm("llava")
    expected = _llamafactory_freeze(base, 1, vision, projector, True)
    assert expected and not any("language_model" in p for p in expected)
    config = dt.FreezeConfig(
        freeze_trainable_layers=1, freeze_vision_tower=vision, freeze_multi_modal_projector=projector,
        freeze_language_model=True,
    )  # fmt: skip
    model = dt.get_delta_model(base, config)
    assert {k for k, p in model.base_model.named_parameters() if p.requires_grad} == expected
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(tiny_vlm("llava"), tmp_path, is_trainable=True)
    assert {k for k, p in loaded.base_model.named_parameters() if p.requires_grad} == expected
    unset = dt.get_delta_model(tiny_vlm("llava"), dt.FreezeConfig(freeze_trainable_layers=1))  # (False, as LF's)
    assert {k for k, p in unset.base_model.named_parameters() if p.requires_grad} == _llamafactory_freeze(
        base, 1, True, True, False
    )


def test_freeze_freeze_language_model_refusals_change_nothing():
    vlm, llama = tiny_vlm("llava"), tiny_model("llama")
    with pytest.raises(dt.ConfigError, match="^freeze: freeze_language_model, freeze_vision_tower and freeze_multi"):
        dt.get_delta_model(vlm, dt.FreezeConfig(freeze_language_model=True))
    with pytest.raises(dt.ConfigError, match="^freeze: freeze_language_model needs a vision-language model"):
        dt.get_delta_model(llama, dt.FreezeConfig(freeze_language_model=True))
    assert all(p.requires_grad for p in vlm.parameters()) and all(p.requires_grad for p in llama.parameters())
    with pytest.raises(dt.ConfigError, match="^freeze_language_model must be true or false, got 1"):
        dt.FreezeConfig(freeze_language_model=1)


def test_peft_file_with_empty_trainable_token_indices_loads_as_peft_reads_it(tmp_path):
    """peft's LoraConfig(trainable_token_indices={}) trains no token and saves {}; loading such a file here was a
    ConfigError ('must be a list of token ids or a dict ..., got {}'). It loads as peft's: LoRA alone, same logits."""
    import copy

    import torch

    from tests.tiny import output_of, tiny_inputs

    peft = pytest.importorskip("peft")
    base, inputs = tiny_model("llama"), tiny_inputs("llama")
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={}, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == {}
    ours = dt.DeltaModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert ours.peft_config["default"].trainable_token_indices is None
    assert torch.allclose(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-6)
    assert dt.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={}).trainable_token_indices is None
