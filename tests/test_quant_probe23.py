"""QLoRA probe 23 (deltatune/methods/_quant_olora.py) against peft 0.21.2 / 0.22.0's bitsandbytes LoRA layers on a
model transformers 5.25 loaded with BitsAndBytesConfig(load_in_8bit=True)."""

from __future__ import annotations

import pytest
import torch
from methods.test_quant import BACKENDS
from tiny import tiny_inputs, tiny_model

import deltatune as dt

if "bitsandbytes" not in BACKENDS:
    pytest.skip("bitsandbytes does not run on this CPU", allow_module_level=True)

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant23") / "base"
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def _load8(path, bits=8):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def _scb(module):
    return module.state.SCB if module.state.SCB is not None else module.weight.SCB


# -- carried fault: OLoRA on an 8-bit base (transformers' load_in_8bit) was refused ("needs a float32/float16/bfloat16
# base weight"); peft's olora_init dequantises W (int8 x SCB / 127), factors it and makes the residual W - s B A an
# Int8Params again (rounded to fp16, quantised row by row): _quant_olora.py -------------------------------------------
def test_olora_on_an_8bit_layer_equals_peft_olora_init_byte_for_byte(saved):
    ours = dt.get_delta_model(_load8(saved),
                              dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora"))  # fmt: skip
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora")
    theirs = peft.get_peft_model(_load8(saved), config)
    adapted = [(n, m) for n, m in ours.get_base_model().named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 6
    for name, layer in adapted:
        other = theirs.get_base_model().get_submodule(name)
        a, b = layer.base_layer.weight, other.base_layer.weight
        assert type(a) is type(b) and a.dtype == torch.int8 and not a.requires_grad, name
        assert torch.equal(a.data, b.data) and torch.equal(a.SCB, b.SCB), name  # (peft's state keeps W's old SCB
        # until a forward moves the new one there; a merge before it would read the old: deltatune sets it at once)
        for ab in ("lora_A", "lora_B"):
            assert torch.equal(getattr(layer, ab)["default"].weight, getattr(other, ab)["default"].weight), (name, ab)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert torch.equal(ours.eval()(**inputs).logits, theirs.eval()(**inputs).logits)
    # a requantised merge of the OLoRA adapter: peft's Int8Params(W_res + s B A), the same bytes
    merged, _ = dt.merge_quantized(ours, inputs["input_ids"], requantize=True)
    reference = theirs.merge_and_unload()
    for name, _ in adapted:
        a, b = merged.get_submodule(name), reference.get_submodule(name)
        assert torch.equal(a.weight.data, b.weight.data) and torch.equal(_scb(a), _scb(b)), name
    with torch.no_grad():
        assert torch.equal(merged.eval()(**inputs).logits, reference.eval()(**inputs).logits)


def test_olora_on_an_8bit_layer_restored_leaves_the_weight_and_its_scales(saved):
    """A load that fails after the init puts the 8-bit weight back, with the scales the layer read before."""
    from deltatune.methods import _quant_olora

    model = dt.get_delta_model(_load8(saved),
                               dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))  # fmt: skip
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    base, x = layer.base_layer, torch.randn(3, 64)
    with torch.no_grad():
        model.eval()(**tiny_inputs("llama"))  # (a forward moves W's scales into the layer's state)
        before = base(x)
    weight, scb = base.weight, _scb(base).clone()
    assert _quant_olora.applies(base) and _quant_olora.olora(layer, "default") is weight
    assert base.weight is not weight and not torch.equal(_scb(base), scb)
    _quant_olora.restore(base, weight)
    assert base.weight is weight and torch.equal(_scb(base), scb)
    with torch.no_grad():
        assert torch.equal(base(x), before)
