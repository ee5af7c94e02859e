"""Merging against peft: safe_merge / progressbar (peft's keywords) and half-precision merges on CPU to the bit."""

from __future__ import annotations

import pytest
import torch
from tiny import output_of, tiny_inputs, tiny_model
from torch import nn

import deltatune as dt

peft = pytest.importorskip("peft")


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return self.point(self.conv(x))


def _convs(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return _Convs().to(dtype)


# (base, peft / deltatune config fields): LoRA on linears and an embedding, DoRA, GPT-2's Conv1D, convolutions
CASES = {
    "lora": (lambda dt_: tiny_model("llama").to(dt_), dict(target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "dora": (lambda dt_: tiny_model("llama").to(dt_), dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    "conv1d": (lambda dt_: tiny_model("gpt2").to(dt_), dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    "conv2d": (_convs, dict(target_modules=["conv", "point"])),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_half_precision_merge_on_cpu_equals_peft_to_the_bit(case, dtype, tmp_path):
    """peft multiplies half-precision LoRA factors on CPU in float32 (scale included) and rounds the delta once; the
    delta was computed in bf16 / fp16, rounded twice (a non-power-of-two scale): ~900 of a GPT-2 c_attn's weights
    differed by up to 0.002 in bf16."""
    make, fields = CASES[case]
    config = dict(r=4, lora_alpha=7, init_lora_weights=False, **fields)
    src = peft.get_peft_model(make(torch.float32), peft.LoraConfig(**config))
    with torch.no_grad():  # factors exact in the half dtype, so both libraries hold the same values
        for name, p in src.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(dtype).float())
    src.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(dtype), tmp_path, autocast_adapter_dtype=False)
    ours = dt.DeltaModel.from_pretrained(make(dtype), tmp_path)
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {dtype}
    theirs.merge_adapter()
    ours.merge_adapter()
    merged = {k: v.clone() for k, v in theirs.base_model.model.state_dict().items() if "lora_" not in k}
    for key, value in ours.base_model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, merged[key]), key
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    for key, value in ours.base_model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, theirs.base_model.model.state_dict()[key]), key


def _broken(kind: str):
    """A deltatune and a peft model holding the same adapter, one entry of it NaN (IA3: inf, on a feed-forward)."""
    if kind == "ia3":
        config = dict(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        )
        ours = dt.get_delta_model(tiny_model("llama"), dt.IA3Config(**config))
        theirs = peft.get_peft_model(tiny_model("llama"), peft.IA3Config(**config))
        where, attr, value = "mlp.down_proj", "ia3_l", float("inf")
    else:
        config = dict(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"], use_dora=kind == "dora")
        ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**config))
        theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**config))
        where, attr, value = "self_attn.v_proj", "lora_B", float("nan")
    for model in (ours, theirs):
        layer = model.get_base_model().get_submodule(f"model.layers.1.{where}")
        param = getattr(layer, attr)["default"]
        with torch.no_grad():
            (param if isinstance(param, nn.Parameter) else param.weight).view(-1)[0] = value
    return ours, theirs


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_safe_merge_refuses_a_broken_adapter_with_peft_s_error_and_changes_nothing(kind):
    """merge_and_unload(safe_merge=True, progressbar=True) and merge_adapter(safe_merge=True) were refused as
    unexpected keywords; a NaN in LoRA's B merged then unmerged stays in the base weight for good."""
    ours, theirs = _broken(kind)
    with pytest.raises(ValueError) as expected:
        theirs.merge_and_unload(safe_merge=True, progressbar=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError) as got:
        ours.merge_and_unload(safe_merge=True, progressbar=True)
    assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems"):
        ours.merge_adapter(safe_merge=True)
    assert _same(ours.state_dict(), before)  # layer 0, merged before the broken layer 1 was seen, too
    assert not any(layer.merged_adapters for _, layer in ours._layers())


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_safe_merge_of_a_sound_adapter_equals_peft_s(kind):
    ours, theirs = _broken(kind)
    for model in (ours, theirs):  # mend the broken entry the same way in both
        for p in model.parameters():
            if not p.isfinite().all():
                with torch.no_grad():
                    p.copy_(p.nan_to_num(0.5, 0.5, 0.5))
    a = theirs.merge_and_unload(safe_merge=True, progressbar=True).state_dict()
    b = ours.merge_and_unload(safe_merge=True, progressbar=True).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_a_refused_merge_leaves_the_weights_to_the_bit():
    """LoRA and a bottleneck adapter active together: the bottleneck refuses to merge, after LoRA had merged into
    earlier layers and was unmerged again, which rounds: 1042 bf16 base weights were left up to 0.00098 off."""
    model = dt.get_delta_model(tiny_model("llama").to(torch.bfloat16), dt.LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("bn", dt.BottleneckConfig())
    model.set_adapter(["default", "bn"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for safe_merge in (False, True):
        with pytest.raises(TypeError, match="adapter 'bn' \\(BottleneckLayer\\) adds a computation of its own"):
            model.merge_adapter(safe_merge=safe_merge)
        assert _same(model.state_dict(), before)
        assert not any(layer.merged_adapters for _, layer in model._layers())


def _backends() -> list[str]:
    from deltatune.methods import quant

    cpu = torch.device("cpu")
    return [b for b in quant.BACKENDS if quant._available(b) and (b == "torchao" or quant._bnb_runs_on(cpu))]


@pytest.mark.parametrize("backend", _backends())
def test_safe_merge_into_a_4bit_base_equals_the_plain_merge(backend):
    """The copy safe_merge keeps is not of the packed weight (torchao's NF4 clone re-quantises, and fails on a small
    layer): a 4-bit layer is replaced by its dequantised one, which the refused merge puts back."""

    def model():
        torch.manual_seed(0)
        base, _ = dt.quantize(tiny_model("llama", hidden_size=64, intermediate_size=128), backend=backend)
        torch.manual_seed(1)
        return dt.get_delta_model(base, dt.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))

    plain, safe, inputs = model(), model(), tiny_inputs("llama")
    plain.merge_adapter()
    safe.merge_adapter(safe_merge=True)
    assert torch.equal(output_of(safe, inputs), output_of(plain, inputs))
    broken = model()
    q = broken.get_base_model().model.layers[1].self_attn.q_proj
    packed = q.base_layer
    with torch.no_grad():
        q.lora_A["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default"):
        broken.merge_adapter(safe_merge=True)
    assert q.base_layer is packed and not q.merged_adapters


def test_an_empty_adapter_names_merges_none_as_in_peft(tmp_path):
    """adapter_names=[] merged the active adapters (`[] or active`); peft merges none: logits 0.20 apart."""
    make = lambda: tiny_model("llama")  # noqa: E731
    dt.get_delta_model(make(), dt.LoraConfig(r=4, init_lora_weights=False)).save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    ours = dt.DeltaModel.from_pretrained(make(), tmp_path)
    ours.merge_adapter(adapter_names=[])
    assert not any(layer.merged_adapters for _, layer in ours._layers())
    inputs = tiny_inputs("llama")
    expected = output_of(theirs.merge_and_unload(adapter_names=[]), inputs)
    torch.testing.assert_close(output_of(ours.merge_and_unload(adapter_names=[]), inputs), expected, atol=0, rtol=0)
    torch.testing.assert_close(expected, output_of(make(), inputs), atol=0, rtol=0)


@pytest.mark.parametrize("merged", [[], ["b"]])
def test_merge_and_unload_keeps_the_active_adapters_head_copy_as_peft(tmp_path, merged):
    """peft 0.22 keeps the merged adapter's copy of a module trained in full, its original when none merged holds one
    (ModulesToSaveWrapper.unload_and_optionally_merge_module); peft 0.21 kept the active adapter's whatever merged."""
    make = lambda: tiny_model("llama", "seq_cls")  # noqa: E731
    for name, value in (("default", 0.5), ("b", -0.25)):
        torch.manual_seed(len(name))
        model = dt.get_delta_model(make(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=[
            "score"], task_type="SEQ_CLS", init_lora_weights=False))  # fmt: skip
        with torch.no_grad():
            model.base_model.score.modules_to_save["default"].weight.fill_(value)
        model.save_pretrained(tmp_path / name)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "default")
    theirs.load_adapter(tmp_path / "b", "b")
    ours = dt.DeltaModel.from_pretrained(make(), tmp_path / "default")
    ours.load_adapter(tmp_path / "b", "b")
    inputs = tiny_inputs("llama", "seq_cls")
    expected = output_of(theirs.merge_and_unload(adapter_names=merged), inputs)
    plain = ours.merge_and_unload(adapter_names=merged)
    want = {(): make().score.weight, ("b",): torch.full_like(plain.score.weight, -0.25)}[tuple(merged)]
    assert torch.equal(plain.score.weight, want)
    if tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22):
        torch.testing.assert_close(output_of(plain, inputs), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_safe_merge_after_a_dora_merge_leaves_what_a_plain_merge_leaves(dtype):
    """check_merge's trial merged "two" over the merged "default" through an unmerge and merge again, which redrew
    default's DoRA norm; the weights came back from the copy, the norm did not: the merge and the unmerge after it
    differed from a plain merge's (0.039 after unmerging, bf16)."""
    out = []
    for safe in (False, True):
        torch.manual_seed(0)
        model = dt.get_delta_model(tiny_model("llama").to(dtype), dt.LoraConfig(r=4, target_modules=["q_proj"],
                                                                                use_dora=True))  # fmt: skip
        model.add_adapter("two", dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.normal_() if "lora_B" in n else p.mul_(1.5) if "magnitude" in n else None
        model.merge_adapter(["default"])
        model.merge_adapter(["default", "two"], safe_merge=safe)
        merged = [m.base_layer.weight.clone() for _, m in model._layers()]
        model.unmerge_adapter()
        out.append((merged, [m.base_layer.weight.clone() for _, m in model._layers()]))
    for plain, safe in zip(*out):
        for a, b in zip(plain, safe):
            assert torch.equal(a, b)
