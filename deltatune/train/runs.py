"""Reading a finished run folder: its recipe (``run.yaml``), as the stages, eval, merge, generate and the reward
scorers need it. A leaf of train/: it imports yaml and the config error, nothing else of deltatune."""

from __future__ import annotations

import os
from typing import Any

import yaml

from ..config import ConfigError

RUN_FILE = "run.yaml"


def run_file(run_dir: str) -> str | None:
    """The path of ``run_dir``'s run.yaml, or None when it holds none (a plain adapter folder)."""
    path = os.path.join(run_dir, RUN_FILE)
    return path if os.path.isfile(path) else None


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
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} cannot be read ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a recipe (a YAML mapping)")
    if isinstance(raw.get("model"), dict):
        raw["model"] = {k: v for k, v in raw["model"].items() if k != "trust_remote_code"}
    return raw
