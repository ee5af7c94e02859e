"""Bad input gets a clear error that names the thing at fault, and leaves the model as it was."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from tiny import output_of, tiny_inputs, tiny_model

import deltatune as dt

FAMILY = "llama"


def lora(**fields) -> dt.LoraConfig:
    return dt.LoraConfig(**{"r": 4, "init_lora_weights": False, **fields})


def state(model: torch.nn.Module) -> tuple:
    """What a failed call must not change: module tree, outputs, parameters and their trainable flags, adapters."""
    tree = [(n, type(m).__name__) for n, m in model.named_modules()]
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    adapters = (list(model.peft_config), list(model.active_adapters)) if isinstance(model, dt.DeltaModel) else ()
    return tree, output_of(model, tiny_inputs(FAMILY)), params, adapters


def assert_same(before: tuple, after: tuple) -> None:
    assert after[0] == before[0], "module structure changed"
    assert torch.equal(after[1], before[1]), "outputs changed"
    assert after[2].keys() == before[2].keys(), "parameters added or removed"
    for name, (p, grad) in before[2].items():
        assert torch.equal(after[2][name][0], p) and after[2][name][1] == grad, f"{name} changed"
    assert after[3] == before[3], "adapters changed"


@pytest.fixture
def model() -> dt.DeltaModel:
    torch.manual_seed(0)
    return dt.get_delta_model(tiny_model(FAMILY), lora()).eval()


@pytest.fixture
def saved(model, tmp_path) -> str:
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return str(path)


# -- configs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [("r", 0), ("r", -2), ("lora_alpha", 0), ("lora_alpha", -1.0), ("lora_dropout", -0.1), ("lora_dropout", 1.0)]
    # NaN passes every comparison with a bound; infinity passes an open upper one; a string cannot be compared
    + [
        ("lora_alpha", float("nan")),
        ("lora_alpha", float("inf")),
        ("lora_dropout", float("nan")),
        ("lora_alpha", "16"),
    ]
    + [("alpha_pattern", {"q_proj": float("nan")}), ("alpha_pattern", {"q_proj": "x"})],
)
def test_bad_numbers_name_the_field(field, value):
    shown = next(iter(value.values())) if isinstance(value, dict) else value
    with pytest.raises(dt.ConfigError, match=rf"^{field}\b.* must .*got {re.escape(repr(shown))}$"):
        dt.LoraConfig(**{field: value})


def test_target_modules_matching_nothing_lists_real_names(model):
    before = state(model)
    with pytest.raises(dt.ConfigError) as info:
        model.add_adapter("other", lora(target_modules=["query", "nonexistent"]))
    message = str(info.value)
    assert "nonexistent" in message and "q_proj" in message and "down_proj" in message
    assert_same(before, state(model))

    plain = tiny_model(FAMILY)
    before = state(plain)
    with pytest.raises(dt.ConfigError, match="q_proj"):
        dt.get_delta_model(plain, lora(target_modules=["nonexistent"]))
    assert_same(before, state(plain))


def test_a_module_name_given_as_a_string_points_to_the_list_form(model):
    """A string target is a regex matched against the full module name (peft's rule), so ``target_modules="q_proj"``
    matches nothing; the message says so and shows the list form. A regex that matches nothing gets no such hint."""
    before = state(model)
    with pytest.raises(
        dt.ConfigError, match=r"regex matched against the full module name.*give a list: \[q_proj\]\)$"
    ):
        model.add_adapter("other", lora(target_modules="q_proj"))
    with pytest.raises(dt.ConfigError) as info:
        model.add_adapter("other", lora(target_modules=".*nothing"))
    assert "give a list" not in str(info.value)
    assert_same(before, state(model))
    model.add_adapter("other", lora(target_modules=r".*\.q_proj"))  # the regex form of the same targets
    assert list(model.peft_config) == ["default", "other"]


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: lora(target_modules="(q_proj"), "target_modules"),
        (lambda: lora(target_modules=["q_proj"], exclude_modules="[v"), "exclude_modules"),
        (lambda: lora(target_modules=["q_proj"], rank_pattern={"q_proj(": 2}), "rank_pattern key"),
        (lambda: dt.IA3Config(target_modules=".*proj", feedforward_modules="(down"), "feedforward_modules"),
    ],
)
def test_a_string_that_is_not_a_regex_names_its_field(make, field):
    """A regex string that does not compile was re.error from inside the matching, with some layers wrapped."""
    with pytest.raises(dt.ConfigError, match=rf"^{field} is not a valid regex: "):
        make()
    with pytest.raises(dt.ConfigError, match=r"^skip_modules is not a valid regex: '\(' "):
        dt.quantize(tiny_model(FAMILY), skip_modules="(")


def test_exclude_modules_excluding_every_target(model):
    before = state(model)
    with pytest.raises(dt.ConfigError, match=r"exclude_modules=\['k_proj'\].*'k_proj'"):
        model.add_adapter("other", lora(target_modules=["k_proj"], exclude_modules=["k_proj"]))
    assert_same(before, state(model))


def test_adding_an_existing_name(model):
    before = state(model)
    with pytest.raises(ValueError, match="'default'"):
        model.add_adapter("default", lora(target_modules=["k_proj"]))
    assert_same(before, state(model))


def test_unknown_adapter_in_set_adapter(model):
    before = state(model)
    with pytest.raises(ValueError, match=r"'nope'.*default"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="'nope'"):
        model.set_adapter(["default", "nope"])
    with pytest.raises(ValueError, match=r"at least one adapter name \(disable_adapter\(\)"):
        model.set_adapter([])  # no active adapter: the model would compute as the base and train nothing
    with pytest.raises(TypeError, match="a name or a list of names, got 5$"):
        model.set_adapter(5)
    assert_same(before, state(model))


def test_one_adapter_name_as_a_string_is_that_adapter_everywhere(model, tmp_path):
    """Calls that take a list of names take one name as a string too (it was read as a list of its letters:
    "unknown adapter 'd'")."""
    model.add_adapter("other", lora(target_modules=["k_proj"]))
    model.save_pretrained(tmp_path, selected_adapters="other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "other"]  # (peft writes its model card too)
    model.merge_adapter("other")
    assert [layer.merged_adapters for _, layer in model._layers() if "other" in layer.adapter_names][0] == ["other"]
    with pytest.raises(TypeError, match=r"got \{'other'\}$"):
        model.merge_adapter({"other"})


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module .*got str$"):
        dt.get_delta_model("llama", lora())


# -- files ------------------------------------------------------------------------------------------------------------
def test_shapes_that_do_not_fit(saved):
    wider = dt.get_delta_model(tiny_model(FAMILY, hidden_size=48), lora(target_modules=["k_proj"])).eval()
    before = state(wider)
    with pytest.raises(dt.AdapterLoadError) as info:
        wider.load_adapter(saved, "other")
    message = str(info.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "(4, 32)" in message and "(4, 48)" in message
    assert_same(before, state(wider))


def test_missing_folder_and_file(model, saved, tmp_path):
    before = state(model)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        model.load_adapter(str(tmp_path / "no_such_folder"), "other")
    os.remove(os.path.join(saved, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        model.load_adapter(saved, "other")
    assert_same(before, state(model))


def test_truncated_safetensors(model, saved):
    file = os.path.join(saved, "adapter_model.safetensors")
    with open(file, "rb") as fh:
        data = fh.read()
    with open(file, "wb") as fh:
        fh.write(data[: len(data) // 2])
    before = state(model)
    with pytest.raises(dt.AdapterLoadError, match="adapter_model.safetensors"):
        model.load_adapter(saved, "other")
    assert_same(before, state(model))


def test_pickle_refused_when_not_allowed(model, saved):
    from safetensors.torch import load_file

    file = os.path.join(saved, "adapter_model.safetensors")
    torch.save(load_file(file), os.path.join(saved, "adapter_model.bin"))
    os.remove(file)
    expected = output_of(model, tiny_inputs(FAMILY))
    fresh = dt.DeltaModel(tiny_model(FAMILY))
    before = state(fresh)
    with pytest.raises(dt.AdapterLoadError, match=r"adapter_model\.bin.*allow_pickle=False was given"):
        fresh.load_adapter(saved, "default", allow_pickle=False)
    assert_same(before, state(fresh))
    fresh.load_adapter(saved, "default")  # read with torch.load(weights_only=True), as peft reads it
    assert torch.equal(output_of(fresh, tiny_inputs(FAMILY)), expected)


def test_unsupported_config_field(model, saved):
    file = os.path.join(saved, "adapter_config.json")
    with open(file) as fh:
        config = json.load(fh)
    config["use_qalora"] = True  # PEFT's QA-LoRA pooling: deltatune does not compute it
    with open(file, "w") as fh:
        json.dump(config, fh)
    before = state(model)
    with pytest.raises(dt.ConfigError, match=r"'use_qalora' = True"):
        model.load_adapter(saved, "other")
    assert_same(before, state(model))


@pytest.mark.parametrize("field, value", [("r", "4"), ("lora_alpha", float("nan")), ("task_type", "FOO")])
def test_a_bad_value_in_a_config_file_names_the_file(model, saved, field, value):
    file = os.path.join(saved, "adapter_config.json")
    with open(file) as fh:
        config = json.load(fh)
    with open(file, "w") as fh:
        json.dump({**config, field: value}, fh)  # json writes NaN, as Python's json.dump of a float nan does
    before = state(model)
    with pytest.raises(dt.ConfigError, match=rf"^{re.escape(file)}: {field} must .*got {re.escape(repr(value))}$"):
        model.load_adapter(saved, "other")
    assert_same(before, state(model))


def test_failure_after_some_layers_were_wrapped_rolls_back():
    """DoRA is refused on a layer only after the linear layer before it was wrapped: all of it is undone. (An
    Embedding takes DoRA since 3a94c8c; a weight stored as integers is still refused.)"""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.emb = torch.nn.Embedding(10, 4)
            self.emb.weight = torch.nn.Parameter(torch.zeros(10, 4, dtype=torch.int8), requires_grad=False)

    net = Net()
    tree = [(n, type(m).__name__) for n, m in net.named_modules()]
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    with pytest.raises(dt.ConfigError, match="use_dora.*emb .Embedding"):
        dt.get_delta_model(net, dt.LoraConfig(r=2, target_modules=["proj", "emb"], use_dora=True))
    assert [(n, type(m).__name__) for n, m in net.named_modules()] == tree
    assert all(torch.equal(p, weights[n]) and p.requires_grad == flags[n] for n, p in net.named_parameters())


def test_truncated_config_json(model, saved):
    file = os.path.join(saved, "adapter_config.json")
    with open(file) as fh:
        text = fh.read()
    with open(file, "w") as fh:
        fh.write(text[: len(text) // 2])
    before = state(model)
    with pytest.raises(dt.ConfigError, match=r"adapter_config\.json is not valid JSON"):
        model.load_adapter(saved, "other")
    assert_same(before, state(model))


def test_a_folder_holding_only_named_adapters_says_so(tmp_path):
    """peft saves an adapter not named "default" in a sub-folder of its name: loading the folder said only "no
    adapter_config.json", not where the adapter is."""
    from tiny import tiny_model

    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2), adapter_name="mine")
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"sub-folders hold adapters: mine \(load one by name\)$"):
        dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "mine").peft_config


def test_an_adapter_loaded_for_inference_computes_without_dropout(tmp_path):
    """DeltaModel(base) is a new module, in training mode: from_pretrained (is_trainable False) left the adapter's
    dropout on, so two forwards on one input differed (0.31 with a bottleneck's adapter_dropout 0.3). peft's
    load_adapter puts the model in eval mode; so does deltatune's now, and a trainable load leaves the mode alone."""
    from tiny import tiny_inputs, tiny_model

    made = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False))
    made.save_pretrained(tmp_path)
    inputs = tiny_inputs("llama")
    loaded = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, loaded(**inputs).logits, atol=0, rtol=0)
    assert (
        not loaded.training
        and dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True).training
    )


def test_modules_to_save_on_a_module_another_adapter_adapts_is_one_line_and_changes_nothing():
    """Its copy held the other adapter's LoRA layer: loading such a file blamed it for lacking that adapter's tensors."""
    from deltatune.config import ConfigError

    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["lm_head"]), "head")
    modules = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=r"^modules_to_save: 'lm_head' is adapted by LoraLinear \(adapter 'head'\)"):
        model.add_adapter("mts", dt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert list(model.peft_config) == ["head"] and [n for n, _ in model.named_modules()] == modules
