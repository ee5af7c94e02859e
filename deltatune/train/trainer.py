"""The HF Trainer, taught three things: save adapters (not the whole model), write checkpoints atomically,
and stop on a non-finite loss. The callbacks a run adds (progress bar, regulariser, log file) are
``trainer_callbacks.py``'s.

The trainer never asks which method is active: it saves and loads through ``DeltaModel``.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..files import write_failure
from ..loss import shifts_labels, token_loss
from .trainer_callbacks import LOG_FILE, SUMS, Regularizer  # noqa: F401  (LOG_FILE, SUMS: read from here)
from .trainer_resume import check_optimizer, stopped_early

STAGING = ".staging"
EPOCH_RNG = "deltatune_epoch_rng_{}.pt"  # in a checkpoint: torch's RNG state as its epoch started, per process


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stopped before the optimizer step."""

    def __init__(self, step: int, value: float, what: str = "training loss") -> None:
        super().__init__(
            f"the {what} became {value} at step {step}; training stopped before that step's "
            "update, and the last checkpoint (if any) holds the last good state. Lower train.lr, "
            "check the data, or use fp32."
        )
        self.step = step


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder); nothing half-written is left behind."""


class DeltaTrainerMixin:
    """What a Trainer needs to treat a ``DeltaModel`` as it treats a peft model; mixed into ``transformers.Trainer``
    (``DeltaTrainer``) and into TRL's trainers (``trl_trainer``).

    - checkpoints and ``save_model`` hold the adapter (PEFT's files) and the tokenizer, not the whole model, so
      tied-embedding models save too; ``resume_from_checkpoint`` and ``load_best_model_at_end`` load the adapter;
    - dataset columns are matched against the *base* model's forward signature (no ``remove_unused_columns=False``);
    - the label names come from the base model's class, so ``evaluate()`` reports ``eval_loss``;
    - a NaN or infinite loss stops training before that step's update (``NonFiniteLossError``).

    The plain ``transformers.Trainer`` only knows peft's own class; given a DeltaModel it would write the whole
    state dict with safetensors, so ``DeltaModel.state_dict`` refuses that call with a one-line hint to use this.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stats: dict[str, list[float]] = defaultdict(list)
        self._eval_tokens: list[torch.Tensor] | None = None  # (loss summed over label tokens, tokens) while evaluating
        base = getattr(self._delta_model(), "get_base_model", None)
        if base is not None and shifts_labels(base()):
            self._loss_shifts_labels = True  # the item count over labels[..., 1:] (the Trainer's misses GPT-2)
        if (
            base is not None
            and getattr(self, "_loss_shifts_labels", False)
            and _scores_first_label(self._delta_model())
        ):
            self._loss_shifts_labels = False  # virtual tokens before the row: its first label is a target too
        if base is not None and getattr(self, "label_smoother", None) is not None and _is_causal_lm(base()):
            if _scores_first_label(self._delta_model()):  # the virtual tokens' logit for it is not in the output
                raise ValueError("label smoothing does not score a prompt-tuned causal LM's first label (its logit "
                                 "sits on a virtual token): set label_smoothing_factor 0 or use another method")  # fmt: skip
            # The Trainer shifts the smoothed labels only for a model whose own class name is a causal LM's (or a
            # peft model's base): a DeltaModel's loss was scored unshifted, token t against label t (5.91, not 4.91)
            self.label_smoother = functools.partial(self.label_smoother, shift_labels=True)
            self._loss_shifts_labels = True  # its item count over labels[..., 1:], as the smoother scores them
        if base is not None and not hasattr(base(), "accepts_loss_kwargs"):
            # What the Trainer reads off a bare model: DeltaModel's forward takes **kwargs whatever the base's does,
            # and a base without them (a custom module) crashed on the item count the Trainer then passed it.
            params = inspect.signature(base().forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        # The base model's labels, unless the trainer chose its own (TRL's RewardTrainer: none, and a loss to return)
        if (
            base is not None
            and self.args.label_names is None
            and not (self.can_return_loss and self.label_names == [])
        ):
            from transformers.utils import can_return_loss, find_labels

            self.label_names = find_labels(type(base()))
            self.can_return_loss = can_return_loss(type(base()))

        self.add_callback(Regularizer)

    def _delta_model(self):
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer's ``train``, refusing in one line a DeltaModel with nothing to train (torch would fail in the first
        backward pass: "element 0 of tensors does not require grad"). A resumed run reports the whole run's training
        loss and time (the Trainer's cover the steps since the resume), and evaluates on start only if it starts."""
        model = self._delta_model()
        if hasattr(model, "peft_config") and not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"the model has nothing to train: its adapters ({', '.join(model.peft_config) or 'none'}) are "
                "loaded for inference or not active; load with is_trainable=True, or call set_adapter"
            )
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # (the Trainer's error)
        self._before = {"loss_sum": 0.0, "runtime_s": 0.0, "step": 0}
        done = os.path.join(str(resume_from_checkpoint), SUMS)
        if resume_from_checkpoint and os.path.isfile(done):
            with open(done, encoding="utf-8") as fh:
                self._before = json.load(fh)
        self._started = time.time()
        on_start = self.args.eval_on_start
        self.args.eval_on_start = on_start and not resume_from_checkpoint  # its step-0 evaluation is logged already
        try:
            out = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.args.eval_on_start = on_start
        if not self._before["step"]:
            return out
        loss_sum = self._before["loss_sum"] + out.training_loss * (out.global_step - self._before["step"])
        loss = loss_sum / max(out.global_step, 1)
        runtime = self._before["runtime_s"] + out.metrics.get("train_runtime", 0.0)
        return type(out)(out.global_step, loss, {**out.metrics, "train_loss": loss, "train_runtime": runtime})

    def _run_epoch(self, *args, **kwargs):
        # Resumed from its checkpoint at max_steps (a run stopped while writing its outputs), the Trainer would train
        # one step more before checking the limit.
        # So too from the checkpoint written at an early stop (its restored count at the patience).
        if 0 < self.args.max_steps <= self.state.global_step or stopped_early(self.callback_handler.callbacks):
            self.control.should_training_stop = True
            return None
        # The Trainer's LengthGroupedSampler draws an epoch's order from torch's global RNG as the epoch starts (no
        # generator; a DataLoader its workers' seed too): resumed mid-epoch past the first, it drew from the state the
        # resume left, another order (0 of 15 steps on the uninterrupted run's rows; the plain Trainer's too). That
        # state is in each checkpoint and comes back before the resumed epoch's first batch (the Trainer then loads
        # the checkpoint's own RNG state, as it does).
        at = kwargs.get("resume_from_checkpoint")
        skips = kwargs.get("steps_trained_in_current_epoch", 0) > 0 and not self.args.ignore_data_skip
        if at and skips and kwargs.get("epoch") == kwargs.get("epochs_trained"):
            path = os.path.join(str(at), EPOCH_RNG.format(self.args.process_index))
            if os.path.isfile(path):
                torch.random.set_rng_state(torch.load(path, weights_only=True))
            elif self.args.train_sampling_strategy == "group_by_length" and kwargs.get("epoch", 0) > 0:
                # (a checkpoint from before the file: batch_rebalance seeds its own order, random/sequential need none)
                warnings.warn(f"{os.path.basename(str(at))} holds no {os.path.basename(path)} (written before "
                              f"deltatune saved it): the resumed epoch's group_by_length order is drawn afresh, "
                              f"not the uninterrupted run's rows", UserWarning, stacklevel=2)  # fmt: skip
        self._epoch_rng = torch.random.get_rng_state()
        return super()._run_epoch(*args, **kwargs)

    def log_stat(self, key: str, value: float) -> None:
        """Add a value to a training statistic; its mean since the last log is logged with the loss."""
        self._stats[key].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats:
            logs.update({k: sum(v) / len(v) for k, v in self._stats.items()})
            self._stats.clear()
        super().log(logs, start_time)

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer reads the columns to keep off the model's forward, which for a DeltaModel is (*args, **kwargs):
        # read them off the base model's instead (a subclass that names its own columns, as TRL's do, keeps them).
        if self._signature_columns is None:
            import inspect

            super()._set_signature_columns_if_needed()
            if {"args", "kwargs"} & set(self._signature_columns or []):
                model = self._delta_model()
                base = model.get_base_model() if hasattr(model, "get_base_model") else model  # (a plain model too)
                columns = [*inspect.signature(base.forward).parameters, "label", "label_ids", *self.label_names]
                self._signature_columns = [c for c in dict.fromkeys(columns) if c not in ("args", "kwargs")]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self._delta_model().save_pretrained(output_dir)
        processor = self.processing_class  # else the collator's tokenizer, as the Trainer saves it
        processor = processor if processor is not None else getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)

    def _determine_best_metric(self, metrics, trial):
        """The Trainer's; a ``metric_for_best_model`` the evaluation does not report is one line naming it and the
        metrics it does (the Trainer's KeyError came as a traceback after the first evaluation)."""
        try:
            return super()._determine_best_metric(metrics, trial)
        except KeyError:
            from ..config import ConfigError

            skip = ("_runtime", "_per_second", "_preparation_time")
            have = [k.removeprefix("eval_") for k in metrics if k.startswith("eval_") and not k.endswith(skip)]
            raise ConfigError(f"metric_for_best_model (train.metric_for_best_model in a recipe) is "
                              f"{self.args.metric_for_best_model!r}, which this evaluation does not report; it "
                              f"reports {', '.join(have)}")  from None  # fmt: skip

    def _load_best_model(self) -> None:
        if not hasattr(self._delta_model(), "load_adapter_weights"):  # a peft or plain model: the Trainer's way
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is not None and not getattr(self, "is_deepspeed_enabled", False):  # (its own files)
            check_optimizer(checkpoint, self.optimizer)  # one line, where torch's load_state_dict was a traceback
        return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        delta = self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False)
        if not hasattr(delta, "load_adapter_weights"):  # a peft or plain model: the Trainer's way
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name in delta.peft_config:
            folder = resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            delta.load_adapter_weights(folder, name)

    def _get_output_dir(self, trial) -> str:
        # _save_checkpoint writes into this folder; pointing it at a hidden staging folder makes the final
        # rename in _save_checkpoint the moment a checkpoint appears, complete.
        if getattr(self, "_staging", False):
            return os.path.join(self.args.output_dir, STAGING)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, STAGING)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        # Every process writes into the staging folder (its RNG state): none before it is emptied, and it is moved
        # only once all have written (else a process wrote into a folder just moved or removed: DDP's flaky crash).
        self.accelerator.wait_for_everyone()
        self._staging = True
        failure: OSError | None = None
        try:
            super()._save_checkpoint(model, trial)
            if getattr(self, "_epoch_rng", None) is not None:  # every process its own, as the Trainer's RNG state
                folder = os.path.join(staging, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
                torch.save(self._epoch_rng, os.path.join(folder, EPOCH_RNG.format(self.args.process_index)))
            if self.args.should_save:  # the run's loss and time so far, for a resumed run's totals
                before = getattr(self, "_before", {"loss_sum": 0.0, "runtime_s": 0.0})
                own = self._total_loss_scalar + self._tr_loss.item()  # this train() call's, logged and not
                sums = {"loss_sum": before["loss_sum"] + own, "step": self.state.global_step,
                        "runtime_s": before["runtime_s"] + time.time() - getattr(self, "_started", time.time()),
                        "facts": getattr(self, "run_facts", {})}  # fmt: skip
                name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                with open(os.path.join(staging, name, SUMS), "w", encoding="utf-8") as fh:
                    json.dump(sums, fh)
        except Exception as exc:  # disk full, read-only, ...: the half-written checkpoint goes, the last good stays
            failure = write_failure(exc)  # (safetensors and torch wrap the OSError in their own errors)
            if failure is None:
                raise
        finally:
            self._staging = False
        failed = torch.tensor(int(failure is not None), device=self.args.device)
        if self.accelerator.num_processes > 1:
            failed = self.accelerator.reduce(failed, "sum")  # also the barrier before the move
        if failed.item():
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            name = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            where = (failure.filename if failure is not None else None) or name
            why = (failure.strerror or failure) if failure is not None else "another process could not write its part"
            raise CheckpointWriteError(
                f"writing the checkpoint of step {self.state.global_step} failed at {where}: "
                f"{why}; the last complete checkpoint in {run_dir} is kept (--resume continues from it)"
            ) from None
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint and STAGING in self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(final, "trainer_state.json"))  # it named the staging folder
            best = self.state.best_model_checkpoint  # kept, as the Trainer's own rotation keeps it
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit, best_model_checkpoint=best
            )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The Trainer's, also adding up the loss over the batch's label tokens when the labels are per token (a
        causal LM, an encoder-decoder, a token classifier: their loss is a mean over those tokens)."""
        labels = inputs.get("labels") if isinstance(inputs, Mapping) else None  # a dict, or a BatchEncoding
        real = self._real_rows(labels) if self._eval_tokens else None
        if real is not None:  # a padded last batch: the rows repeated to fill it are not scored (nor counted)
            labels = labels.clone()
            labels[real:] = -100
            inputs = {**inputs, "labels": labels}
        out = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if out[0] is not None and isinstance(labels, torch.Tensor) and labels.dim() == 2 and self._eval_tokens:
            shifted = getattr(self, "_loss_shifts_labels", False)
            counted = inputs["shift_labels"] if "shift_labels" in inputs else labels[:, 1:] if shifted else labels
            n = counted.ne(-100).sum().to(out[0].device)
            loss = torch.where(n > 0, out[0].detach().float(), 0.0)  # a batch with no label token adds nothing
            self._eval_tokens = [self._eval_tokens[0] + loss * n, self._eval_tokens[1] + n]
        return out

    def _real_rows(self, labels) -> int | None:
        """How many leading rows of this batch are the data's own, where the last batch of a multi-process
        evaluation was filled up with rows from the start of the data (accelerate's ``even_batches``, which the
        Trainer's ``gather_for_metrics`` drops again); None where every row is. Only for class or token ids: -100
        means nothing to a float target."""
        state, processes = self.accelerator.gradient_state, self.accelerator.num_processes
        if processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
            return None
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() == 0:
            return None
        rows = labels.shape[0]  # every process's last batch is filled to the same size
        real = min(max(state.remainder - self.accelerator.process_index * rows, 0), rows)
        return real if real < rows else None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The Trainer's, with the loss of per-token labels a mean over every label token of the evaluation. The
        Trainer's is a mean over batches weighted by their rows, so the eval loss (and perplexity) of a language
        model moved with eval_batch_size, and sat off the per-token mean by how the rows' lengths vary.

        The random generators come out as they went in: the Trainer's evaluation drew from torch's (each pass over a
        DataLoader draws its base seed), so dropout and NEFTune noise after it moved with data.eval and eval_steps,
        and a run resumed from a checkpoint written just before an evaluation (an epoch's last step) trained on
        another stream than the run it continues."""
        import random

        import numpy as np

        states = random.getstate(), np.random.get_state()
        devices = [self.args.device.index or 0] if self.args.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                return self._evaluation_loop(
                    dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
                )
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])

    def _evaluation_loop(self, dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix):
        zero = torch.zeros((), device=self.args.device)
        self._eval_tokens = [zero, zero.long()]
        # Each process's loss a mean over its own tokens: the Trainer's default divides by the count gathered from
        # every process and multiplies by their number, a mean only where every process has as many tokens.
        averaged, self.args.average_tokens_across_devices = self.args.average_tokens_across_devices, False
        try:
            out = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            total, n = self._eval_tokens
        finally:
            self._eval_tokens = None
            self.args.average_tokens_across_devices = averaged
        key = f"{metric_key_prefix}_loss"
        if key in out.metrics:  # every process has it: all take part in the reduction
            total, n = (self.accelerator.reduce(t, "sum") for t in (total, n))  # over the processes' shares
            if n.item() > 0:
                out.metrics[key] = (total / n).item()
        return out

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all() and self._scores_any(inputs):
            raise NonFiniteLossError(self.state.global_step + 1, float(loss.detach().float().mean()))
        return loss

    def _scores_any(self, inputs) -> bool:
        """Whether this micro-batch has a labelled token (True where its labels do not say). With none its loss is
        0 / 0 = NaN beside a gradient of 0 (a mean per micro-batch, or a step count of 0): the Trainer filters it from
        its log and trains on (a row whose answer the prompt crowded out stopped the run here, blaming the lr)."""
        labels = inputs.get("shift_labels", inputs.get("labels")) if isinstance(inputs, Mapping) else None
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
            return True
        shifted = "shift_labels" not in inputs and getattr(self, "_loss_shifts_labels", False)
        return bool((labels[..., 1:] if shifted else labels).ne(-100).any())

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's, stopping before the update on a NaN or infinite gradient of a finite loss (a NaN update
        made every weight NaN, and a checkpoint written before the next step's loss showed it kept them). Not under
        fp16's gradient scaler or DeepSpeed, which skip such a step themselves. (transformers 5's hook: 4.x has none,
        and there only the loss is checked.)"""
        norm = super()._get_grad_norm(model, grad_norm)
        scaled = getattr(self.accelerator, "scaler", None) is not None or getattr(self, "is_deepspeed_enabled", False)
        if norm is not None and not scaled and not math.isfinite(float(norm)):  # (DeepSpeed's fp16 skips them too)
            raise NonFiniteLossError(self.state.global_step + 1, float(norm), "gradient norm")
        return norm


class DeltaTrainer(DeltaTrainerMixin, Trainer):
    """``transformers.Trainer`` for a ``DeltaModel``, exported as ``deltatune.Trainer``: a drop-in replacement
    that treats the model as the Trainer treats a peft model (see ``DeltaTrainerMixin``), and whose gradient
    accumulation trains as one batch also where the model's own loss ignores the Trainer's item count.

    The Trainer passes that count (``num_items_in_batch``) to any model whose forward takes ``**kwargs`` and then
    leaves the loss unscaled, but many heads (sequence and token classifiers, T5, BART) take the kwargs and still
    return a mean per micro-batch: 2 micro-batches x 2 trained twice the loss and gradient of batches of 4
    (transformers #47688). At the first accumulated step this trainer asks the model, without gradients and in
    eval mode: a loss that moves with the count is kept; one equal to the cross-entropy of its logits over its
    labels becomes ``deltatune.loss.token_loss`` over the whole step's labelled tokens (or rows); any other is
    divided by the accumulation steps, as the Trainer does for models without loss kwargs.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.compute_loss_func is None and self.model_accepts_loss_kwargs and not self._item_count_checked:
            self._check_item_count(inputs, num_items_in_batch)
        if self.compute_loss_func is not None:
            # The Trainer takes the labels out before the forward pass: an encoder-decoder gets its decoder inputs now
            base = self._delta_model().get_base_model()
            encoder_decoder = getattr(base.config, "is_encoder_decoder", False)
            # (a classifier builds its own decoder inputs)
            seq2seq_lm = encoder_decoder and hasattr(base, "prepare_decoder_input_ids_from_labels")
            if seq2seq_lm and "labels" in inputs and inputs.get("decoder_input_ids") is None:
                decoder_input_ids = base.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
                inputs = {**inputs, "decoder_input_ids": decoder_input_ids}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    _item_count_checked = False

    def _check_item_count(self, inputs, num_items_in_batch) -> None:
        """Decide, once, how this model's loss takes the step's item count (see the class docstring); every
        process decides alike (each asks with its own micro-batch, the answers are gathered)."""
        accumulating = self.args.gradient_accumulation_steps > 1 or self.accelerator.num_processes > 1
        labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
        if num_items_in_batch is None or not accumulating or not isinstance(labels, torch.Tensor):
            return
        if self.label_smoother is not None:
            self._item_count_checked = True
            return  # the Trainer's label smoother takes the count itself
        answer = torch.tensor(self._ask_item_count(inputs, labels), device=self.args.device)
        if self.accelerator.num_processes > 1:
            answer = self.accelerator.gather(answer.view(1))
            answer = answer.min() if bool((answer == _ASK_AGAIN).any()) else answer.max()
        answer = int(answer)
        self._item_count_checked = answer != _ASK_AGAIN
        if answer == _TOKEN_LOSS:
            self.compute_loss_func = token_loss
        elif answer == _MEAN_PER_MICRO_BATCH:
            self.model_accepts_loss_kwargs = False  # the Trainer divides each micro-batch's mean by the steps

    def _ask_item_count(self, inputs, labels) -> int:
        if not bool((labels != -100).any()):
            return _ASK_AGAIN  # no labelled item in this micro-batch: nothing to tell the losses apart by
        model = self._delta_model()  # not DDP's wrapper: a forward of it may sync buffers across the processes
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                try:
                    two = model(**inputs, num_items_in_batch=2)["loss"]  # dropped before the next: one set of logits
                    one = model(**inputs, num_items_in_batch=1)
                except TypeError:  # a forward that refuses the count: the Trainer must not pass it
                    return _MEAN_PER_MICRO_BATCH
                except (RuntimeError, ValueError, KeyError, IndexError):
                    return _TRAINERS_OWN  # a forward that runs only wrapped (FSDP's sharded weights)
                if not isinstance(two, torch.Tensor) or not isinstance(one.get("loss"), torch.Tensor):
                    return _TRAINERS_OWN  # no loss from the labels: the Trainer reports that itself
                if not torch.isfinite(one["loss"]):
                    return _ASK_AGAIN
                if not torch.isclose(one["loss"], two, rtol=1e-4):
                    return _TRAINERS_OWN  # the model divides by the count: the Trainer's own path is right
                try:
                    same = bool(torch.isclose(token_loss(one, labels), one["loss"], rtol=1e-5, atol=1e-6))
                except (RuntimeError, ValueError, KeyError, IndexError, TypeError):
                    same = False  # logits that do not line up with the labels (BCE, regression)
                return _TOKEN_LOSS if same else _MEAN_PER_MICRO_BATCH
        finally:
            model.train(was_training)


# DeltaTrainer's answers on how a model's loss takes the item count, ordered so that processes that answer
# differently settle on the safest: the lowest asks again, then the highest of the rest.
_ASK_AGAIN, _TRAINERS_OWN, _TOKEN_LOSS, _MEAN_PER_MICRO_BATCH = 0, 1, 2, 3


class TokenLossTrainer(DeltaTrainer):
    """DeltaTrainer whose loss is ``deltatune.loss.token_loss`` from the start, for the stages whose models'
    logits line up with their labels and whose own loss is a mean per micro-batch (classifiers, token classifiers,
    encoder-decoders): no check at the first step. ``loss`` replaces it for a model whose labels read otherwise
    (``shifted_token_loss`` for BLIP's text decoder)."""

    def __init__(self, *args, loss=token_loss, **kwargs) -> None:
        super().__init__(*args, compute_loss_func=loss, **kwargs)


def _is_causal_lm(model) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _scores_first_label(model) -> bool:
    """Whether a causal LM's loss also scores each row's first label: a prompt or P-tuning adapter puts its virtual
    tokens before the row (their labels -100), and the last of them predicts the first. The Trainer counts the items
    over ``labels[..., 1:]``, so the training and eval loss of a row of 6 labels were a sum over 6 divided by 5
    (eval loss 5.91 against the model's own 4.92). Told from the model's loss on a probe row of 4 tokens: its sum
    (``num_items_in_batch=1``) over its mean counts the targets."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    ids = torch.tensor([[1, 2, 3, 4]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            mean = model(input_ids=ids, labels=ids)["loss"]
            total = model(input_ids=ids, labels=ids, num_items_in_batch=1)["loss"]
    except Exception:  # a model this probe cannot run (sharded weights, other inputs): the Trainer's count
        return False
    finally:
        model.train(was_training)
    if not all(isinstance(x, torch.Tensor) and x.numel() == 1 for x in (mean, total)):
        return False
    if not bool(torch.isfinite(total) and mean > 0):
        return False
    return round(float(total / mean)) == 4


def trl_trainer(cls: type) -> type:
    """A TRL trainer class (``SFTTrainer``, ``DPOTrainer``, ...) taught to train a ``DeltaModel`` as it trains a
    peft model: adapter-only checkpoints (``DeltaTrainerMixin``), and TRL's fused LM head installed on the base
    model, where the backbone it reads is, instead of on the DeltaModel wrapper. Exported as
    ``deltatune.trl_trainer``::

        trainer = dt.trl_trainer(SFTTrainer)(model=delta_model, args=SFTConfig("out"), train_dataset=ds)

    TRL recognises only peft's class as an adapter model: without a ``ref_model``, ``DPOTrainer``, ``KTOTrainer`` and
    ``GRPOTrainer`` would load the reference from the base model's path (an adapter trained before, a merge, a
    quantised base or added tokens all lost). The reference is a frozen copy of the DeltaModel as given, as peft's is
    its starting adapter (a second copy of the model in memory: pass ``ref_model``, or ``precompute_ref_log_probs``).
    A LoRA on ``lm_head`` is refused, as TRL refuses peft's: its fused head reads ``lm_head.weight`` directly (token
    rows trained on ``lm_head``, tied or not, are in that weight: they pass, see ``_fused_head``).
    """
    import copy
    import sys

    from ..layer import DeltaLayer, ModulesToSave
    from ..model import DeltaModel

    module = sys.modules[cls.__module__]

    def __init__(self, *args, **kwargs) -> None:
        policy = kwargs.get("model", args[0] if args else None)
        head = policy.get_output_embeddings() if isinstance(policy, DeltaModel) else None
        if isinstance(head, DeltaLayer) and not isinstance(head, ModulesToSave):
            _fused_head(head)
        patched = {}
        if getattr(module, "add_fused_lm_head", None) is not None:  # TRL patches the model it is given: the base
            fused = patched["add_fused_lm_head"] = module.add_fused_lm_head
            module.add_fused_lm_head = lambda model, *a, **kw: fused(_unwrap(model), *a, **kw)
        if isinstance(policy, DeltaModel) and getattr(module, "create_model_from_path", None) is not None:
            patched["create_model_from_path"] = module.create_model_from_path  # (the policy is given: the reference)
            module.create_model_from_path = lambda *a, **kw: copy.deepcopy(policy).eval().requires_grad_(False)
        try:
            super(trainer, self).__init__(*args, **kwargs)
        finally:
            for name, value in patched.items():
                setattr(module, name, value)

    trainer = type(f"Delta{cls.__name__}", (DeltaTrainerMixin, cls), {"__init__": __init__, "__doc__": cls.__doc__})
    return trainer


def _fused_head(head) -> None:
    """TRL's fused head never calls lm_head: it reads ``lm_head.weight`` and ``lm_head.bias``. A delta layer there
    trains only where its ``weight`` is what it computes with: trainable token rows (LoRA's trainable_token_indices,
    on a tied or an untied head) are written into it differentiably, so they train as under the unfused loss. Any
    other (a LoRA on lm_head shows the base weight) would never train: refused in one line."""
    weight = getattr(head, "weight", None)
    base = getattr(head, "base_layer", None)
    if weight is None or base is None or weight is getattr(base, "weight", None):
        raise ValueError(f"an adapter on lm_head ({type(head).__name__}) is not supported under TRL: its fused "
                         "head reads lm_head.weight directly, so the adapter would never train; leave lm_head out "
                         "of target_modules")  # fmt: skip
    if not hasattr(head, "bias"):  # the base layer's, which the fused head reads too (an attribute, not a parameter)
        object.__setattr__(head, "bias", getattr(base, "bias", None))


def _unwrap(model):
    from ..model import DeltaModel

    return model.get_base_model() if isinstance(model, DeltaModel) else model


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
