"""The adapter layer API and LoRA's layers against peft 0.21.2 / 0.22.0 (session 59, probe 24).

1. peft's layer-level ``BaseTunerLayer`` API was missing on deltatune's layers: ``get_base_layer()``,
   ``set_adapter(adapter_names, inference_mode)``, ``enable_adapters(enabled)``, ``disable_adapters`` and
   ``active_adapter`` (AttributeError). Now each is there with peft's effects on outputs, ``requires_grad`` and the
   adapters' dropout modes (ModulesToSave: one copy at a time, as peft's wrapper).
2. A layer's ``delete_adapter`` of its only active adapter left none active; peft's picks the first remaining one by
   name, with its warning.
3. ``ModulesToSave.merge()`` / ``unmerge()`` needed a name where every other layer's take none (peft's signature).
4. fan_in_fan_out corrected silently: peft warns (its words) when a GPT-2 Conv1D is targeted with fan_in_fan_out
   False, or an nn.Linear with it True.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import tiny_model
from torch import nn

import deltatune as dt

peft = pytest.importorskip("peft")


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.conv, self.head = nn.Linear(8, 8), nn.Conv2d(3, 4, 3), nn.Linear(8, 3)
        self.mha = nn.MultiheadAttention(8, 2)


def _pair(make, names=("a", "b"), **kw):
    """The same model in peft and deltatune with LoRA adapters ``names`` (the first active), drawn alike."""
    kw = dict(target_modules=["lin", "conv", "mha"], r=2, lora_alpha=4, init_lora_weights=False, **kw)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw), adapter_name=names[0])
    for n in names[1:]:
        theirs.add_adapter(n, peft.LoraConfig(**kw))
    torch.manual_seed(0)
    ours = dt.get_delta_model(make(), dt.LoraConfig(**kw), adapter_name=names[0])
    for n in names[1:]:
        ours.add_adapter(n, dt.LoraConfig(**kw))
    return theirs.base_model.model, ours.base_model


def _grads(layer: nn.Module) -> dict[str, bool]:
    """Each adapter parameter's requires_grad, peft's MultiheadAttention's out_proj update named as deltatune's."""
    return {k: p.requires_grad for k, p in layer.named_parameters() if k.startswith("lora_")}


def _mha_follows(layer: nn.Module) -> None:
    """deltatune's MultiheadAttention switches its out_proj update with its in_proj one (peft's leaves the nested
    out_proj layer as it was: its outputs are not compared, huggingface/peft#3774)."""
    grads = {k: p.requires_grad for k, p in layer.named_parameters()}
    assert all(grads[f"out_{k}"] == flag for k, flag in grads.items() if k.startswith("lora_")), grads


def _inputs():
    torch.manual_seed(1)
    return {"lin": (torch.randn(2, 8),), "conv": (torch.randn(1, 3, 6, 6),), "mha": (torch.randn(3, 2, 8),) * 3}


def _out(layer, args):
    out = layer(*args)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("inference_mode", [False, True])
def test_layer_set_adapter_is_peft_s(inference_mode):
    theirs, ours = _pair(_Two)
    for name, args in _inputs().items():
        t, o = theirs.get_submodule(name), ours.get_submodule(name)
        t.set_adapter("b", inference_mode=inference_mode)
        o.set_adapter("b", inference_mode=inference_mode)
        assert o.active_adapters == t.active_adapters == ["b"] and o.active_adapter == t.active_adapter, name
        assert _grads(o) == _grads(t), name
        assert name == "mha" or torch.allclose(_out(o, args), _out(t, args), atol=1e-6), name
        t.set_adapter(["a", "b"]), o.set_adapter(["a", "b"])
        assert _grads(o) == _grads(t), name
        assert name == "mha" or torch.allclose(_out(o, args), _out(t, args), atol=1e-6), name
    _mha_follows(ours.mha)


def test_layer_set_adapter_sets_the_dropout_mode_as_peft_s():
    theirs, ours = _pair(_Two, lora_dropout=0.1)
    for layer in (theirs.lin, ours.lin):
        layer.train()
        layer.set_adapter("b", inference_mode=True)
    assert ours.lin.lora_dropout["b"].training is theirs.lin.lora_dropout["b"].training is False


def test_layer_enable_adapters_and_get_base_layer_are_peft_s():
    theirs, ours = _pair(_Two)
    for name, args in _inputs().items():
        t, o = theirs.get_submodule(name), ours.get_submodule(name)
        assert type(o.get_base_layer()) is type(t.get_base_layer()) and o.get_base_layer() is o.base_layer
        t.enable_adapters(False), o.enable_adapters(False)
        assert o.disable_adapters is t.disable_adapters is True and _grads(o) == _grads(t), name
        assert torch.allclose(_out(o, args), _out(t, args), atol=1e-6), name
        assert torch.allclose(_out(o, args), _out(o.base_layer, args)), name
        t.enable_adapters(True), o.enable_adapters(True)
        assert o.disable_adapters is t.disable_adapters is False and _grads(o) == _grads(t), name
        assert torch.allclose(_out(o, args), _out(t, args), atol=1e-6), name
    _mha_follows(ours.mha)


def test_layer_delete_adapter_of_the_active_one_picks_peft_s():
    theirs, ours = _pair(_Two, names=("b", "a", "c"))
    t, o = theirs.lin, ours.lin
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        t.delete_adapter("b")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        o.delete_adapter("b")
    assert o.active_adapters == t.active_adapters == ["a"]
    assert [str(w.message) for w in got] == [str(w.message) for w in said]
    assert _grads(o) == _grads(t)
    x = torch.randn(2, 8)
    assert torch.allclose(o(x), t(x), atol=1e-6)


def test_modules_to_save_merge_and_unmerge_take_no_name_as_every_layer():
    torch.manual_seed(0)
    model = dt.get_delta_model(_Two(), dt.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
    x = torch.randn(2, 8)
    before = model.base_model.head(x)
    for _, layer in model._layers():
        layer.merge()
        layer.unmerge()
    assert torch.equal(model.base_model.head(x), before)


def _said(make, **kw) -> list[str]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        make(**kw)
    return [str(w.message) for w in got if "fan_in_fan_out" in str(w.message)]


@pytest.mark.parametrize("family,targets,flag", [("gpt2", ["c_attn"], False), ("llama", ["q_proj"], True)])
def test_fan_in_fan_out_corrected_with_peft_s_warning(family, targets, flag):
    def theirs():
        return peft.get_peft_model(tiny_model(family), peft.LoraConfig(target_modules=targets, fan_in_fan_out=flag))

    def ours():
        return dt.get_delta_model(tiny_model(family), dt.LoraConfig(target_modules=targets, fan_in_fan_out=flag))

    want = _said(theirs)
    assert want and _said(ours) == want


@pytest.mark.parametrize(
    "family,path", [("gpt2", "transformer.h.0.attn.c_attn"), ("llama", "model.layers.0.self_attn.q_proj")]
)
def test_layer_api_on_a_merged_conv1d_and_linear_is_peft_s(family, path):
    kw = dict(target_modules=[path.rpartition(".")[2]], r=2, lora_alpha=4, init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model(family), peft.LoraConfig(**kw), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**kw))
    torch.manual_seed(0)
    ours = dt.get_delta_model(tiny_model(family), dt.LoraConfig(**kw), adapter_name="a")
    ours.add_adapter("b", dt.LoraConfig(**kw))
    t, o = theirs.base_model.model.get_submodule(path), ours.base_model.get_submodule(path)
    x = torch.randn(2, 3, o.in_features)
    base = o.get_base_layer()(x)
    for layer in (t, o):
        layer.set_adapter("b")
        layer.merge()
        layer.enable_adapters(False)
    assert torch.allclose(o(x), t(x), atol=1e-6) and torch.allclose(o(x), base, atol=1e-6)
    assert o.merged is t.merged is False and _grads(o) == _grads(t)
    for layer in (t, o):
        layer.enable_adapters(True)
    assert torch.allclose(o(x), t(x), atol=1e-6) and not torch.allclose(o(x), base, atol=1e-4)
    assert _grads(o) == _grads(t) and o.active_adapters == t.active_adapters == ["b"]


def _warned(f) -> list[str]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f()
    return sorted({str(w.message) for w in got if "was active" in str(w.message)})


def test_model_delete_adapter_warns_as_peft_s_layers_do():
    """The only active adapter deleted: peft's layers' warning (deltatune's model said nothing); two active, one of them
    deleted where a layer holds only it: no warning, as peft's layers keep the name they do not hold."""
    kw = dict(target_modules=["lin", "conv"], r=2, init_lora_weights=False)
    t = peft.get_peft_model(_Two(), peft.LoraConfig(**kw), adapter_name="b")
    o = dt.get_delta_model(_Two(), dt.LoraConfig(**kw), adapter_name="b")
    for m, cfg in ((t, peft.LoraConfig), (o, dt.LoraConfig)):
        m.add_adapter("a", cfg(**kw))
    assert _warned(lambda: o.delete_adapter("b")) == _warned(lambda: t.delete_adapter("b")) != []
    assert o.active_adapters == t.active_adapters == ["a"]
    t = peft.get_peft_model(_Two(), peft.LoraConfig(**kw), adapter_name="a")
    o = dt.get_delta_model(_Two(), dt.LoraConfig(**kw), adapter_name="a")
    for m, cfg in ((t, peft.LoraConfig), (o, dt.LoraConfig)):
        m.add_adapter("b", cfg(target_modules=["head"]))
        m.add_adapter("c", cfg(**kw))
    t.base_model.set_adapter(["a", "b"]), o.set_adapter(["a", "b"])
    assert _warned(lambda: o.delete_adapter("a")) == _warned(lambda: t.delete_adapter("a")) == []
    assert o.active_adapters == t.active_adapters == ["b"]


def test_deleting_a_token_adapter_unmerges_nothing():
    """(583a515 called every layer's unmerge in delete_adapter: a token layer's refuses any name, so deleting a prompt
    tuning adapter raised NotMergeable.) As peft: the adapter goes, the first left by name active."""
    kw = dict(num_virtual_tokens=2, task_type="CAUSAL_LM")
    models = []
    for make, cfg in ((peft.get_peft_model, peft.PromptTuningConfig), (dt.get_delta_model, dt.PromptTuningConfig)):
        torch.manual_seed(0)
        model = make(tiny_model("llama"), cfg(**kw), adapter_name="b")
        model.add_adapter("a", cfg(**kw))
        model.delete_adapter("b")
        models.append(model)
    assert list(models[1].peft_config) == list(models[0].peft_config) == ["a"]
