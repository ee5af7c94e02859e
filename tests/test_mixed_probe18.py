"""Probe 18 of mixed-adapter batches, adapter scaling and LoRA combination: each test failed before its fix."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from peft.helpers import rescale_adapter_scale
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.methods import _lora_combine

CONFIGS = [
    ("x", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])),
    ("y", dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj"], use_rslora=True)),
]


def _pair(configs=CONFIGS):
    """The same two LoRAs (different ranks, alphas, targets; B drawn non-zero) in peft and in deltatune, eval mode."""
    base = tiny_model("llama")
    reference, ours = None, None
    for seed, (name, kwargs) in enumerate(configs):
        torch.manual_seed(seed)
        config = peft.LoraConfig(**kwargs, init_lora_weights=False)
        if reference is None:
            reference = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            reference.add_adapter(name, config)
        config = dt.LoraConfig(**kwargs)
        if ours is None:
            ours = dt.get_delta_model(base, config, adapter_name=name)
        else:
            ours.add_adapter(name, config)
    for name, _ in configs:
        state = peft.get_peft_model_state_dict(reference, adapter_name=name)
        dt.set_peft_model_state_dict(ours, state, adapter_name=name)
    return reference.eval(), ours.eval()


def test_rescale_adapter_scale_as_peft_helpers():
    """peft.helpers.rescale_adapter_scale (WiSE-FT: every LoRA's update times a multiplier for a block) had no
    deltatune counterpart: ``model.rescale_adapter_scale`` raised AttributeError. Now the logits in the block, plain
    and in a mixed-adapter batch, are peft's, and the scales come back on leaving, after an exception too."""
    reference, ours = _pair()
    inputs = tiny_inputs("llama", batch=3)
    rows = ["x", "y", "__base__"]
    with torch.no_grad():
        before = ours(**inputs).logits
        with rescale_adapter_scale(reference, 0.3):
            expected, expected_mixed = reference(**inputs).logits, reference(**inputs, adapter_names=rows).logits
        with ours.rescale_adapter_scale(0.3):
            got, got_mixed = ours(**inputs).logits, ours(**inputs, adapter_names=rows).logits
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_mixed, expected_mixed, atol=1e-6, rtol=0)
        assert (got - before).abs().max() > 1e-3  # the block did rescale
        with pytest.raises(RuntimeError, match="inside"), _lora_combine.rescale_adapter_scale(ours, 0.0):
            raise RuntimeError("inside")
        assert torch.equal(ours(**inputs).logits, before)
        torch.testing.assert_close(before, reference(**inputs).logits, atol=1e-6, rtol=0)


def test_rescale_adapter_scale_refusals_change_nothing():
    """A multiplier that is not a number and a model with no LoRA: one line each, as peft; a NaN one (peft: NaN
    logits): one line. The scales are left as they were."""
    _, ours = _pair()
    scales = [dict(layer.scaling) for _, layer in ours._layers() if hasattr(layer, "scaling")]
    with pytest.raises(TypeError, match="multiplier should be of type float"), ours.rescale_adapter_scale("0.5"):
        pass
    with pytest.raises(ValueError, match="multiplier must be finite, got nan"), ours.rescale_adapter_scale(math.nan):
        pass  # (peft takes it: NaN logits)
    no_lora = _lora_combine.rescale_adapter_scale(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="only supported for models with LoRA layers"), no_lora:
        pass
    assert [dict(layer.scaling) for _, layer in ours._layers() if hasattr(layer, "scaling")] == scales


def _base_weights(model):
    return {k: p.detach().clone() for k, p in model.named_parameters() if "lora" not in k and "magnitude" not in k}


def _assert_base(model, base):
    for k, p in model.named_parameters():
        if k in base:
            torch.testing.assert_close(p, base[k], atol=1e-6, rtol=0, msg=k)


def test_merge_and_fuse_lora_in_a_rescale_block_as_peft():
    """An adapter merged inside the block was unmerged and merged again at the scale saved on entry on leaving: after
    ``with rescale(0.5): merge_adapter()`` the model computed at full scale (peft's: at 0.5, the merged WiSE-FT
    model; logits 0.19 off), and ``fuse_lora(lora_scale=0.7)`` in the block ended fused at 1.0 (peft: 0.35; 0.25
    off). Now each merge keeps the scale it was made at, as peft's, and unmerging after the block gives the base
    weights back exactly (peft's: 0.248 off); merged at entry, an adapter is no longer refused and unmerges exactly
    inside the block too; merge_and_unload in the block keeps the rescaled weights, as peft's."""
    from peft.tuners.lora import LoraLayer

    from deltatune import diffusion

    inputs = tiny_inputs("llama")
    with torch.no_grad():
        reference, ours = _pair()
        base = _base_weights(ours)
        with rescale_adapter_scale(reference, 0.5):
            reference.merge_adapter()
        with ours.rescale_adapter_scale(0.5):
            ours.merge_adapter()
        torch.testing.assert_close(ours(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)
        ours.unmerge_adapter()
        _assert_base(ours, base)

        reference, ours = _pair()  # diffusers' fuse_lora(lora_scale=0.7): the active LoRA's scales times 0.7, merged
        with rescale_adapter_scale(reference, 0.5):
            for layer in (m for m in reference.modules() if isinstance(m, LoraLayer) and "x" in m.scaling):
                layer.scaling["x"] *= 0.7
            reference.merge_adapter()
        with ours.rescale_adapter_scale(0.5):
            diffusion.fuse_lora(ours, lora_scale=0.7)
        torch.testing.assert_close(ours(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)
        ours.unmerge_adapter()
        _assert_base(ours, base)

        _, ours = _pair()  # merged before the block: not refused; the block does not reach it (peft's), unmerge exact
        merged = (ours.merge_adapter(), ours(**inputs).logits)[1]
        with ours.rescale_adapter_scale(0.5):
            torch.testing.assert_close(ours(**inputs).logits, merged, atol=0, rtol=0)
            ours.unmerge_adapter()
            _assert_base(ours, base)

        reference, ours = _pair()
        with rescale_adapter_scale(reference, 0.5):
            expected = reference.merge_and_unload()(**inputs).logits
        with ours.rescale_adapter_scale(0.5):
            got = ours.merge_and_unload()(**inputs).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.conv = torch.nn.Embedding(20, 8), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.mha, self.lin = torch.nn.MultiheadAttention(8, 2, batch_first=True), torch.nn.Linear(8, 4)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return self.lin(self.mha(h, h, h)[0])


@pytest.mark.parametrize("dora", [False, True])
def test_unmerge_at_the_merged_scale_every_layer_kind(dora):
    """Linear, Embedding, Conv2d, MultiheadAttention (plain LoRA) and DoRA on the first three: a merge in a rescale
    block computes after it as the block did (as peft's; MHA aside, whose out_proj peft adds twice), and unmerging
    gives the base weights back to 1e-6; so does an unmerge after set_scale changed the scales since the merge (it
    took off the update at the scale now: W off by the change), and unmerging the first of two merged adapters puts
    the second back at its own merge's scale."""
    torch.manual_seed(0)
    model = _Layers().eval()
    ids = torch.randint(0, 20, (3, 5))
    targets = ["emb", "conv", "lin"] + ([] if dora else ["mha"])
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=dora)
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs, init_lora_weights=False)).eval()
    ours = dt.get_delta_model(copy.deepcopy(model), dt.LoraConfig(**kwargs)).eval()
    dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(reference))
    base = _base_weights(ours)
    layers = [layer for _, layer in ours._layers() if hasattr(layer, "set_scale")]
    with torch.no_grad():
        with ours.rescale_adapter_scale(0.5):
            inside = ours(ids)
            ours.merge_adapter()
        torch.testing.assert_close(ours(ids), inside, atol=1e-5, rtol=0)
        if dora:
            with rescale_adapter_scale(reference, 0.5):
                reference.merge_adapter()
            torch.testing.assert_close(ours(ids), reference(ids), atol=1e-5, rtol=0)
        ours.unmerge_adapter()
        _assert_base(ours, base)
        ours.merge_adapter()
        for layer in layers:
            layer.set_scale("default", 0.3)
        ours.unmerge_adapter()
        _assert_base(ours, base)

        torch.manual_seed(2)
        ours.add_adapter("b", dt.LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], init_lora_weights=False))
        lin = ours.get_base_model().lin
        lin_base = lin.base_layer.weight.clone()
        lin.lora_B["b"].weight.normal_()
        ours.merge_adapter(["default"])
        ours.merge_adapter(["b"])
        merged_b = lin.delta_weight("b")
        for layer in layers:
            layer.set_scale("default", 0.5), layer.set_scale("b", 0.25)
        lin.unmerge("default")
        torch.testing.assert_close(lin.base_layer.weight, lin_base + merged_b, atol=1e-6, rtol=0)
        ours.unmerge_adapter()
        _assert_base(ours, base)


def test_rescale_adapter_scale_at_the_top_level():
    """peft users write ``from peft.helpers import rescale_adapter_scale``; deltatune's is ``dt.rescale_adapter_scale``
    (an _EXPORTS entry)."""
    _, ours = _pair()
    layer = next(layer for _, layer in ours._layers() if "y" in getattr(layer, "scaling", {}))
    scale = layer.scaling["y"]
    with dt.rescale_adapter_scale(ours, 0.25):
        assert layer.scaling["y"] == scale * 0.25
    assert layer.scaling["y"] == scale


PATTERNED = [
    ("x", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
               alpha_pattern={"q_proj": 3})),
    ("y", dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj"], use_rslora=True, use_dora=True)),
]  # fmt: skip


@pytest.mark.parametrize("configs", [CONFIGS, PATTERNED], ids=["plain", "patterns_dora"])
def test_layer_set_scale_scale_layer_unscale_layer_as_peft(configs):
    """peft's LoraLayer.set_scale / scale_layer / unscale_layer (and its r, lora_alpha, use_rslora dicts, which
    diffusers-style code reads) had no counterpart on deltatune's LoRA layers: AttributeError. Now the scales after each
    call and the logits are peft's: with rank / alpha patterns, a DoRA adapter, and an inactive adapter (scale_layer /
    unscale_layer pass it over). An Embedding's adapters are scaled too (peft's pass over them: it keeps them in
    lora_embedding_A, not lora_A), as set_scale does."""
    from peft.tuners.lora import LoraLayer

    reference, ours = _pair(configs)
    theirs = [m for n, m in reference.named_modules() if isinstance(m, LoraLayer) and "embed" not in n]
    mine = [layer for n, layer in ours._layers() if hasattr(layer, "scaling") and "embed" not in n]
    embedding = next(layer for n, layer in ours._layers() if "embed" in n)
    inputs = tiny_inputs("llama")
    for call, args, active in [("set_scale", ("y", 0.5), ["x", "y"]), ("scale_layer", (0.3,), ["x"]),
                               ("unscale_layer", (0.3,), ["x"]), ("scale_layer", (0.5,), ["x", "y"]),
                               ("unscale_layer", (), ["y"]), ("unscale_layer", (), ["x", "y"])]:  # fmt: skip
        reference.base_model.set_adapter(active)
        ours.set_adapter(active)
        before = [dict(layer.scaling) for layer in mine]
        for layer in theirs + mine:
            getattr(layer, call)(*args)
        assert [layer.scaling for layer in mine] == [layer.scaling for layer in theirs], call
        if call == "scale_layer" and "y" not in active:
            assert [layer.scaling.get("y") for layer in mine] == [scaling.get("y") for scaling in before]
        with torch.no_grad():
            torch.testing.assert_close(ours(**inputs).logits, reference(**inputs).logits, atol=1e-6, rtol=0)
    assert [(m.r, m.lora_alpha, m.use_rslora) for m in mine] == [(m.r, m.lora_alpha, m.use_rslora) for m in theirs]
    scale = embedding.scaling["x"]
    embedding.set_adapters(["x"])
    embedding.scale_layer(0.3)
    assert embedding.scaling["x"] == scale * 0.3
    embedding.unscale_layer()
    assert embedding.scaling["x"] == 8 / 4


def test_hotswap_sets_the_layers_r_and_alpha(tmp_path):
    """load_lora(hotswap=True) wrote each layer's new scale but left its r / lora_alpha / use_rslora at the old
    adapter's, so set_scale(name, 1.0) after swapping in b (alpha 2, scale 0.5) gave a's 2.0 back, and
    unscale_layer() after d (r 8, alpha 3) too (peft's hotswap has the same flaw). Now they are the config the swap
    writes, and both give the swapped-in scale."""
    pytest.importorskip("diffusers")
    from diffusion.test_lora_files import tiny_unet
    from test_t2i_probe14 import _files

    files = _files(tmp_path)
    ours = dt.load_lora(tiny_unet(), files["a"], prefix="unet")
    dt.load_lora(ours, files["b"], prefix="unet", hotswap=True)
    layers = [layer for _, layer in ours._layers() if "default" in getattr(layer, "scaling", {})]
    config = ours.peft_config["default"]
    assert {(layer.r["default"], layer.lora_alpha["default"]) for layer in layers} == {(config.r, config.lora_alpha)}
    for layer in layers:
        layer.set_scale("default", 1.0)
    assert {layer.scaling["default"] for layer in layers} == {0.5}  # (was 2.0, a's)
    dt.load_lora(ours, files["d"], prefix="unet", hotswap=True)
    swapped = [layer for layer in layers if layer.lora_A["default"].weight.shape[0] == 8]
    assert swapped and {layer.scaling["default"] for layer in swapped} == {0.375}
    for layer in swapped:
        layer.unscale_layer()
    assert {layer.scaling["default"] for layer in swapped} == {0.375}  # (was 2.0)


def test_a_refused_merge_leaves_earlier_merges_at_their_scale():
    """merge_adapter refusing (a bottleneck adapter cannot merge: TypeError) unmerged every adapter and merged the
    earlier ones again at their scale now: a LoRA merged at 2.0 whose scale set_scale had since made 0.6 was left
    merged at 0.6, the weights changed by a refused call."""
    _, ours = _pair()
    ours.add_adapter("bn", dt.BottleneckConfig(reduction_factor=4))
    ours.merge_adapter(["x"])
    weights = _base_weights(ours)
    for _, layer in ours._layers():
        if hasattr(layer, "set_scale"):
            layer.set_scale("x", 0.3)
    with pytest.raises(TypeError):
        ours.merge_adapter(["bn"])
    _assert_base(ours, weights)


def test_disable_adapter_puts_a_merge_back_at_its_scale():
    """disable_adapter (and a load into a merged adapter) unmerges every merged adapter for the block and merges it
    again after: at the scale of the moment, so a merge made in a rescale block (0.5) came back at 1.0, the merged
    model changed by a block that only computes as the base model."""
    reference, ours = _pair()
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        with ours.rescale_adapter_scale(0.5):
            ours.merge_adapter()
        merged = ours(**inputs).logits
        with ours.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(ours(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(**inputs).logits, merged, atol=1e-6, rtol=0)
