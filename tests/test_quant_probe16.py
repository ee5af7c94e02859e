"""QLoRA probe 16 (deltatune/methods/quant_tools.py, _quant_merge.py): merge_quantized refused on a bad probe batch
leaves the model as it was, in one line."""

from __future__ import annotations

import pytest
import torch
from methods.test_quant import BACKENDS, _qlora
from tiny import output_of, tiny_inputs
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.methods import quant
from deltatune.methods.quant import QuantizationError


# -- fault: merge_quantized put the model in eval mode (and the adapters to merge active) before its probe forward;
# a probe batch the model refused raised from inside transformers (e.g. "You must specify exactly one of input_ids or
# inputs_embeds") and left a training model in eval mode, with another adapter active.
@pytest.mark.parametrize(
    "probe, match",
    [
        (lambda x: {"input_idz": x["input_ids"]}, "forward failed on probe_inputs .ValueError: You must specify"),
        (lambda x: {"input_ids": x["input_ids"] + 1000}, "forward failed on probe_inputs .IndexError"),
        (lambda x: "The quick brown fox", "probe_inputs must be a dict .* got str"),
    ],
)
def test_a_bad_probe_batch_is_one_line_and_changes_nothing(probe, match):
    inputs = tiny_inputs("llama")
    delta = _qlora(BACKENDS[0]).train()
    delta.add_adapter("other", dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = output_of(delta.eval(), inputs)
    delta.train()
    with pytest.raises(QuantizationError, match=match):
        dt.merge_quantized(delta, probe(inputs), adapter_names=["other"])
    assert delta.training and all(m.training for m in delta.modules())
    assert delta.active_adapters == ["default"]
    assert type(delta.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert torch.equal(output_of(delta.eval(), inputs), before)
    plain, report = dt.merge_quantized(delta, inputs)  # the model still merges
    assert report.max_abs_diff < 1e-4


def test_an_unknown_adapter_name_leaves_the_model_training():
    delta = _qlora(BACKENDS[0]).train()
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        dt.merge_quantized(delta, tiny_inputs("llama"), adapter_names=["nope"])
    assert delta.training and delta.active_adapters == ["default"]


def _bnb_pair(tmp_path):
    """The same LoRA adapter on transformers' bitsandbytes 4-bit tiny llama, as deltatune's and as peft's."""
    peft = pytest.importorskip("peft")
    from tiny import tiny_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q, device_map="cpu")

    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    ours = dt.get_delta_model(load(), config)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ours.save_pretrained(tmp_path / "adapter")
    return ours, peft.PeftModel.from_pretrained(load(), tmp_path / "adapter")


# -- missing: peft's merge_and_unload(safe_merge=True) refuses a 4-bit model whose merged weight is not finite; the
# way deltatune merges a 4-bit model, merge_quantized, had no safe_merge (TypeError on the keyword) and folded a nan
# adapter in silently. Now it refuses in peft's words, every layer checked before any swap stays or any merge.
@pytest.mark.skipif("bitsandbytes" not in BACKENDS, reason="bitsandbytes does not run on this CPU")
def test_merge_quantized_safe_merge_refuses_a_nan_adapter_as_peft_and_changes_nothing(tmp_path):
    ours, theirs = _bnb_pair(tmp_path)
    inputs = tiny_inputs("llama")
    before = output_of(ours.eval(), inputs)
    assert torch.equal(before, output_of(theirs.eval(), inputs))
    cell = ours.get_base_model().model.layers[1].mlp.down_proj.lora_B["default"].weight[0, 0].item()
    for model in (ours, theirs):  # the last adapted layer, so that peft (layer by layer) refuses only there
        with torch.no_grad():
            model.get_base_model().model.layers[1].mlp.down_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError) as peft_error:
        theirs.merge_and_unload(safe_merge=True)
    bases = [type(m).__module__ + type(m).__name__ for n, m in ours.named_modules() if n.endswith("base_layer")]
    with pytest.raises(ValueError) as our_error:
        dt.merge_quantized(ours.train(), inputs, safe_merge=True)
    assert str(our_error.value) == str(peft_error.value)  # NaNs detected in the merged weights. The adapter ...
    assert "NaNs detected in the merged weights" in str(our_error.value)
    assert [
        type(m).__module__ + type(m).__name__ for n, m in ours.named_modules() if n.endswith("base_layer")
    ] == bases
    assert bases[0].startswith("bitsandbytes") and ours.training
    assert not any(getattr(m, "merged_adapters", None) for m in ours.modules())
    with torch.no_grad():  # repaired, the same model computes and merges as before
        ours.get_base_model().model.layers[1].mlp.down_proj.lora_B["default"].weight[0, 0] = cell
    assert torch.equal(output_of(ours.eval(), inputs), before)
    plain, report = dt.merge_quantized(ours, inputs, safe_merge=True)
    # (0.02: the layers ran an eval forward above, which on a CPU with AVX512-BF16 repacks them, see probe13)
    assert report.max_abs_diff < 0.05 and not any(quant.is_quantized(m) for m in plain.modules())


# -- missing: transformers' BitsAndBytesConfig quantises to FP4 by default (bnb_4bit_quant_type="fp4") and peft trains
# LoRA on it; quantize(quant_type="fp4") was refused ("quant_type must be 'nf4'"). With backend bitsandbytes it now
# packs the same bytes as transformers' loading, and LoRA on it computes peft's logits and gradients exactly.
@pytest.mark.skipif("bitsandbytes" not in BACKENDS, reason="bitsandbytes does not run on this CPU")
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_fp4_packs_transformers_bytes_and_lora_on_it_equals_peft(tmp_path, double_quant):
    peft = pytest.importorskip("peft")
    from tiny import tiny_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    inputs = tiny_inputs("llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    _, summary = dt.quantize(model, quant_type="fp4", double_quant=double_quant, backend="bitsandbytes")
    assert str(summary).startswith("quantised 14 layers to FP4 (bitsandbytes")
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    ours = dt.get_delta_model(model, config)
    ours.save_pretrained(tmp_path / "adapter")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_use_double_quant=double_quant)  # fmt: skip
    assert q.bnb_4bit_quant_type == "fp4"  # (transformers' default)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q, device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    a = ours.base_model.model.layers[1].mlp.down_proj.base_layer
    b = theirs.base_model.model.model.layers[1].mlp.down_proj.base_layer
    assert torch.equal(a.weight.data, b.weight.data) and a.weight.quant_state.quant_type == "fp4"
    out = [m.train()(**inputs, labels=inputs["input_ids"]) for m in (ours, theirs)]
    for o in out:
        o.loss.backward()
    assert torch.equal(out[0].logits, out[1].logits)
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (ours, theirs)]
    assert len(grads[0]) == len(grads[1]) == 8 and all(torch.equal(g, h) for g, h in zip(*grads))


@pytest.mark.skipif("torchao" not in BACKENDS, reason="torchao is not installed")
def test_quantize_fp4_on_torchao_is_one_line_and_changes_nothing():
    from methods.test_quant import _llama

    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dt.ConfigError, match="^quant_type 'fp4' needs backend 'bitsandbytes'.*got 'torchao'$"):
        dt.quantize(model, quant_type="fp4", backend="torchao")
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


# -- fault: quantize on a model with no linear layer it would quantise (none, or all kept: in_features not a multiple
# of 64) returned a summary of 0 layers, which the recipe path drops: a "QLoRA" run trained in full precision.
def test_quantize_with_nothing_to_quantise_is_one_line_and_changes_nothing():
    from tiny import tiny_model

    embed = torch.nn.Sequential(torch.nn.Embedding(10, 64), torch.nn.LayerNorm(64))
    with pytest.raises(QuantizationError, match=r"^quantize: Sequential has no linear layer to quantise \(none at"):
        dt.quantize(embed, backend=BACKENDS[0])
    model = tiny_model("llama")  # hidden 32, intermediate 48: every in_features below the block size 64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=r"\(15 kept in full precision, e.g. 'model.layers.0.self_attn.q_"):
        dt.quantize(model, backend=BACKENDS[0])
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


# -- fault (review of 5861694): a QLoRA run trained before that commit on a model with every layer kept (hidden 32)
# trained in full precision; its merge, generate and --resume then failed with the new refusal. A trained run's base
# is built as it trained (full precision); a new run of that recipe is still refused.
def test_a_run_trained_with_nothing_to_quantise_reloads_in_full_precision_and_a_new_run_is_refused(
    tmp_path, monkeypatch
):
    import json

    import yaml
    from reliability.reliability_helpers import cli
    from tiny import save_tiny

    from deltatune.train import run as run_mod
    from deltatune.train.config import build
    from deltatune.train.run_load import load_adapter_model

    base = save_tiny(tmp_path / "base", "llama")  # hidden 32: every linear layer kept
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of a small text"}) + "\n" for i in range(4)))
    recipe = {"stage": "pt", "model": {"name_or_path": base, "quantization": {"bits": 4}},
              "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False},
              "data": {"train": str(data), "max_length": 16},
              "train": {"batch_size": 4, "max_steps": 1, "lr": 0.01, "report_to": ["none"]},
              "output": {"dir": str(tmp_path / "run")}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with monkeypatch.context() as m:  # the run as the code before 5861694 trained it (nothing quantised, no refusal)
        m.setattr(run_mod, "_quantize", lambda model, q, **_: model)
        code, _, err = cli("train", str(tmp_path / "recipe.yaml"))
    assert code == 0, err[-500:]
    delta, tok = load_adapter_model(str(tmp_path / "run"))  # was: QuantizationError 'has no linear layer to quantise'
    full = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "run"))
    inputs = tok(["hello there"], return_tensors="pt")
    assert torch.equal(output_of(delta.eval(), inputs), output_of(full.eval(), inputs))
    code, _, err = cli("generate", "--adapter", str(tmp_path / "run"), "--prompt", "hello", "--max-new-tokens", "2")
    assert code == 0, err[-500:]
    code, _, err = cli("merge", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert code == 0, err[-500:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(output_of(merged.eval(), inputs), output_of(full.eval(), inputs), atol=1e-5)
    cfg = build(recipe)
    cfg.trained_run = True  # what a --resume sets (see the report's diff for run.py's _train)
    assert not any(quant.is_quantized(m) for m in run_mod.build_model(cfg, tok).modules())
    code, _, err = cli("train", str(tmp_path / "recipe.yaml"), "--overwrite")  # a new run: still refused
    assert code != 0 and "has no linear layer to quantise" in err


# -- fault: quant_type "FP4" said "quant_type must be 'nf4', got 'FP4' (or 'fp4', ...)"; fp4 with backend auto that
# resolved to torchao said "got 'torchao'", a backend the user never named.
def test_quant_type_messages_name_both_types_and_where_auto_went(monkeypatch):
    from methods.test_quant import _llama

    with pytest.raises(dt.ConfigError, match=r"^quant_type must be 'nf4' or 'fp4' \(fp4: backend bitsandbytes\), "
                                             r"got 'FP4'$"):  # fmt: skip
        dt.quantize(_llama(), quant_type="FP4")
    monkeypatch.setattr(quant, "_bnb_runs_on", lambda device: False)
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dt.ConfigError, match=r"needs backend 'bitsandbytes' \(torchao has NF4 only\); backend 'auto' "
                                             r"resolved to 'torchao' \(bitsandbytes is not available on cpu\)$"):  # fmt: skip
        dt.quantize(model, quant_type="fp4")
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


# -- fault: an out-of-memory error in merge_quantized's probe forward became "pass a batch the model takes".
def test_merge_quantized_reraises_out_of_memory_and_changes_nothing(monkeypatch):
    inputs = tiny_inputs("llama")
    delta = _qlora(BACKENDS[0]).train()

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(delta.get_base_model().model, "forward", oom)
    with pytest.raises(torch.OutOfMemoryError, match="^CUDA out of memory"):
        dt.merge_quantized(delta, inputs)
    assert delta.training and delta.active_adapters == ["default"]
    monkeypatch.undo()
    assert dt.merge_quantized(delta, inputs)[1].max_abs_diff < 1e-4


# -- fault: prepare_for_kbit_training turned checkpointing on only through transformers' switches, so a quantised
# diffusers denoiser (enable_gradient_checkpointing) silently trained without it.
def test_prepare_for_kbit_training_turns_on_a_diffusers_denoisers_checkpointing():
    from test_diffusion_probe16 import _unet

    unet = _unet(3)
    summary = dt.quantize(unet, backend=BACKENDS[0])[1]
    assert summary.quantized  # e.g. the time embedding's 64-wide linear_2
    grads = [p.requires_grad for p in unet.parameters()]
    with pytest.raises(QuantizationError, match=r"UNet2DConditionModel \(diffusers\) checkpoints non-reentrant only"):
        dt.prepare_for_kbit_training(unet, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert [p.requires_grad for p in unet.parameters()] == grads and not unet.is_gradient_checkpointing
    dt.prepare_for_kbit_training(unet)
    assert unet.is_gradient_checkpointing  # as diffusers' scripts' unet.enable_gradient_checkpointing()
