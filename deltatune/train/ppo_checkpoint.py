"""PPO checkpoints: everything the next step depends on, so a resumed run ends where the uninterrupted one does.

``checkpoint-<step>/`` holds the active adapter (PEFT files), ``value_head.safetensors``, ``optimizer.pt`` (AdamW's
moments; tensors and numbers only, read back with ``weights_only=True``), ``rng_state.pth`` (torch's global random
state, which the rollouts sample from, and the data-order generator's) and ``trainer_state.json`` (the step, the KL
coefficient, the prompts still to come in this pass, the training time so far, the log, and eval_reward_before with
the ``start_key`` of what it was taken on; the HF Trainer's file name, so ``runfolder.resume_checkpoint`` checks and
picks PPO checkpoints as it does the Trainer's), and
``deltatune_sums.json`` with the run's ``runfolder.run_facts`` (the data files' bytes, the processes), the Trainer's
file of them, so a resume after the data changed is refused as the Trainer stages' is.

A checkpoint is written into a hidden staging folder and renamed into place: one that exists is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
from typing import Any

import torch

from ..config import ConfigError
from ..files import adapter_folder

STATE = "trainer_state.json"
PREFIX = "checkpoint-"


def write_facts(folder: str, facts: dict[str, Any] | None) -> None:
    """``facts`` (the run's ``runfolder.run_facts``) into ``folder``'s ``deltatune_sums.json``, the Trainer's file of
    them, which run.py compares on ``--resume``; nothing for None (a caller that has none)."""
    if facts is not None:
        from .trainer import SUMS

        with open(os.path.join(folder, SUMS), "w", encoding="utf-8") as fh:
            json.dump({"facts": facts}, fh)


def save(
    out: str,
    step: int,
    loop,
    generator: torch.Generator,
    order: list[int],
    history: list[dict[str, Any]],
    keep: int | None,
    facts: dict[str, Any] | None = None,
    max_steps: int | None = None,
    per_pass: bool = False,
    metrics: dict[str, Any] | None = None,
    start_key: str | None = None,
) -> str:
    """Write ``<out>/checkpoint-<step>`` for ``loop`` (a PPOLoop) and keep the newest ``keep`` checkpoints;
    ``facts``: the run's ``runfolder.run_facts``, for ``--resume`` to compare; ``max_steps``: the run's step count;
    ``per_pass``: the run counts train.epochs per pass, as one begun before TRL's count (``counted_per_pass``);
    ``metrics``: the run's metrics so far (eval_reward_before), which a resume keeps (``saved_metrics``) where taken
    under its ``start_key`` (``start_key``)."""
    from safetensors.torch import save_file

    final = os.path.join(out, f"{PREFIX}{step}")
    staging = os.path.join(out, f".{PREFIX}{step}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        loop.model.save_pretrained(staging, selected_adapters=list(loop.model.active_adapters))
        head = {k: v.detach().cpu().contiguous() for k, v in loop.value_head.state_dict().items()}
        save_file(head, os.path.join(staging, "value_head.safetensors"))
        torch.save(loop.optimizer.state_dict(), os.path.join(staging, "optimizer.pt"))
        if loop.scheduler is not None:
            torch.save(loop.scheduler.state_dict(), os.path.join(staging, "scheduler.pt"))
        rng = {"torch": torch.get_rng_state(), "data": generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, os.path.join(staging, "rng_state.pth"))
        state = {
            "global_step": step,
            "steps_done": loop.steps_done,
            "kl_coef": loop.kl_ctl.value,
            "runtime_s": loop.runtime_s,
            "order": order,
            "log_history": history,
            **({"max_steps": max_steps} if max_steps is not None else {}),
            **({"counted_per_pass": True} if per_pass else {}),
            **({"metrics": metrics} if metrics else {}),
            **({"start_key": start_key} if start_key else {}),
        }
        with open(os.path.join(staging, STATE), "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        write_facts(staging, facts)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    rotate(out, keep)
    if os.environ.get("DELTATUNE_TEST_KILL_AFTER_STEP") == str(step):  # the crash-resume tests' kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    return final


def rotate(out: str, keep: int | None) -> None:
    """Delete all but the newest ``keep`` ``checkpoint-<step>`` folders of ``out`` (PPO's and GRPO's; None: none)."""
    if keep is None:
        return
    steps = sorted(
        (int(n[len(PREFIX) :]), n) for n in os.listdir(out) if n.startswith(PREFIX) and n[len(PREFIX) :].isdecimal()
    )  # (isdecimal: "checkpoint-²" is a digit to isdigit, not to int)
    for _, name in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def counted_per_pass(checkpoint: str) -> bool:
    """Whether ``checkpoint``'s run counted train.epochs E as E * ceil(prompts / batch_size) steps (one written
    before the count became TRL's ceil(E * prompts / batch_size): its trainer_state.json holds no max_steps; or a
    later checkpoint of such a run, resumed since, which records counted_per_pass)."""
    with open(os.path.join(checkpoint, STATE), encoding="utf-8") as fh:
        state = json.load(fh)
    return "max_steps" not in state or bool(state.get("counted_per_pass"))


def saved_metrics(checkpoint: str, key: str | None) -> dict[str, Any]:
    """The metrics ``checkpoint``'s run had before its first step (eval_reward_before, as GRPO's checkpoints keep
    them), as ``kept_start`` keeps them for a resume whose start evaluation's key is ``key``; {} for a checkpoint
    written before they were kept."""
    with open(os.path.join(checkpoint, STATE), encoding="utf-8") as fh:
        state = json.load(fh)
    return kept_start(state.get("metrics", {}), state.get("start_key"), key)


# What a start evaluation samples and scores with, besides the prompts, their batch, the seed and the model.
START_SETTINGS = ("reward_model", "reward_funcs", "reward_weights", "max_new_tokens", "response_length", "temperature",
                  "top_p", "top_k", "min_p", "repetition_penalty", "generation_kwargs", "stop_token", "stop_token_id",
                  "num_generations_eval")  # fmt: skip


def start_key(cfg, eval_prompts) -> str | None:
    """A digest of what a PPO or GRPO run's start evaluation (train.eval_on_start's eval_reward_before) depends on:
    the eval prompts as encoded (a GRPO row's columns, which its rewards read, too), train.eval_batch_size, the seed,
    the model, its model.dtype and model.quantization, train.precision and the align settings of the reward and the
    sampling (``START_SETTINGS``); None when the run makes none. A resume reuses the evaluation its checkpoint kept
    only under an equal key (``kept_start``): one onto another eval file (--resume-changed) evaluates again, as its
    end is evaluated on the new one."""
    t = cfg.train
    if not eval_prompts or not t.eval_on_start:
        return None
    rows = [
        {k: v for k, v in vars(p).items() if k != "source"} if dataclasses.is_dataclass(p) else list(p)
        for p in eval_prompts
    ]  # (no copy of a row's images; a row's file:line as written is a label only)
    model = cfg.model.name_or_path  # (a local folder as an absolute path: a resume may write it either way)
    model = os.path.abspath(model) if isinstance(model, str) and os.path.isdir(model) else model
    what = {"prompts": rows, "batch_size": t.eval_batch_size or t.batch_size, "seed": t.seed,
            "model": model, "precision": t.precision,
            **{k: getattr(cfg.align, k) for k in START_SETTINGS}}  # fmt: skip
    # the weights it samples with; each only where it is not the default, so a run of the defaults keeps the key its
    # checkpoints recorded before these were read (and does not sample its start again on a resume); getattr: a
    # caller's stand-in config may lack them
    from .models import resolved_dtype  # (auto: the dtype it loads; quantization {}: none)

    dtype = getattr(cfg.model, "dtype", None)
    weights = {
        "dtype": resolved_dtype(dtype) if dtype else None,
        "quantization": getattr(cfg.model, "quantization", None) or None,
    }
    what.update({k: v for k, v in weights.items() if v not in ("float32", None)})
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()


def kept_start(metrics: dict[str, Any], saved_key: str | None, key: str | None) -> dict[str, Any]:
    """A checkpoint's ``metrics`` for the run resumed from it: its eval_reward_before only where the checkpoint took
    it under ``key`` (``start_key``, recorded as ``saved_key``), else the resumed run evaluates its start again (a
    checkpoint of another eval set or settings, or one written before the key was recorded)."""
    kept = dict(metrics)
    if key is None or saved_key != key:
        kept.pop("eval_reward_before", None)
    return kept


def load(checkpoint: str, loop, generator: torch.Generator) -> tuple[int, list[int], list[dict[str, Any]]]:
    """Restore ``loop`` and ``generator`` from ``checkpoint``; returns (its step, the data order, the history).
    Every file is read and checked before anything of the loop changes: a refused checkpoint leaves it as it was."""
    from safetensors.torch import load_file

    with open(os.path.join(checkpoint, STATE), encoding="utf-8") as fh:
        state = json.load(fh)
    head = load_file(os.path.join(checkpoint, "value_head.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in head.items()}
    want = {k: tuple(v.shape) for k, v in loop.value_head.state_dict().items()}
    if shapes != want:  # (load_state_dict's RuntimeError is a traceback)
        raise ConfigError(f"{checkpoint}: value_head.safetensors holds {shapes}, this run's value head {want} (a "
                          "checkpoint of another model); train from the start (--overwrite)")  # fmt: skip
    optimizer = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location=loop.device, weights_only=True)
    if len(optimizer["param_groups"]) != len(loop.optimizer.param_groups):  # torch's ValueError is a traceback
        raise ConfigError(
            f"{checkpoint}: optimizer.pt holds {len(optimizer['param_groups'])} parameter group(s), this run's AdamW "
            f"{len(loop.optimizer.param_groups)} (a checkpoint of a deltatune that decayed biases and norms too); "
            "train from the start (--overwrite)"
        )
    sizes = [len(group["params"]) for group in optimizer["param_groups"]]
    want = [len(group["params"]) for group in loop.optimizer.param_groups]
    if sizes != want:  # (torch's ValueError, after the adapter and value head were loaded)
        raise ConfigError(f"{checkpoint}: optimizer.pt holds parameter groups of {sizes} tensors, this run's AdamW "
                          f"{want} (a checkpoint of another adapter); train from the start (--overwrite)")  # fmt: skip
    scheduler = os.path.join(checkpoint, "scheduler.pt")
    scheduler = torch.load(scheduler, weights_only=True) if loop.scheduler and os.path.isfile(scheduler) else None
    rng = torch.load(os.path.join(checkpoint, "rng_state.pth"), weights_only=True)
    for name in loop.model.active_adapters:
        loop.model.load_adapter_weights(adapter_folder(checkpoint, name), name)
    loop.value_head.load_state_dict(head)
    loop.optimizer.load_state_dict(optimizer)
    if scheduler is not None:
        loop.scheduler.load_state_dict(scheduler)
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["data"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    loop.kl_ctl.value = state["kl_coef"]
    loop.steps_done = state["steps_done"]
    loop.runtime_s = state.get("runtime_s", 0.0)  # (0: a checkpoint written before it was kept)
    return state["global_step"], list(state["order"]), list(state["log_history"])


def live_log(out: str, history: list[dict[str, Any]]) -> Any:
    """Write ``history`` (a resumed run's checkpoint steps) as the run folder's log_history.jsonl; the function
    returned appends rows to it as they are made (report.write keeps the file it finds)."""
    from .trainer import LOG_FILE

    path = os.path.join(out, LOG_FILE)

    def write(rows: list[dict[str, Any]], mode: str = "a") -> None:
        os.makedirs(out, exist_ok=True)
        with open(path, mode, encoding="utf-8") as fh:
            fh.writelines(json.dumps(h, default=float) + "\n" for h in rows)

    write(history, "w")
    return write
