"""Stage ``cls``: sequence classification. Rows of text (and an optional text pair) with a label; the labels are
read from the data (or ``data.labels``); eval reports accuracy and F1 (class 1's for two classes, else macro-F1).
The loss is the cross-entropy over the rows of the whole step (``TokenLossTrainer``), so an accumulated step of
unequal micro-batches (an epoch's last) weighs every row alike."""

from __future__ import annotations

from ..data.load import DataError
from ..data.tasks import Collator, class_id, class_names, encode_cls, label_map
from . import metrics as M
from .config import RunConfig
from .prepared import Prepared, _encode_splits, _logits, _rows
from .trainer import TokenLossTrainer


def prepare_cls(cfg: RunConfig, tok) -> Prepared:
    train_rows, eval_rows = _rows(cfg)
    d = cfg.data
    mapping = label_map(train_rows, d.label_column, d.labels)
    names = class_names(mapping, d.labels)
    if len(names) < 2:  # one output would make transformers' head a regression (MSE), trained silently
        raise DataError(
            f"{d.train}: only one class ({names[0]!r}) in column {d.label_column!r}; classification needs at least "
            "two (data.labels names them all)"
        )

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

    notes: list[str] = [] if d.labels else _score_note(names)
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
        trainer_class=TokenLossTrainer,
    )


def _score_note(names: list[str]) -> list[str]:
    """The report's note for a label column of fractions (STS-B's 3.8): each distinct value is a class, where
    run_glue trains a float column as a regression (num_labels 1), which deltatune does not."""

    def fraction(name: str) -> bool:
        try:
            return class_id(name) is None and float(name) == float(name)
        except ValueError:
            return False

    seen = [n for n in names if fraction(n)]
    if not seen:
        return []
    return [
        f"{len(seen)} of the {len(names)} classes are fractions ({', '.join(seen[:3])}{', ...' if len(seen) > 3 else ''}):"
        " each distinct value is a class, named as text (run_glue trains a float label column as a regression, "
        "num_labels 1, which no deltatune stage does); data.labels fixes the classes and their order"
    ]
