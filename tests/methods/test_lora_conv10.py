"""LoRA and DoRA on torch's nn.Conv1d and nn.Conv3d against peft 0.21.2's _ConvNd layers (Conv1d, Conv3d) and
_DoraConvNdLayer, to the bit: the draw under one seed, outputs, gradients, merge / safe merge / unmerge, fp32 and
bf16, grouped convs, rsLoRA with lora_bias and dropout, files both ways, mixed-adapter batches. deltatune refused
both layers ("LoRA adapts nn.Linear, GPT-2 Conv1D, nn.Embedding and nn.Conv2d layers") until session 46."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.layer import NotMergeable

peft = pytest.importorskip("peft")
BF16 = torch.bfloat16
CONVS = {1: nn.Conv1d, 3: nn.Conv3d}


class Net(nn.Module):
    """A conv of ``dim`` spatial dimensions (4 -> 6 channels) and a linear read-out."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, groups: int = 1, kernel: int = 3) -> None:
        super().__init__()
        self.conv = CONVS[dim](4, 6, kernel, padding=kernel // 2, groups=groups)
        self.out = nn.Linear(6, 2)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x).flatten(2).mean(-1))


def _pair(dim: int, dtype=torch.float32, groups: int = 1, kernel: int = 3, **fields):
    """(deltatune's model, peft's model) over the same base, adapters drawn under the same seed."""
    kw = dict(target_modules=["conv"], r=4, lora_alpha=8, init_lora_weights=False) | fields
    torch.manual_seed(0)
    base = Net(dim, dtype, groups, kernel)
    twin = Net(dim, dtype, groups, kernel)
    twin.load_state_dict(base.state_dict())
    torch.manual_seed(3)
    theirs = peft.get_peft_model(base, peft.LoraConfig(**kw), autocast_adapter_dtype=False)
    torch.manual_seed(3)
    ours = dt.get_delta_model(twin, dt.LoraConfig(**kw))
    return ours, theirs


def _x(dim: int, dtype=torch.float32, rows: int = 2) -> torch.Tensor:
    return torch.randn(rows, 4, *(5,) * dim, generator=torch.Generator().manual_seed(1)).to(dtype)


def _step(model, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    torch.manual_seed(5)  # the same dropout mask for both
    out = model(x)
    (out.float() ** 2).sum().backward()
    grads = {n.split("conv.")[1].replace(".weight", "").replace(".default", ""): p.grad
             for n, p in model.named_parameters() if p.grad is not None and "conv." in n}  # fmt: skip
    return out.detach(), grads


def _weights(model) -> tuple[torch.Tensor, torch.Tensor]:
    conv = model.get_base_model().conv.base_layer
    return conv.weight.detach().clone(), conv.bias.detach().clone()


def _assert_same(ours, theirs, x: torch.Tensor) -> None:
    want, got = peft.get_peft_model_state_dict(theirs), ours.adapter_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    (out, grads), (peft_out, peft_grads) = _step(ours, x), _step(theirs, x)
    assert torch.equal(out, peft_out)
    assert grads.keys() == peft_grads.keys() and all(torch.equal(grads[k], peft_grads[k]) for k in grads)


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dim", [1, 3], ids=["conv1d", "conv3d"])
def test_conv_draw_forward_grads_and_merges_equal_peft(dim, dora, dtype):
    ours, theirs = _pair(dim, dtype, use_dora=dora)
    layer = ours.get_base_model().conv
    assert type(layer).__name__ == f"LoraConv{dim}d" and type(layer.lora_A["default"]) is CONVS[dim]
    if dora:  # m stored (1, c_out, 1, ...), as peft's
        assert layer.lora_magnitude_vector["default"].shape == (1, 6, *(1,) * dim)
    x = _x(dim, dtype)
    _assert_same(ours, theirs, x)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        start = _weights(ours)
        for safe in (False, True):
            ours.merge_adapter(safe_merge=safe)
            theirs.base_model.merge_adapter(safe_merge=safe)
            assert all(torch.equal(a, b) for a, b in zip(_weights(ours), _weights(theirs)))
            assert torch.equal(ours(x), theirs(x))
            ours.unmerge_adapter(), theirs.unmerge_adapter()
            assert all(torch.equal(a, b) for a, b in zip(_weights(ours), _weights(theirs)))
        if dtype == torch.float32:  # the unmerge gives W back (to rounding)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_weights(ours), start))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dim", [1, 3], ids=["conv1d", "conv3d"])
def test_rslora_lora_bias_and_dropout_equal_peft(dim, dora):
    fields = dict(use_rslora=True, lora_dropout=0.3, use_dora=dora, lora_bias=not dora)  # (peft: no DoRA with bias)
    ours, theirs = _pair(dim, **fields)
    assert ours.get_base_model().conv.scaling["default"] == 8 / 2  # lora_alpha / sqrt(r)
    x = _x(dim)
    _assert_same(ours, theirs, x)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        ours.merge_adapter(), theirs.merge_adapter()
        assert all(torch.equal(a, b) for a, b in zip(_weights(ours), _weights(theirs)))
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dim", [1, 3], ids=["conv1d", "conv3d"])
def test_a_grouped_conv_is_adapted_as_peft_and_its_merge_refused_before_any_layer_merges(dim, dora):
    """peft adapts a grouped conv (B a grouped 1-kernel conv) and refuses to merge it (NotImplementedError); the
    refusal names the layer's kind and comes before the Linear beside it is merged (the merge pre-pass)."""
    ours, theirs = _pair(dim, groups=2, use_dora=dora, target_modules=["conv", "out"])
    x = _x(dim)
    _assert_same(ours, theirs, x)
    ours.eval()
    with torch.no_grad():
        before, out_weight = ours(x), ours.get_base_model().out.base_layer.weight.clone()
        kind = CONVS[dim].__name__
        with pytest.raises(NotMergeable, match=f"^adapter 'default' is on a grouped {kind}, which peft cannot merge"):
            ours.merge_adapter()
        assert torch.equal(ours.get_base_model().out.base_layer.weight, out_weight)
        assert torch.equal(ours(x), before) and not ours.get_base_model().out.merged_adapters


@pytest.mark.parametrize("dim", [1, 3], ids=["conv1d", "conv3d"])
def test_rank_and_init_refusals_name_the_conv_and_touch_nothing(dim):
    kind = CONVS[dim].__name__
    cases = [
        (dict(r=3), rf"^lora: conv is a {kind} with groups=2; r=3 must be a multiple of it"),  # peft: ValueError
        (
            dict(r=4, init_lora_weights="pissa"),
            rf"^lora: init_lora_weights='pissa' is not defined for conv \({kind}\)",
        ),
        (dict(r=4, init_lora_weights="orthogonal"), r"init_lora_weights='orthogonal' is not defined for conv"),
    ]  # peft: "Unknown initialization init_lora_weights='pissa'" (its conv layers draw True and 'gaussian' only)
    for fields, message in cases:
        net = Net(dim, groups=2)
        with pytest.raises(dt.ConfigError, match=message):
            dt.get_delta_model(net, dt.LoraConfig(target_modules=["out", "conv"], **fields))
        assert type(net.conv) is CONVS[dim] and type(net.out) is nn.Linear


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dim", [1, 3], ids=["conv1d", "conv3d"])
def test_files_load_both_ways_with_peft(dim, dora, tmp_path):
    ours, theirs = _pair(dim, use_dora=dora, init_lora_weights=True)
    with torch.no_grad():  # train-like weights, so B A is not zero
        for model in (ours, theirs):
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(
                        torch.randn(
                            p.shape, generator=torch.Generator().manual_seed(len(n.split("conv.")[1].split(".")[0]))
                        )
                    )
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = _x(dim)
    torch.manual_seed(0)  # the base _pair drew
    peft_loaded = peft.PeftModel.from_pretrained(Net(dim), tmp_path / "ours").eval()
    torch.manual_seed(0)
    ours_loaded = dt.DeltaModel.from_pretrained(Net(dim), tmp_path / "theirs").eval()
    with torch.no_grad():
        want = theirs.eval()(x)
        assert torch.equal(peft_loaded(x), want) and torch.equal(ours_loaded(x), want)


@pytest.mark.parametrize("dim", [1, 3], ids=["conv1d", "conv3d"])
def test_mixed_adapter_batch_equals_peft(dim):
    ours, theirs = _pair(dim)
    torch.manual_seed(4)
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False, lora_bias=True))
    torch.manual_seed(4)
    ours.add_adapter("other", dt.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False, lora_bias=True))
    names = ["default", "other", "__base__", "other"]
    x = _x(dim, rows=4)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours(x, adapter_names=names), theirs(x, adapter_names=names))


def test_a_1x1x1_conv3d_merges_where_peft_s_matmul_shortcut_fails():
    """peft's get_delta_weight takes any kernel whose first two sizes are 1 for a 1x1 Conv2d and squeezes two dims
    of five: a (1, 1, 1) Conv3d's merge fails there (RuntimeError; peft 0.22 merges it). deltatune's delta is the conv form, s * B A per
    kernel position: here B A reshaped, checked by hand, and the merged model computes as the unmerged one."""
    ours, theirs = _pair(3, kernel=1)
    x = _x(3)
    _assert_same(ours, theirs, x)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        if tuple(int(v) for v in peft.__version__.split(".")[:2]) < (0, 22):
            with pytest.raises(RuntimeError):
                theirs.merge_adapter()
        else:  # peft 0.22 flattens any conv's delta (its 1x1 shortcut gone): its merge computes as ours
            want = theirs(x)
            theirs.merge_adapter()
            assert torch.allclose(theirs(x), want, atol=1e-5)
        layer = ours.get_base_model().conv
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        hand = (B.flatten(1) @ A.flatten(1)).view(6, 4, 1, 1, 1) * layer.scaling["default"]
        assert torch.allclose(layer.delta_weight("default"), hand, atol=1e-6)
        before = ours(x)
        ours.merge_adapter()
        assert torch.allclose(ours(x), before, atol=1e-5)


@pytest.mark.parametrize("dim", [1, 3], ids=["conv1d", "conv3d"])
def test_lora_bias_on_a_conv_without_a_bias_refuses_the_merge_before_any_layer_merges(dim):
    """peft's RuntimeError ("Impossible to merge LoRA with `lora_bias=True` ..."), as the merge pre-pass raises it:
    the Linear beside the conv is not merged first."""
    net = Net(dim)
    net.conv.bias = None
    model = dt.get_delta_model(net, dt.LoraConfig(target_modules=["out", "conv"], r=2, lora_bias=True))
    weight = net.out.base_layer.weight.clone()
    with pytest.raises(NotMergeable, match=r"^Impossible to merge LoRA with `lora_bias=True` because the base layer"):
        model.merge_adapter()
    assert torch.equal(net.out.base_layer.weight, weight) and not net.out.merged_adapters
