"""QLoRA merging and seq2seq details (deltatune/methods/quant.py, quant_tools.py, layer.DequantizedLinear), and IA3's
unmerge of a vector with a zero entry (methods/ia3.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_inputs, tiny_model
from torch import nn

import deltatune as dt
from deltatune.layer import DequantizedLinear
from deltatune.methods import quant
from deltatune.methods.quant import Linear4bit, QuantizationError

BACKENDS = [
    b for b in quant.BACKENDS if quant._available(b) and (b == "torchao" or quant._bnb_runs_on(torch.device("cpu")))
]
if not BACKENDS:
    pytest.skip("no 4-bit backend installed (pip install 'deltatune[quant]')", allow_module_level=True)
needs_bnb = pytest.mark.skipif("bitsandbytes" not in BACKENDS, reason="bitsandbytes does not run on this CPU")


def _llama() -> nn.Module:
    return tiny_model("llama", hidden_size=64, intermediate_size=128)


def _lora(**kw) -> dt.LoraConfig:
    return dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)


def _copy_lora(src: nn.Module, dst: nn.Module) -> None:
    theirs = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_" in name:
                theirs[name].copy_(p)


# -- fault 1: T5 (its FFN casts activations to wo.weight.dtype) ----------------------------------------------------
def _t5() -> nn.Module:
    return tiny_model("t5", d_model=64, d_kv=16, d_ff=128)


@pytest.mark.parametrize("backend", BACKENDS)
def test_t5_qlora_keeps_wo_and_equals_lora_on_the_dequantised_weights(backend):
    base = _t5()
    q, summary = dt.quantize(copy.deepcopy(base), backend=backend)
    wo = [n for n, m in q.named_modules() if n.endswith(".wo")]
    assert len(wo) == 4 and all(type(q.get_submodule(n)) is nn.Linear for n in wo)  # as transformers' bnb loading
    assert all("_keep_in_fp32_modules" in summary.kept[n] for n in wo)
    assert any(n.endswith(".wi") for n in summary.quantized)
    ref = copy.deepcopy(base)  # the same model with every 4-bit layer's dequantised weight, in fp32
    for n, m in q.named_modules():
        if isinstance(m, Linear4bit):
            with torch.no_grad():
                ref.get_submodule(n).weight.copy_(m.dequantized_weight(torch.float32))
    config = _lora(target_modules=["q", "v", "wi"], task_type="SEQ_2_SEQ_LM")
    ours, theirs = dt.get_delta_model(q, config), dt.get_delta_model(ref, config.replace())
    _copy_lora(ours, theirs)
    inputs = tiny_inputs("t5")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-5)
    ours.train(), theirs.train()
    for model in (ours, theirs):
        torch.manual_seed(0)  # the same dropout masks
        model(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


@needs_bnb
def test_a_4bit_layer_fed_integer_activations_says_so_in_one_line():
    model = _t5()
    model._keep_in_fp32_modules = None  # force wo into 4 bits: T5 then casts its FFN output to wo.weight.dtype (uint8)
    q, _ = dt.quantize(model, backend="bitsandbytes")
    assert q.encoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype == torch.uint8
    with pytest.raises(QuantizationError, match=r"got a torch.uint8 input.*skip_modules"):
        q(**tiny_inputs("t5"))


# -- fault 2: requantize leaves the layers no merged adapter touched -------------------------------------------------
def _two_adapters(backend: str) -> dt.DeltaModel:
    q, _ = dt.quantize(_llama(), backend=backend)
    delta = dt.get_delta_model(q, _lora(target_modules=["q_proj"]), adapter_name="a")
    delta.add_adapter("b", _lora(target_modules=["v_proj"]))
    return delta


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["inactive", "adapter_names"])
def test_merge_quantized_requantize_leaves_unmerged_layers_as_they_were(backend, how):
    delta = _two_adapters(backend)
    attn = delta.get_base_model().model.layers[0].self_attn
    v_before = [t.clone() for t in quant._storage(attn.v_proj.base_layer.weight)]
    # What merging "a" into q_proj and quantising again must give, done by hand.
    lora_q = attn.q_proj
    by_hand = lora_q.base_layer.dequantized_weight(torch.float32) + 2.0 * (
        lora_q.lora_B["a"].weight @ lora_q.lora_A["a"].weight
    )
    hand = nn.Linear(64, 64, bias=False)
    hand.weight = nn.Parameter(by_hand.detach())
    expected_q = Linear4bit.from_linear(hand, torch.float32, backend)
    inputs = tiny_inputs("llama")
    if how == "inactive":
        delta.set_adapter("a")
        plain, report = dt.merge_quantized(delta, inputs, requantize=True)
    else:
        delta.set_adapter(["a", "b"])
        plain, report = dt.merge_quantized(delta, inputs, requantize=True, adapter_names=["a"])
    v = plain.model.layers[0].self_attn.v_proj
    assert isinstance(v, Linear4bit) and (v.in_features, v.out_features) == (64, 32)
    for old, new in zip(v_before, quant._storage(v.weight), strict=True):
        assert torch.equal(old, new)  # bit for bit: nothing was merged there
    q_proj = plain.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q_proj.dequantized_weight(torch.float32), expected_q.dequantized_weight(torch.float32))
    assert sum(isinstance(m, Linear4bit) for m in plain.modules()) == len(report.quantized) == 14
    assert report.max_abs_diff < 0.02  # the NF4 rounding of W + s B A (0.0034-0.0039 measured)


# -- fault 3: merging with a compute dtype other than the other weights' ---------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_and_unload_with_bf16_compute_gives_one_dtype_and_runs(backend):
    base, _ = dt.quantize(_llama().to(torch.bfloat16), compute_dtype=torch.bfloat16, backend=backend)
    dt.prepare_for_kbit_training(base)  # norms, embeddings and lm_head go to fp32; compute stays bf16
    delta = dt.get_delta_model(base, _lora(target_modules="all-linear"))
    lora_q = delta.get_base_model().model.layers[0].self_attn.q_proj
    w = lora_q.base_layer.dequantized_weight(torch.bfloat16)
    # the fp32 adapter's delta added to the bf16 weight and rounded once, as peft adds a delta
    by_hand = (
        (w.float() + 2.0 * (lora_q.lora_B["default"].weight @ lora_q.lora_A["default"].weight)).to(w.dtype).float()
    )
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        ref = delta(**inputs).logits
    merged = delta.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, by_hand)
    with torch.no_grad():
        out = merged(**inputs).logits
    assert (out - ref).abs().max() < 0.05  # bf16 rounding of the merged weights (0.0055-0.0065 measured)


def test_merge_adapter_then_unmerge_keeps_a_model_that_runs(tmp_path):
    from transformers import AutoModelForCausalLM

    base, _ = dt.quantize(_llama(), compute_dtype="bfloat16", backend=BACKENDS[0])  # fp32 model, bf16 compute
    delta = dt.get_delta_model(base, _lora(target_modules=["q_proj", "v_proj"]))
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        ref = delta(**inputs).logits
        with delta.disable_adapter():
            plain_ref = delta(**inputs).logits
        delta.merge_adapter()
        q = delta.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert isinstance(q, DequantizedLinear) and q.weight.dtype == torch.bfloat16
        merged = delta(**inputs).logits
        assert merged.dtype == torch.float32 and (merged - ref).abs().max() < 0.05  # bf16 rounding (0.004 measured)
        delta.unmerge_adapter()
        torch.testing.assert_close(delta(**inputs).logits, ref, atol=0.05, rtol=0)
        with delta.disable_adapter():
            torch.testing.assert_close(delta(**inputs).logits, plain_ref, atol=0.05, rtol=0)
    # and merge_and_unload from there: every weight in the dtype of the model's other weights (fp32), and
    # transformers loads what save_pretrained writes
    merged = delta.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        out = merged(**inputs).logits
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(**inputs).logits, out)


def test_merge_and_unload_keeping_4bit_layers_runs_with_bf16_compute():
    base, _ = dt.quantize(_llama(), compute_dtype="bfloat16", backend=BACKENDS[0])  # fp32 model, bf16 compute
    delta = dt.get_delta_model(base, _lora(target_modules=["q_proj"]))
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        ref = delta(**inputs).logits
        plain = delta.merge_and_unload(dequantize=False)
        attn = plain.model.layers[0].self_attn
        # the merged layer computes in bf16 as its 4-bit layer did, between fp32 activations; k_proj is still 4-bit
        assert isinstance(attn.q_proj, DequantizedLinear) and attn.q_proj.weight.dtype == torch.bfloat16
        assert isinstance(attn.k_proj, Linear4bit)
        assert (plain(**inputs).logits - ref).abs().max() < 0.05  # bf16 rounding of W + s B A


# -- fault 4: an FP4 model from transformers re-quantises as FP4 -------------------------------------------------------
@needs_bnb
def test_requantize_keeps_fp4_and_equals_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _llama().save_pretrained(tmp_path / "base")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)  # quant type: fp4 (default)
    assert bnb.bnb_4bit_quant_type == "fp4"

    def load() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb, device_map="cpu")

    delta = dt.get_delta_model(load(), _lora(target_modules=["q_proj", "v_proj"]))
    delta.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter")
    delta.train(), theirs.train()  # keep bitsandbytes from repacking for its CPU inference kernel
    inputs = tiny_inputs("llama")
    plain, _ = dt.merge_quantized(delta, inputs, requantize=True)
    peft_merged = theirs.merge_and_unload()
    ours_attn, peft_attn = plain.model.layers[0].self_attn, peft_merged.model.layers[0].self_attn
    assert ours_attn.q_proj.weight.quant_state.quant_type == peft_attn.q_proj.weight.quant_state.quant_type == "fp4"
    assert ours_attn.q_proj.quant_type == "fp4" and "fp4" in repr(ours_attn.q_proj)
    assert torch.equal(ours_attn.q_proj.weight.data, peft_attn.q_proj.weight.data)
    plain.train(), peft_merged.train()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, peft_merged(**inputs).logits, atol=1e-6, rtol=0)


# -- fault 5: IA3 unmerge where the vector has a 0 -----------------------------------------------------------------
def test_ia3_unmerge_with_a_zero_entry_writes_no_nan_and_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    delta = dt.get_delta_model(tiny_model("llama"), dt.IA3Config(init_ia3_weights=False))
    k = delta.get_base_model().model.layers[0].self_attn.k_proj
    with torch.no_grad():
        k.ia3_l["default"][0, 0] = 0.0
    original = k.base_layer.weight.detach().clone()
    delta.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    delta.merge_adapter()
    with pytest.warns(UserWarning, match=r"1 entries of its vector are 0.*stay 0"):
        delta.unmerge_adapter()
    theirs.merge_adapter()
    theirs.unmerge_adapter()
    ours_w = k.base_layer.weight
    peft_w = theirs.base_model.model.model.layers[0].self_attn.k_proj.base_layer.weight
    assert not torch.isnan(ours_w).any()
    assert torch.equal(ours_w[0], torch.zeros_like(ours_w[0]))  # what the merge zeroed cannot come back
    torch.testing.assert_close(ours_w, peft_w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_w[1:], original[1:], atol=0, rtol=1e-6)  # the rest exactly restored
