"""The plain layer a merge writes into when LoRA's base is a bitsandbytes layer transformers loaded quantised
(``BitsAndBytesConfig(load_in_4bit=True)`` / ``load_in_8bit=True``), which offers no ``dequantize()`` of its own:
``merge_adapter()`` then dequantises it for good, as it does deltatune's own 4-bit layers (docs/qlora.md), where it
raised TypeError. (peft's bnb ``merge`` quantises W + s B A again in place; ``merge_quantized(requantize=True)`` is
that.) LoRA's ``_dequantize_base`` (methods/_lora_conv.py) asks here."""

from __future__ import annotations

from torch import nn

from .quant import Linear4bit, _is_4bit_layer, _is_bnb_4bit, is_quantized


def dequantized(module: nn.Module) -> nn.Module | None:
    """A ``DequantizedLinear`` computing as the bitsandbytes layer ``module`` did, W as peft's
    ``dequantize_bnb_weight`` gives it (4-bit: in the compute dtype; 8-bit: int8 x row scale / 127 in fp32), or None
    where ``module`` is no bitsandbytes layer or holds W in floating point. A 4-bit layer's CPU-packed bytes are unpacked (it is replaced)."""
    if _is_bnb_4bit(module):
        return Linear4bit.from_bnb(module).dequantize().train(module.training)
    if is_quantized(module) and not _is_4bit_layer(module) and not module.weight.is_floating_point():  # Linear8bitLt
        # (llm_int8_has_fp16_weight=True keeps W in floating point, with no row scales: merged into as it is)
        from .quant_tools import _dequantize_8bit

        return _dequantize_8bit(module).train(module.training)
    return None
