"""RunConfig: a recipe YAML plus dotted ``key=value`` overrides, validated section by section.

A recipe's sections follow the run: ``stage``, ``model``, ``method``, ``data``, ``train``, ``align`` (the
alignment stages only), ``output``.
The ``method`` section holds ``name`` plus the fields of that method's config class (LoraConfig, ...).
An unknown key anywhere is an error naming it and the nearest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from ..config import TASK_TYPES, ConfigError
from ..data.formats import NUMBER as _NUMBER  # (one number grammar: ASCII digits, as pandas reads a CSV's)
from .config_align import (  # noqa: F401  (the align section, a room of its own; names kept here)
    ALIGN_UNBUILT,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    KTO_LOSS_TYPES,
    SMOOTHED,
    AlignArgs,
    _f,
    unbuilt_default,
    validate_align,
)
from .config_read import NO_ADAM, READ_BY, check_load, ignored_keys, load_revision, validate_model  # noqa: F401  (which stage reads which key; names kept here)
from .config_train import (  # noqa: F401  (the train section, a room of its own; names kept here)
    FSDP_OPTIONS,
    NEEDS_KWARGS,
    ON_EVAL,
    SCHEDULERS,
    UNBUILT,
    TrainArgs,
    validate_train,
)
from .table import STAGES


@dataclass
class ModelArgs:
    name_or_path: str = _f("minilm", "Base model: a local folder, a hub id, or 'minilm' (the embedded MiniLM-L6).")
    num_labels: int | None = _f(None, "Head outputs: cls, tag, image_cls: the data's classes (the default; another "
                                "count is refused); rm: 1.")  # fmt: skip
    dtype: str = _f("float32", "Weights dtype: float32, bfloat16, float16, or auto (bfloat16 where the machine has "
                    "fast bf16).")  # fmt: skip
    quantization: dict | None = _f(None, "Quantise the base, e.g. {bits: 4} for QLoRA (keys of deltatune.quantize).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (only for models you trust).")
    revision: str | None = _f(None, "A hub id's branch, tag or commit (model and tokenizer); default: main. Refused "
                              "for a local folder, which has none.")  # fmt: skip
    attn_implementation: str | None = _f(None, "eager, sdpa, flash_attention_2, flash_attention_3 or flex_attention "
                                         "(transformers' attn_implementation); default: transformers' choice.")  # fmt: skip
    text_encoder: str | None = _f(None, "t2i: the frozen text encoder (a folder, hub id or 'minilm'); default: "
                                  "the base's.")  # fmt: skip
    train_text_encoder: bool = _f(False, "t2i: also train a LoRA (method lora's r, lora_alpha) on the text "
                                  "encoder's attention projections.")  # fmt: skip


@dataclass
class DataArgs:
    train: str | None = _f(
        None, "Training data: .jsonl/.json/.csv/.tsv/.parquet/.arrow/.txt path or hub dataset name."
    )
    eval: str | None = _f(None, "Evaluation data (same formats); metrics.json reports on it.")
    text_column: str = _f("text", "Text column (cls, pt).")
    text_pair_column: str | None = _f(None, "Second text column for sentence-pair classification.")
    label_column: str = _f("label", "Label column (cls).")
    labels: list | None = _f(None, "Label names in class-id order; default: the distinct labels sorted (whole "
                             'numbers, 1, 1.0 or "1", as numbers: ids 0..k-1 stay themselves).')  # fmt: skip
    multi_label: bool | None = _f(None, "cls: each row's label a list of classes (BCE with logits); default: true "
                                  "when the data's labels are lists")  # fmt: skip
    tokens_column: str = _f("tokens", "Word list column (tag).")
    tags_column: str = _f("ner_tags", "Tag list column (tag), BIO tags.")
    label_all_tokens: bool = _f(False, "tag: every sub-token of a word carries its tag (B- as I-), as run_ner's "
                                "--label_all_tokens.")  # fmt: skip
    return_entity_level_metrics: bool = _f(False, "tag: also report <type>_precision/_recall/_f1/_number per "
                                           "entity type, as run_ner's --return_entity_level_metrics.")  # fmt: skip
    source_column: str = _f("source", "Source text column (seq2seq).")
    target_column: str = _f("target", "Target text column (seq2seq).")
    prompt_column: str = _f("prompt", "Prompt column (rm, dpo, ppo).")
    chosen_column: str = _f("chosen", "Preferred response column (rm, dpo).")
    rejected_column: str = _f("rejected", "Dispreferred response column (rm, dpo).")
    completion_column: str = _f("completion", "Response column (kto; its label_column says desirable or not).")
    bad_pairs: str = _f("refuse", "Bad preference rows (an empty response, chosen == rejected, a ranking row "
                        "LLaMA-Factory drops, an rm pair cut to the same ids): 'refuse' (at file:line) or "
                        "'skip'.")  # fmt: skip
    columns: dict = _f(
        {},
        "Renamed fields -> column: {messages, conversations, instruction, input, output, system, history, "
        "prompt, completion, chosen, rejected, label, tools, images}, or LLaMA-Factory's dataset_info.json keys "
        "(query, response, kto_tag) (docs/data-formats.md).",
    )
    format: str | None = _f(
        None,
        "Data format (docs/data-formats.md): alpaca, sharegpt, messages, prompt_completion, prompt, preference, "
        "preference_implicit, sharegpt_preference, alpaca_preference, unpaired, text (openai: messages); default: "
        "detected from the rows.",
    )
    tags: dict = _f({}, "sharegpt role/content tag names, as LLaMA-Factory's dataset_info.json 'tags'.")
    template: str | None = _f(
        None,
        "Chat template (sft, rm, dpo, ppo): None = the tokenizer's own, or chatml / alpaca (LLaMA-Factory's) / plain; "
        "raw = TRL's standard rows as plain text, no chat template; alpaca_v0 = the alpaca of runs begun before "
        "2026-12-08 (no default system).",
    )
    max_length: int = _f(512, "Longest sequence in tokens (the block size for pt and packing).")
    max_target_length: int = _f(128, "Longest target in tokens (seq2seq).")
    source_prefix: str = _f("", "seq2seq: text before every source, as run_summarization's --source_prefix "
                            "('summarize: ' for T5).")  # fmt: skip
    truncation: str = _f("truncate", "Rows over max_length: 'truncate' (counted in the report) or 'refuse'.")
    packing: bool = _f(False, "SFT: pack short examples into max_length blocks (attention kept per example).")
    mask_history: bool = _f(False, "SFT: train the last assistant turn only (LLaMA-Factory's mask_history); an "
                            "over-long row keeps that turn from its prompt's start (cut as LLaMA-Factory's "
                            "infer_seqlen where it alone is too long).")  # fmt: skip
    train_on_prompt: bool = _f(False, "SFT: train every token, the prompts and template markers too "
                               "(LLaMA-Factory's train_on_prompt).")  # fmt: skip
    limit: int | None = _f(None, "Read at most this many rows of each file.")
    val_size: float = _f(0.0, "cls, tag, seq2seq, image_cls, caption without data.eval: hold out this fraction of data.train "
                         "(or this many rows) as the eval set, seeded by train.seed (LLaMA-Factory's val_size).")  # fmt: skip
    image_column: str = _f("image", "Image path column (image_cls); relative paths read from the data file's folder.")
    allow_outside: bool = _f(False, "image_cls: accept relative image paths ('../x.png') outside the data folder.")
    augment: list = _f([], "image_cls train-time augmentation: random_resized_crop, hflip; t2i: random_crop, hflip "
                       "(none by default).")  # fmt: skip
    image_interpolation_mode: str | None = _f(None, "t2i: resize filter, as diffusers' --image_interpolation_mode: "
                                              "nearest, nearest_exact, bilinear, bicubic, box, hamming, lanczos "
                                              "(default: lanczos for a UNet, bilinear for SD3).")  # fmt: skip
    proportion_empty_prompts: float = _f(0.0, "t2i: chance a training image is read with the empty caption "
                                         "(diffusers' --proportion_empty_prompts).")  # fmt: skip
    class_data_dir: str | None = _f(None, "t2i prior preservation: the folder of class images, filled up to "
                                    "data.num_class_images by the base (diffusers' --class_data_dir).")  # fmt: skip
    class_prompt: str | None = _f(None, "t2i prior preservation: the class images' prompt (--class_prompt).")
    num_class_images: int = _f(100, "t2i prior preservation: class images used, drawn when the folder has fewer "
                               "(--num_class_images).")  # fmt: skip


@dataclass
class OutputArgs:
    dir: str = _f("runs/run", "Output folder: adapter, checkpoints, metrics.json, report.md, plot.")
    samples: int = _f(0, "pt, sft, dpo, kto, orpo, simpo, cpo: after training, answer the first N eval prompts "
                      "(greedy) with the adapter off and on; printed, and written to samples.json and "
                      "report.md.")  # fmt: skip
    sample_tokens: int = _f(64, "Longest answer, in new tokens, of each output.samples answer.")


@dataclass
class RunConfig:
    stage: str = "sft"
    model: ModelArgs = field(default_factory=ModelArgs)
    method: dict = field(default_factory=lambda: {"name": "lora"})
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    align: AlignArgs = field(default_factory=AlignArgs)
    output: OutputArgs = field(default_factory=OutputArgs)
    trained_run: ClassVar[bool | str] = False  # resume / eval (its folder): the base as it trained (run_load); no key
    evaluating: ClassVar[bool] = False  # deltatune eval's prepare: rows scored, not trained on (reward.EVALUATING)

    def method_config(self, task_type: str | None = None):
        """The method section as that method's config object (validated by the config class)."""
        from .. import registry, towers

        section = dict(self.method)
        name = section.pop("name", None)
        towers.check_names(section.pop("towers", None))  # applied with the model at hand (towers.restrict)
        if not name:
            raise ConfigError("method.name is missing (e.g. method: {name: lora})")
        if section.get("revision") is not None:  # (every config has peft's field: get_peft_model(revision=)'s record)
            raise ConfigError("method.revision is not a recipe key: it only records the base model's revision in "
                              "adapter_config.json: a recipe's model.revision is the base's revision, loaded and recorded")  # fmt: skip
        try:
            cls = registry.get(name).config_class
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        if cls.recipe_refusal:  # (AdapterFusion: its adapters come from a model that holds them)
            raise ConfigError(f"method.name={name}: {cls.recipe_refusal}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in section:
            if key not in known:
                raise ConfigError(_unknown(f"method.{key}", key, known, f"method.{name}"))
        # A stage task PEFT has no task_type for (IMAGE_CLS) leaves it None, as PEFT's image recipes do.
        if task_type in TASK_TYPES and "task_type" in known and not section.get("task_type"):
            section["task_type"] = task_type
        return cls(**_typed("method", cls, section))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelArgs, "data": DataArgs, "train": TrainArgs, "align": AlignArgs, "output": OutputArgs}


TRL_ALIGN_NAMES = {"generation_batch_size": "train.batch_size x align.num_generations completions here (split into "
                   "align.steps_per_generation updates)", "max_completion_length": "align.max_new_tokens here",
                   "epsilon": "align.cliprange here", "epsilon_high": "align.cliprange_high here"}  # fmt: skip
"""TRL GRPOConfig names a recipe's align section may carry over: what they are here (in the unknown-key message)."""


def _unknown(full: str, key: str, known: list[str], where: str) -> str:
    if full == f"align.{key}" and key in TRL_ALIGN_NAMES:
        return f"unknown key {full!r} in {where}; TRL's {key} is {TRL_ALIGN_NAMES[key]}"
    if not isinstance(key, str):  # (YAML reads 1:, yes:, on: as a number or a bool: difflib's TypeError was raised)
        return (f"unknown key {full!r} in {where} (YAML read the key as the {type(key).__name__} {key!r}); valid "
                f"keys: {', '.join(known)}")  # fmt: skip
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(known)}"
    return f"unknown key {full!r} in {where}{hint}"


def _coerce(value: str) -> Any:
    """A command-line value as YAML reads it (16 -> int, true -> bool, [a, b] -> list), and 1e-4 -> float too (YAML
    1.1 would keep it text); quoted, it is text. A text stays as typed (YAML cut ``output.dir=a #2`` to 'a')."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str) and not value.strip().startswith(("'", '"')):  # (quoted: YAML's unquoted text)
        return float(value) if _NUMBER.fullmatch(value.strip()) else value.strip()
    return parsed


def _numbers(mapping: dict[str, Any]) -> dict[str, Any]:
    """A recipe file's mapping with each number YAML 1.1 keeps as text (1e-4: no dot) a float, as ``_coerce`` reads
    a command-line value: the ``method`` section, ``train.lr_scheduler_kwargs``."""
    return {k: float(v) if isinstance(v, str) and _NUMBER.fullmatch(v) else v for k, v in mapping.items()}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw recipe dict (a new dict; the input is unchanged)."""
    out = copy.deepcopy(raw)  # nested sections (model.quantization.bits=4) must not write into the caller's dict
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        key, value = item.split("=", 1)
        if _number_trap(value.strip()):  # (seed=0042 was 34)
            raise ConfigError(f"override {item!r}: {_number_trap(value.strip())}")
        parts = key.strip().split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            if depth == 0 and part == "method" and not node.get(part):  # no method section: build's LoRA, named
                node[part] = {"name": "lora"}  # (method.r=16 read "method.name is missing"; the recipe trains LoRA)
            elif node.get(part) is None:  # absent, or an empty section (``train:``)
                node[part] = {}
            elif depth == 0 and part == "method" and isinstance(node[part], str):  # the shorthand ``method: lora``
                node[part] = {"name": node[part]}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = _coerce(value)
    return out


def build(raw: dict[str, Any], where: str = "recipe", overrides: list[str] | None = None) -> RunConfig:
    """Validate a raw recipe dict into a RunConfig.

    Raises:
        ConfigError: an unknown section or key (naming the nearest valid one), or a bad value.
    """
    raw = dict(raw or {})
    known_top = ["stage", "method", *_SECTIONS]
    for key in raw:
        if key not in known_top:
            raise ConfigError(_unknown(key, key, known_top, _given_in(key, where, overrides)))
    stage = raw.get("stage", "sft")
    if not isinstance(stage, str) or stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    sections = {}
    for name, cls in _SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{name} must be a mapping of keys, got {section!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        if name == "align":  # (a TRL DPOConfig key not built here, at TRL's default: what deltatune does)
            section = {k: v for k, v in section.items() if k in known or not unbuilt_default(k, v)}
        for key in section:
            if key not in known:
                hint = {"train": HF_NAMES, "align": ALIGN_UNBUILT}.get(name, {}).get(key)
                at = _given_in(f"{name}.{key}", where, overrides)
                raise ConfigError(f"unknown key '{name}.{key}' in {at}: {hint}" if hint else
                                  _unknown(f"{name}.{key}", key, known, at))  # fmt: skip
        sections[name] = cls(**_typed(name, cls, section))
    method = raw.get("method") or {"name": "lora"}
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or not isinstance(method.get("name", "lora"), str):
        raise ConfigError(f"method must be a method's name or a mapping with a name (name: lora, r: 8), "
                          f"got {method!r}")  # fmt: skip
    method = _numbers(method)
    t = sections["train"]  # (YAML 1.1 reads min_lr: 1e-6 as text there too: torch's TypeError mid-run)
    t.lr_scheduler_kwargs = _numbers(t.lr_scheduler_kwargs)
    cfg = RunConfig(stage=stage, method=dict(method), **sections)
    for section, key in (("model", "name_or_path"), ("data", "train"), ("data", "eval"), ("output", "dir")):
        value = getattr(sections[section], key)  # ~ as a shell expands it (the Trainer did so for output.dir alone)
        if isinstance(value, str) and value.startswith("~"):
            setattr(sections[section], key, os.path.expanduser(value))
    _validate(cfg)
    return cfg


def _given_in(key: str, where: str, overrides: list[str] | None) -> str:
    """The override that gave ``key`` (or a key below it), else ``where``: ``train.lrr=1`` read "unknown key
    'train.lrr' in r.yaml", a file that holds no such key."""
    for item in reversed(overrides or ()):  # (the last that set it; train={lrr: 1} set the section, train.lrr too)
        given = item.split("=", 1)[0].strip()
        if given == key or given.startswith(f"{key}.") or key.startswith(f"{given}."):
            return f"override {item!r}"
    return where


HF_NAMES = {
    **{k: f"{k} (TrainingArguments', SFTConfig's) is {v} in a recipe" for k, v in (
        ("learning_rate", "train.lr"), ("num_train_epochs", "train.epochs"),
        ("per_device_train_batch_size", "train.batch_size"), ("per_device_eval_batch_size", "train.eval_batch_size"),
        ("gradient_accumulation_steps", "train.grad_accum"), ("lr_scheduler_type", "train.scheduler"),
        ("dataloader_num_workers", "train.num_workers"), ("output_dir", "output.dir"),
        ("bf16", "train.precision (bf16)"), ("fp16", "train.precision (fp16)"),
        ("gradient_checkpointing", "model.gradient_checkpointing"),
        ("eval_strategy", "train.eval_steps (null: each epoch; no data.eval: none)"),
        ("save_strategy", "train.save_steps (null: each epoch)"),
        ("resume_from_checkpoint", "deltatune train --resume (the last checkpoint of output.dir)"),
        ("max_length", "data.max_length"), ("max_seq_length", "data.max_length"), ("packing", "data.packing"),
        ("padding_free", "data.packing (rows packed into data.max_length blocks, position ids restarting per row)"),
        ("dataset_text_field", "data.text_column"))},
    "torch_compile": "torch_compile (TrainingArguments') is not taken by a recipe: a run compiled whole (the adapter "
    "layers, their checkpoints and resume) is not checked; drop it",
    "gradient_checkpointing_kwargs": "a recipe's model.gradient_checkpointing always runs use_reentrant=False (the "
    "checkpointing that trains adapters on a frozen base); drop it",
    **UNBUILT,
    "completion_only_loss": "sft always trains on the response tokens only (TRL's completion_only_loss=True); drop it",
    "assistant_only_loss": "sft always trains on the assistant's turns only (TRL's assistant_only_loss=True); drop it",
}  # fmt: skip
"""TrainingArguments' and SFTConfig's names for what a recipe spells otherwise: the unknown-key error names the key."""

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict, "None": type(None)}


def _typed(section: str, cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a section's keys, known to ``cls``) checked against ``cls``'s annotations, so ``train.lr=abc``
    is a ConfigError naming ``train.lr`` rather than a TypeError later. Widens where no meaning changes: an int where
    a float is expected, a whole float where an int is (``max_steps=1e3``), one value where a list is
    (``report_to=none`` -> ``[none]``). A generic type is checked as its container (``list[str]``: a list)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        kinds = [_TYPES.get(t.strip().split("[")[0], object) for t in types[key].split("|")]  # object: any value
        if isinstance(value, str) and str not in kinds and {int, float} & set(kinds) and _NUMBER.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 5e-4 as text (in any section: data.limit 1e3 was refused as '1e3')
        if isinstance(value, bool):
            ok = bool in kinds
        elif isinstance(value, int) and int not in kinds and float in kinds:
            value, ok = float(value), True
        elif isinstance(value, float) and float not in kinds and int in kinds and value.is_integer():
            value, ok = int(value), True
        elif isinstance(value, str) and str not in kinds and list in kinds:
            value, ok = [value], True
        else:
            ok = any(isinstance(value, k) for k in kinds if k is not bool)
        if not ok:
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            quote = " (quote it: YAML read the text's trailing ':' as a mapping)"  # (key=Classify this: -> a dict)
            quote = quote if str in kinds and isinstance(value, dict) and list(value.values()) == [None] else ""
            if set(kinds) <= {str, type(None)} and type(value) in (int, float):  # (a commit id of digits: 1234567)
                quote = f" (quote it: YAML read it as a number; write '{value}')"
            raise ConfigError(f"{section}.{key} must be {names}, got {value!r}{quote}")
        if isinstance(value, float) and not math.isfinite(value):  # YAML's .inf and .nan
            raise ConfigError(f"{section}.{key} must be a finite number, got {value!r}")
        out[key] = value
    return out


def _validate(cfg: RunConfig) -> None:
    if cfg.model.quantization:  # its keys are deltatune.quantize's (a typo was a TypeError after the model loaded)
        known = ["bits", "quant_type", "double_quant", "compute_dtype", "backend", "skip_modules"]
        for key in cfg.model.quantization:
            if key not in known:
                raise ConfigError(_unknown(f"model.quantization.{key}", key, known, "the recipe"))
        from ..methods._quant_skip import check_skip  # (quantize's own check, before the model loads)

        check_skip(cfg.model.quantization.get("skip_modules"), "model.quantization.skip_modules")
    for key, allowed in (("truncation", ("truncate", "refuse")), ("bad_pairs", ("refuse", "skip"))):
        if getattr(cfg.data, key) not in allowed:
            raise ConfigError(f"data.{key} must be {allowed[0]!r} or {allowed[1]!r}, got {getattr(cfg.data, key)!r}")
    for key in ("max_length", "max_target_length"):  # max_target_length 0 failed inside T5's shift, < 0 cut targets
        if getattr(cfg.data, key) < 1:  # from the end
            raise ConfigError(f"data.{key} must be >= 1, got {getattr(cfg.data, key)}")
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {cfg.train.lr}")
    if cfg.train.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, got {cfg.train.precision!r}")
    _validate_values(cfg)
    validate_model(cfg.model)
    validate_align(cfg.align, cfg.stage, cfg.train.batch_size)
    if cfg.align.beta < 0 or (cfg.align.beta == 0 and cfg.stage != "grpo"):
        raise ConfigError(f"align.beta must be > 0 (>= 0 for grpo), got {cfg.align.beta}")
    cfg.method_config()  # the method section validates itself


def _validate_values(cfg: RunConfig) -> None:
    """Values that transformers, torch's DataLoader or the data reader would otherwise refuse deep inside (or
    accept silently), checked here so the message names the recipe key."""
    t, d = cfg.train, cfg.data
    validate_train(cfg)
    for key in ("generation_max_new_tokens", "generation_num_beams"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    for key in ("eval_batch_size", "save_total_limit"):
        if getattr(t, key) is not None and getattr(t, key) < 1:
            null = "keep every checkpoint" if key == "save_total_limit" else "the default"
            raise ConfigError(f"train.{key} must be >= 1 (or null: {null}), got {getattr(t, key)}")
    for key in ("num_workers", "warmup_steps", "weight_decay", "max_grad_norm", "snr_gamma"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    if t.neftune_noise_alpha is not None and t.neftune_noise_alpha <= 0:
        raise ConfigError(f"train.neftune_noise_alpha must be > 0 (or null for off), got {t.neftune_noise_alpha}")
    if t.label_smoothing_factor is not None and not 0.0 <= t.label_smoothing_factor < 1.0:
        raise ConfigError(f"train.label_smoothing_factor must be in [0, 1), got {t.label_smoothing_factor}")
    if t.optim is not None:
        # (imported only when set: a plain recipe's validation imports no transformers)
        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if t.optim not in names:
            near = difflib.get_close_matches(t.optim, names, n=1, cutoff=0.6)
            if t.optim == "adamw" and "adamw_torch" in names:  # (grokadamw is the closest spelling)
                near = ["adamw_torch"]
            raise ConfigError(f"train.optim: unknown optimizer {t.optim!r}" +
                              (f"; did you mean {near[0]!r}?" if near else f"; one of {', '.join(names)}"))  # fmt: skip
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps must be >= 1, or -1 to run train.epochs, got {t.max_steps}")
    if t.max_steps == -1 and t.epochs <= 0:
        raise ConfigError(f"train.epochs must be > 0, got {t.epochs}")
    if d.limit is not None and d.limit < 1:
        raise ConfigError(f"data.limit must be >= 1 (or null to read every row), got {d.limit}")
    if cfg.model.num_labels is not None and cfg.model.num_labels < 1:
        raise ConfigError(f"model.num_labels must be >= 1, got {cfg.model.num_labels}")
    if d.labels and (bad := [x for x in d.labels if isinstance(x, (bool, list, dict))]):  # (bool: True is 1 as a key)
        why = "; YAML reads yes, no, on, off, true, false unquoted as booleans: quote them" * (bad[0] in (0, 1))
        raise ConfigError(f"data.labels must be a list of class names, got {d.labels!r}{why}")
    if d.labels and len({str(x) for x in d.labels}) < len(d.labels):
        twice = next(str(x) for i, x in enumerate(d.labels) if str(x) in map(str, d.labels[:i]))
        raise ConfigError(f"data.labels names {twice!r} twice; each class needs its own name")
    scheduled = [k for k, on in (("eval_steps", t.eval_steps is not None), ("eval_on_start", t.eval_on_start)) if on]
    # transformers' Trainer refuses eval_strategy "steps" without eval data, too (data.val_size holds some out)
    if scheduled and not (d.eval or d.val_size):
        raise ConfigError(f"train.{scheduled[0]} schedules an evaluation, but data.eval is not set; give data.eval "
                          f"or drop train.{scheduled[0]}")  # fmt: skip
    if t.eval_steps is not None and STAGES[cfg.stage].loop:  # its own loop evaluates before and after only
        raise ConfigError(f"train.eval_steps: {cfg.stage} evaluates data.eval after training (and before it with "
                          "train.eval_on_start), not every N steps; drop train.eval_steps")  # fmt: skip
    if t.grad_accum != 1 and STAGES[cfg.stage].loop and cfg.stage != "ppo":  # ppo: micro-batches per mini-batch
        raise ConfigError(f"train.grad_accum: {cfg.stage} takes one update per batch of train.batch_size prompts and "
                          "accumulates none; drop train.grad_accum (raise train.batch_size instead)")  # fmt: skip
    if cfg.stage == "ppo" and t.precision in ("bf16", "fp16"):  # its loop has no autocast: it trained in fp32
        raise ConfigError(f"train.precision: ppo trains in fp32 (auto and fp32 run so), got {t.precision}")
    if not 0 <= t.seed < 2**32:  # numpy's range, which transformers' set_seed hands it to
        raise ConfigError(f"train.seed must be in [0, 2**32), got {t.seed}")
    if not str(cfg.output.dir).strip():
        raise ConfigError("output.dir is empty; name the folder the run is written to")
    unknown = sorted(set(t.fsdp.split()) - FSDP_OPTIONS)  # transformers' FSDPOption values
    if unknown:
        raise ConfigError(f"train.fsdp: unknown option {unknown[0]!r}; options: {', '.join(sorted(FSDP_OPTIONS))}")
    if cfg.output.samples < 0 or cfg.output.sample_tokens < 1:
        raise ConfigError(
            f"output.samples must be >= 0 and output.sample_tokens >= 1, got {cfg.output.samples} and "
            f"{cfg.output.sample_tokens}"
        )


def load_recipe(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe YAML, apply ``key=value`` overrides, and validate.

    Relative data paths in the recipe are read relative to the current directory (as a user types them).
    """
    if os.path.isdir(path):
        raise ConfigError(f"recipe {path!r} is a folder; give a recipe file (.yaml)")
    if not os.path.exists(path):  # a pipe (/dev/stdin, a shell's <(...)) is read as a file is
        raise ConfigError(f"recipe {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); a recipe is a YAML file") from None
    try:
        trap = _yaml_trap(yaml.compose(text, Loader=yaml.SafeLoader) or yaml.MappingNode("", []))  # (no object)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # where the parser stopped: the file's line, not "<unicode string>"
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        reason = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{where}: not valid YAML: {reason}") from None
    except RecursionError:  # an anchor that holds itself (stage: &x [*x])
        raise ConfigError(f"{path}: a YAML anchor refers to itself; a recipe is a tree of values") from None
    if trap:
        raise ConfigError(f"{path}:{trap}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (stage, model, method, data, train, output), "
                          f"got a {type(raw).__name__}")  # fmt: skip
    return build(apply_overrides(raw, overrides or []), where=path, overrides=overrides)


_OCTAL, _BASE60 = re.compile(r"[-+]?0[0-7_]+"), re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")


def _number_trap(text: str) -> str | None:
    """Why a plain YAML value reads as another number than it shows, or None: YAML 1.1 reads 010 as the octal 8
    (``seed: 0042`` trained with seed 34) and 1:30 as the base-60 90."""
    digits = text.replace("_", "")
    if _OCTAL.fullmatch(text) and int(digits, 8) != int(digits):
        return f"{text} reads as the octal number {int(digits, 8)} in YAML 1.1; write it without the leading 0"
    value = yaml.safe_load(text) if _BASE60.fullmatch(text) else None
    return f"{text} reads as the base-60 number {value} in YAML 1.1; quote it" if type(value) in (int, float) else None


def _yaml_trap(node) -> str | None:
    """'LINE: why' for the first value of a YAML node tree that YAML reads otherwise than a recipe means: a key given
    twice in one mapping (YAML keeps the last: a second ``train:`` section replaced the first whole, silently), or a
    number YAML 1.1 reads in another base (``_number_trap``); None when there is none."""
    if isinstance(node, yaml.ScalarNode):
        why = _number_trap(node.value) if node.style is None else None  # (a quoted value is the text it shows)
        return f"{node.start_mark.line + 1}: {why}" if why else None
    seen: dict[str, int] = {}
    for key, value in node.value if isinstance(node, yaml.MappingNode) else [(None, item) for item in node.value]:
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":
            if key.value in seen:
                return (f"{key.start_mark.line + 1}: key {key.value!r} is given twice (first on line "
                        f"{seen[key.value]}); YAML would keep only the last")  # fmt: skip
            seen[key.value] = key.start_mark.line + 1
        found = _yaml_trap(value)
        if found:
            return found
    return None


def field_help() -> dict[str, list[tuple[str, Any, str]]]:
    """(key, default, help) per section, for ``deltatune train --help``."""
    out = {}
    for name, cls in _SECTIONS.items():
        defaults = cls()
        out[name] = [(f.name, getattr(defaults, f.name), f.metadata.get("help", "")) for f in dataclasses.fields(cls)]
    return out
