"""QLoRA probe 21 (deltatune/methods/quant_tools.py, _quant_steps.py) against peft 0.21.2's bitsandbytes LoRA layers on
a model transformers 5.25 loaded with BitsAndBytesConfig(load_in_4bit=True)."""

from __future__ import annotations

import pytest
import torch
from methods.test_quant import BACKENDS
from tiny import tiny_inputs, tiny_model

import deltatune as dt

if "bitsandbytes" not in BACKENDS:
    pytest.skip("bitsandbytes does not run on this CPU", allow_module_level=True)

peft = pytest.importorskip("peft")


def _load(path, dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=dtype)


def _two_adapters(tmp_path, dtype):
    """Ours and peft's, adapters "default" and "two" (LoRA, drawn B) on the same 4-bit weights."""
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    lora = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    ours = dt.get_delta_model(_load(tmp_path / "base", dtype), lora)
    ours.add_adapter("two", lora)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_load(tmp_path / "base", dtype), tmp_path / "adapter")
    theirs.load_adapter(tmp_path / "adapter" / "two", adapter_name="two")
    return ours, theirs


# -- fault: a requantised merge of two adapters into one 4-bit layer added both updates to W and quantised once; peft's
# bnb Linear4bit.merge quantises W + s1 B1 A1 before adding s2 B2 A2: other 4-bit codes in every layer, logits 0.13 off
# (fp32) -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "names"), [(torch.float32, ["default", "two"]), (torch.bfloat16, ["two", "default"])]
)
def test_requantized_merge_of_two_adapters_equals_peft_byte_for_byte(tmp_path, dtype, names):
    ours, theirs = _two_adapters(tmp_path, dtype)
    inputs = tiny_inputs("llama")
    merged, report = dt.merge_quantized(ours, inputs["input_ids"], requantize=True, adapter_names=names)
    reference = theirs.merge_and_unload(adapter_names=names)
    layers = [
        f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    for layer in layers:
        a, b = merged.get_submodule(layer).weight, reference.get_submodule(layer).weight
        assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax), layer
        assert a.quant_state.dtype == b.quant_state.dtype, layer
    with torch.no_grad():  # (train mode: bitsandbytes repacks CPU weights on an eval forward)
        assert torch.equal(merged.train()(**inputs).logits, reference.train()(**inputs).logits)
    assert report.requantized and len(report.quantized) == 14
