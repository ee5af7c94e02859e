"""QLoRA: NF4 base weights (deltatune/methods/quant.py) with LoRA on top, on both backends that run here."""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from tiny import VOCAB, output_of, tiny_inputs, tiny_model
from torch import nn

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.layer import DeltaLayer, checkpointing
from deltatune.methods import quant
from deltatune.methods.quant import Linear4bit, QuantizationError

# The backends that run on this CPU (bitsandbytes from 0.50); tests parametrized over them run on each.
BACKENDS = [
    b for b in quant.BACKENDS if quant._available(b) and (b == "torchao" or quant._bnb_runs_on(torch.device("cpu")))
]
if not BACKENDS:
    pytest.skip("no 4-bit backend installed (pip install 'deltatune[quant]')", allow_module_level=True)

# The NF4 code book as printed in the QLoRA paper (arXiv:2305.14314, Appendix E), not read from a library.
NF4_PAPER = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
# torchao stores the table to 4 decimals (-0.6962 for -0.69619...), so values agree to 5e-5, not to fp32 rounding.
CODE_ATOL = 1e-4
# Relative Frobenius error of NF4 (blocks of 64, double-quantised constants) on N(0, 1) weights: 0.092 measured on
# both backends; the mean absolute error 0.073 (times the std). The bounds leave a small margin above those.
REL_ERROR_BOUND = 0.1
MEAN_ERROR_BOUND = 0.08


def _llama(**kw) -> nn.Module:
    # hidden 64 so the attention and up/gate layers have in_features a multiple of 64; intermediate 96 so down_proj
    # (in_features 96) stays in full precision and that path is exercised too.
    return tiny_model("llama", hidden_size=64, intermediate_size=96, **kw)


def _qlora(backend: str, scale_b: float = 1.0, compute_dtype=torch.float32, **lora) -> dt.DeltaModel:
    model, _ = dt.quantize(_llama(), backend=backend, compute_dtype=compute_dtype)
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    delta = dt.get_delta_model(model, config.replace(**lora))
    with torch.no_grad():
        for name, p in delta.named_parameters():
            if "lora_B" in name:
                p.mul_(scale_b)
    return delta


def _state(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Every stored tensor of every parameter (a 4-bit weight's packed data and constants too), cloned."""
    return {n: [t.detach().clone() for t in quant._storage(p)] for n, p in model.named_parameters()}


# -- the format -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_codebook_is_the_papers(backend):
    weight = torch.randn(128, 256)
    layer = Linear4bit.from_linear(_with_weight(weight), torch.float32, backend)
    blocks = layer.dequantized_weight(torch.float32).view(-1, quant.BLOCK_SIZE)
    ratios = (blocks / blocks.abs().amax(dim=1, keepdim=True)).flatten()  # each value / its block's absmax
    code = torch.tensor(NF4_PAPER)
    distance, index = (ratios[:, None] - code[None, :]).abs().min(dim=1)
    assert distance.max() < CODE_ATOL
    assert index.unique().numel() == 16  # every code is used, so all 16 were checked


def _with_weight(weight: torch.Tensor, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias).requires_grad_(False)
    layer.weight.copy_(weight)
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_then_dequantize_is_within_nf4_error(backend):
    weight = torch.randn(256, 512)
    layer = Linear4bit.from_linear(_with_weight(weight), torch.float32, backend)
    error = layer.dequantized_weight(torch.float32) - weight
    assert error.norm() / weight.norm() < REL_ERROR_BOUND
    assert error.abs().mean() < MEAN_ERROR_BOUND * weight.std()
    assert error.abs().max() > 0  # it is quantised at all


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_forward_and_grads(backend):
    weight, x = torch.randn(64, 128), torch.randn(5, 128, requires_grad=True)
    plain = _with_weight(weight, bias=True)
    layer = Linear4bit.from_linear(plain, torch.float32, backend)
    out = layer(x)
    expected = nn.functional.linear(x, layer.dequantized_weight(torch.float32), plain.bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight(torch.float32).sum(0).expand(5, -1))
    assert layer.weight.grad is None
    assert layer(x.detach().bfloat16()).dtype == torch.bfloat16  # returns the input's dtype


# -- quantize: what, and bad input ------------------------------------------------------------------------------
def test_quantize_summary_and_skips():
    recipe = {
        "bits": 4,
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "float32",
        "backend": "auto",
        "skip_modules": ["o_proj"],
    }
    model, summary = dt.quantize(
        _llama(), **recipe
    )  # the recipe's model.quantization keys, as the trainer passes them
    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert names == summary.quantized and len(names) == 2 * 5  # q, k, v, gate, up per block
    assert summary.kept["lm_head"] == "output head"
    assert summary.kept["model.layers.0.self_attn.o_proj"] == "skip_modules"
    assert "not a multiple of the block size 64" in summary.kept["model.layers.1.mlp.down_proj"]
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert (
        isinstance(model.model.embed_tokens, nn.Embedding) and model.model.embed_tokens.weight.dtype == torch.float32
    )
    assert summary.bytes_after < summary.bytes_before
    assert "kept in full precision: lm_head (output head)" in str(summary)


def test_quantize_keeps_task_heads():
    model, summary = dt.quantize(tiny_model("bert", "seq_cls", hidden_size=64, intermediate_size=128))
    assert summary.kept["classifier"] == "task head" and summary.kept["bert.pooler.dense"] == "task head"
    assert any("attention.self.query" in n for n in summary.quantized)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits": 8}, ConfigError, "bits must be 4"),
        ({"quant_type": "fp8"}, ConfigError, "quant_type"),
        ({"quant_type": "fp4", "backend": "torchao"}, ConfigError, "quant_type .fp4. needs backend .bitsandbytes."),
        ({"compute_dtype": "float64"}, ConfigError, "compute_dtype"),
        ({"backend": "gptq"}, ConfigError, "backend"),
        ({"backend": "torchao", "double_quant": False}, ConfigError, "double_quant"),
        ({"block_size": 32}, TypeError, "block_size"),
    ],
)
def test_quantize_rejects_bad_arguments(kwargs, error, match):
    model = _llama()
    before = output_of(model, tiny_inputs("llama"))
    with pytest.raises(error, match=match):
        dt.quantize(model, **kwargs)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert torch.equal(output_of(model, tiny_inputs("llama")), before)


def test_quantize_refuses_quantized_or_adapted_models():
    model, _ = dt.quantize(_llama(), backend=BACKENDS[0])
    layers = dict(model.named_modules())
    with pytest.raises(QuantizationError, match="already quantised"):
        dt.quantize(model)
    assert dict(model.named_modules()) == layers
    delta = dt.get_delta_model(_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(QuantizationError, match="adapters"):
        dt.quantize(delta.base_model)


def test_quantize_refuses_a_model_with_integer_weights_and_keeps_seq2seq_heads():
    """An 8-bit model (bitsandbytes' Linear8bitLt is an nn.Linear of int8 weights) was quantised from its raw int8
    values, its scale dropped (logits 0.94 off); BART's and T5's classification_head was quantised."""
    model = _llama()
    q = model.model.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(q.weight.detach().round().to(torch.int8), requires_grad=False)
    with pytest.raises(QuantizationError, match=r"integer weights already .*'model.layers.0.self_attn.q_proj'"):
        dt.quantize(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    for family in ("bart", "t5"):
        overrides = (
            {"d_model": 64} if family == "t5" else {"d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128}
        )
        _, summary = dt.quantize(tiny_model(family, "seq_cls", **overrides), backend=BACKENDS[0])
        heads = {n for n in summary.kept if "classification_head" in n}
        assert heads and all(summary.kept[n] == "task head" for n in heads), family
        assert not any("classification_head" in n for n in summary.quantized)


def test_methods_that_would_train_4bit_weights_are_refused_in_one_line():
    """Full fine-tuning, freeze, or a 4-bit module in modules_to_save: a traceback from bitsandbytes ("only Tensors
    of floating point dtype can require gradients"), or with torchao weights counted as trainable that never
    trained."""
    model, _ = dt.quantize(_llama(), backend=BACKENDS[0])
    before = _state(model)
    cases = [
        (dt.FullConfig(), r"^full: 'model.layers.0.self_attn.q_proj.weight' is a 4-bit weight, which cannot train"),
        (dt.FreezeConfig(freeze_trainable_layers=1), r"^freeze: 'model.layers.1.self_attn.q_proj.weight' is a 4-bit"),
        (
            dt.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["q_proj"]),
            r"^modules_to_save: 'model.layers.0.self_attn.q_proj' holds 4-bit layers",
        ),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            dt.get_delta_model(model, config)
        assert not any(isinstance(m, DeltaLayer) for m in model.modules())
        after = _state(model)
        assert after.keys() == before.keys() and all(
            all(torch.equal(a, b) for a, b in zip(after[k], before[k])) for k in before
        )
    frozen = dt.get_delta_model(
        model, dt.FreezeConfig(freeze_trainable_layers=1, freeze_trainable_modules=["input_layernorm"])
    )
    assert frozen.get_nb_trainable_parameters()[0] == 64  # a norm of a 4-bit model still trains


def test_merge_report_compares_with_the_adapters_that_merge():
    """merge_quantized(adapter_names=["b"]) with "a" active measured the merge against "a" (0.67 off, the distance
    between the two adapters) instead of "b"."""
    probe = tiny_inputs("llama")
    delta = _qlora(BACKENDS[0])
    delta.add_adapter("b", dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    delta.set_adapter("b")
    want = output_of(delta, probe)
    delta.set_adapter("default")
    assert (output_of(delta, probe) - want).abs().max() > 1e-2
    plain, report = dt.merge_quantized(delta, probe, adapter_names=["b"])
    assert report.max_abs_diff == pytest.approx((output_of(plain, probe) - want).abs().max().item(), rel=1e-6)
    assert report.max_abs_diff < 1e-4


# -- LoRA on 4-bit layers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_step_changes_only_adapters(backend, dtype):
    delta = _qlora(backend, compute_dtype=dtype)
    assert isinstance(delta.base_model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    output_of(delta, tiny_inputs("llama"))  # an inference pass first must not spoil training (see test below)
    before = _state(delta)
    ids = tiny_inputs("llama")["input_ids"]
    embeds = delta.get_input_embeddings()(ids).detach().requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in delta.parameters() if p.requires_grad], lr=1e-2)
    delta.train()
    loss = delta(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0  # gradients reach the input through 4-bit layers
    optimizer.step()
    after = _state(delta)
    trainable = {n for n, p in delta.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    for name in before:
        same = all(torch.equal(a, b) for a, b in zip(before[name], after[name]))
        assert same != (name in trainable), name  # adapters moved; everything else, 4-bit storage included, did not


@pytest.mark.gpu
@pytest.mark.parametrize("backend", quant.BACKENDS)
def test_lora_step_on_cuda(backend):
    if not quant._available(backend):
        pytest.skip(f"{backend} is not installed")
    model, summary = dt.quantize(_llama().cuda(), backend=backend, compute_dtype="bfloat16")
    assert summary.backend == backend and model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    delta = dt.get_delta_model(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = _state(delta)
    ids = tiny_inputs("llama")["input_ids"].cuda()
    delta.train()
    delta(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in delta.parameters() if p.requires_grad], lr=0.1).step()
    after = _state(delta)
    for name in before:
        assert all(torch.equal(a, b) for a, b in zip(before[name], after[name])) == (".lora_" not in name), name
    plain, report = dt.merge_quantized(delta, {"input_ids": ids})
    assert report.max_abs_diff < 0.1  # bf16 merge: rounding of the merged weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_round_trip_and_onto_the_unquantized_base(backend, tmp_path):
    inputs = tiny_inputs("llama")
    delta = _qlora(backend)
    out_q = output_of(delta, inputs)
    delta.save_pretrained(tmp_path)

    model, _ = dt.quantize(_llama(), backend=backend)
    assert torch.equal(output_of(dt.DeltaModel.from_pretrained(model, tmp_path), inputs), out_q)

    # The same file is an ordinary LoRA adapter for the full-precision base; outputs differ by NF4's error only.
    out_fp = output_of(dt.DeltaModel.from_pretrained(_llama(), tmp_path), inputs)
    base_fp, base_q = output_of(_llama(), inputs), output_of(dt.quantize(_llama(), backend=backend)[0], inputs)
    assert (out_fp - base_fp).abs().max() > 1e-2  # the adapter does change the output
    nf4_error = (base_q - base_fp).norm() / base_fp.norm()
    assert 0 < (out_q - out_fp).norm() / out_fp.norm() < 1.5 * nf4_error


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_count_and_memory(backend):
    delta = _qlora(backend)
    full = dt.get_delta_model(_llama(), delta.peft_config["default"].replace())
    assert delta.get_nb_trainable_parameters() == full.get_nb_trainable_parameters()  # 4-bit weights at full count

    layers = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    _, summary = dt.quantize(layers, backend=backend)
    assert summary.quantized_params == 2 * 512 * 512
    assert 0.5 < summary.bytes_per_param < 0.6  # 4 bits + double-quantised constants + a code book per layer
    footprint = dt.memory_footprint(layers)
    assert footprint.total_bytes == summary.quantized_bytes + 2 * 512 * 4  # plus the two fp32 biases
    assert summary.bytes_before == 2 * (512 * 512 + 512) * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_keeps_the_4bit_weights(backend):
    # A DPO reference model or an EMA copy is a deepcopy; torchao's own copy re-quantises and fails on small layers.
    delta = _qlora(backend)
    twin = copy.deepcopy(delta)
    assert torch.equal(output_of(twin, tiny_inputs("llama")), output_of(delta, tiny_inputs("llama")))
    assert all(
        a.data_ptr() != b.data_ptr()
        for a, b in zip(
            quant._storage(twin.base_model.model.layers[0].self_attn.k_proj.weight),
            quant._storage(delta.base_model.model.layers[0].self_attn.k_proj.weight),
        )
    )


def test_prepare_for_kbit_training():
    model = _llama().to(torch.bfloat16)
    model, _ = dt.quantize(model, compute_dtype="bfloat16", backend=BACKENDS[0])
    stored = _state(model)
    with warnings.catch_warnings(record=True) as caught:  # transformers 5.25 deprecates gradient_checkpointing_enable
        warnings.simplefilter("always")
        dt.prepare_for_kbit_training(model)
    assert not [w for w in caught if "checkpointing" in str(w.message)]
    assert model.model.norm.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    assert all(not p.requires_grad for p in model.parameters())
    assert checkpointing(model)
    for name, tensors in _state(model).items():
        if "proj.weight" in name and name in stored and stored[name][0].dtype == torch.uint8:
            assert all(torch.equal(a, b) for a, b in zip(stored[name], tensors))
    delta = dt.get_delta_model(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    delta.train()
    ids = tiny_inputs("llama")["input_ids"]
    delta(input_ids=ids, labels=ids).loss.backward()  # checkpointed blocks still give the adapters gradients
    grads = [p.grad for n, p in delta.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    with pytest.raises(QuantizationError, match="before adding adapters"):
        dt.prepare_for_kbit_training(delta)


# -- merging ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_report_is_the_real_error(backend):
    probe = tiny_inputs("llama")
    delta = _qlora(backend)
    reference = output_of(delta, probe)
    plain, report = dt.merge_quantized(delta, probe)
    assert not any(isinstance(m, (Linear4bit, DeltaLayer)) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    diff = (reference - output_of(plain, probe)).abs()
    assert report.max_abs_diff == pytest.approx(diff.max().item(), rel=1e-6, abs=0)
    assert report.mean_abs_diff == pytest.approx(diff.mean().item(), rel=1e-6, abs=0)
    assert report.max_abs_diff < 1e-4  # fp32: merging a dequantised weight is exact up to rounding

    # Re-quantised, the merged weight W + s B A is rounded to NF4 again. With B = 0 it is W itself, whose values are
    # on the NF4 grid already (almost no error); a real update moves them off it: the error appears.
    errors = []
    for scale in (0.0, 1.0):
        delta = _qlora(backend, scale_b=scale)
        reference = output_of(delta, probe)
        plain, report = dt.merge_quantized(delta, probe, requantize=True)
        assert isinstance(plain.model.layers[0].self_attn.q_proj, Linear4bit)
        assert "model.layers.0.self_attn.q_proj" in report.quantized
        diff = (reference - output_of(plain, probe)).abs()
        assert report.max_abs_diff == pytest.approx(diff.max().item(), rel=1e-6, abs=0)
        assert report.mean_abs_diff == pytest.approx(diff.mean().item(), rel=1e-6, abs=0)
        errors.append(report.mean_abs_diff)
    assert errors[1] > 10 * errors[0] and errors[1] > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_of_a_4bit_model_saves_and_loads_with_transformers(family, tmp_path):
    """merge_and_unload() on a 4-bit base returns a plain model: adapted layers merged, the others dequantised
    (GPT-2's back to Conv1D), so save_pretrained writes it and transformers reads it back with the same logits."""
    from transformers import AutoModelForCausalLM

    probe = tiny_inputs(family)
    if family == "llama":
        delta = _qlora(BACKENDS[0])
    else:
        model, _ = dt.quantize(tiny_model("gpt2", n_embd=64), backend=BACKENDS[0])
        lora = dt.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
        delta = dt.get_delta_model(model, lora)
    reference = output_of(delta, probe)
    plain = delta.merge_and_unload()  # LoRA asks Linear4bit.dequantize() for a plain layer; the rest unpack
    assert not any(quant.is_quantized(m) or isinstance(m, DeltaLayer) for m in plain.modules())
    layers = [plain.model.layers[0].self_attn.q_proj, plain.model.layers[0].self_attn.k_proj] if family == "llama" else [
        plain.transformer.h[0].attn.c_attn, plain.transformer.h[0].mlp.c_fc]  # fmt: skip
    want = "Linear" if family == "llama" else "Conv1D"
    assert [type(m).__name__ for m in layers] == [want, want]  # adapted, and not adapted
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    torch.testing.assert_close(output_of(plain, probe), reference, atol=1e-4, rtol=1e-4)
    plain.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(output_of(again, probe), output_of(plain, probe), atol=0, rtol=0)


def test_merge_and_unload_can_keep_the_unadapted_layers_in_4bit():
    plain = _qlora(BACKENDS[0]).merge_and_unload(dequantize=False)
    q_proj = plain.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.Linear) and not isinstance(q_proj, Linear4bit)  # merged: dequantised
    assert isinstance(plain.model.layers[0].self_attn.k_proj, Linear4bit)  # not adapted: still 4-bit


def test_merge_without_the_backend_fails_and_leaves_the_model(monkeypatch):
    probe = tiny_inputs("llama")
    delta = _qlora("torchao")
    reference = output_of(delta, probe)
    for path in quant._NF4_MODULES:
        monkeypatch.setitem(sys.modules, path, None)  # as if torchao were not installed
    with pytest.raises(ImportError, match="'torchao' is not installed"):
        dt.merge_quantized(delta, probe)
    monkeypatch.undo()
    assert delta.peft_config and isinstance(delta.base_model.model.layers[0].self_attn.q_proj, DeltaLayer)
    assert torch.equal(output_of(delta, probe), reference)


def test_gpt2_conv1d_layers_quantize_and_merge_back_to_conv1d():
    model = tiny_model("gpt2", n_embd=64)
    _, summary = dt.quantize(model, backend=BACKENDS[0])
    assert "transformer.h.0.attn.c_attn" in summary.quantized
    delta = dt.get_delta_model(model, dt.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    inputs = tiny_inputs("gpt2")
    plain, report = dt.merge_quantized(delta, inputs)
    layer = plain.transformer.h[0].attn.c_attn
    assert type(layer).__name__ == "Conv1D" and tuple(layer.weight.shape) == (64, 192)
    assert report.max_abs_diff < 1e-4


# -- models quantised by transformers + bitsandbytes ---------------------------------------------------------------
def _bnb_llama(folder, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not (folder / "config.json").exists():
        # intermediate 128: bitsandbytes 0.50's CPU inference repacking fails on in_features=96 (down_proj).
        tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(folder)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map=device).eval()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_transformers_bnb_model_works_as_with_peft(device, tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    if device == "cpu" and "bitsandbytes" not in BACKENDS:
        pytest.skip("bitsandbytes does not run on this CPU")
    inputs = {k: v.to(device) for k, v in tiny_inputs("llama").items()}
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    delta = dt.get_delta_model(_bnb_llama(tmp_path, device), config)
    assert type(delta.base_model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    # Train before any no-grad forward: on CPUs with AVX512-BF16, bitsandbytes 0.50's Linear4bit repacks its weight
    # at the first no-grad eval forward, and after that no gradient reaches the adapters (with PEFT alike).
    delta.train()
    delta(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in delta.named_parameters() if p.requires_grad)
    delta.eval()
    ours = output_of(delta, inputs)

    theirs = peft.get_peft_model(
        _bnb_llama(tmp_path, device), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    peft.set_peft_model_state_dict(theirs, delta.adapter_state_dict())
    torch.testing.assert_close(output_of(theirs, inputs), ours, atol=1e-5, rtol=1e-5)
    assert delta.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

    delta.merge_adapter()  # W + s B A quantised again in place, as peft's (tests/test_quant_probe24.py: equal logits)
    assert quant.is_quantized(delta.get_base_model().model.layers[0].self_attn.q_proj.base_layer)
    delta.unmerge_adapter()
    plain, report = dt.merge_quantized(delta, inputs)
    assert not any(quant.is_quantized(m) for m in plain.modules())
    # Not 1e-4: the adapter model ran bitsandbytes' no-grad CPU kernel, which differs from dequantise-then-fp32-matmul
    # by 2.6e-3 on these logits (measured); the report shows exactly that.
    assert report.max_abs_diff < 1e-2


# -- quality ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_qlora_reaches_the_loss_lora_reaches():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    losses = {}
    for name, quantized in (("lora", False), ("qlora", True)):
        model = _llama()
        if quantized:
            model, _ = dt.quantize(model)
        delta = dt.get_delta_model(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        optimizer = torch.optim.AdamW([p for p in delta.parameters() if p.requires_grad], lr=1e-2)
        delta.train()
        for _ in range(40):
            loss = delta(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        losses[name] = loss.item()
    start = torch.log(torch.tensor(float(VOCAB))).item()
    assert losses["lora"] < 0.8 * start  # it learns (4.83 -> 3.63 measured)
    assert abs(losses["qlora"] - losses["lora"]) < 0.05 * losses["lora"]  # and QLoRA as well (3.62 measured)
