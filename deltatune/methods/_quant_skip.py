"""Which linear layers ``quantize`` keeps for ``skip_modules`` and the model's ``_keep_in_fp32_modules`` (split from
quant_tools.py, at its line limit), and which layers the module-level rule of 2026-12-07 keeps that the old rule,
an entry matched against the layer's own name only, quantised (``skip_changes``: a trained run's note)."""

from __future__ import annotations

import re

from torch import nn

from ..config import ConfigError, check_regex
from ..targets import matches

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"
"""transformers' ``should_convert_module``: a regex matches from the start of the name up to a '.' or its end."""


def check_skip(skip: object, key: str = "skip_modules") -> None:
    """ConfigError naming ``key`` (a recipe's: ``model.quantization.skip_modules``) unless ``skip`` is None, a regex
    (a valid one) or a list of names (a number or a None in the list was a TypeError from deep in the matching)."""
    if isinstance(skip, str):
        check_regex(key, skip)
    elif skip is not None and (not isinstance(skip, (list, tuple)) or not all(isinstance(e, str) for e in skip)):
        raise ConfigError(f"{key} must be a list of module names or a regex string, got {skip!r}")


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


def kept_fp32(name: str, fp32: list[str], strict: list[str] = ()) -> bool:
    """Whether the model's ``_keep_in_fp32_modules`` (``fp32``) or ``_keep_in_fp32_modules_strict`` (``strict``)
    keeps the layer ``name``: an entry naming the layer (a '.'-bounded suffix: T5's ``wo``) or, for ``fp32`` only, as
    transformers' 4-bit loading, a module holding it by its full path (Blip-2's ``qformer`` keeps ``qformer.*``;
    ``norm`` does not keep ``model.norm.linear``). transformers 5.25's bitsandbytes quantizer passes no strict entry
    to ``get_modules_to_not_convert``: a strict ``audio_tower`` is quantised there, so here too."""
    return matches(name, [*fp32, *strict]) or any(name.startswith(f"{k}.") for k in fp32)


def skip_changes(model: nn.Module, skip: list[str] | str | None) -> list[tuple[str, str, int]]:
    """The entries that keep linear layers of ``model`` which the rules before 2026-12-07 (an entry matched against
    the layer's own name only) quantised, with how many: ("skip_modules", entry (a regex: itself), n) and
    ("the model's _keep_in_fp32_modules", entry, n) (Blip-2's ``qformer``). ConfigError for a bad ``skip``
    (``check_skip``), before anything is matched."""
    check_skip(skip)
    names = [n for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]
    fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or ())  # (strict entries keep no module: kept_fp32)
    out = [("the model's _keep_in_fp32_modules", k, sum(kept_fp32(n, [k]) and not matches(n, [k]) for n in names))
           for k in fp32]  # fmt: skip
    entries = [] if not skip else [skip] if isinstance(skip, str) else list(skip)
    for entry in entries:
        rule = entry if isinstance(skip, str) else [entry]
        out.append(("skip_modules", entry, sum(skipped(n, rule) and not matches(n, rule) for n in names)))
    return [(what, entry, n) for what, entry, n in out if n]
