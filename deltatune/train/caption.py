"""Stage ``caption``: image-to-text on an encoder-decoder captioner (``VisionEncoderDecoderModel``: ViT + GPT-2 and
the like), loaded through ``AutoModelForImageTextToText``.

Rows hold an image path (``data.image_column``) and a caption (``data.text_column``), from a JSONL / JSON / CSV
file; a row without an image or without a caption stops the run in one line naming file:line. The image goes through
the model's image processor into ``pixel_values``; the caption, tokenized and ended with EOS, is the ``labels``. The
decoder's inputs are the labels shifted right (the model does it), so the loss is on the caption tokens only: there
is no prompt to mask, and padding is -100. Eval reports the loss and perplexity.

Which tower trains is ``method.towers`` (default ``[language]``, the decoder; deltatune.towers). Decoder-only
vision-language models (LLaVA, BLIP-2's OPT) need a prompt with image tokens and are not handled by this stage yet:
they are refused with one line.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config import ConfigError
from ..data.images import ImageRow, check, open_rgb, pixel_values, read_image_rows
from ..data.load import DataError
from ..data.templates import IGNORE_INDEX
from .config import RunConfig
from .prepared import Prepared


class CaptionProcessor:
    """The model's image processor and tokenizer, used and saved together."""

    def __init__(self, image_processor, tokenizer) -> None:
        self.image_processor, self.tokenizer = image_processor, tokenizer

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def save_pretrained(self, out: str) -> None:
        self.image_processor.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


class CaptionDataset(torch.utils.data.Dataset):
    """Lazily decoded ``{"pixel_values": (C, H, W), "labels": caption ids + EOS}``."""

    def __init__(self, rows: list[ImageRow], labels: list[list[int]], processor: CaptionProcessor) -> None:
        self.rows, self.labels, self.processor = rows, labels, processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img, _ = open_rgb(self.rows[i])
        return {"pixel_values": pixel_values(self.processor.image_processor, [img])[0], "labels": self.labels[i]}


def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack pixel values; pad labels with -100 (no loss on padding)."""
    width = max(len(b["labels"]) for b in batch)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, b in enumerate(batch):
        labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
    return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]), "labels": labels}


def encode_captions(rows: list[ImageRow], tokenizer, max_length: int) -> tuple[list[list[int]], int]:
    """Caption token ids + EOS per row, truncated to ``max_length`` (EOS kept); returns (ids, truncated count)."""
    out, truncated = [], 0
    eos = tokenizer.eos_token_id
    for r in rows:
        ids = tokenizer(r.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"{r.source}: the caption {r.text!r} tokenizes to nothing")
        if len(ids) + 1 > max_length:
            ids, truncated = ids[: max_length - 1], truncated + 1
        out.append([*ids, eos] if eos is not None else ids)
    return out, truncated


def prepare_caption(cfg: RunConfig, processor: CaptionProcessor) -> Prepared:
    """Read and check images and captions; give the Trainer lazily decoded datasets.

    Raises:
        DataError: a row without an image or a caption (file:line), an unreadable image.
    """
    d = cfg.data
    if not d.train:
        raise DataError("data.train is not set: give a data file with an image column and a caption column")
    for split in (d.train, d.eval):
        if split and os.path.isdir(split):
            raise DataError(f"{split} is a folder; captions come from a data file (image and caption columns)")

    def read(spec: str) -> list[ImageRow]:
        return read_image_rows(spec, d.image_column, None, d.limit, d.allow_outside, text_column=d.text_column)

    train_rows = read(d.train)
    eval_rows = read(d.eval) if d.eval else None
    notes = [f"{len(train_rows)} training images with captions"]
    for split, rows in (("train", train_rows), ("eval", eval_rows or [])):
        for mode, count in sorted(check(rows).items()):
            notes.append(f"{count} {split} images were stored in mode {mode!r} and were converted to RGB")
    tok = processor.tokenizer
    train_ids, cut = encode_captions(train_rows, tok, d.max_target_length)
    eval_ids, cut_eval = encode_captions(eval_rows, tok, d.max_target_length) if eval_rows else (None, 0)
    for split, n in (("train", cut), ("eval", cut_eval)):
        if n:
            notes.append(f"{n} {split} captions were longer than data.max_target_length={d.max_target_length}")
    return Prepared(
        CaptionDataset(train_rows, train_ids, processor),
        CaptionDataset(eval_rows, eval_ids, processor) if eval_rows else None,
        collate,
        None,
        None,
        notes=notes,
        loss_only=True,
    )


@torch.no_grad()
def caption(
    model: torch.nn.Module,
    processor: CaptionProcessor,
    image: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    num_beams: int = 1,
) -> str:
    """The model's caption of the image file ``image`` (``deltatune generate --image``): greedy or sampled.

    Raises:
        DataError: the file is missing or not an image (its path named).
    """
    from .chat import check_sampling, sampling_kwargs

    check_sampling(max_new_tokens, temperature, top_p)
    img, _ = open_rgb(ImageRow(os.path.abspath(image), None, image))
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    tok = processor.tokenizer
    sampling = sampling_kwargs(temperature, top_p)
    out = model.generate(
        pixel_values=pixel_values(processor.image_processor, [img]).to(device),
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **sampling,
    )
    return tok.decode(out[0], skip_special_tokens=True).strip()


def check_model(path: str) -> None:
    """Refuse, in one line, the models the stage does not handle yet (decoder-only vision-language models)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return  # the model loader names the problem
    if not getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"stage caption: model type {config.model_type!r} is not an encoder-decoder captioner; this stage trains "
            "VisionEncoderDecoderModel-style models so far (LLaVA / BLIP-2 prompts with image tokens are not handled)"
        )
