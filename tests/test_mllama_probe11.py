"""Probe 11 of the caption stage's batch for Llama 3.2 Vision (mllama): rows with different image counts."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from test_vision_probe11 import mllama  # noqa: E402

from deltatune.data.images import ImageRow  # noqa: E402
from deltatune.train import caption as C  # noqa: E402


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_mllama_rows_with_different_image_counts_batch_as_the_processor(tmp_path, order):
    """Two rows, 2 images and 1: the collated aspect_ratio_mask zero-padded the missing image as [0, 0], where the
    processor marks its tile 0 ([1, 0]); the logits then differed. Now every tensor equals the processor's batch
    (torch.equal) and so do the logits."""
    model, processor = mllama()
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(16, 32), (16, 16), (32, 16)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(paths[-1])
    ex = [
        C.VLMExample("c.jsonl:1", [ImageRow(paths[0], None, "c.jsonl:1"), ImageRow(paths[1], None, "c.jsonl:1")],
                     [{"role": "user", "content": f"<image><image>\n{C.CAPTION_PROMPT}"},
                      {"role": "assistant", "content": "a handwritten seven"}]),
        C.VLMExample("c.jsonl:2", [ImageRow(paths[2], None, "c.jsonl:2")],
                     [{"role": "user", "content": f"describe this <image>\n{C.CAPTION_PROMPT}"},
                      {"role": "assistant", "content": "a thin two strokes now"}]),
    ]  # fmt: skip
    vlm = C.VLMProcessor(processor)
    ds = C.VLMDataset(ex, [C.encode_vlm(vlm, e, 512)[:2] for e in ex], vlm)
    batch = C.collate_vlm([ds[i] for i in order], vlm.pad_token_id)
    rendered = [C.render_vlm(vlm, ex[i].messages) for i in order]
    images = [[Image.open(r.path).convert("RGB") for r in ex[i].images] for i in order]
    ref = processor(text=[r[0] for r in rendered], images=images, padding=True, padding_side="right",
                    add_special_tokens=rendered[0][2], return_tensors="pt")  # fmt: skip
    assert ref["aspect_ratio_mask"][order.index(1), 1].tolist() == [1, 0]  # the padded image's tile 0
    for key in ref:
        assert torch.equal(batch[key], ref[key]), key
    with torch.no_grad():
        ours = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert torch.equal(ours, model(**ref).logits)
