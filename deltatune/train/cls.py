"""Stage ``cls``: sequence classification. Rows of text (and an optional text pair) with a label; the labels are
read from the data (or ``data.labels``); eval reports accuracy, F1 (class 1's for two classes, else macro-F1) and
Matthews' correlation (GLUE's CoLA metric). The loss is the cross-entropy over the rows of the whole step
(``TokenLossTrainer``), so an accumulated step of unequal micro-batches (an epoch's last) weighs every row alike.

transformers' other two problem types: ``model.num_labels: 1`` is a regression (a number per row, MSE on the one
logit, Pearson/Spearman as GLUE's STS-B); a label column of lists is multi-label (BCE with logits on multi-hot
targets, micro/macro F1 at 0.5 and subset accuracy). Both losses are over the step's rows alike, as the CE's."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..data.load import DataError
from ..data.tasks import Collator, class_id, class_names, csv_number, encode_cls, label_list, label_map, split_off
from . import metrics as M
from .config import RunConfig
from .prepared import Prepared, _encode_splits, _logits, _rows
from .trainer import TokenLossTrainer


def prepare_cls(cfg: RunConfig, tok) -> Prepared:
    train_rows, eval_rows = _rows(cfg)
    d = cfg.data
    problem = _problem(cfg, [*train_rows, *(eval_rows or [])])
    if problem != "regression":
        rows = [*train_rows, *(eval_rows or [])]
        values = [label_list(r, d.label_column) if problem == "multi_label" else [r.get(d.label_column)] for r in rows]
        check_bool_labels([(r.source, v) for r, vs in zip(rows, values) for v in vs], d.label_column, d.labels)
    if problem == "regression":
        if d.labels:  # classes for a head of one output: a recipe that means one thing and asks for another
            raise ConfigError(
                f"data.labels names classes ({', '.join(map(str, d.labels[:4]))}), but model.num_labels: 1 trains "
                "a regression on the label column's numbers; leave out one or the other"
            )
        mapping: dict[Any, int] = {}
        names: list[str] | None = None
    elif problem == "multi_label":
        seen, lists = train_rows, [label_list(r, d.label_column) for r in train_rows]
        if not d.labels and eval_rows:  # ids of the eval file's lists are classes too, as a single label's below
            more = [label_list(r, d.label_column) for r in eval_rows]
            if all(class_id(v) is not None for ls in lists + more for v in ls):
                seen, lists = train_rows + eval_rows, lists + more
        flat_rows = [r for r, ls in zip(seen, lists) for _ in ls]
        flat = [v for ls in lists for v in ls]
        mapping = label_map(flat_rows, d.label_column, d.labels, flat) if flat or d.labels else {}
        names = class_names(mapping, d.labels) if mapping else []
    else:
        seen = train_rows  # ids (whole numbers) of the eval file too: an id data.limit left out of train stays a class
        if not d.labels and eval_rows and all(class_id(r.get(d.label_column)) is not None for r in seen + eval_rows):
            seen = train_rows + eval_rows
        mapping = label_map(seen, d.label_column, d.labels)
        names = class_names(mapping, d.labels)
    if names is not None and len(names) < 2:  # one output would make transformers' head a regression (MSE)
        raise DataError(
            f"{d.train}: {f'only one class ({names[0]!r})' if names else 'no class'} in column {d.label_column!r}; "
            "classification needs at "
            "least two (data.labels names them all; model.num_labels: 1 trains the column as a regression)"
        )

    # data.val_size: a validation split off the train file, after its classes are read (a class seen only there
    # stays a class).
    train_rows, held = split_off(train_rows, d.val_size, cfg.train.seed, bool(d.eval))
    eval_rows = eval_rows if held is None else held

    def enc(rows):
        encoded = encode_cls(
            rows,
            tok,
            d.text_column,
            d.label_column,
            mapping,
            d.max_length,
            d.truncation,
            d.text_pair_column,
            problem,
        )
        columns = [d.text_column, *([d.text_pair_column] if d.text_pair_column else [])]
        _refuse_no_tokens(rows, encoded.examples, columns, tok)
        return encoded

    notes: list[str] = [] if d.labels or names is None else _score_note(names)
    train, ev = _encode_splits(enc, train_rows, eval_rows, d.max_length, notes)
    n = len(names or [])

    def compute(p) -> dict[str, float]:
        logits = np.asarray(_logits(p.predictions), dtype=np.float64)
        if problem == "regression":
            preds, labels = logits.reshape(-1).tolist(), np.asarray(p.label_ids, np.float64).reshape(-1).tolist()
            mse = sum((a - b) ** 2 for a, b in zip(preds, labels)) / max(len(labels), 1)
            r, rho = M.pearson(preds, labels), M.spearman(preds, labels)  # run_glue's STS-B keys, and the MSE
            return {"pearson": r, "spearmanr": rho, "combined_score": (r + rho) / 2, "mse": mse}
        if problem == "multi_label":  # a sigmoid over 0.5 is a class: a logit over 0 (run_classification's p > 0)
            hot = (logits > 0).astype(int).tolist()
            return M.multi_label_scores(hot, (np.asarray(p.label_ids) > 0.5).astype(int).tolist())
        preds, labels = logits.argmax(-1).tolist(), p.label_ids.tolist()
        scores = {"accuracy": M.accuracy(preds, labels), "f1": M.f1(preds, labels, n)}
        return scores | {"matthews_correlation": M.matthews(preds, labels)}  # (GLUE's CoLA, run_glue's key)

    if problem == "multi_label":  # set once every refusal is past: a refused call leaves the recipe as it was
        d.multi_label = True
    headline = {"regression": "eval_pearson", "multi_label": "eval_f1_micro"}.get(problem, "eval_accuracy")
    loss = {"regression": regression_loss, "multi_label": multi_label_loss}.get(problem)
    return Prepared(
        train.examples,
        ev.examples if ev else None,
        Collator(tok.pad_token_id),
        compute,
        headline,
        names,
        notes=notes,
        trainer_class=partial(FloatTargetTrainer, loss=loss) if loss else TokenLossTrainer,
    )


def _refuse_no_tokens(rows: list, examples: list[dict], columns: list[str], tok) -> None:
    """Refuse a row that encodes to no token (an empty text, from a tokenizer that adds none of its own: GPT-2's,
    Qwen's, SmolLM's): padded in a batch, transformers' classifier reads the last token that is not the pad, finds
    none and scores the row's first pad (position 0), silently; alone in a batch the forward fails deep in torch.

    Raises:
        DataError: the first such row, named.
    """
    for row, ex in zip(rows, examples):
        if not ex["input_ids"]:
            named, verb = " and ".join(map(repr, columns)), "give" if columns[1:] else "gives"
            raise DataError(
                f"{row.source}: {named} {verb} no token ({type(tok).__name__} adds none to an empty text): the "
                "classifier would score a pad token; give the row a text or leave it out"
            )


def check_bool_labels(labelled: list[tuple[str, Any]], column: str, labels: list | None) -> None:
    """Refuse a label true / false among other classes (``labels``, else the other labels seen): among classes named
    by numbers Python's True == 1 would make it the class "1" silently, its text "True" a class of its own; among
    names (data.labels [neg, pos]) it would be read as one of them by its position or as a class "True" of its own.
    datasets reads no such JSON column either (a column mixing booleans with numbers or strings loads as arrow's json
    type, which run_glue's ``unique`` cannot sort). A column of booleans only is the classes False and True (named so
    in data.labels or not).

    Raises:
        DataError: the first such row, named.
    """
    bools = [(source, v) for source, v in labelled if isinstance(v, bool)]
    named = list(labels) if labels else [v for _, v in labelled if not isinstance(v, bool)]
    if not bools or all(str(v) in ("False", "True") for v in named):
        return
    source, what = bools[0][0], f"label {str(bools[0][1]).lower()} in column {column!r} is a boolean"
    if all(class_id(v) is not None for v in named):
        ids = sorted({class_id(v) for v in named})  # type: ignore[type-var]
        shown = ", ".join(map(str, ids[:4])) + (", ..." if len(ids) > 4 else "")
        raise DataError(f"{source}: {what}, but the classes are named by numbers ({shown}); write the class it means "
                        "as its number")  # fmt: skip
    names = sorted({str(v) for v in named})
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise DataError(f"{source}: {what}, but the classes are named ({shown}); write the class it means by its name")


def _problem(cfg: RunConfig, rows) -> str:
    """transformers' problem type of the run: "regression" for ``model.num_labels: 1`` (as transformers reads one
    output), "multi_label" for ``data.multi_label`` or a label column of lists (in the train or the eval file; then
    set by ``prepare_cls`` once its refusals are past, so run.yaml records it for an evaluation on rows of one label
    each), else "single_label"."""
    d = cfg.data
    lists = any(isinstance(r.get(d.label_column), list) for r in rows)
    if cfg.model.num_labels == 1:
        if d.multi_label:
            raise ConfigError("data.multi_label: true asks for classes, but model.num_labels: 1 trains a regression")
        return "regression"
    if lists and d.multi_label is False:
        raise ConfigError(f"data.multi_label is false, but column {d.label_column!r} holds lists of labels")
    return "multi_label" if d.multi_label or lists else "single_label"


def set_problem_type(model: Any, cfg: RunConfig) -> Any:
    """``model`` with a cls run's ``problem_type`` in its config as run_glue's saved model has it (its first forward
    sets it), so transformers' pipeline scores a merged model as trained: a regression's score raw (not a sigmoid of
    it), a sigmoid per class of a multi-label row (not a softmax). The other stages' models as they are."""
    if cfg.stage == "cls":
        single = "multi_label_classification" if cfg.data.multi_label else "single_label_classification"
        model.config.problem_type = "regression" if cfg.model.num_labels == 1 else single
    return model


class FloatTargetTrainer(TokenLossTrainer):
    """``TokenLossTrainer`` for float targets (a regression's numbers, multi-hot rows): every target counts. The
    Trainer counts the labels other than -100, the ignore index of class ids, which left a regression target of
    -100.0 (a score from -100 to 100) out: the train and eval loss of a batch holding one were its MSE x 4/3."""

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        ones = [{**b, "labels": torch.ones_like(b["labels"])} if "labels" in b else b for b in batch_samples]
        return super()._get_num_items_in_batch(ones, device)


def _step_mean(total: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """A sum over the micro-batch over the step's count of targets (the Trainer's, every label of the step), or over
    the micro-batch's own count (evaluation): every row of an accumulated step weighs alike."""
    count = labels.numel() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device)


def regression_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """transformers' loss for ``problem_type`` "regression" with one output: MSE of the logit and the label."""
    logits = outputs["logits"].float().reshape(-1)
    labels = labels.reshape(-1).to(logits)
    return _step_mean(nn.functional.mse_loss(logits, labels, reduction="sum"), labels, num_items_in_batch)


def multi_label_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """transformers' loss for ``problem_type`` "multi_label_classification": BCE with logits, over every class of
    every row."""
    logits = outputs["logits"].float()
    labels = labels.to(logits)
    total = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    return _step_mean(total, labels, num_items_in_batch)


def _score_note(names: list[str]) -> list[str]:
    """The report's note for a label column of fractions (STS-B's 3.8): each distinct value is a class, where
    run_glue trains a float column as a regression (num_labels 1), which ``model.num_labels: 1`` asks for."""

    def fraction(name: str) -> bool:  # (a number as a CSV reads one: '1_000' and '٣' are names)
        return class_id(name) is None and csv_number(name) is not None

    seen = [n for n in names if fraction(n)]
    if not seen:
        return []
    return [
        f"{len(seen)} of the {len(names)} classes are fractions ({', '.join(seen[:3])}{', ...' if len(seen) > 3 else ''}):"
        " each distinct value is a class, named as text (run_glue trains a float label column as a regression: "
        "model.num_labels: 1 asks for one); data.labels fixes the classes and their order"
    ]
