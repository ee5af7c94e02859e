"""QLoRA probe 19 (deltatune/methods/quant_tools.py) against transformers 5.25's BitsAndBytesConfig loading: which
layers stay in full precision."""

from __future__ import annotations

import pytest
import torch
from methods.test_quant import BACKENDS
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.methods import quant

if "bitsandbytes" not in BACKENDS:
    pytest.skip("bitsandbytes does not run on this CPU", allow_module_level=True)


def _four_bit(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if quant._is_4bit_layer(m))


# -- fault: skip_modules naming a block or a sub-module (transformers' llm_int8_skip_modules=["model.layers.0"]) kept
# nothing: the entry was matched against the linear layers' own names only (10 of 14 layers quantised, not 7) -------
@pytest.mark.parametrize("skip", [["model.layers.0"], ["model.layers.1.mlp"], ["mlp.down_proj"]])
def test_skip_modules_keeps_the_layers_under_a_named_module_as_transformers_skip_modules(tmp_path, skip):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=[*skip, "lm_head"])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    model, summary = dt.quantize(AutoModelForCausalLM.from_pretrained(tmp_path), backend="bitsandbytes",
                                 skip_modules=skip)  # fmt: skip
    assert _four_bit(model) == _four_bit(theirs) == sorted(summary.quantized)
    kept = {n for n, why in summary.kept.items() if why == "skip_modules"}
    assert kept and all(not quant._is_4bit_layer(model.get_submodule(n)) for n in kept)
    assert len(summary.quantized) + len(kept) == 14  # 7 linear layers a block, lm_head kept as the output head


# -- fault: a requantised merge of DoRA on a bf16 4-bit base quantised m (W + s B A) / norm in fp32; peft's DoRA merge
# rounds it to the dtype W dequantises to (bf16) first: other 4-bit codes in 2 of 3 layers (0.053 off in W) -----------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_requantized_dora_merge_on_a_4bit_base_equals_peft_byte_for_byte(tmp_path, dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu",
                                                    dtype=dtype)  # fmt: skip

    lora = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                         use_dora=True)  # fmt: skip
    ours = dt.get_delta_model(load(), lora)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter")
    inputs = tiny_inputs("llama")
    merged, report = dt.merge_quantized(ours, inputs["input_ids"], requantize=True)
    reference = theirs.merge_and_unload()
    names = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    for layer in [f"model.layers.{i}.{n}" for i in range(2) for n in names]:
        a, b = merged.get_submodule(layer).weight, reference.get_submodule(layer).weight
        assert torch.equal(a.data, b.data) and torch.equal(a.quant_state.absmax, b.quant_state.absmax), layer
        assert a.quant_state.dtype == b.quant_state.dtype == dtype, layer  # peft: W's dtype (fp32 before)
    with torch.no_grad():
        assert torch.equal(merged.train()(**inputs).logits, reference.train()(**inputs).logits)
    assert report.requantized and len(report.quantized) == 14
    from safetensors.torch import load_file  # saved alike: the quant_state records the dtype (float32 before)

    merged.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft")
    a, b = (load_file(tmp_path / f / "model.safetensors") for f in ("ours", "peft"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _llama11(**kw):
    return tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=11, **kw)


def _linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


# -- fault (9041702): a regex skip_modules was full-matched against every module above a layer too, so a lookahead
# ("quantise only q_proj") kept all 77 layers -> NothingToQuantize; a regex now matches as transformers 5.25's
# should_convert_module: from the start of the layer's full name up to a '.' or its end -------------------------------
@pytest.mark.parametrize(
    "regex", [r"(?!.*q_proj).*", r"model\.layers\.1", r".*mlp", r"model\.layers\.1\.mlp\.(gate|up)"]
)
def test_a_skip_modules_regex_keeps_the_layers_transformers_should_convert_module_keeps(regex):
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = _llama11()
    theirs = {n for n in _linears(model) if not should_convert_module(n, [regex])}
    _, summary = dt.quantize(model, backend="bitsandbytes", skip_modules=regex)
    kept = {n for n, why in summary.kept.items() if why == "skip_modules"}
    assert kept == theirs and len(summary.quantized) == 77 - len(kept)
    if regex.startswith("(?!"):  # quantise only q_proj: 66 of 77 kept, 11 in 4 bits
        assert len(kept) == 66 and all(n.endswith("q_proj") for n in summary.quantized)
    if regex == r"model\.layers\.1":  # layers.1, not layers.10
        assert kept == {n for n in theirs if n.startswith("model.layers.1.")} and len(kept) == 7


def test_a_trained_run_with_a_lookahead_regex_reloads_in_4_bits_not_in_full_precision():
    from deltatune.train.run_load import _quantize

    model = _quantize(_llama11(), {"backend": "bitsandbytes", "skip_modules": r"(?!.*q_proj).*"}, trained=True)
    assert _four_bit(model) == sorted(f"model.layers.{i}.self_attn.q_proj" for i in range(11))  # 11, not 0


# -- decision: a list entry is a '.'-bounded suffix (as target_modules) of the layer or of any module above it; full
# paths keep what transformers 5.25 keeps; its raw suffix ('proj' keeps every *_proj) and its start-only match
# ('layers.0', 'mlp' keep nothing there) are not followed. Hand-counted on 11 blocks of 7 layers --------------------
@pytest.mark.parametrize(
    ("entry", "count", "theirs"),
    [("mlp", 33, 0), ("layers.0", 7, 0), ("layers.1", 7, 0), ("layers.10", 7, 0), ("model.layers.1", 7, 7),
     ("model.layers.1.mlp", 3, 3), ("self_attn.q_proj", 11, 11), ("proj", 0, 77), ("_proj", 0, 77), ("q", 0, 0)],
)  # fmt: skip
def test_a_skip_modules_list_entry_keeps_by_dotted_suffix_at_every_level(entry, count, theirs):
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = _llama11()
    assert sum(not should_convert_module(n, [entry]) for n in _linears(model)) == theirs
    _, summary = dt.quantize(model, backend="bitsandbytes", skip_modules=[entry])
    kept = sorted(n for n, why in summary.kept.items() if why == "skip_modules")
    assert len(kept) == count and len(summary.quantized) == 77 - count
    if entry.startswith("layers.1"):  # layers.1 is not layers.10's prefix, nor the reverse
        assert all(n.startswith(f"model.{entry}.") for n in kept)


# -- old runs: a skip_modules entry naming a module was a no-op before 9041702; a trained run reloading now keeps
# those layers in full precision, where it may have trained them in 4 bits: a one-line note names the entry ---------
def test_a_trained_run_whose_skip_modules_names_a_module_gets_a_note(capsys):
    from deltatune.train.run_load import _quantize

    def notes(skip, trained=True):
        _quantize(tiny_model("llama", hidden_size=64, intermediate_size=128), {"backend": "bitsandbytes",
                  "skip_modules": skip}, trained=trained)  # fmt: skip
        return [line for line in capsys.readouterr().err.splitlines() if "skip_modules" in line]

    [line] = notes(["q_proj", "model.layers.0"])
    assert "'model.layers.0'" in line and "its 7 layers stay in full precision" in line and "q_proj" not in line
    assert notes(["q_proj", "layers.1.mlp.down_proj"]) == [] and notes(["model.layers.0"], trained=False) == []
    assert "its 14 layers" in notes(r"model\.layers\.\d")[0]  # a regex full-matched the layer name before


# -- existing bug: _keep_in_fp32_modules naming a module (Blip-2's "qformer") was matched on layer names only:
# transformers' 4-bit loading keeps its 10 linear layers, deltatune quantised them (21 4-bit layers, not 11) -----------
def test_keep_in_fp32_modules_naming_a_module_keeps_its_layers_as_transformers_blip2(tmp_path, capsys):
    from transformers import BitsAndBytesConfig, Blip2Config, Blip2ForConditionalGeneration

    cfg = Blip2Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        qformer_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=64, vocab_size=128),
        text_config=dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=128, word_embed_proj_dim=64),
        num_query_tokens=4,
    )  # fmt: skip
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True)
    theirs = Blip2ForConditionalGeneration.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    model, summary = dt.quantize(Blip2ForConditionalGeneration.from_pretrained(tmp_path), backend="bitsandbytes")
    assert sorted(summary.quantized) == sorted(
        n for n, m in theirs.named_modules() if type(m).__name__ == "Linear4bit"
    )
    qformer = [n for n, why in summary.kept.items() if n.startswith("qformer.") and "_keep_in_fp32" in why]
    assert len(qformer) == 10 and len(summary.quantized) == 11
    from deltatune.train.run_load import _quantize  # a run trained before: its qformer was 4-bit then

    _quantize(Blip2ForConditionalGeneration.from_pretrained(tmp_path), {"backend": "bitsandbytes"}, trained=True)
    [line] = [x for x in capsys.readouterr().err.splitlines() if "names a module" in x]
    assert "_keep_in_fp32_modules 'qformer'" in line and "its 10 layers" in line


def test_keep_in_fp32_modules_match_a_full_path_not_any_inner_module():
    from transformers.quantizers.quantizers_utils import should_convert_module

    from deltatune.methods._quant_skip import kept_fp32

    fp32 = ["norm", "qformer", "wo"]
    names = ["model.norm.linear", "norm.linear", "qformer.encoder.dense", "model.qformer.dense", "decoder.block.0.wo",
             "model.layers.0.mlp.down_proj"]  # fmt: skip
    assert [kept_fp32(n, fp32) for n in names] == [not should_convert_module(n, fp32) for n in names]
    assert [kept_fp32(n, fp32) for n in names] == [False, True, True, False, True, False]


# -- fault: a _keep_in_fp32_modules_strict entry naming a module kept its layers in full precision (019da01 applied
# its module-prefix rule to strict entries too); transformers 5.25's bitsandbytes quantizer passes only
# _keep_in_fp32_modules to get_modules_to_not_convert, so it quantises them (7 layers of model.layers.0) -----------
def test_keep_in_fp32_modules_strict_naming_a_module_is_quantised_as_transformers_bnb(tmp_path, capsys):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from deltatune.methods._quant_skip import skip_changes
    from deltatune.train.run_load import _quantize

    class Strict(LlamaForCausalLM):
        _keep_in_fp32_modules_strict = ["model.layers.0"]

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    theirs = Strict.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    model, summary = dt.quantize(Strict.from_pretrained(tmp_path), backend="bitsandbytes")
    assert _four_bit(model) == _four_bit(theirs) == sorted(summary.quantized)
    assert len(summary.quantized) == 14 and sum(n.startswith("model.layers.0.") for n in summary.quantized) == 7
    assert skip_changes(Strict.from_pretrained(tmp_path), None) == []  # nothing changed for a trained run
    _quantize(Strict.from_pretrained(tmp_path), {"backend": "bitsandbytes"}, trained=True)
    assert "note" not in capsys.readouterr().err


# -- noise: the trained-run note above printed on every reload / eval / resume of every run whose skip_modules names
# a module, also of runs trained after 2026-12-07; a run now records runfolder.MARKS when it begins -----------------
def test_a_run_trained_under_the_module_rule_reloads_without_the_note_one_from_before_with_it(tmp_path, capsys):
    import json
    import os

    from tiny import save_tiny
    from transformers import AutoTokenizer

    from deltatune.train import run as run_mod
    from deltatune.train.config import build
    from deltatune.train.run_load import load_adapter_model
    from deltatune.train.runfolder import MARKS

    base = save_tiny(tmp_path / "base", "llama", hidden_size=64, intermediate_size=128)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of a small text"}) + "\n" for i in range(4)))
    out = tmp_path / "run"
    recipe = {"stage": "pt", "model": {"name_or_path": base, "quantization": {"bits": 4, "backend": "bitsandbytes",
              "skip_modules": ["model.layers.0"]}}, "method": {"name": "lora", "r": 4, "target_modules": ["q_proj"]},
              "data": {"train": str(data), "max_length": 16},
              "train": {"batch_size": 4, "max_steps": 1, "lr": 0.01, "report_to": ["none"]},
              "output": {"dir": str(out)}}  # fmt: skip
    run_mod.train(build(recipe))
    assert json.loads((out / MARKS).read_text()) == {"quant_skip_rule": 2, "seq2seq_label_smoothing": 1,
                                                     "alpaca_system": 1, "tag_prefix_space": 1,
                                                     "image_cls_class_label": 1}  # fmt: skip
    capsys.readouterr()

    def note() -> list[str]:
        cfg = build(recipe)
        cfg.trained_run = True  # a resume's or eval's base (run.build_model): the run's output.dir holds its marks
        run_mod.build_model(cfg, AutoTokenizer.from_pretrained(base))
        resumed = [line for line in capsys.readouterr().err.splitlines() if "note: skip_modules" in line]
        delta, _ = load_adapter_model(str(out))
        assert [n.removesuffix(".base_layer") for n in _four_bit(delta.get_base_model())] == sorted(  # layers.1's
            f"model.layers.1.{m}" for m in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                            "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"))  # fmt: skip
        reloaded = [line for line in capsys.readouterr().err.splitlines() if "note: skip_modules" in line]
        assert reloaded == resumed
        return reloaded

    assert note() == []  # was: the note, on a run trained under the rule
    os.remove(out / MARKS)  # a run written before 2026-12-07
    [line] = note()
    assert "'model.layers.0'" in line and "its 7 layers" in line
