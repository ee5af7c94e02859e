"""Step statistics of stage ``grpo`` that TRL 1.16's GRPOTrainer logs (split from train/grpo.py, the loop, at its
line limit): the completions/* lengths and the policy_loss it logs with an entropy bonus."""

from __future__ import annotations

from typing import Any

import torch


def completion_lengths(s: Any) -> dict[str, float]:
    """TRL's completions/* statistics of ``s`` (grpo.Samples): the lengths (up to and including the EOS) of all
    completions and of those that ended (an EOS within max_new_tokens; a 0 where none did, as TRL's), and the
    truncated fraction."""
    lengths = s.completion_mask.float().sum(-1)
    ended = lengths[~s.truncated.to(lengths.device)]
    ended = ended if len(ended) else torch.zeros(1)
    out = {"completions/min_length": lengths.min().item(), "completions/max_length": lengths.max().item(),
           "completions/clipped_ratio": s.truncated.float().mean().item()}  # fmt: skip
    for name, f in (("mean", torch.mean), ("min", torch.min), ("max", torch.max)):
        out[f"completions/{name}_terminated_length"] = f(ended).item()
    return out


def trl_policy_loss(loss: torch.Tensor, windowed: bool, part: int, chunk: int) -> float:
    """One micro-batch's TRL policy_loss (logged by TRL's _compute_loss only with an entropy bonus; the step logs the
    mean of its micro-batches'): the chunk's loss before the bonus, as a loss of the chunk alone. ``loss`` is the
    chunk's share of its update's (``grpo_loss`` over ``chunk`` of the update's ``part`` rows): TRL's grpo, bnpo,
    dr_grpo, luspo and sapo log it before the division by the accumulation steps (x part / chunk); dapo and cispo
    (``windowed``: loss_norm token, not bnpo) normalise by the window's tokens, as the loop's chunks already are."""
    return loss.item() * (1.0 if windowed else part / chunk)
