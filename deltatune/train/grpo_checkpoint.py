"""GRPO checkpoints: ``checkpoint-<step>/`` holds the adapters, ``grpo_state.pt`` (the optimizer, scheduler, RNG
states, data order, log and metrics so far, the adaptive entropy coefficient; tensors and numbers only, read back with
``weights_only=True``), ``trainer_state.json`` (the Trainer's name, so ``runfolder.resume_checkpoint`` checks and picks
them) and ``deltatune_sums.json`` (the run's facts, so a resume after the data changed is refused as the Trainer
stages' is). Split from grpo.py (at its line limit); ``loop`` is grpo.GRPOLoop.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from ..config import ConfigError
from .ppo_checkpoint import rotate, write_facts

STATE_FILE = "grpo_state.pt"


def _save_checkpoint(
    out: str,
    step: int,
    loop,
    g: torch.Generator,
    history,
    order,
    metrics,
    keep: int | None,
    facts: dict[str, Any] | None = None,
    ceil_count: bool = False,
    start_key: str | None = None,
):
    """``checkpoint-<step>/``: the adapter, and the optimizer, scheduler, RNG and history to resume from; written to a
    staging folder and renamed into place, so a checkpoint folder is complete or absent. ``ceil_count``: the run counts
    a pass's last partial batch as a step (one begun before TRL's count: ``counted_ceil``); ``start_key``: what the
    run's eval_reward_before in ``metrics`` depends on (``ppo_checkpoint.start_key``), for a resume to compare."""
    final = os.path.join(out, f"checkpoint-{step}")
    staging = os.path.join(out, ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    loop.model.save_pretrained(staging)
    state = {
        "step": step,
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict() if loop.scheduler is not None else None,
        "generator": g.get_state(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": history,
        "order": order,
        "metrics": metrics,
        "start_key": start_key,  # (none before it: a resume evaluates its start again, ppo_checkpoint.kept_start)
        "entropy": loop.bonus.state_dict() if loop.bonus.adaptive else None,  # (TRL's entropy_ctrl_state.json)
        "epoch_count": "ceil" if ceil_count else "floor",  # (none before TRL's floor count: ceil)
    }
    torch.save(state, os.path.join(staging, STATE_FILE))
    with open(os.path.join(staging, "trainer_state.json"), "w", encoding="utf-8") as fh:  # what --resume looks for
        json.dump({"global_step": step, "stage": "grpo", "log_history": history}, fh)
    write_facts(staging, facts)  # (the data's bytes, which run.py compares on --resume)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    rotate(out, keep)


def check_state(path: str, state: dict[str, Any], loop) -> None:
    """ConfigError when checkpoint ``path`` (its ``grpo_state.pt`` read as ``state``) cannot resume ``loop``: checked
    before the start's evaluation too, which a resume from a checkpoint without its key runs first."""
    if len(state["optimizer"]["param_groups"]) != len(loop.optimizer.param_groups):  # one before c1a4e8e
        raise ConfigError(f"--resume: {path!r} was written by an older deltatune whose AdamW also decayed biases and "
                          "norm weights (one parameter group, now two); finish it with that version or start anew")  # fmt: skip


def _load_checkpoint(path: str, loop, g: torch.Generator, state: dict[str, Any] | None = None):
    """Restore the adapter, optimizer, scheduler and RNG state from a checkpoint; (step, history, order, metrics).
    ``state``: its ``grpo_state.pt`` as the caller read it already (``_read_state``), else read here."""
    state = _read_state(path) if state is None else state
    check_state(path, state, loop)
    for name in loop.model.peft_config:
        loop.model.load_adapter_weights(path if name == "default" else os.path.join(path, name), name)
    loop.optimizer.load_state_dict(state["optimizer"])
    if loop.scheduler is not None and state["scheduler"] is not None:
        loop.scheduler.load_state_dict(state["scheduler"])
    g.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    loop.bonus.load_state_dict(state.get("entropy"))  # (none in a checkpoint before it)
    # TRL's num_tokens goes on from the last step's; after a checkpoint before it, unknown: not logged, the rewards'
    # trainer_state counting on from 0 (an int, as TRL's state without the field)
    rows = state["history"]
    last = rows[-1].get("num_tokens") if rows else 0
    loop.state.num_input_tokens_seen, loop.tokens_known = last or 0, last is not None
    return state["step"], state["history"], state["order"], state["metrics"]


def _read_state(path: str) -> dict[str, Any]:
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise ConfigError(f"--resume: {path!r} is not a GRPO checkpoint (no {STATE_FILE})")
    return torch.load(state_file, map_location="cpu", weights_only=True)


def counted_ceil(path: str | dict[str, Any]) -> bool:
    """Whether the run of checkpoint ``path`` counts a pass over the prompts as ceil(prompts / train.batch_size) steps,
    as deltatune did before TRL's count (its RepeatSampler drops each pass's last partial batch: floor): a checkpoint
    without the marker, or a later one of such a run, which records it. ``path``: the checkpoint folder, or its
    ``grpo_state.pt`` as ``_read_state`` read it."""
    return (path if isinstance(path, dict) else _read_state(path)).get("epoch_count", "ceil") == "ceil"
