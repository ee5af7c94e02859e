"""Merging one adapter while another is active, as peft: the layer then computes as its merged weights alone."""

from __future__ import annotations

import pytest
import torch
from tiny import output_of, tiny_inputs, tiny_model
from tolerances import ATOL

import deltatune as dt

peft = pytest.importorskip("peft")
ATOL32 = ATOL[torch.float32]


def _pair(tmp_path, method):
    if method == "lora":
        make = lambda: dt.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])  # noqa: E731
    else:
        make = lambda: dt.IA3Config(  # noqa: E731
            init_ia3_weights=False, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
        )
    ours = dt.get_delta_model(tiny_model("llama"), make()).eval()
    ours.add_adapter("b", make())
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    theirs.load_adapter(tmp_path / "b", "b")
    return ours, theirs


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("active", [["default"], ["default", "b"]])
def test_merging_one_adapter_leaves_the_unmerged_active_ones_out_of_the_forward_as_peft(active, method, tmp_path):
    """peft's LoRA and IA3 layers compute as their base layer alone once any adapter is merged into it; deltatune
    added the active adapters not merged on top (LoRA, merge b with default active: logits 0.31 off peft's)."""
    ours, theirs = _pair(tmp_path, method)
    ours.set_adapter(active)
    theirs.base_model.set_adapter(active)
    inputs = tiny_inputs("llama")
    before = output_of(ours, inputs)
    ours.merge_adapter(["b"])
    theirs.merge_adapter(["b"])
    merged = output_of(ours, inputs)
    torch.testing.assert_close(merged, output_of(theirs, inputs), atol=ATOL32, rtol=0)
    if active == ["default"]:
        assert (merged - before).abs().max() > 0.01  # the case tells the two readings apart
    ours.unmerge_adapter()
    torch.testing.assert_close(output_of(ours, inputs), before, atol=ATOL32, rtol=0)
