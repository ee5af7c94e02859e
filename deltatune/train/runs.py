"""Reading a finished run folder: its recipe (``run.yaml``), as the stages, eval, merge, generate and the reward
scorers need it. A leaf of train/: it imports yaml and the config error, nothing else of deltatune."""

from __future__ import annotations

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
    return raw


def run_template(adapter_dir: str) -> str | None:
    """The built-in chat template a run trained with (its recipe's ``data.template``), None for the tokenizer's
    (and for a plain adapter folder)."""
    return (read_recipe(adapter_dir).get("data") or {}).get("template") if run_file(adapter_dir) else None
