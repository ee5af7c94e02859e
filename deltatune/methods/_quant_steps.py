"""A requantised merge of several adapters into one 4-bit layer, rounded as peft's (``merge_quantized``, split from
quant_tools.py at its line limit): peft's bitsandbytes ``Linear4bit.merge`` dequantises W, adds one adapter's s B A
and quantises the sum, adapter after adapter, so W + s1 B1 A1 is rounded to 4 bits before s2 B2 A2 is added; its
``Linear8bitLt.merge`` alike in 8 bits (``Int8Params`` of the sum, dequantised by its row scales for the next)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..layer import DequantizedLinear
from .quant import Linear4bit, _backend


def _dequantized(layer: Linear4bit, settings: tuple, dtype: torch.dtype | None = None) -> nn.Linear:
    """``layer.dequantize(dtype)``, the plain layer offering a ``dequantize()`` of its own: the next adapter's merge
    (``_dequantize_base``) then takes W quantised again with ``settings`` (``from_linear``'s) and dequantised."""
    plain = Linear4bit.dequantize(layer, dtype)
    plain.dequantize = partial(_requantized, plain, settings, layer.conv1d)
    return plain


def _requantized(plain: nn.Linear, settings: tuple, conv1d: bool, dtype: torch.dtype | None = None) -> nn.Linear:
    layer = Linear4bit.from_linear(plain, *settings)
    layer.conv1d = conv1d
    return _dequantized(layer, settings, dtype)


def _int8_copy(plain: nn.Linear, weight: torch.Tensor, fp16: bool, dtype: torch.dtype | None = None) -> nn.Linear:
    """A dequantised 8-bit layer holding ``weight`` (its bias shared), whose ``dequantize()`` rounds W to int8 with
    row scales (peft's ``Int8Params(W + s B A)``) and back, for the next adapter's merge."""
    layer = DequantizedLinear(plain.in_features, plain.out_features, bias=False, device="meta")
    layer.weight, layer.bias = nn.Parameter(weight, requires_grad=False), plain.bias
    layer.dequantize = partial(_int8_again, layer, fp16)
    return layer


def _int8_first(plain: nn.Linear, fp16: bool, dtype: torch.dtype | None = None) -> nn.Linear:
    return _int8_copy(plain, plain.weight.detach().clone(), fp16)  # (a copy: safe_merge's try leaves W as it was)


def _int8_again(plain: nn.Linear, fp16: bool, dtype: torch.dtype | None = None) -> nn.Linear:
    bnb, w = _backend("bitsandbytes"), plain.weight
    q = bnb.nn.Int8Params(w.data.cpu(), requires_grad=False, has_fp16_weights=fp16).to(w.device)
    return _int8_copy(plain, bnb.functional.int8_vectorwise_dequant(q.data, q.SCB.to(w.device)), fp16)


@contextmanager
def stepwise(
    layers: dict[str, Linear4bit], settings: dict[str, tuple], eight: dict[str, tuple[nn.Linear, bool]]
) -> Iterator[None]:
    """Within, the 4-bit ``layers`` (name -> layer; ``settings``: name -> ``from_linear``'s arguments after the
        layer) dequantise to fp32 (peft adds s B A to W in fp32 and rounds the sum once, by quantising it; bf16 compute
        would round it to bf16 first) and each merge after the first into a layer starts from the 4-bit rounding of the
        one before, as peft's; the dequantised 8-bit layers ``eight`` (name -> (layer, has_fp16_weights)) alike in 8 bits
    (the first merge into a copy). Afterwards the layers an unmerged adapter keeps are as before."""
    for name, layer in layers.items():
        layer.compute_dtype = torch.float32
        layer.dequantize = partial(_dequantized, layer, (torch.float32, *settings[name][1:]))
    for plain, fp16 in eight.values():
        plain.dequantize = partial(_int8_first, plain, fp16)
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.compute_dtype = settings[name][0]
            layer.__dict__.pop("dequantize", None)
        for plain, _ in eight.values():
            plain.__dict__.pop("dequantize", None)
