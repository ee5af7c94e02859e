"""The rewards of stage ``grpo`` (``align.reward_funcs``): Python functions named ``module:function`` (or
``file.py:function``) with TRL's signature ``f(prompts, completions, **columns) -> list[float]``, and deltatune
reward-model runs, each with a weight. Checked before the run starts; a reward that raises or returns anything but
one finite number per completion stops the run with one line naming the reward and the row."""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from .config import AlignArgs
from .ppo import RewardError, reward_values  # noqa: F401  (RewardError: raised here too)
from .ppo_reward import import_reward, raised_line


@dataclass
class Reward:
    """One reward: its name (for logs and errors), the callable and its weight in the sum. ``model`` rewards are
    reward-model runs, called as ``fn(prompt_texts, completions)``; the others as ``fn(prompts=, completions=,
    **columns)``."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    model: bool = False


def check_rewards(align: AlignArgs) -> list[Reward]:
    """The rewards of ``align.reward_funcs`` with their weights, functions imported, reward runs (or transformers
    model folders: TRL's reward models, ``grpo_reward_model``) checked (not yet loaded: ``load_rewards`` does that once
    the policy exists).

    Raises:
        ConfigError: no rewards, a weight list of another length or holding a non-number, or a bad entry.
    """
    from .grpo_reward_model import check_model_folder, check_model_tokenizer, is_model_folder
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
            if is_model_folder(spec):  # (TRL's reward model: its head, then the tokenizer TRL loads from it)
                check_model_folder(spec)
                check_model_tokenizer(spec)
            else:
                reward_run(spec)
            name, fn, is_model = os.path.basename(os.path.normpath(spec)), None, True
        else:
            name, fn, is_model = spec.rpartition(":")[2], import_reward(spec), False
        while name in seen:  # two rewards of one name get distinct log keys
            name += "_"
        seen.add(name)
        out.append(Reward(name, fn, float(weight), is_model))
    return out


def check_columns(rewards: list[Reward], specs: list[str], items: Sequence, split: str = "data.train") -> None:
    """Each reward function called as the loop will call it (bound to its signature, not run), before the model loads:
    by name, ``prompts``, ``completions``, ``completion_ids``, TRL's ``trl_extras`` and the columns of the rows
    (``items``, each with its ``columns`` and ``source``), as TRL's GRPOTrainer calls it; a deltatune reward run reads
    no columns.

    Raises:
        DataError: the first row with a column named prompts or completions (a second value of that argument).
        ConfigError: a function that cannot take the call (a column it requires that no row has; no ``**kwargs`` for
            the columns and TRL's trainer_state, log_metric, log_extra), naming it and ``split`` (the recipe's key
            and file: ``data.eval (e.jsonl)``): the first step or the eval would fail.
    """
    from ..data.load import DataError
    from .grpo_reward_model import is_model_folder

    if all(r.model and not is_model_folder(spec) for r, spec in zip(rewards, specs)):
        return
    for it in items:
        if clash := next((k for k in ("prompts", "completions") if k in it.columns), None):
            raise DataError(f"{it.source}: column {clash!r} reaches the reward functions by name beside their own "
                            f"{clash}= argument (the rows' other columns do, as in TRL), which Python refuses; "
                            "rename it")  # fmt: skip
    columns = sorted({k for it in items for k in it.columns})
    names = ["prompts", "completions", "completion_ids", *columns, *trl_extras(None, {})]
    for r, spec in ((r, spec) for r, spec in zip(rewards, specs) if not r.model):
        try:
            signature = inspect.signature(r.fn, follow_wrapped=False)  # (TRL calls a functools.wraps wrapper)
        except (TypeError, ValueError):  # (a builtin or C callable: nothing to read)
            continue
        try:
            signature.bind(**dict.fromkeys(names))
        except TypeError as exc:
            raise ConfigError(f"align.reward_funcs entry {spec!r} cannot take its call on the rows of {split}: {exc} "
                              f"(a reward function gets prompts, completions, completion_ids, trainer_state, "
                              f"log_metric, log_extra and the rows' columns {columns} by name, as TRL's GRPOTrainer "
                              "calls it: take **kwargs)") from None  # fmt: skip


def fill_columns(items: Sequence) -> list[str]:
    """Each row of a split (``items``, each with its ``columns``) given every column of the split, None where it lacks
    one, as TRL's rows read through datasets have them: a reward requiring a column some rows lack gets None for
    those (the step whose batch had no row with it failed, after the check had passed); the columns, sorted."""
    columns = sorted({k for it in items for k in it.columns})
    for it in items:
        it.columns = {k: it.columns.get(k) for k in columns}
    return columns


def load_rewards(
    rewards: list[Reward], specs: list[str], model: nn.Module, policy_name: str, tokenizer, trust_remote_code=False
) -> list:
    """Reward-model entries loaded (an extra adapter on the policy when trained on its base: ``AdapterReward``;
    else a model of its own: ``RewardScorer``; a transformers model folder: ``SequenceClassifierReward``, called as a
    reward function, loaded with ``trust_remote_code``, the recipe's model.trust_remote_code, as TRL passes its
    args.trust_remote_code); returns the loaded AdapterRewards, to delete after the run."""
    from .grpo_reward_model import SequenceClassifierReward, is_model_folder
    from .ppo import reward_function
    from .scorers import AdapterReward

    device = next(model.parameters()).device
    shared = []
    for r, spec in zip(rewards, specs):
        if r.model and r.fn is None and is_model_folder(spec):  # (called as a reward function, as TRL's)
            r.fn, r.model = SequenceClassifierReward(spec, device, trust_remote_code), False
        elif r.model and r.fn is None:
            name = f"reward_{len(shared)}" if shared else "reward"  # each reward run its own adapter in the policy
            r.fn = reward_function(spec, device, model, policy_name, tokenizer, adapter_name=name)
            if isinstance(r.fn, AdapterReward):
                shared.append(r.fn)
    return shared


def prompt_text(prompt: Any, ids: list[int], tokenizer) -> str:
    """The prompt a reward-model run scores, as PPO gives it: the row's text, or its one user message, as written
    (the scorer renders it as the reward run rendered its pairs, so not the policy's rendered input: that would be
    templated twice); else (several messages) the policy's input decoded."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user" and isinstance(prompt[0].get("content"), str):
        return prompt[0]["content"]
    return tokenizer.decode(ids, skip_special_tokens=True)


def trl_extras(state: Any, metrics: dict[str, list]) -> dict[str, Any]:
    """The keyword arguments TRL's GRPOTrainer gives every reward function besides the columns: ``trainer_state`` (a
    transformers TrainerState: ``global_step`` counts optimizer steps, as TRL's), ``log_metric(name, value)`` (kept in
    ``metrics``; the step logs each name's mean) and ``log_extra(column, values)`` (TRL's completions table, which
    deltatune does not write: accepted, not kept)."""
    return {"trainer_state": state, "log_metric": lambda name, value: metrics.setdefault(name, []).append(value),
            "log_extra": lambda column, values: None}  # fmt: skip


def reward_inputs(items: Sequence, texts: list[str], completion_ids: list[list[int]], tokenizer) -> tuple[list, ...]:
    """(prompts, prompt texts, completions) for the rewards of completions ``texts`` of ``items`` (each with its
    row's ``prompt`` as written and its ``ids``): the prompts, what a reward-model run scores (``prompt_text``), and
    the ``completions`` TRL's GRPOTrainer gives reward functions: the texts after text prompts; after chat prompts
    (TRL asks the batch's first) each as one assistant message, ``[{"role": "assistant", "content": text}]``, or, where
    the tokenizer has a ``response_template``, the message its ``parse_response`` reads from the completion's ids after
    the prompt's (reasoning, tool calls; the text where that fails), as TRL's ``parse_response``."""
    prompts = [it.prompt for it in items]
    plain = [prompt_text(it.prompt, it.ids, tokenizer) for it in items]
    if not prompts or not (isinstance(prompts[0], list) and all(isinstance(m, dict) for m in prompts[0])):
        return prompts, plain, list(texts)
    if getattr(tokenizer, "response_template", None) is None or len(completion_ids) != len(texts):
        return prompts, plain, [[{"role": "assistant", "content": text}] for text in texts]
    return prompts, plain, [[_parsed(tokenizer, *a)] for a in zip(completion_ids, [it.ids for it in items], texts)]


def _parsed(tokenizer, ids: list[int], prefix: list[int], text: str) -> dict[str, Any]:
    try:
        parsed = tokenizer.parse_response(ids, prefix=prefix, tools=[])
        if parsed is None:  # (a completion cut so short that not even its content is there)
            raise ValueError("nothing parsed")
        if isinstance(parsed.get("content"), str):  # transformers#42249: an EOS left on the content
            parsed["content"] = parsed["content"].removesuffix(tokenizer.eos_token)
        parsed["content"] = parsed.get("content") or ""
        for call in parsed.get("tool_calls") or []:  # a malformed call reads as text, as TRL's _validate_tool_calls
            fn = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError("malformed tool call")
            fn["arguments"] = {} if fn.get("arguments") is None else fn["arguments"]
        if not isinstance(parsed.get("tool_calls", []), list):
            raise ValueError("tool_calls not a list")
    except (ValueError, TypeError):
        return {"role": "assistant", "content": text}
    return parsed


def _text(completion: Any) -> str:
    """A completion's text, given as text or as TRL's one assistant message."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def _call(reward: Reward, prompts: list, texts: list[str], completions: list, columns: dict[str, list],
          extras: dict[str, Any]) -> Any:  # fmt: skip
    if reward.model:
        return reward.fn(texts, [_text(c) for c in completions])
    out = reward.fn(prompts=prompts, completions=completions, **{**columns, **extras})
    return _await(out) if inspect.iscoroutine(out) else out


_LOOP: asyncio.AbstractEventLoop | None = None


def _await(coroutine: Any) -> Any:
    """An async reward's result, run on one event loop that a daemon thread keeps for the process, as TRL keeps one
    for its trainer: what a reward binds to the loop (a rate-limiting semaphore, an HTTP client's pool) lives from
    one step to the next, and a run started inside a running loop (a notebook) works."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
        threading.Thread(target=_LOOP.run_forever, name="deltatune-rewards", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coroutine, _LOOP).result()


def score(
    rewards: Sequence[Reward],
    prompts: list,
    prompt_texts: list[str],
    completions: list,
    columns: dict[str, list],
    sources: list[str],
    extras: dict[str, Any] | None = None,
) -> torch.Tensor:
    """(N, K) rewards of N completions (texts, or ``trl_completions``' messages: reward-model runs score the texts)
    under K rewards. ``columns`` (one value per completion: the rows' columns,
    ``completion_ids``) and ``extras`` (the same for every row: ``trl_extras``) reach each reward function by keyword.

    Raises:
        RewardError: a reward raised (the row it raised on is found by calling it on one row at a time) or returned
            a wrong length, a NaN/infinite value or a non-number.
    """
    n, extras = len(completions), extras or {}
    table = []
    for r in rewards:
        try:
            out = _call(r, prompts, prompt_texts, completions, columns, extras)
        except Exception as exc:  # noqa: BLE001  (user code: find the row and say it in one line)
            raise RewardError(_raised(r, prompts, prompt_texts, completions, columns, extras, sources, exc)) from None
        table.append(reward_values(out, r.name, n, [f"row {s}" for s in sources], none=True))
    return torch.tensor(table, dtype=torch.float32).T.reshape(n, len(rewards))


def combine(table: torch.Tensor, weights: torch.Tensor, sources: Sequence[str] = ()) -> torch.Tensor:
    """The weighted sum of each completion's rewards, (N, K) -> (N,), a reward of None (NaN in the table: "does not
    apply to this row") left out, as TRL's nansum; NaN for a row no reward applies to, with a warning naming it (TRL
    leaves such a row out of its group's baseline and gives it advantage 0: ``group_advantages``)."""
    rewards = (table * weights).nansum(-1)
    if (none := table.isnan().all(-1)).any():
        rows = ", ".join(str(sources[i]) if i < len(sources) else str(i) for i in none.nonzero().flatten().tolist())
        warnings.warn(f"every reward returned None for row {rows}: it gets no reward and advantage 0", stacklevel=2)
        rewards[none] = math.nan
    return rewards


def nanstd(x: torch.Tensor) -> torch.Tensor:
    """The Bessel-corrected std over the last dimension of the values that are not NaN (NaN where fewer than 2), as
    TRL's ``nanstd``."""
    n = (~x.isnan()).sum(-1, keepdim=True)
    var = ((x - x.nanmean(-1, keepdim=True)) ** 2).nansum(-1, keepdim=True) / (n - 1)
    return var.where(n > 1, math.nan).sqrt().squeeze(-1)


def _raised(r: Reward, prompts, texts, completions, columns, extras, sources, exc: Exception) -> str:
    def one(i: int) -> Callable[[], Any]:
        cut = {k: v[i : i + 1] for k, v in columns.items()}
        return lambda: _call(r, prompts[i : i + 1], texts[i : i + 1], completions[i : i + 1], cut, extras)

    singles = ((one(i), f"row {source}, completion {_text(completions[i])!r}") for i, source in enumerate(sources))
    return raised_line(r.name, r.fn, singles, exc, f"on the batch of rows {sources[0]} .. {sources[-1]}")
