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


def _pair():
    """The same two LoRAs (different ranks, alphas, targets; B drawn non-zero) in peft and in deltatune, eval mode."""
    base = tiny_model("llama")
    reference, ours = None, None
    for seed, (name, kwargs) in enumerate(CONFIGS):
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
    for name, _ in CONFIGS:
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
    logits) and a merged LoRA (whose scale no longer reaches the weights, and whose unmerge in the block would take
    off the rescaled update; peft goes on silently): one line each. The scales are left as they were."""
    _, ours = _pair()
    scales = [dict(layer.scaling) for _, layer in ours._layers() if hasattr(layer, "scaling")]
    with pytest.raises(TypeError, match="multiplier should be of type float"), ours.rescale_adapter_scale("0.5"):
        pass
    with pytest.raises(ValueError, match="multiplier must be finite, got nan"), ours.rescale_adapter_scale(math.nan):
        pass  # (peft takes it: NaN logits)
    no_lora = _lora_combine.rescale_adapter_scale(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="only supported for models with LoRA layers"), no_lora:
        pass
    ours.merge_adapter(["x"])
    with pytest.raises(ValueError, match="x is merged into the base weights"), ours.rescale_adapter_scale(0.5):
        pass
    assert [dict(layer.scaling) for _, layer in ours._layers() if hasattr(layer, "scaling")] == scales


def test_merge_in_a_rescale_block_unmerges_exactly():
    """An adapter merged inside the block held its rescaled update in the base weights after it (peft too), and a
    later unmerge took off the whole update: the base weights 0.248 off for good. Now the merge holds the update at
    the restored scale (outputs as merging after the block) and unmerging gives the base back; merge_and_unload in
    the block keeps the rescaled weights, as peft's."""
    reference, ours = _pair()
    inputs = tiny_inputs("llama")
    base = {k: p.detach().clone() for k, p in ours.named_parameters() if "lora" not in k}
    with torch.no_grad():
        full = ours(**inputs).logits
        with ours.rescale_adapter_scale(0.5):
            ours.merge_adapter()
        torch.testing.assert_close(ours(**inputs).logits, full, atol=1e-5, rtol=0)
        ours.unmerge_adapter()
        for k, p in ours.named_parameters():
            if k in base:
                torch.testing.assert_close(p, base[k], atol=1e-5, rtol=0)  # (was 0.248)
        with rescale_adapter_scale(reference, 0.5):
            expected = reference.merge_and_unload()(**inputs).logits
        with ours.rescale_adapter_scale(0.5):
            got = ours.merge_and_unload()(**inputs).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_rescale_adapter_scale_at_the_top_level():
    """peft users write ``from peft.helpers import rescale_adapter_scale``; deltatune's is ``dt.rescale_adapter_scale``
    (an _EXPORTS entry)."""
    _, ours = _pair()
    layer = next(layer for _, layer in ours._layers() if "y" in getattr(layer, "scaling", {}))
    scale = layer.scaling["y"]
    with dt.rescale_adapter_scale(ours, 0.25):
        assert layer.scaling["y"] == scale * 0.25
    assert layer.scaling["y"] == scale


def test_layer_set_scale_scale_layer_unscale_layer_as_peft():
    """peft's LoraLayer.set_scale / scale_layer / unscale_layer (and its r, lora_alpha, use_rslora dicts, which
    diffusers-style code reads) had no counterpart on deltatune's LoRA layers: AttributeError. Now the scales after each call and
    the logits are peft's."""
    from peft.tuners.lora import LoraLayer

    reference, ours = _pair()
    reference.base_model.set_adapter(["x", "y"])
    ours.set_adapter(["x", "y"])
    # (the linear layers: peft's scale_layer / unscale_layer pass over an Embedding's adapters, which it keeps in
    # lora_embedding_A, not lora_A; deltatune's scale them as set_scale does)
    theirs = [m for n, m in reference.named_modules() if isinstance(m, LoraLayer) and "embed" not in n]
    mine = [layer for n, layer in ours._layers() if hasattr(layer, "scaling") and "embed" not in n]
    inputs = tiny_inputs("llama")
    for call, args in [("set_scale", ("y", 0.5)), ("scale_layer", (0.3,)), ("unscale_layer", (0.3,)),
                       ("unscale_layer", ())]:  # fmt: skip
        for layer in theirs + mine:
            getattr(layer, call)(*args)
        assert [layer.scaling for layer in mine] == [layer.scaling for layer in theirs], call
        with torch.no_grad():
            torch.testing.assert_close(ours(**inputs).logits, reference(**inputs).logits, atol=1e-6, rtol=0)
    assert [(m.r, m.lora_alpha, m.use_rslora) for m in mine] == [(m.r, m.lora_alpha, m.use_rslora) for m in theirs]
