"""What every stage returns and the data helpers stages share: ``Prepared``, reading the recipe's rows and samples,
truncation notes. A leaf of train/: it imports the data package and the recipe config, never a stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.load import DataError, Row, read_rows
from .config import RunConfig


@dataclass
class Prepared:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None
    collator: Callable
    compute_metrics: Callable | None = None
    metric: str | None = None
    """The headline metric (a key of the eval metrics), plotted with the loss."""
    labels: list[str] | None = None
    eval_rows: list[Row] | None = None
    notes: list[str] = field(default_factory=list)
    loss_only: bool = False
    """Language-model stages: eval reports the loss (and perplexity) only; no logits are gathered."""
    trainer_class: Callable | None = None
    """A DeltaTrainer subclass (or a partial of one) for stages with their own loss (rm, dpo); None: DeltaTrainer."""
    loop: Callable | None = None
    """For stages that do not fit the HF Trainer (ppo): ``loop(model, tokenizer, cfg) -> (metrics, log_history)``,
    run instead of the Trainer; the run saves the adapter and writes the report as usual."""
    run_facts: dict | None = None
    """Set by run.py for a ``loop`` stage: the run's ``runfolder.run_facts`` (hashed once, for the resume check), which
    the loop records in each checkpoint; None: the loop hashes them itself (a direct caller)."""


def _rows(cfg: RunConfig) -> tuple[list[Row], list[Row] | None]:
    if not cfg.data.train:
        raise DataError("data.train is not set: give a training data file")
    train = read_rows(cfg.data.train, cfg.data.text_column, cfg.data.limit)
    evals = read_rows(cfg.data.eval, cfg.data.text_column, cfg.data.limit) if cfg.data.eval else None
    return train, evals


def data_columns(d) -> dict[str, str]:
    """The field -> column names of the data section (the *_column keys, then data.columns)."""
    cols = {
        "prompt": d.prompt_column,
        "chosen": d.chosen_column,
        "rejected": d.rejected_column,
        "label": d.label_column,
    }
    if getattr(d, "completion_column", None):
        cols["completion"] = d.completion_column
    return {**cols, **d.columns}


def read_splits(cfg: RunConfig, tok, stage: str | None = None, pair_scorer: bool = False):
    """The train and eval rows as ``sample.Sample`` lists, the template that renders them, and the report notes
    (the data format, the first row of each split as rendered, preference rows skipped under data.bad_pairs=skip).

    Raises:
        DataError: bad rows (``formats.read_samples``), multimodal rows, or no template for the rows.
    """
    from ..data.encode import choose_template, first_row_note, format_note
    from ..data.formats import read_samples
    from ..data.preference import skipped_note
    from ..data.sample import refuse_multimodal

    d, stage = cfg.data, stage or cfg.stage
    train_rows, eval_rows = _rows(cfg)
    notes: list[str] = []
    splits = []
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if not rows:
            splits.append(None)
            continue
        skipped: list[str] | None = [] if d.bad_pairs == "skip" else None
        samples = read_samples(rows, data_columns(d), d.format, d.tags, stage, skipped)
        refuse_multimodal(samples, stage)
        if skipped:
            notes.append(skipped_note(split, skipped))
        if not samples:
            raise DataError(f"{split} data {getattr(d, split)}: every row was skipped")
        splits.append(samples)
    train, ev = splits
    template = choose_template(train + (ev or []), tok, d.template, stage, pair_scorer)
    notes.insert(0, format_note(train, d.format, stage))
    for split, samples in (("train", train), ("eval", ev)):
        if samples:
            notes.append(first_row_note(split, samples[0], tok, template, stage, d.mask_history, d.train_on_prompt))
    return train, ev, template, notes


def _note_truncated(notes: list[str], split: str, count: int, max_length: int, kept: str = "") -> None:
    if count:
        notes.append(
            f"{count} {split} rows were longer than data.max_length={max_length} tokens and were truncated{kept}"
        )


def _encode_splits(enc, train_rows, eval_rows, max_length: int, notes: list[str], kept: str = ""):
    """Encode the train and (optional) eval rows with ``enc``; note truncated rows of each in the report (``kept``:
    what a cut row keeps, after the note's "were truncated")."""
    train = enc(train_rows)
    ev = enc(eval_rows) if eval_rows else None
    _note_truncated(notes, "train", train.truncated, max_length, kept)
    _note_truncated(notes, "eval", ev.truncated if ev else 0, max_length, kept)
    return train, ev


def _logits(predictions: Any) -> np.ndarray:
    return predictions[0] if isinstance(predictions, (tuple, list)) else predictions
