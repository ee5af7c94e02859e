"""Stage t2i on scikit-learn's digits and a small random UNet conditioned by the real MiniLM: the denoising loss by
hand, both recipes for two steps (pre-train in full, merge, then LoRA), and ``generate --out`` against a sampling
loop run on the plain models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from deltatune.cli import main  # noqa: E402
from deltatune.data import digits  # noqa: E402
from deltatune.train import t2i  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
FAST = ["train.max_steps=2", "train.report_to=[none]", "train.batch_size=4", "train.logging_steps=1", "data.limit=8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    digits.write(str(out))
    digits.init_unet(str(out / "unet-init"))
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """The pre-training recipe (2 steps), its merge into a plain UNet folder, and the LoRA recipe (2 steps) on it."""
    tmp = tmp_path_factory.mktemp("t2i-runs")
    pre, base, lora = tmp / "pre", tmp / "base", tmp / "lora"
    args = [f"data.train={data / 't2i-pretrain-train.jsonl'}", f"data.eval={data / 't2i-pretrain-test.jsonl'}"]
    recipe = str(ROOT / "recipes" / "digits-t2i-pretrain.yaml")
    logs = "train.report_to=[tensorboard]"  # TensorBoard reads model.config; a diffusers one has no JSON writer
    assert (
        main(["train", recipe, f"model.name_or_path={data / 'unet-init'}", f"output.dir={pre}", *args, *FAST, logs])
        == 0
    )
    assert main(["merge", "--adapter", str(pre), "--out", str(base)]) == 0
    args = [f"data.train={data / 't2i-adapt-train.jsonl'}", f"data.eval={data / 't2i-adapt-test.jsonl'}"]
    recipe = str(ROOT / "recipes" / "digits-t2i-lora.yaml")
    assert main(["train", recipe, f"model.name_or_path={base}", f"output.dir={lora}", *args, *FAST,
                 "train.snr_gamma=5"]) == 0  # fmt: skip
    return {"pre": pre, "base": base, "lora": lora}


def test_both_recipes_run_two_steps_and_the_merged_base_names_its_text_encoder(runs):
    for name in ("pre", "lora"):
        metrics = json.loads((runs[name] / "metrics.json").read_text())
        assert metrics["train_steps"] == 2 and math.isfinite(metrics["eval_loss"]) and "eval_perplexity" not in metrics
    report = (runs["pre"] / "report.md").read_text()
    assert "8 training images with captions; text encoder minilm" in report
    assert "8 train images were resized, short side to 16 (lanczos)" in report  # the 8x8 digits
    assert "loss: DDPM, epsilon, min-SNR weighted (gamma 5)" in (runs["lora"] / "report.md").read_text()
    assert json.loads((runs["base"] / "t2i.json").read_text()) == {"text_encoder": "minilm"}
    assert (runs["base"] / "scheduler_config.json").is_file()
    config = json.loads((runs["lora"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_denoising_loss_by_hand(data, kind):
    from diffusers import DDPMScheduler

    unet = t2i.load_denoiser(str(data / "unet-init")).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.rand(3, 1, 16, 16, generator=g) * 2 - 1,
        "encoder_hidden_states": torch.randn(3, 4, 384, generator=g),
    }
    loss = t2i.denoising_loss(unet, scheduler, inputs, generator=torch.Generator().manual_seed(7))
    # the same draws, in the same order, by hand
    g = torch.Generator().manual_seed(7)
    x0 = inputs["pixel_values"]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = noise if kind == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    with torch.no_grad():
        pred = unet(noisy, t, encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("rescale", [False, True])
def test_min_snr_weights_are_diffusers(kind, rescale):
    """``train.snr_gamma``'s weights at every step are those of diffusers' training scripts (their ``compute_snr``,
    min(SNR, gamma) / SNR or / (SNR + 1)), on a zero-terminal-SNR schedule too: there v-prediction's weight is
    diffusers' 0 and epsilon's 1, the limit of the steps before it (diffusers' 0 / 0 is nan)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind, rescale_betas_zero_snr=rescale)
    t = torch.arange(1000)
    snr = compute_snr(scheduler, t)  # as in train_text_to_image_lora.py with --snr_gamma 5
    expected = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    expected = expected / snr if kind == "epsilon" else expected / (snr + 1)
    if kind == "epsilon":
        expected[snr == 0] = 1.0
    assert bool((snr == 0).any()) == rescale
    weights = t2i.min_snr_weights(scheduler, t, 5.0)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert weights.min() < 0.99  # the weighting does something


def test_min_snr_weighted_loss_by_hand(data):
    """The weighted loss: each image's mean squared error times its step's weight, averaged over the batch."""
    from diffusers import DDPMScheduler

    unet = t2i.load_denoiser(str(data / "unet-init")).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.rand(16, 1, 16, 16, generator=g) * 2 - 1,
        "encoder_hidden_states": torch.randn(16, 4, 384, generator=g),
    }
    loss = t2i.denoising_loss(unet, scheduler, inputs, generator=torch.Generator().manual_seed(7), snr_gamma=5.0)
    g = torch.Generator().manual_seed(7)  # the same draws, in the same order
    x0 = inputs["pixel_values"]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    abar = scheduler.alphas_cumprod[t]
    weight = torch.minimum(abar / (1 - abar), torch.tensor(5.0)) / (abar / (1 - abar))
    with torch.no_grad():
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    per_image = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (per_image * weight).mean(), atol=1e-6, rtol=1e-5)
    assert weight.min() < 0.99 and not torch.isclose(loss, per_image.mean())


def test_generate_draws_what_the_plain_models_draw(runs, tmp_path, capsys):
    """``generate --out --compare`` writes base | adapter; each half is the DDIM loop run on the plain UNets (the
    merged base, and the base with the LoRA merged), so the adapter is really applied and really switched off."""
    import numpy as np
    from PIL import Image

    from deltatune.train.run import load_adapter_model

    out = tmp_path / "seven.png"
    prompt = "a handwritten digit seven"
    assert main(["generate", "--adapter", str(runs["lora"]), "--prompt", prompt, "--out", str(out), "--steps", "4",
                 "--seed", "3", "--compare"]) == 0  # fmt: skip
    assert "base | adapter" in capsys.readouterr().out
    image = np.asarray(Image.open(out))
    assert image.shape == (16, 32)
    delta, processor = load_adapter_model(str(runs["lora"]))
    plain_lora = delta.merge_and_unload()
    plain_base = t2i.load_denoiser(str(runs["base"]))
    halves = [t2i.sample(m.eval(), processor, [prompt], steps=4, seed=3) for m in (plain_base, plain_lora)]
    want = (torch.cat([h[0, 0] for h in halves], dim=-1) * 255).round().to(torch.uint8).numpy()
    assert np.abs(image.astype(int) - want.astype(int)).max() <= 1  # float rounding at the merge
    assert not np.array_equal(image[:, :16], image[:, 16:])


def test_generate_draws_with_several_loras_weighted(runs, tmp_path, capsys):
    """``--adapter-weight 0.7 --lora FILE:0.4``: the run's LoRA and a diffusers file active at once, weighted, is the
    drawing of the library's ``set_adapters`` with the same weights (and not of the plain sum)."""
    import numpy as np
    from PIL import Image

    import deltatune as dt
    from deltatune.diffusion import load_lora, set_adapters
    from deltatune.train.run import load_adapter_model

    torch.manual_seed(5)
    config = dt.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    dt.save_diffusers_lora(dt.get_delta_model(t2i.load_denoiser(str(runs["base"])), config), tmp_path / "style")
    out, prompt = tmp_path / "mix.png", "a handwritten digit seven"
    assert main(["generate", "--adapter", str(runs["lora"]), "--prompt", prompt, "--out", str(out), "--steps", "3",
                 "--seed", "1", "--adapter-weight", "0.7", "--lora", f"{tmp_path / 'style'}:0.4"]) == 0  # fmt: skip
    delta, processor = load_adapter_model(str(runs["lora"]))
    load_lora(delta.eval(), tmp_path / "style", "style")
    drawn = {}
    for weights in ([0.7, 0.4], [1.0, 1.0]):
        set_adapters(delta, ["default", "style"], weights)
        image = t2i.sample(delta, processor, [prompt], steps=3, seed=1, max_length=16)[0, 0]
        drawn[weights[0]] = (image * 255).round().to(torch.uint8).numpy().astype(int)
    image = np.asarray(Image.open(out)).astype(int)
    assert np.abs(image - drawn[0.7]).max() <= 1 and np.abs(image - drawn[1.0]).max() > 1
    capsys.readouterr()  # a weight that is not a finite number: one line, no image (it drew a blank one)
    for flags, words in ((["--lora", f"{tmp_path / 'style'}:nan"], ":nan': the weight must be a finite number"),
                         (["--adapter-weight", "inf"], "--adapter-weight must be a finite number, got inf")):  # fmt: skip
        argv = [
            "generate",
            "--adapter",
            str(runs["lora"]),
            "--prompt",
            prompt,
            "--out",
            str(tmp_path / "x.png"),
            *flags,
        ]
        assert main(argv) == 2 and not (tmp_path / "x.png").exists()
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err


def test_generate_loads_a_files_text_encoder_part_as_diffusers_pipeline_does(runs, tmp_path):
    """``--lora FILE`` whose file holds denoiser and text-encoder keys (diffusers' ``unet.`` and ``text_encoder.``, a
    kohya file's ``lora_unet_`` and ``lora_te_``, as most community SD LoRAs): both parts load, each on its model, as
    ``pipe.load_lora_weights`` loads them, weighted on both; it was refused as 'keys that name no module'."""
    import numpy as np
    from PIL import Image

    import deltatune as dt
    from deltatune.diffusion import load_lora, set_adapters
    from deltatune.train.run import load_adapter_model

    torch.manual_seed(6)
    _, fresh = load_adapter_model(str(runs["lora"]))
    unet = dt.get_delta_model(
        t2i.load_denoiser(str(runs["base"])), dt.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False)
    )
    encoder = dt.get_delta_model(
        fresh.text_encoder, dt.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)
    )
    dt.save_diffusers_lora(unet, tmp_path / "both", text_encoder=encoder)
    out, prompt = tmp_path / "both.png", "a handwritten digit seven"
    assert main(["generate", "--adapter", str(runs["lora"]), "--prompt", prompt, "--out", str(out), "--steps", "3",
                 "--seed", "1", "--adapter-weight", "0.7", "--lora", f"{tmp_path / 'both'}:0.4"]) == 0  # fmt: skip
    delta, processor = load_adapter_model(str(runs["lora"]))
    load_lora(delta.eval(), tmp_path / "both", "style", prefix="unet")
    set_adapters(delta, ["default", "style"], [0.7, 0.4])
    drawn = {}
    for part in ("unet only", "both"):
        if part == "both":
            processor.text_encoder = load_lora(processor.text_encoder, tmp_path / "both", "style", "text_encoder")
            set_adapters(processor.text_encoder, ["style"], [0.4])
        image = t2i.sample(delta, processor, [prompt], steps=3, seed=1, max_length=16)[0, 0]
        drawn[part] = (image * 255).round().to(torch.uint8).numpy().astype(int)
    image = np.asarray(Image.open(out)).astype(int)
    assert np.abs(image - drawn["both"]).max() <= 1 and np.abs(image - drawn["unet only"]).max() > 1
    # a file with the text encoder's part alone loads there (diffusers warns that the UNet has none); was refused
    _, fresh = load_adapter_model(str(runs["lora"]))
    encoder = dt.get_delta_model(
        fresh.text_encoder, dt.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False)
    )
    from safetensors.torch import load_file, save_file

    dt.save_diffusers_lora(unet, tmp_path / "pair", text_encoder=encoder)
    tensors = load_file(tmp_path / "pair" / "pytorch_lora_weights.safetensors")
    (tmp_path / "te").mkdir()
    te_keys = {k: v for k, v in tensors.items() if k.startswith("text_encoder.")}
    save_file(te_keys, tmp_path / "te" / "pytorch_lora_weights.safetensors")
    assert main(["generate", "--adapter", str(runs["lora"]), "--prompt", prompt, "--out", str(out), "--steps", "3",
                 "--seed", "1", "--lora", f"{tmp_path / 'te'}:0.5"]) == 0  # fmt: skip
    delta, processor = load_adapter_model(str(runs["lora"]))
    processor.text_encoder = load_lora(processor.text_encoder, tmp_path / "te", "te", "text_encoder")
    set_adapters(processor.text_encoder, ["te"], [0.5])
    want = (t2i.sample(delta.eval(), processor, [prompt], steps=3, seed=1, max_length=16)[0, 0] * 255).round()
    assert np.abs(np.asarray(Image.open(out)).astype(int) - want.to(torch.uint8).numpy().astype(int)).max() <= 1


def test_a_caption_over_the_text_encoders_context_is_cut_and_counted(pipeline, data, tmp_path, capsys):
    """The tiny BERT reads 64 positions: with data.max_length=512 a longer caption is cut to 64 tokens (not passed on
    to fail in its position embeddings) and counted in the report, or refused in one line. The text encoder's LoRA
    trains on the cut tokens (BERT's attention projections)."""
    rows = (data / "t2i-adapt-train.jsonl").read_text().splitlines()[:3]
    long = {**json.loads(rows[0]), "text": "a handwritten digit seven " * 30}
    (data / "long.jsonl").write_text("\n".join([*rows, json.dumps(long)]) + "\n")
    argv = ["train", str(ROOT / "recipes" / "digits-t2i-lora.yaml"), f"model.name_or_path={pipeline}",
            f"data.train={data / 'long.jsonl'}", "data.eval=null", "data.max_length=512",
            "model.train_text_encoder=true", *FAST]  # fmt: skip
    assert main([*argv, f"output.dir={tmp_path / 'run'}"]) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "1 train captions were longer than the text encoder's context of 64 tokens and were cut" in report
    config = json.loads((tmp_path / "run" / "text_encoder_lora" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["attention.output.dense", "key", "query", "value"]
    capsys.readouterr()
    assert main([*argv, f"output.dir={tmp_path / 'refused'}", "data.truncation=refuse"]) == 2
    err = capsys.readouterr().err.strip()
    assert "long.jsonl: 1 captions are longer than the text encoder's context of 64 tokens" in err, err
    assert "Traceback" not in err


def test_bad_input_is_one_line(runs, data, tmp_path, capsys):
    cases = [
        (["generate", "--adapter", str(runs["pre"]), "--prompt", "a digit"], "draws images (stage t2i): pass --out"),
        (["generate", "--adapter", str(runs["lora"]), "--prompt", "a digit", "--out", str(tmp_path / "x.png"),
          "--lora", f"{tmp_path / 'missing'}:0.5"], "missing' does not exist"),
        (["train", str(ROOT / "recipes" / "digits-t2i-pretrain.yaml"), f"model.name_or_path={data / 'unet-init'}",
          f"output.dir={tmp_path / 'r'}", f"data.train={data / 't2i-pretrain-train.jsonl'}", "data.eval=null",
          "data.max_length=3", "data.truncation=refuse", *FAST], "captions are longer than data.max_length=3"),
        (["train", str(ROOT / "recipes" / "digits-t2i-lora.yaml"), f"output.dir={tmp_path / 's'}",
          "train.snr_gamma=-1"], "train.snr_gamma must be >= 0, got -1"),
    ]  # fmt: skip
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A diffusers pipeline folder: a tiny VAE (16x16 grayscale <-> 4x8x8 latents), a UNet on the latents, a DDPM
    scheduler, and a tiny BERT text encoder with its tokenizer (tests/tiny.py)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from tiny import latent_unet, save_tiny, tokenizer

    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    ).save_pretrained(root / "vae")  # fmt: skip
    latent_unet().save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction").save_pretrained(root / "scheduler")
    save_tiny(root / "text_encoder", "bert", "seq_cls")
    tokenizer().save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def test_a_pipelines_conditioning_is_diffusers_padded_and_unmasked(pipeline):
    """diffusers' pipelines and training script feed the UNet the prompt padded to the length, no mask; deltatune
    padded to the longest caption and masked (the UNet's output 0.20 off), so its LoRA trained on conditioning
    diffusers never gives."""
    processor = t2i.T2IProcessor(str(pipeline))
    text, _ = processor.condition(["a digit", "a handwritten digit seven"], 512)
    assert "encoder_attention_mask" not in text and text["encoder_hidden_states"].shape[1] == processor.context == 64
    ids = processor.tokenizer(["a digit"], padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        want = processor.text_encoder(ids["input_ids"])[0]
    torch.testing.assert_close(text["encoder_hidden_states"][:1], want, atol=1e-6, rtol=0)


def test_merge_of_a_run_on_a_pipeline_with_a_vae_is_refused_in_one_line(pipeline, data, tmp_path, capsys):
    """merge wrote the denoiser alone: the folder lost the pipeline's VAE, and training on it was a traceback."""
    run = tmp_path / "run"
    argv = ["train", str(ROOT / "recipes" / "digits-t2i-lora.yaml"), f"model.name_or_path={pipeline}",
            f"output.dir={run}", f"data.train={data / 't2i-adapt-train.jsonl'}", "data.eval=null", *FAST]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot merge: the run's base is a diffusers pipeline with a VAE" in err and "\n" not in err
    assert not (tmp_path / "merged").exists()


def test_a_pipeline_with_a_vae_trains_on_latents_and_draws_full_size_images(pipeline, data, tmp_path, capsys):
    processor = t2i.T2IProcessor(str(pipeline))
    assert processor.vae is not None and processor.size == 16 and processor.channels == 1
    # the loss on a batch: the VAE latent (scaled) is x0, v-prediction the target, by hand
    unet = t2i.load_denoiser(str(pipeline)).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.rand(2, 1, 16, 16, generator=g) * 2 - 1,
        "encoder_hidden_states": torch.randn(2, 3, 32, generator=g),
    }
    loss = t2i.denoising_loss(
        unet, processor.scheduler, inputs, processor.vae, generator=torch.Generator().manual_seed(5)
    )
    g = torch.Generator().manual_seed(5)
    vae = processor.vae
    with torch.no_grad():
        x0 = vae.encode(inputs["pixel_values"]).latent_dist.sample(g) * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 100, (2,), generator=g)
    abar = processor.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = unet(
            abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t, encoder_hidden_states=inputs["encoder_hidden_states"]
        ).sample
    torch.testing.assert_close(
        loss, ((pred - (abar.sqrt() * noise - (1 - abar).sqrt() * x0)) ** 2).mean(), atol=1e-6, rtol=1e-5
    )
    # two steps through the CLI, then a drawing at the VAE's full size
    run = tmp_path / "run"
    argv = ["train", str(ROOT / "recipes" / "digits-t2i-lora.yaml"), f"model.name_or_path={pipeline}", f"output.dir={run}",
            f"data.train={data / 't2i-adapt-train.jsonl'}", "data.eval=null", *FAST]  # fmt: skip
    assert main(argv) == 0
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(run),
                "--prompt",
                "a digit",
                "--out",
                str(tmp_path / "d.png"),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(tmp_path / "d.png").size == (16, 16)


@pytest.mark.parametrize("steps, guidance", [(0, 1.0), (4, -1.0), (4, math.nan), (4, math.inf)])
def test_sample_refuses_steps_and_guidance_that_give_no_image(steps, guidance):
    """The Python sampler checks what the CLI checks, before it touches the model (a nan guidance: nan pixels)."""
    from deltatune.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--steps must be >= 1 and --guidance a finite number >= 0"):
        t2i.sample(None, None, ["a digit"], steps=steps, guidance=guidance)
