"""Stage ``t2i``'s DreamBooth prior preservation (Ruiz et al. 2023), as diffusers' ``train_dreambooth_lora.py``:
each training image (an instance) is read with a class image and the class prompt, the batch is the B instances
then their B class images, and the loss adds ``train.prior_loss_weight`` times the class half's
(``t2i_noise``'s ``prior_split``).

Keys (diffusers' flags): ``train.with_prior_preservation``, ``train.prior_loss_weight`` (1.0), ``data.class_data_dir``
(a folder of class images: its image files, sorted by name), ``data.class_prompt``, ``data.num_class_images``
(100). When the folder holds fewer than ``data.num_class_images``, the missing ones are drawn first with the base
(``t2i.sample`` with the defaults of the pipeline the script calls as ``pipeline(prompt)``: StableDiffusionPipeline's
50 steps and guidance 7.5 for a UNet, StableDiffusion3Pipeline's 28 and 7.0 for a flow-matching transformer, as
``train_dreambooth_lora_sd3.py``; ``CLASS_DRAW``), in batches of 4, and saved there as
``<index>-<sha1 of the pixels>.jpg``, as the script does. Under torchrun / accelerate launch only the local main
process (LOCAL_RANK 0) draws them, a deliberate difference: the script shares the drawing among its processes
(its sample loader goes through ``accelerator.prepare``), so its images are not the ones one process would draw.
The others wait until the folder holds them, as long as a new one lands within ``WAIT_S`` (each file is written
under a hidden name, then renamed, so a waiting process never reads half an image). The dataset is as long as the
larger of the two; item i pairs instance i mod N and class image i mod M, as the script's ``DreamBoothDataset``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any

import torch

from ..config import ConfigError
from ..data.images import IMAGE_EXTENSIONS, ImageRow, open_rgb

SAMPLE_BATCH = 4
"""Class images drawn at once (the script's ``--sample_batch_size``)."""
CLASS_DRAW = {False: (50, 7.5), True: (28, 7.0)}
"""(steps, guidance) of the class images, by whether the base trains with flow matching: the defaults of
StableDiffusionPipeline and StableDiffusion3Pipeline, which the DreamBooth scripts call with the prompt alone."""
WAIT_S = 1800.0
"""How long a process that does not draw waits for the local main process's next class image (the Trainer's
``ddp_timeout``)."""


def draws_here() -> bool:
    """Whether this process draws the missing class images: the local main process (LOCAL_RANK 0, or one process)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


def wait_for_class_images(folder: str, count: int, timeout: float = WAIT_S, poll: float = 0.5) -> None:
    """Wait until ``folder`` holds ``count`` class images (drawn by the local main process); the wait restarts
    each time a new one lands, so a slow but steady drawing is waited for to its end.

    Raises:
        ConfigError: no new class image landed for ``timeout`` seconds before all were there.
    """
    have, end = len(class_images(folder)), time.monotonic() + timeout
    while have < count:
        if time.monotonic() > end:
            raise ConfigError(
                f"data.class_data_dir {folder!r}: waited {timeout:g} s for the local main process to draw "
                f"{count} class images, found {have}"
            )
        time.sleep(poll)
        now = len(class_images(folder))
        if now > have:
            have, end = now, time.monotonic() + timeout


def prior_options(cfg) -> dict[str, Any] | None:
    """The prior-preservation settings of a recipe (None without ``train.with_prior_preservation``).

    Raises:
        ConfigError: no data.class_data_dir (or one that is a file) or data.class_prompt, a data.num_class_images
            < 1, a train.prior_loss_weight that is negative or not finite.
    """
    if not cfg.train.with_prior_preservation:
        return None
    folder, prompt = cfg.data.class_data_dir, cfg.data.class_prompt
    count, weight = cfg.data.num_class_images, cfg.train.prior_loss_weight
    if not folder:
        raise ConfigError("train.with_prior_preservation needs data.class_data_dir: a folder of class images")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"data.class_data_dir {str(folder)!r} is a file: give a folder of class images")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("train.with_prior_preservation needs data.class_prompt: the prompt of the class images")
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"data.num_class_images must be an integer >= 1, got {count!r}")
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"train.prior_loss_weight must be a finite number >= 0, got {weight!r}")
    return {"folder": str(folder), "prompt": prompt, "count": count, "weight": float(weight)}


def class_images(folder: str) -> list[str]:
    """The image files directly in ``folder``, sorted by name (hidden files skipped)."""
    if not os.path.isdir(folder):
        return []
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    return [os.path.join(folder, f) for f in names]


def draw_class_images(draw, options: dict[str, Any], seed: int) -> int:
    """Fill ``options["folder"]`` up to ``options["count"]`` images of the class prompt that ``draw(prompts, seed)``
    gives as (N, C, H, W) in [0, 1] (the base's drawings); returns how many were drawn. Batch k is seeded
    ``seed + k``."""
    have = len(class_images(options["folder"]))
    missing = options["count"] - have
    if missing <= 0:
        return 0
    from PIL import Image

    writable_folder(options["folder"])
    for k, start in enumerate(range(0, missing, SAMPLE_BATCH)):
        images = draw([options["prompt"]] * min(SAMPLE_BATCH, missing - start), seed + k)
        for i, image in enumerate((images * 255).round().to(torch.uint8)):
            array = (image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)).numpy()
            img = Image.fromarray(array).convert("RGB")
            digest = hashlib.sha1(img.tobytes()).hexdigest()  # noqa: S324  (a file name, as the script's)
            name = f"{have + start + i}-{digest}.jpg"
            part = os.path.join(options["folder"], f".{name}.part")  # (hidden: class_images skips it)
            img.save(part, format="JPEG")
            os.replace(part, os.path.join(options["folder"], name))
    return missing


def writable_folder(folder: str) -> None:
    """Make ``folder`` (data.class_data_dir) if it is missing, and check that drawings can be saved there.

    Raises:
        ConfigError: the folder cannot be made or written (the key and the OS's reason).
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.class_data_dir {folder!r}: cannot make the folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"data.class_data_dir {folder!r}: cannot write the missing class images there")


class PriorDataset(torch.utils.data.Dataset):
    """Item i: ``{"instance": instances[i mod N], "class": class row i mod M}``; the class row is the class image's
    pixels (``make`` applied at each read when given) and the class prompt's text row."""

    def __init__(self, instances, pixels: list, text: dict[str, torch.Tensor], make=None) -> None:
        self.instances, self.pixels, self.text, self.make = instances, pixels, text, make

    def __len__(self) -> int:
        return max(len(self.instances), len(self.pixels))

    def __getitem__(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        pixels = self.pixels[i % len(self.pixels)]
        row = {"pixel_values": self.make(pixels) if self.make else pixels, **{k: v[0] for k, v in self.text.items()}}
        return {"instance": self.instances[i % len(self.instances)], "class": row}


def prior_collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """The instances' rows, then their class rows, stacked, and ``prior_split`` (how many instances); a batch of
    plain rows (eval) is stacked as it is."""
    if "instance" not in batch[0]:
        return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
    rows = [b["instance"] for b in batch] + [b["class"] for b in batch]
    return {**{k: torch.stack([r[k] for r in rows]) for k in rows[0]}, "prior_split": torch.tensor(len(batch))}


def with_prior(
    train, processor, options: dict[str, Any], cfg, resize, make, notes: list[str], load, sample
) -> PriorDataset:
    """The training set ``train`` paired with the class images and the class prompt's text row (its tokens when the
    text encoder trains); ``resize`` turns a PIL image into what the dataset holds, ``make`` (or None) turns that
    into pixels at each read. Missing class images are drawn first by the base denoiser (``load(path)``) with
    ``sample`` (``t2i``'s, passed in: this room sits below the stage), by the local main process only (the script
    shares them among its processes: module docstring); the other processes wait for them
    (``wait_for_class_images``).

    Raises:
        ConfigError: no class image can be read or drawn, a class_data_dir that cannot be made or written, class
            images the local main process stopped drawing (no new one within ``WAIT_S``).
        DataError: a class image that cannot be read (before any is drawn).
    """
    from .embedded import resolve

    count, folder = options["count"], options["folder"]
    have = class_images(folder)[:count]  # read before any is drawn: a bad one is refused with the folder unchanged
    read = {f: resize(open_rgb(ImageRow(f, None, f), on_white=False)[0]) for f in have}
    drawn = 0
    if len(have) < count and not draws_here():
        wait_for_class_images(folder, count)  # (the local main process draws them all: module docstring)
    elif len(have) < count:
        writable_folder(folder)
        base = load(resolve(cfg.model.name_or_path)).eval()
        d = cfg.data.max_length

        def draw(prompts: list[str], seed: int) -> torch.Tensor:
            steps, guidance = CLASS_DRAW[bool(processor.flow)]
            steps = steps if processor.flow else min(steps, processor.scheduler.config.num_train_timesteps)
            return sample(base, processor, prompts, steps=steps, guidance=guidance, seed=seed, max_length=d)

        drawn = draw_class_images(draw, options, cfg.train.seed)
        del base
    files = class_images(folder)[:count]
    if not files:
        raise ConfigError(f"data.class_data_dir {folder!r} holds no class images")
    images = [read[f] if f in read else resize(open_rgb(ImageRow(f, None, f), on_white=False)[0]) for f in files]
    if processor.trains_text_encoder:
        ids, mask, _ = processor.tokenize([options["prompt"]], cfg.data.max_length)
        text = {"input_ids": ids, "attention_mask": mask}
    else:
        text = processor.condition([options["prompt"]], cfg.data.max_length)[0]
    fresh = f" ({drawn} drawn by the base now)" if drawn else ""
    notes.append(
        f"prior preservation: {len(files)} class images{fresh} with {options['prompt']!r}, prior loss weight "
        f"{options['weight']:g}; each batch holds its images' class images too"
    )
    return PriorDataset(train, images, text, make)
