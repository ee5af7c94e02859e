"""``deltatune merge`` of a QLoRA run: the adapter goes onto the 4-bit base it was trained on, the merge into full
precision is measured (logits against the 4-bit adapter model on a fixed probe), printed, and kept beside the merged
model as merge_report.json; the merged folder loads with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from reliability_helpers import cli
from tiny import save_tiny


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    base = save_tiny(root / "base", "llama", hidden_size=64, intermediate_size=128)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of a small text to learn"}) + "\n" for i in range(8)))
    recipe = {
        "stage": "pt",
        "model": {"name_or_path": base, "quantization": {"bits": 4}},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "max_length": 16},
        "train": {"batch_size": 4, "max_steps": 2, "lr": 0.05, "report_to": ["none"], "logging_steps": 1},
        "output": {"dir": str(root / "run")},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = cli("train", str(root / "recipe.yaml"))
    assert code == 0, err
    return str(root / "run")


def test_merge_of_a_qlora_run_prints_and_records_the_merge_error(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltatune.methods.quant import is_quantized
    from deltatune.train.run_load import MERGE_PROBE, load_adapter_model

    out = tmp_path / "merged"
    code, stdout, err = cli("merge", "--adapter", qlora_run, "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "merge_report.json").read_text())
    assert report["dequantized_layers"] > 0 and report["quantized_layers"] == 0 and report["dtype"] == "float32"
    assert f"max {report['max_abs_diff']:.3g}, mean {report['mean_abs_diff']:.3g}" in stdout
    assert "merge_report.json" in stdout

    # The report is the real difference: the run's adapter on its 4-bit base against the merged folder as
    # transformers loads it, on the same probe.
    delta, tok = load_adapter_model(qlora_run)
    assert any(is_quantized(m) for m in delta.modules())  # the base the run trained on, not a full-precision one
    probe = tok(list(MERGE_PROBE), return_tensors="pt", padding=True)
    probe = {k: probe[k] for k in ("input_ids", "attention_mask")}
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        diff = (delta.eval()(**probe).logits - merged(**probe).logits).abs()
    assert report["max_abs_diff"] == pytest.approx(diff.max().item(), rel=1e-4, abs=1e-7)
    assert report["mean_abs_diff"] == pytest.approx(diff.mean().item(), rel=1e-4, abs=1e-8)
    assert not any(is_quantized(m) for m in merged.modules())


def test_a_bf16_qlora_run_reloads_onto_the_4bit_base_it_trained_on(tmp_path):
    """A QLoRA run with model.dtype bfloat16 was reloaded (merge, eval, generate) onto its float32 checkpoint
    quantised: 1% of the 4-bit bytes differed from the base it trained on."""
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.methods import quant
    from deltatune.train.run import load_adapter_model

    base = save_tiny(tmp_path / "base", "llama", hidden_size=64, intermediate_size=128)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of a small text"}) + "\n" for i in range(4)))
    recipe = {
        "stage": "pt",
        "model": {"name_or_path": base, "dtype": "bfloat16", "quantization": {"bits": 4}},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj"]},
        "data": {"train": str(data), "max_length": 8},
        "train": {"batch_size": 4, "max_steps": 1, "report_to": ["none"]},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = cli("train", str(tmp_path / "recipe.yaml"))
    assert code == 0, err
    delta, _ = load_adapter_model(str(tmp_path / "run"))
    trained, _ = dt.quantize(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), bits=4)
    q = delta.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    want = trained.model.layers[0].self_attn.q_proj
    assert all(torch.equal(a, b) for a, b in zip(quant._storage(q.weight), quant._storage(want.weight)))
    assert delta.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16


def test_merge_of_a_full_precision_run_writes_no_merge_report(base, tmp_path):
    code, stdout, err = cli("merge", "--adapter", base.run, "--out", str(tmp_path / "merged"))
    assert code == 0, err
    assert not (tmp_path / "merged" / "merge_report.json").exists() and "4-bit" not in stdout


def test_merge_of_a_qlora_seq2seq_run_probes_the_decoder_too(tmp_path):
    """The probe gave an encoder-decoder no decoder input: the merge of a T5 QLoRA run was a transformers traceback."""
    from transformers import AutoModelForSeq2SeqLM

    base = save_tiny(tmp_path / "base", "t5", d_model=64, d_kv=16, d_ff=128)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"source": f"say number {i}", "target": f"number {i}"}) + "\n" for i in range(8))
    )
    recipe = {
        "stage": "seq2seq",
        "model": {"name_or_path": base, "quantization": {"bits": 4, "backend": "torchao"}},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]},
        "data": {"train": str(data), "source_column": "source", "target_column": "target", "max_length": 16,
                 "max_target_length": 8},
        "train": {"batch_size": 4, "max_steps": 1, "lr": 0.01, "report_to": ["none"]},
        "output": {"dir": str(tmp_path / "run")},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    pytest.importorskip("torchao")
    assert cli("train", str(tmp_path / "recipe.yaml"))[0] == 0
    code, _, err = cli("merge", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["dequantized_layers"] > 0 and report["max_abs_diff"] < 1e-2
    AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged")  # a plain transformers folder
