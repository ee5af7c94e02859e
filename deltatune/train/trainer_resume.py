"""What DeltaTrainer checks as ``--resume`` restores a checkpoint (split from trainer.py, near its line limit): a
checkpoint written at an early stop (``stopped_early``) and an optimizer state that does not fit the run's trained
parameters (``check_optimizer``)."""

from __future__ import annotations

import os

import torch


def stopped_early(callbacks) -> bool:
    """Whether an early-stopping callback's restored count has reached its patience: the checkpoint was written at the
    evaluation that stopped the run (the Trainer clears should_training_stop as it starts again, and the callback acts
    only at the next evaluation: eval_steps more steps were trained)."""
    for cb in callbacks:
        patience = getattr(cb, "early_stopping_patience", None)
        count = getattr(cb, "early_stopping_patience_counter", None)
        if isinstance(patience, int) and isinstance(count, int) and count >= patience:
            return True
    return False


def check_optimizer(checkpoint: str, optimizer) -> None:
    """The checkpoint's optimizer.pt against the run's optimizer, group by group, before it is loaded: a run whose
    trained parameters changed under --resume-changed (a method key such as full's freeze_vision_tower) is one line,
    not torch's ValueError from load_state_dict ("loaded state dict contains a parameter group that doesn't match the
    size of optimizer's group"), as ppo_checkpoint and grpo_checkpoint check theirs. Read memory-mapped: only the
    group sizes are looked at (the Trainer's own load reads the file as it does)."""
    from ..config import ConfigError

    path = os.path.join(str(checkpoint), "optimizer.pt")  # (FSDP's optimizer.bin / optimizer_0: passed over)
    if (
        optimizer is None
        or not os.path.isfile(path)
        or not os.path.isfile(os.path.join(str(checkpoint), "scheduler.pt"))
    ):
        return  # (the Trainer loads the optimizer only beside a scheduler.pt)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # (a file this cannot read: the Trainer's own load reports it)
        return
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        return
    sizes = [len(g["params"]) for g in groups]
    want = [len(g["params"]) for g in optimizer.param_groups]
    if sizes == want:
        return
    split = f" (in parameter groups of {sizes}, the run's {want})" if sum(sizes) == sum(want) else ""
    raise ConfigError(f"--resume: {os.path.basename(os.path.normpath(str(checkpoint)))}'s optimizer holds "
                      f"{sum(sizes)} trainable tensors where the run now trains {sum(want)}{split} (a method key "
                      f"changed under --resume-changed?); resume with --resume-changed and the method it was trained "
                      f"with, or train from the start (--overwrite)")  # fmt: skip
