"""QLoRA probe 13 (deltatune/methods/quant.py, quant_tools.py) against bitsandbytes 0.50's own quantize_4bit /
dequantize_4bit and peft 0.21.2's LoRA on transformers' BitsAndBytesConfig models, on the same weights."""

from __future__ import annotations

import pytest
import torch
from methods.test_quant import BACKENDS, _llama, _qlora
from tiny import output_of, tiny_inputs, tiny_model

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.methods import quant

if "bitsandbytes" not in BACKENDS:
    pytest.skip("bitsandbytes does not run on this CPU", allow_module_level=True)
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_dequantises_to_bitsandbytes_own_quantize_4bit(double_quant):
    import bitsandbytes.functional as F

    model = _llama()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    dt.quantize(model, backend="bitsandbytes", double_quant=double_quant)
    ours = model.model.layers[0].self_attn.q_proj.dequantized_weight(torch.float32)
    ref = F.dequantize_4bit(*F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4"))
    assert torch.equal(ours, ref)  # bit for bit (max abs diff 0.0)
    if (
        double_quant and "torchao" in BACKENDS
    ):  # torchao's NF4 table has 4 decimals: 1.95e-4 measured, NF4 error 8.6e-3
        torchao = dt.quantize(_llama(), backend="torchao")[0].model.layers[0].self_attn.q_proj
        assert (torchao.dequantized_weight(torch.float32) - ref).abs().max() < 5e-4 < (ref - w).abs().max()


def _bnb(folder, **kw):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **kw)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu")


# -- fault: merge_quantized(requantize=True) packed transformers' bnb_4bit_quant_storage=bf16 layers in uint8 (peft
# keeps bf16, the storage FSDP needs); the dequantised weights were equal, the bytes' dtype and shape were not.
@pytest.mark.parametrize("storage, kind", [(torch.bfloat16, "nf4"), (torch.float16, "fp4")])
def test_requantized_merge_keeps_bnb_4bit_quant_storage_as_peft(tmp_path, storage, kind):
    """With the default autocast_adapter_dtype (False) the adapters are float32 as peft's (review 13G: a bf16 / fp16
    storage dtype made them bf16 / fp16, 1.5e-3 off peft's outputs), and the merge keeps the storage."""
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    inputs = tiny_inputs("llama")
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    bnb = dict(bnb_4bit_quant_storage=storage, bnb_4bit_quant_type=kind)
    ours = dt.get_delta_model(_bnb(tmp_path / "base", **bnb), config)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_bnb(tmp_path / "base", **bnb), tmp_path / "adapter")
    assert torch.equal(output_of(ours.train(), inputs), output_of(theirs.train(), inputs))
    plain, _ = dt.merge_quantized(ours.eval(), inputs, requantize=True)
    merged = theirs.eval().merge_and_unload()
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        a, b = plain.model.layers[0].get_submodule(name), merged.model.layers[0].get_submodule(name)
        assert a.weight.dtype == b.weight.dtype == storage, name
        assert torch.equal(a.weight.data.view(torch.uint8), b.weight.data.view(torch.uint8)), name  # same bytes
        assert torch.equal(a.dequantized_weight(torch.float32), quant._dequantize_weight(b.weight, "bitsandbytes"))
    plain.save_pretrained(tmp_path / "merged")  # and it loads back in 4 bits with its storage
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert back.model.layers[0].self_attn.q_proj.weight.dtype == storage


def test_adapter_trained_on_4bit_loads_on_the_full_precision_base_as_peft(tmp_path):
    inputs = tiny_inputs("llama")
    delta = _qlora("bitsandbytes")
    out_q = output_of(delta, inputs)
    delta.save_pretrained(tmp_path)
    ours = output_of(dt.DeltaModel.from_pretrained(_llama(), tmp_path), inputs)
    theirs = output_of(peft.PeftModel.from_pretrained(_llama(), tmp_path), inputs)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # The gap is NF4's error on the base, no more. Measured on these (small, random-model) logits: the bases differ by
    # relative Frobenius 0.112, max 0.058; the adapter model on each base by 0.099, max 0.061 (the adapter moves 0.77).
    base_fp, base_q = output_of(_llama(), inputs), output_of(dt.quantize(_llama(), backend="bitsandbytes")[0], inputs)
    nf4_error = ((base_q - base_fp).norm() / base_fp.norm()).item()
    assert 0 < ((out_q - ours).norm() / ours.norm()).item() < 1.5 * nf4_error


@pytest.mark.parametrize(("kwargs", "match"), [({"quant_type": "nf5"}, "quant_type must be 'nf4' or 'fp4' .*got 'nf5'"),
                                               ({"compute_dtype": "bf61"}, "compute_dtype must be")])  # fmt: skip
def test_a_typo_in_the_quantisation_keys_is_one_line_and_changes_nothing(kwargs, match):
    model = _llama()
    before = output_of(model, tiny_inputs("llama"))
    with pytest.raises(ConfigError, match=match) as info:
        dt.quantize(model, backend="bitsandbytes", **kwargs)
    assert "\n" not in str(info.value)
    assert torch.equal(output_of(model, tiny_inputs("llama")), before)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_lora_on_quantize_equals_peft_on_transformers_bnb_4bit_in_logits_and_gradients(tmp_path, compute_dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    inputs = tiny_inputs("llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    dt.quantize(model, backend="bitsandbytes", compute_dtype=compute_dtype)
    config = dt.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    ours = dt.get_delta_model(model, config)
    ours.save_pretrained(tmp_path / "adapter")  # the same LoRA init for peft
    base = _bnb(tmp_path / "base", bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")
    for layer in base.modules():  # _bnb computes in fp32
        if hasattr(layer, "compute_dtype"):
            layer.compute_dtype = compute_dtype
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    a = ours.base_model.model.layers[0].self_attn.q_proj.base_layer.weight
    b = theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(a.data, b.data)  # the same packed NF4 bytes as transformers' loading
    out = [m.train()(**inputs, labels=inputs["input_ids"]) for m in (ours, theirs)]
    for o in out:
        o.loss.backward()
    assert torch.equal(out[0].logits, out[1].logits)  # max abs diff 0.0, fp32 and bf16 compute
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (ours, theirs)]
    assert len(grads[0]) == len(grads[1]) == 12
    assert all(torch.equal(g, h) for g, h in zip(*grads))


# -- kept on purpose: on a CPU with AVX512-BF16 bitsandbytes repacks a Linear4bit at its first no-grad eval forward;
# peft 0.21.2's merge then dequantises the repacked bytes as if they were not (0.145 off W + s B A, measured, against
# 0.040 of requantisation error); merge_quantized unpacks them first and merges what the layer computes.
def test_requantized_merge_after_an_eval_forward_merges_the_real_weight(tmp_path):
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    inputs = tiny_inputs("llama")
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    delta = dt.get_delta_model(_bnb(tmp_path / "base", bnb_4bit_quant_type="nf4"), config).eval()
    layer = delta.base_model.model.layers[0].self_attn.q_proj
    w = quant._dequantize_weight(layer.base_layer.weight, "bitsandbytes")
    expected = w + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    delta.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_bnb(tmp_path / "base", bnb_4bit_quant_type="nf4"), tmp_path / "adapter")
    output_of(delta, inputs), output_of(theirs.eval(), inputs)  # the forward that may repack
    repacked = bool(getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False))
    plain, _ = dt.merge_quantized(delta, inputs, requantize=True)
    ours = plain.model.layers[0].self_attn.q_proj.dequantized_weight(torch.float32)
    merged = theirs.merge_and_unload().model.layers[0].self_attn.q_proj.weight
    error = (ours - expected).abs().max().item()
    assert error < 0.05  # NF4's rounding of W + s B A (0.0404 measured)
    theirs_error = (quant._dequantize_weight(merged, "bitsandbytes") - expected).abs().max().item()
    assert theirs_error > 2 * error if repacked else theirs_error == pytest.approx(error, abs=1e-6)
