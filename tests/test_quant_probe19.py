"""QLoRA probe 19 (deltatune/methods/quant_tools.py) against transformers 5.25's BitsAndBytesConfig loading: which
layers stay in full precision."""

from __future__ import annotations

import pytest
import torch
from methods.test_quant import BACKENDS
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.methods import quant

if "bitsandbytes" not in BACKENDS:
    pytest.skip("bitsandbytes does not run on this CPU", allow_module_level=True)


def _four_bit(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if quant._is_4bit_layer(m))


# -- fault: skip_modules naming a block or a sub-module (transformers' llm_int8_skip_modules=["model.layers.0"]) kept
# nothing: the entry was matched against the linear layers' own names only (10 of 14 layers quantised, not 7) -------
@pytest.mark.parametrize("skip", [["model.layers.0"], ["model.layers.1.mlp"], ["mlp.down_proj"]])
def test_skip_modules_keeps_the_layers_under_a_named_module_as_transformers_skip_modules(tmp_path, skip):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=[*skip, "lm_head"])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    model, summary = dt.quantize(AutoModelForCausalLM.from_pretrained(tmp_path), backend="bitsandbytes",
                                 skip_modules=skip)  # fmt: skip
    assert _four_bit(model) == _four_bit(theirs) == sorted(summary.quantized)
    kept = {n for n, why in summary.kept.items() if why == "skip_modules"}
    assert kept and all(not quant._is_4bit_layer(model.get_submodule(n)) for n in kept)
    assert len(summary.quantized) + len(kept) == 14  # 7 linear layers a block, lm_head kept as the output head


# -- fault: a requantised merge of DoRA on a bf16 4-bit base quantised m (W + s B A) / norm in fp32; peft's DoRA merge
# rounds it to the dtype W dequantises to (bf16) first: other 4-bit codes in 2 of 3 layers (0.053 off in W) -----------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_requantized_dora_merge_on_a_4bit_base_equals_peft_byte_for_byte(tmp_path, dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu",
                                                    dtype=dtype)  # fmt: skip

    lora = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                         use_dora=True)  # fmt: skip
    ours = dt.get_delta_model(load(), lora)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter")
    inputs = tiny_inputs("llama")
    merged, report = dt.merge_quantized(ours, inputs["input_ids"], requantize=True)
    reference = theirs.merge_and_unload()
    names = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    for layer in [f"model.layers.{i}.{n}" for i in range(2) for n in names]:
        a, b = merged.get_submodule(layer).weight, reference.get_submodule(layer).weight
        assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax), layer
    with torch.no_grad():
        assert torch.equal(merged.train()(**inputs).logits, reference.train()(**inputs).logits)
    assert report.requantized and len(report.quantized) == 14
