"""Probe 18 of stage t2i and the diffusion LoRA files against diffusers 0.42.1: model.gradient_checkpointing with
model.train_text_encoder checkpoints the text encoder too, as the LoRA scripts' ``text_encoder.gradient_checkpointing_
enable()``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from pathlib import Path  # noqa: E402

from test_diffusion_probe12 import data, pipeline  # noqa: E402,F401  (fixtures)

from deltatune.train import t2i  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _checkpointing(module: torch.nn.Module) -> list[bool]:
    return [m.gradient_checkpointing for m in module.modules() if hasattr(m, "gradient_checkpointing")]


def test_gradient_checkpointing_with_train_text_encoder_checkpoints_the_text_encoder_too(
    pipeline,
    data,
    tmp_path,
    monkeypatch,  # noqa: F811
):
    """train_text_to_image_lora.py / train_dreambooth_lora.py: ``if args.gradient_checkpointing:
    unet.enable_gradient_checkpointing(); if args.train_text_encoder: text_encoder.gradient_checkpointing_enable()``.
    deltatune checkpointed the UNet alone (the Trainer's model): the text encoder's encoder layers kept every
    activation. Seen during the step: every checkpointable module of both, and the step's loss as without."""
    from deltatune.train import run as run_module
    from deltatune.train.config import load_recipe

    seen, losses = [], []
    compute = t2i.T2ITrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append((_checkpointing(self.processor.text_encoder), _checkpointing(model.get_base_model())))
        loss = compute(self, model, inputs, *args, **kwargs)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(t2i.T2ITrainer, "compute_loss", spy)
    for on in (True, False):
        cfg = load_recipe(str(ROOT / "recipes" / "digits-t2i-lora.yaml"),
                          [f"model.name_or_path={pipeline}", f"data.train={data / 't2i-adapt-train.jsonl'}",
                           "data.eval=null", "data.limit=2", "train.max_steps=1", "train.batch_size=2",
                           "train.report_to=[none]", f"output.dir={tmp_path / str(on)}",
                           "model.train_text_encoder=true", f"model.gradient_checkpointing={str(on).lower()}"])  # fmt: skip
        run_module.train(cfg)
    (encoder, unet), (encoder_off, unet_off) = seen
    assert encoder and all(encoder) and unet and all(unet)
    assert not any(encoder_off) and not any(unet_off)
    assert abs(losses[0] - losses[1]) < 1e-6, losses
