"""Probe 23 of adapter switching on a DeltaModel's layers: each test failed before its fix."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from test_mixed_probe18 import _pair
from tiny import tiny_model

import deltatune as dt

CONFIGS = [
    ("x", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("y", dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj"], use_rslora=True)),
]


def _layers(reference, ours, path="model.layers.0.self_attn.q_proj"):
    return reference.base_model.model.get_submodule(path), ours.base_model.get_submodule(path)


def _ia3_pair():
    """Two IA3 adapters (vectors drawn away from 1) in peft and in deltatune on a tiny llama, both active."""
    base = tiny_model("llama")
    kwargs = dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    reference = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs, init_ia3_weights=False), "x")
    reference.add_adapter("y", peft.IA3Config(**kwargs, init_ia3_weights=False))
    ours = dt.get_delta_model(base, dt.IA3Config(**kwargs), adapter_name="x")
    ours.add_adapter("y", dt.IA3Config(**kwargs))
    for name in ("x", "y"):
        dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(reference, adapter_name=name), name)
    reference.base_model.set_adapter(["x", "y"])
    ours.set_adapter(["x", "y"])
    return reference, ours


def test_a_layer_merges_its_active_adapters_without_a_name_as_peft():
    """peft's tuner layer API: ``layer.merge()`` merges the active adapters, ``layer.merge(adapter_names=[...])`` the
    named ones, ``layer.merge(True)`` / ``merge(safe_merge=True)`` with the NaN check. deltatune's ``merge`` needed
    a name (TypeError: missing 'name'). Now the weights and ``merged_adapters`` are peft's, to the bit."""
    reference, ours = _pair(CONFIGS)
    reference.base_model.set_adapter(["x", "y"])
    ours.set_adapter(["x", "y"])
    theirs, mine = _layers(reference, ours)
    theirs.merge()
    mine.merge()
    assert mine.merged_adapters == theirs.merged_adapters == ["x", "y"]
    assert torch.equal(mine.base_layer.weight, theirs.base_layer.weight)
    reference, ours = _pair(CONFIGS)
    theirs, mine = _layers(reference, ours)
    theirs.merge(True, ["y"])
    mine.merge(True, ["y"])
    assert mine.merged_adapters == theirs.merged_adapters == ["y"]
    assert torch.equal(mine.base_layer.weight, theirs.base_layer.weight)
    with pytest.raises(TypeError, match="adapter_names"):  # peft's: a name where a list belongs
        mine.merge(adapter_names="x")
    assert mine.merged_adapters == ["y"]


def test_a_layer_unmerges_every_merged_adapter_without_a_name_as_peft():
    """peft's ``layer.unmerge()`` takes every merged adapter out, the last merged first, and warns "Already unmerged.
    Nothing to do." on a layer with none; deltatune's needed a name. Now IA3's weights come back as peft's (merged: to the bit)."""
    reference, ours = _ia3_pair()
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        theirs, mine = _layers(reference, ours, path)
        before = mine.base_layer.weight.clone()
        theirs.merge()
        mine.merge()
        assert torch.equal(mine.base_layer.weight, theirs.base_layer.weight)
        theirs.unmerge()
        mine.unmerge()
        assert mine.merged_adapters == theirs.merged_adapters == []  # (peft divides by ia3_l + 1e-8: not bitwise)
        torch.testing.assert_close(mine.base_layer.weight, theirs.base_layer.weight)
        torch.testing.assert_close(mine.base_layer.weight, before)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mine.unmerge()
        assert [str(w.message) for w in caught] == ["Already unmerged. Nothing to do."]


def test_a_lora_layer_unmerges_every_merged_adapter_without_a_name_as_peft():
    """As the IA3 test, for LoRA, whose ``_LoraBase.unmerge(name)`` (methods/_lora_conv.py) still needs a name."""
    reference, ours = _pair(CONFIGS)
    reference.base_model.set_adapter(["x", "y"])
    ours.set_adapter(["x", "y"])
    theirs, mine = _layers(reference, ours)
    before = mine.base_layer.weight.clone()
    theirs.merge()
    mine.merge()
    theirs.unmerge()
    mine.unmerge()
    assert mine.merged_adapters == theirs.merged_adapters == []
    torch.testing.assert_close(mine.base_layer.weight, theirs.base_layer.weight)
    torch.testing.assert_close(mine.base_layer.weight, before)


def test_no_adapter_parameter_trains_inside_disable_adapter_as_peft():
    """peft's ``disable_adapter()`` block freezes every adapter parameter (a head's copies too): inside it
    ``get_model_status`` says trainable_params 0 and requires_grad False for each adapter. deltatune's kept the
    active adapter's trainable (5,632 parameters). After the block each flag is as before (peft's makes the active
    ones trainable, whatever they were: deltatune keeps an inference-mode freeze)."""
    reference, ours = _pair(CONFIGS)
    for model in (reference, ours):
        model.set_adapter("x")
    before = {k: p.requires_grad for k, p in ours.named_parameters()}
    with reference.disable_adapter(), ours.disable_adapter():
        theirs, mine = peft.get_model_status(reference), dt.get_model_status(ours)
        assert (mine.trainable_params, mine.requires_grad) == (theirs.trainable_params, theirs.requires_grad)
        assert mine.requires_grad == {"x": False, "y": False}
        layers = {s.name: s.requires_grad for s in peft.get_layer_status(reference)}
        assert {s.name: s.requires_grad for s in dt.get_layer_status(ours)} == layers
    assert {k: p.requires_grad for k, p in ours.named_parameters()} == before
    assert dt.get_model_status(ours).requires_grad == peft.get_model_status(reference).requires_grad
