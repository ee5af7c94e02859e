"""A requantised merge of several adapters into one 4-bit layer, rounded as peft's (``merge_quantized``, split from
quant_tools.py at its line limit): peft's bitsandbytes ``Linear4bit.merge`` dequantises W, adds one adapter's s B A
and quantises the sum, adapter after adapter, so W + s1 B1 A1 is rounded to 4 bits before s2 B2 A2 is added."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from .quant import Linear4bit


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


@contextmanager
def stepwise(layers: dict[str, Linear4bit], settings: dict[str, tuple]) -> Iterator[None]:
    """Within, the 4-bit ``layers`` (name -> layer; ``settings``: name -> ``from_linear``'s arguments after the
    layer) dequantise to fp32 (peft adds s B A to W in fp32 and rounds the sum once, by quantising it; bf16 compute
    would round it to bf16 first) and each merge after the first into a layer starts from the 4-bit rounding of the
    one before, as peft's. Afterwards the layers an unmerged adapter keeps are as before."""
    for name, layer in layers.items():
        layer.compute_dtype = torch.float32
        layer.dequantize = partial(_dequantized, layer, (torch.float32, *settings[name][1:]))
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.compute_dtype = settings[name][0]
            layer.__dict__.pop("dequantize", None)
