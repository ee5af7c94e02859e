"""DoRA on ``nn.Embedding`` and ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` LoRA layers, in peft 0.21.2's operations
and order (its ``DoraEmbeddingLayer`` and ``_DoraConvNdLayer``), so outputs, gradients and files match peft's to the
bit.

Embedding: W (vocab, dim) looks up rows, so DoRA's magnitude m is one value per embedding dimension (dim,), the
norm taken over the vocabulary; the output is (m / ||W + s dW||) * (W[x] + s (A^T[x] B^T)) (times embed_scale).
Conv: m is stored (1, c_out, 1, ...) as peft's (one 1 per kernel dimension), the norm of each output channel's
kernel; the update is
(m / ||W + s B A|| - 1) * conv(x, W) + (m / ||W + s B A||) * s * B(A(x)), the norm detached (as the paper).
A quantised linear base (QDoRA: 4-bit or bitsandbytes' 8-bit) gives its W dequantised for the norm and the
magnitude, as peft's dequantize_module_weight. The linear layers' DoRA is in _dora.py.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import Linear4bit, _backend, _dequantize_weight, _is_bnb_4bit, is_quantized


def base_weight(base: nn.Module) -> torch.Tensor:
    """W of ``base``, dequantised where it is stored quantised (peft's dequantize_module_weight: a 4-bit W in the
    dtype it was quantised from, an 8-bit one as int8 x row scale / 127 in fp32)."""
    if isinstance(base, Linear4bit):
        return _dequantize_weight(base.weight, base.backend)
    if _is_bnb_4bit(base):
        return _dequantize_weight(base.weight, "bitsandbytes")
    if is_quantized(base):  # bitsandbytes' Linear8bitLt: its row scales move to its state on a forward
        scb = base.state.SCB if base.state.SCB is not None else base.weight.SCB
        return _backend("bitsandbytes").functional.int8_vectorwise_dequant(
            base.weight.data, scb.to(base.weight.device)
        )
    return base.weight


def embedding_lora_weight(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """dW^T (dim, vocab) as peft's forward forms it: (A^T B^T)^T."""
    return (A.T @ B.T).T


def conv_lora_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """B A reshaped to the base kernel's shape, as peft's _DoraConvNdLayer forms it."""
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    r = A.shape[0]
    return torch.mm(B.view([-1, r]), A.view([r, -1])).reshape(layer._weight.shape)


def conv_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_2 of each output channel's kernel, shaped (1, c_out, 1, ...) as peft's magnitude."""
    return weight.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).transpose(1, 0)


def init_magnitude(layer: nn.Module, name: str) -> nn.Parameter:
    """m = ||W + s dW|| of an embedding's or a conv's adapter ``name``, as peft's update_layer computes it."""
    weight, s = layer._weight, layer.scaling[name]
    with torch.no_grad():
        if weight.dim() >= 3:  # a conv's kernel (c_out, c_in / groups, *k)
            A = layer.lora_A[name].weight
            half = A.dtype == torch.float16  # peft multiplies fp16 factors in fp32 and rounds the product
            lora_weight = conv_lora_weight(layer, name) if not half else _half_product(layer, name)
            norm = conv_norm(weight + s * lora_weight)
        else:
            A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
            half = A.dtype == torch.float16
            lora_weight = (B.float() @ A.float()).half() if half else B @ A
            total = weight.T + s * lora_weight
            norm = torch.linalg.norm(total, dim=1).to(total.dtype)
    return nn.Parameter(norm)


def _half_product(layer: nn.Module, name: str) -> torch.Tensor:
    A, B = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
    r = A.shape[0]
    return torch.mm(B.view([-1, r]), A.view([r, -1])).reshape(layer._weight.shape).half()


def embedding_scale(layer: nn.Module, name: str) -> torch.Tensor:
    """m / ||W + s dW|| (dim,) of an embedding's adapter ``name``, the norm detached."""
    A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    lora_weight = embedding_lora_weight(A, B).detach()
    total = layer._weight.T + layer.scaling[name] * lora_weight
    norm = torch.linalg.norm(total, dim=1).to(total.dtype).detach()
    return layer.lora_magnitude_vector[name] / norm


def conv_dora(layer: nn.Module, name: str, x_in: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """DoRA's addition to a conv's output ``result`` (= conv(x, W) + bias) for adapter ``name`` on the (dropped-out)
    input ``x_in``, as peft's _DoraConvNdLayer.forward."""
    base = layer.base_layer
    weight, s = layer._weight, layer.scaling[name]
    norm = conv_norm(weight + s * conv_lora_weight(layer, name).detach()).detach()
    scale = layer.lora_magnitude_vector[name] / norm
    if isinstance(layer.lora_dropout[name], nn.Identity) or not layer.training:
        base_result = result if base.bias is None else result - base.bias.view(1, -1, *(1,) * (result.dim() - 2))
    else:  # dropout changed the input: W x recomputed on it, as peft's (padded as the base pads, as A does here)
        base_result = base._conv_forward(x_in, weight, None)
    return (scale - 1) * base_result + scale * layer.lora_B[name](layer.lora_A[name](x_in)) * s
