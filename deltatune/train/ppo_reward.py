"""Calling PPO's reward on texts: a reward function that raises is one line naming it, the response it raised on and
where in the user's code (as GRPO's rewards, grpo_rewards.py, which imports ``raised_line`` and ``import_reward`` from here), not the user's traceback from inside the loop. Split
from ppo.py, near its line limit."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .ppo_math import RewardError


def call_reward(fn: Callable, name: str, prompts: Sequence[str], responses: Sequence[str]) -> Any:
    """``fn(prompts, responses)``; RewardError naming the reward ``name``, the first response it raises on alone
    (each pair called alone to find it) and the file:line it raised at, when it raises."""
    try:
        return fn(prompts, responses)
    except Exception as exc:  # noqa: BLE001  (user code: any error is one line; --debug shows the chain)
        raise RewardError(_raised(fn, name, prompts, responses, exc)) from exc


def _raised(fn: Callable, name: str, prompts: Sequence[str], responses: Sequence[str], exc: Exception) -> str:
    singles = (
        (functools.partial(fn, [p], [r]), f"the response {r[:40]!r} to {p[:40]!r}") for p, r in zip(prompts, responses)
    )
    return raised_line(name, fn, singles, exc, f"on a batch of {len(responses)} responses")


def raised_line(
    name: str, fn: Callable, singles: Iterable[tuple[Callable[[], Any], str]], exc: Exception, batch: str
) -> str:
    """One line for reward ``name`` (function ``fn``) that raised ``exc`` on a batch: each of ``singles`` (a call on
    one row alone, and how the line names that row) is tried in turn and the first that raises is named, with the
    line of ``fn``'s own file it raised at (``_where``); none raising, the batch's ``exc`` as ``batch``. PPO's and
    GRPO's rewards (grpo_rewards.py) alike."""
    file = reward_file(fn)  # the reward's source: where it raised
    for call, what in singles:
        try:
            call()
        except Exception as one:  # noqa: BLE001
            exc, batch = one, what
            break
    where = _where(exc, file)
    return f"reward {name} raised {type(exc).__name__}: {exc} ({batch}" + (f", at {where})" if where else ")")


def _where(exc: BaseException, file: str | None = None) -> str:
    """``file:line`` where in the user's code ``exc`` was raised ("" when nowhere there): a SyntaxError's own line, else
    its innermost frame in ``file`` (a reward function's source), else outside deltatune and the import machinery."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        frames = [(exc.filename, exc.lineno)]
    else:
        ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
        frames = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)
                  if not f.filename.startswith(("<", ours)) and "importlib" not in f.filename]  # fmt: skip
        frames = [f for f in frames if file and os.path.abspath(f[0]) == os.path.abspath(file)] or frames
    if not frames:
        return ""
    path = os.path.relpath(frames[-1][0]) if not os.path.relpath(frames[-1][0]).startswith("..") else frames[-1][0]
    return f"{path}:{frames[-1][1]}"


def reward_file(fn: Callable) -> str | None:
    """The source file of reward ``fn``: a function's, a ``functools.partial``'s function's, a callable instance's
    ``__call__``'s (None for a builtin), where ``_where`` looks for the line it raised at."""
    fn = getattr(fn, "func", fn)  # (functools.partial)
    code = getattr(fn, "__code__", None) or getattr(getattr(type(fn), "__call__", None), "__code__", None)  # noqa: B004
    return getattr(code, "co_filename", None)


def import_reward(spec: str, key: str = "align.reward_funcs entry") -> Callable[..., Any]:
    """The function named by ``module:function`` or ``path/to/file.py:function`` (a path relative to the current
    directory, as data paths are): GRPO's align.reward_funcs entries, PPO's align.reward_model (``key``).

    Raises:
        ConfigError: malformed, cannot be imported, no such function, or not callable (the spec named).
    """
    from ..config import ConfigError

    where = f"{key} {spec!r}"
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ConfigError(f"{where} is neither a reward run folder nor of the form module:function")
    try:
        if module.endswith(".py"):
            if not os.path.isfile(module):
                raise ImportError(f"no file {module}")
            path = os.path.abspath(module)
            spec_ = importlib.util.spec_from_file_location(f"deltatune_reward_{abs(hash(path))}", path)
            mod = importlib.util.module_from_spec(spec_)
            # As when the file runs as a script: its folder's modules import (at the end of the path: it shadows
            # nothing installed), and it is a module by its name (dataclasses and pickle look it up there).
            if os.path.dirname(path) not in sys.path:
                sys.path.append(os.path.dirname(path))
            sys.modules[spec_.name] = mod
            spec_.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
        fn = getattr(mod, name)
    except Exception as exc:  # noqa: BLE001  (user code: any error while importing is reported in one line)
        raise ConfigError(f"{where} could not be imported: {_error(exc)}") from None
    if not callable(fn):
        raise ConfigError(f"{where} is not callable")
    return fn


def _error(exc: BaseException) -> str:
    """``Type: message (file:line)``, the line as ``_where`` finds it."""
    text = exc.msg if isinstance(exc, SyntaxError) and exc.filename and exc.lineno else str(exc)
    where = _where(exc)
    return f"{type(exc).__name__}: {text}" + (f" ({where})" if where else "")
