"""Stage ``caption``: image-to-text, on an encoder-decoder captioner or a decoder-only vision-language model, both
loaded through ``AutoModelForImageTextToText``.

Encoder-decoder captioners (``VisionEncoderDecoderModel``: ViT + GPT-2 and the like). Rows hold an image path
(``data.image_column``) and a caption (``data.text_column``; a list of captions is one example per caption),
tokenized and ended with EOS as the ``labels``, which the decoder reads shifted right: the loss is on the caption
tokens only (no prompt to mask, padding -100).

BLIP (``BlipForConditionalGeneration``) takes image + caption rows too, but its text decoder reads the text as
``input_ids`` (the image by cross-attention) and shifts the labels itself: the ids are its BOS, the caption and its SEP
(where its ``generate`` stops), the labels the same with -100 on the BOS. It captions from the BOS, or from a prompt
(``generate --prompt``: the caption's first words, as transformers' conditional captioning).

Decoder-only vision-language models (LLaVA, BLIP-2 with OPT, Idefics2/3, SmolVLM, Qwen2-VL, Gemma 3, ...): the
model's processor (tokenizer, image processor, chat template) makes one sequence of a conversation: image + caption
rows (the user turn
``<image>`` and ``CAPTION_PROMPT``, the caption the answer) or conversation rows with an ``images`` column
(``data.sample.place_images``), rendered with the processor's chat template, else the tokenizer's, else
``data.template``; an answer the template leaves open is closed with EOS. The processor expands each marker into the
image tokens (BLIP-2: its query tokens before the text). The labels are the answers' tokens (EOS included), -100
elsewhere; the processor's per-token modality ids go with them. ``data.max_length`` caps the text tokens. PaliGemma
reads one prompt (a prefix attended both ways) and one answer, as its processor's text and suffix. (The batches:
caption_batch.py.)

Eval: the loss and perplexity, and BLEU-4 and ROUGE-L (metrics.py) of greedy captions of the first ``EVAL_CAPTIONS``
distinct eval images (at most ``data.max_target_length`` new tokens) against their captions: the captions of every
eval row of that image (and prompt), as the COCO evaluators pool an image's references. Which tower trains is
``method.towers`` (default ``[language]``; deltatune.towers).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections import Counter
from typing import Any

import torch

from ..config import ConfigError
from ..data.images import ImageRow, check, check_inside, image_value, open_rgb, pixel_values, read_image_rows
from ..data.load import DataError, Row, read_rows
from ..data.sample import IMAGE_MARKER, Message, place_images
from ..data.tasks import split_off
from ..data.templates import IGNORE_INDEX
from ..loss import shifted_token_loss
from . import metrics as M
from .caption_batch import (  # noqa: F401 (the batch builders, read by the tests as caption's)
    EVAL_CAPTIONS,
    TOKEN_TYPES,
    VLMDataset,
    VLMExample,
    VLMProcessor,
    _pad,
    collate_vlm,
    encode_vlm,
    grouped,
    render_vlm,
    shown,
    vlm_labels,
)
from .checks import check_new_tokens
from .config import RunConfig
from .image_cls import PixelTrainer, check_processor  # pixel values in the model's dtype; a processor's refusal
from .prepared import Prepared, data_columns
from .runs import HELD_OUT_NOTE  # (deltatune eval reads it back: the run held rows out)

CAPTION_PROMPT = "Describe the image."
"""The user turn (after the image) of an image + caption row on a decoder-only model; ``generate --image``'s prompt
when none is given."""


class CaptionProcessor:
    """An encoder-decoder captioner's image processor and tokenizer, used and saved together; for BLIP also its text
    decoder's ``bos`` (what a caption starts from) and ``eos`` (its SEP, where ``generate`` stops), and its processor
    (saved as it is: a run folder then holds no image processor of its own, so its base's processor loads again)."""

    def __init__(self, image_processor, tokenizer, bos=None, eos=None, processor=None, label_smoothing: float = 0.0):
        self.image_processor, self.tokenizer, self.bos, self.processor = image_processor, tokenizer, bos, processor
        self.eos = tokenizer.eos_token_id if bos is None else eos
        self.label_smoothing = label_smoothing  # BLIP's text decoder's, from its config

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def save_pretrained(self, out: str) -> None:
        for part in [self.processor] if self.processor is not None else [self.image_processor, self.tokenizer]:
            part.save_pretrained(out)


def model_kind(path: str) -> str:
    """``"encoder-decoder"`` (VisionEncoderDecoderModel-style) or ``"decoder-only"`` (LLaVA, BLIP-2 with OPT; BLIP,
    whose text decoder reads the caption after a BOS or a prompt, though images and captions come as for the first).

    Raises:
        ConfigError: a model that is no image-to-text model, or BLIP-2 over an encoder-decoder language model (T5).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # (None: transformers asks on stdin)
    except (OSError, ValueError):
        return "encoder-decoder"  # the model loader names the problem
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if config.model_type not in NAMES:
        raise ConfigError(
            f"stage caption: model type {config.model_type!r} is not an image-to-text model "
            "(AutoModelForImageTextToText has no class for it)"
        )
    if getattr(config, "use_decoder_only_language_model", True) is False:
        raise ConfigError(
            f"stage caption: model type {config.model_type!r} over an encoder-decoder language model (T5) is not "
            "handled; BLIP-2 with a decoder-only language model (OPT) is"
        )
    return "decoder-only"


def load_vlm_processor(
    path: str, trust_remote_code: bool = False, revision: str | None = None
) -> VLMProcessor | CaptionProcessor:
    """The processor saved with a decoder-only vision-language model, with a pad token (EOS when it has none); BLIP's
    as a ``CaptionProcessor`` with its text decoder's BOS and SEP; ``revision``: a hub id's (model.revision), as the
    model loads it.

    Raises:
        ConfigError: no processor, or one without an image token (the folder named).
    """
    from transformers import AutoConfig, AutoProcessor

    try:
        hub = {"revision": revision} if revision else {}
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"stage caption: model {path!r} has no processor that loads ({str(exc).split('. ')[0]}); a "
            "vision-language model needs its processor (tokenizer, image processor) saved beside it"
        ) from None
    tok = proc.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    text = getattr(config, "text_config", None)
    if getattr(text, "model_type", None) == "blip_text_model":
        smoothing = getattr(text, "label_smoothing", 0.0) or 0.0  # its own loss uses it
        return CaptionProcessor(proc.image_processor, tok, text.bos_token_id, text.sep_token_id, proc, smoothing)
    if getattr(proc, "image_token", None) is None or not hasattr(proc, "image_processor"):
        raise ConfigError(
            f"stage caption: the processor of {path!r} ({type(proc).__name__}) has no image token and image "
            "processor; a vision-language model's processor has both"
        )
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"stage caption: the tokenizer of {path!r} is not a fast one (the labels need offsets)")
    out = VLMProcessor(proc)
    # the model reads its image features into the positions of its config's id (LLaVA's image_token_index); the
    # processor writes its own: ids that differ failed at the first step (transformers: "tokens: 0, features: 16")
    want = getattr(config, "image_token_id", None)
    if want is not None and want not in out.image_ids:
        ids = ", ".join(map(str, sorted(out.image_ids)))
        raise ConfigError(
            f"stage caption: model {path!r}: its config's image_token_id is {want}, but its processor writes "
            f"{out.image_token!r} (id {ids}) for an image; the model would find no image tokens in the text (give the "
            "model its own processor, or correct config.json's image_token_id / image_token_index)"
        )
    return out


# -- encoder-decoder captioners ----------------------------------------------------------------------------------


class CaptionDataset(torch.utils.data.Dataset):
    """Lazily decoded ``{"pixel_values": (C, H, W), "labels": caption ids + EOS}`` (BLIP: and ``input_ids``, the BOS
    and the caption ids + SEP; the labels -100 on the BOS)."""

    def __init__(self, rows: list[ImageRow], labels: list[list[int]], processor: CaptionProcessor) -> None:
        self.rows, self.labels, self.processor = rows, labels, processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img, _ = open_rgb(self.rows[i])
        out = {"pixel_values": pixel_values(self.processor.image_processor, [img])[0], "labels": self.labels[i]}
        if self.processor.bos is not None:  # BLIP's text decoder reads the ids and shifts the labels itself
            out.update(input_ids=[self.processor.bos, *self.labels[i]], labels=[IGNORE_INDEX, *self.labels[i]])
        return out

    def references(self, n: int = EVAL_CAPTIONS) -> list[tuple[list[ImageRow], list[Message] | None, list[str]]]:
        """(image, prompt messages (none), captions) of the first ``n`` distinct images, each with the captions of
        every row of that image (``grouped``)."""
        return grouped((([r], None, r.text or "") for r in self.rows), n)


def collate(batch: list[dict[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack pixel values; pad labels with -100 (no loss on padding) and any ``input_ids`` with ``pad_token_id``."""
    out = {"pixel_values": torch.stack([b["pixel_values"] for b in batch])}
    if "input_ids" in batch[0]:
        return {**out, **collate_vlm([{k: b[k] for k in ("input_ids", "labels")} for b in batch], pad_token_id)}
    return {**out, "labels": _pad([b["labels"] for b in batch], IGNORE_INDEX)}


def encode_captions(
    rows: list[ImageRow], tokenizer, max_length: int, eos: int | None = None
) -> tuple[list[list[int]], int]:
    """Caption token ids + ``eos`` (default: the tokenizer's EOS) per row, truncated to ``max_length`` (EOS kept);
    returns (ids, truncated count). A tokenizer with no EOS appends none: a caption of ``max_length`` tokens fits
    whole, as ``tokenizer(text, max_length=max_length, truncation=True)`` keeps it (it was cut by one and counted)."""
    out, truncated = [], 0
    eos = tokenizer.eos_token_id if eos is None else eos
    room = max_length - (eos is not None)  # the caption's tokens that fit beside the EOS
    for r in rows:
        ids = tokenizer(r.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"{r.source}: the caption {r.text!r} tokenizes to nothing")
        if len(ids) > room:
            ids, truncated = ids[:room], truncated + 1
        out.append([*ids, eos] if eos is not None else ids)
    return out, truncated


def distinct(rows: list[ImageRow]) -> list[ImageRow]:
    """The first row of each image (its path, or its bytes) in ``rows``: what the notes count and ``check`` opens."""
    first: dict[tuple[str, bytes | None], ImageRow] = {}
    for r in rows:
        first.setdefault((r.path, r.data), r)
    return list(first.values())


def one_each(rows: list[ImageRow]) -> list[ImageRow]:
    """A row whose caption column holds a list of captions (COCO's five an image, as datasets such as Flickr30k hold
    them) as one row per caption, each an example of that image (as BLIP trains on COCO's image-caption pairs); the
    eval scores one caption of the image against them all (``grouped``)."""
    return [ImageRow(r.path, r.label, r.source, t, r.data) for r in rows
            for t in (r.text if isinstance(r.text, list) else [r.text])]  # fmt: skip


# -- decoder-only vision-language models ------------------------------------------------------------------------


CONVERSATION_FIELDS = ("messages", "conversations", "prompt", "instruction")
"""The fields of the conversation formats (``data.columns`` may rename them)."""


def vlm_examples(spec: str, cfg: RunConfig) -> list[VLMExample]:
    """The rows of ``spec``: image + caption rows when the first row has ``data.image_column``, else conversations
    with an ``images`` column; a conversation with one image in ``data.image_column`` instead, as TRL's vision
    collator reads an ``image`` column. A row with messages is a conversation even beside a caption column (TRL's
    collator reads messages before text); prompt / instruction rows only without one.

    Raises:
        DataError: a row without an image or a caption, a format that holds no conversation, markers and images that
            do not pair up, a conversation that does not end with an answer (file:line named).
    """
    from ..data.formats import STAGE_FORMATS, read_samples

    d = cfg.data
    rows = read_rows(spec, limit=d.limit)
    columns, first = data_columns(d), rows[0].data
    # TRL's collator reads one image in an ``image`` column beside messages or prompt + completion as ``images``; it
    # reads messages before a text column (a caption's), and a text column before prompt + completion
    messages = any(columns.get(k, k) in first for k in CONVERSATION_FIELDS[:2])
    talk = messages or (d.text_column not in first and any(columns.get(k, k) in first for k in CONVERSATION_FIELDS))
    encoded: dict[str, bytes] = {}  # a conversation's datasets' {"bytes"} image in data.image_column, by row
    if talk and d.image_column in first and columns.get("images", "images") in first:
        raise DataError(f"{rows[0].source}: both {d.image_column!r} (data.image_column) and "
                        f"{columns.get('images', 'images')!r} hold the images of a conversation; give one")  # fmt: skip
    if talk and d.image_column in first:
        columns, rows = {**columns, "images": d.image_column}, [*rows]
        for i, row in enumerate(rows):  # place_images' errors would call it the images column; a list passed
            one = row.get(d.image_column, required=False)
            if isinstance(one, list) or one is None or isinstance(one, str) and not one.strip():
                held = f"a list of {len(one)}" if isinstance(one, list) else f"{one!r}"
                raise DataError(f"{row.source}: column {d.image_column!r} (data.image_column) holds one image path per "
                                f"conversation, got {held}; several images go in an 'images' column")  # fmt: skip
            # a path, or datasets' {"bytes", "path"} image (as caption rows and image_cls read it; its errors name
            # the value's type, never a blob of base64)
            data, path = image_value(one, row.source, d.image_column)
            if data is not None:
                encoded[row.source] = data
            rows[i] = Row({**row.data, d.image_column: path}, row.source)
    elif d.image_column in first:
        user = {"role": "user", "content": f"{IMAGE_MARKER}\n{CAPTION_PROMPT}"}
        read = read_image_rows(spec, d.image_column, None, d.limit, d.allow_outside, d.text_column, caption_lists=True)
        return [VLMExample(r.source, [r], [user, {"role": "assistant", "content": r.text}]) for r in one_each(read)]
    root, out = os.path.dirname(os.path.abspath(spec)), []
    for s in read_samples(rows, columns, d.format, d.tags):
        if s.format not in STAGE_FORMATS["sft"]:
            raise DataError(
                f"{s.source}: a {s.format} row; stage caption reads image + caption rows (columns {d.image_column!r}, "
                f"{d.text_column!r}) or conversations ({', '.join(STAGE_FORMATS['sft'])}) with an images column"
            )
        messages, start = place_images(s)
        if messages[-1]["role"] != "assistant":
            raise DataError(
                f"{s.source}: the conversation ends with a {messages[-1]['role']} turn; stage caption needs it to end "
                "with an answer (an assistant turn)"
            )
        data = encoded.get(s.source)  # (datasets' {bytes, path}: the bytes are read, whatever the path names)
        if data is None and (url := next((p for p in s.images if "://" in p), None)):
            raise DataError(f"{s.source}: image {url!r} is a URL; stage caption reads local image files")
        images = [
            ImageRow(p, None, s.source, None, data) if data is not None else
            ImageRow(check_inside(p, root, s.source, d.allow_outside), None, s.source)
            for p in s.images
        ]  # fmt: skip
        out.append(VLMExample(s.source, images, messages, start))
    return out


def _prepare_vlm(cfg: RunConfig, processor: VLMProcessor) -> Prepared:
    from ..data.encode import mark

    d = cfg.data
    if d.template == "raw":
        raise ConfigError(
            "data.template='raw': stage caption reads conversations (an image and its caption), which need a chat "
            "template; leave data.template unset, or name a built-in one"
        )
    if d.template is not None and processor.prefix_lm:
        raise ConfigError(
            f"data.template={d.template!r}: PaliGemma reads its processor's prompt and answer (text and suffix), no "
            "chat template; leave data.template unset"
        )
    processor.template = d.template
    notes: list[str] = []
    splits: list[VLMDataset | None] = []

    # data.val_size: the eval rows held out of data.train with train.seed, as cls / tag / seq2seq hold theirs
    # (the examples of one row's several captions held out together: the split is over the rows)
    def rows_of(spec: str) -> list[list[VLMExample]]:  # a row's examples (one a caption of its list) together
        return [list(g) for _, g in itertools.groupby(vlm_examples(spec, cfg), key=lambda e: e.source)]

    train_rows, held = split_off(rows_of(d.train), d.val_size, cfg.train.seed, bool(d.eval))
    for split, rows in (("train", train_rows), ("eval", rows_of(d.eval) if d.eval else held)):
        if not rows:
            splits.append(None)
            continue
        examples, encoded, cut, modes = [e for g in rows for e in g], [], 0, Counter()
        for g in rows:
            for k, ex in enumerate(g):
                ids, labels, was_cut, stored = encode_vlm(processor, ex, d.max_length, d.truncation)
                encoded.append((ids, labels))
                # a row's images counted once, not once a caption of its list
                cut, modes = cut + was_cut, modes + Counter(m for m in stored if m != "RGB" and k == 0)
        text, spans = shown(processor, examples[0])
        notes.append(f"{split} row 1 as the model reads it (trained text in [[ ]]): {mark(text, spans)!r}")
        if cut:
            what = "rows" if len(examples) == len(rows) else "examples (a caption of a row's list each)"
            notes.append(f"{cut} {split} {what} were longer than data.max_length={d.max_length} text tokens: cut")
        for mode, count in sorted(modes.items()):
            notes.append(f"{count} {split} images were stored in mode {mode!r} and were converted to RGB")
        splits.append(VLMDataset(examples, encoded, processor))
    train, ev = splits
    first = f"{len(train_rows)} training rows with {sum(len(g[0].images) for g in train_rows)} images"
    if len(train) > len(train_rows):
        first += f" ({len(train)} examples: each caption of a row's list one of its own)"
    notes.insert(0, f"{first}; image token {processor.image_token!r}")
    if held is not None:
        notes.insert(1, f"data.val_size: {len(held)} {HELD_OUT_NOTE.format(what='rows')}")
    if ev is not None:
        n = len(ev.references())
        notes.append(f"eval: BLEU-4 and ROUGE-L of greedy answers for the first {n} distinct images and prompts (the "
                     "answers of every eval row that shares them are the references)")  # fmt: skip
    collator = functools.partial(collate_vlm, pad_token_id=processor.pad_token_id)
    return Prepared(train, ev, collator, None, None, notes=notes, loss_only=True)


def prepare_caption(cfg: RunConfig, processor: CaptionProcessor | VLMProcessor) -> Prepared:
    """Read and check images and captions (or conversations); give the Trainer lazily decoded datasets.

    Raises:
        DataError: a row without an image or a caption (file:line), an unreadable image.
    """
    d = cfg.data
    if not d.train:
        raise DataError("data.train is not set: give a data file with an image column and a caption column")
    if folder := next((s for s in (d.train, d.eval) if s and os.path.isdir(s)), None):
        raise DataError(f"{folder} is a folder; captions come from a data file (image and caption columns)")
    if isinstance(processor, VLMProcessor):
        return _prepare_vlm(cfg, processor)

    def read(spec: str) -> list[ImageRow]:
        return read_image_rows(spec, d.image_column, None, d.limit, d.allow_outside, d.text_column, caption_lists=True)

    # data.val_size: the eval rows held out of data.train with train.seed, as cls / tag / seq2seq hold theirs (a row
    # of several captions held out whole: split before each caption is an example of its own)
    rows, held = split_off(read(d.train), d.val_size, cfg.train.seed, bool(d.eval))
    given = read(d.eval) if d.eval else held
    train_rows, eval_rows = one_each(rows), None if given is None else one_each(given)
    # the notes count images, and check opens each once: a row's list of captions, or rows of one image, are one
    notes = [f"{len(distinct(rows))} training images with captions"]
    if len(distinct(rows)) < len(train_rows):
        notes[0] += f" ({len(train_rows)} captions: each an example of its own)"
    if held is not None:
        images = len(distinct(held))
        notes.append(f"data.val_size: {len(held)} {HELD_OUT_NOTE.format(what='images')}" if images == len(held) else
                     f"data.val_size: {len(held)} {HELD_OUT_NOTE.format(what='rows')} ({images} images)")  # fmt: skip
    for split, part in (("train", rows), ("eval", given or [])):
        for mode, count in sorted(check(distinct(part)).items()):
            notes.append(f"{count} {split} images were stored in mode {mode!r} and were converted to RGB")
    if train_rows:  # a processor that refuses the images: one line here, not at the Trainer's first batch
        check_processor(processor.image_processor, train_rows[0], 3)
    tok = processor.tokenizer
    train_ids, cut = encode_captions(train_rows, tok, d.max_target_length, processor.eos)
    eval_ids, cut_eval = ((None, 0) if not eval_rows
                          else encode_captions(eval_rows, tok, d.max_target_length, processor.eos))  # fmt: skip
    if processor.bos is not None:
        notes.append(f"train row 1 as BLIP's text decoder reads it (trained in [[ ]]): "
                     f"{tok.decode([processor.bos])}[[ {tok.decode(train_ids[0])} ]]")  # fmt: skip
    for split, n in (("train", cut), ("eval", cut_eval)):
        if n:
            notes.append(f"{n} {split} captions were longer than data.max_target_length={d.max_target_length}")
    if eval_rows:
        scored = grouped((([r], None, r.text) for r in eval_rows), EVAL_CAPTIONS)
        notes.append(f"eval: BLEU-4 and ROUGE-L of greedy captions of the first {len(scored)} eval images "
                     f"against the {sum(len(s[2]) for s in scored)} captions of their rows")  # fmt: skip
    return Prepared(
        CaptionDataset(train_rows, train_ids, processor),
        CaptionDataset(eval_rows, eval_ids, processor) if eval_rows else None,
        functools.partial(collate, pad_token_id=processor.pad_token_id or 0),
        notes=notes,
        loss_only=True,
        trainer_class=_trainer(processor),
    )


def _trainer(processor: CaptionProcessor):
    """The loss over the step's caption tokens: a VisionEncoderDecoderModel's (and BLIP's) own loss is a mean per
    micro-batch. BLIP's text decoder reads its labels shifted (they are its input ids), with its label smoothing."""
    if processor.bos is None:
        return PixelTrainer
    return functools.partial(
        PixelTrainer, loss=functools.partial(shifted_token_loss, label_smoothing=processor.label_smoothing)
    )


# -- generation ---------------------------------------------------------------------------------------------------


def _generate(model, processor: CaptionProcessor | VLMProcessor, images: list, messages: list | None, **kwargs) -> str:
    """The model's text for RGB ``images`` (and, decoder-only, the prompt ``messages``): the new tokens decoded."""
    param, tok = next(model.parameters()), processor.tokenizer
    # use_cache: a training run turned the model's cache off; without it every new token re-reads all image tokens
    kwargs = {"pad_token_id": tok.pad_token_id, "use_cache": True, **kwargs}
    # the tokenizer's EOS and the generation config's stops (Gemma 3's <end_of_turn>, which ends its answers)
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = [s for s in dict.fromkeys([tok.eos_token_id, *(own if isinstance(own, list) else [own])]) if s is not None]
    if stops:  # none: never stop
        kwargs.setdefault("eos_token_id", stops if len(stops) > 1 else stops[0])
    if isinstance(processor, CaptionProcessor):
        pixels = pixel_values(processor.image_processor, images).to(param.device, param.dtype)
        if processor.bos is None:
            return tok.decode(model.generate(pixel_values=pixels, **kwargs)[0], skip_special_tokens=True).strip()
        # BLIP: generate reads the ids but the last (the processor's SEP) and stops at its own SEP, with its own pad
        prefix = tok(messages[0]["content"], add_special_tokens=False)["input_ids"] if messages else []
        start = [processor.bos, *prefix]
        ids = torch.tensor([[*start, processor.eos]], device=param.device)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pad_token_id", "eos_token_id")}
        out = model.generate(pixel_values=pixels, input_ids=ids, **kwargs)[0][len(start) :]
        return tok.decode(out, skip_special_tokens=True).strip()
    enc = processor.inputs(images, messages)
    enc = {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device) for k, v in enc.items()}
    out, prompt = model.generate(**enc, **kwargs)[0], enc["input_ids"][0]
    if len(out) >= len(prompt) and torch.equal(out[: len(prompt)], prompt):
        out = out[len(prompt) :]  # LLaVA returns the prompt and the answer; BLIP-2 the answer alone
    return tok.decode(out, skip_special_tokens=True).strip()


@torch.no_grad()
def caption(
    model: torch.nn.Module,
    processor: CaptionProcessor | VLMProcessor,
    image: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    num_beams: int = 1,
    prompt: str | None = None,
) -> str:
    """The model's caption of the image file ``image`` (``deltatune generate --image``): greedy or sampled. A
    decoder-only model answers ``prompt`` about the image (default ``CAPTION_PROMPT``; the image opens the user turn
    unless the prompt places an ``<image>`` marker); BLIP continues ``prompt`` (default: none) into a caption.

    Raises:
        DataError: the file is missing or not an image (its path named).
        ConfigError: a prompt for an encoder-decoder captioner, or with more image markers than the one image;
            ``max_new_tokens`` past the text decoder's positions.
    """
    from .chat import check_sampling, sampling_kwargs

    check_sampling(max_new_tokens, temperature, top_p)
    if prompt is not None and isinstance(processor, CaptionProcessor) and processor.bos is None:
        raise ConfigError("--prompt: an encoder-decoder captioner reads no prompt; drop --prompt")
    img, _ = open_rgb(ImageRow(os.path.abspath(image), None, image))
    if seed is not None:
        torch.manual_seed(seed)
    text = prompt or CAPTION_PROMPT
    messages = [{"role": "user", "content": text if IMAGE_MARKER in text else f"{IMAGE_MARKER}\n{text}"}]
    if isinstance(processor, CaptionProcessor):  # BLIP: the prompt is the caption's start
        messages = [{"role": "user", "content": prompt}] if prompt else None
    elif (n := text.count(IMAGE_MARKER)) > 1:  # the processor's error was a traceback
        raise ConfigError(f"--prompt: {n} {IMAGE_MARKER} markers for the one image of --image; place one or none")
    sampling = sampling_kwargs(temperature, top_p)
    check_new_tokens(model, processor, [img], messages, max_new_tokens, "--max-new-tokens")
    return _generate(model, processor, [img], messages, max_new_tokens=max_new_tokens, num_beams=num_beams, **sampling)


@torch.no_grad()
def caption_metrics(
    model: torch.nn.Module, processor: CaptionProcessor | VLMProcessor, dataset, max_new_tokens: int
) -> dict[str, float]:
    """BLEU-4 (corpus) and ROUGE-L (mean) of greedy captions of the first ``EVAL_CAPTIONS`` distinct images (and
    prompts) of ``dataset`` (a ``CaptionDataset`` or ``VLMDataset``) against their captions (a conversation's last
    answer): every row's of that image, as the COCO evaluators score one caption an image against its five (multi-
    reference BLEU; ROUGE-L against the best, as rouge-score's ``score_multi``)."""
    was_training = model.training
    model.eval()
    preds, refs = [], []
    for rows, messages, references in dataset.references(EVAL_CAPTIONS):
        images = [open_rgb(r)[0] for r in rows]
        check_new_tokens(model, processor, images, messages, max_new_tokens, "data.max_target_length")
        preds.append(_generate(model, processor, images, messages, max_new_tokens=max_new_tokens, do_sample=False))
        refs.append([references] if isinstance(references, str) else references)  # (one: a text alone)
    model.train(was_training)
    rouge = sum(max(M.rouge_l(p, r) for r in rs) for p, rs in zip(preds, refs)) / max(len(preds), 1)
    return {"eval_bleu": M.bleu(preds, refs), "eval_rougeL": rouge}
