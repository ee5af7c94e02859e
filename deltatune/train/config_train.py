"""The ``train`` section of a recipe: the loop's keys (steps, batch, optimizer, schedule, checkpoints) and their
checks.

Split from train/config.py (which re-exports every name here) when that file neared its line limit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from .config_align import _f
from .table import STAGES


@dataclass
class TrainArgs:
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    batch_size: int = _f(8, "Examples per device per step.")
    eval_batch_size: int | None = _f(None, "Examples per device per eval step (default: batch_size); seq2seq's "
                                     "generations (default: 16).")  # fmt: skip
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    lr: float = _f(2e-4, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW's beta1, as TrainingArguments' adam_beta1.")
    adam_beta2: float = _f(0.999, "AdamW's beta2, as TrainingArguments' adam_beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW's epsilon, as TrainingArguments' adam_epsilon.")
    scheduler: str = _f("linear", "LR schedule: linear, cosine, constant, constant_with_warmup, ...")
    lr_scheduler_kwargs: dict = _f({}, "The schedule's own settings, as TrainingArguments' lr_scheduler_kwargs "
                                   "(cosine_with_restarts: num_cycles; cosine_with_min_lr: min_lr or min_lr_rate; "
                                   "polynomial: power, lr_end; warmup_stable_decay: num_decay_steps).")  # fmt: skip
    warmup_ratio: float = _f(0.0, "Fraction of steps spent warming up.")
    warmup_steps: int | float = _f(0, "Warm-up steps (overrides warmup_ratio when > 0); a fraction < 1 is of the "
                                   "run's steps, as transformers 5's warmup_steps reads it (warmup_ratio's).")  # fmt: skip
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: no clipping).")
    seed: int = _f(42, "Seed for weights of new layers, data order and dropout.")
    data_seed: int | None = _f(None, "Seed of the random data order alone, as TrainingArguments' data_seed (default: "
                               "seed; the random order, and group_by_length's eval batches).")  # fmt: skip
    precision: str = _f("auto", "auto (bf16 on a CUDA GPU that has it, else fp32), fp32, bf16 or fp16.")
    logging_steps: int | float = _f(10, "Log loss and learning rate every N steps (a fraction < 1: of the run's "
                                    "steps, as the Trainer reads it).")  # fmt: skip
    logging_first_step: bool = _f(False, "Log the first step too, as TrainingArguments' logging_first_step.")
    eval_accumulation_steps: int | None = _f(None, "Move an evaluation's predictions off the GPU every N batches, as "
                                             "TrainingArguments' eval_accumulation_steps (null: at the end).")  # fmt: skip
    eval_steps: int | float | None = _f(None, "Evaluate data.eval every N steps (a fraction < 1: of the run's "
                                        "steps; default: at the end of each epoch).")  # fmt: skip
    save_steps: int | float | None = _f(None, "Checkpoint every N steps (a fraction < 1: of the run's steps; "
                                        "default: at the end of each epoch).")  # fmt: skip
    save_total_limit: int | None = _f(2, "Keep the last K checkpoints (null: keep every one, the Trainer's default); "
                                      "with early_stopping_patience or load_best_model_at_end the best evaluated "
                                      "one is kept too (at 1, once the run ends, only the best).")  # fmt: skip
    report_to: list = _f(["tensorboard"], "Loggers: tensorboard, none, or any the HF Trainer knows.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    train_sampling_strategy: str = _f("random", "The order of the training rows, as TrainingArguments' "
                                      "train_sampling_strategy: random, sequential (the data's order), "
                                      "group_by_length (transformers' LengthGroupedSampler: rows of like length in a "
                                      "batch; transformers 4's group_by_length) or batch_rebalance.")  # fmt: skip
    dataloader_drop_last: bool = _f(False, "Drop each epoch's last incomplete batch (TrainingArguments' key).")
    dataloader_pin_memory: bool = _f(True, "Pin the batches' memory for the GPU copy (TrainingArguments' key).")
    load_best_model_at_end: bool = _f(False, "After training, load the checkpoint with the best evaluation (kept by "
                                      "the rotation); the run's adapter is that one. Needs data.eval, and "
                                      "a checkpoint at each evaluation (save_steps equal to eval_steps, or both "
                                      "null: each epoch).")  # fmt: skip
    metric_for_best_model: str | None = _f(None, "The evaluation metric that picks the best checkpoint ('loss', "
                                           "'accuracy', ...; default: loss).")  # fmt: skip
    greater_is_better: bool | None = _f(None, "Whether a higher metric_for_best_model is better (default: false "
                                        "for a metric ending in loss, else true).")  # fmt: skip
    generation_max_new_tokens: int = _f(64, "seq2seq eval: tokens to generate per example.")
    generation_num_beams: int = _f(
        1, "seq2seq eval: beams per generation (run_summarization's --num_beams; 1: greedy)."
    )
    fsdp: str = _f("", "FSDP under torchrun/accelerate launch, e.g. 'full_shard auto_wrap' (empty: DDP when "
                   "launched).")  # fmt: skip
    fsdp_config: dict = _f({}, "FSDP options passed to the HF Trainer (e.g. {use_orig_params: true}).")
    optim_args: dict | str = _f({}, "train.optim's own settings, as TrainingArguments' optim_args ('k=v,k=v', or a "
                                "mapping): sgd momentum, dampening, nesterov; rmsprop momentum, alpha, eps, "
                                "centered; adagrad lr_decay, eps; ... (weight decay: train.weight_decay).")  # fmt: skip
    torch_empty_cache_steps: int | None = _f(None, "Empty the CUDA cache every this many steps, as TrainingArguments'"
                                             " (lowers peak memory, changes no result; null: never).")  # fmt: skip
    early_stopping_patience: int | None = _f(None, "Stop once this many evaluations in a row fail to improve on the "
                                             "best metric_for_best_model (default: loss), as transformers' "
                                             "EarlyStoppingCallback; needs data.eval (null: never).")  # fmt: skip
    early_stopping_threshold: float = _f(0.0, "How much an evaluation must improve on the best to count as better, "
                                         "as EarlyStoppingCallback's early_stopping_threshold.")  # fmt: skip
    eval_on_start: bool = _f(False, "Evaluate data.eval once before training too (the report shows before and after).")
    optim: str | None = _f(None, "Optimizer, by TrainingArguments' optim name (adamw_torch, sgd, adafactor, ...); "
                           "default: the Trainer's (adamw_torch_fused).")  # fmt: skip
    neftune_noise_alpha: float | None = _f(None, "pt, sft: NEFTune (Jain et al. 2023), uniform noise of this alpha "
                                           "on the input embeddings while training, as TrainingArguments' "
                                           "neftune_noise_alpha (5 is usual); null: off.")  # fmt: skip
    label_smoothing_factor: float | None = _f(None, "pt, sft, seq2seq: label smoothing of the token loss, as "
                                              "TrainingArguments' label_smoothing_factor (0.1 is usual); null: off.")  # fmt: skip
    sigma_sampling: str = _f("uniform", "t2i flow matching: how noise levels are drawn and weighted, diffusers' "
                             "--weighting_scheme: uniform (none), logit_normal, mode, sigma_sqrt, cosmap.")  # fmt: skip
    snr_gamma: float = _f(0.0, "t2i DDPM: min-SNR loss weighting with this gamma (Hang et al. 2023; diffusers' "
                          "--snr_gamma, 5 is usual); 0: unweighted.")  # fmt: skip
    noise_offset: float = _f(0.0, "t2i DDPM: offset noise, one N(0, 1) per image and channel times this (diffusers' "
                             "--noise_offset).")  # fmt: skip
    input_perturbation: float = _f(0.0, "t2i DDPM: extra input noise times this (diffusers' --input_perturbation).")
    logit_mean: float = _f(0.0, "t2i flow matching, sigma_sampling logit_normal: its mean (diffusers' --logit_mean).")
    logit_std: float = _f(1.0, "t2i flow matching, sigma_sampling logit_normal: its std (diffusers' --logit_std).")
    mode_scale: float = _f(1.29, "t2i flow matching, sigma_sampling mode: its scale (diffusers' --mode_scale).")
    precondition_outputs: bool = _f(False, "t2i flow matching: the loss on x0 = x_t - sigma v (diffusers' SD3 "
                                    "script's --precondition_outputs).")  # fmt: skip
    prediction_type: str | None = _f(None, "t2i DDPM: train against epsilon or v_prediction whatever the base's "
                                     "scheduler says (diffusers' --prediction_type); null: the scheduler's.")  # fmt: skip
    with_prior_preservation: bool = _f(False, "t2i: DreamBooth's prior preservation with data.class_data_dir and "
                                       "data.class_prompt (diffusers' --with_prior_preservation).")  # fmt: skip
    prior_loss_weight: float = _f(1.0, "t2i prior preservation: the class images' loss weight (diffusers' "
                                  "--prior_loss_weight).")  # fmt: skip
    use_ema: bool = _f(False, "t2i: a moving average of the trained weights, saved at the end (diffusers' --use_ema).")
    ema_decay: float = _f(0.9999, "t2i EMA: the largest decay per step (diffusers' EMAModel decay).")
    use_ema_warmup: bool = _f(False, "t2i EMA: the decay 1 - (1 + j / ema_inv_gamma)^-ema_power at step j, at most "
                              "ema_decay (diffusers' EMAModel use_ema_warmup).")  # fmt: skip
    ema_inv_gamma: float = _f(1.0, "t2i EMA warm-up: EMAModel's inv_gamma (train_unconditional's --ema_inv_gamma).")
    ema_power: float = _f(2 / 3, "t2i EMA warm-up: EMAModel's power (train_unconditional's --ema_power).")
    ema_min_decay: float = _f(0.0, "t2i EMA: the smallest decay of a step that averages (EMAModel's min_decay).")
    ema_update_after_step: int = _f(0, "t2i EMA: the average copies the weights through step this + 1, then "
                                    "averages (EMAModel's update_after_step).")  # fmt: skip
    validation_prompt: str | None = _f(None, "t2i: draw images of this prompt during training (diffusers' "
                                       "--validation_prompt).")  # fmt: skip
    num_validation_images: int = _f(4, "t2i validation: images per drawing (diffusers' --num_validation_images).")
    validation_epochs: int = _f(1, "t2i validation: draw every this many epochs (diffusers' --validation_epochs).")


# The learning-rate schedules of transformers' SchedulerType, spelled out so that validating a recipe imports no
# transformers; tests/reliability/test_bad_inputs.py checks the list against the installed transformers.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")  # fmt: skip
NEEDS_KWARGS = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
"""Schedules transformers builds only with scheduler kwargs (min_lr, num_decay_steps): train.lr_scheduler_kwargs."""
ON_EVAL = ("reduce_lr_on_plateau", "greedy")
"""Schedules that step on the eval loss (the Trainer steps them after each evaluation)."""

FSDP_OPTIONS = {"full_shard", "shard_grad_op", "no_shard", "hybrid_shard", "hybrid_shard_zero2", "offload",
                "auto_wrap"}  # fmt: skip


def validate_train(cfg: Any) -> None:
    """The ``train`` keys a Trainer would otherwise refuse deep inside, or accept and ignore: the schedule and its
    kwargs, the step counts (a fraction < 1 is of the run's steps), AdamW's settings, and the best-checkpoint keys."""
    t, loop = cfg.train, STAGES[cfg.stage].loop
    if t.scheduler not in SCHEDULERS:
        raise ConfigError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}, got {t.scheduler!r}")
    if t.scheduler in ON_EVAL and (not has_eval(cfg) or loop):  # (the Trainer's ValueError without an evaluation)
        raise ConfigError(f"train.scheduler={t.scheduler} steps on the eval loss: it needs data.eval, and a stage "
                          f"the Trainer runs (not ppo or grpo){held_out_note(cfg)}")  # fmt: skip
    if loop and (t.lr_scheduler_kwargs or t.scheduler in NEEDS_KWARGS):  # (its loop builds the schedule without them)
        raise ConfigError(f"train.lr_scheduler_kwargs: {cfg.stage}'s own loop builds its schedule without kwargs; "
                          f"drop them, and use a schedule that needs none")  # fmt: skip
    if t.lr_scheduler_kwargs or t.scheduler in NEEDS_KWARGS:
        _check_schedule(t.scheduler, t.lr_scheduler_kwargs, t.lr)
    for key, default in (("adam_beta1", 0.9), ("adam_beta2", 0.999), ("adam_epsilon", 1e-8)):
        value = getattr(t, key)
        if not (0.0 <= value < 1.0 if key != "adam_epsilon" else value >= 0.0):
            raise ConfigError(f"train.{key} must be {'>= 0' if key == 'adam_epsilon' else 'in [0, 1)'}, got {value}")
        if loop and value != default:  # (its loop's AdamW takes torch's defaults)
            raise ConfigError(f"train.{key}: {cfg.stage}'s own loop runs torch's AdamW with its defaults; drop it")
    if t.data_seed is not None and not 0 <= t.data_seed < 2**32:  # numpy's range, as train.seed
        raise ConfigError(f"train.data_seed must be in [0, 2**32) (or null: train.seed), got {t.data_seed}")
    if t.data_seed is not None and loop:  # (their loops draw the prompt order from train.seed)
        raise ConfigError(f"train.data_seed: {cfg.stage}'s own loop orders its prompts by train.seed; drop it")
    for key in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(t, key)
        if value is None:
            continue
        if value <= 0:  # (a fraction in (0, 1) is of the run's steps: docs/training.md)
            null = "" if key == "logging_steps" else " (or null: the default)"
            raise ConfigError(f"train.{key} must be >= 1{null}, got {value}")
        if value > 1 and value != int(value):  # (the Trainer refuses it too, as a traceback)
            raise ConfigError(f"train.{key} must be a whole number when over 1 (a fraction only below 1), got {value}")
        if value < 1 and loop and key == "save_steps":  # (ppo's and grpo's loops count their own steps)
            raise ConfigError(f"train.save_steps: {cfg.stage}'s own loop takes a whole number of steps, got {value}")
        setattr(t, key, int(value) if value >= 1 else float(value))
    _check_warmup(t)
    _check_sampling(cfg)
    if not loop and (t.optim or "").startswith(("galore_", "apollo_")):  # (the Trainer's ValueError, model loaded)
        raise ConfigError(f"train.optim {t.optim} trains the modules named by TrainingArguments' optim_target_modules, "
                          f"which a recipe does not take; use another train.optim")  # fmt: skip
    _check_optim_args(cfg)
    if t.torch_empty_cache_steps is not None and (t.torch_empty_cache_steps < 1 or loop):
        raise ConfigError(f"train.torch_empty_cache_steps: {cfg.stage}'s own loop never empties the cache; drop it"
                          if loop else f"train.torch_empty_cache_steps must be >= 1 (or null: never), got "
                          f"{t.torch_empty_cache_steps}")  # fmt: skip
    if t.eval_accumulation_steps is not None and t.eval_accumulation_steps < 1:
        raise ConfigError(f"train.eval_accumulation_steps must be >= 1 (or null), got {t.eval_accumulation_steps}")
    if t.metric_for_best_model is not None and not t.metric_for_best_model.strip():
        raise ConfigError("train.metric_for_best_model is empty; name an evaluation metric (loss, accuracy, ...) or "
                          "drop it (default: loss)")  # fmt: skip
    if t.load_best_model_at_end:
        _check_best(cfg)
    _check_early_stopping(cfg)


def _check_early_stopping(cfg: Any) -> None:
    """``early_stopping_patience`` and ``_threshold``, as transformers' EarlyStoppingCallback takes them: a count of
    evaluations >= 1 and a threshold >= 0, on a Trainer stage with data.eval (the callback's assertions came as a
    traceback when training started; a threshold without patience was silently unused)."""
    t = cfg.train
    patience, threshold = t.early_stopping_patience, t.early_stopping_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ConfigError(f"train.early_stopping_threshold must be a number >= 0, got {threshold!r}")
    if patience is None:
        if threshold:
            raise ConfigError("train.early_stopping_threshold is read only with train.early_stopping_patience; set "
                              "it, or drop the threshold")  # fmt: skip
        return
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ConfigError(f"train.early_stopping_patience must be a whole number >= 1 (or null: never), got "
                          f"{patience!r}")  # fmt: skip
    if STAGES[cfg.stage].loop or not has_eval(cfg):
        why = f"{cfg.stage}'s own loop never stops early" if STAGES[cfg.stage].loop else "data.eval is not set"
        raise ConfigError(f"train.early_stopping_patience stops when the evaluation stops improving, but {why}"
                          f"{held_out_note(cfg)}; drop it")  # fmt: skip


HOLDS_OUT = ("cls", "tag", "seq2seq", "image_cls", "caption")
"""The stages that hold data.val_size of data.train out as their eval set: config_read.READ_BY's readers of the key
(tests/test_trainer_probe20.py checks they agree; config_read imports this module, so it is not read from there)."""


def has_eval(cfg: Any) -> bool:
    """Whether the Trainer evaluates: data.eval, or data.val_size on a stage that holds those rows out of data.train
    (``HOLDS_OUT``); any other stage ignores data.val_size and evaluates nothing."""
    return bool(cfg.data.eval or (cfg.data.val_size and cfg.stage in HOLDS_OUT))


def held_out_note(cfg: Any) -> str:
    """Why data.val_size is no eval set here, when it is set: its stage holds no rows out."""
    if not cfg.data.val_size or cfg.data.eval or STAGES[cfg.stage].loop:
        return ""
    return f" (stage {cfg.stage} holds no data.val_size rows out: only {', '.join(HOLDS_OUT)} do)"


def check_loss_direction(cfg: Any) -> None:
    """``greater_is_better: true`` under early stopping where the best is picked by the loss (metric_for_best_model
    loss or eval_loss, or unset: run.py's default): transformers' callback counts a rising loss as better, so a run
    whose loss fell stopped after ``patience`` evaluations. (load_best_model_at_end takes it: test_trainer_probe12
    keeps the worst checkpoint with it on purpose.)"""
    t = cfg.train
    metric = t.metric_for_best_model or "loss"
    if t.early_stopping_patience and t.greater_is_better and metric.removeprefix("eval_") == "loss":
        raise ConfigError(f"train.greater_is_better is true, but the best evaluation is picked by its loss "
                          f"(train.metric_for_best_model {metric!r}), which is better lower; drop greater_is_better "
                          f"(or set it false)")  # fmt: skip


def _check_warmup(t: TrainArgs) -> None:
    """A ``warmup_steps`` fraction, as transformers 5 reads it (it folded warmup_ratio into warmup_steps): kept as
    train.warmup_ratio, which every stage's loop reads; over 1 a whole number, as for the other step counts."""
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if t.warmup_steps > 1 and t.warmup_steps != int(t.warmup_steps):  # (the Trainer would cut 1.5 to 1 silently)
        raise ConfigError(f"train.warmup_steps must be a whole number when over 1 (a fraction only below 1), got "
                          f"{t.warmup_steps}")  # fmt: skip
    if 0 < t.warmup_steps < 1:
        if t.warmup_ratio:
            raise ConfigError(f"train.warmup_steps {t.warmup_steps} is a fraction of the run's steps, as "
                              f"train.warmup_ratio ({t.warmup_ratio}) is: give one of them")  # fmt: skip
        t.warmup_ratio, t.warmup_steps = float(t.warmup_steps), 0
    t.warmup_steps = int(t.warmup_steps)


SAMPLING = ("random", "sequential", "group_by_length", "batch_rebalance")  # (TrainingArguments' choices)
BY_LENGTH = ("pt", "sft", "cls", "tag", "seq2seq")
"""The stages whose training rows hold ``input_ids``, which the Trainer's length samplers count a row's length by."""


def _check_sampling(cfg: Any) -> None:
    """``train_sampling_strategy``: one of the Trainer's; the length samplers only where the Trainer can count a row's
    length (a pair row's tokens are under chosen and rejected: its ValueError came when training started). Stage kto
    takes them all: its KL term pairs each row with another row of its batch (or of its block, precomputed), which
    random and group_by_length keep mismatched, sequential only where adjacent rows have different prompts (a paired
    set made unpaired, each prompt's two rows side by side, pairs half its rows with their own prompt). TRL's
    KTOTrainer takes only sequential for its KL losses, as it pairs the rows ahead, and its group_by_length fails on
    its rows (prompt_ids and completion_ids, no input_ids). A stage with its own loop orders its prompts by
    train.seed. data_seed beside sequential or batch_rebalance: checks.check_run."""
    t, stage = cfg.train, cfg.stage
    if t.train_sampling_strategy not in SAMPLING:
        raise ConfigError(f"train.train_sampling_strategy must be one of {', '.join(SAMPLING)}, got "
                          f"{t.train_sampling_strategy!r}")  # fmt: skip
    if t.train_sampling_strategy == "random":
        return
    if STAGES[stage].loop:
        trl = " (TRL's GRPOConfig.shuffle_dataset: false, which deltatune's loop does not take)" * (stage == "grpo")
        raise ConfigError(f"train.train_sampling_strategy: {stage}'s own loop draws its prompts by train.seed"
                          f"{trl}; drop it")  # fmt: skip
    if t.train_sampling_strategy in ("group_by_length", "batch_rebalance") and stage not in (*BY_LENGTH, "kto"):
        raise ConfigError(f"train.train_sampling_strategy {t.train_sampling_strategy} groups rows by their input_ids' "
                          f"length, and stage {stage}'s rows have none (the Trainer's ValueError, as under TRL); "
                          f"stages: {', '.join(BY_LENGTH)}, kto")  # fmt: skip


_ADEMAMIX = ("beta1", "beta2", "beta3", "alpha", "eps", "t_alpha", "t_beta3")
OPTIM_ARGS = {  # the optim_args keys transformers 5's trainer_optimizer.py reads, by train.optim (weight_decay aside;
    # galore_* and apollo_* are refused in validate_train, where a Trainer stage names them)
    "sgd": ("momentum", "dampening", "nesterov"), "adagrad": ("lr_decay", "eps"),
    "rmsprop": ("momentum", "alpha", "eps", "centered"), "stable_adamw": ("max_lr", "kahan_sum", "decouple_lr"),
    "adamw_anyprecision": ("use_kahan_summation", "momentum_dtype", "variance_dtype", "compensation_buffer_dtype"),
    "grokadamw": ("alpha_init", "lamb", "gamma", "grokking_signal_decay_rate", "gradient_clipping"),
    **dict.fromkeys(("adamw_torch_4bit", "adamw_torch_8bit"), ("block_size", "bf16_stochastic_round")),
    **dict.fromkeys(("ademamix", "ademamix_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit"), _ADEMAMIX),
    **dict.fromkeys(("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd"), ("weight_lr_power", "r")),
}  # fmt: skip


def optim_args(t: TrainArgs) -> dict[str, str]:
    """``train.optim_args`` as a mapping of text, as the Trainer parses its "k=v,k=v" string (a bool as true/false)."""
    given = t.optim_args
    if isinstance(given, str):
        pairs = [p.split("=", 1) for p in given.replace(" ", "").split(",") if p]
        if any(len(p) != 2 or not p[0] for p in pairs):
            raise ConfigError(f"train.optim_args must be 'key=value,key=value' (or a mapping), got {given!r}")
        return dict(pairs)
    text = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in given.items()}
    for k, v in text.items():  # (the Trainer splits its "k=v,k=v" string on them)
        if any(c in k + v for c in ",="):
            raise ConfigError(f"train.optim_args: {k}: {v!r} holds ',' or '=', which the Trainer's 'k=v,k=v' "
                              f"cannot carry")  # fmt: skip
    return text


def _check_optim_args(cfg: Any) -> None:
    """Each ``train.optim_args`` key one the chosen optimizer reads: the Trainer ignores any other, silently."""
    t = cfg.train
    given = optim_args(t)
    if not given:
        return
    if STAGES[cfg.stage].loop:
        raise ConfigError(f"train.optim_args: {cfg.stage}'s own loop runs torch's AdamW with its defaults; drop it")
    name = t.optim or "adamw_torch_fused"
    reads = OPTIM_ARGS.get(name, ())
    for key, value in given.items():
        if key == "weight_decay":  # (the Trainer ignores it: each of its param groups sets its own weight_decay)
            raise ConfigError("train.optim_args: weight_decay is train.weight_decay's (the Trainer's decay groups); "
                              "set train.weight_decay")  # fmt: skip
        if name.startswith("rmsprop_bnb"):  # (the Trainer hands optim_args to bitsandbytes' RMSprop as kwargs)
            raise ConfigError(f"train.optim_args: the Trainer passes {key!r} to train.optim {name}'s RMSprop as text, "
                              f"which its numbers cannot take; drop optim_args")  # fmt: skip
        if key == "block_size" and name in ("adamw_torch_4bit", "adamw_torch_8bit"):  # (a TypeError in step)
            raise ConfigError(f"train.optim_args: the Trainer passes block_size to torchao's {name} as text "
                              f"({value!r}), which it cannot use; drop it (torchao's 256)")  # fmt: skip
        if key not in reads:
            known = f"it reads {', '.join(reads)}" if reads else "it reads none"
            raise ConfigError(f"train.optim_args: {key!r} is not read by train.optim {name}'s optimizer (the "
                              f"Trainer would ignore it); {known}")  # fmt: skip
        if key in ("nesterov", "centered") and value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"train.optim_args: {key} must be true or false, got {value!r}")
        if key in ("decouple_lr", "kahan_sum") and value.lower() not in ("true", "1", "yes"):  # (bool("false"))
            raise ConfigError(f"train.optim_args: {key} {value!r} would turn it on (the Trainer takes any text as "
                              f"true); only leaving {key} out turns it off")  # fmt: skip
        if key in ("momentum", "dampening", "lr_decay", "eps", "alpha") and name in ("sgd", "adagrad", "rmsprop"):
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not math.isfinite(number):  # (nan passes torch's range checks, and the weights go nan)
                raise ConfigError(f"train.optim_args: {key} must be a number, got {value!r}")
    if name in ("sgd", "adagrad", "rmsprop"):
        _check_torch_optim(name, given, t.lr)


_BNB = ("is_bitsandbytes_available", "bitsandbytes", "bitsandbytes>=0.46.1")
_SF = ("is_schedulefree_available", "schedulefree", "schedulefree>=1.2.6")
OPTIM_PACKAGES = {  # a train.optim whose package transformers 5's trainer_optimizer.py checks (or imports): the check
    # (a transformers.utils.import_utils helper, which holds its minimum version, else the module), pip's name for it
    **dict.fromkeys(("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "ademamix",
                     "ademamix_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "lion_8bit", "lion_32bit",
                     "paged_lion_32bit", "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"),
                    _BNB),
    **dict.fromkeys(("lomo", "adalomo"), ("is_lomo_available", "lomo_optim", "lomo-optim")),
    "grokadamw": ("is_grokadamw_available", "grokadamw", "grokadamw"),
    **dict.fromkeys(("adamw_torch_4bit", "adamw_torch_8bit"), ("is_torchao_available", "torchao", "torchao>=0.15.0")),
    "schedule_free_adamw": _SF, "schedule_free_sgd": _SF,
    "schedule_free_radam": ("is_schedulefree_available:1.4.0", "schedulefree", "schedulefree>=1.4.0"),
    "stable_adamw": ("is_torch_optimi_available", "optimi", "torch-optimi"),
    "adamw_anyprecision": (None, "torchdistx", "torchdistx"), "adamw_torch_xla": (None, "torch_xla", "torch_xla"),
    "adamw_torch_npu_fused": (None, "torch_npu", "torch_npu"),
}  # fmt: skip


def check_optim_package(cfg: Any) -> None:
    """A ``train.optim`` whose package is not installed, or older than transformers needs (its own ``is_*_available``
    helper, as the Trainer asks it): one line naming the key and the package, where a training run starts
    (``checks.check_run``; a finished run's run.yaml still loads without it), not the Trainer's ImportError after the
    model has loaded."""
    import importlib.util

    helper, module, package = OPTIM_PACKAGES.get(cfg.train.optim or "", (None, None, None))
    if module is None or STAGES[cfg.stage].loop:
        return
    if helper is not None:
        from transformers.utils import import_utils

        name, _, least = helper.partition(":")
        if getattr(import_utils, name)(*[least] * bool(least)):
            return
    elif importlib.util.find_spec(module) is not None:
        return
    older = " (or is older)" * (">=" in package)
    raise ConfigError(f"train.optim {cfg.train.optim} needs the package {package}, which is not installed here"
                      f"{older}: pip install -U '{package}', or use another train.optim")  # fmt: skip


def _check_torch_optim(name: str, given: dict[str, str], lr: float) -> None:
    """Build torch's optimizer once on a throwaway parameter with ``optim_args`` read as transformers 5 reads them
    (``trainer_optimizer._get_sgd`` ...), so a value torch refuses (a negative momentum, nesterov without momentum)
    is one line naming the key here rather than torch's ValueError when training starts."""
    import torch

    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}[name]
    kwargs: dict[str, Any] = {k: float(v) for k, v in given.items() if k not in ("nesterov", "centered")}
    kwargs.update({k: given[k].lower() in ("true", "1", "yes") for k in ("nesterov", "centered") if k in given})
    lr = lr if isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0 else 1e-3  # (train.lr's own check)
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"train.optim_args {given} for train.optim {name}: torch's {cls.__name__} refuses them: "
            f"{' '.join(str(exc).split())}"
        ) from None


def _check_best(cfg: Any) -> None:
    """``load_best_model_at_end``: the Trainer keeps the best evaluation's checkpoint only if that step wrote one (else
    its best_model_checkpoint stays None and the run ends with the last step's adapter, silently), and its own check
    wants each checkpoint on an evaluation: both hold with checkpoints on exactly the evaluation steps."""
    t = cfg.train
    if STAGES[cfg.stage].loop or not (cfg.data.eval or cfg.data.val_size):
        why = f"{cfg.stage}'s own loop keeps no best checkpoint" if STAGES[cfg.stage].loop else "data.eval is not set"
        raise ConfigError(f"train.load_best_model_at_end picks the checkpoint with the best evaluation, but {why}; "
                          "drop it")  # fmt: skip
    if t.eval_steps != t.save_steps:  # (null: both each epoch; a fraction is of the same step count)
        raise ConfigError(f"train.load_best_model_at_end needs a checkpoint at each evaluation: train.save_steps "
                          f"({t.save_steps}) must equal train.eval_steps ({t.eval_steps}), or both be null (each "
                          "epoch)")  # fmt: skip


def _check_schedule(name: str, kwargs: dict, lr: float = 1e-3) -> None:
    """Build the schedule once on a throwaway optimizer at the run's ``lr`` (polynomial's ``lr_end`` is checked
    against train.lr, not 1e-3), so a missing, unknown or bad ``lr_scheduler_kwargs`` key is one line naming it here
    rather than a traceback when training starts. Built, not stepped: a value read only after warm-up is
    check_schedule_floor's, where a run starts (a finished run that never left warm-up still loads)."""
    if kwargs and name in ("constant", "constant_with_warmup"):  # (transformers passes them none: silently unused)
        raise ConfigError(f"train.lr_scheduler_kwargs: the {name} schedule takes none, got {sorted(kwargs)}")
    if name in NEEDS_KWARGS and not kwargs:
        need = "num_decay_steps" if name == "warmup_stable_decay" else "min_lr or min_lr_rate"
        raise ConfigError(f"train.scheduler={name} needs train.lr_scheduler_kwargs ({need}), e.g. "
                          f"train.lr_scheduler_kwargs={{{need.split()[0]}: ...}}")  # fmt: skip
    _schedule_rates(name, kwargs, lr, steps=0)


def _schedule_rates(name: str, kwargs: dict, lr: float, warmup: int = 1, steps: int = 10) -> list[float]:
    """The rate before and after each of ``steps`` steps (``warmup`` of them warming up) of transformers' schedule at
    ``lr``, as the Trainer's optimizer sees them; none for the schedules that step on an eval metric. Its errors are
    one line naming train.lr_scheduler_kwargs."""
    import torch
    from transformers import get_scheduler

    lr = lr if isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0 else 1e-3  # (train.lr's own check)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    rates = []
    try:
        with warnings.catch_warnings():  # (its warnings come again when the run builds the schedule)
            warnings.simplefilter("ignore")
            schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=10,
                                     scheduler_specific_kwargs=kwargs)  # fmt: skip
            for step in range((steps + 1) * (name not in ON_EVAL)):
                rates.append(optimizer.param_groups[0]["lr"])  # (the first: the rate of the first step)
                if step < steps:
                    optimizer.step()
                    schedule.step()
            if steps and name not in ON_EVAL and hasattr(schedule, "lr_lambdas"):  # a floor reached only past the
                rates.append(lr * schedule.lr_lambdas[0](10**9))  # throwaway's 10 steps (warmup_stable_decay's stable)
    except (TypeError, ValueError, ArithmeticError) as exc:
        why = " ".join(str(exc).split()).replace("through the `lr_scheduler_kwargs`", "")
        raise ConfigError(f"train.lr_scheduler_kwargs {kwargs} for the {name} schedule: {why}") from None
    return rates


def check_schedule_floor(cfg: Any) -> None:
    """The schedule stepped through a throwaway run of 10 steps, warming up if the run does: a value read only after
    warm-up (cosine_with_restarts' ``num_cycles: a``, inverse_sqrt's ``timescale: 0``: a traceback at the Trainer's
    first step past it), and a rate above the peak (``min_lr`` over train.lr, ``min_lr_rate``, ``min_lr_ratio`` over
    1, cosine_warmup_with_min_lr's ``warmup_lr_rate`` over 1), which transformers takes silently (cosine_with_min_lr's
    min_lr 1e-3 under lr 2e-4 ends at 5x the peak). Checked where a training run starts (``checks.check_run``), not
    in build(): a finished run's run.yaml from before (or one that never left warm-up) still loads."""
    t = cfg.train
    if not t.lr_scheduler_kwargs or STAGES[cfg.stage].loop:
        return
    warmup = int(bool(t.warmup_steps or t.warmup_ratio))
    rates = _schedule_rates(t.scheduler, t.lr_scheduler_kwargs, t.lr, warmup=warmup)
    if any(rate > t.lr * (1 + 1e-6) for rate in rates):
        raise ConfigError(f"train.lr_scheduler_kwargs {t.lr_scheduler_kwargs} for the {t.scheduler} schedule: the "
                          f"learning rate would climb above train.lr ({t.lr:g}) to {max(rates):g}; a floor (min_lr, "
                          f"min_lr_rate, min_lr_ratio) or a warm-up start (warmup_lr_rate) must lie below the peak")  # fmt: skip


_PAIR = ("accuracy", "margin", "margin_se", "sign_p")  # pairs.pair_metrics
_REWARDS = ("reward_chosen", "reward_rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies")  # fmt: skip
EVAL_METRICS = {
    ("cls", "eval_accuracy"): ("accuracy", "f1", "matthews_correlation"),
    ("cls", "eval_pearson"): ("pearson", "spearmanr", "combined_score", "mse"),
    ("cls", "eval_f1_micro"): ("f1_micro", "f1_macro", "subset_accuracy"),
    ("tag", "eval_f1"): ("f1", "precision", "recall", "accuracy"),
    ("image_cls", "eval_accuracy"): ("accuracy", "macro_f1"),
    ("rm", "eval_accuracy"): _PAIR,
    **{(stage, "eval_accuracy"): _PAIR + _REWARDS for stage in ("dpo", "orpo", "simpo", "cpo")},
    ("kto", "eval_margin"): ("reward_desirable", "reward_undesirable", "margin", "rewards/chosen", "rewards/rejected",
                             "rewards/margins"),
}  # fmt: skip
"""(stage, its headline metric) -> what the stage's compute_metrics reports at each evaluation, besides the loss and
the Trainer's timings (tests/test_trainer_probe14.py checks each against the stage's function). A stage not here is
checked at its first evaluation (trainer.py)."""
_SIDES = ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
EVAL_STATS = {
    "dpo": (*_SIDES, "entropy", "mean_token_accuracy"),
    "orpo": (*_SIDES, "nll", "nll_loss", "log_odds_ratio", "log_odds_chosen"),
    "simpo": (*_SIDES, "nll_loss"),
    "cpo": (*_SIDES, "nll_loss"),
    "kto": (*_SIDES, "kl", "entropy"),
}
"""What the preference stages' trainers add to each evaluation besides compute_metrics' (``pairs.EvalStats``: their
training log's names, as TRL's evaluations report them; a Mixture-of-Experts base's aux_loss too: run.moe_base).
dpo's and kto's num_tokens, which they report too, is no metric to keep a best checkpoint by: the training tokens so
far, it only grows (and restarts at 0 on --resume, as TRL's)."""
PAIRED = ("gained", "lost", "paired_p")
"""What the pair stages' trainers (pairs.PairTrainer) add to each evaluation after one before training
(train.eval_on_start)."""
TIMINGS = ("runtime", "samples_per_second", "steps_per_second")


def check_best_metric(
    cfg: Any, headline: str | None, moe_base: Callable[[Any], bool] | None = None, types: list[str] | None = None
) -> None:
    """A ``train.metric_for_best_model`` that the stage's evaluation during training does not report: one line naming
    the key and the metrics it does report, before the model loads (the Trainer's KeyError came at the first
    evaluation). ``headline`` is the stage's ``Prepared.metric``; ``moe_base(cfg)``: whether the base is a
    Mixture-of-Experts model (run.moe_base, which reads its config), asked only for an aux_loss metric; ``types``: the
    entity types the eval rows' true tags hold (metrics.true_entity_types), whose per-type scores stage tag reports
    at every evaluation under data.return_entity_level_metrics (run_ner's ``<type>_f1``, ...). Also
    load_best_model_at_end where the Trainer evaluates nothing (data.val_size on a stage that holds no rows out:
    run.py turned it off silently), here where a run starts: such a finished run's run.yaml still loads."""
    if cfg.train.load_best_model_at_end and not has_eval(cfg):
        raise ConfigError(f"train.load_best_model_at_end picks the checkpoint with the best evaluation, but data.eval "
                          f"is not set{held_out_note(cfg)}; drop it")  # fmt: skip
    metric = cfg.train.metric_for_best_model
    reported = EVAL_METRICS.get((cfg.stage, headline))
    if not metric or reported is None:
        return
    reported = reported + EVAL_STATS.get(cfg.stage, ())
    if cfg.stage in ("dpo", "kto") and metric.removeprefix("eval_") == "aux_loss" and moe_base and moe_base(cfg):
        reported = reported + ("aux_loss",)
    if cfg.train.eval_on_start and cfg.stage in ("rm", "dpo", "orpo", "simpo", "cpo"):
        reported = reported + PAIRED
    kind, _, score = metric.removeprefix("eval_").rpartition("_")
    if cfg.stage == "tag" and cfg.data.return_entity_level_metrics and types is not None and kind:
        rows = "held out by data.val_size" if not cfg.data.eval else "data.eval"
        if score == "number":  # (seqeval's support: a count, not a score)
            raise ConfigError(f"train.metric_for_best_model is {metric!r}, the number of {kind} entities in the eval "
                              f"rows: the same at every evaluation, no score to keep a checkpoint by; name {kind}_f1, "
                              f"{kind}_precision or {kind}_recall (a run resumed with it: with --resume-changed)")  # fmt: skip
        if score in ("precision", "recall", "f1") and kind not in (*types, "overall"):  # (run_ner's overall_f1: f1)
            raise ConfigError(f"train.metric_for_best_model is {metric!r}, but the eval rows ({rows}) hold no {kind} "
                              "entity: seqeval reports a type's scores only at an evaluation whose true or predicted "
                              "tags hold one, so the first evaluation without one would stop the run; the eval rows "
                              f"hold {', '.join(types) or 'no entity'}")  # fmt: skip
        reported = reported + tuple(f"{k}_{n}" for k in types for n in ("precision", "recall", "f1"))
    if metric.removeprefix("eval_") not in ("loss", *reported, *TIMINGS):
        raise ConfigError(f"train.metric_for_best_model is {metric!r}, which stage {cfg.stage}'s evaluation does not "
                          f"report; it reports loss, {', '.join(reported)}")  # fmt: skip


UNBUILT = {k: f"{k} (TrainingArguments') is not a recipe key: {v}" for k, v in (
    ("logging_strategy", "train.logging_steps sets the steps between logs (a fraction < 1: of the run's steps)"),
    ("save_only_model", "a checkpoint keeps the optimizer, schedule and RNG states, which --resume reads; drop it"),
    ("group_by_length", "transformers 5 names it train_sampling_strategy: set train.train_sampling_strategy: "
     "group_by_length"),
    ("length_column_name", "each row's length is counted from its input_ids (deltatune's rows keep no other column, "
     "as the Trainer counts them without one); drop it"),
    ("include_num_input_tokens_seen", "every text stage counts its non-padding tokens (num_input_tokens_seen in "
     "the log); drop it"),
    ("average_tokens_across_devices", "a step's loss is a mean over every process's label tokens (the Trainer's "
     "default, true); drop it"))}  # fmt: skip
"""TrainingArguments keys a recipe does not take, each with why: the unknown-key error names it (config.HF_NAMES)."""
