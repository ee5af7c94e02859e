"""QLoRA probe 16 (deltatune/methods/quant_tools.py, _quant_merge.py): merge_quantized refused on a bad probe batch
leaves the model as it was, in one line."""

from __future__ import annotations

import pytest
import torch
from methods.test_quant import BACKENDS, _qlora
from tiny import output_of, tiny_inputs

import deltatune as dt
from deltatune.methods.quant import QuantizationError


# -- fault: merge_quantized put the model in eval mode (and the adapters to merge active) before its probe forward;
# a probe batch the model refused raised from inside transformers (e.g. "You must specify exactly one of input_ids or
# inputs_embeds") and left a training model in eval mode, with another adapter active.
@pytest.mark.parametrize(
    "probe, match",
    [
        (lambda x: {"input_idz": x["input_ids"]}, "forward failed on probe_inputs .ValueError: You must specify"),
        (lambda x: {"input_ids": x["input_ids"] + 1000}, "forward failed on probe_inputs .IndexError"),
        (lambda x: "The quick brown fox", "probe_inputs must be a dict .* got str"),
    ],
)
def test_a_bad_probe_batch_is_one_line_and_changes_nothing(probe, match):
    inputs = tiny_inputs("llama")
    delta = _qlora(BACKENDS[0]).train()
    delta.add_adapter("other", dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = output_of(delta.eval(), inputs)
    delta.train()
    with pytest.raises(QuantizationError, match=match):
        dt.merge_quantized(delta, probe(inputs), adapter_names=["other"])
    assert delta.training and all(m.training for m in delta.modules())
    assert delta.active_adapters == ["default"]
    assert type(delta.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert torch.equal(output_of(delta.eval(), inputs), before)
    plain, report = dt.merge_quantized(delta, inputs)  # the model still merges
    assert report.max_abs_diff < 1e-4


def test_an_unknown_adapter_name_leaves_the_model_training():
    delta = _qlora(BACKENDS[0]).train()
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        dt.merge_quantized(delta, tiny_inputs("llama"), adapter_names=["nope"])
    assert delta.training and delta.active_adapters == ["default"]
