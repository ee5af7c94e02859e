"""Probe 23 (adapters): bottleneck init_weights given as 0 / 1; a second (IA)^3 adapter of another kind at a layer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from deltatune import BottleneckConfig, IA3Config, get_delta_model
from deltatune.config import ConfigError
from deltatune.methods.ia3 import IA3Layer
from tests.tiny import output_of, tiny_inputs, tiny_model


@pytest.mark.parametrize("value", [0, 1, 0.0])
def test_bottleneck_init_weights_number_refused(value):
    # 0 == False passed the membership check but ran True's init for W_down / W_up (``init is not False``) and
    # False's for the gate: half of each; a number is refused as the other switches are
    with pytest.raises(ConfigError, match="init_weights must be True, False"):
        BottleneckConfig(init_weights=value, use_gating=True)


def test_bottleneck_init_weights_number_in_a_file_loads():
    # a file saved with 0 / 1 (accepted before) still loads: its weights come from the file, not the init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert BottleneckConfig.from_dict({"init_weights": 1}).init_weights is True
        assert BottleneckConfig.from_dict({"init_weights": 0}).init_weights is False
    assert BottleneckConfig.from_dict({"init_weights": "bert"}).init_weights == "bert"


def test_ia3_second_adapter_other_kind_at_a_layer_refused():
    # A marks down_proj feed-forward (input scaled, (1, d_in)); B targets it as not feed-forward. The layer's kind won:
    # B got A's (1, 48) vector, against its own config, and its file loaded nowhere else (peft: a size mismatch too)
    model = tiny_model("llama")
    a = dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    delta = get_delta_model(copy.deepcopy(model), IA3Config(**a))
    before = {n: p.clone() for n, p in delta.named_parameters()}
    b = IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=[])
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj .*feed-forward"):
        delta.add_adapter("b", b)
    assert list(delta.peft_config) == ["default"]  # nothing changed
    assert not any(isinstance(m, IA3Layer) for n, m in delta.named_modules() if n.endswith("v_proj"))
    assert {n: p for n, p in delta.named_parameters()}.keys() == before.keys()
    assert b.target_modules == ["v_proj", "down_proj"] and b.feedforward_modules == []
    # the same kind is taken, and computes as the product of the two vectors (hand-worked: both 1 at the start)
    delta.add_adapter("c", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    layer = delta.get_submodule("base_model.model.layers.0.mlp.down_proj")
    assert layer.ia3_l["c"].shape == (1, 48)
    x = tiny_inputs("llama")
    delta.set_adapter(["default", "c"])
    torch.testing.assert_close(output_of(delta, x), output_of(model, x))


@pytest.mark.parametrize("method", ["ia3", "bottleneck"])
def test_new_adapter_beside_a_pissa_residual_refused(method):
    # PiSSA left q_proj's base as W - B0 A0: a new (IA)^3 / bottleneck adapter alone computed with that residual and
    # started 9e-4 off the base model (a new LoRA was refused already); refused alike, nothing changed
    from deltatune import LoraConfig

    model = tiny_model("llama")
    delta = get_delta_model(
        copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
    )
    config = IA3Config(target_modules=["k_proj"]) if method == "ia3" else BottleneckConfig()
    names = [n for n, _ in delta.named_modules()]
    with pytest.raises(ConfigError, match=rf"^{method}: adapter 'default' was initialised from the base \(PiSSA"):
        delta.add_adapter("new", config)
    assert list(delta.peft_config) == ["default"] and [n for n, _ in delta.named_modules()] == names
    # a plain LoRA beside it is refused too; once converted (on the original base) the new adapter starts as the base
    x = tiny_inputs("llama")
    plain = get_delta_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    plain.add_adapter("new", config)
    plain.set_adapter("new")
    torch.testing.assert_close(output_of(plain, x), output_of(model, x))


def test_new_adapter_after_the_pissa_lora_deleted_taken_as_lora():
    # LoRA's own check reads only the residuals of adapters the module still holds: a new LoRA is taken after the
    # PiSSA adapter is deleted, and so is an (IA)^3 adapter (the first _base_kept refused it: its left-over name)
    from deltatune import LoraConfig

    delta = get_delta_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    delta.delete_adapter("default")
    delta.add_adapter("lora", LoraConfig(r=2, target_modules=["o_proj"]))
    delta.add_adapter("ia3", IA3Config(target_modules=["k_proj"]))
    assert sorted(delta.peft_config) == ["ia3", "lora"]
