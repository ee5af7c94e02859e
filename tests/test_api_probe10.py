"""The DeltaModel API against peft 0.21.2's PeftModel: ``set_adapter`` of an adapter loaded for inference (peft trains
it unless ``inference_mode=True``), ``set_requires_grad`` of unknown names (skipped), ``load_adapter`` onto an existing
adapter name (its tensors reloaded) and its return value, ``unload`` with a trained head, ``modules_to_save``,
``autocast_adapter_dtype`` of ``get_delta_model`` / ``add_adapter``, and peft's module functions
``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` (``ignore_mismatched_sizes``) /
``cast_mixed_precision_params``, on one tiny model with LoRA and a trained head."""

from __future__ import annotations

import pytest
import torch
from test_api_probe9b import _same_status
from tiny import output_of, tiny_inputs, tiny_model

import deltatune as dt

peft = pytest.importorskip("peft")
PEFT_022 = tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22)

LORA = dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)


def _saved(tmp_path, seed: int = 0, **overrides):
    """A peft adapter with random tensors (and a trained head) saved at tmp_path/<seed>; its folder."""
    torch.manual_seed(seed)
    src = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**{**LORA, **overrides}))
    src.save_pretrained(tmp_path / str(seed))
    return tmp_path / str(seed)


def _load(path, **kwargs):
    """The folder loaded by peft and by deltatune as adapter "a" (``kwargs``: from_pretrained's)."""
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), path, adapter_name="a", **kwargs)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), path, adapter_name="a", **kwargs)
    return ours, theirs


def _trainable(model) -> int:
    return model.get_nb_trainable_parameters()[0]


def test_set_adapter_trains_an_adapter_loaded_for_inference_unless_inference_mode_as_peft(tmp_path):
    ours, theirs = _load(_saved(tmp_path))
    for model in (ours, theirs):
        model.load_adapter(_saved(tmp_path, 1), "b")  # for inference too
    _same_status(ours, theirs)
    assert _trainable(ours) == 0
    steps = [
        lambda m: m.set_adapter("b"),
        lambda m: m.set_adapter("a", inference_mode=True),
        lambda m: m.set_adapter("a"),
    ]
    for step in steps:
        step(ours)
        step(theirs)
        _same_status(ours, theirs)
        assert _trainable(ours) == _trainable(theirs)
    assert _trainable(ours) > 0 and ours.peft_config["a"].inference_mode == theirs.peft_config["a"].inference_mode
    inputs = tiny_inputs("llama")
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()  # the adapter set active trains
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    with pytest.raises(TypeError, match="inference_mode must be True or False"):
        ours.set_adapter("b", inference_mode="yes")


def test_set_requires_grad_skips_a_name_of_no_adapter_as_peft(tmp_path):
    ours, theirs = _load(_saved(tmp_path), is_trainable=True)
    for model in (ours, theirs):
        model.set_requires_grad(["a", "nope"], requires_grad=False)
    _same_status(ours, theirs)
    for model in (ours, theirs):
        model.set_requires_grad("nope")
    _same_status(ours, theirs)
    with pytest.raises(TypeError, match="requires_grad must be True or False"):
        ours.set_requires_grad("a", requires_grad="no")


def test_load_adapter_onto_an_existing_name_reloads_its_tensors_as_peft(tmp_path):
    ours, theirs = _load(_saved(tmp_path), is_trainable=True)
    other = _saved(tmp_path, 1)
    inputs = tiny_inputs("llama")
    for model in (ours, theirs):
        model.train()
        model.load_adapter(other, "a")  # for inference (the default): the model goes to eval, the flags stay
    assert not ours.training and not theirs.training
    _same_status(ours, theirs)
    assert torch.equal(output_of(ours, inputs), output_of(theirs, inputs))
    fresh = dt.DeltaModel.from_pretrained(tiny_model("llama"), other)
    assert torch.equal(output_of(ours, inputs), output_of(fresh, inputs))
    before = output_of(ours, inputs)
    with pytest.raises(dt.AdapterLoadError, match="rank|shape"):  # another r: refused, the model unchanged
        ours.load_adapter(_saved(tmp_path, 2, r=2), "a")
    assert torch.equal(output_of(ours, inputs), before)


def test_peft_state_dict_functions_over_a_delta_model_as_peft(tmp_path):
    ours, theirs = _load(_saved(tmp_path))
    mine, want = (
        dt.get_peft_model_state_dict(ours, adapter_name="a"),
        peft.get_peft_model_state_dict(theirs, adapter_name="a"),
    )
    assert mine.keys() == want.keys()
    assert all(torch.equal(mine[k], want[k]) for k in want)
    torch.manual_seed(1)
    new = {k: torch.randn_like(v) for k, v in want.items()}
    for model, function in ((ours, dt.set_peft_model_state_dict), (theirs, peft.set_peft_model_state_dict)):
        result = function(model, new, adapter_name="a")
        assert result.unexpected_keys == []
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(ours, inputs), output_of(theirs, inputs))
    key = next(k for k in new if "lora_A" in k)
    odd = {**new, key: torch.randn(2, new[key].shape[1])}
    for model, function in ((ours, dt.set_peft_model_state_dict), (theirs, peft.set_peft_model_state_dict)):
        function(model, {k: v * 2 for k, v in odd.items()}, adapter_name="a", ignore_mismatched_sizes=True)
    assert torch.equal(output_of(ours, inputs), output_of(theirs, inputs))  # the mismatched tensor kept, as peft's
    before = output_of(ours, inputs)
    with pytest.raises(dt.AdapterLoadError):  # not ignored: refused, the model unchanged
        dt.set_peft_model_state_dict(ours, odd, adapter_name="a")
    assert torch.equal(output_of(ours, inputs), before)
    with pytest.raises(ValueError, match="state_dict=: no "):  # a state dict lacking the adapter's tensors
        dt.get_peft_model_state_dict(ours, state_dict={}, adapter_name="a")


@pytest.mark.parametrize("autocast", [True, False])
def test_get_delta_model_autocast_adapter_dtype_as_get_peft_model(autocast):
    config = dict(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        tiny_model("llama").to(torch.bfloat16), peft.LoraConfig(**config), autocast_adapter_dtype=autocast
    )
    torch.manual_seed(0)
    ours = dt.get_delta_model(
        tiny_model("llama").to(torch.bfloat16), dt.LoraConfig(**config), autocast_adapter_dtype=autocast
    )
    mine, want = dt.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert {k: (v.dtype, v.shape) for k, v in mine.items()} == {k: (v.dtype, v.shape) for k, v in want.items()}
    assert all(torch.equal(mine[k], want[k]) for k in want)
    assert all(p.requires_grad for k, p in ours.named_parameters() if "lora_" in k)
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(ours, inputs), output_of(theirs, inputs))


def test_modules_to_save_of_the_model_as_peft():
    made = []
    for kwargs in (dict(modules_to_save=["lm_head"]), dict()):
        theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], **kwargs))
        ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj"], **kwargs))
        assert ours.modules_to_save == theirs.modules_to_save
        made.append((ours, theirs))
    (ours, theirs), _ = made
    for model, config in ((ours, dt.LoraConfig), (theirs, peft.LoraConfig)):
        model.add_adapter("b", config(r=2, target_modules=["v_proj"], modules_to_save=["embed_tokens"]))
    assert ours.modules_to_save == theirs.modules_to_save == {"lm_head", "embed_tokens"}


def test_cast_mixed_precision_params_as_peft():
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**LORA))
    torch.manual_seed(0)
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**LORA))
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    dt.cast_mixed_precision_params(ours, torch.bfloat16)
    dtypes = [(p.dtype, p.requires_grad, p.shape) for p in ours.parameters()]
    assert dtypes == [(p.dtype, p.requires_grad, p.shape) for p in theirs.parameters()]
    assert {d for d, _, _ in dtypes} == {torch.float32, torch.bfloat16}
    inputs = tiny_inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as mixed-precision training computes (the head is float32)
        assert torch.equal(output_of(ours, inputs), output_of(theirs, inputs))
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        dt.cast_mixed_precision_params(ours, torch.int8)


@pytest.mark.parametrize("active", ["a", "b"])
def test_unload_keeps_the_active_adapters_trained_head_as_peft(active):
    """unload() returns a modules_to_save head's original, as peft 0.22's (its ModulesToSaveWrapper's
    unload_and_optionally_merge_module: the original without merging); peft 0.21's gave the active adapter's copy."""
    made = []
    for lib in (peft, dt):
        torch.manual_seed(0)
        base = tiny_model("llama")
        model = (peft.get_peft_model if lib is peft else dt.get_delta_model)(
            base, lib.LoraConfig(**LORA), adapter_name="a"
        )
        model.add_adapter("b", lib.LoraConfig(**{**LORA, "r": 2}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.1 if ".a." in name else -0.2)
        model.set_adapter(active)
        made.append(model.unload())
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(made[0], inputs), output_of(made[1], inputs)) is PEFT_022
    assert type(made[1].lm_head) is torch.nn.Linear
    assert torch.equal(made[1].lm_head.weight, tiny_model("llama").lm_head.weight)
    assert torch.equal(made[0].lm_head.weight, tiny_model("llama").lm_head.weight) is PEFT_022


def test_add_adapter_autocast_adapter_dtype_as_peft():
    config = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    made = []
    for lib in (peft, dt):
        torch.manual_seed(0)
        base = tiny_model("llama").to(torch.bfloat16)
        model = (peft.get_peft_model if lib is peft else dt.get_delta_model)(base, lib.LoraConfig(**config))
        model.add_adapter("b", lib.LoraConfig(**{**config, "r": 2}), autocast_adapter_dtype=True)
        model.add_adapter("c", lib.LoraConfig(**config), autocast_adapter_dtype=False)
        made.append(model)
    ours, theirs = made[1], made[0]
    for name in ("b", "c"):
        mine = dt.get_peft_model_state_dict(ours, adapter_name=name)
        want = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        assert {k: v.dtype for k, v in mine.items()} == {k: v.dtype for k, v in want.items()}
        assert all(torch.equal(mine[k], want[k]) for k in want)
    _same_status(ours, theirs)
    for model in made:
        model.set_adapter("b")
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(ours, inputs), output_of(theirs, inputs))


def test_load_adapter_returns_the_incompatible_keys_as_peft(tmp_path):
    ours, theirs = _load(_saved(tmp_path), is_trainable=True)
    # a new adapter, then onto it again (peft filters its missing keys by the adapter name as a substring: onto "a",
    # whose name is in every key, it would list the other adapters' keys)
    for name in ("second", "second"):
        mine, want = ours.load_adapter(_saved(tmp_path, 1), name), theirs.load_adapter(_saved(tmp_path, 1), name)
        assert (mine.missing_keys, mine.unexpected_keys) == (want.missing_keys, want.unexpected_keys) == ([], [])


def test_load_adapter_takes_peft_positional_arguments(tmp_path):
    """peft's order: (model_id, adapter_name, is_trainable, torch_device, autocast_adapter_dtype, ...)."""
    folder = _saved(tmp_path)
    made = []
    for lib in (peft, dt):
        model = (peft.PeftModel if lib is peft else dt.DeltaModel).from_pretrained(
            tiny_model("llama").to(torch.bfloat16), folder, adapter_name="a"
        )
        model.load_adapter(folder, "b", True, "cpu", True)
        made.append(model)
    theirs, ours = made
    mine, want = (
        dt.get_peft_model_state_dict(ours, adapter_name="b"),
        peft.get_peft_model_state_dict(theirs, adapter_name="b"),
    )
    assert {k: v.dtype for k, v in mine.items()} == {k: v.dtype for k, v in want.items()}
    assert torch.float32 in {v.dtype for v in mine.values()}
    assert _trainable(ours) == _trainable(theirs) > 0
