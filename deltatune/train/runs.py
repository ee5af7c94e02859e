"""Reading a finished run folder: its recipe (``run.yaml``), as the stages, eval, merge, generate and the reward
scorers need it. A leaf of train/: it imports yaml and the config error, nothing else of deltatune."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import yaml

from ..config import ConfigError

RUN_FILE = "run.yaml"


def run_folder(path: str) -> str | None:
    """The run ``path`` belongs to: itself when it holds a run.yaml, its run when it is one of the run's
    ``checkpoint-<step>`` folders (which hold the adapter at that step, not the recipe); None otherwise."""
    if os.path.isfile(os.path.join(path, RUN_FILE)):
        return path
    parent, name = os.path.split(os.path.normpath(path))
    step = name.removeprefix("checkpoint-")
    if step != name and step.isdecimal() and os.path.isfile(os.path.join(parent, RUN_FILE)):
        return parent
    return None


def run_file(run_dir: str) -> str | None:
    """The path of the run.yaml of ``run_dir`` (a run, or one of its checkpoints), or None when there is none (a
    plain adapter folder)."""
    folder = run_folder(run_dir)
    return os.path.join(folder, RUN_FILE) if folder else None


def folder_with(adapter_dir: str, name: str) -> str | None:
    """The folder holding ``name`` (the tokenizer's or image processor's config) for ``adapter_dir``: itself, else
    the run it is a checkpoint of; None when neither has it."""
    for folder in (adapter_dir, run_folder(adapter_dir)):
        if folder and os.path.isfile(os.path.join(folder, name)):
            return folder
    return None


def read_recipe(run_dir: str, what: str = "give a folder written by 'deltatune train'") -> dict[str, Any]:
    """The recipe a run was trained with, ``model.trust_remote_code`` dropped: a run folder someone sends you must
    never make transformers run a model repo's Python code; only the command line (``--trust-remote-code``) may.

    Raises:
        ConfigError: no run.yaml in ``run_dir`` (the message ends with ``what``), or one that is not a mapping.
    """
    path = run_file(run_dir)
    if path is None:
        raise ConfigError(f"{run_dir!r} holds no {RUN_FILE}; {what}")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except UnicodeDecodeError as exc:  # (was its traceback)
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); a run.yaml is a YAML recipe") from None
    except yaml.YAMLError as exc:  # the line where the parser stopped, and why
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        why = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}{where}: not valid YAML ({why})") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a recipe (a YAML mapping)")
    if isinstance(raw.get("model"), dict):
        raw["model"] = {k: v for k, v in raw["model"].items() if k != "trust_remote_code"}
    if isinstance(raw.get("align"), dict):  # a key an older run.yaml lacks: what that run trained with (BEFORE_KEY)
        from .config_align import old_run_align

        train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
        raw["align"] = old_run_align(raw["align"], raw.get("stage"), train.get("batch_size"))
    method = raw.get("method")
    if isinstance(method, dict) and method.get("target_modules") is not None and _no_targets(method.get("name")):
        raw["method"] = {k: v for k, v in method.items() if k != "target_modules"}  # (never read; refused since)
    data = raw.get("data")
    if isinstance(data, dict) and trained_template(data.get("template"), run_dir) != data.get("template"):
        raw["data"] = {**data, "template": OLD_ALPACA}  # (begun before the alpaca_system mark: as it trained)
    return raw


def _no_targets(name: Any) -> bool:
    """Whether method ``name`` reads no target_modules (``DeltaConfig.no_targets``): a run.yaml from before session 53
    may name some for it, which the run never read; it loads as it trained."""
    from .. import registry

    return name in registry.names() and bool(registry.get(name).config_class.no_targets)


HELD_OUT_NOTE = "of the train file's {what} held out for evaluation"
"""The report.md note of a run that held data.val_size rows out (caption writes rows / images, image_cls images)."""
CAPTION_VAL_SIZE_MARKER = "return_entity_level_metrics"
"""A data key of every run.yaml written since stage caption reads data.val_size (9b38fa0 named caption among its
readers, beside this key; 4f6e087 began holding the rows out)."""


MARKS_FILE = "deltatune_marks.json"
"""A run's marks (``runfolder.MARKS``), written when it begins (``mark_run``; absent: it began before):
``quant_skip_rule`` 2, it trained under quantize's module rule of 2026-12-07 (run_load._quantize notes a run without
it when a skip entry names a module); ``seq2seq_label_smoothing`` 1, its train.label_smoothing_factor is read as
run.yaml has it (old_run_data; added by an old run's resume too: write_run_file); ``alpaca_system`` 1, its
data.template alpaca is LLaMA-Factory's, default system included (``trained_template``; an old run's resume keeps
alpaca_v0); ``tag_prefix_space`` 1, a stage tag run on a gpt2 / roberta / deberta base read its words with run_ner's
add_prefix_space=True tokenizer, and saved it (``prefix_space_trained``; an older run evaluates and resumes as it
trained, without); ``image_cls_class_label`` 1, a stage image_cls run read a ClassLabel Parquet file's ids by
the file's class names (``class_label_trained``; an older run evaluates and resumes reading them as it trained, as
data.labels' indexes); ``t2i_reads`` 2, added by stage t2i's trainer as the run begins (t2i_reads.mark_reads): it
read under the seeded reads (one without it resumes reading as it began)."""
ALPACA_MARK = "alpaca_system"
"""The mark of a run begun since data.template alpaca writes LLaMA-Factory's default system."""
PREFIX_SPACE_MARK = "tag_prefix_space"
"""The mark of a run begun since stage tag reads a byte-level base's words with the prefix space (tag.prefix_space)."""
CLASS_LABEL_MARK = "image_cls_class_label"
"""The mark of a run begun since stage image_cls reads a ClassLabel file's ids by its class names (image_cls)."""
OLD_ALPACA = "alpaca_v0"
"""``templates.OLD_ALPACA``, the alpaca an unmarked run trained with (runs imports nothing of data)."""


def mark_run(folder: str) -> None:
    """Write the marks of a run that begins now (``MARKS_FILE``), whole or not at all."""
    path = os.path.join(folder, MARKS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(
            {
                "quant_skip_rule": 2,
                "seq2seq_label_smoothing": 1,
                ALPACA_MARK: 1,
                PREFIX_SPACE_MARK: 1,
                CLASS_LABEL_MARK: 1,
            },
            fh,
        )
    os.replace(path + ".tmp", path)


def _marks(folder: str | None) -> dict[str, Any]:
    """``folder``'s marks ({} where there are none or they do not read)."""
    with (
        contextlib.suppress(OSError, ValueError),
        open(os.path.join(folder or "", MARKS_FILE), encoding="utf-8") as fh,
    ):
        marks = json.load(fh)
        return marks if isinstance(marks, dict) else {}
    return {}


def prefix_space_trained(run_dir: str) -> bool:
    """Whether the run ``run_dir`` belongs to (it, or a checkpoint of it) read a tag base's words with the prefix
    space: it holds ``PREFIX_SPACE_MARK``. False for a run begun before (2026-12-08); True for no run folder."""
    folder = run_folder(run_dir)
    return folder is None or bool(_marks(folder).get(PREFIX_SPACE_MARK))


def class_label_trained(run_dir: str) -> bool:
    """Whether the run ``run_dir`` belongs to (it, or a checkpoint of it) read a ClassLabel file's ids by the file's
    class names: it holds ``CLASS_LABEL_MARK``. False for a run begun before (2026-12-08); True for no run folder."""
    folder = run_folder(run_dir)
    return folder is None or bool(_marks(folder).get(CLASS_LABEL_MARK))


def trained_template(template: Any, run_dir: str | None) -> Any:
    """The data.template the run in ``run_dir`` (or a checkpoint of it) trained with, its run.yaml's ``template``:
    alpaca in a run folder without ``ALPACA_MARK`` (begun before 2026-12-08) is ``OLD_ALPACA``, which wrote no
    default system; any other value, or no run folder, as it is."""
    folder = run_folder(run_dir) if run_dir else None
    if template != "alpaca" or folder is None or _marks(folder).get(ALPACA_MARK):
        return template
    return OLD_ALPACA


SMOOTHING_MARK = "seq2seq_label_smoothing"
"""The mark (``runfolder.MARKS``) of a run begun since stage seq2seq reads train.label_smoothing_factor, or resumed
since (``write_run_file``): its run.yaml is read as written."""
SMOOTHING_IGNORED = "train.label_smoothing_factor is read by stage pt, sft only; stage seq2seq ignored it"
"""The report.md note of a seq2seq run that ignored the key, written until 92e87d6 named seq2seq among its readers:
before 6874e32 it trained the plain cross-entropy; a run finished between 6874e32 and 92e87d6 (development only,
half an hour) has the line yet trained smoothed, and is read as the plain loss all the same."""


def old_run_data(raw: dict[str, Any], run_dir: str | None = None) -> tuple[dict[str, Any], str]:
    """A run.yaml recipe as the run trained it, and a note ("" when none): a caption run written before stage caption
    read data.val_size (its run.yaml lacks ``CAPTION_VAL_SIZE_MARKER``, and its report.md in ``run_dir``, if any, has
    no held-out note) ignored the key and trained on every row of data.train, so its data.val_size is 0.0 here;
    ``deltatune eval`` then holds no rows out, and a ``--resume`` with the key set names it as a change. A new dict.
    A grpo run.yaml without align.steps_per_generation, loss_type bnpo and align.mini_batch_size below its slice
    (train.batch_size x num_generations) normalised bnpo over the slice (``config_align.BNPO_BEFORE``), and one with
    align.top_entropy_quantile < 1 took its chunks in order (shuffled since 2f11afa): its steps_per_generation is null
    here (1 when built: eval is unchanged), so a ``--resume`` names the change. A seq2seq run that ignored
    train.label_smoothing_factor (``_smoothing_ignored``) trained and evaluated the plain cross-entropy: its key is
    null here, with a note; ``deltatune eval`` scores it so, and a ``--resume`` with the key set names it. An
    alpaca run begun before ``ALPACA_MARK`` reads data.template ``OLD_ALPACA`` (``trained_template``)."""
    data = raw.get("data")
    if isinstance(data, dict) and trained_template(data.get("template"), run_dir) != data.get("template"):
        raw = {**raw, "data": {**data, "template": OLD_ALPACA}}  # (an unmarked alpaca run: as it trained)
    align, train = raw.get("align"), raw.get("train") if isinstance(raw.get("train"), dict) else {}
    smoothing = train.get("label_smoothing_factor")
    if raw.get("stage") == "seq2seq" and smoothing and _smoothing_ignored(run_dir):
        note = (
            f"stage seq2seq ignored train.label_smoothing_factor={smoothing} before 6874e32: this run trained and "
            "evaluated the plain cross-entropy"
        )
        return {**raw, "train": {**train, "label_smoothing_factor": None}}, note
    if raw.get("stage") == "grpo" and isinstance(align, dict) and "steps_per_generation" not in align:
        from .config import AlignArgs, TrainArgs

        size, g = (align.get(k, getattr(AlignArgs, k)) for k in ("mini_batch_size", "num_generations"))
        batch = train.get("batch_size", TrainArgs.batch_size)
        whole = all(type(v) is int for v in (size, g, batch)) and size >= batch * g  # (one chunk: as before)
        q = align.get("top_entropy_quantile", 1.0)  # (< 1: its chunks were in order before 2f11afa, shuffled now)
        if (align.get("loss_type") == "bnpo" or type(q) in (int, float) and q < 1) and not whole:
            return {**raw, "align": {**align, "steps_per_generation": None}}, ""
    data = raw.get("data")
    if raw.get("stage") != "caption" or not isinstance(data, dict) or CAPTION_VAL_SIZE_MARKER in data:
        return raw, ""
    if not data.get("val_size"):
        return raw, ""
    report = ""
    if run_dir:
        with (
            contextlib.suppress(OSError, UnicodeDecodeError),
            open(os.path.join(run_folder(run_dir) or run_dir, "report.md"), encoding="utf-8") as fh,
        ):
            report = fh.read()
    if any(HELD_OUT_NOTE.format(what=w) in report for w in ("rows", "images")):
        return raw, ""  # (4f6e087 to 9b38fa0: held out, as its report says)
    note = (
        f"stage caption ignored data.val_size={data['val_size']} before 4f6e087: this run trained on every row of "
        "data.train, none held out"
    )
    return {**raw, "data": {**data, "val_size": 0.0}}, note


def _smoothing_ignored(run_dir: str | None) -> bool:
    """Whether a seq2seq run trained on the plain cross-entropy whatever its train.label_smoothing_factor: its marks
    (``runfolder.MARKS``) lack ``SMOOTHING_MARK`` (or there is no run folder to read), and, where it finished, its
    report.md says so (``SMOOTHING_IGNORED``; one without that line finished between 92e87d6 and the mark, smoothed;
    one finished between 6874e32 and 92e87d6 has the line yet trained smoothed: it is read as plain, see there)."""
    folder = (run_folder(run_dir) or run_dir) if run_dir else None
    if folder is None:
        return True
    if _marks(folder).get(SMOOTHING_MARK):
        return False
    try:
        with open(os.path.join(folder, "report.md"), encoding="utf-8") as fh:
            return SMOOTHING_IGNORED in fh.read()
    except (OSError, UnicodeDecodeError):  # (not finished: an interrupted run unmarked began before)
        return True


def resume_rewrites(stage: Any, note: str) -> bool:
    """Whether a resume that goes through rewrites run.yaml (``write_run_file``) though the recipe is the run's as
    it trained: a seq2seq run ``old_run_data`` read with its note (unmarked, train.label_smoothing_factor set and
    ignored) trains from now on as the recipe says, so run.yaml is written so and the folder marked: its key dropped
    is null from then on (not the value it ignored, read smoothed once resumed), and a plain --resume after an
    interruption compares with it. Caption's and grpo's old runs keep their run.yaml (their keys read as trained)."""
    return stage == "seq2seq" and bool(note)


def write_run_file(folder: str, recipe: dict[str, Any]) -> None:
    """Write ``recipe`` as ``folder``'s run.yaml; a seq2seq run's marks gain ``SMOOTHING_MARK`` (the others kept):
    the recipe written now is what it trains with, its train.label_smoothing_factor read as written from then on.
    A recipe with data.template alpaca in a folder without ``ALPACA_MARK`` (a run begun before, resumed into alpaca
    with --resume-changed: it trains LLaMA-Factory's) gains it first, so what reads run.yaml reads that alpaca."""
    data = recipe.get("data")
    if isinstance(data, dict) and data.get("template") == "alpaca" and not _marks(folder).get(ALPACA_MARK):
        add_mark(folder, ALPACA_MARK, 1)
    with open(os.path.join(folder, RUN_FILE), "w", encoding="utf-8") as fh:
        yaml.safe_dump(recipe, fh, sort_keys=False)
    if recipe.get("stage") == "seq2seq":
        add_mark(folder, SMOOTHING_MARK, 1)


def add_mark(folder: str, name: str, value: int) -> None:
    """Add mark ``name`` to ``folder``'s marks (``runfolder.MARKS``; the others kept, an unreadable file's dropped),
    written whole or not at all."""
    path = os.path.join(folder, MARKS_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            marks = json.load(fh)
    except (OSError, ValueError):
        marks = {}
    marks = {**(marks if isinstance(marks, dict) else {}), name: value}
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(marks, fh)
    os.replace(path + ".tmp", path)


def run_template(adapter_dir: str) -> str | None:
    """The built-in chat template a run trained with (its recipe's ``data.template``), None for the tokenizer's
    (and for a plain adapter folder)."""
    if not run_file(adapter_dir):
        return None
    return trained_template((read_recipe(adapter_dir).get("data") or {}).get("template"), adapter_dir)
