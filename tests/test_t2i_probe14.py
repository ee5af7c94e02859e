"""Probe 14 of stage t2i against diffusers 0.42.1: DreamBooth class images drawn by the local main process only
under torchrun (the script's ``accelerator.is_local_main_process``), the other processes waiting for them."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

pytest.importorskip("diffusers")

from test_diffusion_probe12 import _class_folder, _prepare, data, pipeline  # noqa: E402,F401  (fixtures, helpers)

from deltatune.config import ConfigError  # noqa: E402
from deltatune.train import t2i, t2i_prior  # noqa: E402


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
    """The local main process (LOCAL_RANK 0) draws; a file appears under its index-sha1.jpg name only once whole
    (written under a hidden .part name, then renamed), so a waiting process never counts half an image."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert t2i_prior.draws_here()
    seen: list[list[str]] = []

    def draw(prompts: list[str], seed: int) -> torch.Tensor:
        seen.append(sorted(os.listdir(tmp_path)))
        return torch.full((len(prompts), 3, 8, 8), 0.25 * (seed + 1))

    options = {"folder": str(tmp_path), "prompt": "a dog", "count": 5}
    assert t2i_prior.draw_class_images(draw, options, seed=0) == 5
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 5 and not any(n.startswith(".") for n in names), names
    assert [n.split("-")[0] for n in names] == ["0", "1", "2", "3", "4"]
    assert seen == [[], names[:4]]  # (batch 2 is drawn after batch 1's four files are whole)
