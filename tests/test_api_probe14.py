"""The DeltaModel API against peft 0.21.2 (session 49): a DoRA magnitude's ``missing_keys`` name, ``from_pretrained``
in peft's positional order, ``has_active_enabled_adapter``, ``create_or_update_model_card`` and the
``exclude_modules`` warning when a second adapter names the first one's parts; on tiny Llama models with LoRA."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_inputs, tiny_model

import deltatune as dt

peft = pytest.importorskip("peft")
hub = pytest.importorskip("huggingface_hub")

LORA = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5.25's is_gradient_checkpointing deprecation, peft's notes
        return call(*args, **kwargs)


# -- 1. set_peft_model_state_dict: a DoRA magnitude's missing key as peft names it -----------------------------------
@pytest.mark.parametrize("injected", [False, True])
def test_a_missing_dora_magnitude_is_named_with_peft_s_weight_suffix(injected):
    config = dict(LORA, use_dora=True)
    if injected:
        theirs = _quiet(
            peft.inject_adapter_in_model, peft.LoraConfig(**config), tiny_model("llama"), adapter_name="aa"
        )
        ours = dt.inject_adapter_in_model(dt.LoraConfig(**config), tiny_model("llama"), adapter_name="aa")
    else:
        theirs = _quiet(peft.get_peft_model, tiny_model("llama"), peft.LoraConfig(**config), adapter_name="aa")
        ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**config), adapter_name="aa")
    state = dict(peft.get_peft_model_state_dict(theirs, adapter_name="aa"))
    dropped = [k for k in sorted(state) if k.endswith("lora_magnitude_vector")][:1] + sorted(state)[:1]
    for key in dropped:
        del state[key]
    want = _quiet(peft.set_peft_model_state_dict, theirs, state, adapter_name="aa")
    with pytest.warns(UserWarning, match=r"2 adapter tensor\(s\) missing"):
        got = dt.set_peft_model_state_dict(ours, state, adapter_name="aa")
    adapter_keys = [k for k in want.missing_keys if "lora_" in k and "aa" in k]
    assert any(k.endswith("lora_magnitude_vector.aa.weight") for k in adapter_keys)
    assert sorted(got.missing_keys) == sorted(adapter_keys) and len(adapter_keys) == 2


# -- 2. from_pretrained in peft's positional order -------------------------------------------------------------------
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_from_pretrained_takes_peft_s_positional_arguments(tmp_path, low_cpu_mem_usage):
    torch.manual_seed(0)
    dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA)).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ]
    inputs = tiny_inputs("llama")
    # (model, model_id, adapter_name, is_trainable, config, autocast_adapter_dtype, ephemeral_gpu_offload,
    #  low_cpu_mem_usage, key_mapping)
    args = ("x", False, None, True, False, low_cpu_mem_usage, None)
    theirs = _quiet(peft.PeftModel.from_pretrained, tiny_model("llama").to(torch.bfloat16), str(tmp_path), *args)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), tmp_path, *args)
    assert ours.active_adapters == ["x"] and not ours.training
    a = ours.base_model.model.layers[0].self_attn.q_proj.lora_A["x"].weight
    b = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A["x"].weight
    assert a.dtype == b.dtype == torch.float32  # autocast_adapter_dtype=True, given sixth
    assert torch.equal(a, saved)  # the file's float32 values
    if low_cpu_mem_usage:  # on purpose: peft's meta-device load rounds them through the base's bfloat16 first
        assert 0 < (b - saved).abs().max().item() <= saved.abs().max().item() * 2**-8
        return
    assert torch.equal(a, b)
    with torch.no_grad():
        diff = (ours(**inputs).logits.float() - theirs(**inputs).logits.float()).abs().max().item()
    assert diff == 0.0


# -- 3. has_active_enabled_adapter ------------------------------------------------------------------------------------
def test_has_active_enabled_adapter_follows_disabling():
    theirs = _quiet(peft.get_peft_model, tiny_model("llama"), peft.LoraConfig(**LORA))
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA))
    assert ours.has_active_enabled_adapter is theirs.has_active_enabled_adapter is True
    with ours.disable_adapter(), theirs.disable_adapter():
        assert ours.has_active_enabled_adapter is theirs.has_active_enabled_adapter is False
    assert ours.has_active_enabled_adapter is True
    # on purpose: peft's reads only disable_adapter()'s flag, so its disabled layers still answer True
    ours.disable_adapter_layers()
    theirs.disable_adapter_layers()
    assert ours.has_active_enabled_adapter is False and theirs.has_active_enabled_adapter is True
    ours.enable_adapter_layers()
    assert ours.has_active_enabled_adapter is True


# -- 4. create_or_update_model_card -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["CAUSAL_LM", None])
def test_model_card_has_peft_s_metadata_and_keeps_the_user_s_card(tmp_path, task):
    theirs = _quiet(peft.get_peft_model, tiny_model("llama"), peft.LoraConfig(**LORA, task_type=task))
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA, task_type=task))
    for folder in ("peft", "ours"):
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "README.md").write_text("---\nlicense: mit\n---\n# Mine\n\nhello\n", encoding="utf-8")
    theirs.create_or_update_model_card(str(tmp_path / "peft"))
    ours.create_or_update_model_card(tmp_path / "ours")
    ours.create_or_update_model_card(tmp_path / "ours")  # twice: nothing added the second time
    want = hub.ModelCard.load(tmp_path / "peft" / "README.md")
    got = hub.ModelCard.load(tmp_path / "ours" / "README.md")
    assert got.data.to_dict() == want.data.to_dict()
    assert got.data.to_dict()["license"] == "mit" and got.data.to_dict()["library_name"] == "peft"
    assert ("pipeline_tag" in got.data.to_dict()) == (task == "CAUSAL_LM")
    assert got.text == want.text.replace(f"- PEFT {peft.__version__}", f"- deltatune {dt.__version__}")
    assert got.text.startswith("# Mine\n\nhello\n")


def test_model_card_from_the_template_is_peft_s(tmp_path):
    theirs = _quiet(peft.get_peft_model, tiny_model("llama"), peft.IA3Config(target_modules=["q_proj"]))
    ours = dt.get_delta_model(tiny_model("llama"), dt.IA3Config(target_modules=["q_proj"]))
    theirs.create_or_update_model_card(str(tmp_path / "peft"))
    ours.create_or_update_model_card(tmp_path / "ours")
    want = (tmp_path / "peft" / "README.md").read_text(encoding="utf-8")
    got = (tmp_path / "ours" / "README.md").read_text(encoding="utf-8")
    assert "lora" not in hub.ModelCard.load(tmp_path / "ours" / "README.md").data.to_dict()["tags"]
    assert got == want.replace(f"- PEFT {peft.__version__}", f"- deltatune {dt.__version__}")
    assert sorted(os.listdir(tmp_path / "ours")) == ["README.md"]  # no temporary file left beside it


# -- 5. exclude_modules naming another adapter's parts excludes nothing, as peft warns --------------------------------
@pytest.mark.parametrize("exclude", [["lora_A"], ["base_layer"], ["q_proj"]])
def test_exclude_modules_naming_another_adapter_s_parts_warns_as_peft(exclude):
    second = dict(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=exclude)
    found = {}
    for name, lib, wrap in (("peft", peft, peft.get_peft_model), ("ours", dt, dt.get_delta_model)):
        model = _quiet(wrap, tiny_model("llama"), lib.LoraConfig(**LORA))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.add_adapter("b", lib.LoraConfig(**second))
        found[name] = [str(w.message) for w in caught if "exclude_modules" in str(w.message)]
        found[name + " layers"] = sorted(s.name for s in model.get_layer_status() if "b" in s.available_adapters)
    assert bool(found["ours"]) == bool(found["peft"]) == (exclude != ["q_proj"])
    assert found["ours layers"] == found["peft layers"]


def test_has_active_enabled_adapter_of_a_token_method_is_peft_s():
    theirs = _quiet(
        peft.get_peft_model, tiny_model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    ours = dt.get_delta_model(tiny_model("llama"), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    got, want = [ours.has_active_enabled_adapter], [theirs.has_active_enabled_adapter]
    with ours.disable_adapter(), theirs.disable_adapter():
        got.append(ours.has_active_enabled_adapter)
        want.append(theirs.has_active_enabled_adapter)
    assert got == want == [True, False]


# -- 6. unload after merge_adapter (a difference kept on purpose) -----------------------------------------------------
def test_unload_after_merge_adapter_gives_the_base_weights_back():
    """peft's ``unload`` after ``merge_adapter`` returns the merged weights (its layers are unwrapped as they are);
    deltatune's unmerges first, as ``unload``'s documentation (peft's too) promises: the original base model."""
    inputs = tiny_inputs("llama")
    theirs = _quiet(peft.get_peft_model, tiny_model("llama"), peft.LoraConfig(**LORA)).eval()
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA)).eval()
    dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    with torch.no_grad():
        base = tiny_model("llama")(**inputs).logits
        adapted = theirs(**inputs).logits
        assert (ours(**inputs).logits - adapted).abs().max().item() == 0.0
        theirs.merge_adapter()
        ours.merge_adapter()
        peft_unloaded = theirs.unload()(**inputs).logits
        our_unloaded = ours.unload()(**inputs).logits
    assert (base - adapted).abs().max().item() > 1e-2  # the adapter changes the output
    assert (peft_unloaded - adapted).abs().max().item() < 1e-5  # peft's: the merged model
    assert (our_unloaded - base).abs().max().item() < 1e-5  # ours: the base model


# -- 7. peft's top-level load_peft_weights, get_layer_status, get_model_status ----------------------------------------
@pytest.mark.parametrize("safe", [True, False])
def test_load_peft_weights_reads_the_file_as_peft_s(tmp_path, safe):
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA))
    model.add_adapter("b", dt.LoraConfig(**LORA))
    model.save_pretrained(tmp_path, safe_serialization=safe)
    mapping = {r"layers\.(\d+)\.self_attn": r"layers.\1.attn"}
    for kwargs in ({}, {"subfolder": "b"}, {"key_mapping": mapping}):
        want = _quiet(peft.load_peft_weights, str(tmp_path), device="cpu", **kwargs)
        got = dt.load_peft_weights(tmp_path, device="cpu", **kwargs)
        assert sorted(got) == sorted(want) and len(got) == 8
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(".attn." in k for k in dt.load_peft_weights(tmp_path, key_mapping=mapping))
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        dt.load_peft_weights(tmp_path, nope=1)


@pytest.mark.parametrize("injected", [False, True])
def test_top_level_status_functions_are_peft_s(injected):
    config = dict(r=4, target_modules=["q_proj", "v_proj"])
    if injected:
        theirs = _quiet(peft.inject_adapter_in_model, peft.LoraConfig(**config), tiny_model("llama"))
        ours = dt.inject_adapter_in_model(dt.LoraConfig(**config), tiny_model("llama"))
    else:
        theirs = _quiet(peft.get_peft_model, tiny_model("llama"), peft.LoraConfig(**config))
        ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**config))
    want, got = peft.get_layer_status(theirs), dt.get_layer_status(ours)
    assert [vars(s) for s in got] == [vars(s) for s in want] and len(got) == 4
    want, got = vars(peft.get_model_status(theirs)), vars(dt.get_model_status(ours))
    if injected:  # peft's knows no method on an injected model; ours names it
        assert want.pop("adapter_model_type") == "None" and want.pop("peft_types") == {}
        assert got.pop("adapter_model_type") == "LoraModel" and got.pop("peft_types") == {"default": "LORA"}
    assert got == want
    with pytest.raises(TypeError, match="get_layer_status: LlamaForCausalLM is neither"):
        dt.get_layer_status(tiny_model("llama"))


# -- 8. merge_adapter on disabled layers ------------------------------------------------------------------------------
def test_merge_adapter_while_the_layers_are_disabled_computes_as_peft_s_base():
    """peft's merge on a disabled layer is undone at its next forward, which computes as the base model; so is
    deltatune's since 234e60f (before acebc4f: merged for good, so the disabled model computed with the adapter)."""
    inputs = tiny_inputs("llama")
    theirs = _quiet(peft.get_peft_model, tiny_model("llama"), peft.LoraConfig(**LORA)).eval()
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA)).eval()
    dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    with torch.no_grad():
        base = tiny_model("llama")(**inputs).logits
        adapted = theirs(**inputs).logits
        for model in (theirs, ours):
            model.disable_adapter_layers()
            model.merge_adapter()
        want, got = theirs(**inputs).logits, ours(**inputs).logits
        assert (base - adapted).abs().max().item() > 1e-2  # the adapter changes the output
        assert (got - want).abs().max().item() < 1e-5 and (got - base).abs().max().item() < 1e-5
        assert ours.get_model_status().merged_adapters == theirs.get_model_status().merged_adapters == []
        for model in (theirs, ours):
            model.enable_adapter_layers()
        assert (ours(**inputs).logits - theirs(**inputs).logits).abs().max().item() < 1e-5
        # merge_and_unload after disable_adapter_layers still merges, as peft's
        for model in (theirs, ours):
            model.disable_adapter_layers()
        want, got = theirs.merge_and_unload()(**inputs).logits, ours.merge_and_unload()(**inputs).logits
    assert (got - want).abs().max().item() < 1e-5 and (got - adapted).abs().max().item() < 1e-5


# -- 9. mixed-adapter batches of IA3 (a difference kept on purpose) ---------------------------------------------------
def test_ia3_mixed_batch_rows_equal_each_adapter_alone_where_peft_s_ignore_adapter_names():
    """peft 0.21.2's IA3 layers take ``adapter_names`` and compute every row with the active adapter (its 'b' and
    '__base__' rows here are 0.04 off their own adapter's output); deltatune's rows each equal their adapter alone."""
    config = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    torch.manual_seed(0)
    theirs = _quiet(peft.get_peft_model, tiny_model("llama"), peft.IA3Config(**config))
    theirs.add_adapter("b", peft.IA3Config(**config))
    ours = dt.get_delta_model(tiny_model("llama"), dt.IA3Config(**config))
    ours.add_adapter("b", dt.IA3Config(**config))
    for name in ("default", "b"):
        dt.set_peft_model_state_dict(
            ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), adapter_name=name
        )
    theirs.eval(), ours.eval()
    inputs, names = tiny_inputs("llama", batch=3), ["b", "__base__", "default"]
    with torch.no_grad():
        got, want = ours(**inputs, adapter_names=names).logits, theirs(**inputs, adapter_names=names).logits
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            if name == "__base__":
                with theirs.disable_adapter():
                    alone = theirs(**row).logits
            else:
                theirs.set_adapter(name)
                alone = theirs(**row).logits
            assert (got[i : i + 1] - alone).abs().max().item() < 1e-5
            off = (want[i : i + 1] - alone).abs().max().item()
            assert off < 1e-5 if name == "default" else off > 1e-2  # peft's: the active adapter's everywhere
