"""Stage image_cls probes (session 59): image folders as datasets' ``imagefolder`` reads them."""

from __future__ import annotations

import os

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


def _split_folders(datasets, root) -> dict[str, str]:
    """The top folders datasets' imagefolder reads as splits (its data_files patterns), folder -> split."""
    from datasets import data_files as df

    patterns = df.get_data_patterns(str(root))
    if patterns == {"train": ["**"]}:  # no split named: every file is train's
        return {}
    resolved = df.DataFilesDict.from_patterns(patterns, base_path=str(root))
    return {os.path.relpath(f, root).split(os.sep)[0]: str(s) for s, files in resolved.items() for f in files}


@pytest.mark.parametrize(
    "splits",
    [("train", "test"), ("train",), ("training_set", "test_set"), ("train-1", "test-1"), ("Training", "val")],
)
def test_a_folder_of_split_folders_is_refused_naming_those_datasets_reads_as_splits(splits, tmp_path):
    """datasets' imagefolder reads ``root/train/cat/x.png`` as split train, class cat (and 'training_set', 'test-1'
    as its data_files patterns match them, case-sensitive: 'Training' is none); read as class folders the splits
    were the classes ('test', 'train'), silently mixing the test images into training."""
    datasets = pytest.importorskip("datasets")
    _tree(tmp_path / "d", splits)
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "d"))
    assert all(part.features["label"].names == ["cat", "dog"] for part in ds.values())  # splits, not classes
    read = _split_folders(datasets, tmp_path / "d")
    with pytest.raises(DataError) as err:
        I.read_image_rows(str(tmp_path / "d"))
    said = str(err.value)
    assert "\n" not in said and {s for s in splits if repr(s) in said.split("(")[1]} == set(read)
    train = [f for f, s in read.items() if s == "train"]
    if train:  # the hint names the train split, else none
        assert f"data.train: {str(tmp_path / 'd' / train[0])!r}" in said
    else:
        assert "data.train / data.eval" in said and "data.train: '" not in said


def test_a_split_folder_beside_hidden_files_is_still_a_split(tmp_path):
    """macOS's ``._x.png`` beside a split's class folders is no image (skipped everywhere else): 'train' stayed a
    class, 'test' alone was refused, with the hint data.train: 'd/test'."""
    datasets = pytest.importorskip("datasets")
    _tree(tmp_path / "d")
    (tmp_path / "d" / "train" / "._x.png").write_bytes(b"\0\0")
    assert _split_folders(datasets, tmp_path / "d") == {"train": "train", "test": "test"}
    with pytest.raises(
        DataError, match=r"\('test', 'train'\).*data\.train: '[^']*/d/train', data\.eval: '[^']*/d/test'"
    ):
        I.read_image_rows(str(tmp_path / "d"))


@pytest.mark.parametrize("names", [("Train", "Test"), ("pretrain", "testx")])
def test_folders_datasets_reads_no_split_from_are_classes(names, tmp_path):
    """Names datasets' patterns do not match (case-sensitive; a keyword between ``-._ 0-9`` only) are classes."""
    datasets = pytest.importorskip("datasets")
    _tree(tmp_path / "d", names)
    assert _split_folders(datasets, tmp_path / "d") == {}
    rows = I.read_image_rows(str(tmp_path / "d"))
    assert sorted({r.label for r in rows}) == sorted(names) and len(rows) == 8


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


def _class_label_parquet(datasets, path, names, ids):
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    images = [Image.new("RGB", (8, 8), (40 * k, 9, 9)) for k in range(len(ids))]
    datasets.Dataset.from_dict({"image": images, "label": ids}, features=feats).to_parquet(str(path))
    return datasets.load_dataset("parquet", data_files=str(path), split="train")


def _prepare(tmp_path, data, run=None, resume=False):
    """prepare_image_cls of a new run; with ``run``, as ``deltatune eval`` of that run folder (or checkpoint) reads
    its data (``trained_run``), or with ``resume`` as ``--resume`` into it (``output.dir``)."""
    from transformers import ViTConfig

    from deltatune.train.config import build
    from deltatune.train.image_cls import prepare_image_cls

    config = ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    config.save_pretrained(tmp_path / "vit")
    recipe = {"stage": "image_cls", "model": {"name_or_path": str(tmp_path / "vit")}, "data": data}
    cfg = build(recipe | ({"output": {"dir": str(run)}} if resume else {}))
    if run is not None:
        cfg.trained_run = True if resume else str(run)
    return prepare_image_cls(cfg, processor=None)


def test_class_label_names_that_are_numbers_name_the_stored_ids(tmp_path):
    """ClassLabel names '1', '2', '3': each stored value is an id (datasets' int2str), never a name. Read as names,
    ids [1, 2, 2, 1] trained as classes '1', '2' (every row one off) and an id 0 was refused."""
    datasets = pytest.importorskip("datasets")
    names = ["1", "2", "3"]
    ref = {s: _class_label_parquet(datasets, tmp_path / f"{s}.parquet", names, ids)
           for s, ids in (("train", [1, 2, 2, 1]), ("eval", [0, 1, 2, 1]))}  # fmt: skip
    p = _prepare(tmp_path, {s: str(tmp_path / f"{s}.parquet") for s in ref})
    assert p.labels == ref["train"].features["label"].names == names
    for split, part in (("train", p.train), ("eval", p.eval)):
        feature = ref[split].features["label"]
        assert [p.labels[i] for i in part.labels] == [feature.int2str(i) for i in ref[split]["label"]]


def test_class_label_no_label_is_refused_naming_the_row(tmp_path):
    """-1 is datasets' ClassLabel "no label": refused in one line naming the file and row, as such."""
    datasets = pytest.importorskip("datasets")
    _class_label_parquet(datasets, tmp_path / "d.parquet", ["cat", "dog"], [0, 1, -1, 1])
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, {"train": str(tmp_path / "d.parquet")})
    said = str(err.value)
    assert "\n" not in said and said.startswith(f"{tmp_path / 'd.parquet'}[2]: label -1") and "no label" in said


def test_class_label_names_of_a_row_range_and_of_an_eval_file(tmp_path):
    """``d.parquet[:4]`` names its file's classes as ``d.parquet`` does (it read classes '0', '2'); an eval file's
    ids are its own ClassLabel's names (``int2str``), in another order too, and one naming a class the train file
    does not is refused (its ids were read as the train file's classes)."""
    datasets = pytest.importorskip("datasets")
    ref = _class_label_parquet(datasets, tmp_path / "d.parquet", ["cat", "dog", "eel"], [0, 2, 0, 2, 1])
    p = _prepare(tmp_path, {"train": f"{tmp_path / 'd.parquet'}[:4]"})
    assert p.labels == ref.features["label"].names and p.train.labels == ref["label"][:4]
    other = _class_label_parquet(datasets, tmp_path / "e.parquet", ["dog", "cat", "eel"], [0, 1, 2, 0])
    p = _prepare(tmp_path, {"train": str(tmp_path / "d.parquet"), "eval": str(tmp_path / "e.parquet")})
    assert [p.labels[i] for i in p.eval.labels] == [other.features["label"].int2str(i) for i in other["label"]]
    _class_label_parquet(datasets, tmp_path / "f.parquet", ["cat", "fox"], [0, 1])
    with pytest.raises(DataError, match=r"f\.parquet: its ClassLabel column 'label' names the classes \['cat', 'fox'"):
        _prepare(tmp_path, {"train": str(tmp_path / "d.parquet"), "eval": str(tmp_path / "f.parquet")})


def test_data_labels_over_a_class_label_file(tmp_path):
    """data.labels (a run's recorded classes, as evaluation reads its data) naming the file's classes in another
    order: each id read by its own name (it was read as an index of data.labels); naming none of them: each id
    renamed; naming some: refused."""
    datasets = pytest.importorskip("datasets")
    ref = _class_label_parquet(datasets, tmp_path / "d.parquet", ["cat", "dog", "eel"], [0, 2, 0, 2, 1])
    data = {"train": str(tmp_path / "d.parquet")}
    p = _prepare(tmp_path, data | {"labels": ["eel", "dog", "cat"]})
    assert [p.labels[i] for i in p.train.labels] == [ref.features["label"].int2str(i) for i in ref["label"]]
    p = _prepare(tmp_path, data | {"labels": ["a", "b", "c"]})
    assert p.labels == ["a", "b", "c"] and p.train.labels == ref["label"]
    with pytest.raises(DataError, match=r"names the classes \['cat', 'dog', 'eel'\], not all among"):
        _prepare(tmp_path, data | {"labels": ["cat", "b", "c"]})


def test_data_labels_naming_split_named_folders_reads_them_as_classes(tmp_path):
    """Classes called 'train' and 'test' holding batch folders (torchvision's reading) were refused with no way
    round; data.labels naming them says they are classes."""
    _tree(tmp_path / "d", ("train", "test"), ("batch1", "batch2"))
    with pytest.raises(DataError, match="or data.labels naming them, if they are classes"):
        _prepare(tmp_path, {"train": str(tmp_path / "d")})
    p = _prepare(tmp_path, {"train": str(tmp_path / "d"), "labels": ["test", "train"]})
    assert p.labels == ["test", "train"] and sorted(p.train.labels) == [0] * 4 + [1] * 4


def _run_folder(path, labels, marked):
    """A run folder as ``deltatune train`` leaves one: run.yaml (its recorded data.labels), marks where it began since
    the mark (runs.mark_run), a checkpoint."""
    import yaml

    from deltatune.train import runs

    (path / "checkpoint-2").mkdir(parents=True)
    (path / "run.yaml").write_text(yaml.safe_dump({"stage": "image_cls", "data": {"labels": labels}}))
    if marked:
        runs.mark_run(str(path))
    return path


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_begun_before_the_class_label_names_reads_its_file_as_it_trained(resume, tmp_path):
    """A run begun before 50e111e / 1706f15 (no image_cls_class_label mark) recorded data.labels naming its
    classes in id order (it read each ClassLabel value as an index of data.labels). Its eval / --resume read the
    file so: [dog, cat] over ClassLabel ['cat', 'dog'] was read by name (every row the other class: eval_accuracy
    1.0 -> 0.0, a resume training the swapped labels into the head); ['0', '1'] over names ['1', '2'] was refused."""
    datasets = pytest.importorskip("datasets")
    ids = [0, 1, 1, 0]
    _class_label_parquet(datasets, tmp_path / "d.parquet", ["cat", "dog"], ids)
    data = {"train": str(tmp_path / "d.parquet"), "labels": ["dog", "cat"]}
    old = _run_folder(tmp_path / "old", ["dog", "cat"], marked=False)
    where = old if resume else old / "checkpoint-2"
    p = _prepare(tmp_path, data, where, resume)
    assert p.labels == ["dog", "cat"] and p.train.labels == ids  # (each value an index of the recorded labels)
    assert "no image_cls_class_label mark" in p.notes[0]
    _class_label_parquet(datasets, tmp_path / "n.parquet", ["1", "2"], ids)
    p = _prepare(tmp_path, {"train": str(tmp_path / "n.parquet"), "labels": ["0", "1"]}, where, resume)
    assert p.labels == ["0", "1"] and p.train.labels == ids
    # a run begun since (marked): by the file's names, as datasets' int2str / str2int
    new = _run_folder(tmp_path / "new", ["dog", "cat"], marked=True)
    p = _prepare(tmp_path, data, new, resume)
    ref = datasets.load_dataset("parquet", data_files=str(tmp_path / "d.parquet"), split="train").features["label"]
    assert p.train.labels == [["dog", "cat"].index(ref.int2str(i)) for i in ids]
    assert not any("mark" in n for n in p.notes)


def test_a_run_begun_now_is_marked_as_reading_class_label_names(tmp_path):
    from deltatune.train import runs

    old, new = _run_folder(tmp_path / "old", ["a", "b"], False), _run_folder(tmp_path / "new", ["a", "b"], True)
    assert not runs.class_label_trained(str(old / "checkpoint-2")) and runs.class_label_trained(str(new))
    assert runs.class_label_trained(str(tmp_path))  # (no run folder: a new run's reading)


def test_an_eval_file_of_the_renamed_classes_in_another_order(tmp_path):
    """data.labels [a, b] renaming ClassLabel ['cat', 'dog'] id by id, an eval file whose ClassLabel is ['dog',
    'cat']: each eval id is its own name's class (datasets' int2str then the train file's str2int), renamed; it was
    refused asking for data.labels naming them all, which a rename cannot do."""
    datasets = pytest.importorskip("datasets")
    train = _class_label_parquet(datasets, tmp_path / "d.parquet", ["cat", "dog"], [0, 1, 1, 0]).features["label"]
    ev = _class_label_parquet(datasets, tmp_path / "e.parquet", ["dog", "cat"], [0, 0, 1, 1])
    data = {"train": str(tmp_path / "d.parquet"), "eval": str(tmp_path / "e.parquet"), "labels": ["a", "b"]}
    p = _prepare(tmp_path, data)
    assert p.labels == ["a", "b"] and p.train.labels == [0, 1, 1, 0]
    assert p.eval.labels == [train.str2int(ev.features["label"].int2str(i)) for i in ev["label"]]
    _class_label_parquet(datasets, tmp_path / "f.parquet", ["dog", "fox"], [0, 1])
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, data | {"eval": str(tmp_path / "f.parquet")})
    said = str(err.value)
    assert "names the classes ['dog', 'fox']" in said and "data.labels" not in said and "\n" not in said


def test_a_rename_naming_fewer_classes_than_the_class_label_names_it(tmp_path):
    """data.labels [a, b] over ClassLabel ['cat', 'dog', 'eel'] with a row of id 2: refused naming its ClassLabel
    class and the count data.labels names (it said only "label 2 ... is not one of the training classes")."""
    datasets = pytest.importorskip("datasets")
    _class_label_parquet(datasets, tmp_path / "d.parquet", ["cat", "dog", "eel"], [0, 1, 2])
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, {"train": str(tmp_path / "d.parquet"), "labels": ["a", "b"]})
    said = str(err.value)
    assert said.startswith(f"{tmp_path / 'd.parquet'}[2]: label 2") and "'eel'" in said and "2 of its 3" in said
