"""Data: loaders, formats (detected, mapped to one Sample structure), chat/instruction templates, prompt-loss
masking, packing, collators.

Names load on first use, so the CLI can name ``DataError`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": ".load", "Row": ".load", "read_rows": ".load", "Collator": ".tasks", "pack": ".tasks",
    "IGNORE_INDEX": ".templates", "TEMPLATES": ".templates",
    "FORMATS": ".formats", "Sample": ".sample", "read_samples": ".formats", "unpaired_examples": ".sample",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deltatune.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
