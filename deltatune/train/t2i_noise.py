"""Stage ``t2i``'s losses: the noise, the steps or noise levels, the weighting, as diffusers' training scripts draw
and weigh them (``train_text_to_image_lora.py``, ``train_text_to_image.py``, ``train_dreambooth_lora_sd3.py`` and
their ``diffusers.training_utils``).

- DDPM (Ho et al. 2020): e ~ N(0, I), plus ``noise_offset`` times one N(0, 1) per image and channel (offset noise;
  diffusers' ``--noise_offset``), a step t uniform in [0, T), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e', where
  e' = e + ``input_perturbation`` times fresh N(0, I) (Ning et al. 2023; ``--input_perturbation``) and e' = e
  without it; loss = mean (model(x_t, t) - target)^2, target e (epsilon, e before the perturbation) or
  sqrt(abar_t) e - sqrt(1 - abar_t) x0 (v_prediction). Draw order: e, the offset, the perturbation, t.
  ``snr_gamma`` g weighs each image's mean by min(SNR_t, g) / SNR_t (epsilon) or / (SNR_t + 1) (v), SNR_t =
  abar_t / (1 - abar_t), at SNR_t 0 the limit, 1 (epsilon) or 0 (min-SNR, Hang et al. 2023). ``prediction_type``
  (diffusers' ``--prediction_type``) sets the scheduler's epsilon or v_prediction for training.
- Flow matching (rectified flow; Esser et al. 2024): e ~ N(0, I), then u by the ``sigma_sampling`` scheme
  (diffusers' ``--weighting_scheme``): ``uniform`` (diffusers' ``none``), ``sigma_sqrt`` and ``cosmap``: u ~ U(0, 1);
  ``logit_normal``: sigmoid(N(logit_mean, logit_std)); ``mode``: 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u);
  i = floor(u T), sigma = the scheduler's sigmas[i], x_t = (1 - sigma) x0 + sigma e. Each element's error is
  weighted by sigma^-2 (``sigma_sqrt``), 2 / (pi (1 - 2 sigma + 2 sigma^2)) (``cosmap``), else 1; the target is
  e - x0, or, with ``precondition_outputs`` (SD3's script's default; EDM's preconditioning), the prediction becomes
  x_t - sigma model(x_t) and the target x0.
- DreamBooth's prior preservation (Ruiz et al. 2023; ``train_dreambooth_lora.py``): a batch of B instance images
  then B class images (``inputs["prior_split"]`` = B) is noised as one; loss = the instance half's loss + w times
  the class half's plain mean squared error (w: ``prior_loss_weight``; the instance half keeps its weighting, the
  class half is unweighted, as ``train_dreambooth_lora_sdxl.py`` with ``--snr_gamma``; flow matching: each half
  its own sigma weights, as ``train_dreambooth_lora_sd3.py``).
"""

from __future__ import annotations

import json
import math
import os

import torch

from ..config import ConfigError

SIGMA_SAMPLING = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
"""``train.sigma_sampling``: diffusers' SD3 and Flux scripts' ``--weighting_scheme`` values ("none" = "uniform")."""


def predict(model, x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
    """The denoiser's output for ``x`` at steps ``t``: a UNet attends to the text states (and their mask); a
    transformer, given ``pooled_projections``, attends to them jointly and reads the pooled embedding. The inputs
    are cast to the denoiser's dtype first, as diffusers' training scripts do. A UNet that also predicts its variance
    (twice the input's channels, DeepFloyd IF's) gives the first half: the DreamBooth scripts train on it alone ("if
    model predicts variance, throw away the prediction"), and the IF pipeline drops the rest for a fixed-variance
    scheduler's step, as the DDIM sampling here is."""
    dtype = (model.get_base_model() if hasattr(model, "get_base_model") else model).dtype  # (model.dtype)
    x, states = x.to(dtype), text["encoder_hidden_states"].to(dtype)
    if "pooled_projections" in text:
        pooled = text["pooled_projections"].to(dtype)
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=states, pooled_projections=pooled).sample
    else:
        mask = text.get("encoder_attention_mask")
        out = model(x, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def shift_factor(model, vae) -> float:
    """The VAE's ``shift_factor`` as the denoiser's diffusers pipeline applies it: SD3's (and Flux's) subtract it
    before scaling; Stable Diffusion's pipeline and training scripts ignore it (latents times the scaling factor),
    so a UNet's latents are never shifted."""
    from diffusers import UNet2DConditionModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if vae is None or isinstance(base, UNet2DConditionModel):
        return 0.0
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def latents(pixels: torch.Tensor, vae, generator, shift: float = 0.0) -> torch.Tensor:
    """x0: the images, or their VAE latents (sampled, minus ``shift``, times the scaling factor)."""
    if vae is None:
        return pixels
    with torch.no_grad():
        out = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
    return (out - shift) * vae.config.scaling_factor


def draw_noise(x0: torch.Tensor, generator=None, noise_offset: float = 0.0) -> torch.Tensor:
    """e ~ N(0, I) shaped as ``x0``, plus ``noise_offset`` times one N(0, 1) per image and channel (diffusers'
    ``noise += noise_offset * torch.randn((B, C, 1, 1))``)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if noise_offset:
        shape = (*x0.shape[:2], *[1] * (x0.dim() - 2))
        noise = noise + noise_offset * torch.randn(shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return noise


def denoising_loss(
    model,
    scheduler,
    inputs: dict[str, torch.Tensor],
    vae=None,
    generator=None,
    snr_gamma: float = 0.0,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """The DDPM loss of one batch (module docstring), its draws from ``generator`` in diffusers' order."""
    x0 = latents(inputs["pixel_values"], vae, generator, shift_factor(model, vae))
    noise = draw_noise(x0, generator, noise_offset)
    noised = noise
    if input_perturbation:  # the input gets more noise than the target names (train_text_to_image.py)
        extra = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        noised = noise + input_perturbation * extra
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (x0.shape[0],), generator=generator, device=x0.device)
    pred = predict(model, scheduler.add_noise(x0, noised, t), t, inputs)
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ConfigError(
            f"stage t2i: scheduler prediction_type {kind!r} is not supported ({', '.join(PREDICTION_TYPES)})"
        )
    target = noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, t)
    error = (pred.float() - target.float()).pow(2)
    weights = min_snr_weights(scheduler, t, snr_gamma) if snr_gamma else None
    return _with_prior(error, weights, inputs, prior_loss_weight)


def _with_prior(error: torch.Tensor, weights, inputs: dict, prior_loss_weight: float) -> torch.Tensor:
    """The batch's loss from the squared errors (N, ...) and each image's weight (None: 1): the weighted mean, or
    with a prior half (``inputs["prior_split"]``) the instance half's plus ``prior_loss_weight`` times the class
    half's unweighted mean, each half's mean as diffusers' ``F.mse_loss`` (module docstring)."""

    def mean(e: torch.Tensor, w) -> torch.Tensor:
        return e.mean() if w is None else (e.flatten(1).mean(1) * w).mean()

    split = inputs.get("prior_split")
    if split is None:
        return mean(error, weights)
    n = int(split)
    instance = mean(error[:n], None if weights is None else weights[:n])
    return instance + prior_loss_weight * error[n:].mean()


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """The min-SNR weight of each step in ``t`` for the scheduler's prediction type (module docstring)."""
    abar = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = (abar**0.5 / (1 - abar) ** 0.5) ** 2  # diffusers' compute_snr, to the rounding
    if scheduler.config.prediction_type != "epsilon":  # v: 0 at a zero-terminal-SNR step, as diffusers' (its limit)
        return snr.clamp(max=gamma) / (snr + 1)
    return torch.where(snr == 0, 1.0, snr.clamp(max=gamma) / snr)  # 1 at SNR 0 (the limit; diffusers' is nan)


def sample_u(
    scheme: str, n: int, generator=None, device=None, logit_mean: float = 0.0, logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:  # fmt: skip
    """u in [0, 1] for ``n`` images, as diffusers' ``compute_density_for_timestep_sampling`` draws it."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (n,), generator=generator, device=device))
    u = torch.rand((n,), generator=generator, device=device)
    if scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sigma_weights(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """Each noise level's loss weight, as diffusers' ``compute_loss_weighting_for_sd3``."""
    if scheme == "sigma_sqrt":
        return (sigma**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


def flow_matching_loss(
    model,
    scheduler,
    inputs: dict[str, torch.Tensor],
    vae=None,
    generator=None,
    sigma_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    precondition_outputs: bool = False,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """The flow-matching loss of one batch (module docstring); the noise, then u, drawn from ``generator``."""
    x0 = latents(inputs["pixel_values"], vae, generator, shift_factor(model, vae))
    n, steps = x0.shape[0], scheduler.config.num_train_timesteps
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    u = sample_u(sigma_sampling, n, generator, x0.device, logit_mean, logit_std, mode_scale)
    index = (u * steps).long().clamp(0, steps - 1).cpu()  # (mode's u = 1 at u 0: diffusers' index T is off the end)
    t = scheduler.timesteps[index].to(x0.device)
    sigma = scheduler.sigmas[index].to(x0.device, x0.dtype).view(n, *[1] * (x0.dim() - 1))
    noisy = (1 - sigma) * x0 + sigma * noise
    pred = predict(model, noisy, t, inputs).float()
    if precondition_outputs:  # SD3's script's default: the prediction of x0, against x0
        pred, target = pred * -sigma.float() + noisy.float(), x0.float()
    else:
        target = (noise - x0).float()
    error = (sigma_weights(sigma_sampling, sigma).float() * (pred - target) ** 2).flatten(1).mean(1)
    return _with_prior(error, None, inputs, prior_loss_weight)  # (the sigma weights in both halves, as SD3's script)


DDPM_KEYS = {"snr_gamma": 0.0, "noise_offset": 0.0, "input_perturbation": 0.0}
FLOW_KEYS = {"sigma_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
             "precondition_outputs": False}  # fmt: skip
"""The ``train`` keys of each loss and their defaults (diffusers' scripts' but ``precondition_outputs``: SD3's is 1)."""


def loss_options(train, flow: bool) -> dict:
    """The keyword arguments of the base's loss (``flow_matching_loss`` or ``denoising_loss``) from a recipe's
    ``train`` section; a key set for the other loss is refused in one line, as is a value diffusers refuses.

    Raises:
        ConfigError: a key of the other loss set, an unknown train.sigma_sampling, a negative noise scale, a
            train.logit_std <= 0.
    """
    own, other = (FLOW_KEYS, DDPM_KEYS) if flow else (DDPM_KEYS, FLOW_KEYS)
    kind = "flow matching" if flow else "DDPM"
    for key, default in other.items():
        if getattr(train, key, default) != default:
            why = {"snr_gamma": "weighs the DDPM loss"}.get(
                key, "shapes the DDPM noise" if flow else "is for flow matching"
            )
            raise ConfigError(f"train.{key} {why}; this base trains with {kind}: drop it")
    out = {key: getattr(train, key, default) for key, default in own.items()}
    if flow and out["sigma_sampling"] not in SIGMA_SAMPLING:
        raise ConfigError(
            f"train.sigma_sampling must be one of {', '.join(SIGMA_SAMPLING)}, got {out['sigma_sampling']!r}"
        )
    if flow and out["logit_std"] <= 0:
        raise ConfigError(f"train.logit_std must be > 0, got {out['logit_std']}")
    for key in ("noise_offset", "input_perturbation", "snr_gamma"):
        if out.get(key, 0) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {out[key]}")
    if flow:
        out["precondition_outputs"] = bool(out["precondition_outputs"])
    return out


PREDICTION_TYPES = ("epsilon", "v_prediction")
"""``train.prediction_type``: what a DDPM denoiser learns to predict (diffusers' scripts' ``--prediction_type``)."""


def check_prediction_type(train, flow: bool, scheduler=None) -> str | None:
    """``train.prediction_type`` when it is valid for this base (None: not set), checked before anything is drawn;
    unset on a DDPM base, the base ``scheduler``'s own must be one the loss trains (as diffusers' scripts refuse it,
    but before the class images are drawn and the data read, not at the first step).

    Raises:
        ConfigError: a value other than epsilon or v_prediction, or any value on a flow-matching base; unset, a base
            scheduler that predicts another (``sample``) or none (``null``).
    """
    kind = train.prediction_type
    base = None if scheduler is None or flow else scheduler.config.get("prediction_type")
    if kind is None and scheduler is not None and not flow and base not in PREDICTION_TYPES:
        says = f"predicts {base!r}" if base is not None else "names no prediction_type (null)"
        raise ConfigError(
            f"stage t2i: the base's scheduler {says}; the DDPM loss trains {' or '.join(PREDICTION_TYPES)}: "
            "set train.prediction_type"
        )
    if kind is None:
        return None
    if flow:
        raise ConfigError(
            f"train.prediction_type ({kind!r}) sets a DDPM scheduler's target; this base trains with flow matching "
            "(its target is e - x0): drop it"
        )
    if kind not in PREDICTION_TYPES:
        raise ConfigError(f"train.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {kind!r}")
    return kind


def run_prediction_type(folder: str) -> str | None:
    """The ``prediction_type`` the run in ``folder`` trained with: its ``scheduler_config.json``, else its
    ``run.yaml``'s ``train.prediction_type``; a checkpoint folder (which holds neither) reads its run folder's."""
    import yaml

    places = [folder]
    if os.path.basename(os.path.normpath(folder)).startswith("checkpoint-"):
        places.append(os.path.dirname(os.path.abspath(folder)))
    for place in places:
        for name in ("scheduler_config.json", "run.yaml"):
            try:
                with open(os.path.join(place, name), encoding="utf-8") as fh:
                    read = json.load(fh) if name.endswith(".json") else (yaml.safe_load(fh) or {}).get("train")
                return read.get("prediction_type")
            except (OSError, ValueError, AttributeError, yaml.YAMLError):
                continue
    return None


def describe(options: dict, flow: bool, prediction_type: str | None) -> str:
    """The report's line on the loss."""
    if flow:
        o = options
        extra = {"logit_normal": f" (mean {o['logit_mean']:g}, std {o['logit_std']:g})",
                 "mode": f" (scale {o['mode_scale']:g})"}.get(o["sigma_sampling"], "")  # fmt: skip
        pre = ", preconditioned outputs (target x0)" if o["precondition_outputs"] else ""
        return f"loss: flow matching, {o['sigma_sampling']} sigmas{extra}{pre}"
    parts = [f"min-SNR weighted (gamma {options['snr_gamma']:g})" if options["snr_gamma"] else ""]
    parts += [f"{k.replace('_', ' ')} {options[k]:g}" for k in ("noise_offset", "input_perturbation") if options[k]]
    return ", ".join([f"loss: DDPM, {prediction_type}", *filter(None, parts)])
