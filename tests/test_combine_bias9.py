"""add_weighted_adapter refuses a LoRA with lora_bias: no combination carries its lora_B bias (peft copies the flag and
leaves the combined adapter's bias at its init, so a single adapter combined with weight 1 answered 0.2 off itself)."""

import pytest
import torch
from tiny import tiny_model

import deltatune as dt


@pytest.mark.parametrize("kind", ["cat", "linear", "svd"])
def test_a_lora_bias_adapter_is_refused_naming_it_and_the_model_is_unchanged(kind):
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model("qwen2"), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("biased", dt.LoraConfig(r=4, lora_bias=True, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="add_weighted_adapter: 'biased' has lora_bias, which no combination carries"):
        model.add_weighted_adapter(["default", "biased"], [1.0, 1.0], "c", combination_type=kind)
    assert "c" not in model.peft_config
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
