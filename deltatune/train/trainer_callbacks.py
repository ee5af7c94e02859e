"""The callbacks a deltatune run adds to the HF Trainer: the progress bar (loss, learning rate, tokens/s), a model's
own regulariser trained once per step, the run's live log file (``LOG_FILE``, which the board's curves read) and the
crash-resume test's kill hook.

``trainer.py`` adds ``Regularizer`` to every DeltaTrainer; ``run.py`` adds the rest (``callbacks()``, ``ProgressBar``).
Split from trainer.py in session 46 to give it headroom; nothing here knows the trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time

import torch
from transformers.trainer_callback import EarlyStoppingCallback, ProgressCallback, TrainerCallback

SUMS = "deltatune_sums.json"  # in a checkpoint: the run's loss summed over its steps, its time, its run_facts


class ProgressBar(ProgressCallback):
    """The Trainer's tqdm bar with loss, learning rate and throughput (tokens/s) as its postfix."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._t0, self._tokens0 = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        post = {}
        if "loss" in logs:
            post["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            post["lr"] = f"{logs['learning_rate']:.2e}"
        elapsed = time.perf_counter() - self._t0
        tokens = state.num_input_tokens_seen - self._tokens0
        if tokens and elapsed > 0:
            post["tok/s"] = f"{tokens / elapsed:,.0f}"
        if "eval_loss" in logs:
            post["eval_loss"] = f"{logs['eval_loss']:.4f}"
        if post:
            self.training_bar.set_postfix(post, refresh=True)


class Regularizer(TrainerCallback):
    """A model's own regulariser, ``model.regularization_loss()`` (a scalar, or None when nothing asks for one),
    trained as the adapters library's AdapterTrainer trains its fusion regulariser: backpropagated after each
    optimizer step, once per step whatever the accumulation, so that its gradient joins the next step's (the Trainer
    has zeroed the gradients by then)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        hook = getattr(model, "regularization_loss", None)
        loss = hook() if callable(hook) else None
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()


class KillAfterSave(TrainerCallback):
    """Test hook for the crash-resume test: SIGKILL this process right after the checkpoint of step N is written,
    as a power cut would. Active only when DELTATUNE_TEST_KILL_AFTER_STEP is set."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


LOG_FILE = "log_history.jsonl"
"""The run's log history, one JSON object per Trainer log (loss, eval metrics) as it happens: the board's live
curves read it while the run trains."""


class LogFile(TrainerCallback):
    """Append every log of the Trainer (its ``log_history`` entry, with the step) to ``<output_dir>/LOG_FILE``.

    A fresh run starts the file anew; a resumed run starts it with the checkpoint's log history and appends, its
    closing summary (the Trainer's ``train_loss`` and ``train_runtime``, which cover the steps since the resume) made
    the whole run's, as its metrics.json has them (``DeltaTrainer.train``, from the checkpoint's ``SUMS``).
    Each line is written and flushed whole, so a reader sees at worst a partial last line (which it skips)."""

    before: dict | None = None  # the resumed checkpoint's sums (loss summed over its steps, time, step)

    def on_train_begin(self, args, state, control, **kwargs):
        self.before = None
        if state.global_step > 0:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            with contextlib.suppress(OSError, ValueError):
                path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", SUMS)
                with open(path, encoding="utf-8") as fh:
                    sums = json.load(fh)
                if isinstance(sums, dict) and sums.get("step") == state.global_step:
                    self.before = sums
        if not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        # Resumed: the history as the checkpoint recorded it, without what was logged after it was written (the
        # lost steps', or the final evaluation's at its own step, which the resumed run logs again).
        kept = [json.dumps(h, default=float) + "\n" for h in state.log_history] if state.global_step > 0 else []
        with open(os.path.join(args.output_dir, LOG_FILE), "w", encoding="utf-8") as fh:
            fh.writelines(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and self.before and isinstance(logs.get("train_loss"), float) and state.global_step:
            before, step = self.before, state.global_step  # (the sums as DeltaTrainer.train adds them)
            whole = {"train_loss": (before["loss_sum"] + logs["train_loss"] * (step - before["step"])) / step,
                     "train_runtime": round(before["runtime_s"] + logs.get("train_runtime", 0.0), 4)}  # fmt: skip
            logs = {**logs, **whole}  # (a copy: the Trainer's dict is its TrainOutput's metrics, which it adds to)
            if state.log_history and state.log_history[-1].get("step") == step:
                state.log_history[-1].update(whole)
        if state.is_world_process_zero and logs:
            now = round(time.time(), 3)  # the board's relative and wall x axes (TensorBoard's wall_time)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["wall_time"] = now  # kept in trainer_state.json: a resumed log keeps its times
            line = json.dumps({**logs, "step": state.global_step, "wall_time": now}, default=float)
            with open(os.path.join(args.output_dir, LOG_FILE), "a", encoding="utf-8") as fh:
                fh.write(line + "\n")


class BestInThisFolder(TrainerCallback):
    """A resumed run's best checkpoint (``load_best_model_at_end``) as one of its own folder: trainer_state.json
    records it by the path the run had when it was written, so a run folder moved or copied and then resumed lost it
    (the Trainer drops a path that is gone: its rotation then deleted the best checkpoint and the run ended with
    its last adapter, eval_loss 0.7004 where the uninterrupted run's best gave 0.6956) or read the other folder's."""

    def on_train_begin(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if state.global_step <= 0 or not args.output_dir:
            return
        recorded = state.best_model_checkpoint
        # The recorded checkpoint's name first: best_global_step may be an evaluation that saved none (eval_steps
        # below save_steps), its checkpoint the recorded one; a moved folder's recorded path is gone (dropped).
        names = [os.path.basename(recorded.rstrip("/\\"))] if recorded else []
        names += [f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"] if state.best_global_step else []
        mine = next((p for n in names if os.path.isdir(p := os.path.join(args.output_dir, n))), None)
        # Spelled as output_dir even where the recorded path is the same folder (relative at the start, absolute
        # now, or through a link): the rotation keeps the best by comparing path strings with output_dir's glob.
        if mine and os.path.isdir(mine):
            state.best_model_checkpoint = mine
        elif recorded and os.path.isdir(recorded) and not _inside(recorded, args.output_dir):
            # A copy of the run without its best checkpoint, the original still there: not the other folder's.
            state.best_model_checkpoint = None
            if state.is_world_process_zero:
                print(f"deltatune: --resume: the best checkpoint ({recorded}) is not in {args.output_dir}; the run "
                      "ends with a later checkpoint that evaluates better, or its last", file=sys.stderr)  # fmt: skip


def _inside(path: str, folder: str) -> bool:
    return os.path.realpath(os.path.dirname(path.rstrip("/\\"))) == os.path.realpath(folder)


class EarlyStopping(EarlyStoppingCallback):
    """transformers' EarlyStoppingCallback at the recipe's patience and threshold (``recipe``), also when --resume
    restores its count from a checkpoint: the Trainer rebuilds a restored callback from the arguments the checkpoint
    recorded, so a patience changed with --resume-changed was silently the old one."""

    recipe: tuple[int, float] = (1, 0.0)

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0) -> None:
        super().__init__(*self.recipe)

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        # A checkpoint written without early stopping (--resume-changed adding it, a run from before the keys) holds
        # no state of it: the Trainer's save indexes stateful_callbacks by its name (KeyError at the first save).
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())


def callbacks(train=None) -> list[TrainerCallback]:
    """The callbacks ``run.py`` gives a Trainer stage; with the recipe's ``train`` section, transformers'
    EarlyStoppingCallback where ``train.early_stopping_patience`` is set (a stateful callback: its count of evaluations
    without improvement is in each checkpoint, which --resume restores: run.py's restore_callback_states_from_checkpoint;
    the Trainer's default would restart it at 0 and train past the uninterrupted run's stop)."""
    step = os.environ.get("DELTATUNE_TEST_KILL_AFTER_STEP")
    patience = getattr(train, "early_stopping_patience", None)
    recipe = (patience, float(getattr(train, "early_stopping_threshold", 0.0)))
    early = [type("EarlyStopping", (EarlyStopping,), {"recipe": recipe})()] if patience else []
    return [LogFile(), BestInThisFolder(), *early, *([KillAfterSave(int(step))] if step else [])]
