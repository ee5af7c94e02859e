"""Stage ``t2i``'s exponential moving average of the trained weights (``train.use_ema``), as diffusers'
``train_text_to_image.py --use_ema`` with its ``EMAModel``'s defaults.

A shadow copy s of the denoiser's trainable parameters p (the adapter's; the whole UNet under ``method: full``) is
taken when training starts; after each optimizer step k (1, 2, ...) it moves towards them: s <- s - (1 - d_k)(s - p),
d_k = min((1 + j) / (10 + j), ``train.ema_decay``) with j = k - 1, and d_1 = 0 (EMAModel's ``get_decay`` without
warm-up: the first step copies p). When training ends s is copied into p, so the run's saved weights are the
average, as the script saves its pipeline after ``ema_unet.copy_to``. Each checkpoint holds s and k
(``ema.safetensors``) beside the training weights, and a resume reads them back, as the script's ``unet_ema``
folder. The validation images (``t2i_validation``) are drawn with s, the training weights put back after, as the
script's ``store`` / ``copy_to`` / ``restore``. The text encoder's LoRA (``model.train_text_encoder``) is not
averaged, as diffusers averages the UNet only.

EMAModel's other settings are ``train`` keys too (``ema_options``): ``use_ema_warmup`` (d_k = 1 - (1 + j /
``ema_inv_gamma``)^-``ema_power`` in place of (1 + j) / (10 + j); EMAModel's inv_gamma 1, power 2/3;
``train_unconditional.py``'s ``--ema_inv_gamma`` / ``--ema_power``), ``ema_min_decay`` (d_k at least this once j > 0,
after step ``ema_update_after_step`` + 1: EMAModel's d_k is 0 before its floor) and ``ema_update_after_step``
(j = k - 1 - this; d_k = 0, a copy of p, through step this + 1: the average starts from that step's weights).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from transformers import TrainerCallback

from ..config import ConfigError

EMA_FILE = "ema.safetensors"
"""The shadow weights in a checkpoint, with the optimization step in the file's metadata."""


def ema_decay(train) -> float | None:
    """The decay of a recipe's ``train.use_ema`` (``train.ema_decay``, 0.9999: EMAModel's default), None without.

    Raises:
        ConfigError: a train.ema_decay outside [0, 1).
    """
    if not train.use_ema:
        return None
    decay = train.ema_decay
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0 <= decay < 1) or math.isnan(decay):
        raise ConfigError(f"train.ema_decay must be a number in [0, 1), got {decay!r}")
    return float(decay)


WARMUP_KEYS = {"use_ema_warmup": False, "ema_inv_gamma": 1.0, "ema_power": 2 / 3, "ema_min_decay": 0.0,
               "ema_update_after_step": 0}  # fmt: skip
"""The ``train`` keys of EMAModel's other settings and their defaults (EMAModel's)."""


def ema_options(train) -> dict | None:
    """``EMA``'s keyword arguments from a recipe's ``train`` section (module docstring), None without
    ``train.use_ema``; a key the recipe does not have takes EMAModel's default.

    Raises:
        ConfigError: as ``ema_decay``; a train.use_ema_warmup that is not a bool, a train.ema_inv_gamma or
            train.ema_power <= 0, a train.ema_min_decay outside [0, train.ema_decay], a train.ema_update_after_step
            that is not an int >= 0.
    """
    decay = ema_decay(train)
    if decay is None:
        return None
    v = {key: getattr(train, key, default) for key, default in WARMUP_KEYS.items()}
    if not isinstance(v["use_ema_warmup"], bool):
        raise ConfigError(f"train.use_ema_warmup must be true or false, got {v['use_ema_warmup']!r}")
    for key in ("ema_inv_gamma", "ema_power", "ema_min_decay"):
        x = v[key]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ConfigError(f"train.{key} must be a finite number, got {x!r}")
    for key in ("ema_inv_gamma", "ema_power"):
        if v[key] <= 0:
            raise ConfigError(f"train.{key} must be > 0, got {v[key]!r}")
    if not 0 <= v["ema_min_decay"] <= decay:
        raise ConfigError(
            f"train.ema_min_decay must be in [0, train.ema_decay ({decay:g})], got {v['ema_min_decay']!r}"
        )
    after = v["ema_update_after_step"]
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ConfigError(f"train.ema_update_after_step must be an int >= 0, got {after!r}")
    return {"decay": decay, "use_warmup": v["use_ema_warmup"], "inv_gamma": float(v["ema_inv_gamma"]),
            "power": float(v["ema_power"]), "min_decay": float(v["ema_min_decay"]), "update_after_step": after}  # fmt: skip


def describe_ema(options: dict) -> str:
    """The report's note on the average."""
    o = options
    warm = f", warm-up (inv_gamma {o['inv_gamma']:g}, power {o['power']:g})" if o["use_warmup"] else ""
    low = f", at least {o['min_decay']:g}" if o["min_decay"] else ""
    after = f", from step {o['update_after_step'] + 1}'s weights" if o["update_after_step"] else ""
    return f"weights averaged (EMA, decay up to {o['decay']:g}{warm}{low}{after}); the run saves the average"


class EMA(TrainerCallback):
    """The moving average of a model's trainable parameters (module docstring); ``step`` counts optimizer steps."""

    def __init__(
        self, decay: float = 0.9999, *, use_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3,
        min_decay: float = 0.0, update_after_step: int = 0,
    ) -> None:  # fmt: skip
        self.decay, self.step = decay, 0
        self.use_warmup, self.inv_gamma, self.power = use_warmup, inv_gamma, power
        self.min_decay, self.update_after_step = min_decay, update_after_step
        self.shadow: dict[str, torch.Tensor] | None = None
        self.finished = False

    @staticmethod
    def _trained(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        """d_k of the step just taken (EMAModel.get_decay)."""
        j = self.step - self.update_after_step - 1
        if j <= 0:
            return 0.0
        d = 1 - (1 + j / self.inv_gamma) ** -self.power if self.use_warmup else (1 + j) / (10 + j)
        return max(min(d, self.decay), self.min_decay)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trained = self._trained(model)
        if self.shadow is None:  # (a resume read it from its checkpoint)
            self.shadow = {n: p.detach().clone() for n, p in trained.items()}
        elif set(self.shadow) != set(trained):
            raise ConfigError(
                f"train.use_ema: the checkpoint's {EMA_FILE} averages {len(self.shadow)} tensors, the model trains "
                f"{len(trained)} (another method or targets?)"
            )
        else:
            self.shadow = {n: s.to(trained[n].device) for n, s in self.shadow.items()}

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step += 1
        one_minus = 1 - self.current_decay()
        for n, p in self._trained(model).items():
            s = self.shadow[n]
            s.sub_(one_minus * (s - p.to(s.dtype)))

    @torch.no_grad()
    def on_train_end(self, args, state, control, model=None, **kwargs):
        for n, p in self._trained(model).items():
            p.copy_(self.shadow[n].to(p.dtype))
        self.finished = True

    @contextlib.contextmanager
    def averaged(self, model: torch.nn.Module) -> Iterator[None]:
        """The average in the model's trained weights for the block, the training weights put back after it (as the
        script's ``ema_unet.store``, ``copy_to``, then ``restore`` around its validation)."""
        trained = self._trained(model)
        if self.shadow is None or self.finished:  # (not started, or the weights are the average already)
            yield
            return
        stored = {n: p.detach().clone() for n, p in trained.items()}
        try:
            with torch.no_grad():
                for n, p in trained.items():
                    p.copy_(self.shadow[n].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, p in trained.items():
                    p.copy_(stored[n])

    def save(self, folder: str) -> None:
        """Write the shadow and the step into ``folder`` (a checkpoint being written); nothing once finished (the
        model's own weights are the average then)."""
        if self.shadow is None or self.finished:
            return
        from safetensors.torch import save_file

        from ..files import atomic_write

        tensors = {n: s.detach().cpu().contiguous() for n, s in self.shadow.items()}
        step = {"optimization_step": str(self.step)}  # (never half-written: a resume read a cut file as a traceback)
        atomic_write(os.path.join(folder, EMA_FILE), lambda tmp: save_file(tensors, tmp, step))

    def load(self, folder: str) -> bool:
        """Read a checkpoint's shadow and step (False when it has none: a run that did not average; the average
        then starts from the resumed weights)."""
        path = os.path.join(folder, EMA_FILE)
        if not os.path.isfile(path):
            return False
        from safetensors import safe_open

        with safe_open(path, "pt") as fh:
            self.shadow = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118  (safe_open has no iteration)
            self.step = int((fh.metadata() or {}).get("optimization_step", 0))
        return True
