"""``deltatune info``: what a model is, what each method would adapt in it, and what it would cost."""

from __future__ import annotations

import os

import torch

from . import registry
from .config import ConfigError
from .model import get_delta_model
from .targets import IA3_TARGETS, LORA_TARGETS, model_type


def _build(name: str, task: str | None):
    from transformers import AutoConfig

    from .train.checks import check_model_path
    from .train.models import TASKS, auto_class, resolve_path

    if task is not None and task not in TASKS:
        raise ConfigError(f"--task {task!r}: one of {', '.join(TASKS)}")
    if not name.strip():  # (the hub client's "Repo id must use alphanumeric chars" for '')
        raise ConfigError(f"model {name!r} is empty: give a model folder, a hub id or 'minilm'")
    check_model_path(name, "model")
    folder = resolve_path(name)
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):  # a run or an adapter, not a model
        from .train.run import adapter_field

        base = adapter_field(folder, "base_model_name_or_path")
        raise ConfigError(
            f"{name!r} is an adapter folder (adapter_config.json); info describes a base model"
            + (f": its base is {base!r}" if base else "")
        )
    if os.path.isfile(os.path.join(folder, "run.yaml")) and not os.path.isfile(os.path.join(folder, "config.json")):
        # (a run with no adapter at its top yet: it read "the folder holds no config.json", as for a broken model)
        raise ConfigError(_run_folder(name, folder))
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
        pipeline = os.path.isfile(os.path.join(folder, "model_index.json"))  # a diffusers pipeline: its parts have one
        raise ConfigError(
            f"model {name!r}: the folder holds no config.json"
            + ("; it is a diffusers pipeline (model_index.json): name its denoiser's subfolder" if pipeline else "")
        )
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # (None: asks on stdin)
    except (OSError, ValueError) as exc:  # a folder without config.json, an unknown model_type
        raise ConfigError(f"model {name!r}: {str(exc).splitlines()[0]}") from None
    archs = " ".join(getattr(config, "architectures", None) or [])
    guess = (
        task
        or ("IMAGE_CLS" if "ImageClassification" in archs else None)
        or ("SEQ_2_SEQ_LM" if config.is_encoder_decoder else None)
        or ("CAUSAL_LM" if "CausalLM" in archs or "LMHead" in archs else "SEQ_CLS")
    )
    # A guess that does not build (a vision config read as a text classifier) falls through to the task that does.
    for candidate in [guess] if task else [guess, *(t for t in TASKS if t != guess)]:
        try:
            with torch.device("meta"):  # shapes only: no memory, no weights read
                return auto_class(candidate).from_config(config), candidate
        except ValueError:
            continue
    mtype = getattr(config, "model_type", "?")
    raise ConfigError(
        f"--task {task} does not fit model {name!r} (model_type {mtype})" if task
        else f"model {name!r}: no task's auto class builds model_type {mtype}"
    )  # fmt: skip


ADAPTER = "adapter_config.json"


def _run_folder(name: str, folder: str) -> str:
    """What a run folder with no adapter at its top is: one its checkpoints hold so far (the newest named), or none
    saved yet; and its base, read from its run.yaml (model.name_or_path), where it reads."""
    from .train.runs import read_recipe

    steps = [n.removeprefix("checkpoint-") for n in _listdir(folder) if n.startswith("checkpoint-")]
    saved = [
        int(s) for s in steps if s.isdecimal() and os.path.isfile(os.path.join(folder, f"checkpoint-{s}", ADAPTER))
    ]
    try:
        model = read_recipe(folder).get("model")
        base = model.get("name_or_path") if isinstance(model, dict) else None
    except ConfigError:  # (not YAML, not a mapping: the base unread, as before)
        base = None
    where = "no adapter saved in it yet"
    if saved:  # (the Trainer saves the adapter into each checkpoint-N; the run's top gets it when it ends)
        where = (
            f"its adapter in checkpoints alone so far (the newest: {os.path.join(name, f'checkpoint-{max(saved)}')!r})"
        )
    return f"{name!r} is a run folder (run.yaml) with {where}; info describes a base model: " + (
        f"its base is {base!r}" if isinstance(base, str) and base else "give the run's model.name_or_path"
    )


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def describe(name: str, task: str | None = None) -> str:
    """A text table: family, default targets, and trainable parameters of every registered method's defaults."""
    model, task = _build(name, task)
    mtype = model_type(model)
    total = sum(p.numel() for p in model.parameters())
    lines = [
        f"model: {name}",
        f"family (model_type): {mtype}    task: {task}",
        f"parameters: {total:,d} ({total * 4 / 2**20:,.1f} MiB in fp32, {total * 2 / 2**20:,.1f} MiB in bf16)",
        f"default LoRA targets: {', '.join(LORA_TARGETS.get(mtype, [])) or 'none (pass target_modules)'}",
        f"default IA3 targets: {', '.join(IA3_TARGETS.get(mtype, [])) or 'none (pass target_modules)'}",
        "% of total: of every parameter once the method is in, its own too (peft's print_trainable_parameters)",
        "",
        "| method (defaults) | trainable params | % of total |",
        "|---|---:|---:|",
    ]
    for method in registry.names():
        fresh, _ = _build(name, task)
        try:
            image = task in ("IMAGE_CLS", "IMAGE_TO_TEXT")  # PEFT has no image task type: runs record none
            delta = get_delta_model(fresh, registry.get(method).config_class(task_type=None if image else task))
            trainable, everything = delta.get_nb_trainable_parameters()  # (everything: the method's too, as peft's)
            lines.append(f"| {method} | {trainable:,d} | {100 * trainable / everything:.4f} |")
        except (ConfigError, TypeError, ValueError) as exc:
            why = str(exc).splitlines()[0].split("; ")[0]  # its first clause: a table cell, not the whole advice
            lines.append(f"| {method} | n/a: {why if len(why) <= 120 else why[:117] + '...'} | |")
    return "\n".join(lines)
