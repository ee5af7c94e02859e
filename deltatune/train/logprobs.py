"""Log-probabilities of label tokens under a causal LM (the policy and reference of DPO, KTO, ORPO, SimPO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.templates import IGNORE_INDEX


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t] | tokens < t) per position, 0 where the label is -100.

    Args:
        logits: (B, T, V) logits of a causal LM over the sequence.
        labels: (B, T) token ids, -100 where nothing is scored.

    Returns:
        (B, T - 1): position t holds the log-prob of ``labels[:, t + 1]``.
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked * mask


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs of each sequence's label tokens: (B,). ``batch`` holds input_ids, attention_mask, labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_logprobs(logits, batch["labels"]).sum(-1)


def response_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs (B,), number of label tokens (B,)) of each sequence: the average log-prob of a response
    (ORPO, SimPO) is their ratio. ``batch`` holds input_ids, attention_mask, labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    return token_logprobs(logits, batch["labels"]).sum(-1), counts
