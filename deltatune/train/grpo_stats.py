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


class MicroMeans:
    """TRL's per-micro-batch statistics of a step (``_compute_loss``'s global_masked_mean each forward, the log the
    mean of them over the step's updates, every iteration's): clip_ratio/low_mean, high_mean and region_mean (or
    cispo_clip_ratio), kl and entropy, each micro-batch's mean over its completion tokens (over its completions under
    GSPO), not weighed by its tokens. ``add`` per forward chunk (TRL's micro-batch), ``stats`` at the step's end."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, st: dict[str, torch.Tensor], entropy: torch.Tensor, mask: torch.Tensor) -> None:
        """One chunk's: ``st`` grpo_loss's stats, ``entropy`` (n, T) and ``mask`` (n, T) its completion tokens."""
        units, tokens = st["clip_units"].clamp(min=1), st["tokens"].clamp(min=1)
        got = {k: st[k] / units for k in ("clipped", "clipped_low", "clipped_high") if k in st}
        got |= {"kl": st["kl"] / tokens} if "kl" in st else {}
        got["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        for k, v in got.items():
            self.values.setdefault(k, []).append(float(v))

    def stats(self, policy: str) -> dict[str, float]:
        """TRL's names: the clip ratios of ``policy`` (clip: low / high / region; cispo: cispo_clip_ratio; sapo: none),
        kl (where beta > 0) and entropy."""
        names = {"kl": "kl", "entropy": "entropy"}
        names |= {"clipped": "clip_ratio/region_mean", "clipped_low": "clip_ratio/low_mean",
                  "clipped_high": "clip_ratio/high_mean"} if policy == "clip" else {}  # fmt: skip
        names |= {"clipped": "cispo_clip_ratio"} if policy == "cispo" else {}
        return {names[k]: sum(v) / len(v) for k, v in self.values.items() if k in names and v}
