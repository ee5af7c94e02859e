"""Which linear layers ``quantize`` keeps for ``skip_modules`` and the model's ``_keep_in_fp32_modules`` (split from
quant_tools.py, at its line limit), and which layers the module-level rule of 2026-12-07 keeps that the old rule,
an entry matched against the layer's own name only, quantised (``skip_changes``: a trained run's note)."""

from __future__ import annotations

import re

from torch import nn

from ..targets import matches

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"
"""transformers' ``should_convert_module``: a regex matches from the start of the name up to a '.' or its end."""


def skipped(name: str, skip: list[str] | str | None) -> bool:
    """Whether ``skip_modules`` keeps the linear layer ``name``: a regex as transformers 5.25's skip modules
    (``re.match`` from the start of the layer's full name to a module boundary: ``model\\.layers\\.1`` keeps
    ``model.layers.1.*``, not ``model.layers.10.*``); a list entry by deltatune's '.'-bounded suffix rule (as
    ``target_modules``) against the layer or any module above it (``mlp``, ``layers.0``, ``model.layers.1.mlp``)."""
    if not skip:
        return False
    if isinstance(skip, str):
        return re.match(rf"(?:{skip}){_BOUNDARY}", name) is not None
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), skip) for i in range(len(parts), 0, -1))


def kept_fp32(name: str, fp32: list[str]) -> bool:
    """Whether the model's ``_keep_in_fp32_modules`` keeps the layer ``name``: an entry naming the layer (a
    '.'-bounded suffix: T5's ``wo``) or, as transformers' 4-bit loading, a module holding it by its full path
    (Blip-2's ``qformer`` keeps ``qformer.*``; ``norm`` does not keep ``model.norm.linear``)."""
    return matches(name, fp32) or any(name.startswith(f"{k}.") for k in fp32)


def skip_changes(model: nn.Module, skip: list[str] | str | None) -> list[tuple[str, int]]:
    """The ``skip_modules`` entries (a regex: itself) that keep linear layers of ``model`` which the rule before
    2026-12-07 (the entry matched against the layer's own name only) quantised, with how many."""
    if not skip or not isinstance(skip, (str, list, tuple)):
        return []  # a bad value: quantize names it
    try:
        re.compile(skip) if isinstance(skip, str) else None
    except re.error:
        return []
    names = [n for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]
    entries = [skip] if isinstance(skip, str) else list(skip)
    out = []
    for entry in entries:
        rule = entry if isinstance(skip, str) else [entry]
        n = sum(skipped(name, rule) and not matches(name, rule) for name in names)
        if n:
            out.append((entry, n))
    return out
