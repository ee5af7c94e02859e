"""Probe 14 of stage t2i against diffusers 0.42.1: DreamBooth class images drawn by the local main process only
under torchrun (a deliberate difference: the script shares the drawing among its processes), the others waiting."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

pytest.importorskip("diffusers")

from pathlib import Path  # noqa: E402

from test_diffusion_probe12 import _class_folder, _prepare, data, pipeline  # noqa: E402,F401  (fixtures, helpers)

import deltatune as dt  # noqa: E402
from deltatune.config import ConfigError  # noqa: E402
from deltatune.train import t2i, t2i_prior  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "pytorch_lora_weights.safetensors"


def _no_drawing(*args, **kwargs):
    raise AssertionError("a process other than the local main one drew class images")


def test_a_process_other_than_the_local_main_one_waits_for_its_class_images(pipeline, data, tmp_path, monkeypatch):  # noqa: F811
    """LOCAL_RANK 1 of 2 with 1 class image of 3: it draws none (HEAD drew all missing ones in every process, each
    process writing the same names); it waits until the main process's two land, then reads all three."""
    folder = _class_folder(tmp_path, 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(t2i, "load_denoiser", _no_drawing)
    monkeypatch.setattr(t2i, "sample", _no_drawing)
    from PIL import Image

    def main_process() -> None:  # the local main process's drawings, landing late
        time.sleep(0.6)
        for i in (1, 2):
            Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"{i}-x.jpg")

    writer = threading.Thread(target=main_process)
    writer.start()
    try:
        _, prep = _prepare(
            pipeline, data, train__with_prior_preservation=True, data__class_data_dir=str(folder),
            data__class_prompt="a digit", data__num_class_images=3,
        )  # fmt: skip
    finally:
        writer.join()
    assert sorted(p.name for p in folder.iterdir()) == ["00.png", "1-x.jpg", "2-x.jpg"]
    assert any("prior preservation: 3 class images with 'a digit'" in n for n in prep.notes), prep.notes
    assert len(prep.train.pixels) == 3


def test_a_waiting_process_gives_up_with_one_line_naming_the_folder(tmp_path):
    folder = _class_folder(tmp_path, 1)
    with pytest.raises(ConfigError) as e:
        t2i_prior.wait_for_class_images(str(folder), 3, timeout=0.3, poll=0.05)
    assert str(e.value) == (
        f"data.class_data_dir {str(folder)!r}: waited 0.3 s for the local main process to draw 3 class images, found 1"
    )


def test_the_main_process_writes_each_class_image_whole_under_its_name(tmp_path, monkeypatch):
    """The local main process (LOCAL_RANK 0) draws; a file appears under its index-sha1.jpg name only through a
    rename of a whole, hidden file (written as .<name>.part), so a waiting process never counts half an image: at
    each rename the visible names are exactly the ones renamed before, and the file renamed is a whole JPEG. A
    direct write under the final name (no rename) fails here (review 14)."""
    from PIL import Image

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert t2i_prior.draws_here()
    seen: list[list[str]] = []
    renamed: list[str] = []
    real_replace = os.replace

    def visible() -> list[str]:
        return sorted(n for n in os.listdir(tmp_path) if not n.startswith("."))

    def replace(src, dst) -> None:
        assert visible() == sorted(renamed)  # (no final name has appeared but through a rename)
        assert os.path.basename(src) == f".{os.path.basename(dst)}.part" and not os.path.exists(dst)
        with Image.open(src) as img:
            assert img.format == "JPEG" and img.size == (8, 8)
            img.load()  # (the whole file decodes)
        real_replace(src, dst)
        renamed.append(os.path.basename(dst))

    monkeypatch.setattr(os, "replace", replace)

    def draw(prompts: list[str], seed: int) -> torch.Tensor:
        seen.append(visible())
        return torch.full((len(prompts), 3, 8, 8), 0.25 * (seed + 1))

    options = {"folder": str(tmp_path), "prompt": "a dog", "count": 5}
    assert t2i_prior.draw_class_images(draw, options, seed=0) == 5
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(renamed) and len(names) == 5, (names, renamed)
    assert [n.split("-")[0] for n in names] == ["0", "1", "2", "3", "4"]
    assert seen == [[], names[:4]]  # (batch 2 is drawn after batch 1's four files are whole)


# -- train.use_ema: diffusers' train_text_to_image.py --use_ema (EMAModel) ---------------------------------------------
def test_the_average_is_diffusers_ema_models_step_by_step():
    """Five optimizer steps on a module with a frozen weight: the callback's shadow equals EMAModel(params).step
    after each (decay 0 at step 1, then min((1 + j) / (10 + j), decay)), and on_train_end copies it in."""
    from diffusers.training_utils import EMAModel

    from deltatune.train.t2i_ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].weight.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    reference = EMAModel(trained, decay=0.5)
    ema = EMA(decay=0.5)
    ema.on_train_begin(None, None, None, model=model)
    for _ in range(5):
        with torch.no_grad():
            for p in trained:
                p.add_(torch.randn_like(p))
        ema.on_step_end(None, None, None, model=model)
        reference.step(trained)
        assert all(torch.equal(s, r) for s, r in zip(ema.shadow.values(), reference.shadow_params))
    assert ema.current_decay() == reference.get_decay(reference.optimization_step) == 5 / 14
    assert not torch.equal(trained[0], reference.shadow_params[0])
    ema.on_train_end(None, None, None, model=model)
    assert all(torch.equal(p, r) for p, r in zip(trained, reference.shadow_params))


def _ema_run(base, digits, out, steps: int = 3, resume: bool = False):
    from deltatune.train import run as run_module
    from deltatune.train.config import load_recipe

    cfg = load_recipe(str(ROOT / "recipes" / "digits-t2i-lora.yaml"),
                      [f"model.name_or_path={base}", f"data.train={digits / 't2i-adapt-train.jsonl'}",
                       "data.eval=null", "data.limit=4", f"train.max_steps={steps}", "train.batch_size=2",
                       "train.warmup_ratio=0", "train.lr=1e-2", "train.report_to=[none]", f"output.dir={out}",
                       "train.save_steps=1", "train.save_total_limit=5"])  # fmt: skip
    cfg.train.use_ema, cfg.train.ema_decay = True, 0.9
    run_module.train(cfg, resume=resume)


def test_a_run_with_use_ema_saves_the_average_of_its_steps(pipeline, data, tmp_path):  # noqa: F811
    """Three steps, a checkpoint each (the training weights, as the script's accelerator state): the run's adapter is
    diffusers' EMAModel stepped over the three checkpoints' weights (decays 0, 2/11, 3/12), not the last weights;
    each checkpoint's ema.safetensors holds the average so far and its step."""
    from diffusers.training_utils import EMAModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "run"
    _ema_run(pipeline, data, out)
    steps = [load_file(out / f"checkpoint-{k}" / "adapter_model.safetensors") for k in (1, 2, 3)]
    names = sorted(steps[0])
    shadow = [steps[0][n].clone() for n in names]  # (EMAModel copies the weights it starts from: step 1 replaces them)
    reference = EMAModel([torch.nn.Parameter(s) for s in shadow], decay=0.9)
    for k, weights in enumerate(steps, 1):
        reference.step([torch.nn.Parameter(weights[n]) for n in names])
        with safe_open(str(out / f"checkpoint-{k}" / "ema.safetensors"), "pt") as fh:
            assert fh.metadata()["optimization_step"] == str(k)
            saved = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        assert len(saved) == len(names)
        by_value = sorted(saved.values(), key=lambda t: (t.shape, t.sum().item()))
        want = sorted(reference.shadow_params, key=lambda t: (t.shape, t.sum().item()))
        assert max((a - b).abs().max().item() for a, b in zip(by_value, want)) <= 1e-7
    final = load_file(out / "adapter_model.safetensors")
    diff = max((final[n] - s).abs().max().item() for n, s in zip(names, reference.shadow_params))
    assert diff <= 1e-7, diff
    assert max((final[n] - steps[2][n]).abs().max().item() for n in names) > 1e-4  # (not the last weights)
    assert any(
        "weights averaged (EMA, decay up to 0.9)" in line for line in (out / "report.md").read_text().split("\n")
    )


def test_a_resumed_run_with_use_ema_averages_as_an_uninterrupted_one(pipeline, data, tmp_path):  # noqa: F811
    import shutil

    from safetensors.torch import load_file

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _ema_run(pipeline, data, whole)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoint-3")  # as if the run had stopped after its second checkpoint
    (resumed / "metrics.json").unlink()
    _ema_run(pipeline, data, resumed, resume=True)
    want, got = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("decay", [1.0, -0.1, "x", True])
def test_a_bad_ema_decay_is_one_line(decay):
    from types import SimpleNamespace

    from deltatune.train.t2i_ema import ema_decay

    with pytest.raises(ConfigError, match=r"^train.ema_decay must be a number in \[0, 1\), got "):
        ema_decay(SimpleNamespace(use_ema=True, ema_decay=decay))
    assert ema_decay(SimpleNamespace(use_ema=False, ema_decay=decay)) is None


# -- load_lora(hotswap=True): diffusers' load_lora_adapter(..., hotswap=True) -------------------------------------------
def _files(tmp_path):
    """Three diffusers-format files for the tiny UNet: a (r 4, alpha 8), b (r 4, alpha 2, other weights), c (r 2,
    alpha 4, only to_q and to_k: hotswap zeroes the rest)."""
    from diffusion.test_lora_files import lora

    a, b = lora(0), lora(1, lora_alpha=2)
    c = lora(2, r=2, lora_alpha=4, target_modules=["to_q", "to_k"])
    d = lora(3, r=8, lora_alpha=3, target_modules=["to_q", "to_k"])  # (a larger rank: new tensors)
    for model, name in ((a, "a"), (b, "b"), (c, "c"), (d, "d")):
        dt.save_diffusers_lora(model, tmp_path / name)
    return {n: str(tmp_path / n) for n in "abcd"}


@pytest.mark.parametrize("swap_in", ["b", "c", "d"])
def test_hotswap_gives_diffusers_hotswapped_outputs(tmp_path, swap_in):
    """unet.load_lora_adapter(a) then load_lora_adapter(b or c, hotswap=True) against dt.load_lora(..., hotswap=True):
    the same outputs (<= 1e-5), which are those of the swapped-in file loaded alone, under the same adapter name;
    HEAD's load_lora took no hotswap (a TypeError)."""
    from diffusion.test_lora_files import out, tiny_unet

    files = _files(tmp_path)
    theirs = tiny_unet()
    theirs.load_lora_adapter(files["a"], prefix="unet", adapter_name="default_0", weight_name=WEIGHTS)
    theirs.load_lora_adapter(
        files[swap_in], prefix="unet", adapter_name="default_0", weight_name=WEIGHTS, hotswap=True
    )
    ours = dt.load_lora(tiny_unet(), files["a"], adapter_name="default_0", prefix="unet")
    before = out(ours)
    assert dt.load_lora(ours, files[swap_in], adapter_name="default_0", prefix="unet", hotswap=True) is ours
    alone = out(dt.load_lora(tiny_unet(), files[swap_in], prefix="unet"))
    got, want = out(ours), out(theirs)
    assert (got - want).abs().max().item() <= 1e-5, (got - want).abs().max()
    assert (got - alone).abs().max().item() <= 1e-5
    assert (got - before).abs().max().item() > 1e-3  # (the swap changed the outputs)
    assert ours.active_adapters == ["default_0"] and list(ours.peft_config) == ["default_0"]
    dt.save_diffusers_lora(ours, tmp_path / "saved")  # (c: rank 2 padded to 4; its file keeps c's scales)
    again = out(dt.load_lora(tiny_unet(), str(tmp_path / "saved"), prefix="unet"))
    assert (again - alone).abs().max().item() <= 1e-5, (again - alone).abs().max()


def test_hotswap_refusals_are_one_line_and_change_nothing(tmp_path):
    from diffusion.test_lora_files import out, tiny_unet

    files = _files(tmp_path)
    ours = dt.load_lora(tiny_unet(), files["c"], prefix="unet")  # (to_q, to_k only)
    before = out(ours)
    with pytest.raises(ConfigError, match=r"hotswap cannot add modules: adapter 'default' does not adapt .*to_out\.0"):
        dt.load_lora(ours, files["a"], prefix="unet", hotswap=True)
    with pytest.raises(ConfigError, match=r"hotswap needs a loaded adapter 'x' to swap \(loaded: default\)$"):
        dt.load_lora(ours, files["c"], adapter_name="x", prefix="unet", hotswap=True)
    ours.merge_adapter()
    with pytest.raises(ConfigError, match=r"adapter 'default' is merged into the weights .*; unmerge it first$"):
        dt.load_lora(ours, files["c"], prefix="unet", hotswap=True)
    ours.unmerge_adapter()
    assert (out(ours) - before).abs().max().item() <= 1e-6


# -- train.validation_prompt: train_text_to_image_lora.py --validation_prompt / --num_validation_images ---------------
def test_validation_images_are_drawn_each_epoch_as_diffusers_pipeline_draws_them(pipeline, data, tmp_path):  # noqa: F811
    """Two epochs of 2 steps, train.validation_prompt with 2 images every epoch: validation/epoch-1.png and
    epoch-2.png; the last equals diffusers' StableDiffusionPipeline (DDIM, the run's pytorch_lora_weights loaded, 30
    steps, guidance 7.5, the same seeded latents) to a PNG's rounding, and differs from the first. HEAD drew none."""
    import numpy as np
    from diffusers import DDIMScheduler
    from PIL import Image
    from tiny import sd_pipeline

    from deltatune.train import run as run_module
    from deltatune.train.config import load_recipe

    out, prompt = tmp_path / "run", "a handwritten digit seven"
    cfg = load_recipe(str(ROOT / "recipes" / "digits-t2i-lora.yaml"),
                      [f"model.name_or_path={pipeline}", f"data.train={data / 't2i-adapt-train.jsonl'}",
                       "data.eval=null", "data.limit=4", "train.epochs=2", "train.max_steps=-1", "train.batch_size=2",
                       "train.warmup_ratio=0", "train.lr=1e-2", "train.report_to=[none]", f"output.dir={out}",
                       "train.seed=3", f"train.validation_prompt={prompt}", "train.num_validation_images=2"])  # fmt: skip
    run_module.train(cfg)
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["epoch-1.png", "epoch-2.png", "final.png"]
    pipe = sd_pipeline(pipeline, out)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        drawn = pipe([prompt] * 2, num_inference_steps=30, guidance_scale=7.5, latents=latents, output_type="latent")
    theirs = ((drawn.images.float() + 1) / 2).clamp(0, 1)
    theirs = (torch.cat(list(theirs), dim=-1)[0] * 255).round()  # (side by side, as the PNG)

    def png(name: str) -> torch.Tensor:
        return torch.tensor(np.asarray(Image.open(out / "validation" / name)), dtype=torch.float32)

    assert png("epoch-2.png").shape == (16, 32)
    assert (png("epoch-2.png") - theirs).abs().max().item() <= 1.0  # (one grey level: rounding)
    assert (png("epoch-2.png") - png("epoch-1.png")).abs().max().item() > 2.0  # (the LoRA moved between epochs)


@pytest.mark.parametrize(
    ("keys", "message"),
    [({"validation_prompt": ""}, "train.validation_prompt must be a non-empty string, got ''"),
     ({"validation_prompt": "a", "num_validation_images": 0}, "train.num_validation_images must be an integer >= 1, got 0"),
     ({"validation_prompt": "a", "validation_epochs": 1.5}, "train.validation_epochs must be an integer >= 1, got 1.5")],
)  # fmt: skip
def test_bad_validation_keys_are_one_line(keys, message):
    import dataclasses

    from deltatune.train.config_train import TrainArgs
    from deltatune.train.t2i_validation import validation_options

    with pytest.raises(ConfigError) as e:
        validation_options(dataclasses.replace(TrainArgs(), **keys))
    assert str(e.value) == message
    assert validation_options(TrainArgs()) is None
