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
