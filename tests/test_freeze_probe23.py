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
    vision tower's last block and the projector train as its other switches say (deltatune had no such field).
    Equal sets here because the tiny LLaVA's towers are equally deep: LLaMA-Factory picks the block indices from the
    text config's depth for every stack, deltatune the last n of each stack (its documented rule; see
    test_freeze_vision_tower_deeper_than_text_trains_its_own_last_blocks)."""
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


def _trained(model) -> set[str]:
    return {k for k, p in model.base_model.named_parameters() if p.requires_grad}


def test_freeze_vision_tower_deeper_than_text_trains_its_own_last_blocks():
    """deltatune's documented rule where the towers' depths differ (a 4-block vision tower, a 2-block text tower):
    the last n blocks of each stack (vision 3, text 1; n=2: vision 2-3, text 0-1). LLaMA-Factory reads indices off
    the text config (".1." would train vision block 1): kept on purpose, its rule trains a deep vision tower's early
    blocks."""
    from tiny_vlm import llava_config
    from transformers import AutoModelForImageTextToText

    config = llava_config()
    config.vision_config.num_hidden_layers = 4
    layers = ("model.vision_tower.encoder.layers", "model.language_model.layers")
    for n, language, expected in [(1, True, {(layers[0], 3)}), (2, False, {(layers[0], 2), (layers[0], 3),
                                   (layers[1], 0), (layers[1], 1)})]:  # fmt: skip
        model = dt.get_delta_model(AutoModelForImageTextToText.from_config(config), dt.FreezeConfig(
            freeze_trainable_layers=n, freeze_vision_tower=False, freeze_language_model=language))  # fmt: skip
        blocks = {(s, int(k[len(s) + 1 :].split(".")[0])) for k in _trained(model) for s in layers if k.startswith(s)}
        assert blocks == expected and all(k.startswith(layers) for k in _trained(model))


@pytest.mark.parametrize(("extra", "held"), [("embed_tokens", "model.language_model.embed_tokens.weight"),
                                             ("language_model", "model.language_model.embed_tokens.weight"),
                                             ("norm", "model.language_model.norm.weight"),
                                             ("lm_head", "lm_head.weight")])  # fmt: skip
def test_freeze_extra_modules_in_the_frozen_language_tower_is_refused(extra, held):
    """freeze_language_model keeps the language tower frozen: LLaMA-Factory's forbidden modules win over
    freeze_extra_modules (embed_tokens stays frozen; "language_model" is "not found"), where deltatune trained them.
    A new adapter: refused in one line, the model untouched; the vision tower's post_layernorm still trains, as LF's."""
    vlm = tiny_vlm("llava")
    config = dt.FreezeConfig(freeze_trainable_layers=1, freeze_language_model=True, freeze_multi_modal_projector=False,
                             freeze_extra_modules=[extra])  # fmt: skip
    with pytest.raises(dt.ConfigError, match=rf"^freeze_extra_modules: '{extra}' is in the language tower \({held}\), "
                       "which freeze_language_model keeps frozen"):  # fmt: skip
        dt.get_delta_model(vlm, config)
    assert all(p.requires_grad for p in vlm.parameters())
    assert held in config.for_loading().trainable_base_parameters(vlm)  # (a file saved so loads as it trained)
    from deltatune.targets import from_file

    with from_file():  # (a run that trained so, resumed: start_model builds it as it trained; it was refused: review)
        assert held in _trained(dt.get_delta_model(tiny_vlm("llava"), config))
    config = dt.FreezeConfig(freeze_trainable_layers=1, freeze_language_model=True, freeze_vision_tower=False,
                             freeze_extra_modules=["post_layernorm"])  # fmt: skip
    base = tiny_vlm("llava")
    expected = _llamafactory_freeze(base, 1, False, True, True)
    expected |= {n for n, _ in base.named_parameters() if ".post_layernorm." in n}  # (LF: trainable_layers += extra)
    assert _trained(dt.get_delta_model(base, config)) == expected


def test_freeze_trainable_modules_wrong_name_refused_with_no_language_stack():
    """freeze_language_model with the vision tower frozen leaves no stack to choose blocks in: a wrong module name
    ("mlpp") was accepted (the projector alone trained); LLaMA-Factory: "Module mlpp is not found". A right one
    ("mlp") trains the projector alone, as LF's."""
    vlm = tiny_vlm("llava")
    config = dict(freeze_trainable_layers=1, freeze_language_model=True, freeze_multi_modal_projector=False)
    with pytest.raises(dt.ConfigError, match=r"^freeze_trainable_modules: 'mlpp' is not a module of the model's "
                       r"blocks; their modules: input_layernorm, layer_norm1, layer_norm2, mlp, post_attention_"):  # fmt: skip
        dt.get_delta_model(vlm, dt.FreezeConfig(**config, freeze_trainable_modules=["mlpp"]))
    assert all(p.requires_grad for p in vlm.parameters())
    loaded = dt.FreezeConfig(**config, freeze_trainable_modules=["mlpp"]).for_loading()  # (a file saved before: loads)
    assert loaded.trainable_base_parameters(tiny_vlm("llava"), new=False)
    model = dt.get_delta_model(vlm, dt.FreezeConfig(**config, freeze_trainable_modules=["mlp"]))
    assert _trained(model) == _llamafactory_freeze(tiny_vlm("llava"), 1, True, False, True)


def _peft_no_tokens(tmp_path, spec):
    """peft's LoRA with trainable_token_indices ``spec`` (no id), saved to ``tmp_path``: (base, inputs, peft model)."""
    import copy

    from tests.tiny import tiny_inputs

    peft = pytest.importorskip("peft")
    base, inputs = tiny_model("llama"), tiny_inputs("llama")
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=spec, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == spec
    return base, inputs, theirs


@pytest.mark.parametrize("spec", [[], {"embed_tokens": []}], ids=["list", "dict"])
def test_peft_config_with_no_token_ids_reads_as_none(tmp_path, spec):
    """peft (0.21.2, 0.22.0) takes trainable_token_indices [] or {"embed_tokens": []}: it trains no token and saves
    the ids as given (with a zero-row trainable_tokens_delta tensor). Reading the file's config here was a ConfigError
    ("is empty; list the token ids to train"); it reads as none, as {} did. A new config reads them as none too, as
    peft trains none (the refusal said nothing peft says); a dict's empty entry is dropped."""
    _peft_no_tokens(tmp_path, spec)
    assert dt.LoraConfig.from_pretrained(tmp_path).trainable_token_indices is None
    assert dt.LoraConfig(r=2, trainable_token_indices=spec).trainable_token_indices is None
    config = dt.LoraConfig(r=2, trainable_token_indices={"embed_tokens": [], "lm_head": (3,)})
    assert config.trainable_token_indices == {"lm_head": [3]}


@pytest.mark.parametrize("spec", [[], {"embed_tokens": []}], ids=["list", "dict"])
def test_peft_file_with_no_token_ids_loads_as_none(tmp_path, spec):
    """Such a peft file loads as none: the zero-row tensor skipped, with the logits of peft's LoRA alone (peft's own
    model fails in forward: its ids become a float tensor for index_copy)."""
    import copy

    import torch
    from safetensors.torch import load_file, save_file

    from tests.tiny import output_of

    peft = pytest.importorskip("peft")
    base, inputs, theirs = _peft_no_tokens(tmp_path, spec)
    with pytest.raises(RuntimeError, match="index_copy"):
        output_of(theirs, inputs)
    ours = dt.DeltaModel.from_pretrained(copy.deepcopy(base), tmp_path)
    # peft reading it as none: its config's ids null, the zero-row tensor left out (LoRA alone, the same weights)
    lora = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if "token" not in k}
    (tmp_path / "none").mkdir()
    save_file(lora, tmp_path / "none" / "adapter_model.safetensors")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "none" / "adapter_config.json").write_text(json.dumps({**saved, "trainable_token_indices": None}))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "none")
    assert torch.allclose(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-6)
    assert not torch.allclose(output_of(ours, inputs), output_of(base, inputs), atol=1e-3)  # (the LoRA counts)
