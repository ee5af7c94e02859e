"""Probe 25, data loading: a row range in percents (``train.jsonl[:10%]``) reads the rows datasets 5.2's split
slicing reads for the same file (``load_dataset("json", split="train[:10%]")``); it was refused as "not whole
numbers"."""

from __future__ import annotations

import json

import pytest

from deltatune.data.load import DataError, read_rows

SLICES = ["[:10%]", "[10%:35%]", "[-25%:]", "[:-5%]", "[5:50%]", "[33%:67%]"]


def test_percent_row_ranges_read_what_datasets_reads(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(23)))  # 23: rounding matters
    # one slice through load_dataset itself, all through the rule it slices by (arrow_reader.ReadInstruction)
    ref = datasets.load_dataset("json", data_files=str(path), split="train[10%:35%]", cache_dir=str(tmp_path / "c"))
    assert [r.data["text"] for r in read_rows(f"{path}[10%:35%]")] == ref["text"]
    for sl in SLICES:
        (absolute,) = datasets.ReadInstruction.from_spec(f"train{sl}").to_absolute({"train": 23})
        ours = [r.data["text"] for r in read_rows(f"{path}{sl}")]
        assert ours == [f"row {i}" for i in range(absolute.from_, absolute.to)], sl


def test_percent_row_range_refusals(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    with pytest.raises(DataError, match="between -100% and 100%"):
        read_rows(f"{path}[:150%]")  # (datasets: "Percent slice boundaries must be > -100 and < 100.")
    with pytest.raises(DataError, match="selects no rows"):
        read_rows(f"{path}[:10%]")  # round(0.4) = 0 rows of 4


def test_arrow_files_read_as_datasets_reads_them(tmp_path):
    """A ``.arrow`` file (datasets' ``arrow`` builder, LLaMA-Factory's FILEEXT2TYPE) was refused as "not .arrow"; it
    reads the rows ``load_dataset("arrow")`` reads: the stream format save_to_disk writes, and the file format."""
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"instruction": ["a", "b", "c"], "output": ["x", "y", "z"]})
    for name, new in (("stream.arrow", pa.ipc.new_stream), ("file.arrow", pa.ipc.new_file)):
        path = str(tmp_path / name)
        with new(path, table.schema) as writer:
            writer.write_table(table)
        ref = datasets.load_dataset("arrow", data_files=path, split="train", cache_dir=str(tmp_path / "c"))
        assert [r.data for r in read_rows(path)] == ref.to_list(), name
        assert [r.data for r in read_rows(path + "[1:]")] == ref.to_list()[1:], name
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="bad.arrow: not a readable Arrow file"):
        read_rows(str(tmp_path / "bad.arrow"))


def test_a_file_pattern_is_refused_as_a_path_not_sent_to_the_hub(tmp_path, monkeypatch):
    """``data/*`` (a datasets data_files pattern) was taken for a hub name: 10 s of importing datasets, then "could
    not be loaded from the datasets hub"; no hub name holds * or ? (repo ids are letters, digits, - _ .)."""
    import deltatune.data.load as load

    def hub(name, limit):
        raise AssertionError(f"{name!r} sent to the datasets hub")

    monkeypatch.setattr(load, "_hub", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "a"}\n')
    for spec in ("data/*", "data/?.jsonl", "data/*.jsonl[:1]"):
        with pytest.raises(DataError, match=r"no file pattern \(\*, \?\).*name the folder"):
            read_rows(spec)


def test_a_row_range_end_of_a_sign_or_a_percent_alone_is_refused_in_one_line(tmp_path):
    """``[-%:]``, ``[-:1]``, ``[:-]`` passed the range pattern and crashed in int() (a bare ValueError "invalid
    literal for int() with base 10: '-'"); datasets' ReadInstruction refuses them too."""
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    for sl in ("[-%:]", "[-:1]", "[:-]", "[%:]", "[1:-%]"):
        with pytest.raises(ValueError):  # (the reference refuses it as well)
            datasets.ReadInstruction.from_spec(f"train{sl}")
        with pytest.raises(DataError, match=r"a row range is written \[start:stop\]"):
            read_rows(f"{path}{sl}")


def test_a_file_pattern_message_says_deltatune_reads_none(tmp_path):
    with pytest.raises(DataError, match=r"deltatune reads no file pattern \(\*, \?\) such as datasets' data_files"):
        read_rows(str(tmp_path / "*.jsonl"))


def _facts(path):
    from types import SimpleNamespace

    from deltatune.train.runfolder import run_facts

    cfg = SimpleNamespace(model=SimpleNamespace(dtype="float32"), data=SimpleNamespace(train=str(path), eval=None))
    return run_facts(cfg)["data.train"]


def test_a_folder_of_jsonl_files_leaves_its_arrow_files_out_as_before(tmp_path):
    """A folder holding a.jsonl and datasets' stray cache-1.arrow read 1 row until ea13f75; then it was refused ("a
    data folder holds files of one kind, this one .arrow, .jsonl") and its fingerprint changed, so a run begun on it
    before could neither resume nor evaluate. It reads, and hashes, what it did before .arrow files were read."""
    pa = pytest.importorskip("pyarrow")
    old, now = tmp_path / "old", tmp_path / "now"  # the folder as a run began on it, and with the cache file
    for folder in (old, now):
        folder.mkdir()
        (folder / "a.jsonl").write_text('{"text": "a"}\n')
    with pa.ipc.new_stream(str(now / "cache-1.arrow"), pa.schema([("text", pa.string())])) as writer:
        writer.write_table(pa.table({"text": ["cached"]}))
    assert [r.data for r in read_rows(str(now))] == [{"text": "a"}]
    assert [r.data for r in read_rows(f"{now}[:1]")] == [{"text": "a"}]
    assert _facts(now) == _facts(old)  # (a checkpoint's recorded fingerprint still matches: resume / eval go on)


def test_a_save_to_disk_folder_reads_as_load_from_disk(tmp_path):
    """A ``Dataset.save_to_disk`` folder (state.json, dataset_info.json, data-*.arrow) was refused as "files of one
    kind, this one .arrow, .json" (state.json read as a data file); it reads the rows ``load_from_disk`` reads, its
    shards in state.json's order."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(7)], "n": list(range(7))})
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    ref = datasets.load_from_disk(str(tmp_path / "saved"))
    assert [r.data for r in read_rows(str(tmp_path / "saved"))] == ref.to_list()
    assert [r.data for r in read_rows(str(tmp_path / "saved") + "[2:5]")] == ref.to_list()[2:5]
    # state.json's order, not name order: load_from_disk reads the shards as listed there
    state = json.loads((tmp_path / "saved" / "state.json").read_text())
    state["_data_files"].reverse()
    (tmp_path / "saved" / "state.json").write_text(json.dumps(state))
    ref = datasets.load_from_disk(str(tmp_path / "saved"))
    assert [r.data for r in read_rows(str(tmp_path / "saved"))] == ref.to_list()
    assert _facts(tmp_path / "saved")  # (the shards are its fingerprint's files)


def test_an_arrow_files_class_label_names_are_its_classes(tmp_path):
    """class_label_names read only .parquet: a ClassLabel(['cat', 'dog', 'fox']) column saved as .arrow gave None, so
    image classification named its classes by the values ('0', '2'); load_dataset("arrow") reads the names."""
    datasets = pytest.importorskip("datasets")
    from deltatune.data.images import class_label_names

    features = datasets.Features(
        {"image": datasets.Value("string"), "label": datasets.ClassLabel(names=["cat", "dog", "fox"])}
    )
    ds = datasets.Dataset.from_dict({"image": ["a.png", "b.png"], "label": [0, 2]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    shard = str(tmp_path / "saved" / "data-00000-of-00001.arrow")
    pa = pytest.importorskip("pyarrow")
    with pa.ipc.new_file(str(tmp_path / "file.arrow"), ds.data.table.schema) as writer:  # the file format too
        writer.write_table(ds.data.table)
    for path in (shard, str(tmp_path / "file.arrow")):
        ref = datasets.load_dataset("arrow", data_files=path, split="train", cache_dir=str(tmp_path / "c"))
        assert class_label_names(path, "label") == ref.features["label"].names, path
        assert class_label_names(path + "[:1]", "label") == ref.features["label"].names, path
    assert class_label_names(shard, "image") is None


def test_a_dataset_dict_folder_is_refused_naming_a_split_folder(tmp_path):
    """A ``DatasetDict.save_to_disk`` folder read its dataset_dict.json as one row ({"splits": [...]}); datasets'
    Dataset.load_from_disk refuses it too ("got a DatasetDict")."""
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(FileNotFoundError, match="got a `DatasetDict`"):
        datasets.Dataset.load_from_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a DatasetDict saved with save_to_disk .*name one split's folder .*dd/train"):
        read_rows(str(tmp_path / "dd"))
    assert [r.data for r in read_rows(str(tmp_path / "dd" / "train"))] == [{"text": "a"}]


def test_an_arrow_stream_cut_short_is_named_so(tmp_path):
    """A stream-format .arrow file cut short fell back to the file format and said "Not an Arrow file"; pyarrow's
    stream reader names the cause (a message body shorter than its header says)."""
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"text": ["a" * 100] * 50})
    with pa.ipc.new_stream(str(tmp_path / "s.arrow"), table.schema) as writer:
        writer.write_table(table)
    whole = (tmp_path / "s.arrow").read_bytes()
    (tmp_path / "cut.arrow").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.arrow: not a readable Arrow file \(Expected to be able to read"):
        read_rows(str(tmp_path / "cut.arrow"))


def _saved_images(path, datasets, shards=3):
    """A save_to_disk folder of 7 tiny PNG images (datasets' Image feature: bytes) and a ClassLabel column."""
    import io

    from PIL import Image

    pngs = []
    for i in range(7):
        buf = io.BytesIO()
        Image.new("RGB", (2, 2), (i * 30, 0, 0)).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "fox"])}
    )
    ds = datasets.Dataset.from_dict({"image": pngs, "label": [i % 3 for i in range(7)]}, features=features)
    ds.save_to_disk(str(path), num_shards=shards)
    return datasets.load_from_disk(str(path)).cast_column("image", datasets.Image(decode=False))


def test_image_rows_of_a_save_to_disk_folder_are_load_from_disks(tmp_path):
    """A save_to_disk folder of images was read as an image folder: "has no class sub-folders", and
    class_label_names gave None (its first shard alone named the classes); it reads load_from_disk's rows."""
    datasets = pytest.importorskip("datasets")
    from deltatune.data.images import class_label_names, read_image_rows

    ref = _saved_images(tmp_path / "saved", datasets)
    rows = read_image_rows(str(tmp_path / "saved"))
    assert [(r.data, r.label) for r in rows] == [(x["image"]["bytes"], x["label"]) for x in ref]
    assert class_label_names(str(tmp_path / "saved"), "label") == ref.features["label"].names


def test_a_save_to_disk_folder_missing_a_shard_or_its_info_is_refused_naming_it(tmp_path):
    """A shard its state.json lists, missing: read_rows said "data file '.../data-00001-of-00003.arrow' does not
    exist" and run_facts (train) a raw "[Errno 2] No such file"; without dataset_info.json it was read.
    load_from_disk refuses both."""
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [f"r{i}" for i in range(7)]}).save_to_disk(str(saved), num_shards=3)
    (saved / "data-00001-of-00003.arrow").unlink()
    with pytest.raises(FileNotFoundError):
        datasets.load_from_disk(str(saved))
    for read in (read_rows, _facts):
        with pytest.raises(DataError, match=r"state.json lists data-00001-of-00003.arrow, which is missing"):
            read(str(saved))
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "s2"))
    (tmp_path / "s2" / "dataset_info.json").unlink()
    with pytest.raises(FileNotFoundError):
        datasets.load_from_disk(str(tmp_path / "s2"))
    with pytest.raises(DataError, match=r"no dataset_info.json"):
        read_rows(str(tmp_path / "s2"))


def test_a_dataset_dict_refusal_names_its_splits(tmp_path):
    """A DatasetDict with a 'validation' split alone was told to name dd/train, which does not exist."""
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["a"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(datasets.load_from_disk(str(tmp_path / "dd"))) == ["validation"]
    with pytest.raises(DataError, match=r"its splits: validation\).*dd/validation\)"):
        read_rows(str(tmp_path / "dd"))


def test_arrow_files_left_out_beside_other_data_files_are_named(tmp_path):
    """.arrow shards beside a README.txt were left out without a word (the README read as the one row); the rows
    read stay as they were (old fingerprints), a warning names what was left out."""
    pa = pytest.importorskip("pyarrow")
    for i in range(3):
        with pa.ipc.new_stream(
            str(tmp_path / f"data-0000{i}-of-00003.arrow"), pa.schema([("text", pa.string())])
        ) as w:
            w.write_table(pa.table({"text": [f"r{i}"]}))
    (tmp_path / "README.txt").write_text("about this data\n")
    with pytest.warns(UserWarning, match=r"left out 3 .arrow files \(data-00000-of-00003.arrow, .*\) beside README"):
        rows = read_rows(str(tmp_path))
    assert [r.data for r in rows] == [r.data for r in read_rows(str(tmp_path / "README.txt"))]  # (as before)


def test_the_file_pattern_message_names_state_json_order(tmp_path):
    with pytest.raises(DataError, match=r"name order, a save_to_disk folder's shards in its state.json's order"):
        read_rows(str(tmp_path / "*.jsonl"))


def test_image_cls_names_a_save_to_disk_folders_classes_as_load_from_disk(tmp_path):
    """The stage took a save_to_disk folder for an image folder of class sub-folders (its classes the ids '0', '1',
    '2' once the rows read); its ClassLabel names are the classes, as load_from_disk's features give them."""
    datasets = pytest.importorskip("datasets")
    from transformers import ViTConfig

    from deltatune.train.config import build
    from deltatune.train.image_cls import prepare_image_cls

    ref = _saved_images(tmp_path / "saved", datasets)
    ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "vit"
    )
    cfg = build({"stage": "image_cls", "model": {"name_or_path": str(tmp_path / "vit")},
                 "data": {"train": str(tmp_path / "saved")}})  # fmt: skip
    p = prepare_image_cls(cfg, processor=None)
    assert p.labels == ref.features["label"].names == ["cat", "dog", "fox"]
    assert p.train.labels == ref["label"]
