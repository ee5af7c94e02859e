"""OLoRA (``init_lora_weights="olora"``) on a 4-bit base layer, as peft 0.21.2's ``olora_init`` does on a bitsandbytes
``Linear4bit``: W dequantised to fp32, W = Q R, B = Q_r, A = R_r, and the residual W - s B A quantised again in the
layer's own format (bitsandbytes: ``Params4bit`` with the weight's quant type, storage and double quantisation, as
peft; deltatune's ``Linear4bit``: its own settings), and on bitsandbytes' 8-bit ``Linear8bitLt`` (transformers'
``load_in_8bit``) as peft's: the residual an ``Int8Params`` again, which bitsandbytes rounds to fp16 and quantises row
by row. The full-precision case is methods/_lora_init.py's."""

from __future__ import annotations

import torch
from torch import nn

from .quant import Linear4bit, _dequantize_weight, _is_4bit_layer, _quantize_weight, is_quantized


def applies(base: nn.Module) -> bool:
    """Whether OLoRA on ``base`` goes through here: a 4-bit layer (deltatune's, or bitsandbytes' from transformers), or
    bitsandbytes' 8-bit ``Linear8bitLt``."""
    return is_quantized(base)


def olora(layer: nn.Module, name: str) -> nn.Parameter:
    """peft's ``olora_init`` for adapter ``name`` of a LoRA layer whose base is 4-bit: A and B (fp32) from the
    dequantised W, the base's weight replaced by the 4-bit residual. Returns the replaced weight (the Parameter
    itself: its bytes and quant state), which a refused load puts back (``restore``)."""
    base, A, B = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    scaling, r, original = layer.scaling[name], A.out_features, base.weight
    backend = base.backend if isinstance(base, Linear4bit) else "bitsandbytes"
    eight = not _is_4bit_layer(base)
    with torch.no_grad():
        if eight:  # (quant_tools imports this module's callers: imported here)
            from .quant_tools import _dequantize_8bit

            weight = _dequantize_8bit(base).weight.to(torch.float32)
        else:
            weight = _dequantize_weight(original, backend).to(torch.float32)
        Q, R = torch.linalg.qr(weight)
        A.weight.data, B.weight.data = R[:r].contiguous(), Q[:, :r].contiguous()
        weight -= scaling * B.weight @ A.weight
        if eight:  # peft: orig_weight.__class__(residual, requires_grad=..., has_fp16_weights=...).to(device)
            original.__dict__["_olora_state"] = (base.state.CB, base.state.SCB)  # (restore puts them back)
            kwargs = {"requires_grad": original.requires_grad, "has_fp16_weights": original.has_fp16_weights}
            base.weight = type(original)(weight, **kwargs).to(original.device)
            base.state.CB, base.state.SCB = base.weight.CB, base.weight.SCB  # read, before a forward, as the new W
        elif isinstance(base, Linear4bit):
            args = (base.double_quant, base.quant_type, base.quant_storage)
            residual = _quantize_weight(weight, backend, *args)
            base.weight = nn.Parameter(residual, requires_grad=False) if backend == "torchao" else residual
        else:  # peft: orig_weight.__class__(residual, quant_type=..., quant_storage=..., compress_statistics=...)
            kwargs = {
                k: getattr(original, k) for k in ("quant_type", "quant_storage", "compress_statistics", "module")
            }
            base.weight = type(original)(weight, **kwargs).to(original.device)
    return original


def restore(base: nn.Module, original: nn.Parameter) -> None:
    """Put back the 4-bit (or 8-bit) weight ``olora`` replaced (a load that failed after the init)."""
    base.weight = original
    if (state := original.__dict__.pop("_olora_state", None)) is not None:
        base.state.CB, base.state.SCB = state
