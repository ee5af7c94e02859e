"""The lead's fixes of session 51 from the agents' reviews: checkpointing a diffusers denoiser (its
enable_gradient_checkpointing, 8673207) runs non-reentrant on every block as diffusers' own, and refuses what it
would silently drop or mis-train."""

from __future__ import annotations

import pytest
import torch
from test_diffusion_probe16 import _unet

import deltatune as dt


def _lora_unet():
    torch.manual_seed(1)
    cfg = dt.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False)
    return dt.get_delta_model(_unet(3).train(), cfg)


@pytest.mark.parametrize(
    ("kwargs", "options", "named"),
    [({"use_reentrant": True}, {}, "use_reentrant=True"), ({}, {"every_n_layers": 2}, "every_n_layers=2"),
     ({}, {"offload": True}, "offload=True")],
)  # fmt: skip
def test_reentrant_or_sparse_checkpointing_of_a_diffusers_denoiser_is_one_line_and_changes_nothing(
    kwargs, options, named
):
    """Reentrant checkpointing of a UNet (no enable_input_require_grads) left 12 of 48 LoRA tensors without a
    gradient, with only torch's warning; every_n_layers / offload were dropped silently."""
    model = _lora_unet()
    with pytest.raises(ValueError, match=rf"^UNet2DConditionModel: diffusers' checkpointing .* got {named}$"):
        model.gradient_checkpointing_enable(kwargs, **options)
    assert not model.base_model.is_gradient_checkpointing


def test_the_trainers_default_options_checkpoint_a_diffusers_denoiser_with_every_lora_gradient():
    from diffusers import DDPMScheduler

    from deltatune.train.t2i_noise import denoising_loss

    g = torch.Generator().manual_seed(4)
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g),
              "encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}  # fmt: skip
    grads = []
    for on in (False, True):
        model = _lora_unet()
        if on:
            model.gradient_checkpointing_enable(None, every_n_layers=1, offload=False)  # (the Trainer's call)
            assert model.base_model.is_gradient_checkpointing
        denoising_loss(
            model, DDPMScheduler(num_train_timesteps=100), inputs, generator=torch.Generator().manual_seed(7)
        ).backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(g is not None for g in grads[1]) and len(grads[1]) == 48
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
