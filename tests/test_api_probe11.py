"""The DeltaModel API against peft 0.21.2 (session 47): ``save_pretrained(safe_serialization=False)`` and folders holding
only ``adapter_model.bin``, ``inject_adapter_in_model`` (with peft's state-dict functions on the injected model),
``get_delta_model(mixed=, low_cpu_mem_usage=)``, the non-strict ``set_peft_model_state_dict``, which parameters train
after sequences of add / set / delete / disable / enable / load (a fuzz against peft's names), and
``prepare_model_for_kbit_training``; on tiny Llama / BERT models with LoRA."""

from __future__ import annotations

import copy
import os
import random
import warnings

import pytest
import torch
from tiny import output_of, tiny_inputs, tiny_model

import deltatune as dt

peft = pytest.importorskip("peft")

LORA = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _trainable_names(model, ours: bool) -> set[str]:
    """Trainable parameter names, peft's ``base_model.model.`` written as deltatune's ``base_model.``."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return names if ours else {n.replace("base_model.model.", "base_model.", 1) for n in names}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- 1. adapter_model.bin ------------------------------------------------------------------------------------------
def test_save_pretrained_bin_and_bin_only_folders_round_trip_with_peft(tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA))
    theirs.save_pretrained(tmp_path / "peft", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "peft")) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    inputs = tiny_inputs("llama")
    expected = output_of(theirs, inputs)
    # a folder with only peft's .bin loads with no flag (torch.load(weights_only=True), as peft reads it)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "peft")
    assert torch.equal(output_of(ours, inputs), expected)
    ours.add_adapter("other", dt.LoraConfig(**LORA))
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "adapter_model.safetensors").write_bytes(b"stale")  # an older save: replaced, not left
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    for folder in (tmp_path / "ours", tmp_path / "ours" / "other"):
        assert "adapter_model.bin" in os.listdir(folder) and "adapter_model.safetensors" not in os.listdir(folder)
    mine = torch.load(tmp_path / "ours" / "adapter_model.bin", weights_only=True)
    peft_file = torch.load(tmp_path / "peft" / "adapter_model.bin", weights_only=True)
    assert mine.keys() == peft_file.keys() and all(torch.equal(mine[k], peft_file[k]) for k in mine)
    back = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
    back.load_adapter(tmp_path / "ours" / "other", "other")
    assert torch.equal(output_of(back, inputs), expected)
    again = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
    again.load_adapter(tmp_path / "ours" / "other", "other")
    ours.set_adapter("other")
    again.set_adapter("other")
    assert torch.equal(output_of(again, inputs), output_of(ours, inputs))
    with pytest.raises(dt.AdapterLoadError, match=r"adapter_model\.bin.*allow_pickle=True"):
        dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "peft", allow_pickle=False)


# -- 2. inject_adapter_in_model ------------------------------------------------------------------------------------
def test_inject_adapter_in_model_and_its_state_dict_as_peft():
    torch.manual_seed(0)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**LORA), tiny_model("llama"), adapter_name="x")
    ours = dt.inject_adapter_in_model(dt.LoraConfig(**LORA), tiny_model("llama"), adapter_name="x")
    assert type(ours).__name__ == type(theirs).__name__  # the model itself, no wrapper
    assert _trainable_names(ours, True) == _trainable_names(theirs, True)
    state = peft.get_peft_model_state_dict(theirs, adapter_name="x")
    assert all(not k.startswith("base_model.") for k in state)
    result = dt.set_peft_model_state_dict(ours, state, adapter_name="x")
    assert result.missing_keys == [] and result.unexpected_keys == []
    mine = dt.get_peft_model_state_dict(ours, adapter_name="x")
    assert mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in mine)
    inputs = tiny_inputs("llama")
    diff = (output_of(ours, inputs) - output_of(theirs, inputs)).abs().max().item()
    assert diff == 0.0
    dt.inject_adapter_in_model(dt.LoraConfig(**LORA), ours, adapter_name="y")  # a second adapter, as peft's
    peft.inject_adapter_in_model(peft.LoraConfig(**LORA), theirs, adapter_name="y")
    assert _trainable_names(ours, True) == _trainable_names(theirs, True)
    assert sorted(ours.peft_config) == ["x", "y"]
    assert theirs.model.layers[0].self_attn.q_proj.active_adapters == ["y"]
    assert ours.model.layers[0].self_attn.q_proj.active_adapters == ["y"]
    with pytest.raises(TypeError, match="neither a DeltaModel nor a model given to"):
        dt.get_peft_model_state_dict(tiny_model("llama"))


# -- 3. mixed=, low_cpu_mem_usage= ---------------------------------------------------------------------------------
def test_get_delta_model_accepts_mixed_and_low_cpu_mem_usage_as_peft(tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA), low_cpu_mem_usage=True)
    mixed = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA), mixed=True)
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA), mixed=True, low_cpu_mem_usage=True)
    assert _count(ours) == _count(mixed) == _count(theirs) > 0
    assert not any(p.is_meta for p in ours.parameters())  # drawn: the CPU has nothing to save by leaving them empty
    ours.add_adapter("b", dt.LoraConfig(**LORA), True)  # peft's third argument, low_cpu_mem_usage
    source = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA))  # (peft's mixed model cannot save)
    source.save_pretrained(tmp_path)
    ours.load_adapter(tmp_path, "c", low_cpu_mem_usage=True)
    ours.set_adapter("c")
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(ours, inputs), output_of(source, inputs))
    with pytest.raises(TypeError, match="mixed must be True or False"):
        dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA), mixed="yes")


# -- 4. set_peft_model_state_dict is not strict ----------------------------------------------------------------------
def test_set_peft_model_state_dict_reports_unexpected_and_missing_keys_as_peft():
    torch.manual_seed(0)
    source = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA))
    state = dict(peft.get_peft_model_state_dict(source))
    dropped = sorted(state)[0]
    del state[dropped]
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_Z.weight"] = torch.zeros(2)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA))
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA))
    dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))  # the same start
    kept = dt.get_peft_model_state_dict(ours)[dropped].clone()
    result_theirs = peft.set_peft_model_state_dict(theirs, state)
    with pytest.warns(UserWarning, match=r"1 unexpected key\(s\) left out .*1 adapter tensor\(s\) missing"):
        result = dt.set_peft_model_state_dict(ours, state)
    assert result.unexpected_keys == result_theirs.unexpected_keys
    assert result.missing_keys == [dropped]  # peft's lists it with its adapter name, beside every base weight
    assert [k for k in result_theirs.missing_keys if "lora" in k] == [dropped.replace(".weight", ".default.weight")]
    assert torch.equal(dt.get_peft_model_state_dict(ours)[dropped], kept)
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(ours, inputs), output_of(theirs, inputs))


# -- 5. trainability against peft ------------------------------------------------------------------------------------
HEADS = [
    dict(r=2, target_modules=["query"], task_type="SEQ_CLS"),
    dict(r=2, target_modules=["query"], task_type="SEQ_CLS", lora_dropout=0.1),
    dict(r=4, target_modules=["query"], task_type="SEQ_CLS", modules_to_save=["classifier"]),
]


def _sequence(seed: int, folder) -> tuple[list, str | None]:
    """A random sequence of adapter operations done on deltatune and on peft (seq-cls BERT, LoRA and a head copy per
    adapter, every adapter on the same modules); the first step after which the trainable names differ."""
    rng = random.Random(seed)
    first = rng.randrange(len(HEADS))
    ours = dt.get_delta_model(tiny_model("bert", "seq_cls"), dt.LoraConfig(**copy.deepcopy(HEADS[first])))
    theirs = peft.get_peft_model(tiny_model("bert", "seq_cls"), peft.LoraConfig(**copy.deepcopy(HEADS[first])))
    done, k = [], 0
    for step in range(8):
        names = list(theirs.peft_config)
        op = rng.choice(["add", "add", "set", "set_frozen", "delete", "disable", "enable", "load"])
        if op == "add":
            k, which, frozen = k + 1, rng.randrange(len(HEADS)), rng.random() < 0.2
            args = (f"a{k}", which, frozen)

            def act(m, lib, a=args):
                m.add_adapter(a[0], lib.LoraConfig(**copy.deepcopy(HEADS[a[1]]), inference_mode=a[2]))
        elif op in ("set", "set_frozen"):
            args = (rng.choice(names),)

            def act(m, lib, a=args, op=op):
                m.set_adapter(a[0], inference_mode=op == "set_frozen")
        elif op == "delete":
            if len(names) < 2:
                continue
            args = (rng.choice(names),)

            def act(m, lib, a=args):
                m.delete_adapter(a[0])
        elif op in ("disable", "enable"):
            args = ()

            def act(m, lib, op=op):
                getattr(m, f"{op}_adapter_layers")()
        else:
            k, source, trainable = k + 1, rng.choice(names), rng.random() < 0.5
            args = (f"a{k}", source, trainable)
            theirs.save_pretrained(folder / f"{seed}_{step}", selected_adapters=[source])
            path = folder / f"{seed}_{step}" / ("" if source == "default" else source)

            def act(m, lib, a=args, path=path):
                m.load_adapter(path, a[0], is_trainable=a[2])

        done.append((op, *args))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            act(ours, dt)
            act(theirs, peft)
        if _trainable_names(ours, True) != _trainable_names(theirs, False):
            return done, f"{sorted(_trainable_names(ours, True) ^ _trainable_names(theirs, False))[:4]}"
    return done, None


def test_trainable_parameters_follow_peft_over_random_adapter_sequences(tmp_path):
    differ = [(seed, *_sequence(seed, tmp_path)) for seed in range(24)]
    differ = [d for d in differ if d[2] is not None]
    assert not differ, f"{len(differ)} / 24 sequences differ from peft, first: {differ[0]}"


def test_head_copies_train_as_peft_after_delete_disable_and_set_adapter(tmp_path):
    def both(step):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step(ours)
            step(theirs)
        assert _trainable_names(ours, True) == _trainable_names(theirs, False)
        return _count(ours)

    ours = dt.get_delta_model(tiny_model("bert", "seq_cls"), dt.LoraConfig(**HEADS[0]))
    theirs = peft.get_peft_model(tiny_model("bert", "seq_cls"), peft.LoraConfig(**HEADS[0]))
    theirs.save_pretrained(tmp_path)
    # (c) an inactive copy loaded trainable stays trainable through set_adapter (peft's wrapper touches only the copy
    # it had active and the new one)
    both(lambda m: m.load_adapter(tmp_path, "b", is_trainable=True))
    assert both(lambda m: m.set_adapter("default")) == 2 * 99 + 2 * 2 * 64  # two heads, default's LoRA
    # (b) disabling freezes every copy, the inactive trainable one too
    assert both(lambda m: m.disable_adapter_layers()) == 0
    both(lambda m: m.enable_adapter_layers())
    # (a) deleting the only active adapter: the next one by name (peft's layers' choice) trains, head and all
    both(lambda m: m.add_adapter("a", type(m.peft_config["default"])(**copy.deepcopy(HEADS[0]))))
    both(lambda m: m.delete_adapter("default"))
    assert ours.active_adapters == ["a"] == [theirs.active_adapter]


def test_bias_all_trains_no_head_original_and_inference_mode_freezes_it(tmp_path):
    config = dict(r=2, target_modules=["query"], bias="all", task_type="SEQ_CLS")
    ours = dt.get_delta_model(tiny_model("bert", "seq_cls"), dt.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_model("bert", "seq_cls"), peft.LoraConfig(**config))
    # the head's original module computes nothing while its copy is active: its bias does not train (as peft)
    assert _trainable_names(ours, True) == _trainable_names(theirs, False)
    assert not any("original_module" in n for n in _trainable_names(ours, True))
    assert _count(ours) == _count(theirs) == 963
    # kept on purpose: inference_mode=True freezes the biases bias="all" trains; peft's leaves all 18 (608) training
    for model in (ours, theirs):
        model.set_adapter("default", inference_mode=True)
    assert _count(ours) == 0 and _count(theirs) == 608


def test_prompt_encoder_in_inference_mode_trains_nothing_unlike_peft():
    """Kept on purpose: peft's P-tuning model with inference_mode=True trains its prompt encoder's embedding (128) and,
    after set_adapter(inference_mode=True), the whole encoder (1,472); deltatune's freezes it, as the flag says."""
    config = dict(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16, inference_mode=True)
    ours = dt.get_delta_model(tiny_model("bert", "seq_cls"), dt.PromptEncoderConfig(**config))
    theirs = peft.get_peft_model(tiny_model("bert", "seq_cls"), peft.PromptEncoderConfig(**config))
    assert _count(ours) == 0 and _count(theirs) == 128
    for model in (ours, theirs):
        model.set_adapter("default")
    assert _count(ours) == _count(theirs) == 227


# -- 6. prepare_model_for_kbit_training ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"gradient_checkpointing_kwargs": {"use_reentrant": True}},
                                    {"use_gradient_checkpointing": False}])  # fmt: skip
def test_prepare_model_for_kbit_training_as_peft_on_a_kbit_model(kwargs):
    def state(model):
        seen = []
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
        model.train()
        model(**tiny_inputs("llama"))
        hook.remove()
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        return dtypes, [p.requires_grad for p in model.parameters()], model.is_gradient_checkpointing, seen

    models = [tiny_model("llama").to(torch.bfloat16) for _ in range(2)]
    for model in models:
        model.is_loaded_in_4bit = True  # what peft reads (bitsandbytes sets it)
    peft.prepare_model_for_kbit_training(models[0], **kwargs)
    assert dt.prepare_model_for_kbit_training(models[1], **kwargs) is models[1]
    assert state(models[1]) == state(models[0])
    assert set(state(models[1])[0].values()) == {torch.float32}


def test_trainable_tokens_config_exported_as_peft_exports_it():
    ours = dt.get_delta_model(tiny_model("llama"), dt.TrainableTokensConfig(token_indices=[1, 5]))
    theirs = peft.get_peft_model(tiny_model("llama"), peft.TrainableTokensConfig(token_indices=[1, 5]))
    assert "TrainableTokensConfig" in dt.__all__
    assert _count(ours) == _count(theirs) == 2 * 32


def test_delete_activates_the_next_adapters_head_where_peft_leaves_it_out():
    """Kept on purpose: peft's head wrapper that does not hold the deleted adapter is not told of the new active one
    (its delete_adapter returns early), so that adapter's head copy neither computes nor trains; deltatune's does both."""
    configs = [dict(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
               dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])]  # fmt: skip
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**configs[0]))
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**configs[0]))
    for model, lib in ((ours, dt), (theirs, peft)):
        model.add_adapter("a1", lib.LoraConfig(**configs[1]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.delete_adapter("default")
    assert theirs.active_adapter == "a1" and theirs.base_model.model.lm_head.active_adapters == []
    difference = _trainable_names(ours, True) - _trainable_names(theirs, False)
    assert difference == {"base_model.lm_head.modules_to_save.a1.weight"}
    with torch.no_grad():
        ours.base_model.lm_head.modules_to_save["a1"].weight.add_(1.0)
    inputs = tiny_inputs("llama")
    with ours.disable_adapter():
        plain = output_of(ours, inputs)
    assert (output_of(ours, inputs) - plain).abs().max() > 0.1  # a1's head computes
