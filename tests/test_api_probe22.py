"""Probe 22 of the Python API against peft's PeftModel (0.21.2 here, 0.22.0 in CI): peft 0.22's ``healthcheck`` /
``print_healthcheck`` (deltatune/healthcheck.py) and its ``strict_adapter_check`` argument of ``load_adapter`` /
``from_pretrained`` (deltatune/load_options.py)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny import tiny_inputs, tiny_model

import deltatune as dt

peft = pytest.importorskip("peft")
PEFT_022 = tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22)


def _report(model, **limits) -> dict:
    """The healthcheck as JSON would carry it, less the environment (deltatune's version where peft's names peft's)."""
    report = json.loads(json.dumps(model.healthcheck(**limits)))
    report.pop("environment")
    return report


def _codes(report: dict) -> list[str]:
    return [f["code"] for f in report["findings"]]


def _pair(ours_config, their_config, task: str | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dt.get_delta_model(tiny_model("llama", task), ours_config), peft.get_peft_model(
            tiny_model("llama", task), their_config
        )


def test_healthcheck_reports_as_peft_022_does():
    """peft 0.22's PeftModel.healthcheck: its dict key for key (counts, layer types, adapter state, configs, runtime)
    and its findings, through merging, disabling, a second adapter and a frozen active one; a new task head not
    saved; prompt tuning (no layer status). The findings are also the hand-worked codes under peft 0.21, which has
    no healthcheck."""
    ours, theirs = _pair(
        dt.LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        peft.LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    )
    seen = []

    def check(expected: list[str], **limits) -> None:
        report = _report(ours, **limits)
        assert _codes(report) == expected
        if PEFT_022:
            assert report == _report(theirs, **limits)
        seen.append(report)

    check([])
    assert seen[0]["summary"]["trainable_params"] == 5888 and seen[0]["summary"]["num_adapter_layers"] == 5
    assert seen[0]["summary"]["adapter_layer_types"] == {"default": {"lora.Linear": 4, "ModulesToSaveWrapper": 1}}
    check(["HIGH_TRAINABLE_PARAMETER_FRACTION"], max_trainable_params_percent=5)
    check(["TOO_FEW_TRAINABLE_PARAMETERS"], min_trainable_params=10**6)
    assert seen[-1]["is_ready"] is False
    for model in (ours, theirs):
        model.merge_adapter()
    check(["IRREGULAR_MERGED_ADAPTERS"])  # (peft's too: the head's copy, trained in full, never counts as merged)
    for model in (ours, theirs):
        model.unmerge_adapter()
        model.disable_adapter_layers()
    check(["TOO_FEW_TRAINABLE_PARAMETERS", "ADAPTERS_DISABLED", "ACTIVE_ADAPTERS_NOT_TRAINABLE"])  # (all frozen)
    for model in (ours, theirs):
        model.enable_adapter_layers()
    ours.add_adapter("b", dt.LoraConfig(target_modules=["k_proj"]))
    theirs.add_adapter("b", peft.LoraConfig(target_modules=["k_proj"]))
    for model in (ours, theirs):
        model.set_adapter("b", inference_mode=True)  # the head's copy stays with "default": active differs by layer
    check(["TOO_FEW_TRAINABLE_PARAMETERS", "IRREGULAR_ACTIVE_ADAPTERS"])

    ours, theirs = _pair(
        dt.LoraConfig(target_modules=["q_proj"]), peft.LoraConfig(target_modules=["q_proj"]), "seq_cls"
    )
    for model in (ours, theirs):  # as loaded from a causal LM's checkpoint: the classifier is new
        model.get_base_model().config.architectures = ["LlamaForCausalLM"]
    check(["TASK_HEAD_NOT_SAVED"])

    ours, theirs = _pair(
        dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    )
    check([])
    assert "num_adapter_layers" not in seen[-1]["summary"] and seen[-1]["summary"]["trainable_params"] == 128
    assert seen[-1]["model_runtime"]["parameter_dtypes"] == {"float32": 23712}  # the base's, the prompt's apart


def test_print_healthcheck_prints_peft_022s_lines():
    """print_healthcheck: peft's format_healthcheck lines, the title and the version line naming deltatune's."""
    ours, theirs = _pair(dt.LoraConfig(target_modules=["q_proj"]), peft.LoraConfig(target_modules=["q_proj"]))
    for model in (ours, theirs):
        model.merge_adapter()
    printed: list[str] = []
    ours.print_healthcheck(sink=printed.append, indent="    ")
    lines = printed[0].splitlines()
    assert lines[0] == "deltatune healthcheck" and lines[-2:] == [
        "Findings:",
        "    WARNING: Adapter(s) 'default' is/are merged; unmerge them before training.",
    ]
    # 2 x (8x32 + 32x8); deltatune's own line under either peft
    assert "    trainable: 1,024, total: 24,736, percent trainable: 4.1397%, adapter layers: 2" in lines
    if PEFT_022:
        theirs.print_healthcheck(sink=printed.append, indent="    ")
        other = printed[1].splitlines()
        assert [a for a in lines[1:] if "deltatune" not in a] == [b for b in other[1:] if "peft:" not in b]
    with pytest.raises(TypeError, match="min_trainable_params must be a number, got '1'"):
        ours.healthcheck(min_trainable_params="1")


def test_strict_adapter_check_is_peft_022s_argument(tmp_path):
    """peft 0.22's ``strict_adapter_check`` ("warn", "error", "ignore"; peft 0.21 takes and ignores it) is taken by
    load_adapter and from_pretrained (deltatune's refused it, TypeError); another value is refused in peft 0.22's
    words, the model unchanged. The adapter loads with peft's logits."""
    their_base = tiny_model("llama")
    theirs = peft.get_peft_model(their_base, peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    inputs = tiny_inputs("llama")
    expected = theirs(**inputs).logits
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, strict_adapter_check="error")
    torch.testing.assert_close(ours(**inputs).logits, expected)
    for value in ("warn", "ignore"):
        ours.load_adapter(tmp_path, adapter_name=value, strict_adapter_check=value)
        ours.set_adapter(value)
        torch.testing.assert_close(ours(**inputs).logits, expected)
    before = (sorted(ours.peft_config), list(ours.active_adapters), ours.training)
    message = "strict_adapter_check must be one of 'warn', 'error' or 'ignore', got 'strict'"
    with pytest.raises(ValueError, match=message):
        ours.load_adapter(tmp_path, adapter_name="x", strict_adapter_check="strict")
    assert (sorted(ours.peft_config), list(ours.active_adapters), ours.training) == before
    if PEFT_022:  # peft 0.22 refuses it alike
        with pytest.raises(ValueError, match=message):
            theirs.load_adapter(tmp_path, adapter_name="x", strict_adapter_check="strict")
    with pytest.raises(TypeError, match=r"^load_adapter\(\) got an unexpected keyword argument 'strict_adapter_chek'"):
        ours.load_adapter(tmp_path, adapter_name="x", strict_adapter_chek="warn")
    # named as the call the user made (it read load_adapter() from from_pretrained), as peft's Python TypeError
    message = r"^from_pretrained\(\) got an unexpected keyword argument 'strict_adapter_chek'"
    with pytest.raises(TypeError, match=message):
        dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, strict_adapter_chek="warn")


def test_unmerge_adapter_takes_peft_022s_force_reshard():
    """peft 0.22's ``unmerge_adapter(force_reshard=...)`` (FSDP2 shards resharded; deltatune's refused the argument,
    TypeError): the base weights come back as peft's do."""
    ours, theirs = _pair(
        dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=False),
        peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False),
    )
    inputs = tiny_inputs("llama")
    expected = tiny_model("llama")(**inputs).logits
    ours.merge_adapter()
    ours.unmerge_adapter(force_reshard=True)
    assert ours.get_model_status().merged_adapters == []
    with ours.disable_adapter():
        torch.testing.assert_close(ours(**inputs).logits, expected)
    if PEFT_022:
        theirs.merge_adapter()
        theirs.unmerge_adapter(force_reshard=True)
        with theirs.disable_adapter():
            torch.testing.assert_close(theirs(**inputs).logits, expected)


def _dropout_modes(model, name: str) -> list[bool]:
    return [m.training for n, m in model.named_modules() if n.endswith(f"lora_dropout.{name}")]


def test_a_frozen_adapter_computes_without_dropout_as_in_peft_022():
    """peft 0.22: ``set_adapter(name, inference_mode=True)`` and an adapter added with ``inference_mode=True`` put that
    adapter's own submodules (its dropout) in eval mode, the others' modes kept; ``set_adapter(name)`` gives them the
    model's mode again. deltatune's kept the dropout of a frozen adapter on: a model in train mode gave a different
    output at each call (peft 0.21 too). The frozen adapter's train-mode output is now its eval-mode output."""
    config = dict(target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False)
    ours, theirs = _pair(dt.LoraConfig(**config), peft.LoraConfig(**config))
    inputs = tiny_inputs("llama")
    ours.eval()
    expected = ours(**inputs).logits
    for model in (ours, theirs) if PEFT_022 else (ours,):
        model.train()
        model.set_adapter("default", inference_mode=True)
        assert _dropout_modes(model, "default") == [False, False]
        first, second = model(**inputs).logits, model(**inputs).logits
        assert torch.equal(first, second)
        model.add_adapter("b", type(model.peft_config["default"])(**config, inference_mode=True))
        model.add_adapter("c", type(model.peft_config["default"])(**config))
        assert (_dropout_modes(model, "b"), _dropout_modes(model, "c")) == ([False, False], [True, True])
        assert _dropout_modes(model, "default") == [False, False]  # kept by add_adapter
        model.set_adapter("default")
        assert _dropout_modes(model, "default") == [True, True]
    torch.testing.assert_close(first, expected)


def test_healthcheck_of_an_in_place_method_reports_its_counts():
    """A method that injects no layer (BitFit trains the base's biases in place) gets peft's report of a model
    without layer status (counts and adapters), where deltatune's layer status raised ValueError."""
    model = dt.get_delta_model(tiny_model("bert"), dt.BitFitConfig())
    report = model.healthcheck()
    biases = sum(p.numel() for n, p in tiny_model("bert").named_parameters() if n.endswith("bias"))
    assert report["findings"] == [] and report["summary"]["trainable_params"] == biases == 611
    assert report["adapter_state"] == {"active_adapters": ["default"], "available_adapters": ["default"]}
    assert "num_adapter_layers" not in report["summary"]


@pytest.mark.parametrize("how", ["delete_active", "enable_adapter_layers"])
def test_an_adapter_trainable_again_gets_its_dropout_back_as_peft_does(how):
    """An adapter frozen by ``set_adapter(name, inference_mode=True)`` (its dropout in eval mode under peft 0.22) that
    trains again (the active adapter deleted, so it is active again; ``enable_adapter_layers``) has its dropout in the
    model's train mode again: peft 0.22 runs set_adapter(active) there, peft 0.21 never turned it off. deltatune's
    kept it in eval mode. (The ``disable_adapter`` block leaves flags and modes as it found them: docs/methods.md.)"""
    config = dict(target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False)
    ours, theirs = _pair(dt.LoraConfig(**config), peft.LoraConfig(**config))
    for model in (ours, theirs):
        model.train()
        model.set_adapter("default", inference_mode=True)
        if how == "delete_active":
            model.add_adapter("b", type(model.peft_config["default"])(**config))
            model.set_adapter("b")
            model.delete_adapter("b")
        else:
            layers = model if model is ours else model.base_model
            layers.disable_adapter_layers()
            layers.enable_adapter_layers()
    assert _dropout_modes(ours, "default") == _dropout_modes(theirs, "default") == [True, True]


def test_adding_a_bottleneck_adapter_keeps_the_others_modes():
    """Adding a bottleneck adapter puts only its own modules in the model's mode, as peft 0.22's add_adapter (a LoRA's
    test above): a frozen adapter's dropout, and a fusion's, stay in eval mode. deltatune's set every adapter of the
    layer to train mode: the frozen adapter's train-mode output changed from call to call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dt.get_delta_model(tiny_model("llama"), dt.BottleneckConfig(adapter_dropout=0.5, init_weights=False))
    inputs = tiny_inputs("llama")
    model.eval()
    expected = model(**inputs).logits
    model.train()
    model.set_adapter("default", inference_mode=True)
    model.add_adapter("b", dt.BottleneckConfig(adapter_dropout=0.5))
    dropouts = {n: m.training for n, m in model.named_modules() if ".adapter_dropout." in n}
    assert dropouts and all(v == n.endswith(".b") for n, v in dropouts.items())
    torch.testing.assert_close(model(**inputs).logits, expected)  # no dropout: the eval-mode output
    model.add_fusion(["default", "b"], name="ab")
    for fusion in (m for n, m in model.named_modules() if n.endswith("adapter_fusion.ab")):
        fusion.eval()  # (as a frozen fusion would be)
    model.add_adapter("c", dt.BottleneckConfig())
    fusions = [m.training for n, m in model.named_modules() if n.endswith("adapter_fusion.ab")]
    assert fusions and not any(fusions)


def test_an_in_place_adapter_next_to_a_lora_is_available():
    """An adapter trained in place (BitFit's biases: no layer) beside a LoRA is listed among the available adapters of
    get_model_status and the healthcheck, as a model of BitFit alone lists it; deltatune's listed only the LoRA."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dt.get_delta_model(tiny_model("bert"), dt.LoraConfig(target_modules=["query"]))
        model.add_adapter("bf", dt.BitFitConfig())
    model.set_adapter("bf")
    assert model.get_model_status().available_adapters == ["bf", "default"]
    state = model.healthcheck()["adapter_state"]
    assert (state["active_adapters"], state["available_adapters"]) == (["bf"], ["bf", "default"])
