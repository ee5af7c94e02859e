"""DoRA's addition to a LoRA linear layer's output, in PEFT's formulation and operation order (so the numbers match
PEFT's), with a backward that keeps less.

The update is ``(scale - 1) * W x + scale * s * B A x`` with ``scale = m / ||W + s B A||`` (the norm detached, as
the paper and PEFT do). Autograd on that expression keeps two (tokens, d_out) tensors per layer for the magnitude's
gradient: ``W x`` and the LoRA output ``B A x``. ``DoraUpdate`` keeps only ``W x`` and the rank-r ``A x`` (which
B's gradient needs anyway) and recomputes the rest in its backward, where autograd differentiates the same
operations on the same values: the gradients are the plain graph's to the bit (``tests/test_peft_equivalence.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dora_layers import base_weight
from .quant import _is_bnb_4bit


def _update(scale: torch.Tensor, base: torch.Tensor, h: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    return (scale - 1) * base + scale * F.linear(h, B) * s


class DoraUpdate(torch.autograd.Function):
    """``_update`` whose backward recomputes it (under the forward's autocast state) instead of keeping its
    intermediates: the (tokens, d_out) LoRA output is not kept between the passes."""

    @staticmethod
    def forward(ctx, scale, base, h, B, s):
        device = base.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.s = s
        ctx.save_for_backward(scale, base, h, B)
        return _update(scale, base, h, B, s)

    @staticmethod
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_(needed) for t, needed in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = _update(*inputs, ctx.s)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (*(next(grads) if t.requires_grad else None for t in inputs), None)


def dora(layer: nn.Module, name: str, x_in: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """DoRA's addition to the base output ``result`` = W x (+ bias) of ``layer`` (a ``LoraLinear``, not imported:
    lora.py imports this file) for adapter ``name``, on the (dropped-out) input ``x_in``:
    (m / ||W + s B A|| - 1) * W x + (m / ||W + s B A||) * s * B A x."""
    A, B, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    weight = base_weight(layer.base_layer).to(A.dtype)  # a quantised W dequantised (QDoRA)
    with torch.no_grad():  # B A (bf16 under autocast) cast to A's dtype, then scaled: peft's order
        lora_weight = (B @ A).to(A.dtype)
        norm = row_norm(weight + s * (lora_weight.T if layer.fan_in_fan_out else lora_weight), layer._rows_dim)
    scale = layer.lora_magnitude_vector[name] / norm  # (d_out,)
    if isinstance(layer.lora_dropout[name], nn.Identity) or not layer.training:
        bias = getattr(layer.base_layer, "bias", None)
        base = (result - bias if bias is not None else result).to(A.dtype)  # in result's dtype, as peft
    else:  # dropout changed the input: W x is recomputed on the dropped-out x, as PEFT does
        base = F.linear(x_in, weight.T if layer.fan_in_fan_out else weight)
    h = F.linear(x_in, A)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (scale, base, h, B)):
        return DoraUpdate.apply(scale, base, h, B, s)
    return _update(scale, base, h, B, s)


def row_norm(weight: torch.Tensor, rows_dim: int) -> torch.Tensor:
    """L2 norm of each output row of a weight stored with outputs along ``rows_dim``."""
    w = weight.transpose(0, rows_dim) if rows_dim else weight
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)


def merge_weight(layer: nn.Module, name: str, weight: torch.Tensor, delta: torch.Tensor, base: torch.Tensor) -> None:
    """W <- m (W + s B A) / ||W0 + s B A|| in place, ``base`` = W0 (without the adapters merged before), the norm
    kept for the unmerge. m (fp32: unrounded, as peft) is (d_out,) or a conv's (1, c_out, 1, 1)."""
    layer._dora_norm[name] = norm = row_norm(base + delta, layer._rows_dim)
    factor = layer.lora_magnitude_vector[name].detach().flatten() / norm
    weight.copy_((weight + delta) * _expand(factor, weight, layer._rows_dim))


def unmerge_weight(layer: nn.Module, name: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
    """W <- W / (m / ||W0 + s B A||) - s B A in place, with the norm the merge kept."""
    factor = layer.lora_magnitude_vector[name].detach().flatten() / layer._dora_norm.pop(name)
    weight.copy_(weight / _expand(factor, weight, layer._rows_dim) - delta)


def _expand(v: torch.Tensor, weight: torch.Tensor, rows_dim: int) -> torch.Tensor:
    return v.view([-1 if d == rows_dim else 1 for d in range(weight.dim())])


def add_dora(layer: nn.Module, name: str, x_in: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` plus DoRA's addition for adapter ``name`` (``layer._dora``: a linear's or a conv's), the sum rounded
    to ``result``'s dtype where peft's quantised layers round it (outside autocast)."""
    out = result + layer._dora(layer, name, x_in, result)
    return out.to(result.dtype) if layer._rounds_update() else out


def place_linear(layer: nn.Module, name: str, dtype: torch.dtype, dora: bool) -> None:
    """Move a linear's new adapter ``name`` (drawn in fp32) to the base's device and ``dtype`` and, with ``dora``,
    add m = ||W + s B A|| (a quantised W dequantised), as peft's update_layer. peft moves an adapter on a
    bitsandbytes 4-bit layer to its compute dtype (a bf16 one rounds the draw and m) and autocast_adapter_dtype
    takes it back to fp32: the same here."""
    base = layer.base_layer
    compute = getattr(base, "compute_dtype", None) if _is_bnb_4bit(base) else None
    for module in (layer.lora_A[name], layer.lora_B[name]):
        module.to(base.weight.device, compute or dtype)
    if dora:
        with torch.no_grad():
            total = base_weight(base) + layer.delta_weight(name)  # in the wider dtype, as peft's
            layer.lora_magnitude_vector[name] = nn.Parameter(row_norm(total, layer._rows_dim).to(total.dtype))
    if compute not in (None, dtype):
        layer.lora_A[name].to(dtype), layer.lora_B[name].to(dtype)
        if dora:
            layer.lora_magnitude_vector[name].data = layer.lora_magnitude_vector[name].data.to(dtype)
