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
PEFT_022 = tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22)  # its prompt-learning / head fixes

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
    # peft's names (adapter name included); peft's also lists every base weight (left out on purpose)
    assert result.missing_keys == [k for k in result_theirs.missing_keys if "lora" in k]
    assert result.missing_keys == [dropped.replace(".weight", ".default.weight")]
    assert torch.equal(dt.get_peft_model_state_dict(ours)[dropped], kept)
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(ours, inputs), output_of(theirs, inputs))


# -- 5. trainability against peft ------------------------------------------------------------------------------------
HEADS = [
    dict(r=2, target_modules=["query"], task_type="SEQ_CLS"),
    dict(r=2, target_modules=["query"], task_type="SEQ_CLS", lora_dropout=0.1),
    dict(r=4, target_modules=["query"], task_type="SEQ_CLS", modules_to_save=["classifier"]),
]
APART = [  # adapters on different modules, one with a second head copy (the pooler)
    dict(r=2, target_modules=["query"], task_type="SEQ_CLS"),
    dict(r=2, target_modules=["value"], task_type="SEQ_CLS", modules_to_save=["classifier", "pooler"]),
    dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
]


def _sequence(seed: int, folder, configs: list[dict] = HEADS) -> tuple[list, str | None]:
    """A random sequence of adapter operations done on deltatune and on peft (seq-cls BERT, LoRA and a head copy per
    adapter); the first step after which the trainable names differ. With adapters on different modules (``APART``) a
    delete of an active adapter is followed by ``set_adapter`` of the first one left by name on both: what each
    activates on its own there differs on purpose (``test_deleting_the_only_active_adapter_...``)."""
    rng = random.Random(seed)
    first = rng.randrange(len(configs))
    ours = dt.get_delta_model(tiny_model("bert", "seq_cls"), dt.LoraConfig(**copy.deepcopy(configs[first])))
    theirs = peft.get_peft_model(tiny_model("bert", "seq_cls"), peft.LoraConfig(**copy.deepcopy(configs[first])))
    done, k = [], 0
    for step in range(8):
        names = list(theirs.peft_config)
        op = rng.choice(["add", "add", "set", "set_frozen", "delete", "disable", "enable", "load"])
        if op == "add":
            k, which, frozen = k + 1, rng.randrange(len(configs)), rng.random() < 0.2
            args = (f"a{k}", which, frozen)

            def act(m, lib, a=args):
                m.add_adapter(a[0], lib.LoraConfig(**copy.deepcopy(configs[a[1]]), inference_mode=a[2]))
        elif op in ("set", "set_frozen"):
            args = (rng.choice(names),)

            def act(m, lib, a=args, op=op):
                m.set_adapter(a[0], inference_mode=op == "set_frozen")
        elif op == "delete":
            if len(names) < 2:
                continue
            args = (rng.choice(names),)
            resync = (
                sorted(set(names) - {args[0]})[0] if configs is not HEADS and args[0] in ours.active_adapters else None
            )

            def act(m, lib, a=args, resync=resync):
                m.delete_adapter(a[0])
                if resync is not None:
                    m.set_adapter(resync)
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


@pytest.mark.parametrize("configs", [HEADS, APART], ids=["same_modules", "different_modules"])
def test_trainable_parameters_follow_peft_over_random_adapter_sequences(tmp_path, configs):
    differ = [(seed, *_sequence(seed, tmp_path, configs)) for seed in range(24)]
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
    """Kept on purpose: peft 0.21's P-tuning model with inference_mode=True trains its prompt encoder's embedding (128)
    and, after set_adapter(inference_mode=True), the whole encoder (1,472); deltatune's freezes it, as the flag says
    (and as peft 0.22's does)."""
    config = dict(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16, inference_mode=True)
    ours = dt.get_delta_model(tiny_model("bert", "seq_cls"), dt.PromptEncoderConfig(**config))
    theirs = peft.get_peft_model(tiny_model("bert", "seq_cls"), peft.PromptEncoderConfig(**config))
    assert _count(ours) == 0 and _count(theirs) == (0 if PEFT_022 else 128)
    for model in (ours, theirs):
        model.set_adapter("default")
    # kept: set_adapter trains the adapter (as peft's docstring says); peft 0.22's prompt-learning path touches only
    # the head copy (99), its encoder staying frozen from inference_mode=True
    assert _count(ours) == 227 and _count(theirs) == (99 if PEFT_022 else 227)


# -- 6. prepare_model_for_kbit_training ------------------------------------------------------------------------------
def kbit_state(model):
    """What prepare_model_for_kbit_training leaves: dtypes, trainability, checkpointing, input grads (one forward)."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    model.train()
    model(**tiny_inputs("llama"))
    hook.remove()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    return dtypes, [p.requires_grad for p in model.parameters()], model.is_gradient_checkpointing, seen


@pytest.mark.parametrize("kwargs", [{"gradient_checkpointing_kwargs": {"use_reentrant": True}},
                                    {"use_gradient_checkpointing": False}])  # fmt: skip
def test_prepare_model_for_kbit_training_as_peft_on_a_kbit_model(kwargs):
    models = [tiny_model("llama").to(torch.bfloat16) for _ in range(2)]
    for model in models:
        model.is_loaded_in_4bit = True  # what peft reads (bitsandbytes sets it)
    peft.prepare_model_for_kbit_training(models[0], **kwargs)
    assert dt.prepare_model_for_kbit_training(models[1], **kwargs) is models[1]
    assert kbit_state(models[1]) == kbit_state(models[0])
    assert set(kbit_state(models[1])[0].values()) == {torch.float32}


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
    # peft 0.22 tells every head wrapper of the new active adapter: its a1 head computes and trains, as deltatune's
    assert theirs.active_adapter == "a1" and theirs.base_model.model.lm_head.active_adapters == (["a1"] if PEFT_022
                                                                                                 else [])  # fmt: skip
    difference = _trainable_names(ours, True) - _trainable_names(theirs, False)
    assert difference == (set() if PEFT_022 else {"base_model.lm_head.modules_to_save.a1.weight"})
    with torch.no_grad():
        ours.base_model.lm_head.modules_to_save["a1"].weight.add_(1.0)
    inputs = tiny_inputs("llama")
    with ours.disable_adapter():
        plain = output_of(ours, inputs)
    assert (output_of(ours, inputs) - plain).abs().max() > 0.1  # a1's head computes


# -- 7. review 11b: inject with a task type, a base weight by its unwrapped name, kept differences -------------------
def test_inject_adapter_in_model_with_a_task_type_adds_no_head_copy_as_peft():
    """peft's inject_adapter_in_model leaves task_type to its PeftModelFor... classes: no classifier copy trains or is
    saved; a head the config's modules_to_save names is wrapped, as peft's."""
    for extra, trained in (({}, 4), ({"modules_to_save": ["classifier"]}, 6)):
        kw = dict(r=2, target_modules=["query"], task_type="SEQ_CLS", init_lora_weights=False, **extra)
        torch.manual_seed(0)
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kw), tiny_model("bert", "seq_cls"))
        ours = dt.inject_adapter_in_model(dt.LoraConfig(**kw), tiny_model("bert", "seq_cls"))
        assert (
            _trainable_names(ours, True) == _trainable_names(theirs, True)
            and len(_trainable_names(ours, True)) == trained
        )
        assert (
            hasattr(ours.classifier, "modules_to_save") == hasattr(theirs.classifier, "modules_to_save") == bool(extra)
        )
        state = peft.get_peft_model_state_dict(theirs)
        assert sorted(dt.get_peft_model_state_dict(ours)) == sorted(state)
        result = dt.set_peft_model_state_dict(ours, state)
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert ours.peft_config["default"].modules_to_save == theirs.peft_config["default"].modules_to_save
        inputs = tiny_inputs("bert")
        assert torch.equal(output_of(ours, inputs), output_of(theirs, inputs))
    dt.inject_adapter_in_model(dt.LoraConfig(r=2, target_modules=["value"], task_type="SEQ_CLS"), ours, "b")
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["value"], task_type="SEQ_CLS"), theirs, "b")
    assert _trainable_names(ours, True) == _trainable_names(theirs, True)
    assert "b" not in ours.classifier.modules_to_save


def test_set_peft_model_state_dict_takes_a_base_weight_only_by_its_name_in_the_wrapped_model():
    """``q_proj.weight`` of a q_proj that has a LoRA layer is no key of the model (its weight is
    ``q_proj.base_layer.weight``): unexpected and left out, as peft's; the wrapped name and an unwrapped module's weight
    load into the base, as peft's."""
    layer = "base_model.model.model.layers.0."
    cases = [("self_attn.q_proj.weight", (32, 32), True), ("self_attn.q_proj.base_layer.weight", (32, 32), False),
             ("mlp.up_proj.weight", (48, 32), False)]  # fmt: skip
    inputs = tiny_inputs("llama")
    for key, shape, unexpected in cases:
        torch.manual_seed(0)
        theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA))
        ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA))
        dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
        before = output_of(ours, inputs)
        state = dict(peft.get_peft_model_state_dict(theirs))
        state[layer + key] = torch.full(shape, 0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = dt.set_peft_model_state_dict(ours, state)
        result_theirs = peft.set_peft_model_state_dict(theirs, state)
        assert result.unexpected_keys == result_theirs.unexpected_keys == ([layer + key] if unexpected else [])
        assert any("1 unexpected key(s) left out" in str(w.message) for w in caught) == unexpected
        after = output_of(ours, inputs)
        assert torch.equal(after, output_of(theirs, inputs))
        assert torch.equal(after, before) == unexpected  # left out, or loaded (the output moves, 0.048 / 0.366)


def test_deleting_the_only_active_adapter_activates_peft_s_choice_layer_by_layer():
    """With the remaining adapters on different modules, peft's layers each pick a new active adapter (query keeps
    'default', value takes 'a2'), the model its first layer's; deltatune as peft (session 59: it activated the first
    remaining adapter by name for the whole model). Kept on purpose: where peft's first layer has none left, peft's
    model has nothing active while a layer computes one; deltatune activates the first remaining adapter by name."""
    both = dict(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    value = dict(r=2, target_modules=["value"], task_type="SEQ_CLS")
    models = {}
    for lib, make in ((dt, dt.get_delta_model), (peft, peft.get_peft_model)):
        m = make(tiny_model("bert", "seq_cls"), lib.LoraConfig(**both))
        m.add_adapter("x", lib.LoraConfig(**both))
        m.add_adapter("a2", lib.LoraConfig(**value))
        m.set_adapter("x")
        m.delete_adapter("x")
        models[lib] = m
    ours, theirs = models[dt], models[peft]
    mine = ours.base_model.bert.encoder.layer[0].attention.self
    their = theirs.base_model.model.bert.encoder.layer[0].attention.self
    assert their.query.active_adapters == mine.query.active_adapters == ["default"]
    assert their.value.active_adapters == mine.value.active_adapters == ["a2"]
    assert ours.active_adapters == theirs.active_adapters == ["default"] == ours.base_model.classifier.active_adapters
    assert theirs.base_model.model.classifier.active_adapters == ["default"]
    assert {n.split(".")[-2] for n in _trainable_names(ours, True)} == {"a2", "default"}
    assert {n.split(".")[-2] for n in _trainable_names(theirs, False)} == {"a2", "default"}
    # nothing active in peft's model (its first layer held only 'default') while its value layers compute a1
    pooled = dict(r=2, target_modules=["value"], task_type="SEQ_CLS", modules_to_save=["classifier", "pooler"])
    for lib, make in ((dt, dt.get_delta_model), (peft, peft.get_peft_model)):
        m = make(tiny_model("bert", "seq_cls"), lib.LoraConfig(**both))
        m.add_adapter("a1", lib.LoraConfig(**pooled))
        m.delete_adapter("default")
        models[lib] = m
    ours, theirs = models[dt], models[peft]
    assert theirs.active_adapters == [] and theirs.base_model.model.classifier.active_adapters == []
    assert ours.active_adapters == ["a1"] == ours.base_model.classifier.active_adapters
    assert _count(theirs) == 2 * 2 * (2 * 32) and _count(ours) == _count(theirs) + (32 * 3 + 3) + (32 * 32 + 32)


@pytest.mark.parametrize("method", ["PrefixTuningConfig", "PromptTuningConfig"])
def test_prompt_learning_trainability_kept_apart_from_peft(tmp_path, method):
    """Kept on purpose (peft 0.21.2's prompt-learning paths, each a side effect): peft's add_adapter / load_adapter
    leave the new inactive adapter's prompt embedding trainable (its LoRA path leaves a new inactive adapter frozen, as
    deltatune does); its set_adapter(inference_mode=True) keeps the prompt training; its load_adapter(is_trainable=False)
    freezes the active adapter's head copy (peft 0.22's leaves the loaded prompt frozen, as deltatune's); its
    load_adapter(is_trainable=True) refuses ("Cannot set a prompt learning
    adapter to trainable"), where deltatune loads the adapter trainable, as for every other method."""
    kw = dict(task_type="SEQ_CLS", num_virtual_tokens=4)

    def names(model, ours):
        found = _trainable_names(model, ours)
        return {n.replace("base_model.virtual_tokens.", "", 1) for n in found} if ours else found

    head = {
        "base_model.classifier.modules_to_save.default.weight",
        "base_model.classifier.modules_to_save.default.bias",
    }
    prompt = "prompt_encoder.{}.embedding.weight"
    for step in ("add", "set_inference", "load_inference"):
        torch.manual_seed(0)
        ours = dt.get_delta_model(tiny_model("bert", "seq_cls"), getattr(dt, method)(**kw))
        theirs = peft.get_peft_model(tiny_model("bert", "seq_cls"), getattr(peft, method)(**kw))
        for m, lib in ((ours, dt), (theirs, peft)):
            if step == "add":
                m.add_adapter("a1", getattr(lib, method)(**kw))
            elif step == "set_inference":
                m.set_adapter("default", inference_mode=True)
            else:
                m.save_pretrained(tmp_path / lib.__name__)
                m.load_adapter(tmp_path / lib.__name__, "a1", is_trainable=False)
        mine, their = names(ours, True), names(theirs, False)
        expected = {"add": (set(), {prompt.format("a1")}), "set_inference": (set(), {prompt.format("default")}),
                    "load_inference": (head, set() if PEFT_022 else {prompt.format("a1")})}[step]  # fmt: skip
        assert (mine - their, their - mine) == expected, step
        assert mine == (set() if step == "set_inference" else head | {prompt.format("default")}), step
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        theirs.load_adapter(tmp_path / "peft", "a2", is_trainable=True)
    inputs = tiny_inputs("bert")
    ours.load_adapter(tmp_path / "deltatune", "a2", is_trainable=True)
    assert {prompt.format("a2")} <= names(ours, True)
    ours.eval()
    reference = output_of(ours, inputs)
    ours.set_adapter("a2")
    assert torch.equal(output_of(ours, inputs), reference)  # a2 is default's file
