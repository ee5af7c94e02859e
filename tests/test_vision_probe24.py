"""Stage image_cls probes (session 59): image folders as datasets' ``imagefolder`` reads them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deltatune.data import images as I
from deltatune.data.load import DataError


def _tree(root, splits=("train", "test"), classes=("cat", "dog")):
    for s in splits:
        for c in classes:
            (root / s / c).mkdir(parents=True)
            for k in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(root / s / c / f"{k}.png")


@pytest.mark.parametrize("splits", [("train", "test"), ("train",), ("Training", "val")])
def test_a_folder_of_split_folders_is_refused_naming_them_where_datasets_reads_splits(splits, tmp_path):
    """datasets' imagefolder reads ``root/train/cat/x.png`` as split train, class cat; read as class folders the
    splits were the classes ('test', 'train'), silently mixing the test images into training."""
    datasets = pytest.importorskip("datasets")
    _tree(tmp_path / "d", splits)
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "d"))
    assert all(part.features["label"].names == ["cat", "dog"] for part in ds.values())  # splits, not classes
    with pytest.raises(DataError) as err:
        I.read_image_rows(str(tmp_path / "d"))
    said = str(err.value)
    assert "\n" not in said and repr(splits[0]) in said and str(tmp_path / "d" / splits[0]) in said


def test_class_folders_named_like_splits_that_hold_their_images_are_still_classes(tmp_path):
    """A class folder called 'test' with its images in it (datasets' imagefolder reads no split from a folder
    without sub-folders either way) and a class with nested batches (torchvision's reading) stay as they were."""
    _tree(tmp_path / "d", ("a",), ("test", "dog"))
    (tmp_path / "d" / "a" / "dog" / "batch1").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "a" / "dog" / "batch1" / "x.png")
    rows = I.read_image_rows(str(tmp_path / "d" / "a"))
    assert sorted({r.label for r in rows}) == ["dog", "test"] and len(rows) == 5


def test_a_parquet_files_class_label_names_are_the_classes_as_datasets_reads_them(tmp_path):
    """``Dataset.to_parquet`` saves a ClassLabel column's names in the schema; ``load_dataset("parquet")`` reads them
    back and transformers' script takes label2id / id2label from them. The stage read the ids alone: classes '0', '2'
    (a head of 2 for 3 classes, the eval's 'dog' refused, id2label without the names)."""
    datasets = pytest.importorskip("datasets")
    from deltatune.train.config import build
    from deltatune.train.image_cls import prepare_image_cls

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])})
    images = [Image.new("RGB", (8, 8), (40 * k, 9, 9)) for k in range(4)]
    for name, ids in (("train", [0, 2, 0, 2]), ("eval", [1, 0, 2, 1])):
        ds = datasets.Dataset.from_dict({"image": images, "label": ids}, features=feats)
        ds.to_parquet(str(tmp_path / f"{name}.parquet"))
    ref = datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "train.parquet")})["train"]
    from transformers import ViTConfig

    ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "vit"
    )
    data = {"train": str(tmp_path / "train.parquet"), "eval": str(tmp_path / "eval.parquet")}
    cfg = build({"stage": "image_cls", "model": {"name_or_path": str(tmp_path / "vit")}, "data": data})
    p = prepare_image_cls(cfg, processor=None)
    assert p.labels == ref.features["label"].names == ["cat", "dog", "eel"]
    assert p.train.labels == [0, 2, 0, 2] and p.eval.labels == [1, 0, 2, 1]  # the stored ids, as datasets keeps them


def test_an_image_folders_images_are_those_datasets_imagefolder_reads(tmp_path):
    """A class folder's .jfif / .jpe (JPEG, Windows' and the web's saves), .pbm / .pnm, .tga, .ico and .apng images:
    datasets' imagefolder reads them, the stage skipped them without a word (its list was torchvision's)."""
    datasets = pytest.importorskip("datasets")
    formats = {".png": "PNG", ".jfif": "JPEG", ".jpe": "JPEG", ".pnm": "PPM", ".tga": "TGA", ".ico": "ICO"}
    for c, ext in [("a", ".png"), ("a", ".jfif"), ("a", ".jpe"), ("b", ".png"), ("b", ".pnm"), ("b", ".tga")]:
        (tmp_path / "d" / c).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (9, 99, 9)).save(tmp_path / "d" / c / f"x{ext}", formats[ext])
    Image.new("1", (8, 8)).save(tmp_path / "d" / "b" / "y.pbm", "PPM")
    Image.new("RGB", (16, 16)).save(tmp_path / "d" / "b" / "z.ico", "ICO")
    (tmp_path / "d" / "b" / "notes.txt").write_text("not an image")
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "d"), split="train")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    names = ds.features["label"].names
    want = sorted((e["image"]["path"], names[e["label"]]) for e in ds)
    rows = I.read_image_rows(str(tmp_path / "d"))
    assert sorted((r.path, r.label) for r in rows) == want and len(want) == 8
    assert I.check(rows) == {"1": 1}  # each one opens (the .pbm is bilevel)
