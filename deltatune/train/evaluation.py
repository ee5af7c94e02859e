"""``deltatune eval``: a finished run's adapter evaluated again, on its eval file or another, and with ``compare``
beside the run's start (the model as training began it, rebuilt from the recipe and its seed) on the same rows."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from typing import Any

import torch

from ..config import ConfigError
from ..data.load import DataError
from ..model import DeltaModel
from .checks import check_reference
from .config import READ_BY, apply_overrides, build
from .models import load_processor, reload_as_trained
from .run import _lm_args, adapter_field, build_model, eval_metrics, precision_args, start_model
from .runs import folder_with, old_run_data, read_recipe, run_file
from .sft import NoRowLeft
from .table import IMAGE_STAGES, prepare

VAL_SIZE_STAGES = sorted(next(stages for stages, keys in READ_BY if "data.val_size" in keys.split()).split())
"""The stages that hold data.val_size of data.train out as their eval set (config.READ_BY's readers of the key)."""


def evaluate(
    run_dir: str,
    data: str | None = None,
    overrides: list[str] | None = None,
    trust_remote_code: bool = False,
    compare: bool = False,
) -> dict[str, Any]:
    """Evaluate a finished run's adapter (``run_dir`` as written by ``train``) on ``data`` (default: the
    recipe's eval file, cut by the recipe's ``data.limit`` as the run cut it). A file given as ``data`` is read
    whole, or the row range it names (``train.jsonl[1000:2000]``), unless ``overrides`` set ``data.limit``.
    Returns the same metrics keys as training.

    With ``compare`` the run's start is evaluated first on the same rows: the base with any new head and the
    method's initial delta, drawn after seeding with the recipe's ``train.seed`` as ``train`` draws them (for
    the data formats deltatune reads, reading draws no random numbers, so it is the run's start to the bit). Its
    metrics come back as ``<key>_before``, and preference stages pair the two evaluations pair by pair
    (``eval_gained``, ``eval_lost``, ``eval_paired_p``), as a run with ``train.eval_on_start`` does.

    ``run_dir`` may also be a plain adapter folder (peft's ``save_pretrained``: adapter_config.json, no run.yaml),
    with ``data`` given: its base is the config's ``base_model_name_or_path`` and its stage follows the config's
    ``task_type`` (a causal LM's: the data's format, as ``deltatune data inspect`` picks it; a classifier's on
    preference pairs: rm; none, on an image folder or rows of image and label: image_cls); the overrides set either (``model.name_or_path=``, ``stage=``) and the data's columns, as
    for a run.

    ``model.trust_remote_code`` in the run's run.yaml is ignored; remote model code runs only when the caller
    passes ``trust_remote_code=True`` (the CLI's ``--trust-remote-code``).

    Raises:
        ConfigError: no evaluation data, a stage that runs its own loop (ppo, grpo), ``compare`` on a t2i run, a
            ``method.*`` override (the adapter brings its method).
        DataError: bad data (file, line and column named).
    """
    from transformers import TrainingArguments, set_seed

    from .trainer import DeltaTrainer

    for item in overrides or []:  # the adapter brings its method and settings; an override of them would be ignored
        if item.split("=", 1)[0].strip().split(".")[0] == "method":
            raise ConfigError(
                f"override {item!r}: an evaluation reads the method and its settings from the adapter "
                f"({os.path.join(run_dir, 'adapter_config.json')}); method overrides do not apply"
            )
    raw, path = _recipe(run_dir, data, compare, overrides or [])
    recorded = (raw.get("model") or {}).get("quantization")
    raw, old_note = old_run_data(raw, run_dir)  # (a caption run that ignored data.val_size: none held out)
    if data:  # a file named here is read whole (or its row range): the run's data.limit was its training budget
        raw["data"] = {**(raw.get("data") or {}), "eval": data, "limit": None, "val_size": 0.0}
    cfg = build(apply_overrides(raw, overrides or []), where=path, overrides=overrides)
    cfg.model.trust_remote_code = trust_remote_code
    # the base as the run trained it (run_load._quantize), its start (--compare) too: a quantisation it recorded, not
    # one an override adds (that one is refused where nothing would be quantised, as a new run's)
    cfg.trained_run = run_dir if run_file(run_dir) is not None and recorded == cfg.model.quantization else False
    if not cfg.data.eval and not (cfg.data.val_size and cfg.stage in VAL_SIZE_STAGES):  # (held out again: below)
        held = old_note and cfg.stage == "caption"  # (its val_size read as 0.0: the note says why none is held out)
        raise ConfigError(f"{path}: {old_note}; pass --data FILE" if held else "no evaluation data: pass --data FILE")
    if old_note:  # (an old run's recipe read as it trained: the figures below are scored so)
        print(f"deltatune eval: note: {old_note}", file=sys.stderr)
    if compare and cfg.stage == "t2i":
        raise ConfigError(
            "--compare is not available for t2i runs (their start is the base pipeline): "
            "use 'deltatune generate --compare' to see base and adapter side by side"
        )
    saved = "preprocessor_config.json" if cfg.stage in IMAGE_STAGES else "tokenizer_config.json"
    saved_dir = folder_with(run_dir, saved) if cfg.stage != "t2i" else None  # (the run's own: no revision)
    tok = load_processor(
        saved_dir or cfg.model.name_or_path,
        cfg.stage,
        trust_remote_code,
        cfg.model.text_encoder,
        None if saved_dir else cfg.model.revision,
    )
    if cfg.stage == "t2i":  # the text encoder's LoRA, when the run trained one
        tok.load_text_encoder_lora(run_dir)
    # A data.val_size run without --data: its held-out rows, split off data.train with its seed again (the
    # prepared eval split); else the eval file read as a train file.
    held_out = not cfg.data.eval
    # (the eval file read as the train file: no rows held out of it, as with --data; an old run's recipe may set both)
    as_train = {"data": {**raw["data"], "train": cfg.data.eval, "val_size": 0.0}}
    eval_cfg = build(apply_overrides(raw if held_out else raw | as_train, overrides or []))
    eval_cfg.evaluating = True  # (rm: a pair tied after encoding is scored, a lost pair, as the run's evaluation did)
    if run_file(run_dir) is not None:  # (tag: its marks; a checkpoint of an unfinished run has the base's tokenizer)
        eval_cfg.trained_run = run_dir
    try:
        prepared = prepare(eval_cfg, tok)
    except NoRowLeft as e:  # (sft's refusal of the file read as data.train, sft holding none out: rows to score)
        raise DataError(f"no row of {eval_cfg.data.train} has a response token to score ({e.why})") from None
    cfg.model.num_labels = cfg.model.num_labels or eval_cfg.model.num_labels  # as the stage set it (rm: 1 output)
    if prepared.loop is not None:
        raise ConfigError(
            f"stage {cfg.stage!r} runs its own loop, not the Trainer's evaluation; its metrics.json "
            "and report.md hold the eval figures"
        )
    if not held_out:
        prepared.eval = prepared.train
    batch = cfg.train.eval_batch_size or cfg.train.batch_size
    # (the Trainer would score no batch and say {})
    if cfg.train.dataloader_drop_last and prepared.eval is not None and len(prepared.eval) < batch:
        raise ConfigError(
            f"the run's train.dataloader_drop_last drops an evaluation's last partial batch, and the {len(prepared.eval)} "
            f"rows to score are fewer than one batch of {batch} (train.eval_batch_size): pass more rows, or "
            "train.dataloader_drop_last=false"
        )
    if cfg.stage == "seq2seq" and not held_out:
        from ..data.load import read_rows

        prepared.eval_rows = read_rows(cfg.data.eval, cfg.data.text_column, cfg.data.limit)
    else:
        prepared.eval_rows = prepared.eval_rows or None
    scratch = tempfile.mkdtemp(prefix="deltatune-eval-")  # never inside the run folder: eval leaves it as it is
    args = TrainingArguments(
        output_dir=scratch,
        per_device_eval_batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,  # as the run evaluated
        dataloader_drop_last=cfg.train.dataloader_drop_last,  # the Trainer drops an eval's partial batch too
        eval_accumulation_steps=cfg.train.eval_accumulation_steps,
        report_to=[],
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=prepared.loss_only,
        use_cpu=not torch.cuda.is_available(),
        # The run's label smoothing, as its own evaluation scored the loss (no NEFTune: it acts in training only)
        label_smoothing_factor=_lm_args(cfg).get("label_smoothing_factor", 0.0),
        # The run's autocast, as its own evaluation ran; a GPU's fp16 run evaluated on a CPU runs in fp32.
        **(precision_args(cfg) if cfg.train.precision != "fp16" or torch.cuda.is_available() else {}),
    )

    def scored(model: DeltaModel, start_scores: dict | None = None) -> tuple[dict[str, Any], Any]:
        check_reference(cfg, model, training=False)
        if cfg.stage == "seq2seq":  # BART's positions: the loss pass failed inside torch before the generations
            from types import SimpleNamespace

            from .seq2seq import check_positions

            check_positions(cfg, model, SimpleNamespace(train=None, eval=prepared.eval))  # (the rows scored: eval's)
        trainer = (prepared.trainer_class or DeltaTrainer)(
            model=model, args=args, data_collator=prepared.collator, compute_metrics=prepared.compute_metrics
        )
        trainer.eval_dataset = prepared.eval
        if start_scores is not None:  # a preference trainer pairs an evaluation after step 0 with these
            trainer.start_scores, trainer.state.global_step = start_scores, 1
        metrics = eval_metrics(trainer, model, tok, prepared, cfg)
        # TRL's eval_num_tokens is the training tokens so far: an evaluation-only trainer trained none (it said 0.0)
        metrics.pop("eval_num_tokens", None)
        return metrics, trainer

    try:
        before, start_scores = {}, None
        if compare:  # the start first, then freed: one model in memory at a time
            set_seed(cfg.train.seed)
            start, _ = start_model(cfg, tok, cfg.data.labels, run_dir)  # (an old run's towers: as it trained)
            before, trainer = scored(start)
            start_scores = getattr(trainer, "start_scores", None)
            del start, trainer
            gc.collect()  # the trainer's references form cycles: free the start before the trained model loads
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        labels = cfg.data.labels or prepared.labels  # a plain adapter's: its data's, as training would read them
        # The run's own loss (the fused cross-entropy its training and evaluation computed): under bf16 autocast
        # transformers' loss rounds otherwise, and the run's eval_loss would not come back to the bit.
        base = build_model(cfg, tok, labels)
        if labels and run_file(run_dir) is None and not cfg.data.labels:  # a plain adapter's classes: the data's
            _check_head(run_dir, base, labels, cfg.data.eval)
        delta = DeltaModel(base, fused_loss=True)
        delta.load_adapter(run_dir, "default")
        reload_as_trained(delta, run_dir)  # its adapter in float32 on a half-precision base, as the run trained it
        after, _ = scored(delta, start_scores)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return after | {f"{k}_before": v for k, v in before.items()}


def _check_head(run_dir: str, model: torch.nn.Module, labels: list[str], data: str) -> None:
    """Refuse a plain adapter whose saved head has another number of classes than its evaluation data shows (a
    subset of them): its load would fail as 'made for a different base model', and no order of the data's names
    could be trusted to be the one it trained."""
    path = os.path.join(run_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return
    from safetensors import safe_open

    from ..files import KEY_PREFIX

    params = dict(model.named_parameters())
    with safe_open(path, "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            name = key.removeprefix(KEY_PREFIX)
            param, saved = params.get(name), fh.get_slice(key).get_shape()
            if param is not None and param.shape[0] == len(labels) and saved and saved[0] != len(labels):
                if saved[0] == 1:  # transformers' regression head (run_glue's STS-B)
                    raise ConfigError(
                        f"{path}: the head ({name.rsplit('.', 1)[0]}) has 1 output, a regression; {data} shows "
                        f"{len(labels)} classes: pass model.num_labels=1 to score its labels as numbers"
                    )
                raise ConfigError(
                    f"{path}: the head ({name.rsplit('.', 1)[0]}) has {saved[0]} classes, {data} shows {len(labels)} "
                    f"({', '.join(labels)}); pass data.labels=[...] naming all {saved[0]} in the order it trained them"
                )


_STAGE_OF_TASK = {"SEQ_CLS": "cls", "TOKEN_CLS": "tag", "SEQ_2_SEQ_LM": "seq2seq"}


def _recipe(run_dir: str, data: str | None, compare: bool, overrides: list[str]) -> tuple[dict[str, Any], str]:
    """The recipe to evaluate ``run_dir`` with, and the path its errors name: a run's run.yaml, or for a plain
    adapter folder one built from its adapter_config.json and ``data``."""
    path = run_file(run_dir)
    config = os.path.join(run_dir, "adapter_config.json")
    if path is not None or not os.path.isfile(config):
        what = "give a folder written by 'deltatune train' or an adapter folder (adapter_config.json)"
        return read_recipe(run_dir, what), path or run_dir
    if not data:
        raise ConfigError(f"{run_dir!r} is an adapter folder without a recipe (run.yaml): pass --data FILE")
    if compare:
        raise ConfigError(
            f"--compare rebuilds a run's start from its recipe and seed; {run_dir!r} is an adapter folder without "
            "one (run.yaml)"
        )
    from ..data.formats import STAGE_FORMATS

    task, fmt = adapter_field(run_dir, "task_type"), _format(data)
    if task is None and _images(data, overrides):  # peft has no task_type for images: image_cls saves None
        stage = "image_cls"
    elif task in (None, "CAUSAL_LM"):
        from ..data.inspect import default_stage

        stage = default_stage(fmt) if fmt else "sft"
    elif task == "SEQ_CLS" and fmt in STAGE_FORMATS["rm"]:  # a classifier on preference pairs: a reward model
        stage = "rm"
    elif task in _STAGE_OF_TASK:
        stage = _STAGE_OF_TASK[task]
    else:
        raise ConfigError(f"{config}: task_type {task!r} is not one deltatune evaluates; pass stage=STAGE")
    base = adapter_field(run_dir, "base_model_name_or_path")
    if not base and not any(o.startswith("model.name_or_path=") for o in overrides):
        raise ConfigError(f"{config} does not say which base model it was trained on; pass model.name_or_path=MODEL")
    model = {"name_or_path": base} if base else {}
    return {"stage": stage, "model": model, "data": {"eval": data}}, config


def _images(data: str, overrides: list[str] | None = None) -> bool:
    """Whether ``data`` is image classification's: an image folder (images under it), or a data file whose first row
    has an image and a label column (was read as sft's text, whose tokenizer the image model lacks): ``image`` and
    ``label``, or the columns ``overrides`` name (``data.image_column=``, ``data.label_column=``; were not read, and
    such rows went to sft)."""
    from ..data.load import DataError, folder_files, read_rows

    if os.path.isdir(data) and not folder_files(data):  # (a folder of data files is read by its rows, below)
        from ..data.images import IMAGE_EXTENSIONS

        return any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(data) for f in files)

    named = [o for o in overrides or [] if o.split("=", 1)[0].strip() in ("data.image_column", "data.label_column")]
    given = apply_overrides({}, named).get("data", {})  # (the values read as the recipe reads them: '"img"' is img)
    columns = {str(given.get("image_column", "image")), str(given.get("label_column", "label"))}
    try:
        return columns <= set(read_rows(data, limit=1)[0].data)
    except (DataError, IndexError, AttributeError):
        return False


def _format(data: str) -> str | None:
    """The format of ``data``'s first row (None when it cannot be told: the stage's own reader names the fault)."""
    from ..data.formats import detect
    from ..data.load import DataError, read_rows

    try:
        return detect(read_rows(data, limit=1)[0])
    except (DataError, IndexError):
        return None
