"""Checks that need the machine, made before a run touches anything: the model exists, the loggers are
installed, the precision runs here, the classes agree with the data.

Recipe values that are wrong anywhere are refused by ``config.build``; these are right or wrong depending on
where the run happens (a run folder evaluated on another machine must not fail on them), so ``train`` calls
them, before the output folder changes. Each names the recipe key, instead of the traceback that transformers,
the hub client or the DataLoader would give.
"""

from __future__ import annotations

import os

from ..config import ConfigError
from .config import RunConfig

_TRUE = ("1", "true", "yes", "on")


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_path(name: str, key: str = "model.name_or_path") -> None:
    """A model that is neither a local folder nor (plausibly) a hub id is refused, naming ``key``.

    Paths (absolute, ``./``, ``~``, more than one ``/``) must be folders. With the hub offline a hub id must be in
    the local cache. Anything else is left to the hub client (whose own failure ``load_model`` reports).
    """
    # (models.resolve_path is this; checks imports neither models nor a stage file: caption imports checks)
    from .embedded import resolve

    path = resolve(name)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise ConfigError(f"{key} {name!r} is a file; give a model folder (config.json and weights) or a hub id")
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path
    if looks_local:
        raise ConfigError(f"{key} {name!r}: no such folder")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ConfigError(
                f"{key} {name!r} is not a local folder, and the hub is offline (HF_HUB_OFFLINE=1) with no cached copy"
            )


def check_loggers(report_to: list[str]) -> None:
    """Every ``train.report_to`` entry is a logger transformers knows and (but for tensorboard, the default, which
    is skipped when absent) one that is installed."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    installed = set(get_available_reporting_integrations())
    for name in report_to:
        if not isinstance(name, str):
            raise ConfigError(f"train.report_to: a logger is a name (tensorboard, wandb, ...), got {name!r}")
    alone = [name for name in ("none", "all") if name in report_to]
    if alone and len(report_to) > 1 or len(set(report_to)) < len(report_to):
        # (the Trainer's ValueError, "all is not supported", came as a traceback once the model had loaded; none
        # beside a logger left it on)
        why = f"{alone[0]} stands alone" if alone and len(report_to) > 1 else "each logger once"
        raise ConfigError(f"train.report_to {report_to}: {why} (none: no logger; all: every one installed)")
    for name in report_to:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(
                f"train.report_to: unknown logger {name!r}; known: none, {', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
            )
        if name not in installed and name != "tensorboard":
            raise ConfigError(
                f"train.report_to: logger {name!r} is not installed here (pip install {name}), "
                "or set train.report_to=[none]"
            )


def check_precision(precision: str) -> None:
    """fp16 mixed precision needs a CUDA GPU; on a CPU it would silently train in fp32 while the run says fp16."""
    import torch

    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.precision: fp16 needs a CUDA GPU and this machine has none; use fp32, or bf16 (CPUs run it)"
        )


def resolved_precision(precision: str) -> str:
    """``train.precision`` with ``auto`` resolved (bf16 on a CUDA GPU that has it, else fp32); fp16 on a CPU refused."""
    import torch

    check_precision(precision)
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def check_num_labels(cfg: RunConfig, labels: list[str] | None) -> None:
    """The head has one output per class of the data: ``model.num_labels`` set to another count is refused (fewer
    would index past the head; more would be outputs that no label names and no metric reads)."""
    n = cfg.model.num_labels
    if n is None or not labels or cfg.stage not in ("cls", "tag", "image_cls"):
        return
    if len(labels) != n:
        shown = ", ".join(map(str, labels[:8])) + (", ..." if len(labels) > 8 else "")
        raise ConfigError(
            f"model.num_labels is {n} but the data has {len(labels)} classes ({shown}); set model.num_labels to "
            f"{len(labels)} or leave it out (it defaults to the data's classes)"
        )


def check_run(cfg: RunConfig) -> None:
    """The checks above that need only the recipe (the data-dependent one runs after the data is read)."""
    from .. import registry
    from ..towers import check_new_run
    from .config_train import check_loss_direction, check_optim_package, check_schedule_floor, has_eval, held_out_note
    from .table import STAGES

    check_model_path(cfg.model.name_or_path)
    check_loggers(cfg.train.report_to)
    check_precision(cfg.train.precision)
    t = cfg.train
    if t.fsdp_config and not t.fsdp.strip():  # (the Trainer reads fsdp_config only under fsdp: silently unused)
        # Here, where a training run starts, not in build(): a finished run's run.yaml from before still loads.
        raise ConfigError("train.fsdp_config is read only with train.fsdp (e.g. 'full_shard auto_wrap'), which is "
                          "empty: set train.fsdp, or drop train.fsdp_config")  # fmt: skip
    # The schedule stepped past warm-up (a value read only then; a rate above train.lr), and the optimizer's package:
    # as fsdp_config, here, so a finished run's run.yaml (one that never left warm-up, or on another machine) loads.
    check_schedule_floor(cfg)
    check_optim_package(cfg)
    check_loss_direction(cfg)  # (greater_is_better on the loss: a finished run that trained so still loads)
    # data.val_size holds no rows out on a stage that does not read it: run.py evaluated nothing, eval_steps and
    # eval_on_start silently unused (as fsdp_config, here: such a finished run's run.yaml still loads)
    scheduled = [k for k, on in (("eval_steps", t.eval_steps is not None), ("eval_on_start", t.eval_on_start)) if on]
    if scheduled and not has_eval(cfg):
        raise ConfigError(f"train.{scheduled[0]} schedules an evaluation, but data.eval is not set"
                          f"{held_out_note(cfg)}; give data.eval or drop train.{scheduled[0]}")  # fmt: skip
    check_new_run(cfg.method)  # method.towers: [] (as fsdp_config: such a run.yaml, from before, still loads)
    name = cfg.method.get("name")
    why = registry.get(name).config_class.no_targets if name in registry.names() else None
    if cfg.method.get("towers") is not None and why:  # (towers choose modules by name; such a run.yaml loads)
        raise ConfigError(f"method.towers: {name}: {why}, whichever tower; leave method.towers unset")
    if t.data_seed is not None and t.train_sampling_strategy in ("sequential", "batch_rebalance"):  # (unused)
        # The Trainer seeds the random sampler, and group_by_length's eval batches, with it; as fsdp_config, here.
        follows = {"sequential": "is the data's", "batch_rebalance": "is fixed (the Trainer's sampler seeds it with "
                   "42, not train.seed)"}  # fmt: skip
        raise ConfigError(f"train.data_seed orders train_sampling_strategy random (and group_by_length's eval "
                          f"batches); the {t.train_sampling_strategy} order {follows[t.train_sampling_strategy]}: "
                          f"drop it")  # fmt: skip
    if STAGES[cfg.stage].loop and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would run it all
        raise ConfigError(f"stage {cfg.stage} trains in one process (its own loop shards nothing): launch it "
                          "without torchrun")  # fmt: skip


def check_reference(cfg: RunConfig, model, training: bool) -> None:
    """ConfigError when ``cfg``'s stage scores the policy against the base as its reference (the adapter of
    ``model`` switched off) and the method trains the base's own weights in place (full, freeze, BitFit, LoRA
    biases): switching it off leaves the trained model, so the reference would move with every step (DPO's loss
    stuck at log 2, PPO's KL at 0). A DPO (KTO) run's reference taken before its first step (``align.precompute_ref`` or
    TRL's ``precompute_ref_log_probs``) is sound while ``training``; evaluated later it is gone."""
    from .table import STAGES

    config = model.peft_config[model.active_adapter]
    tr_dpo = training and cfg.stage in ("dpo", "kto") and cfg.align.sync_ref_model
    if tr_dpo:  # TR-DPO: a reference copy of the starting policy (refused with an adapter, as TRL refuses it)
        from .pairs import check_sync_ref

        return check_sync_ref(cfg.align, config, model.base_model, cfg.stage)
    if not STAGES[cfg.stage].reference or not config.trainable_base_parameters(model.base_model):
        return
    from .config_align import precomputes_ref

    precompute = cfg.stage in ("dpo", "kto")  # (both score the reference of every row, and kto of its pair, at init)
    if precompute and training and precomputes_ref(cfg.align):  # (or TRL's name, precompute_ref_log_probs)
        return
    raise ConfigError(
        f"method.name={config.method}: stage {cfg.stage} scores the policy against the base model (the adapter "
        "switched off) as its reference, and this method trains the base's own weights in place, so no reference "
        "would be left; use a method that leaves them as they are (lora with bias: none, dora, ia3, bottleneck "
        "adapters, prefix or prompt tuning)"
        + (", or align.precompute_ref: true to score it once before training" if precompute and training else "")
        + (
            ", or align.sync_ref_model: true (TR-DPO, a reference copy)"
            if training and cfg.stage in ("dpo", "kto")
            else ""
        )
        + ("" if training else "; this run cannot be evaluated against its base")
    )


def check_context(cfg: RunConfig, prepared, model) -> None:
    """ConfigError naming data.max_length when the longest encoded example (with a token adapter's virtual tokens)
    is over the model's positions: an encoder's learned positions failed in the first step, deep inside torch.
    Stage caption: ``check_caption``."""
    from ..targets import context_length

    if cfg.stage == "caption":
        return check_caption(cfg, prepared, model)
    if cfg.stage == "seq2seq":  # BART's learned positions: sources, targets, the eval's generations (T5's: no limit)
        from .seq2seq import check_positions

        return check_positions(cfg, model, prepared)
    config = getattr(model, "config", None)
    context = context_length(config) if config is not None and hasattr(config, "get_text_config") else None
    if context is None or getattr(config, "is_encoder_decoder", False):  # (T5's relative positions have no limit)
        return
    virtual = getattr(model.peft_config[model.active_adapter], "num_virtual_tokens", 0) or 0
    for split, examples in (("train", prepared.train), ("eval", prepared.eval or [])):
        lengths = [len(ex["input_ids"]) for ex in examples if isinstance(ex, dict) and "input_ids" in ex]
        if lengths and max(lengths) + virtual > context:
            extra = f" and the adapter's {virtual} virtual tokens" if virtual else ""
            raise ConfigError(
                f"data.max_length={cfg.data.max_length}: the longest {split} example is {max(lengths)} tokens{extra}, "
                f"more than the model's {context} positions; set data.max_length to {context - virtual} or less"
            )


def decoder_positions(model) -> int | None:
    """The positions of a captioner's text decoder: a VisionEncoderDecoder's decoder's (GPT-2's n_positions, BERT's
    max_position_embeddings), else the text config's (BLIP's text decoder, a VLM's language model); None: unknown."""
    from ..targets import context_length

    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        config = getattr(config, "decoder", None)  # (a T5-style text decoder's relative positions have no limit)
    return context_length(config) if hasattr(config, "get_text_config") else None


def check_generation(model, prompt: int, max_new_tokens: int, key: str) -> None:
    """ConfigError naming ``key`` (``--max-new-tokens``, ``data.max_target_length``) when ``max_new_tokens`` new
    tokens after a decoder prompt of ``prompt`` tokens (``prompt_length``) run past the text decoder's positions. The
    last new token is read by none, so the decoder reads ``prompt + max_new_tokens - 1`` positions."""
    positions, read = decoder_positions(model), prompt + max_new_tokens - 1
    if positions is not None and read > positions:
        asked = f"{key} {max_new_tokens}" if key.startswith("--") else f"{key}={max_new_tokens}"
        raise ConfigError(
            f"{asked}: a caption of {max_new_tokens} new tokens after a prompt of {prompt} reads {read} positions of "
            f"the text decoder, which has {positions}; set {key} to {positions - prompt + 1} or less"
        )


def check_new_tokens(model, processor, images: list, messages: list | None, max_new_tokens: int, key: str) -> None:
    """``check_generation`` for a caption of ``images`` (RGB) after ``messages``, as ``caption._generate`` feeds them
    (its prompt counted only when the decoder's positions are known)."""
    if decoder_positions(model) is not None:
        check_generation(model, prompt_length(processor, images, messages), max_new_tokens, key)


def prompt_length(processor, images: list, messages: list | None) -> int:
    """The tokens a captioner's text decoder reads before its first new one: a VisionEncoderDecoder's start token;
    BLIP's BOS and prompt; a decoder-only VLM's rendered prompt with its image tokens (``VLMProcessor.inputs``)."""
    if hasattr(processor, "inputs"):
        return int(processor.inputs(images, messages)["input_ids"].shape[1])
    prompt = messages[0]["content"] if messages and processor.bos is not None else ""
    return 1 + (len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0)


def check_caption(cfg: RunConfig, prepared, model) -> None:
    """Stage caption, before the run folder changes: ConfigError when the longest train or eval row (a caption cut
    to data.max_target_length, after the decoder's start token or BLIP's BOS; a VLM's conversation cut to
    data.max_length text tokens, with its image tokens) or the eval's greedy captions (data.max_target_length new
    tokens after each prompt) run past the text decoder's learned positions, which failed deep inside torch's
    embedding. (The datasets are read by their attributes: checks imports no stage file.)"""
    from ..data.images import open_rgb

    positions = decoder_positions(model)
    if positions is None:
        return
    d = cfg.data
    for split, ds in (("train", prepared.train), ("eval", prepared.eval)):
        if ds is None or not len(ds):
            continue
        if hasattr(ds, "encoded"):  # a decoder-only VLM's rows: (ids with the image tokens, labels)
            longest = max(len(ids) for ids, _ in ds.encoded)
            # every row over the positions must fit once its text is cut, with its own image tokens (not Gemma 3's
            # marker alone; Aya Vision's tiles and Pixtral's rows vary with the image: the longest row's need not be
            # the most), so the row with the most image tokens among those over sets the bound
            over = [ids for ids, _ in ds.encoded if len(ids) > positions]
            images = max((sum(t in ds.processor.image_ids for t in ids) for ids in over), default=0)
            key, fix = f"data.max_length={d.max_length}", f"set data.max_length to {positions - images} or less"
            if images >= positions:  # no cut of the text helps
                fix = f"a row's {images} image tokens alone fill them: give smaller images"
        else:  # a VisionEncoderDecoder reads its start token and the caption but its end; BLIP its BOS and all
            blip = ds.processor.bos is not None
            longest = max(map(len, ds.labels)) + blip
            key = f"data.max_target_length={d.max_target_length}"
            fix = f"set data.max_target_length to {positions - blip} or less"
        if longest > positions:
            raise ConfigError(
                f"{key}: the longest {split} row reads {longest} positions of the text decoder, which has "
                f"{positions}; {fix}"
            )
    ev = prepared.eval
    if ev is not None and len(ev):  # the end-of-run captions of the eval rows (references' default: those captioned)
        vlm = hasattr(ev, "encoded")
        lengths = [
            prompt_length(ev.processor, [open_rgb(r)[0] for r in rs] if vlm else [], m) for rs, m, _ in ev.references()
        ]
        check_generation(model, max(lengths), d.max_target_length, "data.max_target_length")


def check_rollout_context(cfg: RunConfig, longest: int, model_path: str) -> None:
    """PPO's and GRPO's check before the model loads: ConfigError naming align.max_new_tokens when the longest prompt
    (``longest`` tokens), a token adapter's virtual tokens and the new tokens are over the positions of the model at
    ``model_path`` (the sampling failed inside torch). An unreadable config is left to the model loader."""
    from transformers import AutoConfig

    from ..targets import context_length

    a, d = cfg.align, cfg.data
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    except OSError:
        return
    context = context_length(config)
    virtual = getattr(cfg.method_config(), "num_virtual_tokens", 0) or 0  # a token adapter's take positions too
    if context is not None and longest + virtual + a.max_new_tokens > context:
        also = f" and the adapter's {virtual} virtual tokens" if virtual else ""
        raise ConfigError(
            f"align.max_new_tokens={a.max_new_tokens} plus the longest prompt ({longest} tokens, data.max_length="
            f"{d.max_length}){also} is {longest + virtual + a.max_new_tokens} positions, more than the model's "
            f"context of {context}; lower align.max_new_tokens or data.max_length"
        )
