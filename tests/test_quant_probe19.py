"""QLoRA probe 19 (deltatune/methods/quant_tools.py) against transformers 5.25's BitsAndBytesConfig loading: which
layers stay in full precision."""

from __future__ import annotations

import pytest
import torch
from methods.test_quant import BACKENDS
from tiny import tiny_model

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
