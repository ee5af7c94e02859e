"""Stage ``t2i``: text-to-image. A diffusers denoiser (``UNet2DConditionModel``) is adapted, with any layer method,
to draw what captions say; the text encoder (and a VAE, when the base has one) stay frozen.

The base (``model.name_or_path``) is a diffusers pipeline folder (``model_index.json`` with ``unet/``,
``scheduler/``, optional ``vae/``, ``text_encoder/`` and ``tokenizer/``) or a bare UNet folder (``config.json`` +
weights, an optional ``scheduler_config.json``; what ``deltatune merge`` writes for a t2i run). The text encoder is
``model.text_encoder`` (a transformers folder, a hub id, or ``minilm``), else the pipeline's own. Captions are
encoded once (their last hidden states are the cross-attention context); images are resized to the UNet's
``sample_size`` (times the VAE's factor), converted to its channels (counted in the report) and scaled to [-1, 1].

Loss (DDPM; Ho et al. 2020): for an image x0 (its VAE latent when there is a VAE), noise e ~ N(0, I) and a step t
uniform in [0, T), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e, and

    loss = mean (unet(x_t, t, text) - target)^2,   target = e (epsilon) or sqrt(abar_t) e - sqrt(1 - abar_t) x0 (v)

as the scheduler's ``prediction_type`` says. Sampling (``deltatune generate --adapter RUN --prompt ... --out
img.png``) runs DDIM over ``--steps`` steps with classifier-free guidance ``--guidance`` (the empty caption as the
unconditional one); ``--compare`` puts the base's image beside the adapter's, from the same noise.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch
from transformers.integrations import TensorBoardCallback

from ..config import ConfigError
from ..data.images import check, open_rgb, read_image_rows
from ..data.load import DataError
from .config import RunConfig
from .prepared import Prepared
from .trainer import DeltaTrainer

T2I_FILE = "t2i.json"
"""What a t2i run (and a merged t2i base) records beside the UNet: the text encoder it was trained with."""


def _pipeline(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def load_denoiser(path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The UNet of a pipeline folder (``unet/``) or of a bare UNet folder."""
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(
            path, subfolder="unet" if _pipeline(path) else None, torch_dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {path!r} is not a diffusers UNet folder ({str(exc).splitlines()[0]})") from None


class T2IProcessor:
    """What turns captions and images into the denoiser's inputs: the frozen text encoder and its tokenizer, the
    noise scheduler, the frozen VAE (or None), and the image size and channels the UNet (or VAE) reads."""

    def __init__(self, path: str, text_encoder: str | None = None, trust_remote_code: bool = False) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoModel, AutoTokenizer

        from .embedded import resolve as resolve_path

        pipeline = _pipeline(path)
        recorded = _recorded_encoder(path)
        name = text_encoder or recorded or (os.path.join(path, "text_encoder") if pipeline else None)
        if name is None:
            raise ConfigError(
                f"model.text_encoder is not set and {path!r} has no text_encoder/: name the text encoder the "
                "captions go through (a folder, a hub id, or minilm)"
            )
        self.text_encoder_name = name
        folder = resolve_path(name)
        tok_folder = os.path.join(path, "tokenizer") if pipeline and not text_encoder and not recorded else folder
        self.tokenizer = AutoTokenizer.from_pretrained(tok_folder, trust_remote_code=trust_remote_code)
        self.text_encoder = AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
        self.text_encoder.requires_grad_(False)
        sub = {"subfolder": "scheduler"} if pipeline else {}
        has_scheduler = os.path.isfile(os.path.join(path, "scheduler", "scheduler_config.json")) or os.path.isfile(
            os.path.join(path, "scheduler_config.json")
        )
        self.scheduler = DDPMScheduler.from_pretrained(path, **sub) if has_scheduler else DDPMScheduler()
        self.vae = None
        if pipeline and os.path.isdir(os.path.join(path, "vae")):
            self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval().requires_grad_(False)
        unet_config = UNet2DConditionModel.load_config(path, subfolder="unet" if pipeline else None)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.size = int(unet_config["sample_size"]) * factor
        self.channels = self.vae.config.in_channels if self.vae is not None else int(unet_config["in_channels"])
        self.pad_token_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def encode_text(self, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(hidden states (N, L, d), attention mask (N, L), captions truncated) for the captions."""
        full = self.tokenizer(captions, padding=True, return_tensors="pt")
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        cut = int((full["attention_mask"].sum(-1) > max_length).sum())
        device = next(self.text_encoder.parameters()).device
        out = self.text_encoder(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        return out.last_hidden_state.float().cpu(), enc["attention_mask"], cut

    def pixels(self, image) -> torch.Tensor:
        """A PIL image as (C, H, W) in [-1, 1] at the model's size and channels."""
        import numpy as np
        from PIL import Image

        img = image.convert("L" if self.channels == 1 else "RGB").resize((self.size, self.size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array[None] if self.channels == 1 else array.transpose(2, 0, 1).copy())

    def save_pretrained(self, out: str) -> None:
        """The tokenizer, the scheduler's config and ``t2i.json`` (the text encoder), so the run (or a merged base
        written from it) names everything it needs."""
        self.tokenizer.save_pretrained(out)
        self.scheduler.save_config(out)
        with open(os.path.join(out, T2I_FILE), "w", encoding="utf-8") as fh:
            json.dump({"text_encoder": self.text_encoder_name}, fh)


def _recorded_encoder(path: str) -> str | None:
    try:
        with open(os.path.join(path, T2I_FILE), encoding="utf-8") as fh:
            return json.load(fh).get("text_encoder")
    except (OSError, ValueError, AttributeError):
        return None


class T2IDataset(torch.utils.data.Dataset):
    """``{"pixel_values": (C, H, W), "encoder_hidden_states": (L, d), "encoder_attention_mask": (L,)}``."""

    def __init__(self, pixels: list[torch.Tensor], states: torch.Tensor, mask: torch.Tensor) -> None:
        self.pixels, self.states, self.mask = pixels, states, mask

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.pixels[i],
            "encoder_hidden_states": self.states[i],
            "encoder_attention_mask": self.mask[i],
        }


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


class _TensorBoard(TensorBoardCallback):
    """TensorBoard logging without the model-config text (a diffusers config is not a transformers one)."""

    def on_train_begin(self, args, state, control, **kwargs):
        return super().on_train_begin(args, state, control, **{**kwargs, "model": None})


class T2ITrainer(DeltaTrainer):
    """DeltaTrainer with the denoising loss (module docstring); the VAE and the scheduler come with the stage."""

    def __init__(self, *args: Any, scheduler: Any = None, vae: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_scheduler, self.vae = scheduler, vae
        for callback in list(self.callback_handler.callbacks):
            if type(callback) is TensorBoardCallback:  # it writes model.config as a transformers config
                self.callback_handler.remove_callback(callback)
                self.callback_handler.add_callback(_TensorBoard(callback.tb_writer))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = denoising_loss(model, self.noise_scheduler, inputs, self.vae)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval: the same loss (fresh noise and steps), no predictions (there are no labels to gather)."""
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None


def denoising_loss(model, scheduler, inputs: dict[str, torch.Tensor], vae=None, generator=None) -> torch.Tensor:
    """The loss of one batch: noise at uniform random steps, predicted by ``model`` (module docstring)."""
    x0 = inputs["pixel_values"]
    if vae is not None:
        with torch.no_grad():
            x0 = vae.encode(x0.to(vae.dtype)).latent_dist.sample(generator) * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (x0.shape[0],), generator=generator, device=x0.device)
    noisy = scheduler.add_noise(x0, noise, t)
    mask = inputs.get("encoder_attention_mask")
    pred = model(noisy, t, encoder_hidden_states=inputs["encoder_hidden_states"], encoder_attention_mask=mask).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        raise ConfigError(f"stage t2i: scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction)")
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def prepare_t2i(cfg: RunConfig, processor: T2IProcessor) -> Prepared:
    """Read images and captions, encode the captions once, give the Trainer the denoising loss.

    Raises:
        DataError: a row without an image or a caption (file:line), an unreadable image, a caption over
            data.max_length under data.truncation=refuse.
    """
    d = cfg.data
    if not d.train:
        raise DataError("data.train is not set: give a data file with an image column and a caption column")

    def read(spec: str, split: str, notes: list[str]) -> T2IDataset:
        rows = read_image_rows(spec, d.image_column, None, d.limit, d.allow_outside, text_column=d.text_column)
        for mode, count in sorted(check(rows).items()):
            want = "L" if processor.channels == 1 else "RGB"
            if mode != want:
                notes.append(f"{count} {split} images were stored in mode {mode!r} and were converted to {want}")
        pixels, sizes = [], 0
        for r in rows:
            img, _ = open_rgb(r)
            sizes += img.size != (processor.size, processor.size)
            pixels.append(processor.pixels(img))
        if sizes:
            notes.append(f"{sizes} {split} images were resized to {processor.size}x{processor.size}")
        states, mask, cut = processor.encode_text([r.text for r in rows], d.max_length)
        if cut and d.truncation == "refuse":
            raise DataError(f"{spec}: {cut} captions are longer than data.max_length={d.max_length} tokens")
        if cut:
            notes.append(f"{cut} {split} captions were longer than data.max_length={d.max_length} and were cut")
        return T2IDataset(pixels, states, mask)

    notes: list[str] = []
    train = read(d.train, "train", notes)
    ev = read(d.eval, "eval", notes) if d.eval else None
    notes.insert(0, f"{len(train)} training images with captions; text encoder {processor.text_encoder_name}")
    trainer = functools.partial(T2ITrainer, scheduler=processor.scheduler, vae=processor.vae)
    return Prepared(train, ev, collate, None, None, notes=notes, loss_only=True, trainer_class=trainer)


# -- sampling ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(
    model,
    processor: T2IProcessor,
    prompts: list[str],
    steps: int = 50,
    guidance: float = 1.0,
    seed: int | None = 0,
    max_length: int = 77,
) -> torch.Tensor:
    """Images for ``prompts`` as (N, C, H, W) in [0, 1]: DDIM over ``steps`` steps from seeded noise, with
    classifier-free guidance (``guidance`` 1: none; the empty caption is the unconditional one)."""
    from diffusers import DDIMScheduler

    if steps < 1 or guidance < 0:
        raise ConfigError(f"--steps must be >= 1 and --guidance >= 0, got {steps} and {guidance}")
    device = next(model.parameters()).device
    scheduler = DDIMScheduler.from_config(processor.scheduler.config)
    scheduler.set_timesteps(steps)
    cond, cond_mask, _ = processor.encode_text(list(prompts), max_length)
    uncond, uncond_mask, _ = processor.encode_text([""] * len(prompts), max_length)
    vae_factor = 2 ** (len(processor.vae.config.block_out_channels) - 1) if processor.vae is not None else 1
    unet = model.get_base_model() if hasattr(model, "get_base_model") else model
    shape = (len(prompts), unet.config.in_channels, processor.size // vae_factor, processor.size // vae_factor)
    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    x = torch.randn(shape, generator=generator).to(device)
    for t in scheduler.timesteps:
        ts = torch.full((len(prompts),), int(t), device=device)
        eps = model(x, ts, encoder_hidden_states=cond.to(device), encoder_attention_mask=cond_mask.to(device)).sample
        if guidance != 1.0:
            free = model(x, ts, encoder_hidden_states=uncond.to(device), encoder_attention_mask=uncond_mask.to(device))
            eps = free.sample + guidance * (eps - free.sample)
        x = scheduler.step(eps, t, x).prev_sample
    if processor.vae is not None:
        x = processor.vae.decode(x / processor.vae.config.scaling_factor).sample
    return ((x.float().cpu() + 1) / 2).clamp(0, 1)


def save_png(images: torch.Tensor, path: str) -> str:
    """(N, C, H, W) images in [0, 1] side by side in one PNG (grayscale for one channel)."""
    from PIL import Image

    row = torch.cat(list(images), dim=-1)  # (C, H, N * W)
    array = (row * 255).round().to(torch.uint8)
    img = (
        Image.fromarray(array[0].numpy(), "L")
        if array.shape[0] == 1
        else Image.fromarray(array.permute(1, 2, 0).numpy())
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
