"""The math of stage ``grpo`` (split from train/grpo.py, the loop, at its line limit): group-relative advantages,
the k3 KL estimate, the high-entropy token mask and the clipped policy loss, each as TRL 1.16's GRPOTrainer computes
it (``_generate_and_score_completions``, ``get_high_entropy_mask``, ``_compute_loss``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..config import ConfigError
from .grpo_rewards import nanstd

LOSS_NORMS = ("sequence", "token", "dr_grpo", "luspo")
"""How the per-token losses reduce: TRL's loss_type grpo (and sapo), dapo (cispo; bnpo over one micro-batch), dr_grpo,
luspo (each completion's token sum, then their mean)."""
POLICY_TERMS = ("clip", "cispo", "sapo")
"""The policy term per token: PPO's clipped ratio (TRL's grpo, bnpo, dapo, dr_grpo, luspo), CISPO's capped and
detached ratio times the log-prob (MiniMax-M1, arXiv:2506.13585), SAPO's soft gate (arXiv:2511.20347)."""
SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool | str = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages.

    Args:
        rewards: (N,) rewards, N = groups x group_size, each group's completions consecutive.
        group_size: G.
        scale: TRL's scale_rewards: "group" (or True) divides by the group's std (Bessel-corrected) plus ``eps``;
            "batch" by the std of all N rewards (PPO Lite) plus ``eps``; "none" (or False) not at all (Dr. GRPO).
            The baseline is the group's mean either way.
        eps: keeps the division finite for a group of equal rewards (whose advantages are 0 either way).

    Returns:
        (N,) advantages. A NaN reward (no reward applied) is left out of its group's mean and std and gets advantage
        0, as in TRL; so does each completion of a group with one reward only (its std is undefined).
    """
    scale = {True: "group", False: "none"}.get(scale, scale)
    if scale not in SCALES:
        raise ValueError(f"scale_rewards must be group, batch or none (or true / false), got {scale!r}")
    grouped = rewards.view(-1, group_size)  # (groups, G)
    adv = grouped - grouped.nanmean(-1, keepdim=True)
    if scale == "group":
        adv = adv / (nanstd(grouped).unsqueeze(-1) + eps)
    elif scale == "batch":
        adv = adv / (nanstd(rewards) + eps)
    return adv.nan_to_num(0.0).reshape(-1)


AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
"""TRL's multi_objective_aggregation: the rewards' weighted sum, then ``group_advantages``; or GDPO's
(``gdpo_advantages``)."""


def check_loss_keys(a) -> None:
    """ConfigError naming align.multi_objective_aggregation or align.off_policy_mask_threshold where TRL's
    GRPOTrainer raises at its first generation, or (a threshold <= 0 or not finite) masks by nonsense."""
    if (agg := getattr(a, "multi_objective_aggregation", AGGREGATIONS[0])) not in AGGREGATIONS:
        raise ConfigError(f"align.multi_objective_aggregation must be one of {', '.join(AGGREGATIONS)}, got {agg!r}")
    t = getattr(a, "off_policy_mask_threshold", None)
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf")):
        raise ConfigError(f"align.off_policy_mask_threshold must be a number > 0 (a mean KL, e.g. 0.5; null: off), "
                          f"got {t!r}")  # fmt: skip


def gdpo_advantages(
    table: torch.Tensor, weights: torch.Tensor, group_size: int, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """GDPO's advantages (group reward-decoupled normalisation, arXiv:2601.05242; TRL's multi_objective_aggregation
    normalize_then_sum): each reward normalised within its group, (r_k - mean) / (std + ``eps``), their weighted sum,
    then that sum normalised over the batch; align.scale_rewards is not read, as in TRL.

    Args:
        table: (N, K) each completion's rewards (NaN: the reward does not apply), groups of ``group_size`` consecutive.
        weights: (K,) the rewards' weights.

    Returns:
        (N,) advantages (0 for a completion no reward applies to, as TRL's) and (N,) the weighted sum of the
        normalised rewards before the batch normalisation (NaN where no reward applies): TRL's frac_reward_zero_std
        under normalize_then_sum is of its std.
    """
    grouped = table.view(-1, group_size, table.shape[-1]).transpose(1, 2)  # (groups, K, G)
    normed = (grouped - grouped.nanmean(-1, keepdim=True)) / (nanstd(grouped).unsqueeze(-1) + eps)
    rewards = (normed.transpose(1, 2).reshape(table.shape) * weights.to(table)).nansum(-1)
    rewards[table.isnan().all(-1)] = torch.nan
    return ((rewards - rewards.nanmean()) / (nanstd(rewards) + eps)).nan_to_num(0.0), rewards


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) (Schulman 2020): exp(ref - pi) - (ref - pi) - 1, in log-probs."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """(N, T) bool: the completion tokens whose entropy is at least the ``1 - quantile`` quantile of the entropies
    of all completion tokens in ``mask`` (Wang et al. 2025, "Beyond the 80/20 rule": only the top-rho forking tokens
    train), as TRL's get_high_entropy_mask with top_entropy_quantile = ``quantile``."""
    values = entropy[mask.bool()].float()
    if values.numel() == 0:
        return torch.zeros_like(entropy, dtype=torch.bool)
    threshold = torch.quantile(values, 1 - quantile)
    return ((entropy * mask.float()) >= threshold) & mask.bool()


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_norm: str = "sequence",
    n_sequences: int | None = None,
    n_tokens: float | None = None,
    bias_correction_kl: bool = False,
    cliprange_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    max_tokens: int | None = None,
    token_mask: torch.Tensor | None = None,
    policy: str = "clip",
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    opsm: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a batch of completions (or of a chunk of one: see ``n_sequences`` / ``n_tokens``).

    Args:
        logprobs: (N, T) log pi(o_t) of the completion tokens under the policy being trained.
        old_logprobs: (N, T) the same under the policy that sampled (fixed).
        advantages: (N,) one advantage per completion.
        mask: (N, T) 1 on completion tokens.
        cliprange: eps of clip(ratio, 1 - eps, 1 + eps_high) (TRL's epsilon).
        beta: KL coefficient; 0 needs no ``ref_logprobs``.
        ref_logprobs: (N, T) log ref(o_t) (when beta > 0).
        loss_norm: "sequence" (mean per completion, then over completions: TRL's grpo), "token" (mean over all
            tokens: dapo, bnpo), "dr_grpo" (sum over tokens / (completions x ``max_tokens``)) or "luspo" (sum over
            each completion's tokens, then the mean over completions).
        n_sequences: the completions in the whole batch when this is a chunk of it (default: N), so that chunk
            losses add up to the batch loss.
        n_tokens: the completion tokens in the whole batch, likewise (default: mask.sum()).
        bias_correction_kl: weight each token's KL by its ratio pi / pi_old, as TRL's GRPO does by default
            (``use_bias_correction_kl``, after DeepSeek-V3.2; changes the gradient even at ratio 1); off: the paper.
        cliprange_high: the upper eps (DAPO's clip-higher, TRL's epsilon_high); None: ``cliprange``.
        delta: INTELLECT-2's two-sided clip (TRL's delta): the unclipped ratio is capped at delta; None: off.
        importance_sampling_level: "token" (a ratio per token) or "sequence" (GSPO: one ratio per completion, the
            exp of its mean log-ratio).
        max_tokens: the completion length limit (loss_norm dr_grpo).
        token_mask: (N, T) the tokens whose policy term counts (``high_entropy_mask``); the KL term counts on all.
        policy: "clip" (PPO's clipped ratio), "cispo" (-min(ratio, eps_high).detach() * A * log pi: TRL's cispo caps
            the ratio at its epsilon_high itself, ``cliprange_high`` here, else ``cliprange``) or "sapo" (-A * 4 /
            tau * sigmoid(tau * (ratio - 1)), tau the first of ``sapo_temperatures`` where A > 0, else the second).
        sapo_temperatures: SAPO's (positive, non-positive advantage) temperatures (TRL's sapo_temperature_pos, _neg).
        opsm: DeepSeek-V3.2's off-policy sequence mask (TRL's off_policy_mask_threshold): a completion whose advantage
            is negative and whose mean KL(pi_old || pi), old - new log-prob over its tokens, is above it counts in no
            policy term; None: off.

    Returns:
        (loss, stats): stats holds sums (detached) ``clipped`` (tokens, or completions under GSPO, in TRL's clip
        region; with policy clip also ``clipped_low`` and ``clipped_high``, each side's) over ``clip_units`` of them,
        ``kl`` (summed k3 KL over the tokens; absent when beta = 0), ``tokens``;
        ``rows``: each completion's sums (``row_sums``, (n,) each) of those (clipped, clipped_low, clipped_high over
        clip_units; kl over kl_units), which a micro-batch of any rows adds up as TRL's global_masked_mean.

    Raises:
        ValueError: an unknown loss_norm or importance_sampling_level, beta > 0 without reference log-probs, or
            dr_grpo without max_tokens.
    """
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"loss_norm must be one of {', '.join(LOSS_NORMS)}, got {loss_norm!r}")
    if policy not in POLICY_TERMS:
        raise ValueError(f"policy must be one of {', '.join(POLICY_TERMS)}, got {policy!r}")
    if loss_norm == "dr_grpo" and not max_tokens:
        raise ValueError("loss_norm dr_grpo needs max_tokens (the completion length limit)")
    mask = mask.float()
    log_ratio = logprobs - old_logprobs
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (N, 1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    high = cliprange if cliprange_high is None else cliprange_high
    adv = advantages.unsqueeze(-1)  # (N, 1): every token of a completion shares its advantage
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    if policy == "cispo":  # (the gradient flows through log pi alone, weighted by the capped ratio)
        per_token = -torch.clamp(ratio, max=high).detach() * adv * logprobs
        took = ((ratio > high) & (adv > 0)).float().detach()  # (TRL's cispo_clip_ratio)
    elif policy == "sapo":
        tau = torch.where(adv > 0, sapo_temperatures[0], sapo_temperatures[1])
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        took = torch.zeros_like(ratio * adv)  # (no clipping: TRL logs none)
    else:
        per_token = -torch.minimum(capped * adv, torch.clamp(ratio, 1 - cliprange, 1 + high) * adv)
        # TRL's clip_ratio/region_mean: its region test on the (delta-capped) ratio, over the completion tokens, or
        # over the completions when the ratio is one per completion (GSPO)
        low, up = ((capped < 1 - cliprange) & (adv < 0)).float(), ((capped > 1 + high) & (adv > 0)).float()
        took = (low + up).detach()  # (the two regions are disjoint: the advantage's sign tells them apart)
    if opsm is not None:  # (TRL's get_off_policy_mask: the sampling log-probs are pi_old's here)
        drift = ((old_logprobs - logprobs.detach()) * mask).sum(-1, keepdim=True)
        drift = drift / mask.sum(-1, keepdim=True).clamp(min=1)  # (each completion's mean KL(pi_old || pi))
        per_token = per_token * ((adv >= 0) | (drift <= opsm)).float()
    if token_mask is not None:
        per_token = per_token * token_mask.float()

    def count(x: torch.Tensor) -> torch.Tensor:  # over the completion tokens, or the completions (one ratio each)
        return (x * mask).sum().detach() if x.shape[-1] > 1 else x.sum().detach()

    units = mask.sum() if took.shape[-1] > 1 else torch.tensor(float(took.shape[0]))
    stats = {"clipped": count(took), "clip_units": units}
    if policy == "clip":  # (TRL's clip_ratio/low_mean and high_mean; low_min and high_max: MicroMeans, of rows)
        stats["clipped_low"], stats["clipped_high"] = count(low), count(up)
    stats["tokens"] = mask.sum().detach()
    rows = dict(zip(("clipped", "clip_units"), row_sums(took, mask)))  # (each completion's: MicroMeans)
    if policy == "clip":
        rows["clipped_low"], rows["clipped_high"] = row_sums(low, mask)[0], row_sums(up, mask)[0]
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logprobs, ref_logprobs) * (ratio if bias_correction_kl else 1.0)
        per_token = per_token + beta * kl
        stats["kl"] = (kl * mask).sum().detach()
        rows["kl"], rows["kl_units"] = row_sums(kl, mask)
    stats["rows"] = rows
    if loss_norm == "sequence":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = per_sequence.sum() / (n_sequences or mask.shape[0])
    elif loss_norm == "luspo":
        loss = (per_token * mask).sum() / (n_sequences or mask.shape[0])
    elif loss_norm == "token":
        loss = (per_token * mask).sum() / (n_tokens if n_tokens is not None else mask.sum().clamp(min=1))
    else:
        loss = (per_token * mask).sum() / ((n_sequences or mask.shape[0]) * max_tokens)
    return loss, stats


def row_sums(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) each completion's part of TRL's global_masked_mean of ``x`` (n, T) over a micro-batch: (its sum over its
    completion tokens, their number); one value per completion (GSPO's ratio, or T 1) counts as is, one unit each."""
    x = x.detach().float()
    if x.shape[-1] == 1:
        return x.squeeze(-1), torch.ones(x.shape[0], device=x.device)
    return (x * mask).sum(-1), mask.float().sum(-1)


def _extreme(per: torch.Tensor, pick: str) -> torch.Tensor:
    """TRL's nanmin / nanmax of its masked_seq_mean (each completion's share of its tokens, NaN: none): the least or
    the most, NaNs left out (NaN if none is left)."""
    per = per[~per.isnan()]
    return getattr(per, pick)() if per.numel() else torch.tensor(float("nan"))


def micro_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s micro-batch permutation (``trl_micro_order``): one per step of the run's seed, so a
    resumed run draws the permutations an uninterrupted one draws."""
    return seed * 1_000_003 + step


def trl_micro_order(parts: torch.Tensor, shuffled: bool, seed: int = 0) -> torch.Tensor:
    """The rows of each update's slice (``parts``, (S, N / S)) in the order of micro-batches as TRL's are, which its
    clip_ratio/low_min and high_max are taken over: ``parts`` where the step shuffled the generation batch (its
    align.mini_batch_size chunks are TRL's micro-batches); else (steps_per_generation 1 with a loss the chunks do not
    change, trained in order: the same weights) a permutation drawn as TRL's shuffle draws one (``torch.randperm``),
    from a generator of its own seeded by ``seed`` (``micro_seed``): torch's RNG is left alone, so a seeded run
    samples as it did, and each step draws another, on a GPU too (where torch's CPU RNG does not move)."""
    if shuffled:
        return parts
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(parts.numel(), generator=g).to(parts.device).view_as(parts)


def trl_log_mean(values: Sequence[float]) -> float | None:
    """A step's value of a per-micro-batch statistic as TRL's GRPOTrainer.log averages it: the mean with the NaNs left
    out (a micro-batch without a completion token gives one: clip_ratio/low_min and high_max), None where none is
    left (TRL's; JSON loggers refuse a NaN)."""
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else None
