"""The DeltaModel API against peft 0.21.2's PeftModel: ``enable_adapter_layers`` / ``disable_adapter_layers``,
``set_requires_grad``, ``get_layer_status`` / ``get_model_status`` (field by field, step by step), ``active_peft_config``
and ``from_pretrained``'s ``config`` / ``key_mapping`` / ``ephemeral_gpu_offload``, for LoRA and IA3 on one tiny model."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import output_of, tiny_inputs, tiny_model

import deltatune as dt

peft = pytest.importorskip("peft")

LORA = dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
LORA_B = dict(r=2, target_modules=["v_proj", "q_proj"], init_lora_weights=False)
IA3 = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)


def _both(kind: str, first: dict, second: dict | None = None):
    """The same adapters (configs) made by peft and by deltatune on the same tiny model."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), getattr(peft, kind)(**first), adapter_name="a")
    ours = dt.get_delta_model(tiny_model("llama"), getattr(dt, kind)(**first), adapter_name="a")
    if second is not None:
        theirs.add_adapter("b", getattr(peft, kind)(**second))
        ours.add_adapter("b", getattr(dt, kind)(**second))
    return ours, theirs


def _loaded(tmp_path, kind: str, first: dict):
    """One adapter with random tensors saved by peft, loaded by both (for inference, as peft's default)."""
    _both(kind, first)[1].save_pretrained(tmp_path)  # a non-default adapter: in its sub-folder
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a", adapter_name="a")
    return dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "a", adapter_name="a"), theirs


def _same_status(ours, theirs) -> None:
    assert [dataclasses.asdict(s) for s in ours.get_layer_status()] == [
        dataclasses.asdict(s) for s in theirs.get_layer_status()
    ]
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(theirs.get_model_status())


STEPS = [
    lambda m: None,
    lambda m: m.set_requires_grad("b"),
    lambda m: m.set_requires_grad(["a"], requires_grad=False),
    lambda m: m.disable_adapter_layers(),
    lambda m: m.enable_adapter_layers(),
    lambda m: m.set_adapter("b"),
    lambda m: m.set_requires_grad(["a", "b"], False),
    lambda m: m.enable_adapter_layers(),
    lambda m: m.set_adapter("a"),
    lambda m: m.merge_adapter(),
]


@pytest.mark.parametrize(
    "kind, first, second",
    [
        ("LoraConfig", LORA, LORA_B),
        ("IA3Config", IA3, dict(target_modules=["k_proj", "v_proj"], feedforward_modules=[])),
    ],
)
def test_status_and_switches_as_peft_step_by_step(kind, first, second):
    ours, theirs = _both(kind, first, second)
    for step in STEPS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step(ours)
            step(theirs)
        _same_status(ours, theirs)
    assert ours.active_peft_config is ours.peft_config["a"]
    assert theirs.get_model_status().adapter_model_type == ours.get_model_status().adapter_model_type


def test_status_figures_by_hand():
    ours, _ = _both("LoraConfig", LORA, LORA_B)
    first, *_, last = ours.get_layer_status()
    assert (first.name, first.module_type, first.available_adapters) == (
        "model.model.layers.0.self_attn.q_proj",
        "lora.Linear",
        ["a", "b"],
    )
    assert (last.name, last.module_type, last.requires_grad) == ("model.lm_head", "ModulesToSaveWrapper", {"a": True})
    status = ours.get_model_status()
    # a: q_proj 2 x (4*32 + 32*4) + lm_head 32*128; b's frozen; base 28512 - 4608 (peft's count for a alone) + b
    assert (status.peft_types, status.requires_grad) == ({"a": "LORA", "b": "LORA"}, {"a": True, "b": False})
    assert status.trainable_params == 2 * (4 * 32 + 32 * 4) + 32 * 128


@pytest.mark.parametrize("kind, first", [("LoraConfig", LORA), ("IA3Config", IA3)])
def test_disabled_layers_give_the_base_output_and_enabling_restores_the_adapters(tmp_path, kind, first):
    ours, theirs = _loaded(tmp_path, kind, first)
    inputs = tiny_inputs("llama")
    base, adapted = output_of(tiny_model("llama"), inputs), output_of(ours, inputs)
    assert torch.allclose(adapted, output_of(theirs, inputs), atol=1e-6) and not torch.equal(adapted, base)
    ours.disable_adapter_layers()
    assert torch.equal(output_of(ours, inputs), base)
    ours.enable_adapter_layers()
    assert torch.equal(output_of(ours, inputs), adapted)
    ours.merge_adapter()  # disabling unmerges (peft's disabled layer does so at its forward)
    ours.disable_adapter_layers()
    assert torch.allclose(output_of(ours, inputs), base, atol=1e-6)
    assert not any(s.merged_adapters for s in ours.get_layer_status())
    ours.enable_adapter_layers()
    assert torch.allclose(output_of(ours, inputs), adapted, atol=1e-6)
    with pytest.raises(ValueError, match="disable_adapter_layers"):
        ours.disable_adapter_layers()
        ours(**inputs, adapter_names=["a", "a"])


def test_enabling_makes_an_inference_adapter_train_as_peft(tmp_path):
    ours, theirs = _loaded(tmp_path, "LoraConfig", LORA)
    _same_status(ours, theirs)  # frozen: loaded for inference
    for model in (ours, theirs):
        model.disable_adapter_layers()
        model.enable_adapter_layers()
    _same_status(ours, theirs)
    assert ours.get_model_status().requires_grad == {"a": True}


def test_set_requires_grad_skips_an_unknown_adapter_and_refuses_a_bad_flag_in_one_line():
    ours, _ = _both("LoraConfig", LORA)
    ours.set_requires_grad(["a", "x"], requires_grad=False)  # a name of no adapter is skipped, as peft (since 1d85ccf)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)
    with pytest.raises(TypeError, match="requires_grad must be True or False"):
        ours.set_requires_grad("a", requires_grad="no")


def test_status_of_a_model_with_no_adapter_layer_is_refused_in_one_line():
    model = dt.get_delta_model(tiny_model("llama"), dt.FullConfig())
    with pytest.raises(ValueError, match="no adapter layers in the model"):
        model.get_model_status()


def test_from_pretrained_config_overrides_the_files_as_peft(tmp_path):
    _, theirs = _both("LoraConfig", LORA)
    theirs.save_pretrained(tmp_path)
    tmp_path = tmp_path / "a"
    inputs = tiny_inputs("llama")
    other = dict(LORA, lora_alpha=32)
    given = dt.LoraConfig(**other)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, adapter_name="a", config=given)
    ref = peft.PeftModel.from_pretrained(
        tiny_model("llama"), tmp_path, adapter_name="a", config=peft.LoraConfig(**other)
    )
    file_alpha = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, adapter_name="a")
    assert torch.allclose(output_of(ours, inputs), output_of(ref, inputs), atol=1e-6)
    assert not torch.allclose(output_of(ours, inputs), output_of(file_alpha, inputs), atol=1e-4)
    assert ours.active_peft_config.lora_alpha == 32 and ours.active_peft_config.inference_mode
    assert not given.inference_mode  # the caller's object is unchanged
    with pytest.raises(ValueError, match="config must be a DeltaConfig"):
        dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, config=dict(other))  # a peft config is taken


def test_key_mapping_and_ephemeral_gpu_offload_as_peft(tmp_path):
    _, theirs = _both("LoraConfig", LORA)
    theirs.save_pretrained(tmp_path)
    tmp_path = tmp_path / "a"
    inputs = tiny_inputs("llama")
    expected = output_of(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path), inputs)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(
        {k.replace(".self_attn.", ".attention."): v for k, v in tensors.items()}, renamed / "adapter_model.safetensors"
    )
    (renamed / "adapter_config.json").write_text((tmp_path / "adapter_config.json").read_text())
    mapping = {r"\.attention\.": ".self_attn."}
    ref = peft.PeftModel.from_pretrained(tiny_model("llama"), renamed, key_mapping=mapping)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), renamed, key_mapping=mapping, ephemeral_gpu_offload=True)
    assert torch.equal(output_of(ref, inputs), expected)
    assert torch.allclose(output_of(ours, inputs), expected, atol=1e-6)
    assert json.loads((renamed / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with pytest.raises(dt.AdapterLoadError):
        dt.DeltaModel.from_pretrained(tiny_model("llama"), renamed)


def test_load_adapter_is_trainable_makes_an_inactive_adapter_train_as_peft(tmp_path):
    _both("LoraConfig", LORA)[1].save_pretrained(tmp_path)
    ours, theirs = _both("LoraConfig", dict(LORA_B, modules_to_save=None))
    for model in (ours, theirs):
        model.load_adapter(tmp_path / "a", "x", is_trainable=True)
    _same_status(ours, theirs)
    assert ours.get_model_status().requires_grad == {"a": True, "x": True}  # a: b's q_proj, v_proj; x: q_proj, head
    for model in (ours, theirs):
        model.set_adapter("x")
    _same_status(ours, theirs)


def test_a_token_methods_layers_disable_too_beyond_peft():
    """peft's prompt-learning model has no disable_adapter_layers (AttributeError); deltatune's disables its prompt."""
    inputs = tiny_inputs("llama")
    model = dt.get_delta_model(tiny_model("llama"), dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    prompted = output_of(model, inputs)
    model.disable_adapter_layers()
    assert torch.equal(output_of(model, inputs), output_of(tiny_model("llama"), inputs))
    assert model.get_model_status().requires_grad == {"default": False}
    model.enable_adapter_layers()
    assert torch.equal(output_of(model, inputs), prompted)
