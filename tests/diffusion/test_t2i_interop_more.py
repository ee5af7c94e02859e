"""More LoRA files as diffusers writes them (a model-level ``save_lora_adapter``, the DreamBooth scripts'
text-encoder layout, transformers-4 ``text_model.`` names), each loaded as diffusers loads it; and stage t2i's
checks: a bf16 denoiser fed float32 inputs, ``--steps`` over the scheduler's timesteps, a UNet that needs more
than the text (SDXL)."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import save_file
from tolerances import ATOL

import deltatune as dt
from deltatune.config import ConfigError

diffusers = pytest.importorskip("diffusers")
from deltatune.train import t2i  # noqa: E402

ATOL32 = ATOL[torch.float32]
IDS = torch.tensor([[1, 5, 9, 2]])


def tiny_unet(seed: int = 0, **extra):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, **extra,
    ).eval()  # fmt: skip


def unet_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, states = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return model(sample=x, timestep=torch.tensor([10, 700]), encoder_hidden_states=states).sample


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def clip_out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def diffusers_text_encoder(folder_or_file: str):
    """A fresh text encoder with the file loaded by diffusers' own pipeline loader."""
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(folder_or_file)
    encoder = tiny_clip()
    diffusers.StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, encoder, prefix="text_encoder")
    return encoder


def test_a_model_level_save_lora_adapter_file_loads_with_its_alpha(tmp_path):
    """unet.save_lora_adapter(folder): keys without 'unet.', the bare peft config (r 4, alpha 16) as metadata."""
    from peft import LoraConfig

    theirs = tiny_unet()
    torch.manual_seed(3)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    theirs.save_lora_adapter(str(tmp_path))
    reloaded = tiny_unet()
    reloaded.load_lora_adapter(str(tmp_path), prefix=None, weight_name="pytorch_lora_weights.safetensors")
    want = unet_out(reloaded.eval())
    torch.testing.assert_close(want, unet_out(theirs.eval()), atol=ATOL32, rtol=0)
    for prefix in (None, "unet"):
        ours = dt.load_lora(tiny_unet(), tmp_path, prefix=prefix)
        assert ours.peft_config["default"].lora_alpha == 16.0 and ours.peft_config["default"].r == 4
        torch.testing.assert_close(unet_out(ours), want, atol=ATOL32, rtol=0)
    assert (want - unet_out(tiny_unet())).abs().max() > 100 * ATOL32


def test_the_dreambooth_scripts_text_encoder_layout_loads_as_diffusers_loads_it(tmp_path):
    """train_dreambooth_lora.py saves the text encoder via convert_state_dict_to_diffusers: lora_linear_layer.down/up."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    encoder = tiny_clip()
    torch.manual_seed(3)
    theirs = get_peft_model(encoder, LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(theirs).items()}
    state = convert_state_dict_to_diffusers(state)
    assert any(k.endswith("q_proj.lora_linear_layer.down.weight") for k in state)
    diffusers.StableDiffusionPipeline.save_lora_weights(str(tmp_path), text_encoder_lora_layers=state)
    want = clip_out(diffusers_text_encoder(str(tmp_path)))
    torch.testing.assert_close(want, clip_out(theirs.eval()), atol=ATOL32, rtol=0)
    ours = dt.load_lora(tiny_clip(), tmp_path, prefix="text_encoder")
    torch.testing.assert_close(clip_out(ours), want, atol=ATOL32, rtol=0)
    assert (want - clip_out(tiny_clip())).abs().max() > 100 * ATOL32


def test_transformers_4_text_model_names_load_on_a_text_encoder_without_that_level(tmp_path):
    """kohya's lora_te_text_model_encoder_... and diffusers' text_encoder.text_model.encoder... keys: diffusers strips
    'text_model.' when the CLIPTextModel has no such level (transformers 5); so does deltatune."""
    if any(n == "text_model" for n, _ in tiny_clip().named_modules()):
        pytest.skip("this transformers' CLIPTextModel has the text_model. level: the file's names fit as they are")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    kohya = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file(
        {f"{kohya}.lora_down.weight": a, f"{kohya}.lora_up.weight": b, f"{kohya}.alpha": torch.tensor(2.0)},
        str(tmp_path / "kohya.safetensors"),
    )
    stem = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b}, str(tmp_path / "diffusers.safetensors"))
    for scale, name in ((0.5, "kohya"), (1.0, "diffusers")):  # kohya: alpha 2 / r 4; diffusers: no metadata, 1
        hand = tiny_clip()
        with torch.no_grad():
            hand.get_submodule("encoder.layers.0.self_attn.q_proj").weight.add_(scale * b @ a)
        want = clip_out(hand)
        for prefix in ("text_encoder", None):
            ours = dt.load_lora(tiny_clip(), tmp_path / f"{name}.safetensors", prefix=prefix)
            assert set(ours.peft_config["default"].target_modules) == {"encoder.layers.0.self_attn.q_proj"}
            torch.testing.assert_close(clip_out(ours), want, atol=ATOL32, rtol=0)
    theirs = clip_out(diffusers_text_encoder(str(tmp_path / "diffusers.safetensors")))
    torch.testing.assert_close(theirs, want, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("loss", ["denoising", "flow_matching"])
def test_a_bf16_denoiser_gets_its_inputs_cast_to_bf16_as_diffusers_scripts_do(loss):
    """model.dtype bfloat16 with float32 images and text states (train.precision fp32): the loss is the bf16
    UNet's on the inputs cast to bf16, as diffusers' train_text_to_image casts them to weight_dtype."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    unet = tiny_unet().to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.rand(3, 1, 16, 16, generator=g) * 2 - 1}
    inputs["encoder_hidden_states"] = torch.randn(3, 4, 32, generator=g)
    g = torch.Generator().manual_seed(7)
    x0 = inputs["pixel_values"]
    noise = torch.randn(x0.shape, generator=g)
    if loss == "denoising":
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        got = t2i.denoising_loss(unet, scheduler, inputs, generator=torch.Generator().manual_seed(7))
        t = torch.randint(0, 1000, (3,), generator=g)
        noisy, target = scheduler.add_noise(x0, noise, t), noise
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        got = t2i.flow_matching_loss(unet, scheduler, inputs, generator=torch.Generator().manual_seed(7))
        index = (torch.rand((3,), generator=g) * 1000).long()
        t, sigma = scheduler.timesteps[index], scheduler.sigmas[index].view(3, 1, 1, 1)
        noisy, target = (1 - sigma) * x0 + sigma * noise, noise - x0
    with torch.no_grad():
        states = inputs["encoder_hidden_states"].to(torch.bfloat16)
        pred = unet(noisy.to(torch.bfloat16), t, encoder_hidden_states=states).sample
    assert pred.dtype == torch.bfloat16
    torch.testing.assert_close(got, ((pred.float() - target) ** 2).mean(), atol=1e-6, rtol=1e-5)


def test_sample_refuses_more_steps_than_the_scheduler_was_trained_with():
    """DDIM steps through the training timesteps: --steps 2000 on a 1000-step base is one line, not diffusers'
    traceback; 1000 passes the check (and then needs a model)."""
    from diffusers import DDPMScheduler

    processor = types.SimpleNamespace(flow=False, scheduler=DDPMScheduler(num_train_timesteps=1000))
    with pytest.raises(ConfigError, match=r"^--steps must be <= the base's 1000 training timesteps, got 2000$"):
        t2i.sample(None, processor, ["a digit"], steps=2000)
    with pytest.raises(AttributeError):  # past the check: the missing model
        t2i.sample(None, processor, ["a digit"], steps=1000)


@pytest.mark.parametrize(
    "extra, named",
    [
        (
            {
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 80,
            },
            "addition_embed_type='text_time'",
        ),
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
        ({"num_class_embeds": 10}, "num_class_embeds=10"),
        ({"time_cond_proj_dim": 8}, "time_cond_proj_dim=8"),
    ],
)
def test_a_unet_that_reads_more_than_the_text_is_refused_in_one_line(tmp_path, extra, named):
    """SDXL's UNet needs text_embeds and time_ids beside the text states: refused at the checks, not at step 1."""
    tiny_unet(**extra).save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match=r"its UNet reads more than the text \(" + named.replace("(", r"\(")) as err:
        t2i.load_denoiser(str(tmp_path))
    assert "\n" not in str(err.value)
    plain = tmp_path / "plain"
    tiny_unet().save_pretrained(str(plain))
    torch.testing.assert_close(unet_out(t2i.load_denoiser(str(plain))), unet_out(tiny_unet()), atol=0, rtol=0)
