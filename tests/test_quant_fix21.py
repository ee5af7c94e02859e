"""QLoRA fix 21 (the review of probe 21's commits): deltatune/methods/_lora_conv.py's DoRA merge after another adapter
into a requantised layer, skip_modules on a reload, OLoRA's settle after a whole load, the 4-bit rank bound's shape;
against peft 0.21.2's bitsandbytes LoRA layers on models transformers 5.25 loaded in 4 or 8 bits."""

from __future__ import annotations

import pytest
import torch
from methods.test_quant import BACKENDS
from test_quant_probe21 import _packed
from tiny import tiny_inputs, tiny_model

import deltatune as dt

if "bitsandbytes" not in BACKENDS:
    pytest.skip("bitsandbytes does not run on this CPU", allow_module_level=True)

peft = pytest.importorskip("peft")


def _load(path, bits=4, double_quant=False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = (
        BitsAndBytesConfig(load_in_8bit=True)
        if bits == 8
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=double_quant)
    )  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32
    )


def _base(tmp_path):
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")


def _dequantized(layer) -> torch.Tensor:
    import bitsandbytes as bnb

    w = layer.weight
    if getattr(w, "quant_state", None) is not None:  # 4-bit
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    scb = w.SCB if w.SCB is not None else layer.state.SCB  # int8 x row scale / 127
    return bnb.functional.int8_vectorwise_dequant(w.data, scb).float()


# -- fault (regression of 576732d / 2776980): a requantised merge of a DoRA adapter after another adapter into one 4-bit
# or 8-bit layer dropped the DoRA update: _merge_weights took W before _unmerged_base replayed the earlier adapter
# through the stepwise dequantize, which replaces the layer, so m (W + s B A) / norm went into the old tensor (8-bit:
# merged bytes equal to the first adapter's merge alone; 4-bit: 0.45 off peft's) ------------------------------------
@pytest.mark.parametrize(("bits", "first"), [(4, "dora"), (4, "lora"), (8, "dora"), (8, "lora")])
def test_a_dora_adapter_merged_after_another_into_a_requantized_layer_is_not_dropped(tmp_path, bits, first):
    _base(tmp_path)

    def lora(dora):
        return dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, use_dora=dora)

    torch.manual_seed(5)
    ours = dt.get_delta_model(_load(tmp_path / "base", bits), lora(first == "dora"))
    ours.add_adapter("two", lora(True))
    with torch.no_grad():  # adapter two's update well above the quantisation step
        for name, p in ours.named_parameters():
            if "lora_B" in name and ".two." in name:
                p.mul_(20)
    ours.save_pretrained(tmp_path / "adapter")
    inputs = tiny_inputs("llama")

    def merged(names):
        model = dt.DeltaModel.from_pretrained(_load(tmp_path / "base", bits), tmp_path / "adapter")
        model.load_adapter(tmp_path / "adapter" / "two", adapter_name="two")
        model.set_adapter(["default", "two"])
        out, _ = dt.merge_quantized(model, inputs["input_ids"], requantize=True, adapter_names=names)
        return out

    theirs = peft.PeftModel.from_pretrained(_load(tmp_path / "base", bits), tmp_path / "adapter")
    theirs.load_adapter(tmp_path / "adapter" / "two", adapter_name="two")
    reference = theirs.merge_and_unload(adapter_names=["default", "two"])
    both, one = merged(["default", "two"]), merged(["default"])
    layers = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    for layer in layers:
        a, b, c = (_dequantized(m.get_submodule(layer)) for m in (both, one, reference))
        off, dropped = (a - c).abs().mean().item(), (a - b).abs().mean().item()
        assert off < 1e-3 and dropped > 100 * off and (b - c).abs().mean() > 0.05, (layer, off, dropped)
    with torch.no_grad():  # (train mode: bitsandbytes repacks CPU weights on an eval forward)
        diff = (both.train()(**inputs).logits - reference.train()(**inputs).logits).abs().max().item()
        moved = (one.train()(**inputs).logits - reference.train()(**inputs).logits).abs().max().item()
    # peft's unmerge requantises W before DoRA's norm base (docs/qlora.md): logits 4-bit 0.0008, 8-bit 5e-5 off; the
    # DoRA adapter dropped: 0.06
    assert diff < (2e-3 if bits == 4 else 2e-4) and moved > 0.03, (diff, moved)


# -- fault: a run's model.quantization.skip_modules of a wrong type reached quantize only after the model loaded, and
# on a resume / reload run_load's skip_changes ran first: [5] / ["q_proj", None] a TypeError from targets.py, 5 or a
# dict passed over there. Now build refuses it naming the key, before any model loads; skip_changes names it too ----
@pytest.mark.parametrize("skip", [5, [5], ["q_proj", None], {"q_proj": 1}, "(unclosed"])
def test_a_bad_model_quantization_skip_modules_is_refused_by_build_naming_the_key(skip):
    from deltatune.config import ConfigError
    from deltatune.train.config import build

    raw = {"model": {"name_or_path": "x", "quantization": {"bits": 4, "skip_modules": skip}}}
    with pytest.raises(ConfigError, match=r"^model\.quantization\.skip_modules (must be a list|is not a valid regex)"):
        build(raw)
    for good in (None, ["q_proj"], r"model\.layers\.1"):  # (transformers' kinds: a list of names, a regex)
        raw["model"]["quantization"]["skip_modules"] = good
        assert build(raw).model.quantization["skip_modules"] == good


@pytest.mark.parametrize("skip", [5, [5], ["q_proj", None], {"q_proj": 1}])
def test_skip_changes_of_a_trained_run_names_a_bad_skip_modules(skip):
    from deltatune.config import ConfigError
    from deltatune.train.run_load import _quantize

    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantization = {"bits": 4, "backend": "bitsandbytes", "skip_modules": skip}
    with pytest.raises(ConfigError, match=r"^skip_modules must be a list of module names or a regex string, got "):
        _quantize(model, quantization, trained="a-run")  # (a resume: the trained-run note's check first)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


# -- fault: OLoRA's rank-bound refusal on a 4-bit base printed the packed weight's shape ((2048, 1)), not the layer's
# (out_features, in_features) --------------------------------------------------------------------------------------
def test_olora_rank_bound_on_a_4bit_base_names_the_layers_shape_not_the_packed_one(tmp_path):
    from deltatune.config import ConfigError

    _base(tmp_path)
    model = _load(tmp_path / "base")
    before = model.model.layers[0].mlp.down_proj.weight.data.clone()
    config = dt.LoraConfig(r=100, target_modules=["down_proj"], init_lora_weights="olora")
    with pytest.raises(ConfigError, match=r"exceeds its weight's rank bound 64 \(\(64, 128\)\); "):
        dt.get_delta_model(model, config)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.data, before)


# -- latent fault: a LoRA layer's import_state dropped the base weight its OLoRA / PiSSA init replaced as soon as its own
# tensors were in, so a load failing later in adapter_io.import_tensors' loop (a later layer, Ctrl-C) could not put
# back the layers settled before: their 4-bit base kept the OLoRA residual, the adapter gone. settled_after holds them
# all to the end of the import (wired in adapter_io.import_tensors by fix 21's report diff; emulated here) ------------
def test_a_load_failing_after_some_layers_imported_puts_every_olora_base_back(tmp_path, monkeypatch):
    from deltatune import adapter_io
    from deltatune.methods import _lora_conv
    from deltatune.model import DeltaModel

    def wired(model, name, tensors, source):  # adapter_io.import_tensors with the report's diff
        with _lora_conv.settled_after(model, name):
            adapter_io.import_tensors(model, name, tensors, source)

    monkeypatch.setattr(DeltaModel, "_import", wired)
    _base(tmp_path)
    config = dt.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="olora"
    )
    dt.get_delta_model(_load(tmp_path / "base"), config).save_pretrained(tmp_path / "init")
    inputs = tiny_inputs("llama")
    good = dt.DeltaModel.from_pretrained(_load(tmp_path / "base"), tmp_path / "init")  # went through: residuals kept
    layers = [m for m in good.modules() if isinstance(m, _lora_conv._LoraBase)]
    assert len(layers) == 6 and not any(m.__dict__.get("_pre_init") or m.__dict__.get("_settle_later") for m in layers)
    calls, imported = [], _lora_conv._LoraBase.import_state

    def failing(self, name, prefix, tensors):
        calls.append(prefix)
        if len(calls) == 6:
            raise KeyboardInterrupt  # (the last layer's import: five already in)
        imported(self, name, prefix, tensors)

    monkeypatch.setattr(_lora_conv._LoraBase, "import_state", failing)
    model = _load(tmp_path / "base")
    before = _packed(model)
    with torch.no_grad():  # (train mode: bitsandbytes repacks CPU weights on an eval forward)
        logits = model.train()(**inputs).logits
    with pytest.raises(KeyboardInterrupt):
        dt.DeltaModel.from_pretrained(model, tmp_path / "init")
    after = _packed(model)
    assert len(calls) == 6 and sorted(after) == sorted(before)
    assert not any("lora" in n for n, _ in model.named_modules())
    for name, (param, data, state) in before.items():
        assert after[name][0] is param and torch.equal(after[name][1], data), name  # the Parameter itself back
        assert all(torch.equal(after[name][2][k], v) for k, v in state.items()), name
    with torch.no_grad():
        assert torch.equal(model.train()(**inputs).logits, logits)
