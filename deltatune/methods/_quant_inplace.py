"""A LoRA merge into a bitsandbytes layer that transformers loaded in 4 or 8 bits (``BitsAndBytesConfig``), as peft's
bitsandbytes ``Linear4bit.merge`` / ``Linear8bitLt.merge`` (peft/tuners/lora/bnb.py): W dequantised as peft's
``dequantize_bnb_weight`` (4-bit: in its quant state's dtype; 8-bit: int8 x row scale / 127 in fp32), the adapter's
s B A added (unmerge: taken off) in the wider of W's and the adapter's dtypes, and the sum quantised again with W's
own settings: ``Params4bit(**W's settings)``, ``Int8Params(has_fp16_weights=...)`` with the layer's state reset. The
layer stays a bitsandbytes layer, so ``merge_and_unload`` leaves a model transformers saves and loads back in 4 or 8
bits, as peft's. The quantised layer is a new module holding the new weight: a refused or tried merge (``safe_merge``'s
check) that puts the old layer back leaves it untouched. deltatune's own 4-bit layers (``quantize``) merge as before:
dequantised for good (docs/qlora.md)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..layer import DequantizedLinear
from .quant import _backend, _dequantize_weight, _is_bnb_4bit, is_quantized


def bnb_kind(module: nn.Module) -> str | None:
    """The kind ("4bit" / "8bit") of a bitsandbytes layer transformers loaded (merged in place as peft's), else None
    (deltatune's own Linear4bit, a plain layer)."""
    if _is_bnb_4bit(module):
        return "4bit"
    return "8bit" if is_quantized(module) and type(module).__module__.startswith("bitsandbytes") else None


def _dequantized(module: nn.Module, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """W as peft's ``dequantize_bnb_weight`` reads it, in ``dtype`` (peft adds s B A to it in the wider dtype)."""
    weight = module.weight
    if kind == "4bit":
        w = _dequantize_weight(weight, "bitsandbytes")  # (a CPU-repacked weight unpacked first)
        return w.to(torch.promote_types(w.dtype, dtype))
    if module.state.SCB is None:  # peft's: the row scales move to the state at the first forward
        module.state.SCB = weight.SCB
    bnb = _backend("bitsandbytes")
    return bnb.functional.int8_vectorwise_dequant(weight.data, module.state.SCB.to(weight.device)).to(dtype)


def _quantized(module: nn.Module, kind: str, w: torch.Tensor) -> nn.Module:
    """A copy of the bitsandbytes layer ``module`` (parameters, buffers and hooks as dicts of their own; bias shared)
    holding ``w`` quantised as peft's merge quantises it."""
    bnb, weight = _backend("bitsandbytes"), module.weight
    new = copy.copy(module)
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    if kind == "4bit":
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(requires_grad=False, bnb_quantized=False)
        if "module" in kwargs:
            kwargs["module"] = new
        new.weight = bnb.nn.Params4bit(w.to("cpu"), **kwargs).to(weight.device)
        if hasattr(new, "quant_state"):
            new.quant_state = new.weight.quant_state
        return new
    new.state = copy.copy(module.state)
    new.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights).to(
        weight.device
    )
    new.state.reset_grads()
    return new


@contextmanager
def requantized_after(layer: nn.Module, name: str) -> Iterator[None]:
    """Within, a LoRA ``layer`` over a bitsandbytes layer (transformers') has for ``base_layer`` a plain layer holding
    W dequantised (``_dequantized``), which adapter ``name``'s merge or unmerge writes into; afterwards the bitsandbytes
    layer is back, a new one holding the result quantised again (``_quantized``); a ``safe_merge`` whose sum is not
    finite refused first (peft's ValueError: the quantised bytes would hide it from ``check_merge``). On an error, the
    old layer is put back as it was. Any other base layer: nothing done."""
    base = layer.base_layer
    if (kind := bnb_kind(base)) is None:
        yield
        return
    dtype = layer.lora_A[name].weight.dtype if name in getattr(layer, "lora_A", {}) else torch.float32
    plain = DequantizedLinear(base.in_features, base.out_features, bias=False, device="meta")
    plain.weight = nn.Parameter(_dequantized(base, kind, dtype), requires_grad=False)
    plain.bias = base.bias  # (shared: a lora_bias merge writes into it in place, as peft's)
    layer.base_layer = plain
    try:
        yield
        if layer.safe_merged.get(name) and name not in layer.merged_adapters and not plain.weight.isfinite().all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")  # peft's
        layer.base_layer = _quantized(base, kind, plain.weight.detach())
    except BaseException:
        layer.base_layer = base
        raise
