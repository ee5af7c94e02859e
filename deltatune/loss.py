"""A causal-LM cross-entropy that computes its gradient in the forward pass, a chunk of rows at a time.

transformers' ``ForCausalLMLoss`` runs ``log_softmax`` over the whole (tokens, vocab) logits, keeps that second
logits-sized tensor for the backward pass, and in the backward writes a zero-filled logits-sized tensor, scatters
into it and runs ``log_softmax``'s backward: about six passes over tensors of tokens x vocab floats (262 MB per
tensor for 2,048 tokens of a 32k vocabulary). Here each chunk of rows (a few MB, so it stays in cache) is read
once: its log-sum-exp, the target's logit, and the gradient ``softmax - onehot``, written straight into the one
tensor the backward pass needs. Same loss to float rounding, same gradient, less memory traffic and one
logits-sized tensor fewer held between forward and backward. The logits themselves are still computed by the
model (its ``lm_head``), so nothing about the model changes.

``DeltaModel(..., fused_loss=True)`` installs it on a causal LM whose loss is transformers' default (``loss_type``
ForCausalLM) and removes it on unload. The library default is off (a user's model keeps its loss); the runs
deltatune's trainers own turn it on (train/run.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}
"""Elements of logits per chunk: ~8 MB of fp32 on CPU (cache-sized), larger on GPU (fewer kernel launches)."""


class _CrossEntropy(torch.autograd.Function):
    """sum over valid rows of (logsumexp(x) - x[target]) / divisor; the gradient is computed in ``forward``."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor, ignore_index: int):
        rows = logits.shape[0]
        step = max(1, _CHUNK_ELEMENTS.get(logits.device.type, 1 << 24) // max(1, logits.shape[1]))
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        inv = 1.0 / divisor.to(torch.float32)
        for start in range(0, rows, step):
            x = logits[start : start + step]  # (c, V)
            t = targets[start : start + step]
            valid = t != ignore_index
            safe = torch.where(valid, t, 0).unsqueeze(1)  # (c, 1)
            logp = torch.log_softmax(x, dim=1, dtype=torch.float32)  # one fused pass, a cache-sized buffer
            # (where, not times valid: an ignored row's -inf logit at id 0 made the loss -inf * 0 = nan)
            total -= torch.where(valid, logp.gather(1, safe).squeeze(1), 0.0).sum()
            if need_grad:  # softmax - onehot(target), scaled; ignored rows get no gradient
                g = logp.exp_()
                g.scatter_add_(1, safe, -valid.unsqueeze(1).to(g.dtype))
                # (where, not valid x inv: with no labelled token the divisor is 0, and 0 x inf made the gradient NaN
                # where transformers' is 0 beside its 0 / 0 = NaN loss, which its Trainer filters from the log)
                grad[start : start + step] = g.mul_(torch.where(valid, inv, 0.0).unsqueeze(1))
        if need_grad:
            ctx.save_for_backward(grad)
        return total * inv

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # loss.backward() passes 1: hand over the saved gradient as it is rather than write a scaled copy of it
        # (on CPU the check is free; on CUDA it would synchronise, and the copy is cheap there).
        if grad_out.device.type == "cpu" and grad_out.numel() == 1 and grad_out.item() == 1.0:
            return grad, None, None, None
        return grad * grad_out.to(grad.dtype), None, None, None


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, num_items_in_batch: Any = None
) -> torch.Tensor:
    """``F.cross_entropy(logits, targets, ignore_index=...)``, mean over the valid targets or, with
    ``num_items_in_batch``, their sum divided by it (transformers' convention for gradient accumulation).

    Args:
        logits: (N, V) in any float dtype (computed in fp32 chunk by chunk; the gradient comes back in its dtype).
        targets: (N,) class indices, ``ignore_index`` where no loss applies.
    """
    if num_items_in_batch is None:
        divisor = (targets != ignore_index).sum()
    else:
        divisor = torch.as_tensor(num_items_in_batch).to(logits.device)
    return _CrossEntropy.apply(logits, targets, divisor, ignore_index)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Drop-in for transformers' ``ForCausalLMLoss`` (same arguments, same result): token t predicts label t+1."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    return cross_entropy(logits.reshape(-1, vocab_size), targets, ignore_index, num_items_in_batch)


def token_loss(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The Trainer's ``compute_loss_func`` for models whose logits line up with their labels (token classifiers,
    encoder-decoders): the cross-entropy over the labelled tokens, over those of every micro-batch of an
    accumulated step when the Trainer counts them (``num_items_in_batch``). Their own loss is a mean over each
    micro-batch's tokens, which weighs a token of a sparsely labelled micro-batch more than one batch would. With
    ``label_smoothing`` (seq2seq's train.label_smoothing_factor): ``smoothed_cross_entropy``."""
    logits = outputs["logits"]
    return smoothed_cross_entropy(
        logits.flatten(0, -2), labels.flatten().to(logits.device), num_items_in_batch, label_smoothing
    )


def shifted_token_loss(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """``token_loss`` for models that read their labels shifted, logits at t scored against label t+1 (BLIP's text
    decoder, whose labels are its input ids), with its ``label_smoothing`` when the model's config sets one."""
    logits = outputs["logits"][:, :-1].flatten(0, -2)
    targets = labels[:, 1:].flatten().to(logits.device)
    return smoothed_cross_entropy(logits, targets, num_items_in_batch, label_smoothing)


def smoothed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: Any = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """``cross_entropy``, or with ``label_smoothing`` e transformers' ``LabelSmoother`` (Seq2SeqTrainer's, as
    run_summarization's --label_smoothing_factor): (1 - e) x the cross-entropy + e x the mean over the vocabulary
    of -log p, summed over the targets other than -100 and divided by their count (or ``num_items_in_batch``)."""
    if not label_smoothing:
        return cross_entropy(logits, targets, num_items_in_batch=num_items_in_batch)
    total = nn.functional.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing)
    divisor = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(divisor).to(logits.device)


def _default_causal_lm_loss(model: nn.Module) -> bool:
    """True when ``model`` computes transformers' default causal-LM loss and nobody has set their own.

    Decided from ``loss_type`` (what transformers derives from the class name) without resolving the
    ``loss_function`` property, which warns for models whose loss type it does not know.
    """
    if "_loss_function" in vars(model) or not hasattr(type(model), "loss_function"):
        return False
    loss_type = getattr(model, "loss_type", None)
    # GPT-2 style "...LMHeadModel" classes have no recognised loss type and fall back to ForCausalLM
    return loss_type == "ForCausalLM" or (loss_type is None and type(model).__name__.endswith("LMHeadModel"))


def shifts_labels(model: nn.Module) -> bool:
    """True when ``model``'s loss is the causal-LM one (token t predicts label t+1): transformers' default, also
    for the GPT-2 style classes it falls back to, or ``causal_lm_loss`` installed. The Trainer counts a batch's
    items over ``labels[..., 1:]`` only for models whose ``loss_type`` names it, so GPT-2's loss was divided by one
    token per row too many (eval loss 4.07 against the per-token 4.87 on short rows)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False  # its labels line up with the decoder's inputs, shifted already
    return _default_causal_lm_loss(model) or vars(model).get("_loss_function") is causal_lm_loss


def install(model: nn.Module) -> bool:
    """Make ``model`` (a transformers causal LM with the default loss) use ``causal_lm_loss``; True if it did."""
    if not _default_causal_lm_loss(model):
        return False
    model.loss_function = causal_lm_loss
    return True


def uninstall(model: nn.Module) -> None:
    """Undo ``install``: the model resolves its loss as transformers does again."""
    if vars(model).get("_loss_function") is causal_lm_loss:
        del model._loss_function
