"""The trainers: one run function over the stages of table.py, built on the HF Trainer or a stage's own loop.

Names load on first use, so ``deltatune train --help`` reads the recipe fields without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunConfig": ".config",
    "build": ".config",
    "load_recipe": ".config",
    "evaluate": ".evaluation",
    "train": ".run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deltatune.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
