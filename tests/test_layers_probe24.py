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
Review of 1-3: DeltaModel.delete_adapter warned once per layer (rollbacks and a server's unload too), naming a layer's
choice the model then overrode; the model's status and merge_adapter() ignored a layer's own set_adapter; a head's
active_adapter and set_adapter of an unknown copy, enable_adapters(False)'s dropout mode and a token layer's unnamed
merge() message differed from peft's. Second review: a layer's enable_adapters(True) dropped the names it does not
hold, merge_and_unload() switched a head off its own active copy, delete_adapter took its choice from LoRA's
trainable_token_indices wrapper (no tuner layer in peft). Tests of peft 0.22's behaviour are gated on PEFT_022 (peft
0.21.2 is allowed).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import tiny_inputs, tiny_model
from torch import nn

import deltatune as dt

peft = pytest.importorskip("peft")
PEFT_022 = tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22)


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.conv, self.head = nn.Linear(8, 8), nn.Conv2d(3, 4, 3), nn.Linear(8, 3)
        self.mha = nn.MultiheadAttention(8, 2)


def _pair(make, names=("a", "b"), **kw):
    """The same model in peft and deltatune with LoRA adapters ``names`` (the first active), drawn alike."""
    theirs, ours = _models(make, names, **kw)
    return theirs.base_model.model, ours.base_model


def _models(make, names=("a", "b"), **kw):
    """``_pair``'s two models (peft's PeftModel, deltatune's DeltaModel)."""
    kw = dict(target_modules=["lin", "conv", "mha"], r=2, lora_alpha=4, init_lora_weights=False, **kw)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw), adapter_name=names[0])
    for n in names[1:]:
        theirs.add_adapter(n, peft.LoraConfig(**kw))
    torch.manual_seed(0)
    ours = dt.get_delta_model(make(), dt.LoraConfig(**kw), adapter_name=names[0])
    for n in names[1:]:
        ours.add_adapter(n, dt.LoraConfig(**kw))
    return theirs, ours


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


@pytest.mark.skipif(not PEFT_022, reason="peft 0.21's set_adapter(inference_mode=True) leaves the dropout training")
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
        if name == "mha" and not PEFT_022:  # (peft 0.21's enable_adapters(False) leaves its nested out_proj on)
            continue
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


def _warnings(f) -> list[str]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f()
    return [str(w.message) for w in got if "was active" in str(w.message)]


def _held(kw, make, cfg, **extra):
    """a on lin and conv, b on conv, c on lin (the reviewer's s4), a active."""
    model = make(_Two(), cfg(target_modules=["lin", "conv"], **kw), adapter_name="a", **extra)
    model.add_adapter("b", cfg(target_modules=["conv"], **kw))
    model.add_adapter("c", cfg(target_modules=["lin"], **kw))
    return model


def _layer_actives(model) -> dict[str, list[str]]:
    return {s.name: s.active_adapters for s in model.get_layer_status() if s.name.endswith(("lin", "conv"))}


def test_model_delete_adapter_warns_once_naming_peft_s_choice_and_sets_peft_s_layers():
    """(583a515: one warning per layer, naming a layer's choice the model then overrode: lin ended with none active.)
    peft's model takes its first layer's choice (c), each layer keeps its own (conv: b); one warning, peft's words."""
    kw = dict(r=2, init_lora_weights=False)
    torch.manual_seed(0)
    t = _held(kw, peft.get_peft_model, peft.LoraConfig)
    torch.manual_seed(0)
    o = _held(kw, dt.get_delta_model, dt.LoraConfig)
    said = _warnings(lambda: t.delete_adapter("a"))
    got = _warnings(lambda: o.delete_adapter("a"))
    assert got == ["Adapter a was active which is now deleted. Setting active adapter to c."] and got[0] in said
    assert o.active_adapters == t.active_adapters == ["c"]
    assert _layer_actives(o) == _layer_actives(t) == {"model.lin": ["c"], "model.conv": ["b"]}
    tm, om = t.base_model.model, o.base_model
    for name, args in _inputs().items():
        if name != "mha":
            assert torch.allclose(_out(om.get_submodule(name), args), _out(tm.get_submodule(name), args)), name
    assert _grads(om.lin) == _grads(tm.lin) and _grads(om.conv) == _grads(tm.conv)


def test_deltatune_s_own_deletes_are_quiet():
    """A rollback (diffusion.load_loras) or a server's unload deletes inside quiet_deletes: no warning at all (583a515
    warned once per layer; diffusion.py and serve/engine.py wrap their deletes in it)."""
    from deltatune.layer import quiet_deletes

    model = _held(dict(r=2), dt.get_delta_model, dt.LoraConfig)
    with quiet_deletes():
        assert _warnings(lambda: model.delete_adapter("a")) == []
    assert model.active_adapters == ["c"]


def test_a_layer_s_set_adapter_is_seen_by_the_status_and_merges_as_peft_s():
    """(The status reported the model's list on every layer and merge_adapter() merged the model's active adapters:
    lin merged a, not the b it computed with, and the output changed.) As peft: each layer's own list, and merged."""
    tm, om = _models(_Two)
    t, o = tm.base_model.model.lin, om.base_model.lin
    t.set_adapter("b"), o.set_adapter("b")
    assert _layer_actives(om) == _layer_actives(tm) == {"model.lin": ["b"], "model.conv": ["a"]}
    assert om.get_model_status().active_adapters == tm.get_model_status().active_adapters == "irregular"
    x = torch.randn(2, 8)
    before = o(x)
    tm.merge_adapter(), om.merge_adapter()
    assert o.merged_adapters == t.merged_adapters == ["b"] and om.base_model.conv.merged_adapters == ["a"]
    assert torch.allclose(o(x), before, atol=1e-5) and torch.allclose(o(x), t(x), atol=1e-5)


def test_a_head_s_layer_api_is_peft_s_wrapper_s():
    """(ModulesToSave.active_adapter was a list, and set_adapter of a name it has no copy of left none active.) peft's
    ModulesToSaveWrapper: the active copy's name, and ValueError naming the copies."""
    kw = dict(target_modules=["lin"], modules_to_save=["head"])
    theirs = peft.get_peft_model(_Two(), peft.LoraConfig(**kw), adapter_name="a").base_model.model.head
    ours = dt.get_delta_model(_Two(), dt.LoraConfig(**kw), adapter_name="a").base_model.head
    assert ours.active_adapter == theirs.active_adapter == "a"
    for head in (theirs, ours):
        with pytest.raises(ValueError, match=r"^Adapter zzz not found in \{'a'\}$"):
            head.set_adapter("zzz")
    assert ours.active_adapters == theirs.active_adapters == ["a"]


def test_enable_adapters_false_leaves_the_dropout_modes_as_peft_s():
    """(583a515's enable_adapters(False) put the adapters' dropout in eval mode.) peft's only freezes them."""
    theirs, ours = _pair(_Two, lora_dropout=0.1)
    for layer in (theirs.lin, ours.lin):
        layer.train()
        layer.enable_adapters(False)
    assert ours.lin.lora_dropout["a"].training is theirs.lin.lora_dropout["a"].training is True
    assert _grads(ours.lin) == _grads(theirs.lin)


def test_a_token_layer_s_merge_without_a_name_names_its_active_adapter():
    """(c82ecb6: "token adapter None adds virtual tokens".) The layer's active adapter, as a named merge says."""
    model = dt.get_delta_model(tiny_model("llama"), dt.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    layer = next(layer for _, layer in model._layers())
    with pytest.raises(TypeError) as named:
        layer.merge("default")
    with pytest.raises(TypeError) as unnamed:
        layer.merge()
    assert str(unnamed.value) == str(named.value) and "'default'" in str(named.value)


def test_deleting_the_active_prompt_learning_adapter_picks_the_first_added_as_peft():
    """(deltatune took the first remaining by name.) peft's prompt learning takes the first left in the order added."""
    kw = dict(num_virtual_tokens=2, task_type="CAUSAL_LM")
    got = []
    for make, cfg in ((peft.get_peft_model, peft.PromptTuningConfig), (dt.get_delta_model, dt.PromptTuningConfig)):
        model = make(tiny_model("llama"), cfg(**kw), adapter_name="c")
        model.add_adapter("b", cfg(**kw))
        model.add_adapter("a", cfg(**kw))
        got.append((_warnings(lambda m=model: m.delete_adapter("c")), model.active_adapters))
    assert got[1] == got[0] == (["Adapter c was active which is now deleted. Setting active adapter to b."], ["b"])


# -- second review: enable_adapters(True), merge_and_unload() and a head, delete_adapter's choice with token rows --
KW = dict(r=2, init_lora_weights=False)


def _twins(task: str, targets: list[list[str]], **kw):
    """peft's and deltatune's model with adapters a, b, ... on ``targets``, the same weights; head copies re-drawn per
    adapter name (the same in both)."""
    out = []
    for lib, make in ((peft, peft.get_peft_model), (dt, dt.get_delta_model)):
        torch.manual_seed(0)
        model = make(
            tiny_model("llama", task), lib.LoraConfig(target_modules=targets[0], **KW, **kw), adapter_name="a"
        )
        for name, target in zip("bcd", targets[1:]):
            model.add_adapter(name, lib.LoraConfig(target_modules=target, **KW, **kw))
        for n, p in model.named_parameters():
            if "modules_to_save." in n:
                torch.manual_seed(ord(n.split("modules_to_save.")[1][0]))
                torch.nn.init.normal_(p)
        out.append(model)
    return out


def _layer(model, suffix: str):
    return next(m for n, m in model.named_modules() if n.endswith(suffix) and hasattr(m, "enable_adapters"))


def test_enable_adapters_again_keeps_names_the_layer_does_not_hold():
    pm, dm = _twins("causal_lm", [["q_proj"], ["v_proj"]])
    pm.base_model.set_adapter(["a", "b"])
    dm.set_adapter(["a", "b"])
    for model in (pm, dm):
        lin = _layer(model, "layers.0.self_attn.q_proj")  # holds a only
        lin.enable_adapters(False)
        lin.enable_adapters(True)
    assert dm.get_model_status().active_adapters == pm.get_model_status().active_adapters == ["a", "b"]
    assert dm.get_model_status().enabled == pm.get_model_status().enabled is True


def test_merge_and_unload_keeps_a_heads_own_active_copy():
    x = tiny_inputs("llama", "seq_cls")
    outs = []
    for model in _twins("seq_cls", [["q_proj"], ["q_proj"]], task_type="SEQ_CLS"):
        model.eval()
        _layer(model, "score").set_adapter("b")  # the head's own choice; the model's active adapter stays a
        before = model(**x).logits
        outs.append((before, model.merge_and_unload()(**x).logits))
    (p_before, p_after), (d_before, d_after) = outs
    torch.testing.assert_close(d_before, p_before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_after, p_before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d_after, p_after, atol=1e-5, rtol=1e-5)


def test_delete_takes_the_first_adapter_layers_choice_not_the_token_wrappers():
    tokens = dict(task_type="SEQ_CLS", trainable_token_indices={"embed_tokens": [3]})
    x = tiny_inputs("llama", "seq_cls")
    outs = []
    for model in _twins("seq_cls", [["q_proj", "v_proj"], ["v_proj"], ["q_proj"]], **tokens):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.delete_adapter("a")
        model.eval()
        outs.append((model.active_adapters, model(**x).logits))
    (p_active, p_logits), (d_active, d_logits) = outs
    assert d_active == p_active == ["c"]
    torch.testing.assert_close(d_logits, p_logits, atol=1e-5, rtol=1e-5)


def test_a_failed_load_loras_and_a_server_s_unload_say_nothing(tmp_path):
    """The callers of quiet_deletes, not the block alone: diffusion.load_loras rolling back its first (active) LoRA
    when a later path is missing, and serve's Engine unloading the active adapter, give no 'was active' warning."""
    from types import SimpleNamespace

    from deltatune.diffusion import load_loras
    from deltatune.serve.engine import Engine

    torch.manual_seed(0)
    saved = dt.get_delta_model(tiny_model("llama", "causal_lm"), dt.LoraConfig(target_modules=["q_proj"], **KW))
    saved.save_pretrained(tmp_path / "a")
    model = tiny_model("llama", "causal_lm")
    paths, raised = [tmp_path / "a", tmp_path / "a", tmp_path / "missing"], None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            load_loras(model, paths)
        except Exception as e:
            raised = e
    assert raised is not None and "missing" in str(raised), raised
    assert not [str(w.message) for w in seen if "was active" in str(w.message)]
    served = dt.get_delta_model(tiny_model("llama", "causal_lm"), dt.LoraConfig(target_modules=["q_proj"], **KW))
    served.add_adapter("b", dt.LoraConfig(target_modules=["q_proj"], **KW))
    engine = Engine(served, SimpleNamespace(pad_token_id=0, eos_token_id=1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        engine.unload_adapter("default")
    assert not [str(w.message) for w in seen if "was active" in str(w.message)]
    assert list(served.peft_config) == ["b"] and served.active_adapters == ["b"]
