"""benchmarks/vision.py in-process on a tiny ViT and a 3-class image folder: deltatune's and PEFT's LoRA train to
the same predictions with the same trainable count, and the table has a row per method."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import markdown_table, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "benchmarks"))
import vision  # noqa: E402

pytest.importorskip("peft")


def test_lora_beside_peft_and_table(tmp_path):
    from transformers import ViTImageProcessorPil

    base = tmp_path / "base"
    tiny_model("vit").save_pretrained(base)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(base)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b", "c"):
            (tmp_path / "adapt" / split / label).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(tmp_path / "adapt" / split / label / f"{i}.png")
    args = argparse.Namespace(base=str(base), data=str(tmp_path), epochs=4, batch_size=4, seed=0, threads=1, lr=None)
    rows = [vision.run_one(argparse.Namespace(**vars(args), method=m)) for m in ("lora r8 q,v", "lora r8 q,v (peft)")]
    ours, theirs = rows
    assert ours["trainable"] == theirs["trainable"] == 2 * 2 * 8 * (32 + 32) + 32 * 3 + 3  # r (d_in + d_out) + head
    assert ours["accuracy"] == theirs["accuracy"] and ours["steps"] == theirs["steps"] == 8
    text = vision.table(rows, args)
    table = markdown_table(text, text.splitlines()[0])
    assert table[0][:3] == ["method", "test accuracy", "macro-F1"]
    assert [r[0] for r in table[1:]] == ["lora r8 q,v", "lora r8 q,v (peft)"]
    assert table[1][3] == f"{ours['trainable']:,}"
