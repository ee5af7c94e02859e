"""Where bottleneck adapters sit (methods/bottleneck.py): the sub-layers a placement adapts in a model, found through
the family tables of ``targets.BOTTLENECK_TARGETS`` (or ``target_modules``), and the model's hidden size."""

from __future__ import annotations

import re

from torch import nn

from ..config import ConfigError, DeltaConfig
from ..targets import BOTTLENECK_TARGETS, MOE_BOTTLENECK, find_targets, fused_experts, model_type
from ._base_kept import refuse_beside_residual

_SUBLAYER_WORDS = {"attn": "attention output", "ffn": "feed-forward output"}


def locate(model: nn.Module, config: DeltaConfig) -> list[str]:  # (a BottleneckConfig)
    """Full names of the sub-layers to adapt: target_modules if given, else the family's entry in the table.

    A family missing from the table is tried against every known layout (a mixture of experts against Mixtral's
    only); the error names the sub-layers that no layout found.
    """
    refuse_beside_residual(model, "bottleneck")  # (before anything changes: locate runs first in inject)
    if config.target_modules is not None:
        return find_targets(model, config.target_modules, method="bottleneck")
    wanted = config.sublayers
    mtype = model_type(model)
    layouts = [BOTTLENECK_TARGETS[mtype]] if mtype in BOTTLENECK_TARGETS else list(BOTTLENECK_TARGETS.values())
    moe = mtype not in BOTTLENECK_TARGETS and fused_experts(model)
    if moe:  # another layout could find only the dense layers' MLPs: an adapter on some blocks, silently
        layouts = [MOE_BOTTLENECK]
    names = [n for n, _ in model.named_modules() if n]
    missing: set[str] = set(wanted)
    for layout in layouts:
        found = {kind: [n for n in names if re.fullmatch(layout[kind], n)] for kind in wanted}
        if all(found.values()):
            return [n for kind in wanted for n in found[kind]]
        missing &= {kind for kind, hits in found.items() if not hits}
    missing = missing or set(wanted)
    if moe:
        raise ConfigError(
            f"bottleneck ({config.config}): model type {mtype!r} is a mixture of experts not in "
            f"targets.BOTTLENECK_TARGETS, and its blocks are not laid out as Mixtral's (layers.N.self_attn.o_proj, "
            "layers.N.mlp); pass target_modules: the attention output projections and the whole MoE blocks"
        )
    what = ", ".join(f"{_SUBLAYER_WORDS[k]} ({k})" for k in wanted if k in missing)
    tried = "; ".join(sorted({layout[k] for layout in layouts for k in wanted if k in missing}))
    known = "" if mtype in BOTTLENECK_TARGETS else f" (model type {mtype!r} is not in targets.BOTTLENECK_TARGETS)"
    raise ConfigError(
        f"bottleneck ({config.config}): sub-layers not found in this model{known}: {what}; patterns tried: {tried}. "
        "Add the family to targets.BOTTLENECK_TARGETS or pass target_modules"
    )


def width(model: nn.Module) -> int | None:
    """The model's hidden size (the output size of a whole block), if its config says."""
    config = getattr(model, "config", None)
    size = getattr(config.get_text_config(), "hidden_size", None) if hasattr(config, "get_text_config") else None
    return size if isinstance(size, int) else None
