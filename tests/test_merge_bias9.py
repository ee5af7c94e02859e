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


class _GroupedThenLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6 * 49, 8)  # (first: merged before the conv refuses)
        self.conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x).flatten(1))


@pytest.mark.parametrize("dora", [False, True])
def test_a_refused_grouped_conv_merge_writes_no_weight(dora):
    """A grouped Conv2d's merge refusal (peft's NotImplementedError) came mid-loop: the Linear merged before it was
    unmerged with rounding (bf16 weight 4.9e-4 off, logits 7.8e-3; review 9c); now refused before any write."""
    torch.manual_seed(0)
    cfg = dt.LoraConfig(r=3, target_modules=["lin", "conv"], init_lora_weights=False, use_dora=dora)
    model = dt.get_delta_model(_GroupedThenLinear().to(torch.bfloat16), cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotMergeable, match="grouped Conv2d"):
        model.merge_and_unload()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_inactive_adapter_loaded_trainable_stays_trainable_past_add_and_delete(tmp_path):
    """peft's set_adapter alone freezes the adapters it leaves out; add_adapter and delete_adapter froze an adapter
    loaded with is_trainable=True while inactive (review 9c: {default, b} trainable in peft, {default} here)."""
    dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    model = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    for name in ("b", "c"):
        model.load_adapter(tmp_path, name, is_trainable=True)
    model.add_adapter("new", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.delete_adapter("c")

    def training() -> set[str]:
        return {n.split(".")[-2] for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}

    assert training() == {"default", "b"}  # the one just added, inactive, does not train (peft's)
    model.set_adapter("b")
    assert training() == {"b"}
