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


def test_an_image_cls_list_label_names_stage_image_cls(tmp_path):
    """An image_cls data file with a list label was refused as "stage cls trains one class per row": the user ran
    stage image_cls; the line names it (and where multi-label rows go). Stage cls's line names cls, as before."""
    import numpy as np
    from PIL import Image

    from deltatune.data.tasks import label_map
    from deltatune.train.image_cls import prepare_image_cls

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "0.png")
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "0.png", "label": "a"}, {"image": "0.png", "label": ["a", "b"]}])
    with pytest.raises(DataError) as err:
        prepare_image_cls(build({"stage": "image_cls", "data": {"train": data}}), None)
    assert str(err.value) == (
        f"{data}:2: label in column 'label' is a list; stage image_cls trains one class per row: a class name (text) "
        "or a class id (a whole number); a list of them is a multi-label row (text classification only: stage cls)"
    )
    from deltatune.data.load import read_rows

    with pytest.raises(DataError, match=r":2: label in column 'label' is a list; stage cls trains one class per row"):
        label_map(read_rows(data), "label", None)
