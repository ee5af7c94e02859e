"""What differs between stages: how rows become examples, and how eval predictions become metrics.

Each ``prepare_<stage>`` reads the recipe's data section and returns a ``Prepared``: encoded train and eval
examples, the collator, the metric function and the notes for the report. No stage knows which method trains.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch

from ..data.encode import encode_sft_samples
from ..data.load import DataError, Row
from ..data.tasks import (
    Collator,
    encode_cls,
    encode_pt,
    encode_seq2seq,
    encode_tag,
    label_map,
    pack,
)
from ..data.templates import IGNORE_INDEX
from . import metrics as M
from .config import RunConfig
from .prepared import Prepared, _encode_splits, _logits, _rows, data_columns, read_splits


def prepare_cls(cfg: RunConfig, tok) -> Prepared:
    train_rows, eval_rows = _rows(cfg)
    d = cfg.data
    mapping = label_map(train_rows, d.label_column, d.labels)
    named = {v: str(k) for k, v in mapping.items() if not isinstance(k, int)}
    names = list(d.labels) if d.labels else [named.get(i, str(i)) for i in range(max(mapping.values()) + 1)]

    def enc(rows):
        return encode_cls(
            rows,
            tok,
            d.text_column,
            d.label_column,
            mapping,
            d.max_length,
            d.truncation,
            d.text_pair_column,
        )

    notes: list[str] = []
    train, ev = _encode_splits(enc, train_rows, eval_rows, d.max_length, notes)
    n = len(names)

    def compute(p) -> dict[str, float]:
        preds = _logits(p.predictions).argmax(-1).tolist()
        labels = p.label_ids.tolist()
        return {"accuracy": M.accuracy(preds, labels), "f1": M.f1(preds, labels, n)}

    return Prepared(
        train.examples,
        ev.examples if ev else None,
        Collator(tok.pad_token_id),
        compute,
        "eval_accuracy",
        names,
        notes=notes,
    )


def _bio_labels(tags: list) -> list[str]:
    """ "O" first, then B-/I- for every entity type seen (both, even when the data shows only one of them)."""
    kinds = sorted({str(t).partition("-")[2] for t in tags if str(t) != "O" and "-" in str(t)})
    plain = sorted({str(t) for t in tags if str(t) != "O" and "-" not in str(t)})
    return ["O", *[f"{p}-{k}" for k in kinds for p in ("B", "I")], *plain]


def prepare_tag(cfg: RunConfig, tok) -> Prepared:
    train_rows, eval_rows = _rows(cfg)
    d = cfg.data
    if d.labels:
        names = list(d.labels)
    else:
        tags = [t for r in train_rows + (eval_rows or []) for t in (r.get(d.tags_column) or [])]
        if any(isinstance(t, int) for t in tags):
            raise DataError(
                f"{d.tags_column!r} holds integer tag ids; set data.labels to their BIO names in id order "
                "(e.g. [O, B-person, I-person, ...]) so entities can be scored"
            )
        names = _bio_labels(tags)
    mapping: dict = {name: i for i, name in enumerate(names)} | {i: i for i in range(len(names))}

    def enc(rows):
        return encode_tag(
            rows,
            tok,
            d.tokens_column,
            d.tags_column,
            mapping,
            d.max_length,
            d.truncation,
        )

    notes: list[str] = []
    train, ev = _encode_splits(enc, train_rows, eval_rows, d.max_length, notes)

    def compute(p) -> dict[str, float]:
        preds = _logits(p.predictions).argmax(-1)
        pred_tags, true_tags = [], []
        for pr, lab in zip(preds, p.label_ids):
            keep = lab != IGNORE_INDEX
            pred_tags.append([names[i] for i in pr[keep]])
            true_tags.append([names[i] for i in lab[keep]])
        prf = M.entity_prf(pred_tags, true_tags)
        flat = [(a, b) for ps, ts in zip(pred_tags, true_tags) for a, b in zip(ps, ts)]
        return {
            "f1": prf["f1"],
            "precision": prf["precision"],
            "recall": prf["recall"],
            "accuracy": sum(a == b for a, b in flat) / max(len(flat), 1),
        }

    return Prepared(
        train.examples, ev.examples if ev else None, Collator(tok.pad_token_id), compute, "eval_f1", names, notes=notes
    )


def prepare_sft(cfg: RunConfig, tok) -> Prepared:
    d = cfg.data
    train_s, eval_s, template, notes = read_splits(cfg, tok, "sft")

    def enc(samples):
        return encode_sft_samples(samples, tok, template, d.max_length, d.truncation)

    train, ev = _encode_splits(enc, train_s, eval_s, d.max_length, notes)
    for split, e in (("train", train), ("eval", ev)):
        if e is not None and e.dropped:
            notes.append(f"{e.dropped} {split} rows were dropped: no response token fits within data.max_length")
    if not train.examples:
        raise DataError(f"no training row has a response token within data.max_length={d.max_length}")
    train_ex = train.examples
    if d.packing:
        train_ex = pack(train_ex, d.max_length)
        notes.append(
            f"{len(train.examples)} training examples packed into {len(train_ex)} blocks of at most "
            f"{d.max_length} tokens"
        )
    return Prepared(
        train_ex, ev.examples if ev else None, Collator(tok.pad_token_id), None, None, notes=notes, loss_only=True
    )


def prepare_pt(cfg: RunConfig, tok) -> Prepared:
    from ..data.encode import format_note
    from ..data.formats import read_samples

    train_rows, eval_rows = _rows(cfg)
    d = cfg.data
    # Checked as plain text (a chat or preference file is refused naming its format), then read as it is.
    cols = {**data_columns(d), "text": d.text_column}
    samples = read_samples(train_rows, cols, d.format, d.tags, "pt")
    if eval_rows:
        read_samples(eval_rows, cols, d.format, d.tags, "pt")
    train = encode_pt(train_rows, tok, d.text_column, d.max_length)
    ev = encode_pt(eval_rows, tok, d.text_column, d.max_length) if eval_rows else None
    notes = [
        format_note(samples, d.format is not None),
        f"{len(train.examples)} training blocks of {d.max_length} tokens",
    ]
    return Prepared(
        train.examples,
        ev.examples if ev else None,
        Collator(tok.pad_token_id),
        None,
        None,
        notes=notes,
        loss_only=True,
    )


def prepare_seq2seq(cfg: RunConfig, tok) -> Prepared:
    train_rows, eval_rows = _rows(cfg)
    d = cfg.data

    def enc(rows):
        return encode_seq2seq(
            rows,
            tok,
            d.source_column,
            d.target_column,
            d.max_length,
            d.max_target_length,
            d.truncation,
        )

    notes: list[str] = []
    train, ev = _encode_splits(enc, train_rows, eval_rows, d.max_length, notes)
    return Prepared(
        train.examples,
        ev.examples if ev else None,
        Collator(tok.pad_token_id),
        None,
        "eval_rougeL",
        eval_rows=eval_rows,
        notes=notes,
        loss_only=True,
    )


def _lazy(module: str, name: str) -> Callable[[RunConfig, Any], Prepared]:
    """``module.name``, imported on the first call: the stages in files of their own import the HF Trainer, and
    they import ``prepared`` (never this file), so the table points down and nothing points back."""
    return lambda cfg, tok: getattr(importlib.import_module(module, __package__), name)(cfg, tok)


STAGES: dict[str, Callable[[RunConfig, Any], Prepared]] = {
    "pt": prepare_pt,
    "sft": prepare_sft,
    "cls": prepare_cls,
    "tag": prepare_tag,
    "seq2seq": prepare_seq2seq,
    "rm": _lazy(".reward", "prepare_rm"),
    "dpo": _lazy(".dpo", "prepare_dpo"),
    "ppo": _lazy(".ppo", "prepare_ppo"),
    "image_cls": _lazy(".image_cls", "prepare_image_cls"),
    "caption": _lazy(".caption", "prepare_caption"),
    "grpo": _lazy(".grpo", "prepare_grpo"),
    "kto": _lazy(".kto", "prepare_kto"),
    "orpo": _lazy(".orpo", "prepare_orpo"),
    "simpo": _lazy(".simpo", "prepare_simpo"),
}


@torch.no_grad()
def generation_metrics(model, tok, rows: list[Row], cfg: RunConfig, batch_size: int = 16) -> dict[str, float]:
    """ROUGE-L (mean over examples) and corpus BLEU-4 of greedy generations against the targets (or the row's
    ``references`` list when it has one)."""
    d = cfg.data
    was_training = model.training
    model.eval()
    preds, refs = [], []
    device = next(p for p in model.parameters()).device
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tok(
            [str(r.get(d.source_column)) for r in chunk],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=d.max_length,
        )
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=cfg.train.generation_max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        preds += tok.batch_decode(out, skip_special_tokens=True)
        for r in chunk:
            many = r.data.get("references")
            refs.append([str(x) for x in many] if isinstance(many, list) and many else [str(r.get(d.target_column))])
    model.train(was_training)
    rouge = sum(max(M.rouge_l(p, r) for r in rs) for p, rs in zip(preds, refs)) / max(len(preds), 1)
    return {"eval_rougeL": rouge, "eval_bleu": M.bleu(preds, refs)}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
