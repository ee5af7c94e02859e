"""GRPO's entropy bonus (stage ``grpo``; split from train/grpo.py, the loop, at its line limit), as TRL 1.16's
GRPOTrainer adds it in ``_compute_loss``: minus coef times the mean entropy H of the tokens the policy term counts on,
each forward's chunk (TRL's micro-batch) weighed by its share of the update. With ``align.use_adaptive_entropy``
(Skywork-OR1, arXiv:2505.22312) the coefficient moves after every optimizer update by ``align.entropy_coef_delta``:
up (to ``entropy_coef_max``) when that update's mean entropy was at most ``align.entropy_target``, else down (to
``entropy_coef_min``); the bonus applies only while the last update's entropy was at most the target (none at the
first update), with the coefficient of the update before, as TRL's."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import ConfigError

ADAPTIVE = {"entropy_coef_min": 0.0, "entropy_coef_max": 1.0, "entropy_coef_delta": 0.005, "entropy_target": 0.2}
"""The adaptive control's align keys and their defaults (TRL's GRPOConfig's)."""


def _value(a: Any, key: str) -> Any:
    return getattr(a, key, ADAPTIVE.get(key, False))  # (an align section written before the keys: their defaults)


def check_entropy(a: Any) -> None:
    """ConfigError naming the align key of an entropy bonus setting that is not a finite number, a negative step or
    target, or bounds the wrong way round (TRL's GRPOConfig takes them and clamps the coefficient to nonsense)."""
    if type(on := _value(a, "use_adaptive_entropy")) is not bool:
        raise ConfigError(f"align.use_adaptive_entropy must be true or false, got {on!r}")
    for key in ("entropy_coef", *ADAPTIVE):
        v = getattr(a, key, ADAPTIVE.get(key))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"align.{key} must be a finite number, got {v!r}")
        if key in ("entropy_coef_delta", "entropy_target") and v < 0:
            raise ConfigError(f"align.{key} must be >= 0, got {v}")
    low, high = _value(a, "entropy_coef_min"), _value(a, "entropy_coef_max")
    if _value(a, "use_adaptive_entropy") and low > high:
        raise ConfigError(f"align.entropy_coef_min {low} is above align.entropy_coef_max {high}: the adaptive "
                          "coefficient is clamped to [entropy_coef_min, entropy_coef_max]")  # fmt: skip


class EntropyBonus:
    """The bonus of one run: ``term`` per chunk, ``update`` after each optimizer update; ``state_dict`` for its
    checkpoints (the adaptive coefficient and the last update's entropy, TRL's entropy_ctrl_state.json)."""

    def __init__(self, a: Any) -> None:
        self.adaptive, self.coef = bool(_value(a, "use_adaptive_entropy")), float(a.entropy_coef)
        self.low, self.high, self.delta, self.target = (float(_value(a, k)) for k in ADAPTIVE)
        self.on = self.coef != 0 or self.adaptive  # (adaptive: on even at coefficient 0, so it can come back)
        self.last, self.window, self.coefs = math.inf, [0.0, 0.0], []

    def term(self, entropy: torch.Tensor, on: torch.Tensor, share: float) -> torch.Tensor:
        """What the chunk's loss subtracts: the applied coefficient x the mean entropy over ``on`` (the tokens the
        policy term counts on) x ``share`` (the chunk's rows over the update's)."""
        self.window[0] += (entropy.detach() * on).sum().item()
        self.window[1] += on.sum().item()
        coef = self.coef if not self.adaptive or self.last <= self.target else 0.0
        return coef * (entropy * on).sum() / on.sum().clamp(min=1) * share

    def update(self) -> None:
        """After an optimizer update: the adaptive coefficient moved by the update's mean entropy (its window)."""
        if self.adaptive:
            self.last = self.window[0] / max(self.window[1], 1.0)
            step = self.delta if self.last <= self.target else -self.delta
            self.coef = min(max(self.coef + step, self.low), self.high)
        self.window = [0.0, 0.0]
        self.coefs.append(self.coef)

    def stats(self) -> dict[str, float]:
        """TRL's ``entropy_coef`` (the coefficient after each update, their mean over the step); none when off."""
        coefs, self.coefs = self.coefs, []
        return {"entropy_coef": sum(coefs) / len(coefs)} if self.on and coefs else {}

    def state_dict(self) -> dict[str, float]:
        return {"entropy_coef": self.coef, "last_world_entropy": self.last}

    def load_state_dict(self, state: dict[str, float] | None) -> None:
        """Back under adaptive control only, from a checkpoint an adaptive run wrote (TRL writes its
        entropy_ctrl_state.json only then); a static run's (None, or an infinite last entropy: one written before
        the grpo loop saved None) starts the control at the recipe's entropy_coef, as TRL's."""
        if state and self.adaptive and math.isfinite(state["last_world_entropy"]):
            self.coef, self.last = float(state["entropy_coef"]), float(state["last_world_entropy"])
