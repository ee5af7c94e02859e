"""QLoRA probe 7 (deltatune/methods/quant.py, quant_tools.py): LoRA on bitsandbytes' 8-bit and 4-bit layers against
peft 0.21.2's bnb LoRA layers on the same quantised weights."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.methods import quant

if not (quant._available("bitsandbytes") and quant._bnb_runs_on(torch.device("cpu"))):
    pytest.skip("bitsandbytes does not run on this CPU", allow_module_level=True)
peft = pytest.importorskip("peft")


def _load(path, bits: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=dtype)


def _pair(tmp_path, bits: int, dtype: torch.dtype):
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    config = dt.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    ours = dt.get_delta_model(_load(tmp_path / "base", bits, dtype), config)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(
        _load(tmp_path / "base", bits, dtype), tmp_path / "adapter", is_trainable=True
    )
    return ours, theirs


def _scb(layer) -> torch.Tensor:
    """An 8-bit layer's row scales (bitsandbytes moves them from the weight to the layer's state on a forward)."""
    return layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB


# -- fault 1: on an 8-bit base in bf16 the fp32 LoRA update was added unrounded (1,232 of 1,792 logits off peft's) ----
@pytest.mark.parametrize(("bits", "dtype"), [(8, torch.bfloat16), (8, torch.float32), (4, torch.bfloat16)])
def test_lora_on_a_bnb_base_equals_peft_bit_for_bit_in_logits_and_gradients(tmp_path, bits, dtype):
    ours, theirs = _pair(tmp_path, bits, dtype)
    inputs = tiny_inputs("llama")
    ours.train(), theirs.train()
    a = ours(**inputs, labels=inputs["input_ids"])
    b = theirs(**inputs, labels=inputs["input_ids"])
    assert a.logits.dtype == dtype and torch.equal(a.logits, b.logits)
    a.loss.backward(), b.loss.backward()
    ours_grads = {n.split("base_model.")[-1].replace(".default", ""): p.grad for n, p in ours.named_parameters()
                  if p.requires_grad}  # fmt: skip
    peft_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}  # fmt: skip
    assert sorted(ours_grads) == sorted(peft_grads) and len(ours_grads) == 12
    for name, grad in ours_grads.items():
        assert grad.dtype == torch.float32 and torch.equal(grad, peft_grads[name]), name
    ours.eval(), theirs.eval()  # a 4-bit layer repacks for bitsandbytes' CPU kernel on its first eval forward
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)


# -- fault 2: merge_quantized refused an 8-bit model ("no 4-bit layer; use merge_and_unload", which refused it too) --
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_quantized_of_an_8bit_base_requantizes_as_peft_byte_for_byte(tmp_path, dtype):
    import bitsandbytes as bnb

    ours, theirs = _pair(tmp_path, 8, dtype)
    inputs = tiny_inputs("llama")
    k_proj = ours.get_base_model().model.layers[0].self_attn.k_proj  # no adapter: kept as it is
    peft_merged = theirs.merge_and_unload()
    plain, report = dt.merge_quantized(ours, inputs, requantize=True)
    assert plain.model.layers[0].self_attn.k_proj is k_proj
    for name, module in peft_merged.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            mine = plain.get_submodule(name)
            assert isinstance(mine, bnb.nn.Linear8bitLt), name
            assert torch.equal(mine.weight.data, module.weight.data) and torch.equal(_scb(mine), _scb(module))
    plain.eval(), peft_merged.eval()
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, peft_merged(**inputs).logits)
    assert report.requantized and 0 < report.max_abs_diff < 0.05


def test_merge_quantized_of_an_8bit_base_into_full_precision_adds_the_update_to_the_dequantized_weight(tmp_path):
    import bitsandbytes as bnb

    ours, _ = _pair(tmp_path, 8, torch.float32)
    layer = ours.get_base_model().model.layers[1].mlp.down_proj
    base = layer.base_layer
    w = bnb.functional.int8_vectorwise_dequant(base.weight.data, _scb(base))  # int8 x row scale / 127
    expected = w + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    plain, report = dt.merge_quantized(ours, tiny_inputs("llama"))
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in plain.modules())
    down = plain.model.layers[1].mlp.down_proj
    assert type(down) is torch.nn.Linear and torch.equal(down.weight, expected)
    assert "model.layers.1.mlp.down_proj" in report.dequantized and report.max_abs_diff < 0.05


# -- fault 3: the merge into full precision cast the rotary inv_freq buffers to bf16 with the weights, so the merged
# model's logits were not those of the same model saved and loaded again (652 of 1,792 bf16 logits off) ------------
@pytest.mark.parametrize("bits", [4, 8])
def test_merged_model_computes_as_it_does_once_saved_and_loaded(tmp_path, bits):
    from transformers import AutoModelForCausalLM

    ours, _ = _pair(tmp_path, bits, torch.bfloat16)
    inputs = tiny_inputs("llama")
    plain, _ = dt.merge_quantized(ours, inputs)
    assert plain.model.rotary_emb.inv_freq.dtype == torch.float32
    plain.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    plain.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, again(**inputs).logits)


# -- fault 4: a re-quantised 4-bit merge saved its packed bytes without their constants or the quantisation config:
# transformers could not load it (size mismatch); peft's merge saves and loads in 4 bits --------------------------
def test_requantized_4bit_merge_saves_and_loads_as_peft_s(tmp_path):
    from transformers import AutoModelForCausalLM

    ours, theirs = _pair(tmp_path, 4, torch.bfloat16)
    inputs = tiny_inputs("llama")
    plain, _ = dt.merge_quantized(ours, inputs, requantize=True)
    plain.save_pretrained(tmp_path / "ours")
    theirs.merge_and_unload().save_pretrained(tmp_path / "peft")
    ours_back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    peft_back = AutoModelForCausalLM.from_pretrained(tmp_path / "peft", device_map="cpu")
    assert ours_back.is_loaded_in_4bit
    for model in (plain, ours_back, peft_back):
        model.train()  # bitsandbytes' layers repack for its CPU kernel on an eval forward; deltatune's do not
    with torch.no_grad():
        logits = plain(**inputs).logits
        assert torch.equal(ours_back(**inputs).logits, logits) and torch.equal(peft_back(**inputs).logits, logits)
    # its state dict loaded into another requantised merge: the bytes came with the other's constants (0.219 off)
    other, _ = _pair(tmp_path / "2", 4, torch.bfloat16)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.mul_(-2.0)  # another adapter: other merged bytes and constants
    other, _ = dt.merge_quantized(other, inputs, requantize=True)
    other.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other.train()(**inputs).logits, logits)


def test_full_fine_tuning_of_an_8bit_base_is_refused_naming_it_8bit(tmp_path):
    """Since 991967a counted 8-bit layers as quantized, the refusal called an 8-bit weight 'a 4-bit weight'."""
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    model = _load(tmp_path / "base", 8, torch.float32)
    with pytest.raises(
        dt.ConfigError, match=r"^full: 'model\.layers\.0\.self_attn\.q_proj\.weight' is an 8-bit weight"
    ):
        dt.get_delta_model(model, dt.FullConfig())
