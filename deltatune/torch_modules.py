"""What deltatune reads and changes of plain torch / transformers / diffusers modules, knowing nothing of adapters:
replacing a submodule, a linear layer's shape, a packed weight's count, activation (gradient) checkpointing. Split
from layer.py (session 59, when layer.py was at its limit), which re-exports each for the methods (they import only
config, layer and targets of the package)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on in ``model``: transformers' ``is_activation_checkpointing``
    (5.24 on), else ``is_gradient_checkpointing`` (earlier releases; 5.24 deprecates it with a warning per call)."""
    names = [n for n in ("is_activation_checkpointing", "is_gradient_checkpointing") if hasattr(type(model), n)]
    return bool(getattr(model, names[0])) if names else False


def enable_checkpointing(model: nn.Module, kwargs: dict, **options: Any) -> None:
    """Turn on activation (gradient) checkpointing in ``model`` with these ``torch.utils.checkpoint`` ``kwargs``:
    transformers' ``activation_checkpointing_enable`` (newer releases; ``options`` such as ``every_n_layers`` go to
    it), a diffusers model's ``enable_gradient_checkpointing`` (a UNet, an SD3 transformer: what diffusers' scripts'
    ``--gradient_checkpointing`` calls), else ``gradient_checkpointing_enable`` (older transformers; 5.25 deprecates
    it with a warning per call)."""
    if hasattr(type(model), "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
    elif hasattr(type(model), "enable_gradient_checkpointing"):
        from torch.utils.checkpoint import checkpoint

        kwargs = {"use_reentrant": False, **kwargs}
        odd = {k: v for k, v in options.items() if v != {"every_n_layers": 1, "offload": False}.get(k, object())}
        if kwargs["use_reentrant"] is not False:  # (reentrant, None too: a block whose inputs need no grad trains
            odd = {**odd, "use_reentrant": kwargs["use_reentrant"]}  # none of its LoRA)
        if odd:
            got = ", ".join(f"{k}={v!r}" for k, v in odd.items())
            raise ValueError(f"{type(model).__name__}: diffusers' checkpointing runs every block non-reentrant "
                             f"(use_reentrant=False, every_n_layers=1, offload=False); got {got}")  # fmt: skip
        model.enable_gradient_checkpointing(lambda module, *a, **kw: checkpoint(module.__call__, *a, **kw, **kwargs))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at dotted path ``name`` under ``root``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def logical_numel(t: torch.Tensor) -> int:
    """How many parameters ``t`` stands for. Packed low-bit storage says so itself: ``elements_per_item`` (values per
    stored element), or the logical shape in ``quant_state.shape`` (bitsandbytes' Params4bit: two 4-bit values a byte)."""
    if (per_item := getattr(t, "elements_per_item", None)) is not None:
        return t.numel() * per_item
    if (shape := getattr(getattr(t, "quant_state", None), "shape", None)) is not None:
        return torch.Size([int(d) for d in shape]).numel()
    return t.numel()


def linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(d_in, d_out, fan_in_fan_out) of a linear layer, None for any other module: the one place that tells.

    transformers' GPT-2 ``Conv1D`` stores its weight (d_in, d_out) (fan_in_fan_out); ``nn.Linear`` and the layers
    that stand for one (4-bit and 8-bit linears) say ``in_features`` / ``out_features``.
    """
    if type(module).__name__ == "Conv1D":
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out), True
    if isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return int(module.in_features), int(module.out_features), False
    return None


def replace_module(root: nn.Module, path: str, module: nn.Module | None) -> None:
    """Put ``module`` at dotted ``path`` under ``root``; None removes what is there."""
    if module is not None:
        return set_submodule(root, path, module)
    parent, _, child = path.rpartition(".")
    delattr(root.get_submodule(parent) if parent else root, child)
