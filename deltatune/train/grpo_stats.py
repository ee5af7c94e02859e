"""Step statistics of stage ``grpo`` that TRL 1.16's GRPOTrainer logs (split from train/grpo.py, the loop, at its
line limit): the completions/* lengths, num_tokens and the policy_loss it logs with an entropy bonus."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .grpo_loss import _extreme, row_sums, trl_log_mean


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


def count_tokens(state: Any, s: Any, known: bool = True) -> dict[str, int]:
    """TRL's num_tokens: adds the step's tokens to ``state.num_input_tokens_seen`` (the loop's TrainerState, which the
    rewards see; the run's count so far) and returns {"num_tokens": the count}. The tokens are TRL's: each
    completion's prompt (no padding: a group's prompt G times) and the completion up to and including its EOS (masked
    truncations too), ``s``'s attention mask. {} where the count is unknown (``known`` False: a run resumed from a
    checkpoint written before it was counted; the rewards' count goes on from 0 there, an int as TRL's)."""
    state.num_input_tokens_seen += int(s.attention_mask.sum().item())
    return {"num_tokens": state.num_input_tokens_seen} if known else {}


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
    GSPO), not weighed by its tokens; clip_ratio/low_min and high_max, the least low-clipped and the most high-clipped
    completion's share of its tokens (NaN-free means, ``trl_log_mean``). Each forward chunk's rows ``gather`` their
    sums (``grpo_loss``'s ``rows``); each update ``take``s them over TRL's micro-batches (``trl_micro_order``: at
    steps_per_generation 1 the loop trains in order, TRL's micro-batches are shuffled); ``stats`` at the step's end."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.n, self.device = n, device
        self.rows: dict[str, torch.Tensor] = {}  # (n,) each completion's sums, as its update's forward left them
        self.values: dict[str, list[float]] = {}

    def gather(self, idx: torch.Tensor, st: dict[str, Any], entropy: torch.Tensor, mask: torch.Tensor) -> None:
        """Rows ``idx`` of one forward chunk: ``st`` grpo_loss's stats, ``entropy`` (n, T), ``mask`` (n, T)."""
        got = dict(st["rows"])
        got["entropy"], got["entropy_units"] = row_sums(entropy, mask)
        for k, v in got.items():
            buf = self.rows.setdefault(k, torch.full((self.n,), float("nan"), device=self.device))
            buf[idx] = v.to(buf.device)

    def take(self, order: torch.Tensor, chunks: Sequence[slice]) -> None:
        """One update's micro-batches: ``order`` its rows in TRL's micro-batch order, cut into ``chunks``."""
        r = self.rows
        for c in chunks:
            rows = order[c]
            got = {k: r[k][rows].sum() / r["clip_units"][rows].sum().clamp(min=1)
                   for k in ("clipped", "clipped_low", "clipped_high") if k in r}  # fmt: skip
            for k, units in (("kl", "kl_units"), ("entropy", "entropy_units")):
                got |= {k: r[k][rows].sum() / r[units][rows].sum().clamp(min=1)} if k in r else {}
            if "clipped_low" in r:  # (each completion's share of its tokens; NaN: none, left out as TRL's nanmin)
                for k, pick in (("clipped_low", "min"), ("clipped_high", "max")):
                    got[f"{k}_{pick}"] = _extreme(r[k][rows] / r["clip_units"][rows], pick)
            for k, v in got.items():
                self.values.setdefault(k, []).append(float(v))

    def stats(self, policy: str) -> dict[str, float | None]:
        """TRL's names: the clip ratios of ``policy`` (clip: low / high / region and low_min / high_max; cispo:
        cispo_clip_ratio; sapo: none), kl (where beta > 0) and entropy."""
        names = {"kl": "kl", "entropy": "entropy"}
        names |= {"clipped": "clip_ratio/region_mean", "clipped_low": "clip_ratio/low_mean",
                  "clipped_high": "clip_ratio/high_mean"} if policy == "clip" else {}  # fmt: skip
        names |= {"clipped": "cispo_clip_ratio"} if policy == "cispo" else {}
        out = {names[k]: sum(v) / len(v) for k, v in self.values.items() if k in names and v}
        for k in ("clipped_low_min", "clipped_high_max") if policy == "clip" else ():
            out[f"clip_ratio/{k.split('_', 1)[1]}"] = trl_log_mean(self.values.get(k, []))  # (None: all NaN)
        return out
