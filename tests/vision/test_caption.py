"""Stage caption on a tiny ViT + GPT-2 captioner (the digits script's, smaller): the recipe for two steps, loss on
caption tokens only, tower counts in the report, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import last_wins

from deltatune.cli import main
from deltatune.data import digits
from deltatune.data.images import ImageRow
from deltatune.train import caption as C

ROOT = Path(__file__).resolve().parent.parent.parent
FAST = ["train.max_steps=2", "train.report_to=[none]", "train.batch_size=2", "train.logging_steps=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("captions")
    digits.init_captioner(str(out / "model"), hidden=32, layers=2)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        rows = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(out / f"{split}{i}.png")
            rows.append({"image": f"{split}{i}.png", "text": f"a handwritten {digits.WORDS[5 + i]}, thin strokes"})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _args(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return last_wins([
        "train", str(ROOT / "recipes" / "digits-caption.yaml"), f"model.name_or_path={data / 'model'}",
        f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'test.jsonl'}", f"output.dir={tmp_path / 'run'}",
        *FAST, *extra,
    ])  # fmt: skip


def test_caption_recipe_runs_two_steps(data, tmp_path, capsys):
    assert main(_args(data, tmp_path)) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2 and metrics["eval_perplexity"] > 1
    run = tmp_path / "run"
    assert (run / "tokenizer.json").is_file() and (run / "preprocessor_config.json").is_file()
    assert "4 train images were stored in mode 'L'" in (run / "report.md").read_text()


def test_lora_goes_into_the_decoder_by_default(data, tmp_path, capsys):
    """method.towers defaults to [language]: GPT-2's c_attn (self- and cross-attention) in 2 blocks, none in the ViT."""
    assert main(_args(data, tmp_path, "method.name=lora", "method.r=2")) == 0
    capsys.readouterr()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "adapted layers per tower: language: 4" in report
    targets = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(
        f"decoder.transformer.h.{i}.{a}.c_attn" for i in (0, 1) for a in ("attn", "crossattention")
    )


def test_labels_are_caption_tokens_then_eos_and_padding_is_ignored():
    tok = digits.caption_tokenizer()
    rows = [
        ImageRow("x.png", None, "d:1", "a handwritten seven, thin strokes"),
        ImageRow("y.png", None, "d:2", "a five"),
    ]
    ids, cut = C.encode_captions(rows, tok, max_length=16)
    assert cut == 0 and ids[1] == [*tok("a five", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    batch = C.collate([{"pixel_values": torch.zeros(3, 4, 4), "labels": i} for i in ids])
    assert batch["labels"].tolist()[1] == [*ids[1], -100, -100, -100, -100]
    short, cut = C.encode_captions(rows[:1], tok, max_length=3)
    assert cut == 1 and short[0] == [*ids[0][:2], tok.eos_token_id]


def test_refusals_in_one_line(data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "", "text": "a five"}) + "\n")
    assert main(_args(data, tmp_path, f"data.train={bad}")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1: caption row has no image" in err[0]
    from transformers import BertConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

    # a LLaVA (decoder-only, tests/vision/test_vlm_caption.py) saved without its processor; a text model
    LlavaConfig(vision_config=CLIPVisionConfig(), text_config=LlamaConfig()).save_pretrained(tmp_path / "llava")
    BertConfig().save_pretrained(tmp_path / "bert")
    for folder, words in (("llava", "has no processor that loads"), ("bert", "'bert' is not an image-to-text model")):
        assert main(_args(data, tmp_path, f"model.name_or_path={tmp_path / folder}")) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_generate_image_captions_with_the_adapter_and_beside_the_base(data, tmp_path, capsys):
    """``generate --image`` is the run's model captioning the file (greedy), checked against transformers' own
    generate on the same model; ``--compare`` adds the base model's caption, checked against the plain base."""
    from transformers import AutoModelForImageTextToText

    from deltatune.data.images import open_rgb, pixel_values
    from deltatune.train.run import load_adapter_model

    # 40 steps on 4 captions: the decoder learns to say them (the base, random, says nothing useful)
    steps = ["train.max_steps=40", "train.lr=0.05", "method.name=lora", "method.r=8", "train.warmup_steps=0"]
    assert main(_args(data, tmp_path, *steps)) == 0
    run, image = str(tmp_path / "run"), str(data / "test0.png")
    capsys.readouterr()
    args = ["generate", "--adapter", run, "--image", image, "--max-new-tokens", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip()

    delta, processor = load_adapter_model(run)
    pixels = pixel_values(processor.image_processor, [open_rgb(ImageRow(image, None, image))[0]])
    tok = processor.tokenizer

    def greedy(model) -> str:
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        with torch.no_grad():
            return tok.decode(model.eval().generate(pixel_values=pixels, **kw)[0], skip_special_tokens=True).strip()

    assert printed == greedy(delta) and "handwritten" in printed, printed
    assert main([*args, "--compare"]) == 0
    base_line, adapter_line = capsys.readouterr().out.strip().splitlines()
    assert adapter_line == f"adapter: {printed}"
    assert base_line == f"base:    {greedy(AutoModelForImageTextToText.from_pretrained(data / 'model'))}"


def test_generate_image_refusals_are_one_line(data, tmp_path, capsys):
    assert main(_args(data, tmp_path)) == 0
    run = str(tmp_path / "run")
    capsys.readouterr()
    cases = [
        (["--image", str(tmp_path / "missing.png")], "missing.png"),  # named before any model loads
        (["--prompt", "hi"], "is an image captioner (stage caption); give it an image"),
        (["--image", str(data / "test0.png"), "--prompt", "hi"], "an encoder-decoder captioner reads no prompt"),
        ([], "give --prompt TEXT or --image FILE"),
    ]
    for extra, words in cases:
        assert main(["generate", "--adapter", run, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err


def test_two_accumulated_micro_batches_equal_one_batch(data, tmp_path):
    """Captions of very different lengths: 2 micro-batches x 2 give the logged losses and gradient norms of
    batches of 4. The VisionEncoderDecoderModel's own loss is a mean per micro-batch that ignores the Trainer's
    token count, so the Trainer took it unscaled once per micro-batch: twice the loss and gradient at 2 x 2."""
    model = tmp_path / "model"
    digits.init_captioner(str(model), hidden=32, layers=2)
    config = json.loads((model / "config.json").read_text())
    for part in ("encoder", "decoder"):  # no dropout: both runs must compute alike
        config[part] |= {k: 0.0 for k, v in config[part].items() if "drop" in k and isinstance(v, float)}
    (model / "config.json").write_text(json.dumps(config))
    texts = ["a", "a handwritten five with thin strokes and a long tail", "one", "a seven, thick, slanted and small"]
    rows = [{"image": str(data / f"train{i}.png"), "text": t} for i, t in enumerate(texts)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    steps = {}
    for batch, accumulate in ((4, 1), (2, 2)):
        run = tmp_path / f"run{batch}x{accumulate}"
        assert main(["train", str(ROOT / "recipes" / "digits-caption.yaml"), f"model.name_or_path={model}",
                     f"data.train={tmp_path / 'rows.jsonl'}", "data.eval=null", f"output.dir={run}",
                     "train.max_steps=2", "train.report_to=[none]", f"train.batch_size={batch}",
                     f"train.grad_accum={accumulate}", "train.logging_steps=1"]) == 0  # fmt: skip
        log = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
        steps[batch] = [x for h in log if "loss" in h for x in (h["loss"], h["grad_norm"])]
    assert len(steps[4]) == 4 and steps[2] == pytest.approx(steps[4], rel=1e-5)
    # and one step over all 8 rows (a learning rate too small to matter) logs the model's own loss on them
    from deltatune.train.config import build
    from deltatune.train.run import load_adapter_model

    run = tmp_path / "whole"
    assert main(["train", str(ROOT / "recipes" / "digits-caption.yaml"), f"model.name_or_path={model}",
                 f"data.train={tmp_path / 'rows.jsonl'}", "data.eval=null", f"output.dir={run}", "train.max_steps=1",
                 "train.report_to=[none]", "train.batch_size=8", "train.lr=1e-12", "train.logging_steps=1"]) == 0  # fmt: skip
    logged = [h["loss"] for h in map(json.loads, (run / "log_history.jsonl").read_text().splitlines()) if "loss" in h]
    delta, processor = load_adapter_model(str(run))
    cfg = build(
        {"stage": "caption", "model": {"name_or_path": str(model)}, "data": {"train": str(tmp_path / "rows.jsonl")}}
    )
    prepared = C.prepare_caption(cfg, processor)
    batch = prepared.collator([prepared.train[i] for i in range(8)])
    with torch.no_grad():
        own = delta.eval()(**batch).loss.item()
    assert logged[0] == pytest.approx(own, rel=1e-5)


def test_a_bert_decoders_captions_end_and_stop_at_the_end_token_its_config_names(tmp_path):
    """ViT + BERT captioners: BERT's tokenizer has no EOS, so captions were trained without an end token and
    generate was told eos_token_id=None (never stop) over the model's own [SEP]."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessorPil,
    )

    from deltatune.train.embedded import resolve
    from deltatune.train.models import load_processor

    tok = AutoTokenizer.from_pretrained(resolve("minilm"))
    assert tok.eos_token is None
    enc = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16,
                    patch_size=4)  # fmt: skip
    dec = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=37, is_decoder=True, add_cross_attention=True)  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = tok.cls_token_id, 0, tok.sep_token_id
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config=config).eval()
    model.generation_config.eos_token_id = tok.sep_token_id
    model.generation_config.decoder_start_token_id = tok.cls_token_id
    for part in (model, tok, ViTImageProcessorPil(size={"height": 16, "width": 16})):
        part.save_pretrained(tmp_path / "vitbert")
    processor = load_processor(str(tmp_path / "vitbert"), "caption")
    ids, _ = C.encode_captions([ImageRow("x.png", None, "c.jsonl:1", "a handwritten seven")], processor.tokenizer, 16)
    assert ids[0] == [*tok("a handwritten seven", add_special_tokens=False)["input_ids"], tok.sep_token_id]
    with torch.no_grad():
        model.decoder.cls.predictions.decoder.bias.zero_()
        model.decoder.cls.predictions.decoder.bias[tok.sep_token_id] = 50.0  # [SEP] first: the caption is empty
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    pixels = processor.image_processor(images=[Image.open(image).convert("RGB")], return_tensors="pt").pixel_values
    with torch.no_grad():
        assert model.generate(pixel_values=pixels, max_new_tokens=8).tolist() == [[tok.cls_token_id, tok.sep_token_id]]
    calls = []
    generate = model.generate
    model.generate = lambda **kw: calls.append(kw) or generate(**kw)
    assert C.caption(model, processor, str(image), max_new_tokens=8) == ""
    assert calls[0].get("eos_token_id") == tok.sep_token_id
