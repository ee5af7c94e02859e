"""Log-probabilities of label tokens under a causal LM (the policy and reference of DPO, KTO, ORPO, SimPO).

A whole ``log_softmax`` over the (batch, tokens, vocab) logits would make an fp32 logits-sized copy, keep a second
one for the backward pass and write two more there (0.8 GB each for 16 x 256 tokens of SmolLM2's 49,152-word
vocabulary). Here the log-probs are computed a chunk of rows at a time (cache-sized, as ``deltatune.loss`` does),
only the logits themselves are kept for the backward pass, and the backward recomputes each chunk's softmax and
writes the gradient straight into the one logits-sized tensor it returns.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..data.templates import IGNORE_INDEX
from ..loss import _CHUNK_ELEMENTS


def _chunks(logits: torch.Tensor, rows: int) -> list[tuple[int, slice]]:
    """(batch row, token slice) pieces of ``rows`` positions of (B, T, V) ``logits``, each about a chunk's size."""
    step = max(1, _CHUNK_ELEMENTS.get(logits.device.type, 1 << 24) // max(1, logits.shape[-1]))
    return [(b, slice(s, min(s + step, rows))) for b in range(logits.shape[0]) for s in range(0, rows, step)]


class _PickedLogprobs(torch.autograd.Function):
    """out[b, t] = log_softmax(logits[b, t])[targets[b, t]] in fp32, for t < T - 1 (targets: (B, T - 1), >= 0).
    ``stats``, a dict or None: filled with (B, T - 1) ``mean_logits`` (over the vocabulary), ``entropy``, ``top1``
    (the target is the argmax) and ``log_sum_sq_probs`` (log sum_v p_v^2, WPO's), from each chunk's log-softmax while
    it is at hand (no gradient)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        rows = targets.shape[1]
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        if stats is not None:
            stats.update({k: torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
                          for k in ("mean_logits", "entropy", "top1", "log_sum_sq_probs")})  # fmt: skip
        for b, s in _chunks(logits, rows):
            logp = torch.log_softmax(logits[b, s], dim=-1, dtype=torch.float32)  # (c, V)
            out[b, s] = logp.gather(-1, targets[b, s].unsqueeze(-1)).squeeze(-1)
            if stats is not None:
                stats["mean_logits"][b, s] = logits[b, s].float().mean(-1)
                p = logp.exp()
                stats["entropy"][b, s] = -(p * logp).sum(-1)
                stats["log_sum_sq_probs"][b, s] = p.square().sum(-1).log()
                stats["top1"][b, s] = (logits[b, s].argmax(-1) == targets[b, s]).float()
        ctx.save_for_backward(logits, targets)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets = ctx.saved_tensors
        rows = targets.shape[1]
        grad = torch.empty_like(logits)
        grad[:, rows:].zero_()  # the last position predicts nothing
        g_all = grad_out.to(torch.float32)
        for b, s in _chunks(logits, rows):
            g = g_all[b, s].unsqueeze(-1)  # (c, 1)
            d = torch.log_softmax(logits[b, s], dim=-1, dtype=torch.float32).exp_().mul_(-g)  # -g * softmax
            grad[b, s] = d.scatter_add_(-1, targets[b, s].unsqueeze(-1), g)  # + g * onehot(target)
        return grad, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
    """log p(labels[t] | tokens < t) per position, 0 where the label is -100.

    Args:
        logits: (B, T, V) logits of a causal LM over the sequence, in any float dtype (computed in fp32).
        labels: (B, T) token ids, -100 where nothing is scored.
        stats: a dict to fill with (B, T - 1) ``mean_logits``, ``entropy``, ``top1`` and ``log_sum_sq_probs`` per
            position, for the token means of TRL's logged metrics (``pairs.Pooled.tokens``) and WPO's weights; None: none are computed.

    Returns:
        (B, T - 1) fp32: position t holds the log-prob of ``labels[:, t + 1]``.
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return _PickedLogprobs.apply(logits, labels.clamp(min=0), stats) * mask


def summed(per_token: torch.Tensor, labels: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
    """(B,) sums of ``token_logprobs``' (B, T - 1) per-token log-probs. ``ld_alpha`` (LD-DPO, Liu et al. 2024,
    arXiv:2409.06411, as TRL's DPOTrainer): the rows are B chosen then B rejected responses, and each pair's label
    tokens beyond the shorter response's count weigh ``ld_alpha`` (the first that many weigh 1); None: plain sums."""
    if ld_alpha is None:
        return per_token.sum(-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    shared = torch.minimum(*mask.sum(-1).chunk(2)).repeat(2)
    tail = mask & (mask.cumsum(-1) > shared[:, None])
    return (per_token * torch.where(tail, ld_alpha, mask.to(per_token.dtype))).sum(-1)


def model_token_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], stats: dict | None = None, aux: list | None = None
) -> torch.Tensor:
    """``token_logprobs`` (B, T - 1) of ``model`` on ``batch`` (input_ids, attention_mask, labels). ``aux``, a list
    or None: the forward returns a Mixture-of-Experts model's router logits, and its load-balancing loss over the
    batch (``aux_loss``) is appended to ``aux``."""
    extra = {"output_router_logits": True} if aux is not None else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
    if aux is not None:
        aux.append(out.aux_loss)
    return token_logprobs(out.logits, batch["labels"], stats)


def router_aux_coef(model: torch.nn.Module, when_on: bool = False) -> float:
    """The weight of a Mixture-of-Experts model's load-balancing loss in TRL 1.16's DPO and KTO losses: the
    architecture's own ``router_aux_loss_coef`` where its config declares ``output_router_logits`` (Mixtral's 0.001),
    else 0 (no such loss). ``when_on`` (TRL's ORPO and CPO, SimPO's too): only where the config's
    ``output_router_logits`` is true, read from ``model.config`` as those trainers read it; a coefficient of 0 there
    is warned of, as they warn (the loss then adds nothing)."""
    config = getattr(model, "config", None)
    if when_on:
        coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
        on = bool(getattr(config, "output_router_logits", False))
        if on and coef == 0:
            warnings.warn(
                "output_router_logits is true in the model's config, but router_aux_loss_coef is 0.0: the "
                "load-balancing (auxiliary) loss adds nothing (as TRL's ORPOTrainer and CPOTrainer warn)",
                UserWarning,
                stacklevel=3,
            )
        return coef if on else 0.0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0) if hasattr(text, "output_router_logits") else 0.0


def sequence_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    stats: dict | None = None,
    ld_alpha: float | None = None,
    aux: list | None = None,
) -> torch.Tensor:
    """Summed log-probs of each sequence's label tokens: (B,). ``batch`` holds input_ids, attention_mask, labels;
    ``stats``: see ``token_logprobs``; ``ld_alpha``: see ``summed``; ``aux``: see ``model_token_logprobs``."""
    return summed(model_token_logprobs(model, batch, stats, aux), batch["labels"], ld_alpha)


def response_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], stats: dict | None = None, aux: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs (B,), number of label tokens (B,)) of each sequence: the average log-prob of a response
    (ORPO, SimPO) is their ratio. ``batch`` holds input_ids, attention_mask, labels; ``stats``: see
    ``token_logprobs``; ``aux``: see ``model_token_logprobs``."""
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    return model_token_logprobs(model, batch, stats, aux).sum(-1), counts


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module,
    delta: Any,
    batch: dict[str, torch.Tensor],
    ld_alpha: float | None = None,
    ref_model: torch.nn.Module | None = None,
) -> torch.Tensor:
    """``sequence_logprobs`` of the reference: ``delta`` (the DeltaModel that ``model`` is or wraps) with its
    adapter off, and in eval mode: no dropout (as TRL's reference has none), so a training step's reference is the
    one ``DPOTrainer._with_ref`` precomputes, and the base's own dropout (GPT-2's, BERT's) adds no noise to it.
    ``ld_alpha``: see ``summed``. ``ref_model``: a reference copy to score instead (TR-DPO's, ``synced_reference``),
    kept in eval mode."""
    if ref_model is not None:
        return sequence_logprobs(ref_model, batch, ld_alpha=ld_alpha)
    was_training = model.training
    model.eval()
    try:
        with delta.disable_adapter():
            return sequence_logprobs(model, batch, ld_alpha=ld_alpha)
    finally:
        model.train(was_training)
