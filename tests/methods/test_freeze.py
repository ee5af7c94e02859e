"""Freeze tuning, BitFit and full fine-tuning (methods/freeze.py): which parameters train, files, errors."""

from __future__ import annotations

import re

import pytest
import torch
from _sst2_learning import check_learns
from tiny import output_of, tiny_inputs, tiny_model

import deltatune as dt


def _trainable(model) -> set[str]:
    return {n for n, p in model.base_model.named_parameters() if p.requires_grad}


def _block(name: str) -> int | None:
    m = re.search(r"\.(?:layers|layer|h|block)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5"])
@pytest.mark.parametrize("n, blocks", [(1, {1}), (-1, {0}), (2, {0, 1}), (-2, {0, 1})])
def test_freeze_trains_exactly_the_chosen_layers(family, n, blocks):
    base = tiny_model(family)
    expected = {name for name, _ in base.named_parameters() if _block(name) in blocks}
    count = sum(p.numel() for name, p in base.named_parameters() if name in expected)
    model = dt.get_delta_model(base, dt.FreezeConfig(freeze_trainable_layers=n))
    assert _trainable(model) == expected
    assert model.get_nb_trainable_parameters()[0] == count
    if family == "t5":  # block i of the encoder and of the decoder
        assert {name.split(".")[0] for name in expected} == {"encoder", "decoder"}


def test_freeze_trainable_modules_list_and_regex():
    model = dt.get_delta_model(
        tiny_model("llama"), dt.FreezeConfig(freeze_trainable_layers=1, freeze_trainable_modules=["mlp"])
    )
    assert _trainable(model) == {f"model.layers.1.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    model = dt.get_delta_model(
        tiny_model("llama"), dt.FreezeConfig(freeze_trainable_layers=-2, freeze_trainable_modules=r"\.o_proj\.")
    )
    assert _trainable(model) == {f"model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)}


def test_freeze_with_classification_head():
    base = tiny_model("bert", task="seq_cls")
    model = dt.get_delta_model(base, dt.FreezeConfig(freeze_trainable_layers=1, task_type="SEQ_CLS"))
    trainable = _trainable(model)
    assert {n for n in trainable if "classifier" in n} == {
        "classifier.modules_to_save.default.weight",
        "classifier.modules_to_save.default.bias",
    }
    assert {_block(n) for n in trainable if "classifier" not in n} == {1}


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(freeze_trainable_layers=1, freeze_trainable_modules=["nope"]), "matches no parameter in blocks"),
    ],
)
def test_freeze_errors_leave_model_unchanged(config, match):
    base = tiny_model("llama")
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    model = dt.DeltaModel(base)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(dt.ConfigError, match=match):
        model.add_adapter("default", dt.FreezeConfig(**config))
    assert not model.peft_config
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


@pytest.mark.parametrize("value, match", [(0, "non-zero integer, got 0"), (1.5, "non-zero integer, got 1.5")])
def test_freeze_config_validation(value, match):
    with pytest.raises(dt.ConfigError, match=f"freeze_trainable_layers must be a {match}"):
        dt.FreezeConfig(freeze_trainable_layers=value)


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "bart"])
def test_bitfit_trains_only_biases(family):
    base = tiny_model(family)
    biases = {n for n, _ in base.named_parameters() if n.endswith(".bias")}
    count = sum(p.numel() for n, p in base.named_parameters() if n in biases)
    if not biases:
        with pytest.raises(dt.ConfigError, match="no bias parameters"):
            dt.get_delta_model(base, dt.BitFitConfig())
        return
    model = dt.get_delta_model(base, dt.BitFitConfig())
    assert _trainable(model) == biases
    assert model.get_nb_trainable_parameters()[0] == count


def test_bitfit_on_a_model_without_biases_is_an_error():
    base = tiny_model("llama")
    with pytest.raises(dt.ConfigError, match="bitfit: the model has no bias parameters"):
        dt.get_delta_model(base, dt.BitFitConfig())
    assert not any(p.requires_grad is False for p in base.parameters())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_full_trains_everything(family):
    base = tiny_model(family)
    total = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    model = dt.get_delta_model(base, dt.FullConfig())
    assert all(p.requires_grad for p in model.parameters())
    assert model.get_nb_trainable_parameters() == (total, total)


@pytest.mark.parametrize(
    "config",
    [dt.FreezeConfig(freeze_trainable_layers=1), dt.BitFitConfig(), dt.FullConfig()],
    ids=["freeze", "bitfit", "full"],
)
def test_train_save_load(config, tmp_path):
    inputs = tiny_inputs("bert")
    model = dt.get_delta_model(tiny_model("bert"), config).train()
    trainable = _trainable(model)
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs).logits.sum().backward()
    opt.step()
    changed = {n for n, p in model.base_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    model.eval()
    out = output_of(model, inputs)
    assert (out - output_of(tiny_model("bert"), inputs)).abs().max() > 1e-5
    with model.disable_adapter():  # in-place training cannot be undone by disabling (documented)
        assert torch.equal(output_of(model, inputs), out)

    model.save_pretrained(tmp_path)
    assert set(model.adapter_state_dict()) == {f"base_model.model.{n}" for n in trainable}
    loaded = dt.DeltaModel.from_pretrained(tiny_model("bert"), tmp_path)
    assert dt.load_config(tmp_path).peft_type == config.peft_type
    assert torch.equal(output_of(loaded, inputs), out)


def test_bitfit_with_lora_skips_lora_params():
    model = dt.get_delta_model(tiny_model("bert"), dt.LoraConfig(r=2))
    model.add_adapter("bf", dt.BitFitConfig())
    model.set_adapter("bf")
    trainable = _trainable(model)
    assert trainable and all(n.endswith(".bias") and ".lora_" not in n for n in trainable)
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable


@pytest.mark.slow
def test_freeze_learns_sst2():
    check_learns(dt.FreezeConfig(freeze_trainable_layers=1, task_type="SEQ_CLS"), lr=1e-3)


@pytest.mark.slow
def test_bitfit_learns_sst2():
    check_learns(dt.BitFitConfig(task_type="SEQ_CLS"), lr=1e-2)
