"""LoRA config values against peft 0.21.2 (session 52, probe 17).

1. peft compares "gaussian", "olora" and "mica" lower-cased, so ``init_lora_weights="OLoRA"`` or "Gaussian" draws
   there; deltatune refused them.
2. ``init_lora_weights=0``: peft's truthiness test draws it as False (B random), deltatune's ``is False`` drew it as
   True (B zero); 1 fails in peft (AttributeError: 'int' object has no attribute 'lower'). Now a number is refused in
   one line, as any value that is not a bool or a name.
3. A rank_pattern / alpha_pattern key that is not a string: re's TypeError, naming no field; now one line.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.methods import _lora_init as inits

peft = pytest.importorskip("peft")


def _tensors(model, prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix).replace(".default", ""): v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("init", ["OLoRA", "Gaussian", "GAUSSIAN"])
def test_peft_s_any_case_init_names_draw_as_peft(init, tmp_path):
    kw = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, init_lora_weights=init)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama", tie_word_embeddings=False), peft.LoraConfig(**kw))
    torch.manual_seed(0)
    ours = dt.get_delta_model(tiny_model("llama", tie_word_embeddings=False), dt.LoraConfig(**kw))
    a, b = _tensors(ours, "base_model."), _tensors(theirs, "base_model.model.")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # A, B and (OLoRA) the residual base weights
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)
    # peft's own file (its config as given) loads here as it computes there; ours loads in peft
    theirs.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "theirs/adapter_config.json").read_text())["init_lora_weights"] == init
    loaded = dt.DeltaModel.from_pretrained(tiny_model("llama", tie_word_embeddings=False), tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, theirs(**inputs).logits)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_model("llama", tie_word_embeddings=False), tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, theirs(**inputs).logits)


@pytest.mark.parametrize("init", [0, 1, 1.0])
def test_an_init_that_is_a_number_is_one_line_and_changes_nothing(init):
    config = peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=init)
    if init:  # peft: 1 is not True, so it calls 1 .lower()
        with pytest.raises(AttributeError, match="has no attribute 'lower'"):
            peft.get_peft_model(tiny_model("llama"), config)
    else:  # peft: 0 draws as False (B random); deltatune drew it as True (B zero)
        theirs = peft.get_peft_model(tiny_model("llama"), config)
        assert theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().max() > 0
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"^init_lora_weights must be True, False, .* got {init}$"):
        dt.get_delta_model(model, dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=init))
    assert not any(hasattr(m, "adapter_names") for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("attr", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_key_that_is_not_a_string_is_one_line(attr):
    with pytest.raises(ConfigError, match=rf"^{attr} keys must be module name patterns \(strings\), got 3$"):
        dt.LoraConfig(target_modules=["q_proj"], **{attr: {"v_proj": 2, 3: 2}})


def test_the_saved_file_of_an_any_case_init_is_peft_s(tmp_path):
    """The file says "olora" (peft reads it as its "OLoRA") and holds peft's tensors."""
    kw = dict(target_modules=["q_proj"], r=2, init_lora_weights="OLoRA")
    torch.manual_seed(0)
    peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**kw)).save_pretrained(tmp_path / "theirs")
    torch.manual_seed(0)
    dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**kw)).save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours/adapter_config.json").read_text())["init_lora_weights"] == "olora"
    a, b = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("ours", "theirs"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_1", "olora"])
def test_a_base_computed_init_on_a_non_finite_weight_is_one_line_and_changes_nothing(init):
    """peft: PiSSA's SVD raises torch's LinAlgError with the earlier layers' weights already made residuals; OLoRA goes
    on with NaN factors (and a NaN residual over the whole weight). deltatune raised torch's error too, its earlier
    layers' weights left as residuals."""

    def broken():
        model = tiny_model("llama")
        with torch.no_grad():
            model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
        return model

    kw = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=init, r=2)
    theirs = broken()
    if init.startswith("pissa"):
        with pytest.raises(torch.linalg.LinAlgError, match="non-finite"):
            peft.get_peft_model(theirs, peft.LoraConfig(**kw))
    else:
        adapted = peft.get_peft_model(theirs, peft.LoraConfig(**kw))
        assert adapted.base_model.model.model.layers[1].self_attn.v_proj.base_layer.weight.isnan().all()
    model = broken()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"^lora: init_lora_weights='{init}' on model.layers.1.self_attn.v_proj: "
                                          "its base weight holds NaN or inf values"):  # fmt: skip
        dt.get_delta_model(model, dt.LoraConfig(**kw))
    assert not any(hasattr(m, "adapter_names") for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


@pytest.mark.parametrize("tokens", [[500], {"nowhere": [1]}])
def test_a_residual_init_refused_by_its_trainable_tokens_leaves_the_base_as_it_was(tokens):
    """PiSSA wrote the residual into the base, then trainable_token_indices was refused (after the LoRA layers went
    in): the layers came out, the residual weights stayed."""
    model = tiny_model("llama", tie_word_embeddings=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="^trainable_token_indices"):
        dt.get_delta_model(model, dt.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa", r=2,
                                                trainable_token_indices=tokens))  # fmt: skip
    after = model.state_dict()
    assert after.keys() == before.keys() and [k for k in before if not torch.equal(before[k], after[k])] == []


def test_a_residual_init_with_trainable_tokens_is_peft_s_and_keeps_no_copy_of_the_base():
    kw = dict(target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", r=2, trainable_token_indices=[3, 5])
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama", tie_word_embeddings=False), peft.LoraConfig(**kw))
    torch.manual_seed(0)
    ours = dt.get_delta_model(tiny_model("llama", tie_word_embeddings=False), dt.LoraConfig(**kw))
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)
    layers = [m for m in ours.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert len(layers) == 4 and not any(m.__dict__.get("_pre_init") for m in layers)  # (the originals dropped)


def test_a_loftq_config_without_the_loftq_init_warns_as_peft():
    said = "`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'."
    kw = dict(target_modules=["q_proj"], loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.warns(UserWarning, match=said):
        peft.LoraConfig(**kw)
    with pytest.warns(UserWarning, match=said):
        config = dt.LoraConfig(**kw)
    assert config.init_lora_weights is True and config.loftq_config == {}  # saved as peft's: {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.LoraConfig(target_modules=["q_proj"])  # the default {} says nothing


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_rslora_with_patterns_on_a_residual_init_warns_up_front_as_peft(init, tmp_path):
    """peft warns when the config is made; deltatune said nothing until convert_to_plain_lora refused, after training."""
    said = "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion"
    kw = dict(target_modules=["q_proj"], init_lora_weights=init, use_rslora=True, rank_pattern={"q_proj": 2}, r=4)
    with pytest.warns(UserWarning, match=said):
        peft.LoraConfig(**kw)
    with pytest.warns(UserWarning, match=said):
        config = dt.LoraConfig(**kw)
    model = dt.get_delta_model(tiny_model("llama"), config)
    with pytest.raises(ConfigError, match="not supported with rank_pattern or alpha_pattern together with use_rslora"):
        model.convert_to_plain_lora({}, tmp_path)
    for quiet in (dict(kw, use_rslora=False), dict(kw, rank_pattern={}), dict(kw, init_lora_weights=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dt.LoraConfig(**quiet)


def _bias_adapter(path, seed: int):
    """A LoRA adapter with bias='all' whose trained base biases differ from the base's, saved to ``path``."""
    model = dt.get_delta_model(tiny_model("opt"), dt.LoraConfig(target_modules=["q_proj"], bias="all"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.add_(torch.randn_like(p))
    model.save_pretrained(path)


def test_a_second_adapter_with_bias_is_refused_as_peft(tmp_path):
    """The base biases are one set: loading a second bias='all' adapter overwrote the first's trained biases (its
    logits 0.51 off what it computed alone); peft refuses the second adapter."""
    _bias_adapter(tmp_path / "a", 1)
    _bias_adapter(tmp_path / "b", 2)
    theirs = peft.PeftModel.from_pretrained(tiny_model("opt"), tmp_path / "a", adapter_name="a")
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        theirs.load_adapter(tmp_path / "b", "b")
    ours = dt.DeltaModel.from_pretrained(tiny_model("opt"), tmp_path / "a", adapter_name="a")
    inputs = tiny_inputs("opt")
    with torch.no_grad():
        want = ours(**inputs).logits
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        ours.load_adapter(tmp_path / "b", "b")
    assert list(ours.peft_config) == ["a"]
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, want)
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        ours.add_adapter("c", dt.LoraConfig(target_modules=["v_proj"], bias="lora_only"))
    ours.add_adapter("d", dt.LoraConfig(target_modules=["v_proj"]))  # bias 'none' beside it: as peft


def test_the_refusal_of_an_unknown_init_lists_every_init_drawn():
    """'orthogonal' is drawn (as peft's) but the refusal's list left it out."""
    with pytest.raises(ConfigError) as caught:
        dt.LoraConfig(target_modules=["q_proj"], init_lora_weights="kaiming")
    said = str(caught.value)
    assert all(repr(i) in said for i in ("gaussian", "orthogonal", "pissa", "pissa_niter_K", "olora", "loftq")), said
    for init in ("gaussian", "orthogonal", "pissa", "pissa_niter_4", "olora"):  # each one the list names is taken
        dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=init, r=4)


def test_a_residual_init_with_tokens_checks_the_tokens_first_and_keeps_no_original(monkeypatch):
    """The token ids were checked after the LoRA layers went in, so every PiSSA layer kept its original weight beside
    the residual until then (a second copy of each targeted weight, which peft never holds)."""
    seen = []
    real = inits.init_from_base

    def spy(layer, name, init):
        seen.append(layer.__dict__.get("_keep_base", False))
        real(layer, name, init)
        seen.append(bool(layer.__dict__.get("_pre_init")))

    monkeypatch.setattr(inits, "init_from_base", spy)
    kw = dict(target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", r=2, trainable_token_indices=[3, 5])
    model = dt.get_delta_model(tiny_model("llama", tie_word_embeddings=False), dt.LoraConfig(**kw))
    assert seen == [False] * 8  # 4 layers: none asked to keep its base, none kept it
    assert not any(m.__dict__.get("_pre_init") for m in model.modules())


@pytest.mark.parametrize("init", [True, "pissa"])
def test_no_layer_is_left_with_the_keep_base_flag(init):
    """inject set ``_keep_base`` on every layer; only PiSSA / OLoRA / LoftQ's init took it off."""
    kw = dict(target_modules=["q_proj", "embed_tokens"], init_lora_weights=init, r=2)
    model = dt.get_delta_model(tiny_model("llama", tie_word_embeddings=False), dt.LoraConfig(**kw))
    assert [n for n, m in model.named_modules() if "_keep_base" in m.__dict__] == []


def test_tokens_on_a_lora_target_are_refused_before_any_residual_is_written():
    """trainable_token_indices on the embedding LoRA adapts too: peft refuses it; the refusal now comes before the
    PiSSA residuals are written, and the base is exact."""
    kw = dict(target_modules=["q_proj", "embed_tokens"], init_lora_weights="pissa", r=2, trainable_token_indices=[3])
    model = tiny_model("llama", tie_word_embeddings=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="^trainable_token_indices cannot be applied to model.embed_tokens, already "
                                          "adapted by LoraEmbedding$"):  # fmt: skip
        dt.get_delta_model(model, dt.LoraConfig(**kw))
    after = model.state_dict()
    assert after.keys() == before.keys() and [k for k in before if not torch.equal(before[k], after[k])] == []
    assert not any(hasattr(m, "adapter_names") for m in model.modules())


def _said(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in said if "Rank-Stabilized" in str(w.message)], said


def test_the_rslora_pattern_warning_is_said_once_per_config_made_as_peft(tmp_path):
    """peft: 1 warning when the config is made, none at get_peft_model, 1 at from_pretrained (the config read);
    deltatune said it again at every config.replace (1 / 1 / 5, pointing at dataclasses.py)."""
    kw = dict(target_modules=["q_proj"], init_lora_weights="pissa", use_rslora=True, rank_pattern={"q_proj": 2}, r=4)
    counts = {}
    for lib, make, wrap, load in (
        ("peft", peft.LoraConfig, peft.get_peft_model, peft.PeftModel.from_pretrained),
        ("dt", dt.LoraConfig, dt.get_delta_model, dt.DeltaModel.from_pretrained),
    ):
        config, made, _ = _said(make, **kw)
        model, wrapped, _ = _said(wrap, tiny_model("llama"), config)
        model.save_pretrained(tmp_path / lib)
        _, loaded, said = _said(load, tiny_model("llama"), tmp_path / lib)
        counts[lib] = (len(made), len(wrapped), len(loaded))
        assert not any(w.filename.endswith("dataclasses.py") for w in said if "Rank-Stabilized" in str(w.message))
    assert counts["dt"] == counts["peft"] == (1, 0, 1)
    plain = dt.LoraConfig(**dict(kw, rank_pattern={}))
    assert len(_said(plain.replace, rank_pattern={"q_proj": 2})[1]) == 1  # a change that brings it: said


@pytest.mark.parametrize("init", [0, 1])
def test_a_saved_init_that_is_a_number_loads_with_one_warning(init, tmp_path):
    """deltatune before e78def7 saved init_lora_weights 0 or 1 as given, and peft saves 0 as given (1 fails there at
    get_peft_model); such files were refused at load. The weights come from the file: the number is read as a bool."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"], r=2))
    theirs.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(data, init_lora_weights=init)))
    if not init:  # peft loads its own 0
        peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    with pytest.warns(UserWarning, match=rf"init_lora_weights={init} .* read as {bool(init)}$") as said:
        ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert len([w for w in said if "init_lora_weights" in str(w.message)]) == 1
    assert ours.peft_config["default"].init_lora_weights is bool(init)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)
    with pytest.raises(ConfigError, match=rf"got {init}$"):  # made by a user: still refused
        dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=init)
