"""Probe 7 of stage t2i and the diffusion LoRA files: min-SNR's v-prediction weight at a zero-terminal-SNR step,
the flow-matching drawing against diffusers' SD3 pipeline (a shifted and a dynamically shifted schedule), and a
LoRA file with peft's LoRA biases refused as such."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import deltatune as dt  # noqa: E402
from deltatune.config import ConfigError  # noqa: E402
from deltatune.train import t2i  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def test_min_snr_v_prediction_weighs_a_zero_terminal_snr_step_zero_as_diffusers():
    """diffusers' scripts weigh a v-prediction step min(SNR, g) / (SNR + 1): 0 at SNR 0, the limit of the steps
    before it (4e-9 at t=998). deltatune gave that step 1, a jump from ~0 to full weight at one step in 1000."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    t = torch.tensor([0, 500, 997, 998, 999])
    snr = compute_snr(scheduler, t)
    expected = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / (snr + 1)  # no nan here
    weights = t2i.min_snr_weights(scheduler, t, 5.0)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert weights[-1] == 0 and snr[-1] == 0
    eps = DDPMScheduler(
        num_train_timesteps=1000, rescale_betas_zero_snr=True
    )  # epsilon: its limit, 1 (diffusers: nan)
    assert t2i.min_snr_weights(eps, t, 5.0)[-1] == 1


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory) -> Path:
    from test_t2i_flow import tiny_sd3
    from tiny import save_tiny

    root = tmp_path_factory.mktemp("sd3")
    encoder = save_tiny(root / "bert", "bert", "seq_cls")
    tiny_sd3().save_pretrained(root / "sd3")
    (root / "sd3" / "t2i.json").write_text(json.dumps({"text_encoder": encoder}))
    return root / "sd3"


@pytest.mark.parametrize(
    "schedule", [{"shift": 3.0}, {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}]
)
def test_the_flow_drawing_equals_diffusers_sd3_pipeline(sd3_base, schedule):
    """The same text states given to StableDiffusion3Pipeline (prompt_embeds, pooled ones, the empty caption's as the
    negative) at guidance 4 draw the same latents. A dynamically shifted schedule (SD3's pipeline computes mu from
    the image's tokens) was a traceback from diffusers: "`mu` must be passed"."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    FlowMatchEulerDiscreteScheduler(**schedule).save_config(sd3_base)
    processor = t2i.T2IProcessor(str(sd3_base))
    model = t2i.load_denoiser(str(sd3_base)).eval()
    ours = t2i.sample(model, processor, ["a digit seven"], steps=4, guidance=4.0, seed=3, max_length=16)
    cond, _ = processor.condition(["a digit seven"], 16)
    uncond, _ = processor.condition([""], 16)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(processor.scheduler.config)
    parts = {f"{k}{n}": None for k in ("text_encoder", "tokenizer") for n in ("", "_2", "_3")}
    pipe = StableDiffusion3Pipeline(transformer=model, scheduler=scheduler, vae=None, **parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae_scale_factor = 1  # no VAE: the latents are the image
    latents = pipe(
        prompt_embeds=cond["encoder_hidden_states"],
        pooled_prompt_embeds=cond["pooled_projections"],
        negative_prompt_embeds=uncond["encoder_hidden_states"],
        negative_pooled_prompt_embeds=uncond["pooled_projections"],
        guidance_scale=4.0, num_inference_steps=4, height=16, width=16, output_type="latent",
        generator=torch.Generator().manual_seed(3),
    ).images  # fmt: skip
    torch.testing.assert_close(ours, ((latents + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)


def test_a_lora_file_with_lora_biases_is_refused_as_such(tmp_path):
    """peft's lora_bias=True adds lora_B.bias, which diffusers saves; the file was refused as "a LoRA for another
    architecture or component" though every key names a module of this very UNet."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from test_lora_files import tiny_unet

    theirs = tiny_unet()
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, lora_bias=True))
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(theirs))
    with pytest.raises(ConfigError, match=r"lora_B\.bias hold .* LoRA biases \(lora_bias\)"):
        dt.load_lora(tiny_unet(), tmp_path)


def test_a_file_with_two_text_encoders_loras_needs_a_prefix(tmp_path):
    """SDXL's LoRA files hold text_encoder. and text_encoder_2. keys; without a prefix both fit a CLIP text encoder
    of the same width, and the second silently overwrote the first (the model got text_encoder_2's LoRA)."""
    from safetensors.torch import save_file
    from test_t2i_interop_more import tiny_clip

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for component in ("text_encoder", "text_encoder_2"):
        key = f"{component}.encoder.layers.0.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(2, 32, generator=g)
        tensors[f"{key}.lora_B.weight"] = torch.randn(32, 2, generator=g)
    save_file(tensors, tmp_path / "sdxl.safetensors")
    with pytest.raises(ConfigError, match=r"'text_encoder' and 'text_encoder_2' both fit .* pass prefix="):
        dt.load_lora(tiny_clip(), tmp_path / "sdxl.safetensors")
    model = dt.load_lora(tiny_clip(), tmp_path / "sdxl.safetensors", prefix="text_encoder")
    layer = model.get_base_model().encoder.layers[0].self_attn.q_proj
    assert torch.equal(
        layer.lora_A["default"].weight, tensors["text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight"]
    )


def test_sdxls_kohya_text_encoder_keys_load_as_diffusers_loads_them(tmp_path):
    """SDXL's kohya files name its text encoders lora_te1_ and lora_te2_; prefix="text_encoder" (or
    "text_encoder_2") found "no LoRA tensors in the file". Now each loads into the same outputs as diffusers'
    StableDiffusionXLPipeline loader gives, and without a prefix the two are refused (both fit one CLIP)."""
    from safetensors.torch import save_file
    from test_t2i_interop_more import clip_out, tiny_clip

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for head in ("lora_te1", "lora_te2"):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            key = f"{head}_text_model_encoder_layers_0_self_attn_{proj}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(2, 32, generator=g)
            tensors[f"{key}.lora_up.weight"] = torch.randn(32, 2, generator=g)
            tensors[f"{key}.alpha"] = torch.tensor(4.0)
    file = tmp_path / "sdxl.safetensors"
    save_file(tensors, file)
    state, alphas = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(file))
    outputs = []
    for prefix in ("text_encoder", "text_encoder_2"):
        theirs = tiny_clip()
        diffusers.StableDiffusionXLPipeline.load_lora_into_text_encoder(state, alphas, theirs, prefix=prefix)
        outputs.append(clip_out(theirs))
        torch.testing.assert_close(clip_out(dt.load_lora(tiny_clip(), file, prefix=prefix)), outputs[-1])
    assert (outputs[0] - outputs[1]).abs().max() > 0.1
    with pytest.raises(ConfigError, match=r"'lora_te1' and 'lora_te2' both fit .* pass prefix="):
        dt.load_lora(tiny_clip(), file)
