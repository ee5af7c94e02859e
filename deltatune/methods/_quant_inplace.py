"""A LoRA merge into a bitsandbytes layer that transformers loaded in 4 or 8 bits (``BitsAndBytesConfig``), as peft's
bitsandbytes ``Linear4bit.merge`` / ``Linear8bitLt.merge`` (peft/tuners/lora/bnb.py): W dequantised as peft's
``dequantize_bnb_weight`` (4-bit: in its quant state's dtype; 8-bit: int8 x row scale / 127 in fp32), the adapter's
s B A added (unmerge: taken off) in the wider of W's and the adapter's dtypes (an 8-bit LoRA merge: the adapter's),
and the sum (DoRA's: cast to W's dtype, as peft's ``merge_safe``) quantised again with W's own settings:
``Params4bit(**W's settings)``, ``Int8Params(has_fp16_weights=...)`` with the layer's state reset, made the weight
of the same layer, as peft's (hooks on it, accelerate's included, compute with the new W). The layer stays a
bitsandbytes layer, so ``merge_and_unload`` leaves a model transformers saves and loads back in 4 or 8 bits, as
peft's. A refused merge leaves the layer as it was; ``safe_merge``'s trial puts the old weight back
(``kept_in_place``). deltatune's own 4-bit layers (``quantize``) merge as before: dequantised for good
(docs/qlora.md)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..layer import DequantizedLinear
from ._dora_layers import base_weight
from .quant import _backend, _is_bnb_4bit, is_quantized


def bnb_kind(module: nn.Module) -> str | None:
    """The kind ("4bit" / "8bit") of a bitsandbytes layer transformers loaded (merged in place as peft's), else None
    (deltatune's own Linear4bit, a plain layer)."""
    if _is_bnb_4bit(module):
        return "4bit"
    return "8bit" if is_quantized(module) and type(module).__module__.startswith("bitsandbytes") else None


def _quantize_into(module: nn.Module, kind: str, w: torch.Tensor) -> None:
    """``w`` quantised as peft's merge quantises it, made the weight of the bitsandbytes layer ``module`` itself (as
    peft's: a hook on the layer, accelerate's forward included, computes with it); an 8-bit layer's state a new one,
    reset (``kept_in_place`` puts the old weight and state back)."""
    bnb, weight = _backend("bitsandbytes"), module.weight
    if kind == "4bit":
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(requires_grad=False, bnb_quantized=False)
        module.weight = bnb.nn.Params4bit(w.to("cpu"), **kwargs).to(weight.device)
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = module.weight.quant_state
        return
    state = copy.copy(module.state)
    module.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights).to(
        weight.device
    )
    state.reset_grads()
    module.state = state


@contextmanager
def kept_in_place(base: nn.Module | None) -> Iterator[None]:
    """A bitsandbytes ``base``'s weight (4-bit: with its quant state) and 8-bit state as they are now, put back after
    (``check_merge``'s trial merge, which ``_quantize_into`` writes into the layer itself). Any other base: nothing."""
    if base is None or bnb_kind(base) is None:
        yield
        return
    weight, held = base._parameters["weight"], {k: v for k, v in vars(base).items() if k in ("state", "quant_state")}
    try:
        yield
    finally:
        base._parameters["weight"] = weight
        vars(base).update(held)


@contextmanager
def requantized_after(layer: nn.Module, name: str) -> Iterator[None]:
    """Within, a LoRA ``layer`` over a bitsandbytes layer (transformers') has for ``base_layer`` a plain layer holding
    W dequantised (``base_weight``, in the wider of its and the adapter's dtypes), which adapter ``name``'s merge or
    unmerge writes into; afterwards the bitsandbytes layer is back, the result quantised again into it
    (``_quantize_into``; a DoRA one cast to W's dtype first, as peft's ``merge_safe`` / ``unmerge``); a ``safe_merge``
    whose sum is not finite refused first (peft's ValueError: the quantised bytes would hide it from
    ``check_merge``). On an error, the layer is left as it was. Any other base layer: nothing done."""
    base = layer.base_layer
    if (kind := bnb_kind(base)) is None:
        yield
        return
    dtype = layer.lora_A[name].weight.dtype if name in getattr(layer, "lora_A", {}) else torch.float32
    w, dora = base_weight(base), name in getattr(layer, "lora_magnitude_vector", {})  # (peft's dequantize_bnb_weight)
    if kind == "4bit" or dora:  # peft's W + s B A promoted; its 8-bit LoRA merge casts W to the adapter's dtype first
        dtype = torch.promote_types(w.dtype, dtype)
    plain = DequantizedLinear(base.in_features, base.out_features, bias=False, device="meta")
    plain.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    plain.bias = base.bias  # (shared: a lora_bias merge writes into it in place, as peft's)
    layer.base_layer = plain
    try:
        yield
        if layer.safe_merged.get(name) and name not in layer.merged_adapters and not plain.weight.isfinite().all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")  # peft's
        _quantize_into(base, kind, plain.weight.detach().to(w.dtype) if dora else plain.weight.detach())
    finally:
        layer.base_layer = base
