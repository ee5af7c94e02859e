"""Probe 25 of stage t2i against diffusers 0.42.1's train_dreambooth_lora.py: a DDPM base whose scheduler predicts
``sample`` (which the scripts' loss refuses, "Unknown prediction type") is refused before the class images are drawn,
as docs/diffusion.md promises of every key ("a refused run leaves the folder as it was"), not at the first step.
Fix 25 (review of f4b52e5): an SD3 base whose scheduler is a UniPC or DPMSolver flow_prediction config trains flow
matching with FlowMatchEulerDiscreteScheduler.from_pretrained of it, as train_dreambooth_lora_sd3.py; a run begun on
one before (train.prediction_type, DDPM) keeps DDPM; a scheduler config with prediction_type null is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from test_diffusion_probe12 import _prepare, pipeline  # noqa: E402,F401  (fixture)

from deltatune.config import ConfigError  # noqa: E402
from deltatune.train import t2i  # noqa: E402


def test_a_base_scheduler_predicting_sample_is_refused_before_any_class_image_is_drawn(pipeline, tmp_path):  # noqa: F811
    """HEAD: prepare_t2i drew the class image with the base and returned; the run refused at its first step."""
    from PIL import Image

    data = tmp_path / "data"  # (two images where _prepare reads the digits' t2i-adapt-train.jsonl)
    data.mkdir()
    for i in range(2):
        Image.new("L", (16, 16), 40 * i).save(data / f"{i}.png")
    rows = [json.dumps({"image": f"{i}.png", "text": f"a digit {i}"}) for i in range(2)]
    (data / "t2i-adapt-train.jsonl").write_text("\n".join(rows) + "\n")
    base = tmp_path / "base"
    shutil.copytree(pipeline, base)
    path = base / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "sample"}))
    folder = tmp_path / "class"
    keys = {"train__with_prior_preservation": True, "data__class_data_dir": str(folder),
            "data__class_prompt": "a digit", "data__num_class_images": 1}  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"^stage t2i: the base's scheduler predicts 'sample'.*train.prediction_type$"
    ):
        _prepare(base, data, **keys)
    assert not folder.exists() or not any(folder.iterdir())
    processor, _ = _prepare(base, data, train__prediction_type="epsilon")  # (the scripts' --prediction_type)
    assert processor.scheduler.config.prediction_type == "epsilon"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two 16x16 images with captions, where _prepare reads the digits' t2i-adapt-train.jsonl."""
    from PIL import Image

    data = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.new("L", (16, 16), 40 * i).save(data / f"{i}.png")
    rows = [json.dumps({"image": f"{i}.png", "text": f"a digit {i}"}) for i in range(2)]
    (data / "t2i-adapt-train.jsonl").write_text("\n".join(rows) + "\n")
    return data


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A bare tiny SD3 transformer folder (tests/diffusion/test_t2i_flow.py's) naming a tiny BERT encoder."""
    from diffusion.test_t2i_flow import tiny_sd3
    from tiny import save_tiny

    root = tmp_path_factory.mktemp("sd3")
    encoder = save_tiny(root / "bert", "bert", "seq_cls")
    tiny_sd3().save_pretrained(root / "sd3")
    (root / "sd3" / "t2i.json").write_text(json.dumps({"text_encoder": encoder}))
    return root / "sd3"


def _flow_base(sd3, tmp_path, kind):
    import diffusers

    base = tmp_path / kind
    shutil.copytree(sd3, base)
    getattr(diffusers, kind)(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_config(base)
    return base


@pytest.mark.parametrize("kind", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler"])
def test_a_flow_prediction_base_trains_flow_matching_as_the_sd3_script(sd3, images, tmp_path, kind):
    """f4b52e5: refused ("set train.prediction_type"), and with it set trained the SD3 transformer with the DDPM
    epsilon loss; the SD3 script's noise_scheduler is FlowMatchEulerDiscreteScheduler.from_pretrained(base)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = _flow_base(sd3, tmp_path, kind)
    processor, prepared = _prepare(base, images)
    theirs = FlowMatchEulerDiscreteScheduler.from_pretrained(base)  # (train_dreambooth_lora_sd3.py)
    assert processor.flow and type(processor.scheduler) is FlowMatchEulerDiscreteScheduler
    assert torch.equal(processor.scheduler.sigmas, theirs.sigmas)
    assert torch.equal(processor.scheduler.timesteps, theirs.timesteps)
    assert prepared.notes[1].startswith("loss: flow matching")


def test_a_run_begun_on_a_flow_prediction_base_with_prediction_type_keeps_ddpm(sd3, images, tmp_path):
    """Old run folders: a recipe (resume) or a run's saved scheduler config (generate, eval) naming epsilon on such
    a base trained DDPM with the base's DDPM scheduler; they load it as before, not flow matching."""
    from diffusers import DDPMScheduler

    base = _flow_base(sd3, tmp_path, "UniPCMultistepScheduler")
    before = DDPMScheduler.from_pretrained(base)  # (what t2i_base._scheduler read before)
    processor, prepared = _prepare(base, images, train__prediction_type="epsilon")
    assert not processor.flow and type(processor.scheduler) is DDPMScheduler
    assert torch.equal(processor.scheduler.alphas_cumprod, before.alphas_cumprod)
    assert prepared.notes[1] == "loss: DDPM, epsilon"
    run = tmp_path / "run"
    run.mkdir()
    processor.scheduler.save_config(run)  # (what the run saved)
    loaded = t2i.T2IProcessor(str(base))
    assert loaded.flow  # (the base alone: flow matching)
    loaded.use_run_scheduler(str(run))
    assert not loaded.flow and loaded.scheduler.config.prediction_type == "epsilon"


def test_a_scheduler_config_without_a_prediction_type_is_refused_in_one_line(pipeline, images, tmp_path):  # noqa: F811
    """f4b52e5: null slipped past; drawing then raised diffusers' "prediction_type given as None must be one of"."""
    base = tmp_path / "base"
    shutil.copytree(pipeline, base)
    path = base / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": None}))
    with pytest.raises(
        ConfigError, match=r"^stage t2i: the base's scheduler names no prediction_type.*prediction_type$"
    ):
        _prepare(base, images)
    processor, _ = _prepare(base, images, train__prediction_type="v_prediction")
    assert processor.scheduler.config.prediction_type == "v_prediction"


def test_the_ema_file_is_never_half_written(tmp_path, monkeypatch):
    """EMA.save wrote ema.safetensors in place: a save cut short (a kill, a full disk) left a cut file that the
    resume read as safetensors' traceback. Now written beside and renamed: the file is the last whole one, or none."""
    import safetensors.torch

    from deltatune.train.t2i_ema import EMA, EMA_FILE

    ema = EMA(decay=0.5)
    ema.shadow, ema.step = {"w": torch.ones(4)}, 3
    ema.save(str(tmp_path))
    whole = (tmp_path / EMA_FILE).read_bytes()

    def cut(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(whole[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", cut)
    ema.shadow = {"w": torch.zeros(4)}
    with pytest.raises(KeyboardInterrupt):
        ema.save(str(tmp_path))
    assert (tmp_path / EMA_FILE).read_bytes() == whole and sorted(p.name for p in tmp_path.iterdir()) == [EMA_FILE]
    loaded = EMA(decay=0.5)
    assert loaded.load(str(tmp_path)) and loaded.step == 3
    torch.testing.assert_close(loaded.shadow["w"], torch.ones(4))
