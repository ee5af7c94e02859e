"""Adapter files against peft 0.21.2, seventh pass: the embedding matrices peft's save_pretrained writes beside an
adapter (save_embedding_layers) and the head keys it writes with them, copies loaded beside a merged adapter,
rank_pattern's order in the file, and one-line errors for a config whose r is not the file's and for pickles."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model

import deltatune as dt

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 130, 135, 5, 139], [2, 131, 7, 138, 9]])


def _resized(seed: int) -> torch.nn.Module:
    """A tiny llama whose vocabulary grew from 128 to 140, the new rows (at a real embedding's scale) from ``seed``."""
    model = tiny_model("llama")
    model.resize_token_embeddings(140, mean_resizing=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.get_input_embeddings().weight[128:] = torch.randn(12, 32)
        model.get_output_embeddings().weight[128:] = torch.randn(12, 32)
    return model


def _keys(folder) -> set[str]:
    return set(load_file(f"{folder}/adapter_model.safetensors"))


@pytest.mark.parametrize("targets", [["q_proj", "embed_tokens", "lm_head"], r".*(q_proj|embed_tokens|lm_head)"])
def test_an_adapter_on_the_embeddings_saves_them_as_peft_does(tmp_path, targets):
    """peft's save_pretrained (save_embedding_layers="auto") writes the embedding matrices an adapter targets beside
    it; deltatune wrote the LoRA factors alone, so on a freshly resized base (its new rows drawn anew) the adapter
    reloaded 18.8 off what it computed when saved, in deltatune and in peft. Now the files hold peft's keys and
    reload exactly, in both libraries."""
    kw = dict(r=4, target_modules=targets, init_lora_weights=False)
    ours = dt.get_delta_model(_resized(1), dt.LoraConfig(**kw)).eval()
    ours.save_pretrained(tmp_path / "ours")
    peft.get_peft_model(_resized(1), peft.LoraConfig(**kw)).save_pretrained(tmp_path / "peft")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft")
    with torch.no_grad():
        want = ours(input_ids=IDS).logits
        again = dt.DeltaModel.from_pretrained(_resized(2), tmp_path / "ours").eval()(input_ids=IDS).logits
        theirs = peft.PeftModel.from_pretrained(_resized(2), tmp_path / "ours").eval()(input_ids=IDS).logits
    torch.testing.assert_close(again, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("save", [True, False])
def test_save_embedding_layers_given_is_honoured_as_in_peft(tmp_path, save):
    """An explicit save_embedding_layers went into save_pretrained's **kwargs unread: True wrote no embedding (peft
    writes the input and output matrices), False one for a targeted embedding (peft writes none)."""
    targets = ["q_proj"] if save else ["q_proj", "embed_tokens"]
    kw = dict(r=4, target_modules=targets, init_lora_weights=False)
    dt.get_delta_model(_resized(1), dt.LoraConfig(**kw)).save_pretrained(tmp_path / "ours", save_embedding_layers=save)
    theirs = peft.get_peft_model(_resized(1), peft.LoraConfig(**kw))
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=save)
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft")
    embeddings = {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    assert (embeddings <= _keys(tmp_path / "ours")) is save


def test_embedding_copies_loaded_beside_a_merged_adapter_keep_its_update(tmp_path):
    """A file's embedding copy was written over an embedding another adapter was merged into: that update was lost
    (logits 0.54 off peft's with nothing merged), and unmerging took it off the base too (weights 20.5 off). Now the
    merged adapter is unmerged for the copy and merged again: peft's logits, and unmerging gives back the base."""
    x = {"input_ids": IDS[:, :4] % 128}
    kw = dict(r=4, init_lora_weights=False, target_modules=["embed_tokens", "q_proj"])
    dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**kw)).save_pretrained(tmp_path)
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**kw), adapter_name="a").eval()
    ours.merge_adapter()
    ours.load_adapter(tmp_path, "b")
    ref = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**kw), adapter_name="a").eval()
    ref.load_adapter(tmp_path, "b")
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, ref(**x).logits, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    base = tiny_model("llama").get_input_embeddings().weight
    torch.testing.assert_close(ours.get_input_embeddings().base_layer.weight, base, atol=1e-5, rtol=0)


def test_a_config_whose_r_is_not_the_file_s_is_named_so(tmp_path):
    """A file whose adapter_config.json says r=4 beside rank-2 tensors was blamed on "a different base model"; the
    base fits, the config does not. (peft: a size-mismatch RuntimeError.)"""
    import json

    kw = dict(target_modules=["q_proj"], init_lora_weights=False)
    peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, **kw)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(dt.AdapterLoadError) as err:
        dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert str(err.value) == (
        f"{tmp_path}/adapter_model.safetensors: {key} has rank 2 in the file but 4 by the config's r / rank_pattern; "
        "the config does not belong to these tensors"
    )


def test_a_peft_file_with_resized_heads_trained_in_full_loads(tmp_path):
    """A vocabulary resized from the base's config.json and its embeddings trained in full (modules_to_save: the
    usual setup for new chat tokens): peft's file also holds each head under its wrapper's names
    (``embed_tokens.modules_to_save.weight``, ``embed_tokens.original_module.weight``). deltatune refused it ("does
    not belong to any module"); now it loads with peft's outputs, the adapter on and off, and saves those keys as peft
    does but the repeated copy, which peft's loading leaves out too."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "base")

    def base(seed: int) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        torch.manual_seed(seed)
        model.resize_token_embeddings(140, mean_resizing=False)
        return model

    kw = dict(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False)
    theirs = peft.get_peft_model(base(1), peft.LoraConfig(**kw)).eval()
    with torch.no_grad():
        for p in (p for name, p in theirs.named_parameters() if "modules_to_save" in name):
            p.add_(0.5)
    theirs.save_pretrained(tmp_path / "peft")
    assert "base_model.model.model.embed_tokens.modules_to_save.weight" in _keys(tmp_path / "peft")
    ours = dt.DeltaModel.from_pretrained(base(2), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-6, rtol=0)
        with ours.disable_adapter(), theirs.disable_adapter():
            torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-6, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    echo = {f"base_model.model.{h}.modules_to_save.weight" for h in ("model.embed_tokens", "lm_head")}
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft") - echo


def test_rank_pattern_keeps_its_order_in_the_file(tmp_path):
    """rank_pattern's first matching key wins; the file sorted its keys (as peft's does), so {"v_proj": 2,
    "layers.*": 6} reloaded as rank 6 for v_proj and the adapter did not load, in deltatune or peft. Now the file
    keeps the order (the fields are still sorted) and both reload it to the saved outputs."""
    import json

    from tiny import output_of, tiny_inputs

    pattern = {"v_proj": 2, "layers.*": 6}
    kw = dict(r=4, target_modules=["q_proj", "v_proj"], rank_pattern=pattern, init_lora_weights=False)
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**kw)).eval()
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(saved["rank_pattern"]) == list(pattern) and list(saved) == sorted(saved)
    x = tiny_inputs("llama")
    for loaded in (dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path),
                   peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)):  # fmt: skip
        torch.testing.assert_close(output_of(loaded.eval(), x), output_of(ours, x), atol=0, rtol=0)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"w": torch.nn.Linear(2, 2)}, r"could not be read as tensors \(.*\): Unsupported global: GLOBAL torch\.nn\.modules"
         r"\.linear\.Linear was not an allowed global by default$"),
        ([torch.zeros(2)], r"holds a list, not an adapter's named tensors$"),
    ],
)  # fmt: skip
def test_a_pickle_that_is_no_adapter_is_one_line(tmp_path, content, message):
    """allow_pickle=True on a .bin holding other objects gave torch's paragraphs (ANSI codes, advice to pass
    weights_only=False, which deltatune has no way to), or a list an AttributeError from deep inside: now one line."""
    peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(content, tmp_path / "adapter_model.bin")
    with pytest.raises(dt.AdapterLoadError) as err:
        dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, allow_pickle=True)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{tmp_path}/adapter_model.bin ")
    assert re.search(message, str(err.value))


@pytest.mark.parametrize("field, value", [("target_modules", [5]), ("modules_to_save", 5), ("exclude_modules", 1)])
def test_a_module_name_field_that_is_no_string_is_named(tmp_path, field, value):
    """adapter_config.json with a number where module names go failed deep inside the matching ("argument of type
    'int' is not iterable", "can only concatenate str (not "int") to str"); now one line naming file and field."""
    import json

    peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(dt.ConfigError) as err:
        dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert str(err.value) == (
        f"{tmp_path}/adapter_config.json: {field} must be a string or a list of strings (module names), got {value!r}"
    )


@pytest.mark.parametrize("kw", [{"target_modules": 5}, {"target_modules": [5]}, {"modules_to_save": [3]}])
def test_a_config_with_a_number_where_module_names_go_is_one_line_at_construction(kw):
    """``LoraConfig(target_modules=5)`` passed construction and failed deep in the matching with a TypeError."""
    field, value = next(iter(kw.items()))
    with pytest.raises(dt.ConfigError, match=rf"^{field} must be a string or a list of strings \(module names\), got"):
        dt.LoraConfig(**kw)


def test_loading_embedding_copies_leaves_other_merged_layers_as_they_were(tmp_path):
    """A file with embedding copies unmerged and merged again every merged layer, not only the embeddings: on a bf16
    base with an fp32 adapter, unmerge then merge rounds, so a merged q_proj drifted (365 of 4,096 weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)

    for name, targets in (("a", ["q_proj", "v_proj"]), ("b", ["embed_tokens"])):
        torch.manual_seed(ord(name))
        config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        dt.get_delta_model(load(), config).save_pretrained(tmp_path / name)
    model = dt.DeltaModel.from_pretrained(load(), tmp_path / "a", adapter_name="a")
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # as a run trains them (and peft's autocast_adapter_dtype)
    model.merge_adapter()
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    before = q.detach().clone()
    for i in range(3):
        model.load_adapter(tmp_path / "b", adapter_name=f"b{i}")
        assert torch.equal(q, before), i


@pytest.mark.parametrize("kw", [{"exclude_modules": ("k_proj",)}, {"exclude_modules": {"k_proj"}},
                                {"layers_to_transform": [0], "layers_pattern": ("layers",)}])  # fmt: skip
def test_a_tuple_or_set_of_module_names_reads_as_a_list_as_peft_takes_it(kw):
    """1a92963's check refused tuples and sets that peft (and deltatune before it) accept."""
    config = dt.LoraConfig(target_modules=["q_proj"], **kw)
    field, value = next((k, v) for k, v in kw.items() if k != "layers_to_transform")
    assert getattr(config, field) == sorted(value)
