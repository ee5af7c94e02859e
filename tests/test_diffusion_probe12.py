"""Probe 12 of the diffusion side against diffusers 0.42: kohya's DoRA ``dora_scale`` keys dropped as diffusers drops
them, ``train.prediction_type`` and DreamBooth's prior preservation replayed by hand against diffusers' scripts
(``train_text_to_image_lora.py``, ``train_dreambooth_lora.py``)."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from diffusion.test_lora_files import out, tiny_unet  # noqa: E402
from tolerances import ATOL  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.train import t2i  # noqa: E402

ATOL32 = ATOL[torch.float32]
KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{}_to_{}"


def _kohya_dora_file(tmp_path) -> str:
    """A kohya file on the tiny UNet's attention projections with DoRA's ``dora_scale`` beside each module."""
    from safetensors.torch import save_file

    g, tensors = torch.Generator().manual_seed(3), {}
    for attn in (1, 2):
        for proj, width in (("q", 32), ("k", 32), ("v", 32)):
            key = KEY.format(attn, proj)
            tensors[f"{key}.lora_down.weight"] = torch.randn(2, width, generator=g) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(32, 2, generator=g) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
            tensors[f"{key}.dora_scale"] = torch.rand(1, 32, generator=g) + 0.5
    file = str(tmp_path / "kohya_dora.safetensors")
    save_file(tensors, file)
    return file


def test_a_kohya_dora_file_loads_as_diffusers_with_one_warning_naming_the_dropped_keys(tmp_path):
    """HEAD refused the file ("DoRA or LyCORIS parts"); diffusers' load_lora_weights drops the dora_scale keys with a
    warning and loads the LoRA: deltatune now does the same, with diffusers' outputs."""
    file = _kohya_dora_file(tmp_path)
    with pytest.warns(
        UserWarning, match=r"6 dora_scale keys dropped \(lora_unet_down_blocks_0_.*attn1_to_k\.dora_scale"
    ):
        ours = dt.load_lora(tiny_unet(), file)
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(file)  # (its logger warns, and drops them)
    assert not any("dora" in k or "magnitude" in k for k in state)
    theirs = tiny_unet()
    theirs.load_lora_adapter(state, network_alphas=alphas, prefix="unet")
    diff = (out(ours) - out(theirs)).abs().max().item()
    assert diff <= ATOL32 and not torch.allclose(out(ours), out(tiny_unet()), atol=1e-3), diff


def test_a_kohya_dora_file_with_a_text_encoder_part_warns_once_in_generate_lora(tmp_path):
    """``generate --lora`` loads a file's parts one by one; its dropped keys are named once, not once per part."""
    from diffusion.test_t2i_interop_more import tiny_clip
    from safetensors.torch import load_file, save_file

    from deltatune.diffusion import load_pipeline_loras

    file = _kohya_dora_file(tmp_path)
    tensors = load_file(file)
    clip = tiny_clip()
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    width = 32  # (its hidden size)
    tensors |= {f"{key}.lora_down.weight": torch.ones(2, width), f"{key}.lora_up.weight": torch.ones(width, 2) * 0.1,
                f"{key}.dora_scale": torch.ones(1, width)}  # fmt: skip
    save_file(tensors, file)
    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, target_modules=["to_q"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline_loras(model, clip, "unet", [file], [1.0])
    dropped = [w for w in caught if "dora_scale keys dropped" in str(w.message)]
    assert len(dropped) == 1 and "7 dora_scale keys" in str(dropped[0].message), [str(w.message) for w in caught]


# -- train.prediction_type and DreamBooth's prior preservation ----------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """tests/tiny.py's pipeline folder (16x16 grayscale UNet, DDPM epsilon scheduler of 100 steps, tiny CLIP)."""
    from tiny import save_text_to_image_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    save_text_to_image_pipeline(root)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from deltatune.data import digits

    out = tmp_path_factory.mktemp("digits")
    digits.write(str(out))
    return out


def _prepare(pipeline: Path, data: Path, **keys):
    """prepare_t2i on the LoRA recipe with ``keys`` (section__key: value) set on the built RunConfig, past the
    recipe's own checks: what prepare_t2i itself checks and reads."""
    from deltatune.train.config import load_recipe

    cfg = load_recipe(str(ROOT / "recipes" / "digits-t2i-lora.yaml"),
                      [f"model.name_or_path={pipeline}", f"data.train={data / 't2i-adapt-train.jsonl'}",
                       "data.eval=null", "data.limit=6"])  # fmt: skip
    for key, value in keys.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    processor = t2i.T2IProcessor(str(pipeline))
    return processor, t2i.prepare_t2i(cfg, processor)


def _hand_target(scheduler, x0, noise, t, kind):
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    return noise if kind == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0


@pytest.mark.parametrize("snr_gamma", [0.0, 5.0])
def test_train_prediction_type_v_on_an_epsilon_base_is_the_scripts_loss_by_hand(pipeline, data, snr_gamma):
    """train_text_to_image_lora.py --prediction_type v_prediction [--snr_gamma 5] on an epsilon base: the scheduler's
    prediction_type is registered as v_prediction, the target is the velocity, and min-SNR divides by SNR + 1.
    HEAD ignored the key: it trained against the noise (epsilon)."""
    from diffusers.training_utils import compute_snr

    processor, prep = _prepare(pipeline, data, train__prediction_type="v_prediction", train__snr_gamma=snr_gamma)
    scheduler = processor.scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert "loss: DDPM, v_prediction" in prep.notes[1]
    options = prep.trainer_class.keywords["loss_options"]
    batch = prep.collator([prep.train[i] for i in range(3)])
    unet = t2i.load_denoiser(str(pipeline)).eval()
    with torch.no_grad():
        loss = t2i.denoising_loss(unet, scheduler, batch, generator=torch.Generator().manual_seed(7), **options)
        g = torch.Generator().manual_seed(7)  # the script's draws: noise, then the steps
        x0 = batch["pixel_values"]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 100, (3,), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=batch["encoder_hidden_states"]).sample
    target = _hand_target(scheduler, x0, noise, t, "v_prediction")
    if snr_gamma:
        snr = compute_snr(scheduler, t)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / (snr + 1)
        want = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
    else:
        want = torch.nn.functional.mse_loss(pred.float(), target.float())
    assert (loss - want).abs().item() <= 1e-6 * want.item(), (loss, want)
    eps = torch.nn.functional.mse_loss(pred, noise)
    assert (eps - want).abs() > 1e-3  # (the epsilon loss HEAD computed is another number)


@pytest.mark.parametrize(
    ("keys", "message"),
    [({"train__prediction_type": "sample"}, "train.prediction_type must be one of epsilon, v_prediction, got 'sample'"),
     ({"train__with_prior_preservation": True}, "needs data.class_data_dir"),
     ({"train__with_prior_preservation": True, "data__class_data_dir": "x"}, "needs data.class_prompt"),
     ({"train__with_prior_preservation": True, "data__class_data_dir": "x", "data__class_prompt": "a digit",
       "train__prior_loss_weight": -1.0}, "train.prior_loss_weight must be a finite number >= 0, got -1.0")],
)  # fmt: skip
def test_bad_prediction_type_and_prior_keys_are_one_line(pipeline, data, keys, message):
    from deltatune.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        _prepare(pipeline, data, **keys)


def _class_folder(tmp_path: Path, n: int) -> Path:
    from PIL import Image

    folder = tmp_path / "class"
    folder.mkdir()
    g = torch.Generator().manual_seed(11)
    for i in range(n):
        pixels = (torch.rand(20, 20, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).convert("RGB").save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_prior_preservation_is_train_dreambooth_lora_pys_loss_by_hand(pipeline, data, tmp_path, weight):
    """train_dreambooth_lora.py --with_prior_preservation: the batch is the instances then their class images (the
    class prompt's states), noised as one; loss = mse(instance half) + prior_loss_weight * mse(class half)."""
    folder = _class_folder(tmp_path, 2)
    processor, prep = _prepare(
        pipeline, data, train__with_prior_preservation=True, train__prior_loss_weight=weight,
        data__class_data_dir=str(folder), data__class_prompt="a photo of a digit", data__num_class_images=2,
    )  # fmt: skip
    assert len(prep.train) == 6  # max(6 instances, 2 class images)
    assert any("prior preservation: 2 class images with 'a photo of a digit'" in n for n in prep.notes)
    batch = prep.collator([prep.train[i] for i in range(3)])
    assert batch["pixel_values"].shape[0] == 6 and int(batch["prior_split"]) == 3
    class_states = processor.condition(["a photo of a digit"], 16)[0]["encoder_hidden_states"]
    torch.testing.assert_close(batch["encoder_hidden_states"][3:], class_states.expand(3, -1, -1), atol=0, rtol=0)
    first = processor.pixels(Image.open(folder / "00.png"), processor.interpolation)
    torch.testing.assert_close(batch["pixel_values"][3], first, atol=0, rtol=0)  # instance 0's class image: 00.png
    torch.testing.assert_close(batch["pixel_values"][4], processor.pixels(Image.open(folder / "01.png")))
    torch.testing.assert_close(batch["pixel_values"][5], first, atol=0, rtol=0)  # (2 mod 2)
    options = prep.trainer_class.keywords["loss_options"]
    unet = t2i.load_denoiser(str(pipeline)).eval()
    with torch.no_grad():
        loss = t2i.denoising_loss(
            unet, processor.scheduler, batch, generator=torch.Generator().manual_seed(3), **options
        )
        g = torch.Generator().manual_seed(3)
        x0 = batch["pixel_values"]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 100, (6,), generator=g)
        noisy = processor.scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=batch["encoder_hidden_states"]).sample
    model_pred, model_pred_prior = torch.chunk(pred, 2, dim=0)  # the script's lines
    target, target_prior = torch.chunk(noise, 2, dim=0)
    want = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    want = want + weight * F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    assert (loss - want).abs().item() <= 1e-6 * want.item(), (loss, want)
    assert (F.mse_loss(pred, noise) - want).abs() > 1e-4 or weight != 1.0  # (not the plain mean of the batch)


def test_too_few_class_images_are_drawn_by_the_base_first(pipeline, data, tmp_path):
    """The script fills class_data_dir up to --num_class_images with the base pipeline's drawings of the class
    prompt (named index-sha1.jpg); then two steps train on instance + class batches."""
    folder = _class_folder(tmp_path, 1)
    processor, prep = _prepare(
        pipeline, data, train__with_prior_preservation=True, data__class_data_dir=str(folder),
        data__class_prompt="a digit", data__num_class_images=3,
    )  # fmt: skip
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 3 and files[0] == "00.png" and files[1].startswith("1-") and files[2].startswith("2-")
    assert any("3 class images (2 drawn by the base now)" in n for n in prep.notes)
    drawn = t2i.sample(t2i.load_denoiser(str(pipeline)), processor, ["a digit"], 50, 7.5, 0, 16)  # (the first)
    saved = torch.tensor(np.asarray(Image.open(folder / files[1]).convert("L")), dtype=torch.float32) / 255
    assert (saved - drawn[0, 0]).abs().mean() < 0.05  # (a JPEG of the base's first drawing)
    assert len(prep.train) == 6
    with torch.no_grad():
        unet = t2i.load_denoiser(str(pipeline))
        batch = prep.collator([prep.train[i] for i in range(4)])
        loss = t2i.denoising_loss(unet, processor.scheduler, batch, **prep.trainer_class.keywords["loss_options"])
    assert math.isfinite(loss.item())


def test_a_run_with_prior_v_prediction_and_the_text_encoder_loads_in_diffusers_pipeline_equal(
    pipeline, data, tmp_path
):
    """Two steps (no warm-up: the first step moves the LoRAs) of a run with prior preservation, v_prediction and
    model.train_text_encoder; diffusers' StableDiffusionPipeline.load_lora_weights on the run folder gives the
    text states (encode_prompt) and UNet outputs deltatune's reload gives, and the run records v_prediction."""
    from tiny import sd_pipeline

    from deltatune.train import run as run_module
    from deltatune.train.config import load_recipe

    out = tmp_path / "run"
    cfg = load_recipe(str(ROOT / "recipes" / "digits-t2i-lora.yaml"),
                      [f"model.name_or_path={pipeline}", f"data.train={data / 't2i-adapt-train.jsonl'}",
                       "data.eval=null", "data.limit=4", "train.max_steps=2", "train.batch_size=2",
                       "train.warmup_ratio=0", "train.report_to=[none]", f"output.dir={out}",
                       "model.train_text_encoder=true", "train.save_steps=2"])  # fmt: skip
    cfg.train.with_prior_preservation, cfg.train.prediction_type = True, "v_prediction"
    cfg.data.class_data_dir, cfg.data.class_prompt = str(_class_folder(tmp_path, 2)), "a digit"
    cfg.data.num_class_images = 2
    run_module.train(cfg)
    report = (out / "report.md").read_text()
    assert "loss: DDPM, v_prediction" in report and "prior preservation: 2 class images" in report
    assert json.loads((out / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    pipe = sd_pipeline(pipeline, out)
    delta, loaded = run_module.load_adapter_model(str(out))
    prompt = "a handwritten digit seven"
    text = loaded.condition([prompt], 16)[0]["encoder_hidden_states"]
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        theirs = pipe.unet(x, torch.tensor([40]), encoder_hidden_states=states).sample
        ours = delta.eval()(x, torch.tensor([40]), encoder_hidden_states=text).sample
    assert (states - text).abs().max().item() <= 1e-6 and (theirs - ours).abs().max().item() <= 1e-6
    with loaded.disable_adapter():
        assert (loaded.condition([prompt], 16)[0]["encoder_hidden_states"] - text).abs().max() > 1e-3
    assert loaded.scheduler.config.prediction_type == "v_prediction"  # run_load put the run's on the base's
    # A drawing: diffusers' pipeline (DDIM, v_prediction, the run's LoRAs) from the same latents, 4 steps, guidance
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    latents = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        drawn = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, latents=latents, output_type="latent").images
    theirs = ((drawn.float() + 1) / 2).clamp(0, 1)
    ours = t2i.sample(delta, loaded, [prompt], 4, 7.5, 0, 16)
    assert (ours - theirs).abs().max().item() <= 1e-5
    # its checkpoint (the same weights at step 2) holds no scheduler_config.json: it draws as its run trained too
    at, from_checkpoint = run_module.load_adapter_model(str(out / "checkpoint-2"))
    assert from_checkpoint.scheduler.config.prediction_type == "v_prediction"  # (HEAD: the base's epsilon)
    assert (t2i.sample(at.eval(), from_checkpoint, [prompt], 4, 7.5, 0, 16) - ours).abs().max().item() <= 1e-6


@pytest.mark.parametrize("sampling", ["uniform", "cosmap"])
def test_flow_matching_prior_preservation_is_the_sd3_scripts_loss_by_hand(sampling):
    """train_dreambooth_lora_sd3.py --with_prior_preservation: each half's weighted squared error, instance mean +
    prior_loss_weight * class mean. (The script multiplies each half by the whole batch's weighting, which
    broadcasts wrongly past one image per half; here each half takes its own images' weights, its intent.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from diffusion.test_t2i_flow import inputs as flow_inputs
    from diffusion.test_t2i_flow import tiny_sd3

    model, scheduler = tiny_sd3(), FlowMatchEulerDiscreteScheduler()
    batch = {k: torch.cat([v, v[:1]]) for k, v in flow_inputs().items()}  # 2 instances, 2 class rows
    batch["prior_split"] = torch.tensor(2)
    with torch.no_grad():
        loss = t2i.flow_matching_loss(model, scheduler, batch, generator=torch.Generator().manual_seed(5),
                                      sigma_sampling=sampling, prior_loss_weight=0.7)  # fmt: skip
        g = torch.Generator().manual_seed(5)
        x0 = batch["pixel_values"]
        noise = torch.randn(x0.shape, generator=g)
        u = compute_density_for_timestep_sampling("none", 4, generator=g)
        sigma = (1000 - (u * 1000).long()).float() / 1000
        s = sigma.view(4, 1, 1, 1)
        pred = model(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000,
                     encoder_hidden_states=batch["encoder_hidden_states"],
                     pooled_projections=batch["pooled_projections"]).sample  # fmt: skip
    weighting = compute_loss_weighting_for_sd3(sampling if sampling != "uniform" else "none", s)
    model_pred, model_pred_prior = torch.chunk(pred, 2, dim=0)
    target, target_prior = torch.chunk(noise - x0, 2, dim=0)
    w, w_prior = torch.chunk(weighting, 2, dim=0)
    prior = torch.mean((w_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2).reshape(2, -1), 1)
    want = torch.mean((w.float() * (model_pred.float() - target.float()) ** 2).reshape(2, -1), 1).mean()
    want = want + 0.7 * prior.mean()
    assert (loss - want).abs().item() <= 1e-5 * want.item(), (loss, want)


def test_bad_settings_are_refused_before_any_class_image_is_drawn(pipeline, data, tmp_path):
    """HEAD drew (and saved) the missing class images with the base and only then refused a bad
    train.prediction_type or an unreadable class image: the folder was changed by a refused run. Now nothing is
    drawn before all is checked."""
    from deltatune.config import ConfigError
    from deltatune.data.load import DataError

    prior = {"train__with_prior_preservation": True, "data__class_prompt": "a digit", "data__num_class_images": 2}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="train.prediction_type must be one of epsilon, v_prediction, got 'sample'"):
        _prepare(pipeline, data, train__prediction_type="sample", data__class_data_dir=str(empty), **prior)
    assert list(empty.iterdir()) == []
    folder = _class_folder(tmp_path, 1)
    (folder / "zz.png").write_text("not an image")
    with pytest.raises(DataError, match=r"zz\.png"):
        _prepare(pipeline, data, data__class_data_dir=str(folder), **{**prior, "data__num_class_images": 4})
    assert sorted(p.name for p in folder.iterdir()) == ["00.png", "zz.png"]


def test_a_class_data_dir_that_is_a_file_or_cannot_be_made_is_one_line(pipeline, data, tmp_path):
    """data.class_data_dir naming a file gave os.makedirs' FileExistsError traceback; a folder that cannot be made
    (here: under a file) gave its OSError. Now one ConfigError naming the key, before the base is loaded."""
    from deltatune.config import ConfigError

    file = tmp_path / "split.json"
    file.write_text("{}")
    prior = {"train__with_prior_preservation": True, "data__class_prompt": "a digit", "data__num_class_images": 1}
    with pytest.raises(ConfigError, match=r"data.class_data_dir '.*split.json' is a file: give a folder"):
        _prepare(pipeline, data, data__class_data_dir=str(file), **prior)
    with pytest.raises(ConfigError, match=r"data.class_data_dir '.*split.json/x': cannot make the folder"):
        _prepare(pipeline, data, data__class_data_dir=str(file / "x"), **prior)
    assert file.read_text() == "{}"


def test_ctrl_c_before_the_first_checkpoint_names_overwrite_the_folder_being_kept(pipeline, data, tmp_path,
                                                                                  monkeypatch, capsys):  # fmt: skip
    """A real run stopped (Ctrl-C) after its first step keeps its folder (run.yaml, stopped.json): a plain re-run is
    refused (it needs --overwrite) and --resume is refused (no checkpoint). HEAD's line said only "nothing to resume"
    and its docstring that the folder is not kept; the line now names --overwrite, which starts it again."""
    from deltatune.cli import main

    loss = t2i.T2ITrainer.compute_loss

    def interrupted(self, *args, **kwargs):  # after the first step (before it, the new folder is not kept)
        if self.state.global_step >= 1:
            raise KeyboardInterrupt
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(t2i.T2ITrainer, "compute_loss", interrupted)
    out = tmp_path / "run"
    argv = ["train", str(ROOT / "recipes" / "digits-t2i-lora.yaml"), f"model.name_or_path={pipeline}",
            f"data.train={data / 't2i-adapt-train.jsonl'}", "data.eval=null", "data.limit=4", "train.max_steps=2",
            "train.batch_size=2", "train.report_to=[none]", f"output.dir={out}"]  # fmt: skip
    line = (
        "deltatune train: interrupted before its first checkpoint; nothing to resume (--overwrite starts it again)\n"
    )
    assert main(argv) == 130 and capsys.readouterr().err.endswith(line)
    assert {"run.yaml", "stopped.json"} <= {p.name for p in out.iterdir()}
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # (the kept folder is refused)
    assert main([*argv, "--resume"]) == 2 and "no checkpoint" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 130 and capsys.readouterr().err.endswith(line)
