"""``safe_merge`` on a bf16 base with fp32 adapters (peft's autocast default, what a deltatune run trains), as peft:
its safe merge rounds a LoRA delta to the base's dtype before adding it, its plain merge adds it and rounds once."""

from __future__ import annotations

import pytest
import torch
from test_merge_probe5 import _convs
from test_merge_probe6 import _off_the_bf16_grid
from tiny import tiny_model

import deltatune as dt
from deltatune.train.models import reload_as_trained

peft = pytest.importorskip("peft")

BF16 = torch.bfloat16
CASES = {  # (base, LoRA config fields, a second adapter's extra fields: merged after the first, on the same layers)
    "linear": (lambda: tiny_model("llama").to(BF16), dict(target_modules=["q_proj", "v_proj"]), None),
    "conv1d": (lambda: tiny_model("gpt2").to(BF16), dict(target_modules=["c_attn"], fan_in_fan_out=True), None),
    "conv2d": (lambda: _convs(BF16), dict(target_modules=["conv", "point"]), None),
    "embedding": (lambda: tiny_model("llama").to(BF16), dict(target_modules=["embed_tokens"]), None),
    "dora": (lambda: tiny_model("llama").to(BF16), dict(target_modules=["q_proj", "v_proj"], use_dora=True), None),
    "lora+lora": (lambda: tiny_model("llama").to(BF16), dict(target_modules=["q_proj", "v_proj"]), {"r": 2}),
    "lora+dora": (lambda: tiny_model("llama").to(BF16), dict(target_modules=["q_proj", "v_proj"]), {"use_dora": True}),
}


def _pair(case: str, tmp_path) -> tuple[dt.DeltaModel, peft.PeftModel, list[str]]:
    make, fields, second = CASES[case]
    config = dict(r=4, lora_alpha=7, init_lora_weights=False, **fields)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**config)).eval()
    names = ["default"]
    if second is not None:
        theirs.add_adapter("b", peft.LoraConfig(**{**config, **second}))
        names.append("b")
    _off_the_bf16_grid(theirs)
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(make(), tmp_path)
    reload_as_trained(ours, str(tmp_path))
    if second is not None:
        ours.load_adapter(tmp_path / "b", "b")
        reload_as_trained(ours, str(tmp_path / "b"), "b")
    return ours, theirs, names


def _assert_base_weights_equal(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" not in k}
    ref = {k: v for k, v in theirs.state_dict().items() if "lora_" not in k}
    assert mine.keys() == ref.keys()
    differ = {k: (mine[k] != ref[k]).sum().item() for k in ref if not torch.equal(mine[k], ref[k])}
    assert not differ, differ


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unmerge_on_a_bf16_base_with_fp32_adapters_are_peft_s_bit_for_bit(case, safe, tmp_path):
    """deltatune's safe merge added the fp32 delta and rounded once, as peft's plain merge: after merge_adapter(
    safe_merge=True) 1,176 of 4,096 bf16 q_proj weights of a 64-wide llama were off peft's, 974 after the unmerge."""
    ours, theirs, names = _pair(case, tmp_path)
    ours.merge_adapter(names, safe_merge=safe)
    theirs.merge_adapter(names, safe_merge=safe)
    _assert_base_weights_equal(ours.get_base_model(), theirs.get_base_model())
    ours.unmerge_adapter()
    theirs.unmerge_adapter()
    _assert_base_weights_equal(ours.get_base_model(), theirs.get_base_model())
    merged = ours.merge_and_unload(names, safe_merge=safe)
    _assert_base_weights_equal(merged, theirs.merge_and_unload(safe_merge=safe, adapter_names=names))


@pytest.mark.parametrize("safe", [False, True])
def test_a_merged_adapter_is_not_deleted_and_peft_s_order_gives_peft_s_weights(safe, tmp_path):
    """Deleting a merged adapter is refused, as peft refuses it, leaving the weights as they were; peft's order
    (unmerge, delete, merge the kept one with the safe_merge it had) gives peft's weights."""
    ours, theirs, names = _pair("lora+lora", tmp_path)
    ours.merge_adapter(names, safe_merge=safe)
    theirs.merge_adapter(names, safe_merge=safe)
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items()}
    with pytest.raises(ValueError, match="'default' is merged into the base weights; unmerge_adapter"):
        ours.delete_adapter("default")
    assert all(torch.equal(before[k], v) for k, v in ours.get_base_model().state_dict().items())
    for model in (ours, theirs):
        model.unmerge_adapter()
        model.delete_adapter("default")
        model.merge_adapter(["b"], safe_merge=safe)
    _assert_base_weights_equal(ours.get_base_model(), theirs.get_base_model())
