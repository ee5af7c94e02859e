"""Caption probe 5: Idefics3 and SmolVLM processors wrap each image in extra text tokens (<fake_token_around_image>,
<row_i_col_j>, <global-img>, line breaks between tile rows), so pairing the processor's ids with the tokenizer's own
ids of the unexpanded text refused every row ("the processor tokenizes the row differently from its tokenizer"). The
labels are now placed by the processor's own offsets, moved past each image's expansion, and equal the assistant
mask of the processor's chat template call with TRL's generation-tagged training template."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vlm import _LLAMA, word_tokenizer

from deltatune.cli import main
from deltatune.data.images import ImageRow
from deltatune.data.load import DataError
from deltatune.train import caption as C

ROOT = Path(__file__).resolve().parent.parent.parent
EXTRA = ["<fake_token_around_image>", "<end_of_utterance>", "<|begin_of_text|>", "<|im_start|>", "<global-img>",
         *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]  # fmt: skip


def _trl_template(name: str) -> str:
    trl = pytest.importorskip("trl")
    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{name}.jinja"), encoding="utf-8") as fh:
        return fh.read()


def save_idefics3(path: Path, family: str = "idefics3") -> Path:
    """A tiny Idefics3 (or SmolVLM) model and an Idefics3Processor that splits a 32 px image into 2x2 tiles of 16 px
    plus the whole image, 4 image tokens each (SmolVLMProcessor needs torchvision and num2words, not installed here;
    it expands images with the same ``get_image_prompt_string``)."""
    from transformers import (
        AutoModelForImageTextToText,
        Idefics3Config,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        SmolVLMConfig,
    )

    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *EXTRA]})
    tok.bos_token = "<|begin_of_text|>" if family == "idefics3" else "<|im_start|>"  # as the checkpoints have it
    images = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    template = _trl_template("idefics3" if family == "idefics3" else "smolvlm")
    processor = Idefics3Processor(images, tok, image_seq_len=4, chat_template=template)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16,
                  patch_size=4)  # fmt: skip
    text = dict(model_type="llama", **_LLAMA, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.convert_tokens_to_ids("<end_of_utterance>"))  # fmt: skip
    config_class = Idefics3Config if family == "idefics3" else SmolVLMConfig
    config = config_class(vision_config=vision, text_config=text, scale_factor=2,
                          image_token_id=tok.convert_tokens_to_ids("<image>"))  # fmt: skip
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idefics3")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(32, 32), (24, 32)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(out / f"{i}.png")
    rows = [{"image": "0.png", "text": "a handwritten seven"}, {"image": "1.png", "text": "a thin two"}]
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _reference(processor, family: str, image: Path, caption: str) -> dict:
    """What the processor gives with TRL's training template and return_assistant_tokens_mask: ids and labels."""
    training = _trl_template(f"{family}_training")
    chat = [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": C.CAPTION_PROMPT}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]
    out = processor.apply_chat_template(
        chat, chat_template=training, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = [int(t) for t in out["input_ids"][0]]
    mask = [int(m) for m in out["assistant_masks"][0]]
    return {**out, "labels": [t if m else -100 for t, m in zip(ids, mask)], "ids": ids}


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_and_smolvlm_labels_are_the_caption_tokens_as_the_processor_masks_them(data, tmp_path, family):
    """Was: DataError 'the processor tokenizes the row differently from its tokenizer' on every row."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = save_idefics3(tmp_path / family, family)
    proc = C.VLMProcessor(AutoProcessor.from_pretrained(path))
    examples, refs = [], []
    for i, caption in enumerate(["a handwritten seven", "a thin two"]):
        user = {"role": "user", "content": f"<image>\n{C.CAPTION_PROMPT}"}
        row = ImageRow(str(data / f"{i}.png"), caption, f"d:{i + 1}")
        examples.append(C.VLMExample(row.source, [row], [user, {"role": "assistant", "content": caption}]))
        refs.append(_reference(proc.processor, family, data / f"{i}.png", caption))
    encoded = [C.encode_vlm(proc, ex, max_length=64)[:2] for ex in examples]
    for (ids, labels), ref in zip(encoded, refs):
        assert ids == ref["ids"] and labels == ref["labels"]
        tokens = proc.tokenizer.convert_ids_to_tokens([t for t in labels if t != -100])
        assert tokens[-1] == "<end_of_utterance>" and "<row_1_col_1>" in proc.tokenizer.convert_ids_to_tokens(ids)
    assert proc.tokenizer.convert_ids_to_tokens([t for t in encoded[0][1] if t != -100]) == [
        "a", "handwritten", "seven", "<end_of_utterance>"
    ]  # fmt: skip
    # the batch the stage trains on is the processor's batch (tiles zero-padded, as the processor pads them)
    dataset = C.VLMDataset(examples, encoded, proc)
    batch = C.collate_vlm([dataset[0], dataset[1]], proc.pad_token_id)
    ref_batch = proc.processor(
        text=[C.render_vlm(proc, ex.messages)[0] for ex in examples],
        images=[[Image.open(data / f"{i}.png").convert("RGB")] for i in range(2)], padding="longest",
        padding_side="right", add_special_tokens=C.render_vlm(proc, examples[0].messages)[2], return_tensors="pt",
    )  # fmt: skip
    assert torch.equal(batch["input_ids"], ref_batch["input_ids"])
    assert torch.equal(batch["pixel_values"], ref_batch["pixel_values"])
    assert torch.equal(batch["pixel_attention_mask"], ref_batch["pixel_attention_mask"])
    labels = torch.full_like(ref_batch["input_ids"], -100)
    for i, ref in enumerate(refs):
        labels[i, : len(ref["labels"])] = torch.tensor(ref["labels"])
    assert torch.equal(batch["labels"], labels)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, model(**ref_batch, labels=labels).loss)


def test_idefics3_trains_two_steps_through_the_cli(data, tmp_path, capsys):
    save_idefics3(tmp_path / "idefics3")
    args = ["train", str(ROOT / "recipes" / "llava-caption-lora.yaml"), f"model.name_or_path={tmp_path / 'idefics3'}",
            f"data.train={data / 'captions.jsonl'}", f"output.dir={tmp_path / 'run'}", "model.dtype=float32",
            "train.max_steps=2", "train.report_to=[none]", "train.batch_size=2", "train.logging_steps=1",
            "train.save_steps=1000", "method.towers=[language]", "data.eval=", "train.eval_steps=null"]  # fmt: skip
    assert main(args) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Assistant:[[ a handwritten seven<end_of_utterance>\\n]]" in report  # the note writes the row's repr
    assert "adapted layers per tower: language: 4" in report


def test_a_processor_that_expands_images_without_saying_where_is_refused_in_one_line(data, tmp_path):
    """A processor whose offsets are into a text it does not report (no text_replacement_offsets): the answers'
    tokens do not match the tokenizer's, so the row is refused rather than trained on shifted labels."""
    from transformers import AutoProcessor

    proc = C.VLMProcessor(AutoProcessor.from_pretrained(save_idefics3(tmp_path / "m")))
    call = proc.processor.__class__.__call__

    class Quiet(proc.processor.__class__):
        def __call__(self, *args, **kwargs):
            out = call(self, *args, **kwargs)
            out.pop("text_replacement_offsets", None)
            return out

    proc.processor.__class__ = Quiet
    user = {"role": "user", "content": f"<image>\n{C.CAPTION_PROMPT}"}
    row = ImageRow(str(data / "0.png"), "a seven", "d:1")
    ex = C.VLMExample("d:1", [row], [user, {"role": "assistant", "content": "a seven"}])
    with pytest.raises(DataError, match=r"^d:1: the processor's tokens of the answers differ from its tokenizer's"):
        C.encode_vlm(proc, ex, max_length=64)


def test_a_conversation_with_two_images_trains_both_answers_as_the_processor_masks_them(data, tmp_path):
    """Two images in one row: the second answer sits after two expansions (the processor reports running totals of
    the characters each expansion added), with the labels of the processor's masked chat template call."""
    from transformers import AutoProcessor

    proc = C.VLMProcessor(AutoProcessor.from_pretrained(save_idefics3(tmp_path / "m")))
    messages = [
        {"role": "user", "content": "what digit is <image> ?"},
        {"role": "assistant", "content": "five"},
        {"role": "user", "content": "and <image> ?"},
        {"role": "assistant", "content": "six thin strokes"},
    ]
    example = C.VLMExample("d:1", [ImageRow(str(data / f"{i}.png"), None, "d:1") for i in range(2)], messages)
    ids, labels, _, _ = C.encode_vlm(proc, example, max_length=512)
    chat = []
    for i, m in enumerate(messages):
        if m["role"] == "user":
            before, after = m["content"].split(" <image> ")
            parts = [{"type": "text", "text": before}, {"type": "image", "path": str(data / f"{i // 2}.png")}]
            chat.append({"role": "user", "content": [*parts, {"type": "text", "text": after}]})
        else:
            chat.append({"role": "assistant", "content": [{"type": "text", "text": m["content"]}]})
    out = proc.processor.apply_chat_template(
        chat, chat_template=_trl_template("idefics3_training"), tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )  # fmt: skip
    ref_ids = [int(t) for t in out["input_ids"][0]]
    assert ids == ref_ids
    assert labels == [t if m else -100 for t, m in zip(ref_ids, out["assistant_masks"][0])]
    assert proc.tokenizer.convert_ids_to_tokens([t for t in labels if t != -100]) == [
        "five", "<end_of_utterance>", "six", "thin", "strokes", "<end_of_utterance>"
    ]  # fmt: skip
