"""Probe 17 of the smaller methods and targeting (ia3, bitfit, freeze, full, vpt, trainable tokens, targets.py)
against peft 0.21.2 and LLaMA-Factory's freeze tuning."""

from __future__ import annotations

import re

import pytest
import torch
from tiny import output_of, tiny_inputs, tiny_model
from tolerances import ATOL

import deltatune as dt

ATOL32 = ATOL[torch.float32]


def _set_vectors(model, seed: int) -> None:
    """Every (IA)^3 vector to values around 1, the same for peft's model and ours (sorted names, one generator)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def _ia3_pair(family: str, configs: dict[str, dict]):
    """peft's model and ours with the same (IA)^3 adapters and vectors."""
    peft = pytest.importorskip("peft")
    theirs = ours = None
    for name, kwargs in configs.items():
        if theirs is None:
            theirs = peft.get_peft_model(tiny_model(family), peft.IA3Config(**kwargs), adapter_name=name)
            ours = dt.get_delta_model(tiny_model(family), dt.IA3Config(**kwargs), adapter_name=name)
        else:
            theirs.add_adapter(name, peft.IA3Config(**kwargs))
            ours.add_adapter(name, dt.IA3Config(**kwargs))
    for model in (theirs, ours):
        _set_vectors(model, seed=3)
    return theirs.eval(), ours.eval()


def _mixed_as_peft(theirs, ours, family: str, names: list[str], weights: list[float]):
    """Both models' add_weighted_adapter(names, weights) made active as "mix": (inputs, peft's outputs), ours equal
    to peft's and away from the base's."""
    for model in (theirs, ours):
        model.add_weighted_adapter(names, weights, "mix")
        model.set_adapter("mix")
    inputs = tiny_inputs(family)
    ref = output_of(theirs, inputs)
    assert (ref - output_of(tiny_model(family), inputs)).abs().max() > ATOL32
    torch.testing.assert_close(output_of(ours, inputs), ref, atol=ATOL32, rtol=0)
    return inputs, ref


@pytest.mark.parametrize(
    "configs",
    [
        {  # lists: different modules, a feed-forward one shared
            "a": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "b": dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        },
        {  # regexes, joined with "|"
            "a": dict(target_modules=r".*\.(k_proj|down_proj)", feedforward_modules=r".*\.down_proj"),
            "b": dict(target_modules=r".*\.v_proj", feedforward_modules=r"^$"),
        },
    ],
)
def test_ia3_add_weighted_adapter_as_peft(configs, tmp_path):
    """peft's IA3Model.add_weighted_adapter: l_new = sum_i w_i l_i where adapter i holds the module; the config is the
    first's with the targets' and feed-forward modules' union. deltatune refused it ("combines LoRA adapters")."""
    theirs, ours = _ia3_pair("llama", configs)
    inputs, ref = _mixed_as_peft(theirs, ours, "llama", list(configs), [0.5, -2.0])
    from peft.utils import get_peft_model_state_dict

    mine = ours.adapter_state_dict("mix")
    assert set(mine) == set(get_peft_model_state_dict(theirs, adapter_name="mix"))
    targets, feedforward = theirs.peft_config["mix"].target_modules, theirs.peft_config["mix"].feedforward_modules
    same = (lambda a, b: a == b) if isinstance(targets, str) else (lambda a, b: set(a) == set(b))
    assert same(ours.peft_config["mix"].target_modules, targets)
    assert same(ours.peft_config["mix"].feedforward_modules, feedforward)
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])  # the file loads in peft with the same outputs
    loaded = pytest.importorskip("peft").PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "mix").eval()
    torch.testing.assert_close(output_of(loaded, inputs), ref, atol=ATOL32, rtol=0)


def test_ia3_add_weighted_adapter_refusals_change_nothing():
    """Bad input: one line naming the fault, no adapter added."""
    model = dt.get_delta_model(tiny_model("llama"), dt.IA3Config(), adapter_name="a")
    model.add_adapter("b", dt.IA3Config(target_modules=r".*\.k_proj", feedforward_modules=r"^$"))
    model.add_adapter("l", dt.LoraConfig(r=2, target_modules=["o_proj"]))
    cases = [
        (
            (["l", "a"], [1.0, 1.0], "n"),
            {},
            r"\(IA\)\^3 and LoRA adapters cannot be combined together \('a' is ia3, 'l' is lora\)$",
        ),
        (
            (["a", "l"], [1.0, 1.0], "n"),
            {},
            r"\(IA\)\^3 and LoRA adapters cannot be combined together \('a' is ia3, 'l' is lora\)$",
        ),
        ((["a", "b"], [1.0, 1.0], "n"), {}, "'b' gives target_modules as a regex, 'a' as a list"),
        ((["a"], [1.0, 1.0], "n"), {}, "1 adapters and 2 weights"),
        ((["a"], [1.0], "b"), {}, "an adapter named 'b' exists already"),
        ((["a"], [1.0], "n"), {"combination_type": "cat"}, "combine linearly"),
        ((["a", "zz"], [1.0, 1.0], "n"), {}, "unknown adapter 'zz'"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            model.add_weighted_adapter(*args, **kwargs)
        assert set(model.peft_config) == {"a", "b", "l"}
    model.add_weighted_adapter(["l"], [1.0], "l2", combination_type="linear")  # LoRA's still reach LoRA's combine
    assert model.peft_config["l2"].method == "lora"


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(freeze_extra_modules=[1]), r"^freeze_extra_modules must be a list of module names, got \[1\]$"),
        (dict(freeze_extra_modules=5), r"^freeze_extra_modules must be a list of module names, got 5$"),
        (dict(freeze_trainable_modules=[1]), r"^freeze_trainable_modules must be .* list of module names, got \[1\]$"),
        (dict(freeze_trainable_modules=5), r"^freeze_trainable_modules must be .* list of module names, got 5$"),
        (dict(freeze_trainable_modules=["mlp", None]), r"^freeze_trainable_modules must be .*, got \['mlp', None\]$"),
    ],
)
def test_freeze_module_lists_of_non_names_are_one_line(config, match):
    """A number where LLaMA-Factory's module names go: was a TypeError from inside re (``decoding to str``) or from
    freeze.py (``unsupported operand type(s) for +: 'int' and 'str'``, ``'int' object is not iterable``)."""
    with pytest.raises(dt.ConfigError, match=match):
        dt.FreezeConfig(**config)
    assert dt.FreezeConfig(freeze_extra_modules=[]).freeze_extra_modules == []  # nothing extra, as None


def test_a_layers_pattern_naming_no_block_list_is_named_in_the_refusal():
    """layers_pattern="nope" leaves nothing to adapt; the one line named target_modules and layers_to_transform only,
    not the key at fault. peft adapts nothing either (its layer index is None for every module)."""
    base = tiny_model("llama")
    with pytest.raises(dt.ConfigError, match=r"layers_to_transform=\[1\] and layers_pattern='nope' matches no module"):
        dt.get_delta_model(base, dt.LoraConfig(layers_to_transform=[1], layers_pattern="nope"))
    assert not any("lora" in n for n, _ in base.named_modules())


def test_freeze_extra_modules_naming_a_tied_lm_head_says_what_it_is_tied_to():
    """On a model with tied embeddings, lm_head's weight is embed_tokens' tensor, which named_parameters lists once,
    under embed_tokens. LLaMA-Factory refuses lm_head there too ("Module lm_head is not found"); the line said "not a
    module outside the blocks; those modules: embed_tokens, norm", as if lm_head did not exist."""
    model = dt.DeltaModel(tiny_model("llama", tie_word_embeddings=True))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(dt.ConfigError, match=r"'lm_head' holds lm_head.weight, which is tied to model.embed_tokens"
                                             r".weight \(the same tensor\); name 'embed_tokens' to train it$"):  # fmt: skip
        model.add_adapter("default", dt.FreezeConfig(freeze_extra_modules=["lm_head"]))
    assert not model.peft_config and {n: p.requires_grad for n, p in model.named_parameters()} == grads
    untied = dt.get_delta_model(tiny_model("llama"), dt.FreezeConfig(freeze_extra_modules=["lm_head"]))
    assert "lm_head.weight" in untied.peft_config["default"].trainable_base_parameters(untied.base_model)


def test_ia3_feedforward_outside_the_default_targets_is_refused_before_training_not_at_save(tmp_path):
    """feedforward_modules=["up_proj"] with the default targets (Llama: k_proj, v_proj, down_proj): peft adapts and
    saves a config its own IA3Config refuses on load ("should be a subset of target_modules"); deltatune adapted it
    and refused only at save_pretrained, after the training. Now the add is refused and nothing changes."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_model("llama"), peft.IA3Config(feedforward_modules=["up_proj"]))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="subset of `target_modules`"):
        peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    model = dt.DeltaModel(tiny_model("llama"))
    config = dt.IA3Config(feedforward_modules=["up_proj"])
    with pytest.raises(dt.ConfigError, match=r"^ia3: feedforward_modules must be a subset of target_modules, but "
                                             r"\['up_proj'\] are not in this model's default target_modules"):  # fmt: skip
        model.add_adapter("default", config)
    assert not model.peft_config and config.target_modules is None
    assert not any("ia3" in n for n, _ in model.named_parameters())
    ok = dt.get_delta_model(
        tiny_model("llama"), dt.IA3Config(feedforward_modules=["down_proj"])
    )  # a subset: as before
    ok.save_pretrained(tmp_path / "ok")
    assert peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ok") is not None


def test_ia3_all_linear_with_feedforward_names_saves_a_file_peft_loads(tmp_path):
    """target_modules="all-linear" with feedforward_modules=["down_proj"]: peft adapts and saves a file its own
    IA3Config refuses on load (the resolved names, and ["down_proj"] no subset of them). deltatune saved the targets as
    the full names they resolved to and kept ["down_proj"]: save_pretrained refused after the training ("must be a
    subset of target_modules"). Now the feed-forward layers are written by full name, and peft loads the file with the
    same outputs."""
    peft = pytest.importorskip("peft")
    inputs = tiny_inputs("llama")
    ours = dt.get_delta_model(
        tiny_model("llama"), dt.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"])
    ).eval()
    _set_vectors(ours, seed=4)
    ref = output_of(ours, inputs)
    ours.save_pretrained(tmp_path)
    assert ours.peft_config["default"].feedforward_modules == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert sorted(n for n, m in theirs.named_modules() if getattr(m, "is_feedforward", False)) == [
        f"base_model.model.model.layers.{i}.mlp.down_proj" for i in (0, 1)
    ]
    torch.testing.assert_close(output_of(theirs, inputs), ref, atol=ATOL32, rtol=0)
    again = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(output_of(again, inputs), ref, atol=ATOL32, rtol=0)


def test_trainable_tokens_take_numpy_ids_as_peft_does(tmp_path):
    """peft's TrainableTokensConfig takes numpy integers (np.where over a vocabulary, a tokenizer's numpy ids);
    deltatune refused them ("must be a list of token ids (ints)"). They are stored as ints, so the JSON is peft's."""
    import json

    import numpy as np

    peft = pytest.importorskip("peft")
    ids = [np.int64(1), np.int32(3), np.int64(5)]
    theirs = peft.get_peft_model(
        tiny_model("llama", tie_word_embeddings=True), peft.TrainableTokensConfig(token_indices=ids)
    )
    ours = dt.get_delta_model(
        tiny_model("llama", tie_word_embeddings=True), dt.TrainableTokensConfig(token_indices=ids)
    )
    with torch.no_grad():
        for model in (theirs, ours):
            for name, p in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / 7)
    inputs = tiny_inputs("llama")
    ref = output_of(theirs.eval(), inputs)
    torch.testing.assert_close(output_of(ours.eval(), inputs), ref, atol=ATOL32, rtol=0)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["token_indices"] == [1, 3, 5]
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama", tie_word_embeddings=True), tmp_path).eval()
    torch.testing.assert_close(output_of(loaded, inputs), ref, atol=ATOL32, rtol=0)
    with pytest.raises(dt.ConfigError, match=r"^token_indices must be a list of token ids \(ints\), got \[True\]$"):
        dt.TrainableTokensConfig(token_indices=[True])  # a bool is no id (peft fails deep in torch's indexing)


def test_trainable_tokens_target_given_as_a_plain_name_string_says_to_list_it():
    """target_modules="embed_tokens" is a regex matched against the whole name in peft (it matches nothing there
    either: NoMatchingPeftModuleError); the line now says so, as LoRA's does for the same mistake."""
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="Target modules embed_tokens not found"):
        peft.get_peft_model(
            tiny_model("llama"), peft.TrainableTokensConfig(token_indices=[2], target_modules="embed_tokens")
        )
    base = tiny_model("llama")
    with pytest.raises(dt.ConfigError, match=r"not found in the base model\. .*give a list: \['embed_tokens'\]\)$"):
        dt.get_delta_model(base, dt.TrainableTokensConfig(token_indices=[2], target_modules="embed_tokens"))
    assert type(base.model.embed_tokens) is torch.nn.Embedding
    with pytest.raises(dt.ConfigError, match=r"Please check the target modules and try again\.$"):  # no such module
        dt.get_delta_model(base, dt.TrainableTokensConfig(token_indices=[2], target_modules="nothing"))


def test_ia3_add_weighted_adapter_refuses_two_copies_of_a_module_as_peft():
    """Two (IA)^3 adapters each training their own lm_head copy (modules_to_save): peft refuses ("Cannot add weighted
    adapters targeting the same module with modules_to_save"); deltatune gave the new adapter a fresh copy of the base
    lm_head, neither adapter's."""
    peft = pytest.importorskip("peft")
    kw = dict(target_modules=["k_proj"], feedforward_modules=[], modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(tiny_model("llama"), peft.IA3Config(**kw), adapter_name="a")
    theirs.add_adapter("b", peft.IA3Config(**kw))
    with pytest.raises(ValueError, match="modules_to_save"):
        theirs.add_weighted_adapter(["a", "b"], [1.0, 1.0], "n")
    ours = dt.get_delta_model(tiny_model("llama"), dt.IA3Config(**kw), adapter_name="a")
    ours.add_adapter("b", dt.IA3Config(**kw))
    with pytest.raises(
        ValueError, match=r"adapters 'a' and 'b' each train their own copy of lm_head \(modules_to_save"
    ):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "n")
    assert set(ours.peft_config) == {"a", "b"}


def test_ia3_add_weighted_adapter_joins_a_written_feedforward_regex_with_a_list():
    """IA3Config(target_modules=["k_proj", "mlp.down_proj"]) on Llama: inject writes the feed-forward layers as a regex
    of full names (the family default ["down_proj"] is no subset of the targets); combined with an adapter whose
    feedforward_modules is a list, deltatune refused ("gives feedforward_modules as a regex") a regex the user never
    wrote. The list is joined as the regex of its rule (ends with the name): the same layers feed-forward, and the
    new vectors peft's sum_i w_i l_i."""
    configs = {
        "a": dict(target_modules=["k_proj", "mlp.down_proj"]),
        "b": dict(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    ours = dt.get_delta_model(tiny_model("llama"), dt.IA3Config(**configs["a"]), adapter_name="a")
    ours.add_adapter("b", dt.IA3Config(**configs["b"]))
    assert isinstance(ours.peft_config["a"].feedforward_modules, str)
    _set_vectors(ours, seed=5)
    ours.add_weighted_adapter(["a", "b"], [0.5, 2.0], "mix")
    layers = {n: m for n, m in ours.base_model.named_modules() if hasattr(m, "ia3_l")}
    for name, layer in layers.items():
        held = [(a, w) for a, w in (("a", 0.5), ("b", 2.0)) if a in layer.ia3_l]
        torch.testing.assert_close(layer.ia3_l["mix"], sum(w * layer.ia3_l[a] for a, w in held), msg=name)
    from deltatune.methods.ia3 import _is_feedforward

    mixed = ours.peft_config["mix"].feedforward_modules
    assert [n for n in layers if _is_feedforward(n, mixed)] == [n for n, m in layers.items() if m.is_feedforward]


def test_ia3_all_linear_with_a_feedforward_name_marking_no_layer_is_refused_before_any_change(tmp_path):
    """target_modules="all-linear" with feedforward_modules=["dwn_proj"] (a typo): peft adapts with no layer
    feed-forward and saves a file its own IA3Config refuses on load ("subset of target_modules"); deltatune saved
    feedforward_modules as [] and trained with no layer scaled on its input (with list targets the config check
    refuses it). Now one line names the entries, before any change."""
    peft = pytest.importorskip("peft")
    config = peft.IA3Config(target_modules="all-linear", feedforward_modules=["dwn_proj"])
    theirs = peft.get_peft_model(tiny_model("llama"), config)
    assert not any(getattr(m, "is_feedforward", False) for m in theirs.modules())
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="subset of `target_modules`"):
        peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    model = dt.DeltaModel(tiny_model("llama"))
    for feedforward, unused in ((["dwn_proj"], "['dwn_proj']"), (["down_proj", "up_prj"], "['up_prj']")):
        config = dt.IA3Config(target_modules="all-linear", feedforward_modules=feedforward)
        with pytest.raises(dt.ConfigError, match=rf"^ia3: feedforward_modules entries {re.escape(unused)} mark none "
                                                 r"of the layers target_modules='all-linear' adapts$"):  # fmt: skip
            model.add_adapter("default", config)
        assert config.target_modules == "all-linear" and config.feedforward_modules == feedforward
        assert not model.peft_config and not any("ia3" in n for n, _ in model.named_parameters())
    # peft's suffix rule, no "." boundary: "p_proj" ends "mlp.up_proj" (and no other Llama name), so it marks a layer
    ok = dt.get_delta_model(
        tiny_model("llama"), dt.IA3Config(target_modules="all-linear", feedforward_modules=["p_proj"])
    )
    assert ok.peft_config["default"].feedforward_modules == [f"model.layers.{i}.mlp.up_proj" for i in (0, 1)]


@pytest.mark.parametrize(
    "extra, saved",
    [((), []), (set(), []), (("norm", "lm_head"), ["norm", "lm_head"]), ({"norm", "lm_head"}, ["lm_head", "norm"])],
)
def test_freeze_extra_modules_take_empty_tuples_and_sets_and_tuples_of_names(extra, saved):
    """freeze_extra_modules=() or set() meant nothing extra (stored as []), as [] and None; 14f08f6 refused them ("must
    be a list of module names, got ()"). A set is stored sorted, so the saved config does not depend on hashing."""
    config = dt.FreezeConfig(freeze_extra_modules=extra)
    assert config.freeze_extra_modules == saved
    trained = config.trainable_base_parameters(tiny_model("llama"))
    blocks = dt.FreezeConfig().trainable_base_parameters(tiny_model("llama"))
    assert sorted(trained) == sorted(
        blocks + [f"{m}.weight" if m == "lm_head" else f"model.{m}.weight" for m in saved]
    )


def test_ia3_add_weighted_adapter_on_gpt2_conv1d_as_peft(tmp_path):
    """GPT-2's Conv1D layers store W as (d_in, d_out) (fan_in_fan_out): the combined vectors, their layout and the
    saved file are peft's. "a" is the family default (c_attn, mlp.c_proj feed-forward), "b" c_attn and attn.c_proj."""
    peft = pytest.importorskip("peft")
    configs = {
        "a": dict(),
        "b": dict(target_modules=["c_attn", "attn.c_proj"], feedforward_modules=[]),
    }
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # peft: Conv1D, so fan_in_fan_out is set to True
        theirs, ours = _ia3_pair("gpt2", configs)
    inputs, ref = _mixed_as_peft(theirs, ours, "gpt2", ["a", "b"], [0.7, -1.5])
    from peft.utils import get_peft_model_state_dict

    mine, peft_sd = ours.adapter_state_dict("mix"), get_peft_model_state_dict(theirs, adapter_name="mix")
    assert set(mine) == set(peft_sd)
    for key, value in peft_sd.items():  # same shapes: (d_out, 1) or, feed-forward, (1, d_in)
        torch.testing.assert_close(mine[key], value, atol=ATOL32, rtol=0, msg=key)
    mixed = ours.peft_config["mix"]
    assert set(mixed.target_modules) == set(theirs.peft_config["mix"].target_modules)
    assert set(mixed.feedforward_modules) == set(theirs.peft_config["mix"].feedforward_modules)
    assert mixed.fan_in_fan_out is True
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "mix").eval()
    torch.testing.assert_close(output_of(loaded, inputs), ref, atol=ATOL32, rtol=0)
    ours.merge_and_unload()  # the combined vectors fold into the Conv1D weights with the same outputs
    torch.testing.assert_close(output_of(ours, inputs), ref, atol=ATOL32, rtol=0)
