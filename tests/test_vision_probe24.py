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
