"""Probe 16 of the diffusion side against diffusers 0.42: a UNet that also predicts its variance (out_channels twice
in_channels, DeepFloyd IF's), which diffusers' DreamBooth scripts train on the first half of the output ("if model
predicts variance, throw away the prediction"), and a denoiser whose channels do not fit the images or latents it
would read (an inpainting UNet's 9), refused in one line before anything is drawn."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("diffusers")

from deltatune.config import ConfigError  # noqa: E402


def _unet(out_channels: int, in_channels: int = 3):
    """A tiny pixel-space UNet on 3-channel 16x16 images, cross-attending to 32-wide text states."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=out_channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8,
    ).eval()  # fmt: skip


def _halves():
    """(a UNet with out_channels 6, the same UNet whose conv_out keeps the first 3 output channels): the second gives
    exactly the first half of the first's output, what the DreamBooth scripts train and draw with."""
    six, three = _unet(6), _unet(3)
    state = six.state_dict()
    state["conv_out.weight"], state["conv_out.bias"] = state["conv_out.weight"][:3], state["conv_out.bias"][:3]
    three.load_state_dict(state)
    return six, three


def test_a_unet_that_predicts_its_variance_trains_on_the_first_half_as_the_dreambooth_scripts():
    """train_dreambooth_lora.py: ``if model_pred.shape[1] == 6: model_pred, _ = torch.chunk(model_pred, 2, dim=1)``,
    then the plain MSE against the noise; deltatune's loss subtracted a 3-channel target from the 6-channel output
    (a RuntimeError from torch)."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from deltatune.train.t2i_noise import denoising_loss

    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    six, three = _halves()
    g = torch.Generator().manual_seed(4)
    x0, c = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    inputs = {"pixel_values": x0, "encoder_hidden_states": c}
    with torch.no_grad():
        mine = denoising_loss(six, scheduler, inputs, generator=torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(7)  # the script's draws: the noise, then t
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 100, (2,), generator=g)
        model_pred = six(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=c).sample
        model_pred, _ = torch.chunk(model_pred, 2, dim=1)
        want = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        half = denoising_loss(three, scheduler, inputs, generator=torch.Generator().manual_seed(7))
    assert abs(float(mine) - float(want)) < 1e-6, (float(mine), float(want))
    assert abs(float(mine) - float(half)) < 1e-6


def _pipeline(root, unet, vae: bool = False) -> str:
    """A pipeline folder around ``unet``: tests/tiny's CLIP text encoder and DDPM scheduler, and an RGB VAE with
    4 latent channels when ``vae``."""
    from diffusers import AutoencoderKL
    from tiny import save_text_to_image_pipeline

    save_text_to_image_pipeline(root)
    unet.save_pretrained(root / "unet")
    if vae:
        AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        ).save_pretrained(root / "vae")  # fmt: skip
    return str(root)


def test_a_unet_that_predicts_its_variance_draws_with_the_first_half(tmp_path):
    """The drawing (``t2i.sample``: validation images, class images, ``deltatune generate``) reads the predicted noise
    only, as the IF pipeline drops the variance before a fixed-variance scheduler's step; it failed in the DDIM step."""
    from deltatune.train import t2i

    six, three = _halves()
    processor = t2i.T2IProcessor(_pipeline(tmp_path, six))
    got = t2i.sample(six, processor, ["a b", "c"], steps=4, guidance=3.0, seed=1)
    want = t2i.sample(three, processor, ["a b", "c"], steps=4, guidance=3.0, seed=1)
    assert got.shape == (2, 3, 16, 16)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "vae", "message"),
    [
        (9, 4, True, r"its unet's in_channels is 9, but the VAE's latents have 4 channels"),
        (3, 4, False, r"its unet's out_channels is 4; a denoiser predicts as many channels as it reads \(3\)"),
    ],
)
def test_a_denoiser_whose_channels_do_not_fit_is_one_line(tmp_path, in_channels, out_channels, vae, message):
    """An inpainting UNet (in_channels 9: latents, mask, masked image) beside a 4-channel VAE failed in the first
    step with torch's conv error; one whose output is neither its input's channels nor twice them (a variance) failed
    in the loss."""
    from deltatune.train import t2i

    path = _pipeline(tmp_path, _unet(out_channels, in_channels), vae=vae)
    with pytest.raises(ConfigError, match=rf"^model {re.escape(repr(path))}: {message}"):
        t2i.T2IProcessor(path)


def test_set_adapters_with_more_weights_than_names_and_a_block_dict_is_one_line(tmp_path):
    """diffusers' set_adapters refuses a weights list longer than the names ("Length of adapter names 1 is not equal
    to the length of their weights 2"); with a per-block dict past the names deltatune raised an IndexError. Nothing
    changes: the same adapters active with the same outputs."""
    import deltatune as dt
    from deltatune.diffusion import load_lora, set_adapters

    torch.manual_seed(3)
    config = dt.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    dt.save_diffusers_lora(dt.get_delta_model(_unet(3), config), tmp_path / "a")
    ours = load_lora(_unet(3), tmp_path / "a", "a", prefix="unet")
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    set_adapters(ours, ["a"], [0.5])
    with torch.no_grad():
        before = ours(x, 10, encoder_hidden_states=c).sample
    with pytest.raises(ConfigError, match=r"^set_adapters: 1 adapters and 2 weights; give one weight each$"):
        set_adapters(ours, ["a"], [0.5, {"down": 1.0}])
    with torch.no_grad():
        assert torch.equal(ours(x, 10, encoder_hidden_states=c).sample, before)
    assert ours.active_adapters == ["a"]


def test_the_text_encoder_lora_takes_the_runs_gaussian_init_as_the_scripts(tmp_path):
    """train_dreambooth_lora.py / train_text_to_image_lora_sdxl.py give the UNet's and the text encoder's LoRAs
    ``init_lora_weights="gaussian"``; a run whose LoRA says gaussian gave its text encoder's LoRA peft's default
    (Kaiming-uniform) A. Drawn under the same seed, the A matrices now equal peft's gaussian ones."""
    import peft
    from transformers import CLIPTextModel

    import deltatune as dt
    from deltatune.train import t2i

    processor = t2i.T2IProcessor(_pipeline(tmp_path, _unet(3)))
    torch.manual_seed(5)
    processor.add_text_encoder_lora(dt.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian"))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(
        CLIPTextModel.from_pretrained(tmp_path / "text_encoder"),
        peft.LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
        ),
    )
    mine = {k: v for k, v in processor.text_encoder.state_dict().items() if "lora_A" in k}
    want = {k: v for k, v in theirs.state_dict().items() if "lora_A" in k}
    assert len(mine) == len(want) == 8
    for (k, a), b in zip(mine.items(), want.values()):
        assert torch.equal(a, b), k


def test_hotswap_of_a_lora_for_another_unet_shape_is_one_line_and_changes_nothing(tmp_path):
    """A LoRA made for a UNet with 64-wide text states hot-swapped into one loaded on a 32-wide UNet: the module names
    match, the A matrices of attn2.to_k do not beyond the rank. deltatune (as diffusers' load_lora_adapter(...,
    hotswap=True), which takes it too) replaced the tensors, and the next forward failed in torch's matmul; now it is
    refused naming the module and the shapes, the adapter as it was."""
    import deltatune as dt
    from deltatune.diffusion import load_lora

    def unet(width: int):
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=width, attention_head_dim=8, norm_num_groups=8,
        ).eval()  # fmt: skip

    torch.manual_seed(1)
    for width, rank in ((64, 2), (32, 4)):
        config = dt.LoraConfig(r=rank, lora_alpha=4, target_modules=["to_k"], init_lora_weights=False)
        dt.save_diffusers_lora(dt.get_delta_model(unet(width), config), tmp_path / str(width))
    ours = load_lora(unet(32), tmp_path / "32", "a", prefix="unet")
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        before = ours(x, 10, encoder_hidden_states=c).sample
    state = {k: v.clone() for k, v in ours.adapter_state_dict("a").items()}
    message = (
        r"hotswap: down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k's lora_A is \(2, 64\) in the file"
    )
    with pytest.raises(ConfigError, match=message):
        load_lora(ours, tmp_path / "64", "a", prefix="unet", hotswap=True)
    with torch.no_grad():
        assert torch.equal(ours(x, 10, encoder_hidden_states=c).sample, before)
    assert all(torch.equal(v, state[k]) for k, v in ours.adapter_state_dict("a").items())


def test_a_kohya_file_with_a_nan_alpha_names_the_file_and_module(tmp_path):
    """kohya's ``.alpha`` nan (a broken export) gave LoraConfig's "lora_alpha must be a finite number, got nan", naming
    neither the file nor the module (``generate --lora`` takes several files); the UNet stays without a LoRA."""
    from safetensors.torch import save_file

    from deltatune.diffusion import load_lora

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.ones(2, 32), f"{key}.lora_up.weight": torch.ones(16, 2),
               f"{key}.alpha": torch.tensor(float("nan"))}, tmp_path / "k.safetensors")  # fmt: skip
    unet = _unet(3)
    file = str(tmp_path / "k.safetensors")
    message = (
        rf"^{re.escape(file)}: module down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k's alpha is nan"
    )
    with pytest.raises(ConfigError, match=message):
        load_lora(unet, file)
    assert not any("lora" in n for n, _ in unet.named_modules())


def test_gradient_checkpointing_on_a_diffusers_denoiser_is_its_own_and_gives_the_same_gradients():
    """``model.gradient_checkpointing: true`` on stage t2i: the Trainer calls the DeltaModel's
    activation_checkpointing_enable, which called ``gradient_checkpointing_enable`` on the UNet, a name diffusers'
    models lack (their ``enable_gradient_checkpointing``, what train_text_to_image_lora.py's --gradient_checkpointing
    calls): AttributeError before the first step. With the UNet's own checkpointing on, the loss and the LoRA's
    gradients equal the run without."""
    from diffusers import DDPMScheduler

    import deltatune as dt
    from deltatune.train.t2i_noise import denoising_loss

    scheduler = DDPMScheduler(num_train_timesteps=100)
    g = torch.Generator().manual_seed(4)
    inputs = {
        "pixel_values": torch.randn(2, 3, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
    }
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(1)
        config = dt.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False)
        model = dt.get_delta_model(_unet(3).train(), config)
        if checkpointed:
            model.gradient_checkpointing_enable()
            assert model.get_base_model().is_gradient_checkpointing
        loss = denoising_loss(model, scheduler, inputs, generator=torch.Generator().manual_seed(7))
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_an_image_write_that_fails_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    """``generate --out`` and the validation images: a disk that fills up in the middle of the PNG left half a file
    where the last image was; now the file is written beside and renamed, and the failure is one line naming it."""
    from PIL import Image

    from deltatune.train.t2i import save_png

    out = tmp_path / "img.png"
    save_png(torch.zeros(2, 3, 4, 4), str(out))
    whole = out.read_bytes()

    def half(self, fp, format=None, **kwargs):  # noqa: A002  (PIL's name)
        with open(fp, "wb") as fh:
            fh.write(whole[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half)
    with pytest.raises(OSError, match=rf"could not write {re.escape(str(out))}: No space left on device"):
        save_png(torch.ones(2, 3, 4, 4), str(out))
    assert out.read_bytes() == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


@pytest.mark.parametrize("flow", [False, True])
def test_class_images_are_drawn_with_the_defaults_of_the_scripts_pipeline(tmp_path, flow):
    """train_dreambooth_lora.py and train_dreambooth_lora_sd3.py draw the missing class images with
    ``pipeline(example["prompt"])``: StableDiffusionPipeline's defaults (50 steps, guidance 7.5) and
    StableDiffusion3Pipeline's (28 steps, guidance 7.0). A flow-matching base drew with 50 and 7.5."""
    import inspect
    from types import SimpleNamespace as NS

    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    from deltatune.train.t2i_prior import with_prior

    asked = []

    def sample(base, processor, prompts, steps, guidance, seed, max_length):
        asked.append((steps, guidance))
        return torch.rand(len(prompts), 3, 8, 8)

    processor = NS(flow=flow, scheduler=NS(config=NS(num_train_timesteps=1000)), trains_text_encoder=False,
                   condition=lambda prompts, n: ({"encoder_hidden_states": torch.zeros(1, 2, 4)}, 0))  # fmt: skip
    cfg = NS(model=NS(name_or_path=str(tmp_path)), data=NS(max_length=8), train=NS(seed=0))
    options = {"folder": str(tmp_path / "class"), "prompt": "a dog", "count": 2, "weight": 1.0}
    with_prior([{}], processor, options, cfg, lambda img: img, None, [], lambda path: torch.nn.Identity(), sample)
    pipeline = StableDiffusion3Pipeline if flow else StableDiffusionPipeline
    defaults = inspect.signature(pipeline.__call__).parameters
    assert asked == [(defaults["num_inference_steps"].default, defaults["guidance_scale"].default)]
