"""The math of the PPO stage (train/ppo.py): masked means and whitening, GAE, the clipped policy and value losses,
the KL controller, sampling the rollouts and reading a reward's output. Split from ppo.py when that file neared its
line limit; ppo.py re-exports every name here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.load import DataError
from .config import AlignArgs


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, shift_mean: bool = True) -> torch.Tensor:
    """``x`` shifted and scaled to mean 0 and variance 1 over the masked positions (0 elsewhere); the variance is the
    unbiased one (n / (n - 1) times the mean square), as TRL's ``masked_whiten``. With ``shift_mean`` False the mean
    is added back (scaled only: TRL's whiten_rewards)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from the sampled tokens' log-probs (Schulman, "Approximating KL divergence"),
    as TRL's kl_estimator: k1 = -log r, k3 = (r - 1) - log r, with r = ref / pi."""
    logr = ref_logprobs - logprobs
    return -logr if estimator == "k1" else logr.exp() - 1 - logr


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last token is 0); A_t = delta_t + gamma lam A_{t+1}.

    Args:
        rewards: (B, T) per-token rewards.
        values: (B, T) value estimates.
        mask: (B, T) 1 on response tokens (a prefix of each row), 0 after the response ended.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        (advantages, returns), both (B, T), 0 where ``mask`` is 0; returns = advantages + values.
    """
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        cont = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # 0 when the episode ends at t
        next_value = values[:, t + 1] * cont if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * cont * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def ppo_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
    whiten_rewards: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token rewards of a scored rollout, as TRL's PPO trainer (steps 4-5 of its loop): r_t = -kl_coef * KL_t,
    plus the score on each response's last token (its EOS, or the last when it has none; TRL puts it one past the
    EOS, on the first pad: huggingface/trl#3750), optionally whitened over the response tokens (mean kept).

    Args:
        logprobs, ref_logprobs: (B, R) under the sampling policy and the reference.
        scores: (B,) the reward of each response (any missing_eos_penalty already taken).
        mask: (B, R) 1 on response tokens (a prefix of each row).

    Returns:
        kl, non_score_reward, rewards: each (B, R), 0 off the mask.
    """
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator) * mask
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # index of each response's last token
    rewards[torch.arange(len(last), device=rewards.device), last] += scores
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    return {"kl": kl, "non_score_reward": non_score, "rewards": rewards}


def ppo_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    lam: float = 0.95,
    kl_estimator: str = "k1",
    whiten_rewards: bool = False,
) -> dict[str, torch.Tensor]:
    """``ppo_rewards``, then GAE with V = 0 after each response's last token and the advantages whitened over the
    batch's response tokens (TRL's step 6): the dict adds advantages and returns, (B, R) each, 0 off the mask.
    PPOLoop.update runs these same three steps."""
    out = ppo_rewards(logprobs, ref_logprobs, scores, mask, kl_coef, kl_estimator, whiten_rewards)
    advantages, out["returns"] = gae(out["rewards"], values * mask, mask, gamma, lam)
    out["advantages"] = whiten(advantages, mask)
    return out


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate loss and the fraction of tokens where clipping was active.

    Args:
        logprobs: (B, T) log pi(y_t) under the policy being trained.
        old_logprobs: (B, T) the same under the policy that sampled (fixed).
        advantages: (B, T).
        mask: (B, T) response tokens.
        cliprange: eps of clip(ratio, 1 - eps, 1 + eps).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> torch.Tensor:
    """0.5 * masked mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def value_clipfrac(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> torch.Tensor:
    """The fraction of response tokens where the clipped value term is the larger (TRL's val/clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)


def adamw_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in the HF Trainer's two AdamW groups (TRL's trainers' too): weight decay on
    all but the biases and norm weights (the Trainer stages decay them so; decaying every parameter moved those)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # (the method reads nothing of the Trainer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]  # fmt: skip


class KLController:
    """The KL coefficient: fixed, or adapted so the KL per rollout tracks ``target`` (Ziegler et al. 2019):
    coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon after each batch of n rollouts."""

    def __init__(self, init: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000) -> None:
        self.value, self.adaptive, self.target, self.horizon = init, adaptive, target, horizon

    def update(self, kl: float, n: int) -> None:
        """Adapt the coefficient after a batch of ``n`` rollouts whose mean KL was ``kl`` (no-op when fixed)."""
        if self.adaptive:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n / self.horizon


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    pad: int,
    eos: int | None,
    align: AlignArgs,
    top_p=1.0,
    repeat=1,
    extra: dict | None = None,
) -> tuple[torch.Tensor, ...]:
    """Sample ``repeat`` responses (consecutive) to each prompt (token ids, no padding) from the policy itself;
    ``extra``: more GenerationConfig settings, over these (GRPO's top_k, min_p, repetition_penalty, generation_kwargs).

    Returns:
        (prompts (N, P) left-padded, their attention mask, response mask (N, R): 1 up to and including the first
        EOS, responses (N, R) with pad after the first EOS, truncated (N,): no EOS within align.max_new_tokens).
    """
    from transformers import GenerationConfig

    model.eval()
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (P - len(p)) + list(p) for p in prompts], device=next(model.parameters()).device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=ids.device)
    ids, mask = ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
    settings = dict(max_new_tokens=align.max_new_tokens, do_sample=True, temperature=align.temperature, top_k=0,
                    top_p=top_p, pad_token_id=pad, eos_token_id=eos, use_cache=True)  # fmt: skip
    gen = GenerationConfig(**{**settings, **(extra or {})})
    # transformers fills each setting a config leaves unset from the checkpoint's generation_config (a repetition
    # penalty, no_repeat_ngram_size, suppress_tokens, min_new_tokens...): set it aside while sampling, or the samples
    # would come from another distribution than the policy's, the one the ratio and the KL are computed under.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved, inner.generation_config = inner.generation_config, GenerationConfig()
    try:
        response = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, P:]
    finally:
        inner.generation_config = saved
    if response.shape[1] == 0:
        raise RuntimeError("the policy generated no token")
    is_eos = response == eos if eos is not None else torch.zeros_like(response, dtype=torch.bool)
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ids, mask, (~after_eos).long(), response.masked_fill(after_eos, pad), ~is_eos.any(-1)


class RewardError(DataError):
    """A reward function raised, or returned something that is not one finite number per completion."""


def reward_values(out: Any, name: str, n: int, rows: Sequence[str], none: bool = False) -> list[float]:
    """A reward's output as n finite floats; RewardError naming the reward and the row (``rows``: "row <source>"
    each, or what else names an input) otherwise. With ``none``, None is NaN: "does not apply" (TRL's GRPO)."""
    if isinstance(out, torch.Tensor):
        out = out.detach().float().flatten().tolist()
    elif hasattr(out, "tolist"):  # a numpy array
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward {name} returned a {type(out).__name__}, not a list of {n} numbers")
    if len(out) != n:
        raise RewardError(f"reward {name} returned {len(out)} values for {n} completions")
    values = []
    for value, row in zip(out, rows):
        if type(value).__module__ in ("torch", "numpy") and getattr(value, "ndim", None) == 0:
            value = value.item()  # a 0-d tensor or a numpy scalar each (TRL's examples return them)
        if value is None and none:
            values.append(math.nan)
            continue
        if not isinstance(value, (int, float)):  # (True / False count as 1 / 0)
            raise RewardError(f"reward {name} returned {value!r} ({type(value).__name__}) for {row}, not a number")
        if not math.isfinite(value):
            raise RewardError(f"reward {name} returned {value} for {row}; rewards must be finite numbers")
        values.append(float(value))
    return values
