"""The caption stage's batches for decoder-only vision-language models: the processor (``VLMProcessor``), one
conversation with its images (``VLMExample``) rendered and encoded into input ids with the image tokens and labels
(the answers' tokens, -100 elsewhere), the lazily decoded dataset and the collator.

Most models read a conversation rendered by a chat template, its labels placed by the processor's token offsets.
PaliGemma (a processor whose call takes the answer as ``suffix``) reads one prompt and one answer as its processor
lays them out (its images, BOS, the prompt and a newline; then the answer and EOS): ids, the prefix / suffix
``token_type_ids`` (0 / 1, which its prefix-LM mask reads: the prefix attended both ways) and labels (-100 on the
prefix) are the processor's own.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..data.images import ImageRow, open_rgb
from ..data.load import DataError
from ..data.sample import IMAGE_MARKER, Message
from ..data.templates import IGNORE_INDEX, render

EVAL_CAPTIONS = 64
"""Eval images (distinct images and prompts) captioned (greedy) for BLEU-4 and ROUGE-L, each against the captions
of every eval row of that image."""
TOKEN_TYPES = ("mm_token_type_ids", "token_type_ids")


class VLMProcessor:
    """A decoder-only vision-language model's processor (``AutoProcessor``: LlavaProcessor, Blip2Processor, ...) and
    the run's ``data.template`` (None: the processor's or the tokenizer's chat template, else ``plain``)."""

    def __init__(self, processor, template: str | None = None) -> None:
        self.processor, self.template = processor, template
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        self.image_token = str(processor.image_token)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        # the image tokens (Gemma 3's marker is its <start_of_image>, which stays text; its image tokens are others)
        # (BLIP-2's processor has no image_token_id: transformers' image_token_ids is [None] there, the marker's id)
        own = [i for i in getattr(processor, "image_token_ids", None) or [] if i is not None]
        patch = getattr(processor, "img_patch_token", None)  # Llama 4: one <|image|>, its features at its <|patch|>s
        if own and patch is not None:
            own.append(self.tokenizer.convert_tokens_to_ids(patch))
        self.image_ids = set(own or [self.image_token_id]) - {None}
        # BLIP-2's processor puts the query tokens before the text itself: the text carries no marker
        self.prepends = getattr(processor, "num_query_tokens", None) is not None
        # per-token modality ids the model reads (Qwen2-VL's M-RoPE, Gemma 3's image attention), named as its text call
        keys = processor(text=["x"]).keys() if getattr(processor, "return_mm_token_type_ids", False) else ()
        self.types = next((k for k in TOKEN_TYPES if k in keys), None)
        # PaliGemma: the answer is the call's suffix, its token_type_ids (1 on it) the prefix-LM mask's
        self.prefix_lm = "suffix" in inspect.signature(type(processor).__call__).parameters
        if self.prefix_lm:
            self.types = "token_type_ids"

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def save_pretrained(self, out: str) -> None:
        self.processor.save_pretrained(out)

    def inputs(self, images: list, messages: list[Message] | None):
        """The model's inputs (``input_ids`` with the image tokens, ``pixel_values``, ...) to answer ``messages``."""
        if self.prefix_lm:  # the prefix alone: its token_type_ids all 0, as transformers' generation example has it
            enc = call(self, "--image", text=[prefix_and_suffix(messages or [], "--prompt")[0]], images=images,
                       return_tensors="pt")  # fmt: skip
        else:
            text, _, special = render_vlm(self, messages or [], add_generation_prompt=True)
            enc = call(self, "--image", text=[text], images=_one_row(images), add_special_tokens=special,
                       return_tensors="pt")  # fmt: skip
        return {k: v for k, v in enc.items() if k != "labels"}  # (PaliGemma's are all -100: nothing to score)


def call(processor: VLMProcessor, source: str, **kwargs: Any):
    """``processor``'s call on a row's text and images.

    Raises:
        DataError: the processor refuses them (Qwen2-VL: an image wider than 200 times its height), ``source`` named.
    """
    try:
        return processor.processor(**kwargs)
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "ValueError"
        raise DataError(f"{source}: {type(processor.processor).__name__} refuses the row's images: {reason}") from None


def _pad(rows: list[list[int]], value: int, width: int = 0) -> torch.Tensor:
    """The rows right-padded with ``value`` to ``width`` (at least the longest row's)."""
    out = torch.full((len(rows), max(width, *map(len, rows))), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


@dataclass
class VLMExample:
    """One conversation with its images: ``<image>`` markers placed, answers from message ``train_from`` on train."""

    source: str
    images: list[ImageRow]
    messages: list[Message]
    train_from: int = 0


def _parts(text: str) -> list[dict[str, str]]:
    """A message's text as content parts, an image part at each marker (what processors' chat templates read)."""
    parts: list[dict[str, str]] = []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _close(text: str, spans: list[tuple[int, int]], tok) -> tuple[str, list[tuple[int, int]]]:
    """Each answer span that does not end with a special token (LLaVA's template ends it with a space) gets EOS."""
    eos, out = tok.eos_token, []
    for start, end in reversed(spans):  # from the end: an insertion moves only the spans after it
        body = text[start:end].rstrip()
        if not eos or any(body.endswith(t) for t in tok.all_special_tokens):
            out.append((start, end))
            continue
        cut = start + len(body)
        text = text[:cut] + eos + text[cut:]
        out = [(a + len(eos), b + len(eos)) for a, b in out] + [(start, cut + len(eos))]
    return text, out[::-1]


def render_vlm(
    processor: VLMProcessor, messages: list[Message], add_generation_prompt: bool = False, train_from: int = 0
) -> tuple[str, list[tuple[int, int]], bool]:
    """The conversation as the model reads it (image markers unexpanded), the character spans [start, end) of the
    answers from message ``train_from`` on, and whether the tokenizer adds its special tokens: yes (LLaVA's and
    BLIP-2's processors add the BOS by default) unless the text already starts with the BOS."""
    tok = processor.tokenizer
    if processor.prepends:  # BLIP-2: the processor puts the image tokens before the text, which holds no marker
        messages = [{**m, "content": m["content"].replace(IMAGE_MARKER, "").strip()} for m in messages]
    if processor.template is None and getattr(processor.processor, "chat_template", None):
        parted = [{**m, "content": _parts(m["content"])} for m in messages]
        text, spans = _close(
            *render(parted, processor.processor, None, add_generation_prompt, train_from=train_from), tok
        )
    else:
        plain = [{**m, "content": m["content"].replace(IMAGE_MARKER, processor.image_token)} for m in messages]
        if processor.template is None and getattr(tok, "chat_template", None):
            text, spans = _close(*render(plain, tok, None, add_generation_prompt, train_from=train_from), tok)
        else:
            template = processor.template or "plain"
            text, spans = render(plain, tok, template, add_generation_prompt, train_from=train_from)
    return text, spans, not (tok.bos_token and text.startswith(tok.bos_token))


def prefix_and_suffix(messages: list[Message], source: str) -> tuple[str, str | None]:
    """PaliGemma's prompt as its processor's ``text`` (one marker per image first, then the prompt: the processor
    adds its BOS after the images and a newline after the prompt) and the answer as its ``suffix`` (None: a prompt
    alone, to answer). Markers placed inside the prompt move to its start, where PaliGemma reads its images.

    Raises:
        DataError: anything but one user turn, then (when training) one answer (``source`` named).
    """
    roles = [m["role"] for m in messages]
    if roles not in (["user"], ["user", "assistant"]):
        raise DataError(
            f"{source}: PaliGemma reads one prompt and its answer (its processor's text and suffix); this "
            f"conversation's turns are {roles}"
        )
    text = messages[0]["content"]
    prompt = re.sub(rf"\s*{re.escape(IMAGE_MARKER)}\s*", " ", text).strip()
    answer = messages[1]["content"] if len(messages) > 1 else None
    return IMAGE_MARKER * text.count(IMAGE_MARKER) + prompt, answer


def shown(processor: VLMProcessor, example: VLMExample) -> tuple[str, list[tuple[int, int]]]:
    """The row as the model reads it, image markers unexpanded, and its trained character spans (for the report)."""
    if not processor.prefix_lm:
        return render_vlm(processor, example.messages, train_from=example.train_from)[:2]
    prefix, answer = prefix_and_suffix(example.messages, example.source)
    n, tok = prefix.count(IMAGE_MARKER), processor.tokenizer
    text = f"{prefix[: n * len(IMAGE_MARKER)]}{tok.bos_token}{prefix[n * len(IMAGE_MARKER) :]}\n"
    return f"{text}{answer}{tok.eos_token}", [(len(text), len(text) + len(answer or "") + len(tok.eos_token))]


def vlm_labels(enc, text: str, spans: list[tuple[int, int]], processor: VLMProcessor, special: bool, source: str):
    """Labels for the processor's ids (``enc``: called with offsets and its text replacement offsets, or for
    Idefics2's processor, which reports none, ``_expansions``): a token trains where it overlaps an answer span (as
    transformers' assistant mask marks it) once moved back past the image markers expanded before it (Idefics2/3 and
    SmolVLM wrap each image in around-image and row/column tokens); image tokens and the expansions get -100.

    Raises:
        DataError: the answers' tokens differ from the tokenizer's of the same text (the labels would be shifted).
    """
    image, moves = processor.image_token_id, (enc.get("text_replacement_offsets") or [_expansions(processor, text)])[0]
    moves = [(r["new_span"], r["new_span"][1] - r["span"][1]) for r in moves]
    labels = []
    for t, (s, e) in zip(enc["input_ids"][0], enc["offset_mapping"][0]):
        back = next((gain for (_, end), gain in reversed(moves) if end <= s), 0)  # the gains are running totals
        keep = e > s and t != image and not any(a <= s < b for (a, b), _ in moves)
        labels.append(int(t) if keep and any(s - back < b and e - back > a for a, b in spans) else IGNORE_INDEX)
    own = processor.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    pairs = zip(own["input_ids"], own["offset_mapping"])
    trained = [t for t, (s, e) in pairs if e > s and t != image and any(s < b and e > a for a, b in spans)]
    if trained != [t for t in labels if t != IGNORE_INDEX]:
        raise DataError(
            f"{source}: the processor's tokens of the answers differ from its tokenizer's (it expands the image "
            "markers without reporting where), so the labels cannot be placed"
        )
    return labels


def _expansions(processor: VLMProcessor, text: str) -> list[dict[str, tuple[int, int]]]:
    """Where Idefics2's processor expands ``text``, as ``text_replacement_offsets`` (which Idefics3's reports and
    Idefics2's does not): each run of characters it writes, ``new_span`` in its text, over the ``span`` of ``text`` it
    replaced. Its steps are replayed on (character, position in ``text``) pairs: each marker becomes
    ``<fake_token_around_image>`` + ``image_seq_len`` image tokens + the fake token (five times with image
    splitting), adjacent fake tokens merge into one, and a fake token followed by a word gets a space. [] for other
    processors (their tokens then fail ``vlm_labels``' check unless the expansion changed nothing)."""
    from transformers import Idefics2Processor

    proc = processor.processor
    if not isinstance(proc, Idefics2Processor):
        return []
    fake, marker = proc.fake_image_token, proc.image_token
    block = (fake + marker * proc.image_seq_len + fake) * (5 if proc.image_processor.do_image_splitting else 1)
    chars: list[tuple[str, int | None]] = []
    at = 0  # where the piece starts in text
    for i, piece in enumerate(text.split(marker)):
        chars += [(c, None) for c in block] if i else []
        chars += [(c, at + k) for k, c in enumerate(piece)]
        at += len(piece) + len(marker)

    def edit(pattern: str, keep: int, insert: str) -> None:  # keep the match's first ``keep`` characters, then insert
        nonlocal chars
        out, end, flat = [], 0, "".join(c for c, _ in chars)
        for m in re.finditer(pattern, flat):
            out += chars[end : m.start() + keep] + [(c, None) for c in insert]
            end = m.end()
        chars = out + chars[end:]

    edit(re.escape(fake + fake), len(fake), "")  # str.replace(fake + fake, fake): left to right, not overlapping
    edit(rf"{re.escape(fake)}(?=[^\s<])", len(fake), " ")
    runs, start, before = [], None, 0
    for k, (_, at) in enumerate([*chars, ("", len(text))]):
        if at is None and start is None:
            start = k
        elif at is not None:
            if start is not None:
                runs.append({"span": (before, at), "new_span": (start, k)})
                start = None
            before = at + 1
    return runs


def _one_row(images: list) -> list:
    """A row's images as one sample's (a list in a list) where it has several, as a batch of conversations gives them
    (the processor's chat template, TRL's collator): LLaVA-OneVision reads a multi-image row's images whole, a flat
    list as that many single-image rows, each cut into any-resolution patches."""
    return [images] if len(images) > 1 else images


def encode_vlm(
    processor: VLMProcessor, example: VLMExample, max_length: int, truncation: str = "truncate"
) -> tuple[list[int], list[int], bool, list[str]]:
    """(input ids with the image tokens, labels, whether the text was cut to ``max_length`` tokens, the images'
    stored modes).

    Raises:
        DataError: an unreadable image, a row over ``max_length`` under ``truncation="refuse"`` or whose cut would
            split an image (the row named).
    """
    if processor.prefix_lm:
        prefix, answer = prefix_and_suffix(example.messages, example.source)
        text = f"{prefix}{answer}"
    else:
        text, spans, special = render_vlm(processor, example.messages, train_from=example.train_from)
    if (n := text.count(processor.image_token)) > len(example.images):  # the processor's error was a traceback
        raise DataError(
            f"{example.source}: {n} image markers ({processor.image_token!r}) for {len(example.images)} image(s): "
            "a caption or message holds the marker's text"
        )
    opened = [open_rgb(r) for r in example.images]
    images = [img for img, _ in opened]
    if processor.prefix_lm:  # the processor's own ids and labels (-100 where its token_type_ids are 0: the prefix)
        enc = call(processor, example.source, text=[prefix], images=images, suffix=[answer])
        ids, labels = [int(t) for t in enc["input_ids"][0]], [int(t) for t in enc["labels"][0]]
    else:
        kw = dict(add_special_tokens=special, return_offsets_mapping=True, return_text_replacement_offsets=True)
        enc = call(processor, example.source, text=[text], images=_one_row(images), **kw)
        ids = [int(t) for t in enc["input_ids"][0]]
        labels = vlm_labels(enc, text, spans, processor, special, example.source)
    text_at = [i for i, t in enumerate(ids) if t not in processor.image_ids]
    if len(text_at) <= max_length:
        return ids, labels, False, [mode for _, mode in opened]
    if truncation == "refuse":
        raise DataError(
            f"{example.source}: {len(text_at)} text tokens, more than data.max_length={max_length} "
            "(data.truncation=refuse)"
        )
    end = text_at[max_length]
    if processor.image_ids.intersection(ids[end:]):
        raise DataError(
            f"{example.source}: cutting the row to data.max_length={max_length} text tokens would cut an image; "
            "raise data.max_length"
        )
    return ids[:end], labels[:end], True, [mode for _, mode in opened]


def _cross_attention_mask(proc, ids: list[int], tiles: torch.Tensor) -> torch.Tensor:
    """Llama 3.2 Vision's (mllama's) ``cross_attention_mask`` for one row, (1, tokens, images, tiles), as its
    processor's call with text makes it: a token attends to the tiles of the last image before it (of each image in a
    run of consecutive ones), a token before the first image to none. ``tiles``: the images-only call's
    ``aspect_ratio_mask`` (1 on each image's tiles)."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    sparse = get_cross_attention_token_mask(ids, proc.image_token_id)
    counts = [int(n) for n in torch.as_tensor(tiles)[0].sum(-1).tolist()]
    most = proc.image_processor.max_image_tiles
    return torch.from_numpy(convert_sparse_cross_attention_mask_to_dense([sparse], [counts], most, len(ids)))


class VLMDataset(torch.utils.data.Dataset):
    """Encoded conversations, images decoded lazily: ``{"input_ids", "labels", "pixel_values", ...}``."""

    def __init__(self, examples: list[VLMExample], encoded: list[tuple[list[int], list[int]]], processor) -> None:
        self.examples, self.encoded, self.processor = examples, encoded, processor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, labels = self.encoded[i]
        proc, types = self.processor.processor, self.processor.types
        images = [open_rgb(r)[0] for r in self.examples[i].images]
        # (PaliGemma's processor reads no images without a text: its image processor makes its pixel values)
        if self.processor.prefix_lm:
            pixels = self.processor.image_processor(images=images, return_tensors="pt")
        else:
            pixels = proc(images=_one_row(images), return_tensors="pt")
        out = {k: v for k, v in pixels.items() if k not in ("input_ids", "attention_mask", *TOKEN_TYPES)}
        if self.processor.prefix_lm:  # its processor's token_type_ids: 1 on the suffix, which is what trains
            out[types] = [int(t != IGNORE_INDEX) for t in labels]
        elif types:  # an images-only call also writes (Gemma 3) text ids of its own: the row's are made here
            out[types] = proc.create_mm_token_type_ids([ids])[0]
        if "cross_attention_mask" in getattr(proc, "model_input_names", ()):  # made by a call with text: made here
            out["cross_attention_mask"] = _cross_attention_mask(proc, ids, out["aspect_ratio_mask"])
        return {"input_ids": ids, "labels": labels, **out}

    def references(self, n: int = EVAL_CAPTIONS) -> list[tuple[list[ImageRow], list[Message] | None, list[str]]]:
        """(images, prompt messages, last answers) of the first ``n`` distinct images and prompts (``grouped``)."""
        return grouped(((e.images, e.messages[:-1], e.messages[-1]["content"]) for e in self.examples), n)


def grouped(items, n: int) -> list[tuple[list[ImageRow], list[Message] | None, list[str]]]:
    """The first ``n`` distinct (images, prompt) of ``items`` (images, prompt messages, answer), each with the answers
    of every item that shares them: the references one generation is scored against, as the COCO caption evaluators
    pool an image's captions (COCO's five an image come as five rows of one image)."""
    out: dict[Any, tuple[list[ImageRow], list[Message] | None, list[str]]] = {}
    for images, messages, answer in items:
        key = (tuple((r.path, r.data) for r in images), repr(messages))
        if key in out:
            out[key][2].append(answer)
        elif len(out) < n:
            out[key] = (images, messages, [answer])
    return list(out.values())


def collate_vlm(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids (``pad_token_id``, attention 0) and labels (-100); concatenate the images' tensors."""
    ids = [b["input_ids"] for b in batch]
    out = {"input_ids": _pad(ids, pad_token_id), "attention_mask": _pad([[1] * len(i) for i in ids], 0)}
    out["labels"] = _pad([b["labels"] for b in batch], IGNORE_INDEX)
    for key in batch[0]:
        if key in TOKEN_TYPES:  # the padding's type: text (0)
            out[key] = _pad([b[key] for b in batch], 0, out["input_ids"].shape[1])
        elif key not in out:  # the images' tensors
            parts = [torch.as_tensor(b[key]) for b in batch]
            if key == "cross_attention_mask":  # the padding attends as the row's last token (the processor's batch)
                width = out["input_ids"].shape[1]
                parts = [torch.cat([p, p[:, -1:].expand(-1, width - p.shape[1], -1, -1)], 1) for p in parts]
            # zero-padded at the end of each dimension, as their processors pad a batch: LLaVA-NeXT's patches per
            # image vary, Pixtral's (Mistral 3's) image heights and widths (padded below and to the right)
            most = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
            pads = [[x for d, m in reversed(list(enumerate(most, 1))) for x in (0, m - p.shape[d])] for p in parts]
            padded = [torch.nn.functional.pad(p, pad) if any(pad) else p for p, pad in zip(parts, pads)]
            if key == "aspect_ratio_mask":  # mllama's padded image keeps tile 0 (its processor's batch)
                for p, q in zip(parts, padded):
                    q[:, p.shape[1] :, 0] = 1
            out[key] = torch.cat(padded)
    return out
