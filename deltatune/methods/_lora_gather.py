"""A mixed-adapter batch through a LoRA linear layer in two batched matmuls, whatever the number of adapters.

The row loop (``_LoraBase._routed``) runs one pair of matmuls per adapter present in the batch, on copies of that
adapter's rows: with 64 adapters in a batch of 64 rows that is 64 small products and 128 copies per layer. Here
each row gathers its own adapter's A and B (a copy of r x (d_in + d_out) numbers per row, small beside the
activations), and two ``bmm`` compute every row's update at once:

    out[i] = result[i] + s[i] * ((x[i] A[i]^T) B[i]^T)

with s[i] = 0 for a row whose adapter this layer does not hold (``BASE_ROW``, or a model whose adapters target
different layers). The arithmetic per row is the loop's; only the order of the batch's work changes.
It applies when every adapter in the batch is plain LoRA of one rank and dtype with no active dropout (dropout
draws a mask per adapter); otherwise the layer falls back to the loop.
"""

from __future__ import annotations

import torch
from torch import nn


def gathered(layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor | None:
    """``result`` plus each row's own adapter update (``layer.row_adapters``), or None where the loop must run."""
    unique, codes = layer.row_adapters.codes(x.shape[0], x.device)
    held = [name for name in unique if name in layer.scaling]
    if len(held) < 2 or not _plain(layer, held):
        return None
    A = torch.stack([layer.lora_A[name].weight for name in held])  # (k, r, d_in)
    B = torch.stack([layer.lora_B[name].weight for name in held])  # (k, d_out, r)
    dtype = A.dtype
    # Sums stay in float32 at least, as the loop's matmuls keep them: the scales (rounded to bf16, alpha / r = 16 / 6
    # would be 2.672, every update 0.2 % off) and, in training, the gradient each adapter's A and B gather from its
    # rows (summed row by row in bf16 it was 4 times the loop's error at 64 rows). The forward is the same to the bit.
    opmath = torch.promote_types(dtype, torch.float32)
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
        A, B = A.to(opmath), B.to(opmath)
    slot = {name: i for i, name in enumerate(held)}
    index = torch.tensor([slot.get(name, 0) for name in unique], device=x.device)[codes]
    scale = torch.tensor([layer.scaling.get(name, 0.0) for name in unique], device=x.device, dtype=opmath)[codes]
    rows = x.shape[0]
    x3 = x.reshape(rows, -1, x.shape[-1]).to(dtype)
    update = torch.bmm(torch.bmm(x3, A[index].to(dtype).transpose(1, 2)), B[index].to(dtype).transpose(1, 2))
    # B A x * s rounded once to the product's dtype, as the row loop's: under autocast, a bf16 product of fp32
    # adapters scaled in bf16 as the loop and peft's mixed batch scale it (kept in fp32 it was 0.0024 off their
    # logits). Without autocast (a bf16 base, fp32 adapters) the fp32 update is added to the base output and the sum
    # rounded once, as the loop and peft's forward with that adapter alone; peft's mixed batch rounds the update to
    # bf16 before adding, up to 0.003 off (kept: each row as alone, ``_LoraBase._rounds_update``).
    update = (update * scale.view(rows, 1, 1)).to(update.dtype)
    if layer._rounds_update():  # as each row's adapter alone (a 4-bit base's, as peft's)
        update = update.to(result.dtype)
    return (result.reshape(rows, -1, result.shape[-1]) + update).to(result.dtype).view(result.shape)


def _plain(layer, names: list[str]) -> bool:
    """Every adapter in ``names`` is plain LoRA (no DoRA) of one rank and dtype, with no dropout drawing masks."""
    weights = [layer.lora_A[name].weight for name in names]
    return (
        not any(name in layer.lora_magnitude_vector for name in names)
        and len({(w.shape[0], w.dtype) for w in weights}) == 1
        and all(isinstance(layer.lora_dropout[name], nn.Identity) or not layer.training for name in names)
    )
