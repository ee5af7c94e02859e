"""Stage caption on decoder-only vision-language models: a tiny LLaVA and a tiny BLIP-2 (OPT) built from configs and
saved with their processors (tests/vision/tiny_vlm.py). The prompt carries the image tokens the processor expands;
the labels are the answer tokens only (hand-checked); the loss is transformers' own; runs through the CLI train two
steps in the language tower; ``generate --image`` is the processor's documented prompt through ``generate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import last_wins
from tiny_vlm import QUERY_TOKENS, save_vlm

from deltatune.cli import main
from deltatune.data.images import ImageRow
from deltatune.data.load import DataError
from deltatune.train import caption as C
from deltatune.train.config import build
from deltatune.train.models import load_processor

ROOT = Path(__file__).resolve().parent.parent.parent
FAST = ["model.dtype=float32", "train.max_steps=2", "train.report_to=[none]", "train.batch_size=2",
        "train.logging_steps=1", "train.save_steps=1000", "train.eval_steps=1000"]  # fmt: skip
CAPTIONS = ["a handwritten five thin strokes", "a handwritten six thick strokes", "a handwritten seven thin strokes",
            "a handwritten eight thick strokes"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny LLaVA and a tiny BLIP-2 folder; grayscale images; caption rows; conversation rows (messages with an
    ``<image>`` marker, messages with an image content part, sharegpt without a marker)."""
    out = tmp_path_factory.mktemp("vlm")
    save_vlm(out / "llava", "llava")
    save_vlm(out / "blip2", "blip-2")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(out / f"{i}.png")
    _jsonl(out / "captions.jsonl", [{"image": f"{i}.png", "text": c} for i, c in enumerate(CAPTIONS)])
    _jsonl(out / "messages.jsonl", [
        {"messages": [{"role": "user", "content": "what digit is <image> ?"}, {"role": "assistant", "content": "five"},
                      {"role": "user", "content": "thick ?"}, {"role": "assistant", "content": "no"}],
         "images": ["0.png"]},
    ])  # fmt: skip
    # OpenAI-style content parts: the image named inside the message
    parts = [{"type": "text", "text": "what digit is it ?"}, {"type": "image", "image": "2.png"}]
    _jsonl(out / "parts.jsonl", [{"messages": [{"role": "user", "content": parts},
                                               {"role": "assistant", "content": "seven"}]}])  # fmt: skip
    _jsonl(out / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "what digit is it ?"}, {"from": "gpt", "value": "six"}],
         "images": ["1.png"]},
    ])  # fmt: skip
    return out


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _cfg(data: Path, model: str, train: str, **fields):
    return build({"stage": "caption", "model": {"name_or_path": str(data / model)},
                  "data": {"train": str(data / train), **fields}})  # fmt: skip


def _args(data: Path, tmp_path: Path, model: str, *extra: str) -> list[str]:
    return last_wins([
        "train", str(ROOT / "recipes" / "llava-caption-lora.yaml"), f"model.name_or_path={data / model}",
        f"data.train={data / 'captions.jsonl'}", f"data.eval={data / 'captions.jsonl'}", f"output.dir={tmp_path / 'run'}",
        *FAST, *extra,
    ])  # fmt: skip


def _labelled(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The tokens that train, in order."""
    assert len(ids) == len(labels)
    return [tok.convert_ids_to_tokens(t) for t, lab in zip(ids, labels) if lab != -100]


def test_llava_labels_are_exactly_the_caption_tokens(data):
    """Hand-checked on one row: the llava-1.5 chat template, 16 image tokens from the processor, the loss on the
    caption and the EOS that closes it (the template leaves the answer open), nothing else."""
    proc = load_processor(str(data / "llava"), "caption")
    assert isinstance(proc, C.VLMProcessor) and proc.image_token == "<image>" and not proc.prepends
    user = {"role": "user", "content": f"<image>\n{C.CAPTION_PROMPT}"}
    row = C.VLMExample("d:1", [ImageRow(str(data / "2.png"), None, "d:1")], [user, {"role": "assistant",
                       "content": "a handwritten seven"}])  # fmt: skip
    text, spans, special = C.render_vlm(proc, row.messages)
    assert text == "USER: <image>\nDescribe the image. ASSISTANT: a handwritten seven</s> " and special
    assert [text[a:b] for a, b in spans] == [" a handwritten seven</s>"]
    ids, labels, cut, modes = C.encode_vlm(proc, row, max_length=64)
    tokens = ["<s>", "user", ":", *["<image>"] * 16, "describe", "the", "image", ".", "assistant", ":", "a",
              "handwritten", "seven", "</s>"]  # fmt: skip
    assert ids == proc.tokenizer.convert_tokens_to_ids(tokens) and not cut and modes == ["L"]
    assert labels == [-100] * (len(ids) - 4) + ids[-4:]
    # the same ids as transformers' documented LLaVA prompt: the processor's chat template, then the processor
    img = Image.open(data / "2.png").convert("RGB")
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": C.CAPTION_PROMPT}]}]
    prompt = proc.processor.apply_chat_template(parts, add_generation_prompt=True)
    assert proc.processor(text=prompt, images=img)["input_ids"][0] == ids[:-4]
    # data.max_length caps the 13 text tokens (the image tokens come on top); a cut inside the image is refused
    short, short_labels, cut, _ = C.encode_vlm(proc, row, max_length=8)
    assert cut and short == ids[: 16 + 8] and short_labels == [-100] * 24
    with pytest.raises(DataError, match="d:1: 13 text tokens, more than data.max_length=8"):
        C.encode_vlm(proc, row, max_length=8, truncation="refuse")
    with pytest.raises(DataError, match="d:1: cutting the row to data.max_length=2 text tokens would cut an image"):
        C.encode_vlm(proc, row, max_length=2)


def test_other_templates_keep_the_marker_in_the_text(data):
    """Without a processor chat template: the tokenizer's (string content, the marker where the row has it; an open
    answer closed with EOS), or ``data.template``; the labels are still the answer's tokens."""
    from tiny import CHAT_TEMPLATE

    proc = load_processor(str(data / "llava"), "caption")
    proc.processor.chat_template, proc.tokenizer.chat_template = None, CHAT_TEMPLATE.replace("<|im_end|>", "")
    user = {"role": "user", "content": f"<image>\n{C.CAPTION_PROMPT}"}
    row = C.VLMExample("d:1", [ImageRow(str(data / "2.png"), None, "d:1")], [user, {"role": "assistant",
                       "content": "a handwritten seven"}])  # fmt: skip
    text, spans, _ = C.render_vlm(proc, row.messages)
    assert text == "<|im_start|>user\n<image>\nDescribe the image.\n<|im_start|>assistant\na handwritten seven</s>\n"
    ids, labels, _, _ = C.encode_vlm(proc, row, max_length=64)
    assert _labelled(proc.tokenizer, ids, labels) == ["a", "handwritten", "seven", "</s>"]
    assert ids.count(proc.image_token_id) == 16
    proc.template = "alpaca"  # data.template: this word vocabulary writes '###' as <unk> (refused: templates probe 22)
    with pytest.raises(DataError, match=r"^data.template=alpaca: the tokenizer has no tokens for the template's marker "
                       r"'### Instruction:'"):  # fmt: skip
        C.render_vlm(proc, row.messages)


@pytest.mark.parametrize("file, image, answers", [("messages.jsonl", "0.png", ["five", "</s>", "no", "</s>"]),
                                                  ("sharegpt.jsonl", "1.png", ["six", "</s>"]),
                                                  ("parts.jsonl", "2.png", ["seven", "</s>"])])  # fmt: skip
def test_conversation_rows_train_every_answer(data, file, image, answers):
    """messages / sharegpt rows with an images column (or image content parts): the marker where the row puts it
    (none: the image opens the first user turn); every assistant turn trains."""
    proc = load_processor(str(data / "llava"), "caption")
    (row,) = C.vlm_examples(str(data / file), _cfg(data, "llava", file))
    assert [r.path for r in row.images] == [str(data / image)]
    ids, labels, _, _ = C.encode_vlm(proc, row, max_length=64)
    assert _labelled(proc.tokenizer, ids, labels) == answers
    assert ids.count(proc.image_token_id) == 16


def test_blip2_labels_put_the_query_tokens_first(data):
    """BLIP-2's processor puts its 4 query tokens before the text; no chat template: the plain template."""
    proc = load_processor(str(data / "blip2"), "caption")
    assert proc.prepends
    (row, *_) = C.vlm_examples(str(data / "captions.jsonl"), _cfg(data, "blip2", "captions.jsonl"))
    ids, labels, _, _ = C.encode_vlm(proc, row, max_length=64)
    tokens = [*["<image>"] * QUERY_TOKENS, "<s>", "describe", "the", "image", ".", "a", "handwritten", "five", "thin",
              "strokes", "</s>"]  # fmt: skip
    assert ids == proc.tokenizer.convert_tokens_to_ids(tokens)
    assert _labelled(proc.tokenizer, ids, labels) == tokens[-6:]


def test_loss_is_transformers_loss_on_the_caption_tokens(data):
    """The model's loss on a prepared batch equals the cross-entropy worked out by hand over the caption tokens."""
    from transformers import AutoModelForImageTextToText

    proc = load_processor(str(data / "llava"), "caption")
    prepared = C.prepare_caption(_cfg(data, "llava", "captions.jsonl"), proc)
    batch = prepared.collator([prepared.train[0], prepared.train[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    model = AutoModelForImageTextToText.from_pretrained(data / "llava").eval()
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    assert keep.sum() == 2 * 6  # "a handwritten five thin strokes" + EOS, twice
    by_hand = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, by_hand)


def test_two_steps_through_the_cli_in_the_language_tower(data, tmp_path, capsys):
    """The recipe on the tiny LLaVA: LoRA in LLaMA's q_proj/v_proj only; eval adds BLEU-4 and ROUGE-L; ``deltatune
    eval`` gives the same keys."""
    assert main(_args(data, tmp_path, "llava", "method.towers=[language]")) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2 and {"eval_loss", "eval_bleu", "eval_rougeL"} <= metrics.keys()
    run = tmp_path / "run"
    report = (run / "report.md").read_text()
    assert "adapted layers per tower: language: 4" in report
    assert "Describe the image. ASSISTANT:[[ a handwritten five thin strokes</s>]] " in report
    targets = json.loads((run / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(f"model.language_model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                     for p in ("q_proj", "v_proj"))  # fmt: skip
    assert main(["eval", "--adapter", str(run)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)
    assert again["eval_bleu"] == pytest.approx(metrics["eval_bleu"])


def test_bottleneck_in_the_vision_tower_through_the_cli(data, tmp_path, capsys):
    """``method.towers: [vision]`` with bottleneck adapters: after CLIP's out_proj and mlp.fc2 of 2 blocks, none in
    the language model; the report counts them and the adapter records the full names."""
    method = "method={name: bottleneck, reduction_factor: 4, towers: [vision]}"
    assert main(_args(data, tmp_path, "llava", method, "data.eval=", "train.eval_steps=null")) == 0
    run = tmp_path / "run"
    assert "adapted layers per tower: vision: 4" in (run / "report.md").read_text()
    targets = json.loads((run / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(f"model.vision_tower.encoder.layers.{i}.{s}" for i in (0, 1)
                                     for s in ("self_attn.out_proj", "mlp.fc2"))  # fmt: skip


def test_blip2_two_steps(data, tmp_path, capsys):
    assert main(_args(data, tmp_path, "blip2")) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2 and "eval_bleu" in metrics
    assert "adapted layers per tower: language: 4" in (tmp_path / "run" / "report.md").read_text()


def _greedy(model, processor, image: Path, question: str) -> str:
    """transformers' documented LLaVA use: the processor's chat template, the processor, generate, the new tokens."""
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(parts, add_generation_prompt=True)
    enc = processor(text=prompt, images=Image.open(image).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_generate_image_with_a_prompt_and_beside_the_base(data, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from deltatune.train.run import load_adapter_model

    # 30 steps on 4 captions: the language model learns to say them (the base, random, says nothing of the kind)
    steps = ["train.max_steps=30", "train.lr=0.02", "method.r=8", "method.lora_dropout=0", "train.warmup_ratio=0",
             "train.scheduler=constant", "train.batch_size=4"]  # fmt: skip
    assert main(_args(data, tmp_path, "llava", *steps)) == 0
    run, image = str(tmp_path / "run"), data / "0.png"
    capsys.readouterr()
    args = ["generate", "--adapter", run, "--image", str(image), "--max-new-tokens", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip()
    delta, _ = load_adapter_model(run)
    processor = AutoProcessor.from_pretrained(data / "llava")
    assert printed == _greedy(delta, processor, image, C.CAPTION_PROMPT) and "handwritten" in printed, printed
    assert main([*args, "--prompt", "what digit is it ?"]) == 0
    assert capsys.readouterr().out.strip() == _greedy(delta, processor, image, "what digit is it ?")
    assert main([*args, "--compare"]) == 0
    base_line, adapter_line = capsys.readouterr().out.strip().splitlines()
    assert adapter_line == f"adapter: {printed}"
    base = AutoModelForImageTextToText.from_pretrained(data / "llava")
    assert base_line == f"base:    {_greedy(base, processor, image, C.CAPTION_PROMPT)}" != f"base:    {printed}"


def test_bad_rows_are_one_line(data, tmp_path, capsys):
    bad = {
        "markers": ({"messages": [{"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "a"}],
                     "images": ["0.png"]}, "2 <image> marker(s) in the messages for 1 image(s)"),
        "no image": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]},
                     "the row has no image"),
        "last turn": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                    {"role": "user", "content": "and ?"}], "images": ["0.png"]},
                      "ends with a user turn; stage caption needs it to end with an answer"),
        "url": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                 "images": ["https://x.org/a.png"]}, "is a URL; stage caption reads local image files"),
        "outside": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                     "images": ["../a.png"]}, "leads outside the data folder"),
        "preference": ({"prompt": "hi", "chosen": "a", "rejected": "b", "images": ["0.png"]},
                       "a preference row; stage caption reads image + caption rows"),
    }  # fmt: skip
    for name, (row, words) in bad.items():
        path = data / f"bad-{name.replace(' ', '-')}.jsonl"
        _jsonl(path, [row])
        assert main(_args(data, tmp_path, "llava", f"data.train={path}")) != 0, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{path.name}:1: " in err[0] and words in err[0], (name, err)
    # the text stages keep refusing such rows
    from deltatune.data.formats import read_samples
    from deltatune.data.load import read_rows
    from deltatune.data.sample import refuse_multimodal

    with pytest.raises(DataError, match="a multimodal row .* stage sft trains on text only"):
        refuse_multimodal(read_samples(read_rows(str(data / "sharegpt.jsonl"))), "sft")


def test_caption_metrics_hand_worked(monkeypatch):
    """Perfect captions score BLEU 1 and ROUGE-L 1 (metrics.py's scale, as seq2seq's eval_bleu); an imperfect one is
    worked out by hand: "a handwritten seven" against "a handwritten seven thin strokes" has LCS 3, P 3/3, R 3/5,
    ROUGE-L F 2 * 1 * 0.6 / 1.6 = 0.75; BLEU-4 0 (a 3-word caption has no 4-gram)."""

    class Rows:  # what caption_metrics reads of a dataset: (images, prompt, reference) per row
        def __init__(self, refs: list[str]) -> None:
            self.refs = refs

        def references(self, n: int):
            return [([], None, r) for r in self.refs[:n]]

    def says(*captions: str) -> None:
        it = iter(captions)
        monkeypatch.setattr(C, "_generate", lambda *args, **kwargs: next(it))

    model, refs = torch.nn.Linear(1, 1), ["a handwritten five thin strokes", "a handwritten seven thin strokes"]
    says(*refs)
    assert C.caption_metrics(model, None, Rows(refs), 8) == {"eval_bleu": 1.0, "eval_rougeL": 1.0}
    says("a handwritten seven")
    got = C.caption_metrics(model, None, Rows(refs[1:]), 8)
    assert got["eval_bleu"] == 0.0 and got["eval_rougeL"] == pytest.approx(0.75)
