"""Stage ``t2i``: text-to-image. A diffusers denoiser, a ``UNet2DConditionModel`` or an ``SD3Transformer2DModel``
(MM-DiT), is adapted with any layer method to draw what captions say. The text encoder and a VAE (when the base has
one) stay frozen; ``model.train_text_encoder`` gives the text encoder a LoRA of its own, trained with the denoiser's.

The base (``model.name_or_path``) is a diffusers pipeline folder (``model_index.json`` with ``unet/`` or
``transformer/``, ``scheduler/``, optional ``vae/``, ``text_encoder/`` and ``tokenizer/``) or a bare denoiser folder
(``config.json`` + weights, an optional ``scheduler_config.json``; what ``deltatune merge`` writes for a t2i run). The
text encoder is ``model.text_encoder`` (a transformers folder, a hub id, or ``minilm``), else the pipeline's own. Its
last hidden states are the context of the UNet's cross-attention or the transformer's joint attention; a transformer
also reads their mean over the caption's tokens as its pooled projection. Images are resized (short side to
the denoiser's ``sample_size`` times the VAE's factor), cropped square (centre, or at random) and optionally flipped,
in the order and with the interpolation of diffusers' scripts (``deltatune.data.images.t2i_resize``), converted to
its channels and scaled to [-1, 1]; x0 is the image, or its VAE latent (times ``scaling_factor``, after minus
``shift_factor`` for a transformer, as SD3's). The loss, by the base's scheduler (none: DDPM for a UNet, flow matching
for a transformer), is ``t2i_noise``'s.

Sampling (``sample``, ``deltatune generate``) runs DDIM or the flow-matching Euler steps from seeded noise with
classifier-free guidance (the empty caption as the unconditional one), as diffusers' pipelines do.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import random
import shutil
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from ..config import ConfigError
from ..data.images import INTERPOLATIONS, T2I_AUGMENTATIONS, check, open_rgb, read_image_rows, t2i_crop, t2i_resize
from ..data.load import DataError
from ..diffusion_initial import from_base, initial_tensors, run_note
from ..model import DeltaModel
from . import t2i_noise
from .config import RunConfig
from .prepared import Prepared
from .t2i_base import DENOISERS as DENOISERS  # (t2i.DENOISERS and t2i.load_denoiser, as before the split)
from .t2i_base import T2I_FILE, _check_channels, _check_width, _context, _denoiser_at, _pipeline, _recorded, _scheduler
from .t2i_base import load_denoiser as load_denoiser
from .t2i_ema import EMA, describe_ema, ema_options
from .t2i_noise import denoising_loss, describe, flow_matching_loss, loss_options, predict, shift_factor
from .t2i_noise import min_snr_weights as min_snr_weights  # (t2i.min_snr_weights, as before the split)
from .t2i_prior import prior_collate, prior_options, with_prior
from .t2i_reads import EpochOfReads, SeededReads, keeps_old_reads, mark_reads
from .t2i_validation import GUIDANCE, STEPS, Validation, validation_options
from .trainer import DeltaTrainer

TEXT_ENCODER_LORA = "text_encoder_lora"
"""The folder, in a run, its checkpoints and a base merged from it, holding the text encoder's LoRA (PEFT layout)."""


class T2IProcessor:
    """What turns captions and images into the denoiser's inputs: the text encoder (frozen, or with a LoRA of its
    own) and its tokenizer, the noise scheduler, the frozen VAE (or None), and the size and channels of the images
    the denoiser (or the VAE) reads."""

    def __init__(self, path: str, text_encoder: str | None = None, trust_remote_code: bool = False) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import AutoModel, AutoTokenizer

        from .embedded import resolve as resolve_path

        pipeline = _pipeline(path)
        self.denoiser_class, _, config = _denoiser_at(path)
        recorded = _recorded(path)
        own_encoder = os.path.join(path, "text_encoder") if pipeline else None
        name = text_encoder or recorded.get("text_encoder") or own_encoder
        if name is None:
            raise ConfigError(
                f"model.text_encoder is not set and {path!r} has no text_encoder/: name the text encoder the "
                "captions go through (a folder, a hub id, or minilm)"
            )
        self.text_encoder_name = name
        folder = resolve_path(name)
        own = os.path.join(path, "tokenizer") if pipeline else path  # a pipeline's, or the one a merged base keeps
        tok_folder = own if not text_encoder and os.path.isfile(os.path.join(own, "tokenizer_config.json")) else folder
        self.tokenizer = AutoTokenizer.from_pretrained(tok_folder, trust_remote_code=trust_remote_code)
        self.text_encoder: torch.nn.Module = AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
        self.text_encoder.eval().requires_grad_(False)
        self.folded: str | None = None
        self.load_text_encoder_lora(path, fold=True)  # a base merged from a run that trained its text encoder
        transformer = self.denoiser_class != "UNet2DConditionModel"
        self.scheduler = _scheduler(path, pipeline, transformer)
        self._before = functools.partial(_scheduler, path, pipeline, transformer, before=True)  # (keep_ddpm)
        self.flow = isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)
        self.pooled = transformer  # an SD3 transformer also reads a pooled text embedding
        self.pipeline = pipeline or bool(recorded.get("padded_context"))  # (a base merged from a pipeline's run too)
        vae = pipeline and os.path.isdir(os.path.join(path, "vae"))
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval().requires_grad_(False) if vae else None
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.size = int(config["sample_size"]) * self.factor
        self.channels = self.vae.config.in_channels if self.vae is not None else int(config["in_channels"])
        self.interpolation = "bilinear" if transformer else "lanczos"  # the SD3 script's; the SD scripts' default
        self.pad_token_id = self.tokenizer.pad_token_id
        self.context = _context(self.tokenizer, self.text_encoder.config)
        _check_width(config, self.text_encoder.config, path, name)
        _check_channels(config, self.vae.config if self.vae is not None else None, path)
        self.denoiser: DeltaModel | None = None  # a run's, set by its trainer: save_pretrained writes its LoRA file
        self.initial: dict[str, torch.Tensor] | None = None  # its PiSSA / OLoRA init's tensors (diffusion_initial)

    def caption_limit(self, max_length: int) -> int:
        """The longest caption in tokens: ``max_length``, or the text encoder's context when that is shorter."""
        return min(max_length, self.context or max_length)

    def tokenize(self, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input ids (N, L), attention mask (N, L), how many captions were cut) for the captions."""
        limit = self.caption_limit(max_length)
        full = self.tokenizer(captions, padding=True, return_tensors="pt", verbose=False)
        pad = "max_length" if self.pooled or self.pipeline else True  # where every position is read (no mask)
        length = (self.context or limit) if self.pipeline and not self.pooled else limit  # diffusers' pipelines' pad
        enc = self.tokenizer(captions, truncation=True, max_length=limit)  # cut at the limit, padded to the length
        enc = self.tokenizer.pad(enc, padding=pad, max_length=length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], int((full["attention_mask"].sum(-1) > limit).sum())

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The denoiser's text inputs for token ids: ``encoder_hidden_states`` (N, L, d), ``encoder_attention_mask``
        (N, L), and for a transformer ``pooled_projections`` (N, d), the states' mean over the caption's tokens.
        Gradients flow through a text encoder that trains."""
        device = next(self.text_encoder.parameters()).device
        ids, mask = input_ids.to(device), attention_mask.to(device)
        # A pipeline's (Stable Diffusion) conditioning is diffusers': the padded context, no mask anywhere. Else a
        # caption padded to a fixed length (a transformer) or masked (a UNet) never depends on the ones beside it.
        states = self.text_encoder(input_ids=ids, attention_mask=None if self.pipeline else mask).last_hidden_state
        out = {"encoder_hidden_states": states.float()} | ({} if self.pipeline else {"encoder_attention_mask": mask})
        if self.pooled:
            weights = mask.unsqueeze(-1).to(states.dtype)  # (N, L, 1)
            out["pooled_projections"] = (states * weights).sum(1) / weights.sum(1).clamp(min=1)  # (N, d)
        return out

    @torch.no_grad()
    def condition(self, captions: list[str], max_length: int) -> tuple[dict[str, torch.Tensor], int]:
        """The text inputs (``encode``) of the captions on the CPU, and how many captions were cut."""
        ids, mask, cut = self.tokenize(captions, max_length)
        parts = [self.encode(ids[i : i + 64], mask[i : i + 64]) for i in range(0, len(captions), 64)]
        return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}, cut

    def resized(self, image, interpolation: str | None = None):
        """A PIL image in the model's channels, its short side resized to the model's size (``t2i_resize``) with
        ``interpolation`` (default ``self.interpolation``)."""
        img = image.convert("L" if self.channels == 1 else "RGB")
        return t2i_resize(img, self.size, interpolation or self.interpolation)

    def tensor(self, image, augment: tuple[str, ...] | list[str] = ()) -> torch.Tensor:
        """A resized image (``resized``) cropped square (``t2i_crop``: centre, or random with its flip) as
        (C, H, W) in [-1, 1]."""
        import numpy as np

        array = np.asarray(t2i_crop(image, self.size, augment), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array[None] if self.channels == 1 else array.transpose(2, 0, 1).copy())

    def pixels(self, image, interpolation: str | None = None) -> torch.Tensor:
        """A PIL image as (C, H, W) in [-1, 1] at the model's size and channels: resized, then cut at the centre."""
        return self.tensor(self.resized(image, interpolation))

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder has a LoRA that trains (``model.train_text_encoder``)."""
        return any(p.requires_grad for p in self.text_encoder.parameters())

    def add_text_encoder_lora(self, method: Any) -> None:
        """Give the text encoder a trainable LoRA on its attention projections, with the r, lora_alpha,
        lora_dropout and use_rslora of the run's LoRA (``method``), and its init when that is a plain one (True,
        False, ``gaussian``: diffusers' scripts give both LoRAs ``init_lora_weights="gaussian"``); peft's default else.

        Raises:
            ConfigError: the run's method is not a plain LoRA.
        """
        from ..methods.lora import LoraConfig
        from ..model import get_delta_model
        from ..targets import TEXT_ENCODER_TARGETS, model_type

        if getattr(method, "peft_type", None) != "LORA" or method.use_dora:
            kind = "lora with use_dora" if getattr(method, "use_dora", False) else type(method).method
            raise ConfigError(
                "model.train_text_encoder trains a LoRA on the text encoder beside the denoiser's LoRA: it needs "
                f"method.name: lora (without use_dora), got {kind}"
            )
        fields = {k: getattr(method, k) for k in ("r", "lora_alpha", "lora_dropout", "use_rslora")}
        if method.init_lora_weights in (True, False, "gaussian"):  # (an SVD or data-driven init is the denoiser's)
            fields["init_lora_weights"] = method.init_lora_weights
        targets = TEXT_ENCODER_TARGETS.get(model_type(self.text_encoder) or "")
        self.text_encoder = get_delta_model(self.text_encoder, LoraConfig(**fields, target_modules=targets))

    def load_text_encoder_lora(self, folder: str, fold: bool = False) -> bool:
        """Put the text encoder LoRA saved in ``folder/text_encoder_lora`` (a run's, a merged base's) on the text
        encoder: folded into its weights (``fold``: a base), else as an adapter that ``disable_adapter`` switches
        off. False when the folder has none. A base merged from a run on a merged base nests the LoRAs folded into
        that base (``text_encoder_lora/text_encoder_lora/...``): folded first, as they trained."""
        lora = os.path.join(folder, TEXT_ENCODER_LORA)
        if fold and os.path.isdir(lora):
            self.load_text_encoder_lora(lora, fold=True)
            self.folded = lora  # (the outermost: what save_pretrained nests)
        if not os.path.isfile(os.path.join(lora, "adapter_config.json")):
            return False
        delta = DeltaModel.from_pretrained(self.text_encoder, lora).eval()
        self.text_encoder = delta.merge_and_unload() if fold else delta
        return True

    def use_run_scheduler(self, folder: str) -> None:
        """The ``prediction_type`` a run in ``folder`` (or a checkpoint of it) trained with (``t2i_noise.
        run_prediction_type``: ``train.prediction_type``) on this processor's scheduler, so it draws as it trained."""
        self.keep_ddpm(kind := t2i_noise.run_prediction_type(folder))
        if not self.flow and kind in t2i_noise.PREDICTION_TYPES:
            self.scheduler.register_to_config(prediction_type=kind)

    def keep_ddpm(self, kind: str | None) -> None:
        """A run (or recipe) naming ``kind`` (train.prediction_type) on a base whose scheduler predicts
        flow_prediction trained DDPM before session 60 (flow matching since): it keeps the DDPM scheduler, as then."""
        if self.flow and kind in t2i_noise.PREDICTION_TYPES and (before := self._before()) is not None:
            self.scheduler, self.flow = before, False

    def disable_adapter(self) -> contextlib.AbstractContextManager:
        """Within the block the text encoder computes without its LoRA (if it has one)."""
        if isinstance(self.text_encoder, DeltaModel):
            return self.text_encoder.disable_adapter()
        return contextlib.nullcontext()

    def save_pretrained(self, out: str) -> None:
        """The tokenizer, the scheduler's config, ``t2i.json`` (the text encoder) and the text encoder's LoRA if it
        has one, so the run (or a base merged from it) names everything it needs. For a run whose denoiser trained
        a LoRA (DoRA too), also diffusers' ``pytorch_lora_weights.safetensors`` with both LoRAs (``unet.`` or
        ``transformer.`` keys, and ``text_encoder.`` keys)."""
        from ..diffusion import save_diffusers_lora

        self.tokenizer.save_pretrained(out)
        self.scheduler.save_config(out)
        recorded = {"text_encoder": self.text_encoder_name, **({"padded_context": True} if self.pipeline else {})}
        with open(os.path.join(out, T2I_FILE), "w", encoding="utf-8") as fh:
            json.dump(recorded, fh)
        encoder = self.text_encoder if isinstance(self.text_encoder, DeltaModel) else None
        if encoder is not None:
            encoder.save_pretrained(os.path.join(out, TEXT_ENCODER_LORA))
        if self.folded:  # the LoRAs folded into the base's text encoder, nested (a run loads its own LoRA alone)
            shutil.copytree(self.folded, os.path.join(out, TEXT_ENCODER_LORA, TEXT_ENCODER_LORA), dirs_exist_ok=True)
        if self.denoiser is not None and _plain_lora(self.denoiser, self.initial):
            prefix = DENOISERS[self.denoiser_class]
            save_diffusers_lora(self.denoiser, out, "default", prefix, text_encoder=encoder, initial=self.initial)


def _plain_lora(model: DeltaModel, initial: dict | None = None) -> bool:
    """Whether ``model``'s default adapter is a LoRA that diffusers' file holds whole (DoRA too; no biases or heads;
    one initialised from the base, PiSSA / OLoRA, with its ``initial`` tensors: the file is peft's conversion;
    diffusion_initial)."""
    c = model.peft_config.get("default")
    residual = from_base(model, "default") and (initial is None or c.use_dora)  # (LoftQ's initial: None)
    return c is not None and c.peft_type == "LORA" and c.bias == "none" and not c.modules_to_save and not residual


class T2IDataset(torch.utils.data.Dataset):
    """``{"pixel_values": (C, H, W)}`` plus the caption's row of each text column: its encoding (``encode``), or its
    tokens (``input_ids``, ``attention_mask``) when the text encoder trains and encodes them at every step. With
    ``make`` the pixels are resized images that ``make`` crops (and flips) at every read; with ``drop`` > 0 each read
    takes the empty caption's row (``empty``) with that probability (Python's ``random``, as diffusers' scripts'
    ``--proportion_empty_prompts``)."""

    def __init__(
        self, pixels: list, text: dict[str, torch.Tensor], make=None, empty=None, drop: float = 0.0, choices=None
    ) -> None:
        self.pixels, self.text, self.make, self.empty, self.drop = pixels, text, make, empty, drop
        self.choices = choices  # per image: its text row, or a list of rows (its captions) to draw one from

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pixels = self.make(self.pixels[i]) if self.make else self.pixels[i]
        j = self.choices[i] if self.choices is not None else i
        if self.drop and random.random() < self.drop:  # (first, as the SDXL script's encode_prompt draws)
            return {"pixel_values": pixels, **{k: v[0] for k, v in self.empty.items()}}
        j = random.choice(j) if isinstance(j, list) else j
        row = {k: v[j] for k, v in self.text.items()}
        return {"pixel_values": pixels, **row}


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


class _TensorBoard(TensorBoardCallback):
    """TensorBoard logging without the model-config text (a diffusers config is not a transformers one)."""

    def on_train_begin(self, args, state, control, **kwargs):
        return super().on_train_begin(args, state, control, **{**kwargs, "model": None})


class _ZeroGrads(TrainerCallback):
    """Zero the text encoder's gradients after each optimizer step: the Trainer zeroes the denoiser's alone
    (``model.zero_grad()``), and the text encoder's would add up across steps."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.module.zero_grad(set_to_none=True)


class T2ITrainer(DeltaTrainer):
    """DeltaTrainer with the stage's loss (module docstring); the processor brings the scheduler, the VAE and the
    text encoder. A text encoder with a LoRA that trains joins the optimizer and the gradient clipping, encodes the
    captions at every step (checkpointed as the denoiser under model.gradient_checkpointing, as diffusers' scripts),
    and its LoRA is saved in every checkpoint (``text_encoder_lora/``)."""

    def __init__(
        self, *args: Any, processor: T2IProcessor, loss_options: dict | None = None, extras: tuple = (), **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.train_dataset is not None:  # each read's draws seeded by (seed, epoch, row): t2i_reads
            self.train_dataset = SeededReads(self.train_dataset, self.args.seed)
            self.add_callback(EpochOfReads(self.train_dataset))
        self.ema = next((c for c in extras if isinstance(c, EMA)), None)  # (train.use_ema: t2i_ema; t2i_validation)
        for callback in extras:
            self.add_callback(callback)
        self.processor, self.loss_options = processor, dict(loss_options or {})  # (t2i_noise.loss_options)
        processor.denoiser = self._delta_model()  # (its init, before a --resume loads: initial_tensors)
        processor.initial = initial_tensors(processor.denoiser)
        self.text_encoder = processor.text_encoder if processor.trains_text_encoder else None
        for module in (self.text_encoder, processor.vae):
            if module is not None:
                module.to(self.args.device)
        if self.text_encoder is not None:
            self.add_callback(_ZeroGrads(self.text_encoder))
            on = next((n for n in ("activation_checkpointing", "gradient_checkpointing") if hasattr(self.args, n)), "")
            if getattr(self.args, on, False):  # the scripts' text_encoder.gradient_checkpointing_enable() too
                self.text_encoder.activation_checkpointing_enable(getattr(self.args, f"{on}_kwargs", None))
        for callback in list(self.callback_handler.callbacks):
            if type(callback) is TensorBoardCallback:  # it writes model.config as a transformers config
                self.callback_handler.remove_callback(callback)
                self.callback_handler.add_callback(_TensorBoard(callback.tb_writer))

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        """The seeded reads' mark written as a new run begins; a run begun before them resumes reading as it began
        (``t2i_reads``)."""
        reads = self.train_dataset if isinstance(self.train_dataset, SeededReads) else None
        folder = self.args.output_dir
        if isinstance(resume_from_checkpoint, str):
            folder = os.path.dirname(os.path.abspath(resume_from_checkpoint))
        if reads is not None and not resume_from_checkpoint and self.args.should_save and folder:
            mark_reads(folder)
        elif reads is not None and resume_from_checkpoint and keeps_old_reads(folder):
            self.train_dataset = reads.dataset
            self.remove_callback(EpochOfReads)
            if self.is_world_process_zero():
                print("deltatune: note: this run began before t2i's seeded reads (2026-12-07); it resumes drawing its "
                      "flips, crops and empty captions as it began", file=sys.stderr)  # fmt: skip
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def draw_after_save(self) -> Callable[[], None]:
        """For run.py: ``validation/final.png`` is drawn when the returned call is made (after the run's outputs are
        saved, as diffusers' scripts save the LoRA, then draw), not at the training's end (``t2i_validation``)."""
        found = [c for c in self.callback_handler.callbacks if isinstance(c, Validation)]
        for validation in found:
            validation.after_save = True

        def final() -> None:
            for validation in found:
                validation.final()

        return final

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        p = self.processor
        if "input_ids" in inputs:  # the text encoder trains: the captions are encoded now, with gradients
            p.text_encoder.train(model.training)
            inputs = {**inputs, **p.encode(inputs["input_ids"], inputs["attention_mask"])}
        if p.flow:
            loss = flow_matching_loss(model, p.scheduler, inputs, p.vae, **self.loss_options)
        else:
            loss = denoising_loss(model, p.scheduler, inputs, p.vae, **self.loss_options)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval: the same loss (fresh noise and steps), no predictions (there are no labels to gather)."""
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.text_encoder is not None:
            held = {id(q) for group in optimizer.param_groups for q in group["params"]}
            extra = [q for q in self.text_encoder.parameters() if q.requires_grad and id(q) not in held]
            if extra:
                optimizer.add_param_group({"params": extra, "weight_decay": self.args.weight_decay})
        return optimizer

    def _clip_grad_norm(self, model):
        if self.text_encoder is None:
            return super()._clip_grad_norm(model)
        params = [*model.parameters(), *self.text_encoder.parameters()]  # one norm over both LoRAs
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.ema is not None and self.args.should_save:
            self.ema.save(output_dir or self.args.output_dir)
        if self.text_encoder is not None and self.args.should_save:
            self.text_encoder.save_pretrained(os.path.join(output_dir or self.args.output_dir, TEXT_ENCODER_LORA))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.ema is not None:
            self.ema.load(resume_from_checkpoint)
        if self.text_encoder is not None:
            self.text_encoder.load_adapter_weights(os.path.join(resume_from_checkpoint, TEXT_ENCODER_LORA), "default")


def prepare_t2i(cfg: RunConfig, processor: T2IProcessor) -> Prepared:
    """Read images and captions, encode the captions once (or tokenize them, when the text encoder trains), give
    the Trainer the stage's loss.

    Raises:
        ConfigError: a bad loss key (``t2i_noise.loss_options``), train.prediction_type (unset: a base scheduler
            predicting another, ``t2i_noise.check_prediction_type``) or prior-preservation key (``t2i_prior.
            prior_options``), a bad data.augment, interpolation or caption dropout, or model.train_text_encoder
            without a LoRA method or under several processes.
        DataError: a row without an image or a caption (file:line), an unreadable image, a caption over
            data.max_length (or the text encoder's context) under data.truncation=refuse.
    """
    d = cfg.data
    if not d.train:
        raise DataError("data.train is not set: give a data file with an image column and a caption column")
    processor.keep_ddpm(cfg.train.prediction_type)  # (a run begun before on a flow_prediction base: DDPM)
    options, prior = loss_options(cfg.train, processor.flow), prior_options(cfg)  # (t2i_prior: DreamBooth's)
    kind = t2i_noise.check_prediction_type(cfg.train, processor.flow, processor.scheduler)  # (before any drawing)
    ema, shown = ema_options(cfg.train), validation_options(cfg.train)  # (t2i_ema, t2i_validation)
    options |= {"prior_loss_weight": prior["weight"]} if prior else {}
    augment = list(d.augment)  # (diffusers' scripts' RandomCrop without --center_crop, and --random_flip)
    if bad := [a for a in augment if a not in T2I_AUGMENTATIONS]:
        raise ConfigError(f"data.augment: stage t2i takes {', '.join(T2I_AUGMENTATIONS)}, got {bad[0]!r}")
    interp = getattr(d, "image_interpolation_mode", None) or processor.interpolation
    if interp not in INTERPOLATIONS:
        raise ConfigError(f"data.image_interpolation_mode must be one of {', '.join(INTERPOLATIONS)}, got {interp!r}")
    drop = getattr(d, "proportion_empty_prompts", 0.0) or 0.0
    if not 0 <= drop <= 1:
        raise ConfigError(f"data.proportion_empty_prompts must be in [0, 1], got {drop}")
    if cfg.model.train_text_encoder and not isinstance(processor.text_encoder, DeltaModel):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("model.train_text_encoder runs in one process for now: launch without torchrun")
        processor.add_text_encoder_lora(cfg.method_config())
    trains = processor.trains_text_encoder
    limit = processor.caption_limit(d.max_length)
    where = f"the text encoder's context of {limit} tokens"
    where = f"data.max_length={d.max_length} tokens" if limit == d.max_length else where

    def read(spec: str, split: str, notes: list[str]) -> T2IDataset:
        rows = read_image_rows(spec, d.image_column, None, d.limit, d.allow_outside, d.text_column, caption_lists=True)
        for mode, count in sorted(check(rows).items()):
            want = "L" if processor.channels == 1 else "RGB"
            if mode != want:
                notes.append(f"{count} {split} images were stored in mode {mode!r} and were converted to {want}")
        images = [open_rgb(r, on_white=False)[0] for r in rows]  # as diffusers' scripts read them (convert("RGB"))
        random_ops = split == "train" and augment  # (eval: the centre, unflipped)
        resized = [processor.resized(img, interp) for img in images]
        pixels = resized if random_ops else [processor.tensor(img) for img in resized]
        if sizes := sum(min(img.size) != processor.size for img in images):
            notes.append(f"{sizes} {split} images were resized, short side to {processor.size} ({interp})")
        if crops := sum(img.width != img.height for img in images):
            how = "at random at every step" if random_ops and "random_crop" in augment else "at their centre"
            notes.append(f"{crops} {split} images were not square: short side resized, then cropped {how}")
        # A row's list of captions: one at random at each read, as diffusers' scripts (eval: the first, as theirs)
        per_row = [r.text if isinstance(r.text, list) else [r.text] for r in rows]
        per_row = per_row if split == "train" else [c[:1] for c in per_row]
        starts = list(itertools.accumulate((len(c) for c in per_row), initial=0))
        listed = [isinstance(r.text, list) and split == "train" for r in rows]  # (a list of one draws too)
        choices = [list(range(a, a + len(c))) if lst else a for a, c, lst in zip(starts, per_row, listed)]
        captions = [*(c for row in per_row for c in row), ""]  # (the last, empty: data.proportion_empty_prompts)
        if trains:
            ids, mask, cut = processor.tokenize(captions, d.max_length)
            text = {"input_ids": ids, "attention_mask": mask}
        else:
            text, cut = processor.condition(captions, d.max_length)
        if cut and d.truncation == "refuse":
            raise DataError(f"{spec}: {cut} captions are longer than {where}")
        if cut:
            notes.append(f"{cut} {split} captions were longer than {where} and were cut")
        empty, text = {k: v[-1:] for k, v in text.items()}, {k: v[:-1] for k, v in text.items()}
        make = functools.partial(processor.tensor, augment=augment) if random_ops else None
        return T2IDataset(pixels, text, make, empty, drop if split == "train" else 0.0, choices)

    notes: list[str] = []
    train = read(d.train, "train", notes)
    ev = read(d.eval, "eval", notes) if d.eval else None
    if prior:  # class images resized as the instances, and cropped (and flipped) as they are, at each read
        tensor = functools.partial(processor.tensor, augment=augment)
        resize = functools.partial(processor.resized, interpolation=interp)
        load = (lambda img: resize(img)) if augment else (lambda img: tensor(resize(img)))
        train = with_prior(
            train, processor, prior, cfg, load, tensor if augment else None, notes, load_denoiser, sample
        )
    if kind is not None:  # (after the base drew any class images, with its own)
        processor.scheduler.register_to_config(prediction_type=kind)
    trained = "; its LoRA trains too (model.train_text_encoder)" if trains else ""
    notes.insert(0, f"{len(train)} training images with captions; text encoder {processor.text_encoder_name}{trained}")
    notes.insert(1, describe(options, processor.flow, processor.scheduler.config.get("prediction_type")))
    if augment or drop:
        notes.insert(2, f"train-time: {', '.join([*augment, *[f'{drop:g} of captions empty'] * bool(drop)])}")
    if ema is not None:
        notes.append(describe_ema(ema))
    notes += run_note(cfg.method_config())  # (PiSSA / OLoRA's LoRA file: diffusion_initial)
    extras = (EMA(**ema),) if ema is not None else ()
    if shown:  # (train.validation_prompt: t2i_validation)
        draw = functools.partial(sample, processor=processor, steps=STEPS, guidance=GUIDANCE, max_length=d.max_length)
        extras += (Validation(shown, functools.partial(_drawn, draw, processor), save_png, *extras),)
    trainer = functools.partial(T2ITrainer, processor=processor, loss_options=options, extras=extras)
    batch = prior_collate if prior else collate
    return Prepared(train, ev, batch, None, None, notes=notes, loss_only=True, trainer_class=trainer)


def _drawn(draw, processor: T2IProcessor, model, prompts: list[str], seed: int | None) -> torch.Tensor:
    """A validation drawing with the text encoder in eval mode too (the denoiser is put there by ``Validation``):
    a training one is left in training mode by the last step, and its LoRA's dropout changed the image."""
    encoder = processor.text_encoder
    training = encoder.training
    encoder.eval()
    try:
        return draw(model, prompts=prompts, seed=seed)
    finally:
        encoder.train(training)


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
    """Images for ``prompts`` as (N, C, H, W) in [0, 1]: DDIM (or the flow-matching Euler steps) over ``steps``
    steps from seeded noise, with classifier-free guidance above 1 (``guidance`` <= 1: none, as diffusers'; the empty
    caption is the unconditional one)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if steps < 1 or not 0 <= guidance < math.inf:  # a nan or infinite guidance makes every pixel nan
        raise ConfigError(f"--steps must be >= 1 and --guidance a finite number >= 0, got {steps} and {guidance}")
    if not processor.flow and steps > (n := processor.scheduler.config.num_train_timesteps):  # DDIM: trained steps
        raise ConfigError(f"--steps must be <= the base's {n} training timesteps, got {steps}")
    kind = FlowMatchEulerDiscreteScheduler if processor.flow else DDIMScheduler
    fixed = {} if processor.flow or not processor.pipeline else {"steps_offset": 1, "clip_sample": False}
    scheduler = kind.from_config({**processor.scheduler.config, **fixed})  # what StableDiffusionPipeline forces
    denoiser = model.get_base_model() if hasattr(model, "get_base_model") else model
    side, c = processor.size // processor.factor, scheduler.config
    if processor.flow and c.get("use_dynamic_shifting"):  # SD3's pipeline: mu from the image's tokens
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)  # its calculate_shift
        tokens = (side // (getattr(denoiser.config, "patch_size", None) or 1)) ** 2
        scheduler.set_timesteps(steps, mu=tokens * m + c.base_shift - m * c.base_image_seq_len)
    else:
        scheduler.set_timesteps(steps)
    device = next(model.parameters()).device
    cond = {k: v.to(device) for k, v in processor.condition(list(prompts), max_length)[0].items()}
    if guidance > 1.0:  # diffusers' pipelines guide above 1 only
        uncond = {k: v.to(device) for k, v in processor.condition([""] * len(prompts), max_length)[0].items()}
    vae, shape = processor.vae, (len(prompts), denoiser.config.in_channels, side, side)
    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    x = torch.randn(shape, generator=generator).to(device)
    for t in scheduler.timesteps:
        ts = torch.full((len(prompts),), t.item(), device=device)  # DDIM: integer steps; flow matching: sigma * T
        out = predict(model, x, ts, cond)
        if guidance > 1.0:
            free = predict(model, x, ts, uncond)
            out = free + guidance * (out - free)
        x = scheduler.step(out, t, x).prev_sample
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor + shift_factor(denoiser, vae)).sample  # (a UNet's: none)
    return ((x.float().cpu() + 1) / 2).clamp(0, 1)


def save_png(images: torch.Tensor, path: str) -> str:
    """(N, C, H, W) images in [0, 1] side by side in one PNG (grayscale for one channel), or the format the path's
    extension names; written whole (a temporary file renamed), so a failed write leaves no half image."""
    from PIL import Image

    from ..files import atomic_write

    array = (torch.cat(list(images), dim=-1) * 255).round().to(torch.uint8)  # (C, H, N * W)
    img = Image.fromarray((array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)).numpy())  # L or RGB
    kind = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ConfigError(f"{path}: its extension names no image format; give a .png file")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: img.save(tmp, format=kind))
    return path
