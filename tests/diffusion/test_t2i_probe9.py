"""Stage t2i against diffusers' training scripts, ninth pass: the image pipeline (torchvision's Resize of the short
side, then CenterCrop or RandomCrop, then RandomHorizontalFlip, with the scripts' interpolation), offset noise and
input perturbation (train_text_to_image.py), SD3's weighting schemes and preconditioned outputs
(train_dreambooth_lora_sd3.py with diffusers' own training_utils), caption dropout, and a VAE shift factor, which
Stable Diffusion's pipeline ignores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from deltatune.config import ConfigError  # noqa: E402
from deltatune.data.images import t2i_crop, t2i_resize  # noqa: E402
from deltatune.train import t2i  # noqa: E402
from deltatune.train.config import build  # noqa: E402


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def bare_processor(size: int = 16, channels: int = 3, interpolation: str = "lanczos") -> t2i.T2IProcessor:
    p = t2i.T2IProcessor.__new__(t2i.T2IProcessor)  # (pixels reads the size, the channels, the interpolation)
    p.size, p.channels, p.interpolation = size, channels, interpolation
    return p


def normalised(img: Image.Image) -> torch.Tensor:  # ToTensor + Normalize([0.5], [0.5])
    return (torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255 - 0.5) / 0.5


@pytest.mark.parametrize(
    "w, h, resized, box", [(21, 13, (25, 16), (4, 0, 20, 16)), (13, 30, (16, 36), (0, 10, 16, 26))]
)
def test_an_image_is_resized_on_its_short_side_then_cut_at_the_centre_as_diffusers(w, h, resized, box):
    """Resize(16, LANCZOS) then CenterCrop(16), as train_text_to_image_lora.py (its default --image_interpolation_mode
    lanczos): the long side int(16 * 21 / 13) = 25 (truncated), the crop's left round(4.5) = 4 (half to even).
    deltatune cut the square first and resized it with bicubic: other pixels (1.33 off at most on [-1, 1] on this
    21x13 image; an 8x8 digit drawn at 16x16, bicubic against lanczos: 0.26; /tmp/probes/diffusion9/repro_image.py)."""
    img = photo(w, h)
    want = normalised(img.resize(resized, Image.Resampling.LANCZOS).crop(box))
    got = bare_processor().pixels(img)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert t2i_resize(img, 16, "bilinear").size == resized  # (the SD3 script's BILINEAR)
    same = photo(16, 16)
    assert t2i_resize(same, 16) is same  # torchvision returns an image of that size as it is


def test_random_crop_then_flip_draw_as_torchvision():
    """RandomCrop: the row, then the column, from torch's generator; RandomHorizontalFlip: torch.rand(1) < 0.5."""
    img = t2i_resize(photo(40, 24), 16)  # 26 x 16
    for seed in range(6):
        torch.manual_seed(seed)
        got = t2i_crop(img, 16, ["random_crop", "hflip"])
        torch.manual_seed(seed)
        top = torch.randint(0, 16 - 16 + 1, size=(1,)).item()
        left = torch.randint(0, 26 - 16 + 1, size=(1,)).item()
        want = img.crop((left, top, left + 16, top + 16))
        want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else want
        assert np.array_equal(np.asarray(got), np.asarray(want))


def unet(cross: int = 8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=4, norm_num_groups=4,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("offset, perturbation", [(0.1, 0.0), (0.0, 0.1), (0.05, 0.2)])
def test_noise_offset_and_input_perturbation_are_diffusers(offset, perturbation):
    """train_text_to_image.py: noise = randn; noise += offset * randn(B, C, 1, 1); new_noise = noise + p * randn;
    t = randint; the input is noised with new_noise, the target is noise."""
    from diffusers import DDPMScheduler

    model, scheduler = unet(), DDPMScheduler(num_train_timesteps=100)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.rand(3, 3, 8, 8, generator=g) * 2 - 1,
        "encoder_hidden_states": torch.randn(3, 4, 8),
    }
    loss = t2i.denoising_loss(
        model, scheduler, inputs, generator=torch.Generator().manual_seed(5), noise_offset=offset,
        input_perturbation=perturbation,
    )  # fmt: skip
    g, x0 = torch.Generator().manual_seed(5), inputs["pixel_values"]
    noise = torch.randn(x0.shape, generator=g)
    if offset:
        noise += offset * torch.randn((3, 3, 1, 1), generator=g)
    new_noise = noise + perturbation * torch.randn(noise.shape, generator=g) if perturbation else noise
    t = torch.randint(0, 100, (3,), generator=g)
    with torch.no_grad():
        pred = model(scheduler.add_noise(x0, new_noise, t), t, inputs["encoder_hidden_states"]).sample
        plain = t2i.denoising_loss(model, scheduler, inputs, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, noise), atol=1e-6, rtol=1e-5)
    assert not torch.isclose(loss, plain)


@pytest.mark.parametrize(
    "scheme, extra",
    [
        ("sigma_sqrt", {}),
        ("cosmap", {}),
        ("mode", {"mode_scale": 0.8}),
        ("logit_normal", {"logit_mean": 0.5, "logit_std": 0.7}),
    ],
)
@pytest.mark.parametrize("precondition", [False, True])
def test_sd3_weighting_schemes_and_preconditioning_are_diffusers(scheme, extra, precondition):
    """train_dreambooth_lora_sd3.py with its own compute_density_for_timestep_sampling and
    compute_loss_weighting_for_sd3: noise, then u; sigma at floor(u T); the prediction x_t - sigma v against x0
    with --precondition_outputs 1 (its default), v against e - x0 with 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from test_t2i_flow import inputs, tiny_sd3

    model, scheduler, batch = tiny_sd3(), FlowMatchEulerDiscreteScheduler(shift=3.0), inputs()
    options = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, **extra}
    loss = t2i.flow_matching_loss(
        model, scheduler, batch, generator=torch.Generator().manual_seed(3), sigma_sampling=scheme,
        precondition_outputs=precondition, **options,
    )  # fmt: skip
    g, x0 = torch.Generator().manual_seed(3), batch["pixel_values"]
    noise = torch.randn(x0.shape, generator=g)
    u = compute_density_for_timestep_sampling(scheme, 3, generator=g, **options)
    index = (u * 1000).long()
    timesteps = scheduler.timesteps[index]
    sigmas = scheduler.sigmas[[(scheduler.timesteps == t).nonzero().item() for t in timesteps]].view(3, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    with torch.no_grad():
        pred = model(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=batch["encoder_hidden_states"],
            pooled_projections=batch["pooled_projections"],
        ).sample  # fmt: skip
    pred, target = (pred * (-sigmas) + noisy, x0) if precondition else (pred, noise - x0)
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
    want = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(3, -1), 1).mean()
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)


def test_the_recipe_keys_reach_the_losses_and_the_other_losss_keys_are_refused():
    """train.sigma_sampling takes diffusers' weighting schemes; a key of the other loss is refused in one line."""
    from deltatune.train.t2i_noise import loss_options

    cfg = build({"stage": "t2i", "train": {"sigma_sampling": "cosmap"}})
    assert loss_options(cfg.train, flow=True)["sigma_sampling"] == "cosmap"
    cfg.train.sigma_sampling, cfg.train.noise_offset = "uniform", 0.1
    with pytest.raises(ConfigError, match="train.noise_offset shapes the DDPM noise; this base trains with flow"):
        loss_options(cfg.train, flow=True)
    assert loss_options(cfg.train, flow=False) == {"snr_gamma": 0.0, "noise_offset": 0.1, "input_perturbation": 0.0}
    with pytest.raises(ConfigError, match="train.sigma_sampling is for flow matching; this base trains with DDPM"):
        loss_options(build({"stage": "t2i", "train": {"sigma_sampling": "mode"}}).train, flow=False)
    with pytest.raises(ConfigError, match="train.sigma_sampling must be one of uniform, none, logit_normal, mode"):
        loss_options(build({"stage": "t2i", "train": {"sigma_sampling": "sigmoid"}}).train, flow=True)


@pytest.fixture(scope="module")
def shifted(tmp_path_factory) -> Path:
    """A Stable Diffusion pipeline folder whose VAE (RGB 16x16 <-> 3x8x8) has a shift_factor, and a caption file of
    non-square images."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from tiny import save_tiny, tokenizer

    root = tmp_path_factory.mktemp("shifted")
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        shift_factor=0.5, scaling_factor=0.7,
    ).save_pretrained(root / "vae")  # fmt: skip
    unet(cross=32).save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "scheduler")
    save_tiny(root / "text_encoder", "bert", "seq_cls")
    tokenizer().save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    rows = []
    for i in range(4):
        photo(24 + 4 * i, 16, seed=i).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": f"picture number {i}"})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_unets_latents_are_not_shifted_as_stable_diffusions_pipeline(shifted):
    """StableDiffusionPipeline decodes latents / scaling_factor and its scripts train on latents * scaling_factor:
    a VAE's shift_factor is SD3's. deltatune subtracted 0.5 before scaling (x0 0.35 off) and added it back when
    drawing, so its LoRA trained on latents diffusers' pipeline never decodes."""
    processor = t2i.T2IProcessor(str(shifted))
    model = t2i.load_denoiser(str(shifted)).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    text = {"encoder_hidden_states": torch.randn(2, 4, 32)}
    loss = t2i.denoising_loss(model, processor.scheduler, {"pixel_values": x, **text}, processor.vae,
                              torch.Generator().manual_seed(1))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x0 = processor.vae.encode(x).latent_dist.sample(g) * 0.7  # train_text_to_image_lora.py
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 100, (2,), generator=g)
        pred = model(processor.scheduler.add_noise(x0, noise, t), t, text["encoder_hidden_states"]).sample
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, noise), atol=1e-6, rtol=1e-5)
    drawn = t2i.sample(model, processor, ["a picture"], steps=2, seed=0, max_length=16)
    processor.vae.register_to_config(shift_factor=None)
    try:
        torch.testing.assert_close(drawn, t2i.sample(model, processor, ["a picture"], steps=2, seed=0, max_length=16))
    finally:
        processor.vae.register_to_config(shift_factor=0.5)


def test_augment_and_caption_dropout_reach_the_dataset(shifted):
    """data.augment [random_crop, hflip] crops and flips at every read (torchvision's draws); the empty-caption
    proportion (diffusers' --proportion_empty_prompts: Python's random.random() < p per caption) swaps in the empty
    caption's encoding, padded as every caption; eval reads stay the centre, captioned."""
    processor = t2i.T2IProcessor(str(shifted))
    cfg = build({"stage": "t2i", "model": {"name_or_path": str(shifted)}, "data": {
        "train": str(shifted / "data.jsonl"), "eval": str(shifted / "data.jsonl"), "augment": ["random_crop", "hflip"],
        "max_length": 16}})  # fmt: skip
    cfg.data.proportion_empty_prompts = 0.5
    prepared = t2i.prepare_t2i(cfg, processor)
    train, ev = prepared.train, prepared.eval
    assert any("train-time: random_crop, hflip, 0.5 of captions empty" in n for n in prepared.notes)
    assert not any("images were resized" in n for n in prepared.notes)  # (short sides of 16: only cropped)
    assert "4 train images were not square: short side resized, then cropped at random at every step" in prepared.notes
    empty, _ = processor.condition([""], 16)
    full, _ = processor.condition([f"picture number {i}" for i in range(4)], 16)
    resized = t2i_resize(photo(28, 16, seed=1), 16)  # row 1: 28 x 16, kept whole until read
    random.seed(7)
    torch.manual_seed(7)
    items = [train[1] for _ in range(8)]
    random.seed(7)
    torch.manual_seed(7)
    for item in items:
        torch.randint(0, 1, size=(1,))  # the row: 0, drawn all the same (torchvision skips only a whole fit)
        left = torch.randint(0, 28 - 16 + 1, size=(1,)).item()
        want = resized.crop((left, 0, left + 16, 16))
        want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else want
        torch.testing.assert_close(item["pixel_values"], normalised(want), atol=1e-6, rtol=0)
        states = empty if random.random() < 0.5 else {k: v[1:2] for k, v in full.items()}
        torch.testing.assert_close(item["encoder_hidden_states"], states["encoder_hidden_states"][0])
    assert len({float(i["encoder_hidden_states"].sum()) for i in items}) == 2  # both drawn
    torch.testing.assert_close(ev[1]["pixel_values"], normalised(resized.crop((6, 0, 22, 16))), atol=1e-6, rtol=0)
    cfg.data.augment = ["random_resized_crop"]
    with pytest.raises(
        ConfigError, match="data.augment: stage t2i takes random_crop, hflip, got 'random_resized_crop'"
    ):
        t2i.prepare_t2i(cfg, processor)


def test_a_row_may_hold_several_captions_one_drawn_at_each_read_as_diffusers(shifted, tmp_path):
    """diffusers' scripts take a list of captions per image: random.choice at each training read, the first
    otherwise; deltatune refused such a row ("must be a non-empty caption, got [...]")."""
    import shutil

    shutil.copy(shifted / "0.png", tmp_path / "0.png")
    rows = [
        {"image": "0.png", "text": ["a red thing", "a blue thing", "a green thing"]},
        {"image": "0.png", "text": "one"},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    processor = t2i.T2IProcessor(str(shifted))
    data = {"train": str(tmp_path / "d.jsonl"), "eval": str(tmp_path / "d.jsonl"), "max_length": 16}
    prepared = t2i.prepare_t2i(
        build({"stage": "t2i", "model": {"name_or_path": str(shifted)}, "data": data}), processor
    )
    want, _ = processor.condition(["a red thing", "a blue thing", "a green thing", "one"], 16)
    random.seed(3)
    got = [prepared.train[0]["encoder_hidden_states"] for _ in range(6)]
    random.seed(3)
    for states in got:
        torch.testing.assert_close(states, want["encoder_hidden_states"][random.choice([0, 1, 2])])
    torch.testing.assert_close(prepared.train[1]["encoder_hidden_states"], want["encoder_hidden_states"][3])
    torch.testing.assert_close(prepared.eval[0]["encoder_hidden_states"], want["encoder_hidden_states"][0])
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "0.png", "text": ["a thing", " "]}) + "\n")
    from deltatune.data.load import DataError

    with pytest.raises(DataError, match=r"d.jsonl:1: column 'text'\[1\] must be a non-empty caption, got ' '"):
        t2i.prepare_t2i(build({"stage": "t2i", "model": {"name_or_path": str(shifted)}, "data": data}), processor)
