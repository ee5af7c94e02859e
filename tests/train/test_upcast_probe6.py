"""A half-precision base trains its adapters in float32 (peft's ``autocast_adapter_dtype``, LLaMA-Factory's upcast):
AdamW's steps on bf16 adapter weights round away."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny, tiny_inputs, tiny_model
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.train import build, train
from deltatune.train.models import upcast_adapters

METHODS = {
    "lora": lambda: dt.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]),
    "dora": lambda: dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False),
    "ia3": lambda: dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "bottleneck": lambda: dt.BottleneckConfig(),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_upcast_casts_the_adapters_alone_and_the_model_computes_as_before(method):
    task = "seq_cls" if method == "lora" else "causal_lm"
    delta = dt.get_delta_model(tiny_model("llama", task).to(torch.bfloat16), METHODS[method]()).eval()
    inputs = tiny_inputs("llama", task)
    with torch.no_grad():
        before = delta(**inputs).logits.float()
    assert upcast_adapters(delta) > 0
    for name, p in delta.named_parameters():
        adapter = any(k in name for k in ("lora_", "ia3_", "adapter_"))
        assert p.dtype == (torch.float32 if adapter else torch.bfloat16), name  # a head's copy stays as loaded
    with torch.no_grad():
        after = delta(**inputs).logits
    assert after.dtype == torch.bfloat16
    torch.testing.assert_close(after.float(), before, atol=0.05, rtol=0)  # bf16 rounding of the update's path


def test_ia3_vectors_move_under_adamw_only_in_float32():
    """5 AdamW steps at lr 3e-3 from 1.0: in bf16 a step up rounds back to 1 (the spacing above 1 is 0.0078)."""
    changed = {}
    for upcast in (False, True):
        torch.manual_seed(0)
        delta = dt.get_delta_model(tiny_model("llama").to(torch.bfloat16), METHODS["ia3"]()).train()
        if upcast:
            upcast_adapters(delta)
        params = [p for p in delta.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
        inputs = tiny_inputs("llama")
        for _ in range(5):
            delta(**inputs, labels=inputs["input_ids"]).loss.backward()
            opt.step()
            opt.zero_grad()
        changed[upcast] = (sum(int((p > 1).sum()) for p in params), sum(p.numel() for p in params))
    grew, total = changed[True]
    assert changed[False][0] == 0 and grew > total // 4  # about half the entries move up: none in bf16


def test_a_bf16_run_trains_and_saves_float32_adapters(tmp_path):
    base = save_tiny(tmp_path / "bert", "bert", "seq_cls")
    rows = [{"text": f"a {w} film {i}", "label": i % 2} for i, w in enumerate(["good", "bad", "fine", "dull"] * 4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "stage": "cls",
        "model": {"name_or_path": base, "dtype": "bfloat16"},
        "method": {"name": "ia3", "target_modules": ["key", "value", "output.dense"]},
        "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 16},
        "train": {"batch_size": 8, "lr": 3e-3, "seed": 0, "max_steps": 2, "report_to": ["none"]},
        "output": {"dir": str(tmp_path / "run")},
    }
    train(build(recipe))
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    vectors = {k: v for k, v in saved.items() if "ia3_l" in k}
    assert vectors and {v.dtype for v in vectors.values()} == {torch.float32}
    assert any((v != 1).any() for v in vectors.values())


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A finished bf16 sft run of a tiny Llama with LoRA, evaluated at its end."""
    root = tmp_path_factory.mktemp("bf16")
    base = save_tiny(root / "llama", "llama")
    rows = [{"prompt": f"count {i}", "completion": f" {i} {i + 1} {i + 2}"} for i in range(24)]
    for name, part in (("train", rows[:16]), ("eval", rows[16:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    recipe = {
        "stage": "sft",
        "model": {"name_or_path": base, "dtype": "bfloat16"},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 64},
        "train": {"batch_size": 4, "lr": 1e-2, "seed": 0, "max_steps": 3, "report_to": ["none"]},
        "output": {"dir": str(root / "run")},
    }
    train(build(recipe))
    return str(root / "run")


def test_a_bf16_runs_adapter_reloads_as_it_trained_for_generate_and_eval(bf16_run):
    """generate/chat/scoring loaded a bf16 run in float32 (logits 0.003 off the run's), and once the run trained
    its adapter in fp32, eval read it rounded to bf16: neither was the model the run evaluated."""
    from deltatune.train.evaluation import evaluate
    from deltatune.train.run import load_adapter_model

    saved = load_file(f"{bf16_run}/adapter_model.safetensors")
    delta, _ = load_adapter_model(bf16_run)
    assert delta.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    loaded = {k: v for k, v in delta.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for key, value in saved.items():  # the file's float32 values, not their bf16 rounding
        ours = next(v for k, v in loaded.items() if k.replace(".default", "").endswith(key.split("base_model.")[-1]))
        assert ours.dtype == torch.float32 and torch.equal(ours, value), key
    merged_base, _ = load_adapter_model(bf16_run, dtype="float32")  # deltatune merge: merged in float32
    assert merged_base.get_base_model().model.embed_tokens.weight.dtype == torch.float32
    with open(f"{bf16_run}/metrics.json", encoding="utf-8") as fh:
        run_loss = json.load(fh)["eval_loss"]
    assert evaluate(bf16_run)["eval_loss"] == run_loss


def test_a_run_trained_under_fsdp_reloads_its_adapter_in_the_bases_dtype(bf16_run, tmp_path):
    """FSDP runs keep the adapters in the base's dtype (it flattens a layer in one dtype): reading one back in fp32
    would evaluate a model it never trained."""
    import shutil

    import yaml

    from deltatune.train.models import reload_as_trained

    run = tmp_path / "fsdp"
    shutil.copytree(bf16_run, run)
    recipe = yaml.safe_load((run / "run.yaml").read_text())
    recipe["train"]["fsdp"] = "full_shard"
    (run / "run.yaml").write_text(yaml.safe_dump(recipe))
    base = AutoModelForCausalLM.from_pretrained(recipe["model"]["name_or_path"], dtype=torch.bfloat16)
    delta = dt.DeltaModel.from_pretrained(base, run)
    reload_as_trained(delta, str(run))
    assert {p.dtype for n, p in delta.named_parameters() if "lora_" in n} == {torch.bfloat16}
