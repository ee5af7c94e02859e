"""The rewards of stage ``grpo`` (``align.reward_funcs``): Python functions named ``module:function`` (or
``file.py:function``) with TRL's signature ``f(prompts, completions, **columns) -> list[float]``, and deltatune
reward-model runs, each with a weight. Checked before the run starts; a reward that raises or returns anything but
one finite number per completion stops the run with one line naming the reward and the row."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..data.load import DataError
from .config import AlignArgs


class RewardError(DataError):
    """A reward function raised, or returned something that is not one finite number per completion."""


@dataclass
class Reward:
    """One reward: its name (for logs and errors), the callable and its weight in the sum. ``model`` rewards are
    reward-model runs, called as ``fn(prompt_texts, completions)``; the others as ``fn(prompts=, completions=,
    **columns)``."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    model: bool = False


def import_reward(spec: str) -> Callable[..., Any]:
    """The function named by ``module:function`` or ``path/to/file.py:function`` (a path relative to the current
    directory, as data paths are).

    Raises:
        ConfigError: malformed, cannot be imported, no such function, or not callable (the spec named).
    """
    where = f"align.reward_funcs entry {spec!r}"
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ConfigError(f"{where} is neither a reward run folder nor of the form module:function")
    try:
        if module.endswith(".py"):
            if not os.path.isfile(module):
                raise ImportError(f"no file {module}")
            spec_ = importlib.util.spec_from_file_location(f"deltatune_reward_{abs(hash(module))}", module)
            mod = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
        fn = getattr(mod, name)
    except Exception as exc:  # noqa: BLE001  (user code: any error while importing is reported in one line)
        raise ConfigError(f"{where} could not be imported: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"{where} is not callable")
    return fn


def check_rewards(align: AlignArgs) -> list[Reward]:
    """The rewards of ``align.reward_funcs`` with their weights, functions imported, reward runs checked (not yet
    loaded: ``load_rewards`` does that once the policy exists).

    Raises:
        ConfigError: no rewards, a weight list of another length or holding a non-number, or a bad entry.
    """
    from .scorers import reward_run

    specs = align.reward_funcs
    if not specs:
        raise ConfigError("align.reward_funcs is empty: give module:function entries or reward-model run folders")
    weights = align.reward_weights if align.reward_weights is not None else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ConfigError(f"align.reward_weights has {len(weights)} values for {len(specs)} align.reward_funcs")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"align.reward_weights must be finite numbers, got {weights}")
    out, seen = [], set()
    for spec, weight in zip(specs, weights):
        if not isinstance(spec, str):
            raise ConfigError(f"align.reward_funcs entries must be text, got {spec!r}")
        if os.path.isdir(spec):
            reward_run(spec)
            name, fn, is_model = os.path.basename(os.path.normpath(spec)), None, True
        else:
            name, fn, is_model = spec.rpartition(":")[2], import_reward(spec), False
        while name in seen:  # two rewards of one name get distinct log keys
            name += "_"
        seen.add(name)
        out.append(Reward(name, fn, float(weight), is_model))
    return out


def load_rewards(rewards: list[Reward], specs: list[str], model: nn.Module, policy_name: str, tokenizer) -> list:
    """Reward-model entries loaded (an extra adapter on the policy when trained on its base: ``AdapterReward``;
    else a model of its own: ``RewardScorer``); returns the loaded AdapterRewards, to delete after the run."""
    from .ppo import reward_function
    from .scorers import AdapterReward

    device = next(model.parameters()).device
    shared = []
    for r, spec in zip(rewards, specs):
        if r.model and r.fn is None:
            r.fn = reward_function(spec, device, model, policy_name, tokenizer)
            if isinstance(r.fn, AdapterReward):
                r.fn.adapter_name = f"reward_{len(shared)}" if shared else r.fn.adapter_name
                shared.append(r.fn)
    return shared


def _values(out: Any, name: str, n: int, sources: Sequence[str]) -> list[float]:
    """A reward's output as n finite floats; RewardError naming the reward and the row otherwise."""
    if isinstance(out, torch.Tensor):
        out = out.detach().float().flatten().tolist()
    elif hasattr(out, "tolist"):  # a numpy array
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward {name} returned a {type(out).__name__}, not a list of {n} numbers")
    if len(out) != n:
        raise RewardError(f"reward {name} returned {len(out)} values for {n} completions")
    values = []
    for value, source in zip(out, sources):
        if not isinstance(value, (int, float)):  # (True / False count as 1 / 0)
            raise RewardError(
                f"reward {name} returned {value!r} ({type(value).__name__}) for row {source}, not a number"
            )
        if not math.isfinite(value):
            raise RewardError(f"reward {name} returned {value} for row {source}; rewards must be finite numbers")
        values.append(float(value))
    return values


def _call(reward: Reward, prompts: list, texts: list[str], completions: list[str], columns: dict[str, list]) -> Any:
    if reward.model:
        return reward.fn(texts, completions)
    return reward.fn(prompts=prompts, completions=completions, **columns)


def score(
    rewards: Sequence[Reward],
    prompts: list,
    prompt_texts: list[str],
    completions: list[str],
    columns: dict[str, list],
    sources: list[str],
) -> torch.Tensor:
    """(N, K) rewards of N completions under K rewards.

    Raises:
        RewardError: a reward raised (the row it raised on is found by calling it on one row at a time) or returned
            a wrong length, a NaN/infinite value or a non-number.
    """
    n = len(completions)
    table = []
    for r in rewards:
        try:
            out = _call(r, prompts, prompt_texts, completions, columns)
        except Exception as exc:  # noqa: BLE001  (user code: find the row and say it in one line)
            raise RewardError(_raised(r, prompts, prompt_texts, completions, columns, sources, exc)) from None
        table.append(_values(out, r.name, n, sources))
    return torch.tensor(table, dtype=torch.float32).T.reshape(n, len(rewards))


def _raised(r: Reward, prompts, texts, completions, columns, sources, exc: Exception) -> str:
    for i, source in enumerate(sources):
        try:
            _call(r, prompts[i : i + 1], texts[i : i + 1], completions[i : i + 1],
                  {k: v[i : i + 1] for k, v in columns.items()})  # fmt: skip
        except Exception as one:  # noqa: BLE001
            return f"reward {r.name} raised {type(one).__name__}: {one} (row {source}, completion {completions[i]!r})"
    return f"reward {r.name} raised {type(exc).__name__}: {exc} (on the batch of rows {sources[0]} .. {sources[-1]})"
