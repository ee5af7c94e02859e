"""Probe 25 of stage t2i against diffusers 0.42.1's train_dreambooth_lora.py: a DDPM base whose scheduler predicts
``sample`` (which the scripts' loss refuses, "Unknown prediction type") is refused before the class images are drawn,
as docs/diffusion.md promises of every key ("a refused run leaves the folder as it was"), not at the first step."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("diffusers")

from test_diffusion_probe12 import _prepare, pipeline  # noqa: E402,F401  (fixture)

from deltatune.config import ConfigError  # noqa: E402


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
