"""peft's keyword arguments of ``load_adapter`` / ``from_pretrained`` beyond deltatune's own: the hub's, those of
peft's device dispatch (no effect here), and peft 0.22's ``strict_adapter_check``.

Split from adapter_io.py in session 57 (adapter_io.py was at its 600-line limit).
"""

from __future__ import annotations

from typing import Any

from .files import HUB_KWARGS

NO_EFFECT = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index", "use_safetensors")
"""peft's dispatch arguments (and ``use_safetensors``: peft reads adapter_model.safetensors whenever there is one),
accepted with no effect: deltatune keeps no module offloaded."""

STRICT = ("warn", "error", "ignore")
"""peft 0.22's ``strict_adapter_check`` values (peft 0.21 takes the argument and ignores it)."""


def split_load_kwargs(kwargs: dict[str, Any], caller: str = "load_adapter") -> dict[str, Any]:
    """The hub arguments out of ``kwargs`` (``files.HUB_KWARGS``); the rest checked, nothing changed in ``kwargs``.

    ``strict_adapter_check`` (peft 0.22's: "warn", "error" or "ignore" for a file with missing or unexpected adapter
    keys) is checked as peft checks it; whichever value, deltatune refuses such a file (``AdapterLoadError``, the
    model unchanged) rather than load the rest, so "error" is its behaviour and the others change nothing.

    Raises:
        ValueError: ``strict_adapter_check`` is none of peft's values.
        TypeError: an argument neither deltatune nor peft takes.
    """
    strict = kwargs.get("strict_adapter_check", "warn")
    if not isinstance(strict, str) or strict not in STRICT:
        raise ValueError(f"strict_adapter_check must be one of 'warn', 'error' or 'ignore', got {strict!r}")
    unknown = [k for k in kwargs if k not in (*HUB_KWARGS, *NO_EFFECT, "strict_adapter_check")]
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
