"""One fine-tuning run from a RunConfig: base model + method -> HF Trainer -> adapter, metrics, report.

``train(cfg)`` is what ``deltatune train`` calls (``evaluation.evaluate`` what ``deltatune eval`` calls).
Stage-specific work lives in one file per stage (the table in table.py); which method trains is the registry's business (via DeltaModel).
A finished run loaded back (for generate, chat, merge, the reward scorers) is run_load.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict
from typing import Any

import torch
import yaml

from ..config import ConfigError
from ..data.load import data_path
from ..files import save_folder_files
from ..model import DeltaModel, get_delta_model
from . import report
from .checks import check_context, check_num_labels, check_reference, check_run, resolved_precision
from .cls import set_problem_type
from .config import RunConfig, check_load, ignored_keys, load_revision
from .config_train import check_best_metric, optim_args
from .metrics import perplexity, true_entity_types
from .models import check_vocab, load_model, load_processor, local_base_note, upcast_adapters
from .prepared import Prepared
from .run_load import _quantize, adapter_field, load_adapter_model  # noqa: F401  (evaluation, info, scorers)
from .runfolder import (
    FINISHED_FILE,
    Replacement,
    RunLock,
    absolute_paths,
    check_apart,
    check_output_path,
    facts_changes,
    mark_run,
    recipe_changes,
    resume_checkpoint,
    run_facts,
    started_callback,
    take_derived,
)
from .runs import RUN_FILE, old_run_data, read_recipe, resume_rewrites, write_run_file
from .table import IMAGE_STAGES, TASK_OF_STAGE, prepare


def _check_output(out: str, overwrite: bool, resume: bool) -> tuple[str | None, list[str]]:
    """Refuse to mix runs in one folder; returns the checkpoint to resume from and notes on skipped ones.
    Nothing is removed here: ``--overwrite`` moves the old run aside only once the new one is ready to start."""
    if resume:
        return resume_checkpoint(out)
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, RUN_FILE)):
            raise ConfigError(
                f"output folder {out!r} holds files that are not a deltatune run; choose another "
                "output.dir (--overwrite only replaces a previous run)"
            )
        if not overwrite:
            raise ConfigError(
                f"output folder {out!r} already holds files (another run?); pass --overwrite to "
                "replace it or --resume to continue it"
            )
    return None, []


def _reads(cfg: RunConfig) -> dict[str, str | None]:
    """The files and folders a run reads (by recipe key), which replacing its output folder must not delete."""
    d, a = cfg.data, cfg.align
    reads = {"model.name_or_path": cfg.model.name_or_path, "model.text_encoder": cfg.model.text_encoder,
             "data.train": d.train and data_path(d.train), "data.eval": d.eval and data_path(d.eval),
             "align.reward_model": a.reward_model}  # fmt: skip
    return reads | {f"align.reward_funcs[{i}]": f for i, f in enumerate(a.reward_funcs or []) if isinstance(f, str)}


def precision_args(cfg: RunConfig) -> dict[str, bool]:
    p = resolved_precision(cfg.train.precision)  # fp16 on a CPU is refused, never recorded as fp16 while fp32 trains
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def _report_to(wanted: list[str]) -> list[str]:
    import importlib.util

    out = [w for w in wanted if w != "none"]
    if "tensorboard" in out and importlib.util.find_spec("tensorboard") is None:
        out.remove("tensorboard")
    return out


def _checkpointing(on: bool, args_class: type) -> dict[str, Any]:
    """The checkpointing arguments, under the names the installed transformers reads: ``activation_checkpointing*``
    (newer releases, which warn on the old ``gradient_checkpointing*``), else the old names; none when off."""
    if not on:
        return {}
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in args_class.__dataclass_fields__
        else "gradient_checkpointing"
    )
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def _training_args(cfg: RunConfig, prepared: Prepared, out: str):
    from transformers import TrainingArguments

    t = cfg.train
    has_eval = prepared.eval is not None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.scheduler,
        lr_scheduler_kwargs=dict(t.lr_scheduler_kwargs),
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed if t.data_seed is None else t.data_seed,
        logging_steps=t.logging_steps,
        logging_first_step=t.logging_first_step,
        eval_accumulation_steps=t.eval_accumulation_steps,
        eval_strategy=("steps" if t.eval_steps else "epoch") if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "epoch",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.load_best_model_at_end and has_eval,
        # (early stopping compares each evaluation with the best by it: the Trainer tracks one only when it is set)
        metric_for_best_model=t.metric_for_best_model or ("loss" if t.early_stopping_patience and has_eval else None),
        greater_is_better=t.greater_is_better,
        # (--resume: early stopping's count of evaluations without improvement, as the uninterrupted run had it)
        restore_callback_states_from_checkpoint=bool(t.early_stopping_patience),
        report_to=_report_to(t.report_to),
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=prepared.loss_only,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() or not distributed else "gloo",
        dataloader_num_workers=t.num_workers,
        dataloader_drop_last=t.dataloader_drop_last,
        dataloader_pin_memory=t.dataloader_pin_memory,
        train_sampling_strategy=t.train_sampling_strategy,
        include_num_input_tokens_seen="non_padding" if cfg.stage not in IMAGE_STAGES else "no",  # no tokens
        **_checkpointing(cfg.model.gradient_checkpointing, TrainingArguments),
        eval_on_start=t.eval_on_start and has_eval,
        fsdp=t.fsdp,
        fsdp_config=t.fsdp_config or None,
        **({"optim": t.optim} if t.optim else {}),  # (null: the Trainer's default)
        optim_args=",".join(f"{k}={v}" for k, v in optim_args(t).items()) or None,
        torch_empty_cache_steps=t.torch_empty_cache_steps,
        **_lm_args(cfg),
        **precision_args(cfg),
    )


def _lm_args(cfg: RunConfig) -> dict[str, Any]:
    """NEFTune and label smoothing, for the stages whose loss is the Trainer's token loss (pt, sft); other stages
    ignore the keys (named in the report: ``ignored_keys``)."""
    t = cfg.train
    if cfg.stage not in ("pt", "sft"):
        return {}
    return {"neftune_noise_alpha": t.neftune_noise_alpha, "label_smoothing_factor": t.label_smoothing_factor or 0.0}


def build_model(cfg: RunConfig, tok, labels: list[str] | None = None) -> torch.nn.Module:
    """The base model for the recipe's stage, quantised if asked (not yet wrapped)."""
    task = TASK_OF_STAGE[cfg.stage]
    num_labels = len(labels) if labels else cfg.model.num_labels  # a run's labels name its head's classes
    m = cfg.model  # (an image processor has no pad token id)
    id2label = dict(enumerate(labels)) if labels else None
    model = load_model(m.name_or_path, task, m.dtype, num_labels, id2label, m.trust_remote_code,
                       getattr(tok, "pad_token_id", None), m.revision, m.attn_implementation)  # fmt: skip
    check_vocab(cfg.model.name_or_path, model, tok)  # (a larger tokenizer: IndexError in the first step)
    trained = cfg.output.dir if cfg.trained_run is True else cfg.trained_run  # (the run's folder: its marks)
    model = set_problem_type(_quantize(model, cfg.model.quantization, trained=trained), cfg)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache while training (it would also disable packed-sequence masks)
    return model


def _same(a, b) -> bool:
    """Two target_modules alike (lists in any order)."""
    return sorted(a) == sorted(b) if isinstance(a, list) and isinstance(b, list) else a == b


def start_model(
    cfg: RunConfig, tok, labels: list[str] | None = None, checkpoint: str | None = None
) -> tuple[DeltaModel, list[str]]:
    """The model as a run starts training it: the base (and any new head) with the method's initial delta, both
    drawn from the random generator as it stands (``train`` seeds it first). Returns it and the report notes.
    ``checkpoint``: the folder a resume loads (or eval's run folder): its saved towers targets are kept, and its
    targets read as a file's (a regex that reached fused experts before 4d15b84 builds, warning, as it trained)."""
    from .. import towers  # method.towers: targets resolved inside the named towers of a multimodal model
    from ..targets import from_file

    model = build_model(cfg, tok, labels)
    asked = cfg.method_config(TASK_OF_STAGE[cfg.stage])
    saved = towers.saved_config(checkpoint) if checkpoint else None
    # (a run begun before 1bc40a6: every block of its towers; before a model type had towers: untowered, as it trained)
    config = towers.resolve(model, asked, cfg.method.get("towers"), saved)
    if saved is not None:  # (a method whose new adapters' defaults changed goes on with the run's: DeltaConfig)
        config = config.as_resumed(saved)
    as_saved = saved is not None and _same(saved.get("target_modules"), config.target_modules)  # (not a new recipe)
    # The runs deltatune owns use the fused causal-LM loss (deltatune.loss); the library's default leaves it off.
    with from_file() if as_saved else contextlib.nullcontext():  # (its weights: the checkpoint's, as trained)
        delta = get_delta_model(model, config, fused_loss=True, revision=load_revision(cfg))  # (peft's record)
    if not cfg.train.fsdp:  # adapters in fp32 on a half-precision base (FSDP flattens a layer in one dtype)
        upcast_adapters(delta)
    if config is asked:
        return delta, []
    per_tower = ", ".join(f"{t}: {n}" for t, n in sorted(towers.counts(delta).items()))  # targets resolved per tower
    return delta, [f"adapted layers per tower: {per_tower or 'none'}"]


def train(
    cfg: RunConfig, overwrite: bool = False, resume: bool = False, resume_changed: bool = False
) -> dict[str, Any]:
    """Run the recipe; returns the final metrics (also written to ``<output.dir>/metrics.json``).

    One run per output folder at a time (a lock beside it). With ``overwrite`` the previous run is moved aside
    only after the recipe, data, model and method were all checked, deleted once the new run made its first
    step, and put back if the new run fails before that. With ``resume`` a finished run is refused, and so is a
    recipe that differs from the run's in anything that matters, unless ``resume_changed``.

    Raises:
        ConfigError: a bad recipe, an output folder that holds another run or is in use, or a refused resume.
        DataError: bad data (file, line and column named).
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    out = cfg.output.dir
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output.dir and --overwrite replaces it: pass one, not both")
    check_output_path(out)
    lock = RunLock(out) if int(os.environ.get("RANK", "0")) == 0 else None  # one lock per run, not per rank
    if lock is not None:
        lock.acquire()
    attempt: dict[str, Replacement] = {}
    given = cfg.data.labels, cfg.data.multi_label, cfg.model.num_labels, {**cfg.method}  # (what a start derives)
    try:
        return _train(cfg, overwrite, resume, resume_changed, attempt)
    except BaseException as exc:  # the board shows the run stopped or failed with this line, not running
        folder = attempt.get("folder")
        cfg.data.labels, cfg.data.multi_label, cfg.model.num_labels, cfg.method = given  # the recipe as it was given
        # Marked once the folder changed (every check passed) and still holds this run: not an old run put back
        # by --overwrite, nor a refused start; a failed --resume is marked too.
        if lock is not None and folder is not None and folder.begun and (folder.is_started or not folder.replace):
            _mark_stopped(out, exc)
        raise
    finally:
        if lock is not None:
            lock.release()


def _mark_stopped(out: str, exc: BaseException) -> None:
    """``stopped.json`` (the board's ``STOPPED_FILE``): why this run ended early, its error's first line and whether
    it was interrupted; never fails the run's own error."""
    if not os.path.isfile(os.path.join(out, RUN_FILE)) or os.path.isfile(os.path.join(out, FINISHED_FILE)):
        return  # (no run, or a finished one: t2i's final drawing after the save stopped, not the run)
    reason = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:500]
    path = os.path.join(out, "stopped.json")
    with contextlib.suppress(OSError):
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump({"reason": reason, "interrupted": isinstance(exc, KeyboardInterrupt | SystemExit)}, fh)
        os.replace(path + ".tmp", path)


def _train(
    cfg: RunConfig, overwrite: bool, resume: bool, resume_changed: bool, attempt: dict[str, Any]
) -> dict[str, Any]:
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    from .trainer import DeltaTrainer
    from .trainer_callbacks import ProgressBar, callbacks

    out = cfg.output.dir
    checkpoint, resume_notes = _check_output(out, overwrite, resume)
    if overwrite:
        check_apart(out, _reads(cfg), "output.dir")
    # A resume must not change what matters (lr, seed, method, data, ...): compared before anything is loaded.
    write_recipe = _check_resume_recipe(out, _recipe_dict(cfg), resume_changed) if resume else True
    if resume:  # data.labels the recipe leaves unset: the run's recorded classes (an old {1, 2} run had three)
        take_derived(cfg, out)
        # its base as it trained (run_load._quantize: nothing to quantise kept full precision), unless the recipe
        # now adds a quantisation the run never trained with (--resume-changed): that one is refused as a new run's
        recorded = (read_recipe(out).get("model") or {}).get("quantization")
        cfg.trained_run = recorded == cfg.model.quantization
    check_run(cfg)
    facts = run_facts(cfg)
    changed = facts_changes(checkpoint, facts) if checkpoint else []
    if changed and not resume_changed:
        raise ConfigError(f"--resume: since {os.path.basename(checkpoint)} was written, {'; '.join(changed)}, so "
                          "training would not continue as it went; pass --resume-changed to continue anyway")  # fmt: skip
    set_seed(cfg.train.seed)
    m = check_load(cfg)  # (refused before the data: a local folder's revision, flash attention missing)
    tok = load_processor(m.name_or_path, cfg.stage, m.trust_remote_code, m.text_encoder, m.revision)
    prepared = prepare(cfg, tok)
    _check_best_metric(cfg, prepared)  # (before the model loads)
    if prepared.labels:
        check_num_labels(cfg, prepared.labels)
        cfg.data.labels = prepared.labels
    delta, notes = start_model(cfg, tok, prepared.labels, checkpoint if resume else None)
    check_reference(cfg, delta, training=True)
    check_context(cfg, prepared, delta)
    if os.path.isdir(cfg.model.name_or_path):
        notes.insert(0, local_base_note(cfg.model.name_or_path))
    prepared.notes = [
        *prepared.notes,
        *notes,
        *(f"{k} is read by stage {s} only; stage {cfg.stage} ignored it" for k, s in ignored_keys(cfg)),
    ]
    if cfg.data.packing:
        _check_packing(delta)
    recipe = _recipe_dict(cfg)
    if resume:
        for note in resume_notes:
            print(f"deltatune: --resume: {note}", file=sys.stderr)
        prepared.notes = [*prepared.notes, *(f"resume: {n}" for n in resume_notes)]
    replacement = attempt["folder"] = Replacement(out, overwrite)
    if prepared.loop is not None:
        prepared.run_facts = facts  # recorded in each checkpoint (ppo, grpo), as the Trainer stages' below
        return _run_loop(cfg, prepared, delta, tok, replacement, checkpoint, write_recipe)
    args = _training_args(cfg, prepared, out)
    trainer = (prepared.trainer_class or DeltaTrainer)(
        model=delta,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=prepared.collator,
        compute_metrics=prepared.compute_metrics,
        callbacks=callbacks(cfg.train),
    )
    # Language-model losses average over the tokens of the whole accumulated batch when the Trainer passes the
    # token count (num_items_in_batch). Classification heads ignore it and average per micro-batch, so for them the
    # Trainer must divide by the accumulation steps itself, or 4 x 2 would train 4 times harder than 8.
    trainer.run_facts = facts  # recorded in each checkpoint, for a resume to compare
    trainer.model_accepts_loss_kwargs = prepared.loss_only
    trainer._item_count_checked = True  # the stage knows: DeltaTrainer need not ask the model
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar)
    trainer.add_callback(started_callback(replacement))
    # t2i's validation/final.png: drawn once the run's outputs are saved (diffusers' scripts save the LoRA, then draw)
    finish = trainer.draw_after_save() if hasattr(trainer, "draw_after_save") else None
    # Everything is checked: from here on the folder changes (the old run moved aside, the new one written).
    replacement.begin()
    try:
        if trainer.is_world_process_zero() and checkpoint is None:  # (a resumed run keeps its marks, or none;
            mark_run(out)  # first: a kill before run.yaml leaves no run that reads as an old one)
        if trainer.is_world_process_zero() and write_recipe:  # (a seq2seq run's marked: read as written)
            write_run_file(out, recipe)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        replacement.started()  # a run of zero steps has started too
    except BaseException:
        replacement.failed()  # before the first step: the folder as it was
        raise
    finally:  # a run stopped by an error (a NaN loss) leaves no half-drawn progress bar behind
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, ProgressBar) and cb.training_bar is not None:
                cb.training_bar.close()
    metrics: dict[str, Any] = {
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
    }
    if trainer.is_world_process_zero():  # before the evaluation, so a failure there loses no adapter
        delta.save_pretrained(out)
        save_folder_files(tok.save_pretrained, out)  # (no half-written tokenizer.json on a full disk)
    if prepared.eval is not None:
        metrics.update(eval_metrics(trainer, delta, tok, prepared, cfg))
    before = next((h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == 0), None)
    headline = prepared.metric or "eval_loss"  # a language model's: its loss (sft, pt)
    if before and headline in before:
        metrics[f"{headline}_before"] = before[headline]
    samples = _samples(delta, tok, cfg) if trainer.is_world_process_zero() else None
    if trainer.is_world_process_zero():
        report.write(out, recipe, metrics, trainer.state.log_history, prepared.notes, prepared.metric, samples)
    if finish is not None:
        finish()
    return metrics


def _samples(delta: DeltaModel, tok, cfg: RunConfig) -> list[dict[str, str]] | None:
    """``output.samples`` eval prompts answered with the adapter off and on (causal LM stages); None when not asked
    for. The report writes them to samples.json and report.md."""
    if not cfg.output.samples or TASK_OF_STAGE[cfg.stage] != "CAUSAL_LM":
        return None
    from ..data.load import DataError
    from .chat import run_samples

    try:
        return run_samples(delta, tok, cfg)
    except (ConfigError, DataError) as exc:  # the trained run is written whatever its samples hit
        print(f"deltatune train: note: output.samples skipped: {exc}", file=sys.stderr)
        return None


def _check_resume_recipe(out: str, recipe: dict[str, Any], resume_changed: bool) -> bool:
    """Refuse a resume whose recipe differs from the run's in what matters; True when run.yaml is to be rewritten
    (the changes were accepted with ``resume_changed``)."""
    path = os.path.join(out, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            old = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"--resume: {path} cannot be read ({type(exc).__name__}); the run cannot be compared"
        ) from None
    old, note = old_run_data(old, out) if isinstance(old, dict) else (old, "")  # (a caption run: val_size ignored)
    if old and isinstance(old, dict):  # a key its run.yaml lacks (an older deltatune's) trained as its default
        from .config import _SECTIONS
        from .config_align import old_run_align

        if isinstance(old.get("align"), dict):  # (but BEFORE_KEY's; TRL's names moved as validate_ppo moves them)
            train = old.get("train") if isinstance(old.get("train"), dict) else {}
            old = {**old, "align": old_run_align(old["align"], old.get("stage"), train.get("batch_size"))}
        defaults = {name: asdict(cls()) for name, cls in _SECTIONS.items()}
        sections = {k: {**d, **(old.get(k) or {})} for k, d in defaults.items() if isinstance(old.get(k) or {}, dict)}
        old = {**old, **sections}  # (a whole section it lacks: each key its default, not each named changed)
    recorded = old.get("method") if isinstance(old, dict) and isinstance(old.get("method"), dict) else {}
    method = recipe.get("method") if isinstance(recipe.get("method"), dict) else {}
    if (
        recipe.get("stage") == "image_cls"
        and method.get("modules_to_save") is None
        and recorded.get("modules_to_save")
    ):
        # the head image_cls adds to method.modules_to_save where the recipe leaves it out (run.yaml records it):
        # the same model gives the same head, so a recipe leaving it out again is no change
        recipe = {**recipe, "method": {**method, "modules_to_save": recorded["modules_to_save"]}}
    noted = ("data.val_size:", "train.label_smoothing_factor:")  # (the keys runs.old_run_data reads as they trained)
    changes = [f"{c} ({note})" if note and c.startswith(noted) else c for c in recipe_changes(old, recipe)]
    if changes and not resume_changed:
        raise ConfigError(
            f"--resume: the recipe differs from the run in {out!r} in {'; '.join(changes)}; "
            "pass --resume-changed to continue with the new values"
        )
    return bool(changes) or resume_rewrites(recipe.get("stage"), note)  # (an old seq2seq run: written anew)


def _run_loop(
    cfg: RunConfig,
    prepared: Prepared,
    delta: DeltaModel,
    tok,
    replacement: Replacement | None = None,
    checkpoint: str | None = None,
    write_recipe: bool = True,
) -> dict[str, Any]:
    """A stage with its own training loop (no HF Trainer; PPO writes its own checkpoints): run it, then save and
    report. ``checkpoint``: resume from it (``--resume``)."""
    out = cfg.output.dir
    replacement = replacement or Replacement(out, False)
    replacement.begin()
    recipe = _recipe_dict(cfg)
    try:
        if checkpoint is None:  # (a resumed run keeps its marks, or none; before run.yaml, as the Trainer stages')
            mark_run(out)
        if write_recipe:  # (resumed into alpaca: its mark with it)
            write_run_file(out, recipe)
        # Only a resumed run passes the checkpoint: loops that write none keep their three-argument signature.
        metrics, history = prepared.loop(delta, tok, cfg, checkpoint) if checkpoint else prepared.loop(delta, tok, cfg)
        replacement.started()
    except BaseException:
        replacement.failed()
        raise
    delta.save_pretrained(out)
    tok.save_pretrained(out)
    report.write(out, recipe, metrics, history, prepared.notes, prepared.metric)
    return metrics


def _check_best_metric(cfg: RunConfig, prepared: Prepared) -> None:
    """A ``train.metric_for_best_model`` that a loss-only stage's evaluation does not report (perplexity, ROUGE: the
    final evaluation's only), or that a stage's compute_metrics does not, is one line before training, not after the
    first evaluation (trainer.py's)."""
    metric = cfg.train.metric_for_best_model
    if metric and prepared.loss_only and prepared.compute_metrics is None and metric.removeprefix("eval_") != "loss":
        raise ConfigError(f"train.metric_for_best_model is {metric!r}, which stage {cfg.stage}'s evaluation during "
                          "training does not report (the final evaluation adds its other metrics); it reports loss")  # fmt: skip
    types = None  # stage tag's per-type scores: of each type the eval rows' true tags hold (seqeval reports those)
    if cfg.stage == "tag" and cfg.data.return_entity_level_metrics and prepared.labels:
        # no eval rows: nothing is evaluated (the key is read by nothing), so every class's type passes, as before
        rows = prepared.eval or [{"labels": list(range(len(prepared.labels)))}]
        types = true_entity_types(rows, prepared.labels)
    check_best_metric(cfg, prepared.metric, moe_base, types)  # (a stage with compute_metrics: its keys)


def moe_base(cfg: RunConfig) -> bool:
    """Whether the base is a Mixture-of-Experts model whose load-balancing loss dpo and kto add, and report as
    aux_loss (``logprobs.router_aux_coef``); a base whose config does not load counts as one (its loader refuses it
    more clearly)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from .logprobs import router_aux_coef
    from .models import resolve_path

    try:
        config = AutoConfig.from_pretrained(resolve_path(cfg.model.name_or_path),
                                            trust_remote_code=cfg.model.trust_remote_code)  # fmt: skip
    except (OSError, ValueError):
        return True
    return router_aux_coef(SimpleNamespace(config=config)) > 0


def eval_metrics(trainer, delta, tok, prepared: Prepared, cfg: RunConfig) -> dict[str, Any]:
    """The final evaluation's metrics (eval_*), with the stage's generation metrics (seq2seq, caption)."""
    # Training that ended on an evaluation (the Trainer evaluates at the end of each epoch, and at the last step of
    # a run cut short by max_steps) already has the final weights' metrics: another pass would repeat them.
    # With load_best_model_at_end the weights are the best checkpoint's: its step's evaluation (not the last step's).
    best = trainer.state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    step = int(best.rsplit("-", 1)[1]) if best else trainer.state.global_step
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h and h.get("step") == step), None)
    # (evaluate()'s dict also holds the Trainer's num_input_tokens_seen, which log() adds to it: no eval_ metric)
    metrics = last if last is not None else trainer.evaluate()
    skip = ("_runtime", "_per_second", "epoch", "_preparation_time")
    metrics = {k: v for k, v in metrics.items() if k.startswith("eval_") and not k.endswith(skip)}
    if prepared.loss_only and "eval_loss" in metrics and TASK_OF_STAGE[cfg.stage] != "TEXT_TO_IMAGE":
        metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])  # of tokens: a denoising loss has none
    if prepared.eval_rows is not None and cfg.stage == "seq2seq":
        from .seq2seq import generation_metrics

        metrics.update(generation_metrics(delta, tok, prepared.eval_rows, cfg, cfg.train.eval_batch_size or 16))
    if cfg.stage == "caption":  # BLEU-4 and ROUGE-L of greedy captions
        from .caption import caption_metrics

        metrics.update(caption_metrics(delta, tok, prepared.eval, cfg.data.max_target_length))
    return metrics


def _recipe_dict(cfg: RunConfig) -> dict[str, Any]:
    """The recipe as run.yaml keeps it: local model and data paths absolute (eval, generate, chat, merge elsewhere)."""
    d = absolute_paths(asdict(cfg))
    return {
        "stage": d["stage"],
        "model": d["model"],
        "method": d["method"],
        "data": d["data"],
        "train": d["train"],
        "align": d["align"],
        "output": d["output"],
    }


def _check_packing(model: DeltaModel) -> None:
    """Packing relies on the model keeping packed examples apart given restarting position ids: check that it does,
    on a probe, instead of trusting every architecture and method. The base first, then with the adapter: a method
    that adds virtual tokens keeps them apart only for the first example of a pack (prompt kind), or puts them in
    a KV cache, with which transformers turns the packed-sequence masks off (prefix kind)."""
    base = model.get_base_model()
    if not _keeps_packed_apart(model, adapter=False):
        raise ConfigError(
            f"data.packing: model type {base.config.model_type!r} does not keep packed examples apart "
            "(its attention ignores restarting position ids); set data.packing=false"
        )
    if not _keeps_packed_apart(model, adapter=True):
        method = model.peft_config[model.active_adapter].method
        raise ConfigError(
            f"data.packing: method {method} does not keep packed examples apart (an example packed after another "
            "does not read as it does alone); set data.packing=false"
        )


def _keeps_packed_apart(model: DeltaModel, adapter: bool) -> bool:
    """Whether a second sequence packed after a first reads as it does alone. Its logits move by rounding only
    (about 1e-3 on SmolLM2's fp32 logits of up to 30, more in bf16); had it seen the first sequence they would move
    about as much as when it follows it with the positions running on, so the bound is relative to that."""
    base = model.get_base_model()
    vocab = base.config.vocab_size
    a, b = torch.arange(3, 8) % vocab, torch.arange(11, 15) % vocab
    both = torch.cat([a, b])[None]
    was_training = model.training
    model.eval()  # no dropout in the probe
    try:
        with torch.no_grad(), contextlib.nullcontext() if adapter else model.disable_adapter():
            alone = base(b[None]).logits[0, -len(b) :].float()
            restart = torch.tensor([[*range(len(a)), *range(len(b))]])
            packed = base(both, position_ids=restart).logits[0, -len(b) :].float()
            after = base(both).logits[0, -len(b) :].float()
    finally:
        model.train(was_training)
    return bool((packed - alone).abs().max() <= 0.05 * (after - alone).abs().max())
