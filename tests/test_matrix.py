"""Properties every method holds on every model family (tests/matrix.py): FAMILIES x METHODS, and the layer methods
on the vision-language families (VLM: a tiny LLaVA and BLIP-2, adapted in the language tower).

Each equality check can fail: ``changed=True`` configs make the adapter alter the outputs first, and the
test asserts that they do.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from matrix import FAMILIES, METHODS, TASKS, VLM, MethodRow, tiny_vlm, vlm_inputs
from tiny import _AUTO, output_of, tiny_inputs, tiny_model
from tolerances import ATOL, WEIGHT_ATOL
from transformers import AutoModelForImageTextToText

import deltatune as dt
from deltatune import towers
from deltatune.layer import DeltaLayer

ATOL32 = ATOL[torch.float32]
CASES = [
    pytest.param(f, m, id=f"{f}-{m.id}") for m in METHODS for f in (*FAMILIES, *VLM) if f in (m.families or FAMILIES)
]
COUNTED = [case for case in CASES if case.values[1].trainable is not None]
MERGEABLE = [case for case in CASES if case.values[1].mergeable]


@functools.cache
def _base(family: str, make=None) -> torch.nn.Module:
    return make(family) if make else tiny_vlm(family) if family in VLM else tiny_model(family)


def inputs_of(family: str) -> dict:
    return vlm_inputs(family) if family in VLM else tiny_inputs(family)


def config_of(family: str, row: MethodRow, changed: bool, base: torch.nn.Module) -> dt.DeltaConfig:
    """The row's config; on a VLM resolved inside the language tower (``method.towers``' default)."""
    config = row.config(family, changed)
    return towers.restrict(base, config) if family in VLM else config


def fresh(family: str, row: MethodRow | None = None) -> torch.nn.Module:
    """A new copy of the base the row adapts: the family's seeded tiny model, or the row's own (built once)."""
    return copy.deepcopy(_base(family, row.base if row else None))


def adapted(family: str, row: MethodRow, changed: bool, seed: int = 0) -> dt.DeltaModel:
    base = fresh(family, row)
    torch.manual_seed(seed)
    config = config_of(family, row, changed, base)
    if row.build:
        return row.build(base, config, changed, seed).eval()
    return dt.get_delta_model(base, config).eval()


def reload(family: str, row: MethodRow, folder) -> dt.DeltaModel:
    load = row.load or dt.DeltaModel.from_pretrained
    return load(fresh(family, row), str(folder)).eval()


def delta_layers(model: torch.nn.Module) -> list[DeltaLayer]:
    return [m for _, m in model.named_modules() if isinstance(m, DeltaLayer)]


def plain_name(name: str) -> str:
    """A parameter's name in the plain model: wrappers keep the wrapped module as base_layer / original_module."""
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def base_weights(model: dt.DeltaModel, family: str, row: MethodRow) -> dict[str, torch.Tensor]:
    """Clones of the base model's own parameters (those the plain model has), keyed by their plain name; 4-bit
    weights as the values they stand for."""
    plain = {n for n, _ in _base(family, row.base).named_parameters()}
    named = ((plain_name(n), p) for n, p in model.base_model.named_parameters())
    return {n: _value(p) for n, p in named if n in plain}


def _value(p: torch.Tensor) -> torch.Tensor:
    """A parameter's values: a 4-bit weight (torchao's NF4Tensor, bitsandbytes' Params4bit) dequantised."""
    from deltatune.methods.quant import _dequantize_weight

    if type(p.data).__name__ == "NF4Tensor":
        return _dequantize_weight(p.data, "torchao").clone()
    if hasattr(p, "quant_state"):
        return _dequantize_weight(p, "bitsandbytes").clone()
    return p.detach().clone()


@pytest.mark.parametrize("family, row", CASES)
def test_init_equals_base_and_changed_differs(family, row):
    inputs = inputs_of(family)
    base_out = output_of(fresh(family, row), inputs)
    if row.init_atol is not None:
        out = output_of(adapted(family, row, changed=False), inputs)
        if row.init_atol == 0.0:
            assert torch.equal(out, base_out), f"max diff {(out - base_out).abs().max()}"
        else:
            torch.testing.assert_close(out, base_out, atol=row.init_atol, rtol=0)
    if row.in_place:  # nothing added: only training changes the outputs (test_one_step_changes_only_adapter)
        return
    changed = output_of(adapted(family, row, changed=True), inputs)
    assert (changed - base_out).abs().max() > ATOL32, "a non-zero adapter must change the outputs"


@pytest.mark.parametrize("family, row", COUNTED)
def test_trainable_count(family, row):
    model = adapted(family, row, changed=False)
    expected = row.trainable(fresh(family, row), row.config(family, False), family)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    assert model.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize("family, row", CASES)
def test_one_step_changes_only_adapter(family, row):
    model = adapted(family, row, changed=False).train()
    before = {n: _value(p) for n, p in model.named_parameters()}
    frozen_before = base_weights(model, family, row)
    reference = {n: _value(p) for n, p in fresh(family, row).named_parameters()}
    assert frozen_before.keys() == reference.keys()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(**inputs_of(family)).logits.sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"trainable parameters the forward pass never used: {unused}"
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(_value(p), before[n])}
    assert changed, "the optimizer step changed nothing"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    # base parameters an adapter trains on purpose, e.g. the biases of bias="lora_only"
    trained_base = {plain_name(n) for n, p in model.base_model.named_parameters() if p.requires_grad}
    for name, p in base_weights(model, family, row).items():
        if name not in trained_base:
            assert torch.equal(p, frozen_before[name]), f"base parameter {name} changed"
            assert torch.equal(p, reference[name]), f"base parameter {name} differs from the untouched base"


@pytest.mark.parametrize("family, row", MERGEABLE)
def test_merge(family, row, tmp_path):
    inputs = inputs_of(family)
    model = adapted(family, row, changed=True)
    unmerged = output_of(model, inputs)
    w0 = base_weights(model, family, row)

    model.merge_adapter()
    assert any(layer.merged for layer in delta_layers(model))
    merged = output_of(model, inputs)
    torch.testing.assert_close(merged, unmerged, atol=ATOL32, rtol=0)
    w1 = base_weights(model, family, row)
    assert any(not torch.equal(w1[n], w0[n]) for n in w0), "merging changed no base weight"

    model.merge_adapter()  # twice: nothing changes
    for name, w in base_weights(model, family, row).items():
        assert torch.equal(w, w1[name]), f"a second merge changed {name}"

    model.unmerge_adapter()
    for name, w in base_weights(model, family, row).items():
        torch.testing.assert_close(w, w0[name], atol=WEIGHT_ATOL, rtol=0, msg=f"unmerge did not restore {name}")
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=ATOL32, rtol=0)

    plain = model.merge_and_unload()
    assert not delta_layers(plain), "merge_and_unload left deltatune modules"
    out = output_of(plain, inputs)
    torch.testing.assert_close(out, unmerged, atol=ATOL32, rtol=0)
    plain.save_pretrained(tmp_path)
    auto = AutoModelForImageTextToText if family in VLM else _AUTO[TASKS[family]]
    reloaded = auto.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(output_of(reloaded, inputs), out, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("family, row", CASES)
def test_save_load_switch_disable(family, row, tmp_path):
    inputs = inputs_of(family)
    base_out = output_of(fresh(family, row), inputs)
    model = adapted(family, row, changed=True, seed=1)
    out1 = output_of(model, inputs)

    model.save_pretrained(tmp_path)
    loaded = reload(family, row, tmp_path)
    assert torch.equal(output_of(loaded, inputs), out1)
    if row.in_place:
        return _in_place_save_load(family, row, model, tmp_path)

    # a second adapter: inactive until chosen, then it alone computes, and switching back restores the first
    torch.manual_seed(2)
    other = config_of(family, row, True, model.get_base_model())
    if getattr(other, "bias", "none") != "none":  # one adapter trains the base biases (peft refuses a second)
        other = other.replace(bias="none")
    model.add_adapter("other", other)
    assert torch.equal(output_of(model, inputs), out1)
    model.set_adapter("other")
    out2 = output_of(model, inputs)
    assert (out2 - out1).abs().max() > ATOL32
    assert torch.equal(out2, output_of(adapted(family, row, changed=True, seed=2), inputs))
    model.set_adapter("default")
    assert torch.equal(output_of(model, inputs), out1)

    with model.disable_adapter():
        assert torch.equal(output_of(model, inputs), base_out)
    assert torch.equal(output_of(model, inputs), out1)

    if row.mergeable:
        model.merge_adapter()
        merged_layers = [layer for layer in delta_layers(model) if layer.merged]
        assert merged_layers
        with model.disable_adapter():
            torch.testing.assert_close(output_of(model, inputs), base_out, atol=ATOL32, rtol=0)
        assert all(layer.merged for layer in merged_layers), "disable_adapter did not restore the merge"
        torch.testing.assert_close(output_of(model, inputs), out1, atol=ATOL32, rtol=0)
        # switching away from a merged adapter must not leave its update in the weights
        model.set_adapter("other")
        torch.testing.assert_close(output_of(model, inputs), out2, atol=ATOL32, rtol=0)
        model.set_adapter("default")
        torch.testing.assert_close(output_of(model, inputs), out1, atol=ATOL32, rtol=0)

    # deleting the active adapter activates the remaining one (as PEFT does)
    model.delete_adapter("default")
    if row.build is None:  # the only other adapter becomes the active one
        assert model.active_adapters == ["other"]
    else:  # the fused adapters remain too: the first remaining one is active (as in PEFT); choose the fusion
        assert model.active_adapters == [next(iter(model.peft_config))]
        model.set_adapter("other")
    torch.testing.assert_close(output_of(model, inputs), out2, atol=ATOL32, rtol=0)


def _in_place_save_load(family: str, row: MethodRow, model: dt.DeltaModel, tmp_path) -> None:
    """An in-place method saves the base parameters it trains: perturb them, save, load into a fresh base."""
    inputs = inputs_of(family)
    trained = [p for p in model.base_model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trained:
            p.add_(torch.randn_like(p) * 0.1)
    out = output_of(model, inputs)
    assert (out - output_of(fresh(family, row), inputs)).abs().max() > ATOL32
    model.save_pretrained(tmp_path / "trained")
    loaded = reload(family, row, tmp_path / "trained")
    assert torch.equal(output_of(loaded, inputs), out)
