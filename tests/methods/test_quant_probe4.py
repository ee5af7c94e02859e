"""QLoRA probe 4 (deltatune/methods/quant.py, quant_tools.py): all-zero blocks with torchao, nan/inf weights, and
the re-quantising merge with bf16 compute against PEFT's."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_inputs, tiny_model
from torch import nn

import deltatune as dt
from deltatune.methods import quant
from deltatune.methods.quant import Linear4bit, QuantizationError

BACKENDS = [
    b for b in quant.BACKENDS if quant._available(b) and (b == "torchao" or quant._bnb_runs_on(torch.device("cpu")))
]
if not BACKENDS:
    pytest.skip("no 4-bit backend installed (pip install 'deltatune[quant]')", allow_module_level=True)
needs_bnb = pytest.mark.skipif("bitsandbytes" not in BACKENDS, reason="bitsandbytes does not run on this CPU")


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
    layer.weight.copy_(weight)
    return layer


def _llama() -> nn.Module:
    return tiny_model("llama", hidden_size=64, intermediate_size=128)


# -- fault 1: torchao dequantised an all-zero block to its constant's rounding error, not to 0 -----------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_blocks_dequantise_to_zero_and_the_rest_is_the_libraries_own(backend):
    torch.manual_seed(0)
    weight = torch.randn(8, 128)
    weight[:, :64] = 0  # the first block of every row
    weight[3] = 0  # a whole row (a pruned unit)
    zero = weight == 0
    layer = Linear4bit.from_linear(_linear(weight), torch.float32, backend)
    got = layer.dequantized_weight(torch.float32)
    # NF4's code book holds an exact 0 (bitsandbytes' reference keeps these blocks 0; torchao gave 0.0085 each)
    assert torch.equal(got[zero], torch.zeros(int(zero.sum())))
    # the other blocks are exactly what the library makes of the same tensor
    if backend == "torchao":
        mod = quant._backend("torchao")
        theirs = mod.to_nf4(weight, 64, 16).get_original_weight()
    else:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        theirs = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(got[~zero], theirs[~zero])
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), x @ got.T, atol=1e-5, rtol=1e-5)
    assert (layer(x)[:, 3] == 0).all()  # the zero row gives 0, not 0.0085 * sum(x)


# -- fault 2: one nan or inf weight made every value of its layer nan, silently -----------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_quantize_refuses_nan_or_inf_weights_in_one_line_and_changes_nothing(backend, bad):
    model = _llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[2, 5] = bad
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(QuantizationError, match=r"'model\.layers\.1\.self_attn\.k_proj' has nan or inf") as info:
        dt.quantize(model, backend=backend)
    assert "\n" not in str(info.value)
    assert {n: type(m) for n, m in model.named_modules()} == before
    # a layer kept in full precision may hold them (it is not quantised)
    _, summary = dt.quantize(model, backend=backend, skip_modules=["k_proj"])
    assert "model.layers.1.self_attn.k_proj" in summary.kept


# -- fault 3: with bf16 compute, the re-quantising merge rounded W + s B A to bf16 before quantising ----------------
@needs_bnb
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32])
def test_requantized_merge_with_bf16_compute_equals_peft_byte_for_byte(model_dtype, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _llama().save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,  # QLoRA's usual setting
    )

    def load() -> nn.Module:
        path = tmp_path / "base"
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, device_map="cpu", dtype=model_dtype
        )

    lora = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    delta = dt.get_delta_model(load(), lora)
    with torch.no_grad():  # an update the size of a trained one, so that rounding W + s B A matters
        for name, p in delta.named_parameters():
            if "lora_B" in name:
                p.mul_(30)
    delta.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter")
    delta.train(), theirs.train()  # keep bitsandbytes from repacking for its CPU inference kernel
    inputs = tiny_inputs("llama")
    plain, _ = dt.merge_quantized(delta, inputs, requantize=True)
    peft_merged = theirs.merge_and_unload()
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            ours = plain.model.layers[i].self_attn.get_submodule(proj)
            peft_layer = peft_merged.model.layers[i].self_attn.get_submodule(proj)
            assert torch.equal(ours.weight.data, peft_layer.weight.data), (i, proj)  # 32 of 2048 bytes differed
            assert ours.compute_dtype == torch.bfloat16  # the merged layer computes as its 4-bit layer did
    plain.train(), peft_merged.train()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, peft_merged(**inputs).logits, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_requantize_leaves_the_compute_dtype_of_unmerged_4bit_layers(backend):
    model, _ = dt.quantize(_llama(), backend=backend, compute_dtype=torch.bfloat16)
    lora = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    delta = dt.get_delta_model(model, lora)
    delta.add_adapter("other", lora.replace(target_modules=["v_proj"]))
    delta.set_adapter(["default", "other"])
    plain, _ = dt.merge_quantized(delta, tiny_inputs("llama"), requantize=True, adapter_names=["default"])
    attn = plain.model.layers[0].self_attn
    assert attn.q_proj.compute_dtype == torch.bfloat16  # merged and quantised again with its own settings
    assert attn.k_proj.compute_dtype == torch.bfloat16  # never adapted
    assert isinstance(attn.v_proj, Linear4bit) and attn.v_proj.compute_dtype == torch.bfloat16  # adapter not merged


# -- fault 4: nn.MultiheadAttention's out_proj was quantised, and the model crashed (it reads out_proj.weight) --------
@pytest.mark.parametrize("backend", BACKENDS)
def test_multihead_attention_keeps_out_proj_and_the_model_runs(backend):
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 64)
    _, summary = dt.quantize(model, backend=backend)
    assert summary.quantized == ["linear1", "linear2"]
    assert "MultiheadAttention" in summary.kept["self_attn.out_proj"]
    with torch.no_grad():
        out = model(x)  # was: NotImplementedError (torchao, aten.addmm) / RuntimeError Float and Byte (bitsandbytes)
        for name in summary.quantized:  # the same model with those two layers dequantised by hand
            setattr(model, name, getattr(model, name).unpack(torch.float32))
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


# -- fault 5: a linear layer tied to another module's weight was quantised: the tie broke, memory grew -------------
class _TiedLM(nn.Module):
    """A plain model (no get_output_embeddings) whose head shares the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 64)
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 256, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(ids)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tied_linear_stays_in_full_precision_as_transformers_keeps_it(backend):
    torch.manual_seed(0)
    model = _TiedLM()
    ids = torch.randint(0, 256, (2, 5))
    _, summary = dt.quantize(model, backend=backend)
    assert summary.quantized == ["body"]
    assert summary.kept == {"head": "weight tied to emb.weight"}
    assert model.head.weight is model.emb.weight  # still one matrix: training the embedding moves the head too
    assert summary.bytes_after < summary.bytes_before
    with torch.no_grad():
        out = model(ids)
        model.body = model.body.unpack(torch.float32)
        torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-5)


# -- fault 6: a GPT-2 that transformers loaded in 4 bits merged into nn.Linear layers, which did not reload -----------
@needs_bnb
def test_merged_gpt2_from_transformers_4bit_restores_conv1d_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.pytorch_utils import Conv1D

    tiny_model("gpt2", n_embd=64).save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu")
    lora = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    delta = dt.get_delta_model(model, lora).train()  # train mode: bitsandbytes does not repack for inference
    inputs = tiny_inputs("gpt2")
    plain, report = dt.merge_quantized(delta, inputs)
    assert report.max_abs_diff < 1e-5
    block = plain.transformer.h[0]
    assert all(type(m) is Conv1D for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
    plain.eval().save_pretrained(tmp_path / "merged")
    # was: a size-mismatch error for c_attn and c_fc, and attn.c_proj (square) would have loaded transposed
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)
