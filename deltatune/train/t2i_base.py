"""Stage ``t2i``'s base model: which diffusers denoiser a folder holds (a pipeline's ``unet/`` or ``transformer/``, or a
bare denoiser folder), loading it, its noise scheduler, and the checks of the text encoder beside it (its context and
its width). Split from ``t2i.py`` in session 50, when that file was at its line limit; ``t2i.py`` re-exports the names
it read from here before (``t2i.load_denoiser``, ``t2i.DENOISERS``, ``t2i.T2I_FILE``)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..config import ConfigError

T2I_FILE = "t2i.json"
"""What a t2i run (and a merged t2i base) records beside the denoiser: the text encoder it was trained with."""
DENOISERS = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "transformer"}
"""The denoisers the stage trains: their folder in a pipeline, and their prefix in diffusers' LoRA files."""
_EXTRA_CONDITIONS = ("addition_embed_type", "class_embed_type", "num_class_embeds", "time_cond_proj_dim")


def _pipeline(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _denoiser_at(path: str) -> tuple[str, str | None, dict[str, Any]]:
    """(class name, subfolder, config) of the denoiser of a pipeline folder or a bare denoiser folder."""
    from diffusers import UNet2DConditionModel

    pipeline = _pipeline(path)
    sub = next((s for s in DENOISERS.values() if os.path.isdir(os.path.join(path, s))), None) if pipeline else None
    if pipeline and sub is None:
        raise ConfigError(f"model {path!r} is a pipeline folder without unet/ or transformer/")
    try:
        config = dict(UNet2DConditionModel.load_config(path, subfolder=sub))  # any diffusers model's config.json
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {path!r} is not a diffusers denoiser folder ({str(exc).splitlines()[0]})") from None
    name = config.get("_class_name")
    if name not in DENOISERS:
        raise ConfigError(f"model {path!r} holds a {name}; stage t2i trains {' or '.join(DENOISERS)}")
    extra = ", ".join(f"{k}={config[k]!r}" for k in _EXTRA_CONDITIONS if config.get(k) not in (None, "text"))
    if name == "UNet2DConditionModel" and extra:  # SDXL's text_time sizes, class labels, LCM's guidance: not given
        why = f"its UNet reads more than the text ({extra}, as SDXL's UNet does)"
        raise ConfigError(f"model {path!r}: {why}; stage t2i trains UNets conditioned on text alone (SD 1.x, 2.x)")
    return name, sub, config


def load_denoiser(path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The UNet or SD3 transformer of a pipeline folder (``unet/``, ``transformer/``) or of a bare denoiser folder."""
    import diffusers

    name, sub, _ = _denoiser_at(path)
    try:
        return getattr(diffusers, name).from_pretrained(path, subfolder=sub, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {path!r}: its {name} does not load ({str(exc).splitlines()[0]})") from None


def _scheduler(path: str, pipeline: bool, transformer: bool, before: bool = False):
    """The base's noise scheduler: flow matching when it names ``FlowMatchEulerDiscreteScheduler`` or predicts
    ``flow_prediction`` (a UniPC or DPMSolver flow config: diffusers' SD3 and Sana scripts train flow matching with
    ``FlowMatchEulerDiscreteScheduler.from_pretrained`` of it, which reads no ``flow_shift``), else DDPM with its
    config; without one, flow matching for a transformer and DDPM for a UNet. ``before``: None unless the config
    predicts ``flow_prediction`` in another class, then the DDPM scheduler read before session 60 (a run that named
    train.prediction_type on such a base trained DDPM with it, and keeps it: ``T2IProcessor.keep_ddpm``)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    folder = os.path.join(path, "scheduler") if pipeline else path
    if not os.path.isfile(os.path.join(folder, "scheduler_config.json")):
        return None if before else FlowMatchEulerDiscreteScheduler() if transformer else DDPMScheduler()
    config = DDPMScheduler.load_config(folder)
    named = config.get("_class_name") == FlowMatchEulerDiscreteScheduler.__name__
    predicts = config.get("prediction_type") == "flow_prediction" and not named
    if before:
        return DDPMScheduler.from_pretrained(folder) if predicts else None
    return (FlowMatchEulerDiscreteScheduler if named or predicts else DDPMScheduler).from_pretrained(folder)


def _context(tokenizer, config) -> int | None:
    """The longest input, in tokens, the text encoder reads: its position embeddings and its tokenizer's limit."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 100_000]  # a tokenizer without one says 1e30
    return min(limits, default=None)


def _check_width(config: dict[str, Any], encoder_config, path: str, name: str) -> None:
    """The denoiser reads text states as wide as the text encoder's, or the recipe is refused in one line."""
    hidden = getattr(encoder_config, "hidden_size", None) or getattr(encoder_config, "d_model", None)
    if "pooled_projection_dim" in config:
        wanted = {k: config.get(k) for k in ("joint_attention_dim", "pooled_projection_dim")}
    else:
        key = "encoder_hid_dim" if config.get("encoder_hid_dim") else "cross_attention_dim"
        wanted = {key: config.get(key)}
    for key, width in wanted.items():
        if isinstance(width, int) and isinstance(hidden, int) and width != hidden:
            raise ConfigError(
                f"model {path!r}: the denoiser's {key} is {width}, but the text encoder {name!r} gives {hidden}-wide "
                "states; choose a text encoder of that width (model.text_encoder)"
            )


def _check_channels(config: dict[str, Any], vae_config, path: str) -> None:
    """The denoiser reads the VAE's latents (without a VAE, the images, built with its ``in_channels``) and predicts
    as many channels, or twice as many with its variance (DeepFloyd IF's UNet; ``t2i_noise.predict`` reads the first
    half), or the recipe is refused in one line: an inpainting or depth UNet reads more than the latents.

    Raises:
        ConfigError: an ``in_channels`` other than the VAE's ``latent_channels``, or another ``out_channels``.
    """
    sub = DENOISERS.get(config.get("_class_name"), "denoiser")
    reads = config.get("in_channels")
    latent = getattr(vae_config, "latent_channels", None) if vae_config is not None else None
    if isinstance(latent, int) and reads != latent:
        raise ConfigError(
            f"model {path!r}: its {sub}'s in_channels is {reads}, but the VAE's latents have {latent} channels; stage "
            "t2i trains a denoiser that reads the latents alone (an inpainting or depth UNet reads more)"
        )
    out = config.get("out_channels") or reads
    if isinstance(reads, int) and out not in (reads, 2 * reads):
        raise ConfigError(
            f"model {path!r}: its {sub}'s out_channels is {out}; a denoiser predicts as many channels as it reads "
            f"({reads}), or twice as many with its variance"
        )


def _recorded(path: str) -> dict[str, Any]:
    """``t2i.json`` of a merged base: its text encoder, and whether it was conditioned as a pipeline (padded)."""
    try:
        with open(os.path.join(path, T2I_FILE), encoding="utf-8") as fh:
            return dict(json.load(fh))
    except (OSError, ValueError, TypeError):
        return {}
