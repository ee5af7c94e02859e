"""Session 53's lead fixes, each shown failing on the file before it (probe round 18)."""

from __future__ import annotations

import json

import pytest

from deltatune.data.load import DataError
from deltatune.train.config import build


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_images_a_processor_leaves_of_different_sizes_are_one_line_not_a_stack_traceback(tmp_path):
    """A processor that does not resize (do_resize false) gives each image its own size: torch.stack's "stack
    expects each tensor to be equal size" came from inside the Trainer's first batch; it is one line naming the
    sizes and the processor keys to set. Images of one size stack as before."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTImageProcessorPil

    from deltatune.data.images import collate
    from deltatune.train.image_cls import prepare_image_cls

    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(10, 12), (8, 8), (10, 12)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = _jsonl(tmp_path / "d.jsonl", [{"image": f"{i}.png", "label": "aba"[i]} for i in range(3)])
    cfg = build({"stage": "image_cls", "data": {"train": data}})
    p = prepare_image_cls(cfg, ViTImageProcessorPil(do_resize=False))
    with pytest.raises(DataError) as err:
        collate([p.train[0], p.train[1]])
    assert str(err.value) == (
        "the image processor gives images of different sizes in one batch (3x8x8 and 3x10x12): set its size (with "
        "do_resize, or do_center_crop and crop_size) so that every image comes out one size"
    )
    same = collate([p.train[0], p.train[2]])
    assert same["pixel_values"].shape == (2, 3, 10, 12) and same["labels"].tolist() == [0, 0]
    assert torch.equal(same["pixel_values"][0], p.train[0]["pixel_values"])
