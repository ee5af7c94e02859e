"""A merge LoRA's lora_bias refuses (a layer with a lora_B bias over a base without one) is refused before any weight
is written: q_proj (with a base bias) merged first, then o_proj refused, and the unmerge rounding left q_proj's bf16
weight up to 9.8e-4 off (review 9a)."""

import pytest
import torch
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.layer import NotMergeable


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_a_refused_lora_bias_merge_writes_no_weight(how):
    torch.manual_seed(0)
    base = tiny_model("qwen2").to(torch.bfloat16)
    cfg = dt.LoraConfig(r=4, lora_bias=True, init_lora_weights=False, target_modules=["q_proj", "o_proj"])
    model = dt.get_delta_model(base, cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(**tiny_inputs("qwen2")).logits
        with pytest.raises(NotMergeable, match="lora_bias=True` because the base layer has no bias"):
            getattr(model, how)()
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before) and not model._merged()
        assert torch.equal(model(**tiny_inputs("qwen2")).logits, logits)
