"""LoRA's layer_replication (methods/_lora_replicate.py) against peft 0.21.2's replicate_layers on the same seeds:
the deeper model's forward and cached generate, the gradients, the parameter counts, the saved files both ways.
Merging differs on purpose (peft merges every copy's update into the one shared weight; deltatune refuses)."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny import output_of, tiny_inputs, tiny_model
from torch import nn

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.layer import DeltaLayer

warnings.filterwarnings("ignore", module="peft")
MAP = [[0, 2], [1, 3]]  # a 3-layer base becomes [0, 1, 1, 2]: layer 1 twice


def _pair(family: str = "llama", layer_map=MAP, base=None, **kw):
    kw = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "layer_replication": layer_map, **kw}
    base = base or {}
    torch.manual_seed(3)
    p = peft.get_peft_model(tiny_model(family, num_hidden_layers=3, **base), peft.LoraConfig(**kw))
    torch.manual_seed(3)
    d = dt.get_delta_model(tiny_model(family, num_hidden_layers=3, **base), dt.LoraConfig(**kw))
    return p, d


def _lora(model) -> dict[str, nn.Parameter]:
    """The LoRA parameters by their path in the transformers model (either library's wrapper names left out)."""
    prefix = "base_model.model." if isinstance(model, peft.PeftModel) else "base_model."
    return {k.replace(".default", "").removeprefix(prefix): v for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.parametrize("family", ["llama", "mistral", "bert"])
def test_the_deeper_model_computes_as_peft(family):
    p, d = _pair(family)
    x = tiny_inputs(family)
    assert d.config.num_hidden_layers == p.config.num_hidden_layers == 4
    assert _lora(d).keys() == _lora(p).keys() and len(_lora(d)) == 4 * 2 * 2  # 4 layers, q and v, A and B
    assert torch.equal(output_of(d, x), output_of(p, x))
    base = tiny_model(family, num_hidden_layers=3)
    assert not torch.allclose(output_of(d, x), output_of(base, x))  # the copies and their LoRA do compute


def test_each_copy_keeps_its_layers_attention_type_where_peft_fails():
    types = ["full_attention", "sliding_attention", "full_attention"]
    p, d = _pair("qwen2", base=dict(layer_types=types, sliding_window=3, use_sliding_window=True))
    x = tiny_inputs("qwen2", seq=9)
    assert d.config.layer_types == [types[i] for i in (0, 1, 1, 2)]
    with pytest.raises(IndexError):  # peft leaves layer_types at the base's depth
        output_of(p, x)
    p.config.layer_types = d.config.layer_types
    assert torch.equal(output_of(d, x), output_of(p, x))
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(d.generate(**x, **kw), p.generate(**x, **kw))


def test_layers_to_transform_counts_the_copies_as_peft():
    p, d = _pair(layers_to_transform=[2])  # the second copy of layer 1 only
    assert sorted(_lora(d)) == sorted(_lora(p)) and {k.split(".")[2] for k in _lora(d)} == {"2"}
    assert torch.equal(output_of(d, tiny_inputs("llama")), output_of(p, tiny_inputs("llama")))


def test_cached_generate_follows_the_copies_places_as_peft():
    p, d = _pair()
    x = tiny_inputs("llama")
    layers = d.base_model.model.layers
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    ours, theirs = d.generate(**x, **kw), p.generate(**x, **kw)
    assert torch.equal(ours, theirs)
    full = d(input_ids=ours, attention_mask=torch.ones_like(ours)).logits  # no cache: the same greedy choices
    assert torch.equal(full[:, x["input_ids"].shape[1] - 1 : -1].argmax(-1), ours[:, x["input_ids"].shape[1] :])


def test_gradients_reach_each_copys_lora_only_as_peft():
    p, d = _pair()
    x = tiny_inputs("llama")
    for model in (p, d):
        model.train()
        model(**x, labels=x["input_ids"]).loss.backward()
    ours, theirs = _lora(d), _lora(p)
    for key, param in ours.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, key
        assert torch.equal(param.grad, theirs[key].grad), key
    a1, a2 = (ours[f"model.layers.{i}.self_attn.q_proj.lora_A.weight"] for i in (1, 2))
    assert a1 is not a2 and not torch.equal(a1.grad, a2.grad)  # two copies of layer 1: two adapters
    frozen = [n for n, q in d.named_parameters() if "lora_" not in n]
    assert frozen and all(not q.requires_grad and q.grad is None for n, q in d.named_parameters() if n in frozen)
    assert d.get_nb_trainable_parameters() == p.get_nb_trainable_parameters()


def test_files_move_both_ways_with_the_map(tmp_path):
    p, d = _pair()
    x = tiny_inputs("llama")
    d.save_pretrained(tmp_path / "ours")
    p.save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["layer_replication"] == MAP
    ours_keys = load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
    assert ours_keys == load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys()
    back = peft.PeftModel.from_pretrained(tiny_model("llama", num_hidden_layers=3), tmp_path / "ours")
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama", num_hidden_layers=3), tmp_path / "theirs")
    assert ours.peft_config["default"].layer_replication == MAP
    for model in (back, ours):
        assert torch.equal(output_of(model, x), output_of(p, x))


def test_a_second_adapter_of_the_same_deeper_model_loads_and_another_map_is_refused(tmp_path):
    p, d = _pair()
    x = tiny_inputs("llama")
    d.save_pretrained(tmp_path)
    d.load_adapter(tmp_path, "again")  # peft would stack the stacked layers again
    assert len(d.base_model.model.layers) == 4
    d.set_adapter("again")
    assert torch.equal(output_of(d, x), output_of(p, x))
    with pytest.raises(ConfigError, match=r"already replicated by \[\[0, 2\], \[1, 3\]\]"):
        d.add_adapter("other", dt.LoraConfig(layer_replication=[[0, 3]]))
    assert "other" not in d.peft_config and len(d.base_model.model.layers) == 4


def test_merging_into_a_shared_weight_is_refused_where_peft_computes_something_else():
    p, d = _pair()
    x = tiny_inputs("llama")
    before = output_of(d, x)
    with pytest.raises(ValueError, match="model.layers.1.self_attn.q_proj.base_layer.weight"):
        d.merge_and_unload()
    assert torch.equal(output_of(d, x), before) and not any(m.merged_adapters for _, m in d._layers())
    assert not torch.allclose(output_of(p.merge_and_unload(), x), before, atol=1e-3)  # peft's merged copies differ
    p, d = _pair(layer_map=[[1, 3]])  # no layer twice: nothing shared in the model, merged as peft
    assert torch.equal(output_of(d.merge_and_unload(), x), output_of(p.merge_and_unload(), x))


def test_unload_keeps_the_deeper_base_as_peft():
    p, d = _pair()
    x = tiny_inputs("llama")
    ours, theirs = d.unload(), p.unload()
    assert len(ours.model.layers) == len(theirs.model.layers) == 4
    assert not any(isinstance(m, DeltaLayer) for m in ours.modules())
    assert torch.equal(output_of(ours, x), output_of(theirs, x))


def _state(model):
    return model.model.layers, model.config.num_hidden_layers, dict(model.named_parameters())


@pytest.mark.parametrize(
    ("layer_map", "words"),
    [
        ([[0, 4]], r"range \[0, 4\) goes past the last of the model's 3 layers"),
        ([[0]], "list of \\[start, end\\) pairs"),
        ([0, 2], "list of \\[start, end\\) pairs"),
        ("0-2", "list of \\[start, end\\) pairs"),
        ([[0, 1.5]], "list of \\[start, end\\) pairs"),
        ([[True, 2]], "list of \\[start, end\\) pairs"),
        ([[2, 1]], r"range \[2, 1\] must have 0 <= start < end"),
        ([[1, 1]], r"range \[1, 1\] must have 0 <= start < end"),
        ([[-1, 2]], r"range \[-1, 2\] must have 0 <= start < end"),
    ],
)
def test_a_bad_map_is_one_line_and_the_model_unchanged(layer_map, words):
    model = tiny_model("llama", num_hidden_layers=3)
    layers, depth, params = _state(model)
    with pytest.raises(ConfigError, match=words) as info:
        if len(layer_map) == 1 and layer_map[0][-1] == 4:  # the bounds need the model
            dt.DeltaModel(model, dt.LoraConfig(layer_replication=layer_map))
        else:
            dt.LoraConfig(layer_replication=layer_map)
    assert "\n" not in str(info.value)
    assert model.model.layers is layers and model.config.num_hidden_layers == depth
    assert dict(model.named_parameters()) == params


@pytest.mark.parametrize("family", ["gpt2", "opt", "t5", "roberta"])
def test_a_family_peft_cannot_replicate_is_refused_naming_its_type(family):
    model = tiny_model(family)
    names = dict(model.named_modules())
    with pytest.raises(ValueError, match="Could not locate the layers"):
        peft.get_peft_model(
            tiny_model(family), peft.LoraConfig(layer_replication=[[0, 1]], target_modules="all-linear")
        )
    with pytest.raises(ConfigError, match=f"not supported for model type '{model.config.model_type}'"):
        dt.DeltaModel(model, dt.LoraConfig(layer_replication=[[0, 1]], target_modules="all-linear"))
    assert dict(model.named_modules()) == names


def test_a_failure_after_the_copies_were_made_puts_the_model_back():
    model = tiny_model("llama", num_hidden_layers=3)
    layers, depth, params = _state(model)
    x = tiny_inputs("llama")
    before = output_of(model, x)
    with pytest.raises(ConfigError, match="no_such_module"):
        dt.DeltaModel(model, dt.LoraConfig(layer_replication=MAP, target_modules=["no_such_module"]))
    assert model.model.layers is layers and model.config.num_hidden_layers == depth
    assert dict(model.named_parameters()) == params and torch.equal(output_of(model, x), before)


def test_a_bare_gpt2_base_model_replicates_its_h_list_as_peft():
    from tiny import tiny_config
    from transformers import AutoModel

    kw = dict(r=4, init_lora_weights=False, layer_replication=MAP, target_modules=["c_attn"])
    models = []
    for lib in (peft, dt):
        torch.manual_seed(0)
        base = AutoModel.from_config(tiny_config("gpt2", n_layer=3)).eval()
        torch.manual_seed(3)
        models.append(
            peft.get_peft_model(base, peft.LoraConfig(**kw))
            if lib is peft
            else dt.DeltaModel(base, dt.LoraConfig(**kw))
        )
    x = tiny_inputs("gpt2")
    with torch.no_grad():
        theirs, ours = (m(**x).last_hidden_state for m in models)
    assert len(models[1].base_model.h) == 4 and torch.equal(ours, theirs)


@pytest.mark.parametrize("first", ["prefix", "prompt"])
def test_a_map_after_a_prefix_or_prompt_adapter_is_refused_and_changes_nothing(first):
    """A prefix-tuning adapter holds keys and values for the base's layers and lives outside the layer list: a later
    adapter that stacked copies of the layers was accepted, and the prefix adapter's forward then failed inside
    transformers (7 against 10 positions). The map must come with the first adapter (review 10a)."""
    x = tiny_inputs("llama")
    kind = dt.PrefixTuningConfig if first == "prefix" else dt.PromptTuningConfig
    model = dt.get_delta_model(tiny_model("llama"), kind(task_type="CAUSAL_LM", num_virtual_tokens=3))
    before = output_of(model, x)
    with pytest.raises(dt.ConfigError, match="must come with the model's first adapter"):
        model.add_adapter("rep", dt.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]))
    assert len(model.base_model.model.layers) == 2 and list(model.peft_config) == ["default"]
    assert torch.equal(output_of(model, x), before)
