"""The DeltaModel API and adapter files against peft 0.21.2 (session 48): ``set_peft_model_state_dict``'s
``missing_keys`` by peft's in-model names, ``prepare_model_for_kbit_training`` on a model that is not quantised, a
saved ``modules_to_save`` naming a module the model lacks, and the loading options and config fields peft writes; on
tiny Llama / BERT models with LoRA."""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_api_probe11 import kbit_state
from tiny import tiny_inputs, tiny_model

import deltatune as dt

peft = pytest.importorskip("peft")

LORA = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


# -- 1. set_peft_model_state_dict: missing_keys as peft names them -------------------------------------------------
@pytest.mark.parametrize("injected", [False, True])
def test_set_peft_model_state_dict_missing_keys_are_peft_in_model_names(injected):
    torch.manual_seed(0)
    if injected:
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(**LORA), tiny_model("llama"), adapter_name="aa")
        ours = dt.inject_adapter_in_model(dt.LoraConfig(**LORA), tiny_model("llama"), adapter_name="aa")
    else:
        theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA), adapter_name="aa")
        ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA), adapter_name="aa")
    state = dict(peft.get_peft_model_state_dict(theirs, adapter_name="aa"))
    for key in sorted(state)[:3]:
        del state[key]
    want = peft.set_peft_model_state_dict(theirs, state, adapter_name="aa")
    with pytest.warns(UserWarning, match=r"3 adapter tensor\(s\) missing"):
        got = dt.set_peft_model_state_dict(ours, state, adapter_name="aa")
    # the filter peft's load_adapter and transformers' integration apply to peft's list
    adapter_keys = [k for k in want.missing_keys if "lora_" in k and "aa" in k]
    assert len(adapter_keys) == 3 and got.missing_keys == adapter_keys
    assert len(want.missing_keys) > 3  # peft's also lists every base weight (left out here on purpose)
    assert got.unexpected_keys == want.unexpected_keys == []


# -- 2. prepare_model_for_kbit_training checkpoints a quantised model only, as peft --------------------------------
@pytest.mark.parametrize("flag", [None, "gptq"])
def test_prepare_model_for_kbit_training_leaves_a_model_that_is_not_quantised_unchecked_as_peft(flag):
    models = [tiny_model("llama").to(torch.bfloat16) for _ in range(2)]
    for model in models:
        model.quantization_method = flag  # peft's flag for a GPTQ model: checkpointing, and no fp32 cast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5.25 deprecates is_gradient_checkpointing
        peft.prepare_model_for_kbit_training(models[0])
        assert dt.prepare_model_for_kbit_training(models[1]) is models[1]
        ours, theirs = kbit_state(models[1]), kbit_state(models[0])
    assert ours == theirs
    assert ours[2] is (flag == "gptq") and ours[3] == [flag == "gptq"]
    assert set(ours[0].values()) == {torch.bfloat16 if flag else torch.float32}
    assert not any(ours[1])


# -- 3. a saved modules_to_save naming a module the model lacks loads, as peft's -----------------------------------
def test_saved_modules_to_save_naming_an_absent_module_loads_as_peft_and_is_kept(tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA, modules_to_save=["lm_head", "score"]))
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(tmp_path)  # "score" (a SEQ_CLS head) matches nothing in a causal LM: peft passes it over
    back = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        want, got = back(**inputs).logits, ours(**inputs).logits
    assert torch.equal(got, want) and not torch.equal(got, tiny_model("llama")(**inputs).logits)
    assert ours.peft_config["default"].modules_to_save == back.peft_config["default"].modules_to_save
    ours.save_pretrained(tmp_path / "again")
    assert dt.LoraConfig.from_pretrained(tmp_path / "again").modules_to_save == ["lm_head", "score"]
    # a name given fresh that matches nothing stays refused (a typo; peft passes it over silently): kept on purpose
    with pytest.raises(dt.ConfigError, match="'score' matches no module"):
        dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA, modules_to_save=["score"]))


# -- 4. a saved config that does not fit the model names its file --------------------------------------------------
def test_a_saved_config_whose_targets_match_nothing_names_its_file(tmp_path):
    torch.manual_seed(0)
    peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA)).save_pretrained(tmp_path)
    with pytest.raises(peft.tuners.tuners_utils.NoMatchingPeftModuleError):  # peft's: no file named
        peft.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    model = dt.DeltaModel(tiny_model("gpt2"))
    file = re.escape(str(tmp_path / "adapter_config.json"))
    with pytest.raises(dt.ConfigError, match=rf"^{file}: lora: target_modules=\[.*\] matches no module"):
        model.load_adapter(tmp_path, "default")
    assert model.peft_config == {} and not any("lora" in n for n, _ in model.named_parameters())


# -- 5. peft's spellings of add_adapter and save_pretrained ---------------------------------------------------------
def test_add_adapter_peft_config_keyword_and_save_pretrained_peft_positional_order(tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA))
    theirs.add_adapter(adapter_name="b", peft_config=peft.LoraConfig(r=2, target_modules=["o_proj"]))
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA))
    ours.add_adapter(adapter_name="b", peft_config=dt.LoraConfig(r=2, target_modules=["o_proj"]))
    assert list(ours.peft_config) == list(theirs.peft_config) == ["default", "b"]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with pytest.raises(TypeError, match="add_adapter takes one config"):
        ours.add_adapter("c", dt.LoraConfig(**LORA), peft_config=dt.LoraConfig(**LORA))
    # peft's order: save_pretrained(save_directory, safe_serialization, selected_adapters)
    theirs.save_pretrained(tmp_path / "peft", False, ["b"])
    ours.save_pretrained(tmp_path / "ours", False, ["b"])
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "peft")) == ["README.md", "b"]
    assert sorted(os.listdir(tmp_path / "ours" / "b")) == ["adapter_config.json", "adapter_model.bin"]
    mine = torch.load(tmp_path / "ours" / "b" / "adapter_model.bin", weights_only=True)
    want = torch.load(tmp_path / "peft" / "b" / "adapter_model.bin", weights_only=True)
    state = dt.get_peft_model_state_dict(ours, adapter_name="b")
    assert mine.keys() == want.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in mine)
    ours.save_pretrained(tmp_path / "bin", False)  # all adapters, as .bin
    assert sorted(os.listdir(tmp_path / "bin")) == ["README.md", "adapter_config.json", "adapter_model.bin", "b"]


# -- 6. peft's config objects are taken, as the adapter_config.json they would save --------------------------------
def test_peft_config_objects_are_taken_as_the_file_they_would_save(tmp_path):
    inputs = tiny_inputs("llama")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_rslora=True)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), copy_of := peft.LoraConfig(**config.to_dict()))
    torch.manual_seed(0)
    ours = dt.get_delta_model(tiny_model("llama"), config)  # was: TypeError "must be a DeltaConfig ... got LoraConfig"
    assert isinstance(ours.peft_config["default"], dt.LoraConfig) and config.to_dict() == copy_of.to_dict()
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)  # the same init draws, too
    ia3 = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs.save_pretrained(tmp_path)
    back = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, config=peft.LoraConfig(**config.to_dict()))
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, theirs(**inputs).logits)
    ours.add_adapter("i", ia3)
    assert isinstance(ours.peft_config["i"], dt.IA3Config) and ours.peft_config["i"].feedforward_modules == [
        "down_proj"
    ]
    injected = dt.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["q_proj"]), tiny_model("llama"))
    assert sorted(dt.get_peft_model_state_dict(injected)) == sorted(
        peft.get_peft_model_state_dict(
            peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["q_proj"]), tiny_model("llama"))
        )
    )
    with pytest.raises(dt.ConfigError, match=r"^peft's LoHaConfig: unknown peft_type 'LOHA'; deltatune reads: "):
        dt.get_delta_model(tiny_model("llama"), peft.LoHaConfig(target_modules=["q_proj"]))


def test_a_mismatched_tensor_kept_by_ignore_mismatched_sizes_is_a_missing_key_as_peft():
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA))
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA))
    state = dict(peft.get_peft_model_state_dict(theirs))
    odd = sorted(state)[0]
    state[odd] = torch.zeros(2, 32)
    want = peft.set_peft_model_state_dict(theirs, state, ignore_mismatched_sizes=True)
    with pytest.warns(UserWarning, match="the model's value is kept"):
        got = dt.set_peft_model_state_dict(ours, state, ignore_mismatched_sizes=True)
    assert (
        got.missing_keys
        == [k for k in want.missing_keys if "lora_" in k]
        == [odd.replace(".weight", ".default.weight")]
    )


# -- 7. fields deltatune does not know in a peft file -----------------------------------------------------------------
def test_an_unknown_field_is_ignored_at_its_default_and_refused_in_one_line_when_set(tmp_path):
    """Kept on purpose: peft 0.21.2 ignores a field it does not know whatever its value (with a warning); deltatune
    ignores it only at a value that changes nothing (None, False, [], {}) and otherwise names the file and the field,
    since a newer peft's field may change the math."""
    torch.manual_seed(0)
    peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA)).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    inputs = tiny_inputs("llama")
    for value in (None, 3):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "future_field": value}))
        with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['future_field'\]"):
            theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
        if value is None:
            ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path)
            with torch.no_grad():
                assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)
            continue
        model = dt.DeltaModel(tiny_model("llama"))
        with pytest.raises(
            dt.ConfigError, match=r"adapter_config.json: field 'future_field' = 3 is not supported by "
        ):
            model.load_adapter(tmp_path, "default")
        assert model.peft_config == {}


def test_a_saved_runtime_config_is_dropped_as_peft_drops_it(tmp_path):
    """peft's config ``runtime_config`` is "only valid at runtime": a file holding one loads, the field dropped. It was
    refused as a field deltatune does not support."""
    torch.manual_seed(0)
    peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA)).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "runtime_config": {"ephemeral_gpu_offload": 1}}))
    inputs = tiny_inputs("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)


# -- 8. state_dict= (peft's: the tensors picked out of a gathered state dict) ----------------------------------------
def test_state_dict_argument_picks_the_tensors_as_peft(tmp_path):
    kw = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**kw))
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**kw))
    dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    gathered = {k: v * 2 for k, v in theirs.state_dict().items()}  # peft's keys, values the model does not hold
    want = peft.get_peft_model_state_dict(theirs, state_dict=gathered)
    for given in (gathered, {k: v * 2 for k, v in ours.state_dict().items()}):  # peft's keys, then deltatune's
        got = dt.get_peft_model_state_dict(ours, state_dict=given)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    theirs.save_pretrained(tmp_path / "peft", state_dict=gathered)
    ours.save_pretrained(tmp_path / "ours", state_dict=gathered)  # was: state_dict= silently ignored
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert mine.keys() == file.keys() and all(torch.equal(mine[k], file[k]) for k in file)
    injected = dt.inject_adapter_in_model(dt.LoraConfig(**LORA), tiny_model("llama"))
    plain = {k: v + 1 for k, v in injected.state_dict().items()}  # the plain model's own names
    got = dt.get_peft_model_state_dict(injected, state_dict=plain)
    now = dt.get_peft_model_state_dict(injected)
    assert got.keys() == now.keys() and len(got) == 8 and all(torch.equal(got[k], now[k] + 1) for k in got)
    with pytest.raises(ValueError, match=r"^state_dict=: no 'base_model\.model\.layers\.0\.self_attn\.q_proj\.lora_A"):
        dt.get_peft_model_state_dict(ours, state_dict={})


# -- 9. peft's hub and dispatch arguments of from_pretrained / load_adapter ------------------------------------------
def test_hub_and_dispatch_arguments_are_taken_as_peft(tmp_path, monkeypatch):
    torch.manual_seed(0)
    peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA)).save_pretrained(tmp_path)
    inputs = tiny_inputs("llama")
    kw = dict(token=None, cache_dir=str(tmp_path / "cache"), local_files_only=True, device_map="cpu", max_memory=None)
    kw["use_safetensors"] = False  # (peft reads the safetensors file whenever there is one)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, **kw)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, **kw)  # was: TypeError for each of them
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)
    calls = []

    def download(repo_id, filename, **options):  # the hub, as hf_hub_download answers from its cache
        calls.append((repo_id, filename, options))
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    ours.load_adapter("someone/adapter", "hub", use_auth_token="t", cache_dir="c", revision="v1")
    assert [c[:2] for c in calls] == [
        ("someone/adapter", "adapter_config.json"),
        ("someone/adapter", "adapter_model.safetensors"),
    ]
    assert all(c[2] == dict(subfolder=None, revision="v1", cache_dir="c", token="t") for c in calls)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tokn'"):
        ours.load_adapter(tmp_path, "x", tokn="t")


# -- 10. fixes after review (f117a29, 645851e, 8fecacf) ---------------------------------------------------------------
def _tree(folder):
    return sorted(
        os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs if f != "README.md"
    )


def test_save_pretrained_takes_peft_full_positional_order_and_refuses_a_4th_positional_in_its_own(tmp_path):
    models = []
    for lib, get in ((peft, peft.get_peft_model), (dt, dt.get_delta_model)):
        torch.manual_seed(0)
        model = get(tiny_model("llama"), lib.LoraConfig(**LORA))
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
        models.append(model)
    calls = [
        (True, ["b"], False),
        (True, ["b"], "auto", False),
        (False, None, "auto", True),
        (True, ["b"], True, True),
    ]
    for i, args in enumerate(calls):
        theirs, ours = tmp_path / f"peft{i}", tmp_path / f"ours{i}"
        models[0].save_pretrained(theirs, *args)
        models[1].save_pretrained(ours, *args)  # was: the 4th taken as is_main_process, the 5th as embeddings
        assert _tree(ours) == _tree(theirs), args
    assert _tree(tmp_path / "ours0") == ["b/adapter_config.json", "b/adapter_model.safetensors"]
    assert not os.path.exists(tmp_path / "ours1") and _tree(tmp_path / "peft1") == []  # (peft leaves empty folders)
    with pytest.raises(TypeError, match="keyword-only"):  # deltatune's order: no positional after safe_serialization
        models[1].save_pretrained(tmp_path / "x", ["b"], True, False)
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("kind", ["dora", "tokens"])
@pytest.mark.parametrize("injected", [False, True])
def test_state_dict_keyed_as_peft_gives_dora_magnitudes_and_trainable_tokens(kind, injected):
    kw = dict(r=2, target_modules=["q_proj"], init_lora_weights=False)
    kw.update(use_dora=True) if kind == "dora" else kw.update(trainable_token_indices={"embed_tokens": [3, 5]})
    torch.manual_seed(0)
    if injected:
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kw), tiny_model("llama"))
        ours = dt.inject_adapter_in_model(dt.LoraConfig(**kw), tiny_model("llama"))
    else:
        theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**kw))
        ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**kw))
    gathered = {k: v + 1 for k, v in theirs.state_dict().items()}
    want = peft.get_peft_model_state_dict(theirs, state_dict=gathered)
    got = dt.get_peft_model_state_dict(ours, state_dict=gathered)  # was: ValueError, no such key
    assert got.keys() == want.keys() and len(got) in (5, 6)
    assert max((got[k] - want[k]).abs().max().item() for k in want) == 0
    # a missing tensor is named by the model's own name (an injected model's: its module path, no wrapper prefix)
    # and by peft's
    mine = "model.embed_tokens.trainable_tokens_delta.default"
    theirs = "model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    if kind == "dora":
        mine = "model.layers.1.self_attn.q_proj.lora_magnitude_vector.default"
        theirs = mine + ".weight"
    prefix = "" if injected else "base_model."
    message = f"^state_dict=: no '{prefix}{mine}' \\(or peft's '{prefix and 'base_model.model.'}{theirs}'\\) in it"
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        dt.get_peft_model_state_dict(ours, state_dict={k: v for k, v in gathered.items() if theirs not in k})
    shown = re.escape(f"{prefix}model.layers.0.self_attn.q_proj.lora_A.default.weight")
    with pytest.raises(ValueError, match=rf"^state_dict=: no '{shown}'"):
        dt.get_peft_model_state_dict(ours, state_dict={k: v for k, v in gathered.items() if "layers.0" not in k})


def test_state_dict_gives_the_embedding_copies_too_as_peft(tmp_path):
    kw = dict(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**kw))
    torch.manual_seed(0)
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**kw))
    gathered = {k: v + 1 for k, v in theirs.state_dict().items()}  # (under ZeRO-3 the live weight is a shard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Setting save_embedding_layers to True ..."
        want = peft.get_peft_model_state_dict(theirs, state_dict=gathered)
        theirs.save_pretrained(tmp_path / "peft", state_dict=gathered)
    embed = "base_model.model.model.embed_tokens.base_layer.weight"
    for given in (gathered, {k: v + 1 for k, v in ours.state_dict().items()}):
        got = dt.get_peft_model_state_dict(ours, state_dict=given)
        assert got.keys() == want.keys() and torch.equal(got[embed], want[embed])  # was: the live weight (1 off)
    ours.save_pretrained(tmp_path / "ours", state_dict=gathered)
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert mine.keys() == file.keys() and all(torch.equal(mine[k], file[k]) for k in file)


@pytest.mark.parametrize("method", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_prompt_learning_save_with_state_dict_saves_the_live_prompt_as_peft(tmp_path, method):
    models = []
    for lib, get in ((peft, peft.get_peft_model), (dt, dt.get_delta_model)):
        torch.manual_seed(0)
        models.append(get(tiny_model("llama"), getattr(lib, method)(num_virtual_tokens=3, task_type="CAUSAL_LM")))
    dt.set_peft_model_state_dict(models[1], peft.get_peft_model_state_dict(models[0]))
    for model, folder in zip(models, ("peft", "ours")):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model.save_pretrained(tmp_path / folder, state_dict={k: v + 1 for k, v in model.state_dict().items()})
        assert not [w for w in seen if "state_dict" in str(w.message)]  # peft ignores it there, silently
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")  # was: ValueError, leave state_dict out
    file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert mine.keys() == file.keys() == {"prompt_embeddings"}
    assert torch.equal(mine["prompt_embeddings"], file["prompt_embeddings"])


def test_a_peft_config_with_a_path_or_a_set_is_taken_and_another_value_named(tmp_path):
    from pathlib import Path

    from deltatune.config import ConfigError

    config = peft.LoraConfig(r=2, target_modules={"v_proj", "q_proj"}, base_model_name_or_path=Path(tmp_path))
    ours = dt.get_delta_model(tiny_model("llama"), config)  # was: TypeError 'PosixPath' object is not iterable
    assert ours.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    assert ours.peft_config["default"].base_model_name_or_path == os.fspath(tmp_path)
    config = peft.LoraConfig(r=2, target_modules=["q_proj"])
    config.layers_pattern = object()
    with pytest.raises(ConfigError, match=r"^peft's LoraConfig: field 'layers_pattern' = <object object at .*"):
        dt.get_delta_model(tiny_model("llama"), config)
