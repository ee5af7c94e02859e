"""Stage ``image_cls``: image classification on any ``AutoModelForImageClassification`` (ViT, DeiT, Swin, ConvNeXt,
ResNet-style CNNs).

Rows come from an image folder (one sub-folder per class) or a data file with an image path column
(``deltatune.data.images``); the model's own image processor resizes and normalises them. The classifier head is
new or re-sized for the data's classes, so it trains in full with every method: the stage puts ``classifier``
into ``method.modules_to_save`` unless the recipe sets that key itself (PEFT's image-classification recipe does the
same; PEFT has no task_type for images, so the adapter's task_type stays None and files load in PEFT as they are).

Metrics: accuracy and macro-F1 (the mean over classes of 2 TP / (2 TP + FP + FN), over the classes that occur in
the labels or the predictions, as scikit-learn's ``f1_score(average="macro")``). The confusion matrix of the last
evaluation is written as ``confusion_matrix.json`` and ``confusion_matrix.png`` into the run folder and shown in
the report, by the training run only: ``deltatune eval`` (other data, the same run) leaves them as training wrote them.

A model whose config says ``num_channels: 1`` (grey ViT, ResNet, ...) reads the images' grey (``ImageDataset``);
one of another count than 1 or 3 is refused.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..data.images import (
    AUGMENTATIONS,
    ImageDataset,
    ImageRow,
    check,
    class_label_names,
    collate,
    image_folder,
    read_image_rows,
)
from ..data.load import DataError
from ..data.tasks import class_names as class_names_of
from ..data.tasks import class_of, label_map, split_off
from ..files import atomic_write
from .config import RunConfig
from .prepared import Prepared
from .trainer import TokenLossTrainer

HEAD = "classifier"
"""The classification head of transformers' image classifiers (ViT, DeiT, Swin, ConvNeXt, ResNet, CLIP, SigLIP)."""
OTHER_HEADS = {
    "swiftformer": ["head", "dist_head"],
    "pp_lcnet": ["head"],
    "perceiver": ["final_layer"],
}
"""Image classifiers whose heads are named otherwise (SwiftFormer's logits: the mean of its two heads')."""


def class_names(
    rows: list[ImageRow], labels: list | None, folder: bool, label_column: str = "label"
) -> tuple[list[str], dict[Any, int]]:
    """The class names in id order and a map label value -> id.

    Image folders: ``labels`` or the sorted sub-folder names. Data files: as text classification reads its labels
    (``data/tasks.py::label_map``): ``labels`` when given, else the sorted distinct values (whole numbers as numbers).
    """
    values = [r.label for r in rows]
    if folder:
        names = [str(x) for x in labels] if labels else sorted({str(v) for v in values})
        return names, {n: i for i, n in enumerate(names)}
    named = [str(x) for x in labels] if labels else None
    mapping = label_map(rows, label_column, named, values, stage="image_cls")  # type: ignore[arg-type]
    return class_names_of(mapping, labels), mapping


def _ids(
    rows: list[ImageRow],
    mapping: dict[Any, int],
    label_column: str,
    folder: bool = False,
    ids_only: list | None = None,
) -> list[int]:
    """The class ids of ``rows``; an image folder's rows are named by their class folder (they have no column).
    ``ids_only``: the file's ClassLabel names; each value is a class id and only that (names '1', '2' or not).

    Raises:
        DataError: a label (a class folder) outside the classes, the row (the image) named; with ``ids_only``, -1
            (datasets' ClassLabel "no label").
    """
    out = []
    for r in rows:
        if ids_only and r.label == -1:
            raise DataError(f"{r.source}: label -1 (column {label_column!r}) is datasets' ClassLabel 'no label' "
                            "(a row without its class); image classification trains and scores labelled images: "
                            "drop the row or give its class id")  # fmt: skip
        number = bool(ids_only) and isinstance(r.label, int) and not isinstance(r.label, bool)
        cid = (mapping.get(r.label) if number else None) if ids_only else class_of(r.label, mapping)
        if cid is None and folder:
            shown = ", ".join(map(str, list(mapping)[:6])) + (", ..." if len(mapping) > 6 else "")
            raise DataError(f"{r.source}: its class folder {r.label!r} is not one of the training classes ({shown})")
        if cid is None:  # (a ClassLabel id past data.labels' renamed classes: its name said)
            named = f", its ClassLabel's {ids_only[r.label]!r}" if number and 0 <= r.label < len(ids_only) else ""
            why = f"; data.labels names {len(mapping)} of its {len(ids_only)} ClassLabel classes" if named else ""
            raise DataError(f"{r.source}: label {r.label!r} (column {label_column!r}{named}) is not one of the "
                            f"training classes{why}")  # fmt: skip
        out.append(cid)
    return out


def _id_map(stored: list[str], names: list[str], spec: str, column: str, rename: bool = False) -> dict[int, int]:
    """A ClassLabel file's ids -> class ids: by name where its names are all classes (the same names in the same
    order: each id itself; a run's recorded classes in another order: by name), else with ``rename`` (data.labels
    naming none of the file's classes) each id itself, as data.labels renames them.

    Raises:
        DataError: names of the file among the classes and others not (an id would be read as another class).
    """
    if all(n in names for n in stored):
        return {i: names.index(n) for i, n in enumerate(stored)}
    if rename and not set(stored) & set(names):
        return {i: i for i in range(len(names))}
    fix = " (or data.labels naming them all)" if rename else ""  # (an eval file: the train file's classes named)
    raise DataError(f"{spec}: its ClassLabel column {column!r} names the classes {stored}, not all among the "
                    f"classes {names}; give files of one ClassLabel{fix}")  # fmt: skip


def _begun_before_class_label(cfg: RunConfig) -> bool:
    """Whether this repeats a run begun before stage image_cls read a ClassLabel file's names (no
    ``image_cls_class_label`` mark, runs.class_label_trained): ``deltatune eval``'s (``trained_run`` the run folder
    or checkpoint) or a ``--resume``'s (``output.dir``). That run read the file's values as 7dc8361 did, data.labels
    naming its classes in the order of the ids (label_map), and evaluates and resumes so."""
    trained = vars(cfg).get("trained_run")
    run_dir = trained if isinstance(trained, str) else cfg.output.dir if "trained_run" in vars(cfg) else None
    if not isinstance(run_dir, str) or not os.path.isdir(run_dir):
        return False
    from .runs import class_label_trained

    return not class_label_trained(run_dir)


def confusion(preds: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """``m[t, p]``: how many examples of true class t were predicted as p."""
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


def macro_f1(m: np.ndarray) -> float:
    """Mean per-class F1 = 2 TP / (2 TP + FP + FN) over the classes present in the labels or the predictions."""
    tp = np.diag(m).astype(float)
    fp = m.sum(0) - tp
    fn = m.sum(1) - tp
    present = (m.sum(0) + m.sum(1)) > 0
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def plot_confusion(m: np.ndarray, names: list[str], path: str) -> str | None:
    """The confusion matrix as a PNG heat map with counts (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(names)
    size = min(3 + 0.45 * n, 12)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=45 if n > 8 else 0)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        top = m.max() if m.size else 0
        for t in range(n):
            for p in range(n):
                ax.text(p, t, str(m[t, p]), ha="center", va="center", color="white" if m[t, p] > top / 2 else "black")
    ax.set_title("confusion matrix (last evaluation)")
    fig.tight_layout()
    try:  # whole or as it was (the temporary name's suffix names no format: png said)
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


class PixelTrainer(TokenLossTrainer):
    """``TokenLossTrainer`` that feeds pixel values in the model's dtype, as transformers' image pipelines cast them:
    a CNN, Swin or BEiT loaded in bfloat16 (``model.dtype``) does not cast them itself, and fails on float32 pixels
    without autocast. The caption stage's encoder-decoders (a Swin encoder: Donut) train with it too."""

    def _prepare_inputs(self, inputs: dict) -> dict:
        inputs = super()._prepare_inputs(inputs)
        dtype, pixels = getattr(self.model, "dtype", None), inputs.get("pixel_values")
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and pixels is not None:
            inputs["pixel_values"] = pixels.to(dtype)
        return inputs


class ConfusionTrainer(PixelTrainer):
    """The stage's trainer: after each evaluation it writes the confusion matrix that ``compute_metrics`` left in
    ``confusion`` into its own output folder. That is the run folder while training; ``deltatune eval`` evaluates in
    a scratch folder, so an evaluation on other data leaves the run's matrix (the one its report shows) alone."""

    def __init__(self, *args, confusion: dict, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.confusion = confusion

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        m, out = self.confusion.pop("matrix", None), self.args.output_dir
        if m is not None and self.is_world_process_zero() and os.path.isdir(out):
            # each file whole or as it was (a run stopped mid-write left a cut JSON beside the last matrix's PNG)
            names, record = self.confusion["names"], {"labels": self.confusion["names"], "matrix": m.tolist()}
            atomic_write(os.path.join(out, "confusion_matrix.json"), lambda tmp: _dump(record, tmp))
            plot_confusion(m, names, os.path.join(out, "confusion_matrix.png"))
        return metrics


def _dump(record: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh)


def _config(cfg: RunConfig):
    """The model's config at model.revision; None where it does not load (the model loader names the problem)."""
    from .model_files import base_config

    m = cfg.model
    return base_config(m.name_or_path, m.trust_remote_code, m.revision)


def heads(config) -> list[str]:
    """The new heads, trained in full: ``classifier``, and a LeViT-with-teacher checkpoint's ``classifier_distill``
    (AutoModelForImageClassification loads that class for it; its logits are the two heads' mean, so a head left out
    stays frozen at its random init for the new classes). DeiT's ``cls_classifier`` and ``distillation_classifier``
    end with ``classifier``, which PEFT's modules_to_save matches. SwiftFormer's, PP-LCNet's and Perceiver's heads are
    named otherwise (``OTHER_HEADS``): ``classifier`` matched no module there, and the run was refused."""
    teacher = "LevitForImageClassificationWithTeacher" in (getattr(config, "architectures", None) or [])
    if getattr(config, "model_type", None) in OTHER_HEADS:
        return list(OTHER_HEADS[config.model_type])
    return [HEAD, "classifier_distill"] if teacher else [HEAD]


def model_channels(cfg: RunConfig) -> int:
    """The image channels the model reads (its config's ``num_channels``, a vision tower's; 3 when unsaid).

    Raises:
        ConfigError: a count other than 1 (grey) or 3 (RGB).
    """
    config = _config(cfg)
    n = getattr(getattr(config, "vision_config", config), "num_channels", 3)
    if n not in (1, 3):
        raise ConfigError(
            f"model.name_or_path {cfg.model.name_or_path!r} reads {n}-channel images (its config's num_channels); "
            "stage image_cls feeds RGB (3 channels) or grey (1) images"
        )
    return n


def _notes_converted(notes: list[str], split: str, converted: dict[str, int]) -> None:
    for mode, count in sorted(converted.items()):
        notes.append(f"{count} {split} images were stored in mode {mode!r} and were converted to RGB")


def check_processor(processor, row: ImageRow, channels: int) -> None:
    """The first train image through the image processor once, before training (unaugmented: no random draw), so a
    processor that refuses the stage's images (an ``image_mean`` of one value for an RGB model: "mean must have 3
    elements") is one line here, not a traceback from the Trainer's first batch. The caption stage's encoder-decoder
    captioners check theirs so too.

    Raises:
        DataError: the processor's refusal, the row and the processor named.
    """
    try:
        ImageDataset([row], [None], processor, channels=channels)[0]
    except (ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        image = " it" if row.source == row.path else f" image {row.path!r}"  # (an image folder's row: its path once)
        raise DataError(f"{row.source}: the image processor ({type(processor).__name__}) refuses{image} for a "
                        f"{channels}-channel model: {reason}") from None  # fmt: skip


def prepare_image_cls(cfg: RunConfig, processor) -> Prepared:
    """Read and check the images, fix the classes, and give the Trainer lazily decoded datasets.

    Raises:
        DataError: unreadable images, a single class, eval labels outside the training classes.
        ConfigError: an unknown augmentation.
    """
    d = cfg.data
    if not d.train:
        raise DataError("data.train is not set: give an image folder or a data file with an image column")
    bad = [a for a in d.augment if a not in AUGMENTATIONS]
    if bad:
        raise ConfigError(f"data.augment: unknown augmentation {bad[0]!r}; choose from {', '.join(AUGMENTATIONS)}")
    # (data.labels naming an image folder's classes: folders named as splits among them are classes)
    read = functools.partial(read_image_rows, classes=d.labels)
    train_rows = read(d.train, d.image_column, d.label_column, d.limit, d.allow_outside)
    eval_rows = read(d.eval, d.image_column, d.label_column, d.limit, d.allow_outside) if d.eval else None
    if not image_folder(d.train):  # (a folder's classes are its sub-folders' names)
        from .cls import check_bool_labels

        check_bool_labels([(r.source, r.label) for r in [*train_rows, *(eval_rows or [])]], d.label_column, d.labels)
    # a Parquet file saved by datasets names its ClassLabel column's classes (ids kept, absent ones too), as
    # load_dataset("parquet") reads them; data.labels, when set, names them instead; its values are ids only
    stored = None if image_folder(d.train) else class_label_names(d.train, d.label_column)
    old = bool(stored) and _begun_before_class_label(cfg)  # (its file read as that run trained: its values)
    stored = None if old else stored
    if stored:
        names = [str(x) for x in d.labels] if d.labels else stored
        mapping = _id_map(stored, names, d.train, d.label_column, rename=True)
    else:
        names, mapping = class_names(train_rows, d.labels, image_folder(d.train), d.label_column)
    in_eval = class_label_names(d.eval, d.label_column) if stored and d.eval and not image_folder(d.eval) else None
    if not in_eval or in_eval == stored:
        eval_map = mapping
    elif set(stored or ()) & set(names):
        eval_map = _id_map(in_eval, names, d.eval, d.label_column)
    else:  # data.labels renaming the train file's classes id by id: the eval file's by the train file's names
        by_name = _id_map(in_eval, stored, d.eval, d.label_column)  # type: ignore[arg-type]
        eval_map = {i: mapping[k] for i, k in by_name.items() if k in mapping}
    if len(names) < 2:
        where = "sub-folder" if image_folder(d.train) else "label"
        raise DataError(
            f"{d.train}: only one class ({names[0]!r}); image classification needs at least two "
            f"(one {where} per class)"
        )
    # data.val_size: a validation split off the train images, after the classes are read from all of them
    held = split_off(train_rows, d.val_size, cfg.train.seed, bool(d.eval))
    train_rows, eval_rows = held[0], eval_rows if held[1] is None else held[1]
    folders = image_folder(d.train), image_folder(d.eval) if d.eval else image_folder(d.train)
    ids_only = in_eval or stored
    if stored and d.eval and not in_eval:  # a ClassLabel train file's eval file without one: as data.labels reads it
        eval_map, ids_only = class_names(eval_rows, names, folders[1], d.label_column)[1], None  # type: ignore
    train_ids = _ids(train_rows, mapping, d.label_column, folders[0], stored)
    eval_ids = _ids(eval_rows, eval_map, d.label_column, folders[1], ids_only) if eval_rows else None
    notes = [f"{len(train_rows)} training images in {len(names)} classes"]
    if old:
        notes.insert(0, f"a run begun before stage image_cls read a ClassLabel file's class names (no "
                        f"image_cls_class_label mark): {d.train}'s labels read as it trained, data.labels naming "
                        "the classes in the order of their ids")  # fmt: skip
    if held[1] is not None:
        notes.append(f"data.val_size: {len(eval_rows or [])} of the train file's images held out for evaluation")
    _notes_converted(notes, "train", check(train_rows))
    if eval_rows:
        _notes_converted(notes, "eval", check(eval_rows))
    if d.augment:
        notes.append(f"train-time augmentation: {', '.join(d.augment)}")
    if getattr(_config(cfg), "model_type", None) == "imagegpt":  # (its forward refuses pixel_values)
        raise ConfigError(f"model.name_or_path {cfg.model.name_or_path!r}: ImageGPT reads its image processor's "
                          "colour-cluster input_ids, not pixel_values, which stage image_cls feeds; choose another "
                          "image classifier")  # fmt: skip
    n, last = len(names), {"names": names}
    channels = model_channels(cfg)
    if channels == 1:
        notes.append("the model reads one channel: images are fed as grey")

    def compute(p) -> dict[str, float]:
        logits = p.predictions[0] if isinstance(p.predictions, (tuple, list)) else p.predictions
        preds, labels = np.asarray(logits).argmax(-1), np.asarray(p.label_ids)
        last["matrix"] = m = confusion(preds, labels, n)  # written by ConfusionTrainer (training only)
        return {"accuracy": float((preds == labels).mean()), "macro_f1": macro_f1(m)}

    if processor is not None:  # (a caller that only reads the rows and classes passes none)
        check_processor(processor, train_rows[0], channels)
    if "modules_to_save" not in cfg.method:  # (after the refusals: a refused call leaves the recipe as it was)
        cfg.method["modules_to_save"] = heads(_config(cfg))  # the new head trains in full, whatever the method
    if eval_rows:
        notes.append("confusion matrix of the last evaluation (rows: true class, columns: predicted):")
        notes.append("![confusion matrix](confusion_matrix.png)")
    return Prepared(
        ImageDataset(train_rows, train_ids, processor, d.augment, channels),
        ImageDataset(eval_rows, eval_ids, processor, channels=channels) if eval_rows else None,
        collate,
        compute,
        "eval_accuracy",
        names,
        notes=notes,
        # the cross-entropy over the step's rows, however the step is cut; the confusion matrix into the run folder
        trainer_class=functools.partial(ConfusionTrainer, confusion=last),
    )
