"""Which stage reads which recipe key: ``READ_BY`` and ``ignored_keys``, the keys a run names as set but not read;
``validate_model``, the ``model`` keys transformers' from_pretrained reads; ``load_args`` / ``check_load``, their
refusals made before the data is prepared (``hub_revision``: a revision on a local folder)
(split off train/config.py in session 55 when it reached its line limit; ``cfg`` is a config.RunConfig, not imported:
config.py imports this module)."""

from __future__ import annotations

import os
from typing import Any

from ..config import ConfigError
from . import embedded
from .config_train import ON_EVAL, TrainArgs
from .table import STAGES

# Keys that only some stages read: (those stages, the keys). Any other stage ignores them; ``ignored_keys`` names them.
READ_BY = (("sft", "data.packing data.mask_history data.train_on_prompt"), ("pt sft", "train.neftune_noise_alpha"), ("pt sft seq2seq", "train.label_smoothing_factor"),
           (" ".join(k for k, s in STAGES.items() if not s.loop),  # (the Trainer's stages)
            "train.optim train.dataloader_drop_last train.dataloader_pin_memory train.metric_for_best_model "
            "train.greater_is_better train.logging_first_step train.eval_accumulation_steps"), ("cls", "data.text_pair_column data.multi_label"), ("cls tag seq2seq image_cls caption", "data.val_size"), ("tag", "data.tokens_column data.tags_column data.label_all_tokens data.return_entity_level_metrics"),
           ("seq2seq", "data.source_column data.target_column data.source_prefix train.generation_max_new_tokens train.generation_num_beams"),
           ("seq2seq caption", "data.max_target_length"), ("image_cls t2i", "data.augment"),
           ("cls tag rm image_cls", "model.num_labels"),
           ("t2i", "model.text_encoder model.train_text_encoder train.sigma_sampling train.snr_gamma train.noise_offset "
                   "train.input_perturbation train.logit_mean train.logit_std train.mode_scale "
                   "train.precondition_outputs data.image_interpolation_mode data.proportion_empty_prompts "
                   "train.prediction_type train.with_prior_preservation train.prior_loss_weight data.class_data_dir "
                   "data.class_prompt data.num_class_images train.use_ema train.ema_decay train.use_ema_warmup "
                   "train.ema_inv_gamma train.ema_power train.ema_min_decay train.ema_update_after_step train.validation_prompt "
                   "train.num_validation_images train.validation_epochs"),
           ("pt sft dpo kto orpo simpo cpo", "output.samples output.sample_tokens"),  # (ppo's, grpo's loops write none)
           ("dpo grpo kto orpo simpo cpo", "align.beta"),
           ("dpo kto grpo simpo cpo", "align.loss_type"),
           ("dpo", "align.loss_weights align.discopop_tau align.ld_alpha align.f_divergence_type "
                   "align.f_alpha_divergence_coef align.use_weighting"),
           ("dpo kto", "align.precompute_ref align.precompute_ref_log_probs align.precompute_ref_batch_size"),
           ("dpo kto orpo simpo cpo rm", "align.disable_dropout"),
           ("dpo simpo cpo", "align.label_smoothing"),
           ("ppo grpo", "align.max_new_tokens align.response_length align.temperature align.mini_batch_size "
                        "align.cliprange"),
           ("ppo", "align.reward_model align.ppo_epochs align.cliprange_value align.vf_coef align.gamma align.lam "
                   "align.init_kl_coef align.adaptive_kl align.target_kl align.kl_horizon align.kl_estimator "
                   "align.missing_eos_penalty align.whiten_rewards align.kl_coef align.num_ppo_epochs "
                   "align.num_mini_batches align.stop_token align.stop_token_id align.local_rollout_forward_batch_size"),
           ("grpo", "align.num_generations align.top_p align.num_iterations align.scale_rewards align.loss_norm "
                    "align.reward_funcs align.reward_weights align.bias_correction_kl align.cliprange_high align.delta "
                    "align.importance_sampling_level align.mask_truncated_completions align.top_entropy_quantile "
                    "align.sapo_temperature_pos align.sapo_temperature_neg align.top_k align.min_p "
                    "align.repetition_penalty align.generation_kwargs align.steps_per_generation align.entropy_coef "
                    "align.num_generations_eval align.use_adaptive_entropy align.entropy_coef_min "
                    "align.entropy_coef_max align.entropy_coef_delta align.entropy_target "
                    "align.multi_objective_aggregation align.off_policy_mask_threshold"),
           ("kto", "align.desirable_weight align.undesirable_weight"),
           ("dpo kto", "align.sync_ref_model align.ref_model_mixup_alpha align.ref_model_sync_steps"),
           ("orpo", "align.disable_prompt_loss"),
           ("simpo cpo", "align.simpo_gamma align.cpo_alpha align.alpha"), ("orpo simpo cpo", "align.answer_eos"),
           ("rm", "align.center_rewards_coefficient"),  # ppo's and grpo's own loops run no checkpointed forward
           (" ".join(k for k, s in STAGES.items() if not s.loop), "model.gradient_checkpointing"),
           (" ".join(k for k in STAGES if k != "t2i"), "model.revision model.attn_implementation"))  # fmt: skip


def ignored_keys(cfg: Any) -> list[tuple[str, str]]:
    """(key, the stages that read it) for each key of ``READ_BY`` set to other than its default where the stage does
    not read it (``data.packing: true`` on cls, an ``align`` key of another stage): ``deltatune train`` names them."""
    out = []
    for stages, keys in READ_BY:
        for key in keys.split():
            section, name = key.split(".")
            set_to = getattr(getattr(cfg, section), name)
            if cfg.stage not in stages.split() and set_to != getattr(type(getattr(cfg, section))(), name):
                out.append((key, stages.replace(" ", ", ")))
    return out + ([] if STAGES[cfg.stage].loop else _unread_here(cfg))


def _unread_here(cfg: Any) -> list[tuple[str, str]]:
    """``ignored_keys``' keys that a Trainer stage reads only with another key: the best-model keys without
    load_best_model_at_end (metric_for_best_model is a plateau schedule's metric too), AdamW's with another optim."""
    t, out = cfg.train, []
    best = t.load_best_model_at_end or t.early_stopping_patience  # (early stopping compares by them too)
    if t.metric_for_best_model is not None and not best and t.scheduler not in ON_EVAL:
        out.append(("train.metric_for_best_model", f"{cfg.stage} with train.load_best_model_at_end or train.scheduler "
                    f"{' or '.join(ON_EVAL)}"))  # fmt: skip
    if t.greater_is_better is not None and not best:
        out.append(("train.greater_is_better", f"{cfg.stage} with train.load_best_model_at_end"))
    if t.optim in NO_ADAM:  # (their builders take no betas and no epsilon: transformers' trainer_optimizer.py)
        defaults = TrainArgs()
        for key in ("adam_beta1", "adam_beta2", "adam_epsilon"):
            if getattr(t, key) != getattr(defaults, key):
                out.append((f"train.{key}", f"{cfg.stage} with an Adam train.optim"))
    return out


NO_ADAM = ("sgd", "adagrad", "rmsprop", "adafactor")
"""train.optim names whose optimizer takes none of train.adam_beta1, adam_beta2, adam_epsilon."""


DTYPES = ("float32", "bfloat16", "float16", "auto")
"""model.dtype's values: torch's names, as transformers' from_pretrained reads ``dtype``; ``auto`` is deltatune's
(bfloat16 where the machine computes in it at speed, else float32), not transformers' (the checkpoint's own)."""

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""model.attn_implementation's values (transformers' ``attn_implementation``); null: transformers' default (sdpa
where the model has it, else eager); an ``org/name`` hub kernel goes through as transformers reads one."""


def validate_model(m: Any) -> None:
    """The ``model`` keys that from_pretrained reads, checked at recipe read: a bad dtype was refused only when the
    model loaded (after the data was prepared), an unknown attn_implementation with transformers' long ValueError."""
    if m.dtype not in DTYPES:
        short = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(str(m.dtype))
        short = f" (train.precision's spelling; here write {short})" if short else ""
        raise ConfigError(f"model.dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {m.dtype!r}{short}")
    if m.revision is not None and (not isinstance(m.revision, str) or not m.revision.strip()):
        raise ConfigError(f"model.revision must be a hub branch, tag or commit id (or null), got {m.revision!r}")
    impl = m.attn_implementation
    if impl is not None and impl not in ATTN_IMPLEMENTATIONS and not (isinstance(impl, str) and "/" in impl):
        raise ConfigError(
            f"model.attn_implementation must be null (transformers' default) or one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}, got {impl!r}"
        )


def hub_revision(name_or_path: str, revision: str | None) -> dict:
    """from_pretrained's ``revision`` (model.revision) for ``name_or_path``: {} when none is asked. A local folder (an
    embedded model's copy too) has no revisions, and transformers ignores one there silently: refused."""
    if revision is None:
        return {}
    path = embedded.resolve(name_or_path)
    if os.path.isdir(path) or os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")):
        what = (
            "loads deltatune's embedded copy, a local folder" if embedded.lookup(name_or_path) else "is a local folder"
        )
        raise ConfigError(
            f"model.revision is {revision!r}, but model {name_or_path!r} {what}, which has no revisions (transformers "
            "would load its files as they are): drop model.revision, or check out that revision there"
        )
    return {"revision": revision}


FLASH = {"flash_attention_2": "flash-attn", "flash_attention_3": "flash-attn-3"}
"""The attn_implementation values that need a package of their own (on a GPU), and its name."""


def load_args(name_or_path: str, revision: str | None, attn_implementation: str | None) -> dict:
    """from_pretrained's ``revision`` and ``attn_implementation`` for the base (those given), after the refusals
    transformers would make only as the weights load: a revision on a local folder (``models.hub_revision``);
    flash_attention_2 / _3 where neither its package works (transformers: a CUDA GPU) nor, on a GPU, the ``kernels``
    package that transformers falls back to."""
    import torch
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_kernels_available

    kwargs = hub_revision(name_or_path, revision)
    if attn_implementation in FLASH:
        installed = (is_flash_attn_2_available if attn_implementation.endswith("2") else is_flash_attn_3_available)()
        gpu = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
        if not installed and not (gpu and is_kernels_available()):
            raise ConfigError(
                f"model.attn_implementation={attn_implementation} needs the {FLASH[attn_implementation]} package "
                f"on a GPU ({'none is here' if not gpu else 'it is not installed, nor kernels'}): use sdpa or eager"
            )
    return {**kwargs, "attn_implementation": attn_implementation} if attn_implementation else kwargs


def check_load(cfg: Any) -> Any:
    """``cfg.model``, checked as ``load_args`` checks it before the data is prepared (a run refused only after its
    data was tokenised otherwise); t2i reads neither key (``ignored_keys`` names them)."""
    m = cfg.model
    if cfg.stage != "t2i":
        load_args(m.name_or_path, m.revision, m.attn_implementation)
    return m


def load_revision(cfg: Any) -> str | None:
    """The base's revision a run loads and records in adapter_config.json (peft's get_peft_model(revision=)): none
    for t2i, which reads no model.revision."""
    return None if cfg.stage == "t2i" else cfg.model.revision
