"""QLoRA probe 21 (deltatune/methods/quant_tools.py, _quant_steps.py) against peft 0.21.2's bitsandbytes LoRA layers on
a model transformers 5.25 loaded with BitsAndBytesConfig(load_in_4bit=True)."""

from __future__ import annotations

import pytest
import torch
from methods.test_quant import BACKENDS
from tiny import tiny_inputs, tiny_model

import deltatune as dt

if "bitsandbytes" not in BACKENDS:
    pytest.skip("bitsandbytes does not run on this CPU", allow_module_level=True)

peft = pytest.importorskip("peft")


def _load(path, dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=dtype)


def _two_adapters(tmp_path, dtype):
    """Ours and peft's, adapters "default" and "two" (LoRA, drawn B) on the same 4-bit weights."""
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    lora = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    ours = dt.get_delta_model(_load(tmp_path / "base", dtype), lora)
    ours.add_adapter("two", lora)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_load(tmp_path / "base", dtype), tmp_path / "adapter")
    theirs.load_adapter(tmp_path / "adapter" / "two", adapter_name="two")
    return ours, theirs


# -- fault: a requantised merge of two adapters into one 4-bit layer added both updates to W and quantised once; peft's
# bnb Linear4bit.merge quantises W + s1 B1 A1 before adding s2 B2 A2: other 4-bit codes in every layer, logits 0.13 off
# (fp32) -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "names", "safe"),
    [(torch.float32, ["default", "two"], False), (torch.bfloat16, ["two", "default"], True)],
)
def test_requantized_merge_of_two_adapters_equals_peft_byte_for_byte(tmp_path, dtype, names, safe):
    ours, theirs = _two_adapters(tmp_path, dtype)
    inputs = tiny_inputs("llama")
    merged, report = dt.merge_quantized(
        ours, inputs["input_ids"], requantize=True, adapter_names=names, safe_merge=safe
    )
    reference = theirs.merge_and_unload(adapter_names=names, safe_merge=safe)
    layers = [
        f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    for layer in layers:
        a, b = merged.get_submodule(layer).weight, reference.get_submodule(layer).weight
        assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax), layer
        assert a.quant_state.dtype == b.quant_state.dtype, layer
    with torch.no_grad():  # (train mode: bitsandbytes repacks CPU weights on an eval forward)
        assert torch.equal(merged.train()(**inputs).logits, reference.train()(**inputs).logits)
    assert report.requantized and len(report.quantized) == 14


def _olora_pair(tmp_path, dtype, ours_init):
    """Ours (init ``ours_init``) and peft's OLoRA model on the same 4-bit weights (transformers' loading)."""
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = dt.get_delta_model(_load(tmp_path / "base", dtype),
                              dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=ours_init))  # fmt: skip
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="olora")
    return ours, peft.get_peft_model(_load(tmp_path / "base", dtype), config)


def _assert_olora_as_peft(ours, theirs, inputs):
    adapted = [(n, m) for n, m in ours.get_base_model().named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 6
    for name, layer in adapted:
        other = theirs.get_base_model().get_submodule(name)
        a, b = layer.base_layer.weight, other.base_layer.weight
        assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax), name
        assert a.quant_state.dtype == b.quant_state.dtype and a.quant_state.quant_type == b.quant_state.quant_type
        for ab in ("lora_A", "lora_B"):
            assert torch.equal(getattr(layer, ab)["default"].weight, getattr(other, ab)["default"].weight), (name, ab)
    with torch.no_grad():  # (train mode: bitsandbytes repacks CPU weights on an eval forward)
        assert torch.equal(ours.train()(**inputs).logits, theirs.train()(**inputs).logits)


# -- carried fault: OLoRA on a 4-bit base was refused; peft's olora_init dequantises W, factors it and quantises the
# residual W - s B A again (Params4bit with the weight's quant type, storage, double quantisation): _quant_olora.py ----
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_olora_on_a_4bit_layer_equals_peft_olora_init_byte_for_byte(tmp_path, dtype):
    from deltatune.methods import _quant_olora

    ours, theirs = _olora_pair(tmp_path, dtype, True)
    for layer in [m for m in ours.get_base_model().modules() if hasattr(m, "lora_A")]:
        original, placed = layer.base_layer.weight, layer.lora_A["default"].weight.dtype
        assert _quant_olora.applies(layer.base_layer) and _quant_olora.olora(layer, "default") is original
        compute = layer.base_layer.compute_dtype  # (placed after the init as LoraLinear.add does: _dora.place_linear)
        for ab in (layer.lora_A, layer.lora_B):
            ab["default"].weight.data = ab["default"].weight.data.to(compute).to(placed)
    _assert_olora_as_peft(ours, theirs, tiny_inputs("llama"))


def _packed(model) -> dict:
    """Each 4-bit weight of ``model``: (the Parameter, its bytes, its quant state's tensors), copied."""
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if getattr(w, "quant_state", None) is not None:
            state = w.quant_state.as_dict(packed=True)
            out[name] = (w, w.data.clone(), {k: v.clone() for k, v in state.items() if torch.is_tensor(v)})
    return out


def test_a_refused_olora_load_puts_back_the_4bit_weights_and_their_quant_state(tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from deltatune.methods import _quant_olora

    ours, _ = _olora_pair(tmp_path, torch.float32, "olora")
    ours.save_pretrained(tmp_path / "init")
    tensors = load_file(tmp_path / "init" / "adapter_model.safetensors")
    del tensors[sorted(k for k in tensors if "layers.1.mlp.down_proj.lora_B" in k)[0]]  # refused after every init
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "adapter_model.safetensors")
    shutil.copy(tmp_path / "init" / "adapter_config.json", tmp_path / "bad")
    calls = []
    olora = _quant_olora.olora
    monkeypatch.setattr(_quant_olora, "olora", lambda layer, name: (calls.append(name), olora(layer, name))[1])
    model = _load(tmp_path / "base", torch.float32)
    before, inputs = _packed(model), tiny_inputs("llama")
    with torch.no_grad():  # (train mode: bitsandbytes repacks CPU weights on an eval forward)
        logits = model.train()(**inputs).logits
    with pytest.raises(
        dt.AdapterLoadError, match=r"has no tensor 'base_model\.model\.model\.layers\.1\.mlp\.down_proj"
    ):
        dt.DeltaModel.from_pretrained(model, tmp_path / "bad")
    assert len(calls) == 6  # (OLoRA replaced every target's 4-bit weight before the file was refused)
    after = _packed(model)
    assert sorted(after) == sorted(before) and not any("lora" in n for n, _ in model.named_modules())
    for name, (param, data, state) in before.items():
        assert after[name][0] is param and torch.equal(after[name][1], data), name  # the Parameter itself back
        assert sorted(after[name][2]) == sorted(state) and all(
            torch.equal(after[name][2][k], v) for k, v in state.items()
        )
    with torch.no_grad():
        assert torch.equal(model.train()(**inputs).logits, logits)


def test_olora_on_deltatunes_bitsandbytes_quantize_equals_peft_on_transformers_4bit(tmp_path):
    from transformers import AutoModelForCausalLM

    from deltatune.methods import _quant_olora

    _, theirs = _olora_pair(tmp_path, torch.float32, True)  # (quantize's bytes are transformers': probe 13)
    model, _ = dt.quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), backend="bitsandbytes",
                           double_quant=False)  # (BitsAndBytesConfig's default)  # fmt: skip
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = dt.get_delta_model(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for layer in [m for m in ours.get_base_model().modules() if hasattr(m, "lora_A")]:
        _quant_olora.olora(layer, "default")
    _assert_olora_as_peft(ours, theirs, tiny_inputs("llama"))


def test_olora_on_a_torchao_4bit_layer_leaves_the_residual_within_nf4s_own_error():
    from deltatune.methods import _quant_olora, quant

    torch.manual_seed(0)
    model, _ = dt.quantize(tiny_model("llama", hidden_size=64, intermediate_size=128), backend="torchao")
    ours = dt.get_delta_model(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    w = layer.base_layer.dequantized_weight(torch.float32)
    _quant_olora.olora(layer, "default")
    Q, R = torch.linalg.qr(w)  # hand-worked: B = Q_r, A = R_r, the residual W - 2 B A quantised again
    assert torch.equal(layer.lora_A["default"].weight, R[:4]) and torch.equal(layer.lora_B["default"].weight, Q[:, :4])
    residual = w - 2.0 * Q[:, :4] @ R[:4]
    again = quant._dequantize_weight(quant._quantize_weight(residual, "torchao", True), "torchao")
    assert isinstance(layer.base_layer, quant.Linear4bit) and layer.base_layer.backend == "torchao"
    assert torch.equal(layer.base_layer.dequantized_weight(torch.float32), again)
    assert (again - residual).abs().max() <= residual.abs().max() * 0.2  # NF4's own rounding, not more


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_config_olora_on_a_4bit_base_equals_peft_and_reloads(tmp_path, dtype):
    ours, theirs = _olora_pair(tmp_path, dtype, "olora")
    inputs = tiny_inputs("llama")
    _assert_olora_as_peft(ours, theirs, inputs)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("ours", "peft"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = dt.DeltaModel.from_pretrained(_load(tmp_path / "base", dtype), tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(again.train()(**inputs).logits, ours.train()(**inputs).logits)


# -- fault: skip_modules of a wrong type (5, [5], ["q_proj", None]) was a TypeError from deep in targets.py
# ("argument of type 'int' is not iterable"); transformers' llm_int8_skip_modules is a list of names ---------------
@pytest.mark.parametrize("skip", [5, [5], ["q_proj", None], {"q_proj": 1}])
def test_a_bad_skip_modules_is_one_line_naming_it_and_changes_nothing(skip):
    from deltatune.config import ConfigError

    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"^skip_modules must be a list of module names or a regex string, got "):
        dt.quantize(model, backend="bitsandbytes", skip_modules=skip)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_merge_quantized_names_its_own_dtype_argument_when_it_is_bad():
    torch.manual_seed(0)
    model, _ = dt.quantize(tiny_model("llama", hidden_size=64, intermediate_size=128), backend="bitsandbytes")
    ours = dt.get_delta_model(model, dt.LoraConfig(r=4, target_modules=["q_proj"]))
    from deltatune.config import ConfigError

    with pytest.raises(ConfigError, match=r"^merge_quantized: dtype must be float32, bfloat16 or float16, got 'int8'"):
        dt.merge_quantized(ours, tiny_inputs("llama")["input_ids"], dtype="int8")
    assert ours.peft_config and any(hasattr(m, "lora_A") for m in ours.modules())  # (was: "compute_dtype must be")


# -- fault: the same in 8 bits: peft's bnb Linear8bitLt.merge makes Int8Params(W + s1 B1 A1) before adding s2 B2 A2;
# a requantised merge of two adapters rounded once: other int8 codes ----------------------------------------------
def test_requantized_merge_of_two_adapters_into_8bit_layers_equals_peft(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_8bit=True)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu")

    lora = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    ours = dt.get_delta_model(load(), lora)
    ours.add_adapter("two", lora)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter")
    theirs.load_adapter(tmp_path / "adapter" / "two", adapter_name="two")
    inputs = tiny_inputs("llama")
    merged, _ = dt.merge_quantized(ours, inputs["input_ids"], requantize=True, adapter_names=["default", "two"])
    reference = theirs.merge_and_unload(adapter_names=["default", "two"])
    for layer in [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.down_proj")]:
        a, b = merged.get_submodule(layer), reference.get_submodule(layer)
        assert type(a) is type(b) and torch.equal(a.weight.data, b.weight.data), layer
        scb = [m.weight.SCB if m.weight.SCB is not None else m.state.SCB for m in (a, b)]  # row scales
        assert torch.equal(*scb), layer
    with torch.no_grad():
        assert torch.equal(merged.train()(**inputs).logits, reference.train()(**inputs).logits)
