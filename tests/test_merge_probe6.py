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


def _off_the_bf16_grid(model) -> None:
    """Trained fp32 adapter values (peft draws them in the base's bf16 before casting them up)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_" in name:
                p.add_(torch.randn_like(p) * 0.01)


@pytest.mark.parametrize("case", ["linear", "embedding", "conv2d", "dora"])
def test_fp32_adapters_on_a_bf16_base_compute_and_merge_as_peft_by_default(case, tmp_path):
    """peft keeps a bf16 base's LoRA in fp32 (autocast_adapter_dtype) and adds its fp32 update to the bf16 output,
    rounding once; a deltatune run now trains so. deltatune rounded the update's factors to bf16 first (5,719 of
    16,384 outputs of a 256 x 256 layer off peft's), a Conv2d LoRA crashed on the bf16 input, and a merge rounded
    the delta before adding it (841 of 3,072 merged entries off)."""
    from test_merge_probe5 import _convs

    from deltatune.train.models import reload_as_trained

    targets = {"embedding": ["embed_tokens"], "conv2d": ["conv", "point"]}.get(case, ["q_proj", "v_proj"])
    make = (lambda: _convs(torch.bfloat16)) if case == "conv2d" else (lambda: tiny_model("llama").to(torch.bfloat16))
    config = dict(r=4, lora_alpha=7, init_lora_weights=False, target_modules=targets, use_dora=case == "dora")
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**config)).eval()
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    _off_the_bf16_grid(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(make(), tmp_path)
    reload_as_trained(ours, str(tmp_path))
    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)} if case == "conv2d" else tiny_inputs("llama")
    with torch.no_grad():
        out = ours(**inputs) if case == "conv2d" else ours(**inputs).logits
        ref = theirs(**inputs) if case == "conv2d" else theirs(**inputs).logits
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    merged, peft_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    for key, value in peft_merged.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key


def test_fp32_ia3_on_a_bf16_base_merges_as_peft_by_default(tmp_path):
    """peft multiplies the bf16 weight by the fp32 vector and rounds once; the vector was rounded to bf16 first (1,160
    merged entries of 6 layers off peft's, up to 2.4e-4)."""
    from deltatune.train.models import reload_as_trained

    make = lambda: tiny_model("llama").to(torch.bfloat16)  # noqa: E731
    config = dict(init_ia3_weights=False, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs = peft.get_peft_model(make(), peft.IA3Config(**config)).eval()
    _off_the_bf16_grid(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(make(), tmp_path)
    reload_as_trained(ours, str(tmp_path))
    merged, peft_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    for key, value in peft_merged.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key


def test_a_mixed_batch_of_fp32_adapters_on_a_bf16_base_equals_each_adapter_alone():
    """The gathered path of same-rank adapters rounded the rows' updates to bf16 before adding them, where each
    adapter alone adds its fp32 update and rounds once (1,270 of 1,792 logits off, up to 0.0034)."""
    from deltatune.train.models import upcast_adapters

    config = dict(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    ours = dt.get_delta_model(tiny_model("llama").to(torch.bfloat16), dt.LoraConfig(**config)).eval()
    for name in ("b", "c"):
        ours.add_adapter(name, dt.LoraConfig(**config))
    upcast_adapters(ours)
    names = ["b", "default", "c", "b"]
    inputs = tiny_inputs("llama", batch=len(names))
    with torch.no_grad():
        rows = ours(**inputs, adapter_names=names).logits
        for i, name in enumerate(names):
            ours.set_adapter(name)
            alone = ours(**{k: v[i : i + 1] for k, v in inputs.items()}).logits
            assert torch.equal(rows[i : i + 1], alone), (i, name)
