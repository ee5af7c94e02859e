"""Stage ``t2i``'s validation images during training, as diffusers' ``train_text_to_image_lora.py``
``--validation_prompt`` / ``--num_validation_images`` (4) / ``--validation_epochs`` (v, 1): at the end of epochs
1, 1 + v, 1 + 2v, ... (the script's ``epoch % validation_epochs == 0`` with epochs counted from 0) the main process
draws ``num_validation_images`` images of the prompt with the model as it is then (30 steps, guidance 7.5, seeded by
``train.seed``, as the script's ``log_validation``), saved side by side as ``<run>/validation/epoch-<n>.png``; after the
last step, as the script's final validation, once more with the weights the run saves (``validation/final.png``). An
epoch that ``train.max_steps`` cuts short counts (the script validates after its loop breaks). Under
``train.use_ema`` the images are drawn with the moving average, then the training weights are put back, as
``train_text_to_image.py`` (``ema_unet.store`` / ``copy_to`` / ``restore``). Flow-matching runs draw the same way
(30 steps, guidance 7.5), not with the SD3 pipeline's defaults. The script draws with its pipeline's own scheduler and one generator
for the images in turn; here the run's sampler (``t2i.sample``: DDIM, or flow-matching Euler) draws them as one
batch from the seeded noise, so each image equals ``deltatune generate --steps 30 --guidance 7.5`` at that epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from ..config import ConfigError

STEPS, GUIDANCE = 30, 7.5
"""The script's log_validation: ``num_inference_steps=30`` and the pipeline's default guidance."""

FINAL = "final.png"
"""The drawing after the last step (``validation/final.png``): the scripts' final validation (logged as "test"), with
the weights the run saves. The Trainer loads the best checkpoint (``train.load_best_model_at_end``) before its
``on_train_end``, where ``t2i_ema.EMA`` (a callback before this one) then copies the last step's average over the
weights: under ``train.use_ema`` the average of the last step, the best checkpoint's or not; else the best checkpoint's
under ``train.load_best_model_at_end``; else the last step's. Drawn after the run's outputs are saved where run.py
asks (``T2ITrainer.draw_after_save``), else at the training's end; a failure in it (an out-of-memory) is one line, and
the run's outputs are saved all the same. When the last epoch was drawn at the same step with the same weights (no
best checkpoint loaded; the EMA average there is the one copied in), its image is copied: the drawing is seeded."""


def validation_options(train) -> dict[str, Any] | None:
    """A recipe's validation settings (None without ``train.validation_prompt``).

    Raises:
        ConfigError: a prompt that is not a non-empty string, a count or an epoch interval that is not an integer >= 1.
    """
    prompt = train.validation_prompt
    if prompt is None:
        return None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"train.validation_prompt must be a non-empty string, got {prompt!r}")
    count, every = train.num_validation_images, train.validation_epochs
    for key, value in (("num_validation_images", count), ("validation_epochs", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{key} must be an integer >= 1, got {value!r}")
    return {"prompt": prompt, "count": count, "every": every, "seed": train.seed}


def epoch_number(epoch: float | None) -> int:
    """The 1-based number of the epoch that ends at ``state.epoch`` (a cut-short last epoch included: 2.5 is 3)."""
    return max(1, math.ceil(round(epoch or 0, 6)))


class Validation(TrainerCallback):
    """Draws the validation images at the end of epochs 1, 1 + ``every``, ... (module docstring). ``draw(model,
    prompts, seed)`` gives (N, C, H, W) in [0, 1]; ``save(images, path)`` writes them; ``ema`` (``t2i_ema.EMA``, or
    None) lends its average for the drawing."""

    def __init__(self, options: dict[str, Any], draw: Callable, save: Callable, ema: Any = None) -> None:
        self.options, self.draw, self.save, self.ema = options, draw, save, ema
        self.written: list[str] = []
        self.after_save = False  # (set by T2ITrainer.draw_after_save: ``final`` is called after the outputs are saved)
        self.last: tuple[int, str] | None = None  # (the last epoch drawing's global step and file)
        self.pending: tuple | None = None  # (the final drawing's args, state, model, and whether the best was loaded)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = epoch_number(state.epoch)
        if not (epoch - 1) % self.options["every"]:
            path = self._validate(args, state, model, f"epoch-{epoch}.png")
            self.last = (getattr(state, "global_step", None), path) if path else None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        best = bool(args.load_best_model_at_end and state.best_model_checkpoint)  # (the Trainer loaded it just now)
        self.pending = (args, state, model, best)
        if not self.after_save:
            self.final()

    def final(self) -> None:
        """The final drawing (``FINAL``), once; an Exception in it is one line, the run's outputs saved all the same."""
        if self.pending is None:
            return
        (args, state, model, best), self.pending = self.pending, None
        try:
            same = self.last if self.last is not None and self.last[0] == state.global_step and not best else None
            if same is not None and os.path.isfile(same[1]):  # (the same weights, the same seeded noise: one image)
                path = os.path.join(args.output_dir, "validation", FINAL)
                from ..files import atomic_write  # (as t2i.save_png imports it)

                atomic_write(path, lambda tmp: shutil.copyfile(same[1], tmp))  # (whole or not at all, as save_png)
                self.written.append(path)
            else:
                self._validate(args, state, model, FINAL)  # (the script's final validation, with the weights it saves)
        except Exception as e:  # (an out-of-memory in the sampler: the trained run is not lost for a picture)
            from tqdm.auto import tqdm  # (its write: a line of its own below the training's progress bar)

            tqdm.write(f"deltatune: validation/{FINAL} not drawn: {type(e).__name__}: {' '.join(str(e).split())}",
                       file=sys.stderr)  # fmt: skip

    def _validate(self, args, state, model, name: str) -> str | None:
        if not state.is_world_process_zero:
            return None
        training = model.training
        model.eval()
        try:
            with self.ema.averaged(model) if self.ema is not None else contextlib.nullcontext():
                images = self.draw(model, [self.options["prompt"]] * self.options["count"], self.options["seed"])
        finally:
            model.train(training)
        self.written.append(self.save(images, os.path.join(args.output_dir, "validation", name)))
        return self.written[-1]
