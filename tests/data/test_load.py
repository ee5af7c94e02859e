"""Reading rows: every format, the file and line every row keeps, and the errors that name them."""

from __future__ import annotations

import json
import re

import pytest

from deltatune.data.load import DataError, read_rows
from deltatune.data.tasks import encode_cls
from deltatune.data.templates import to_messages

ROWS = [{"text": "a fine film", "label": 1}, {"text": "dull, and long", "label": 0}, {"text": "fine", "label": 1}]


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(path, rows) -> str:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_rows_keep_their_line(tmp_path):
    # A blank line is skipped but still counted, so line numbers are the ones an editor shows.
    path = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    rows = read_rows(path)
    assert [r.data for r in rows] == ROWS[:2]
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:3"]


def test_json_list(tmp_path):
    path = _write(tmp_path / "d.json", json.dumps(ROWS))
    rows = read_rows(path)
    assert [r.data for r in rows] == ROWS
    assert rows[2].source == f"{path}:1 (item 2)"  # (a list written on one line: its line and index)


@pytest.mark.parametrize("ext, sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, ext, sep):
    # The first field holds a comma, so a TSV read as CSV (or the reverse) gives other values.
    first = "hello, world\t1\n" if ext == ".tsv" else '"hello, world",1\n'
    path = _write(tmp_path / f"d{ext}", f"text{sep}label\n" + first + f"bye{sep}0\n")
    rows = read_rows(path)
    assert [r.data for r in rows] == [{"text": "hello, world", "label": "1"}, {"text": "bye", "label": "0"}]
    assert [r.source for r in rows] == [f"{path}:2", f"{path}:3"]  # line 1 is the header


def test_csv_line_numbers_follow_the_file(tmp_path):
    # A quoted field spanning two lines and a blank line: later rows still report the line an editor shows.
    path = _write(tmp_path / "d.csv", 'text,label\n"two\nlines",1\n\nlast,0\n')
    rows = read_rows(path)
    assert rows[0].data == {"text": "two\nlines", "label": "1"}
    assert rows[0].source == f"{path}:2"  # where the record starts (it was named by its last line, 3)
    assert rows[1].source == f"{path}:5"


def test_a_json_file_of_json_lines_is_read_as_lines(tmp_path):
    """One object per line in a .json file (as the datasets library reads it) was refused as "Extra data"."""
    path = _write(tmp_path / "d.json", '{"text": "a"}\n\n{"text": "b"}\n')
    assert [(r.data, r.source) for r in read_rows(path)] == [
        ({"text": "a"}, f"{path}:1"),
        ({"text": "b"}, f"{path}:3"),
    ]


def test_csv_with_byte_order_mark(tmp_path):
    # Excel's "CSV UTF-8" starts with a byte-order mark; the first column is still called "text".
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\nhi,1\n".encode("utf-8-sig"))
    assert read_rows(str(path))[0].data == {"text": "hi", "label": "1"}


def test_csv_row_with_extra_fields(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\nok,1\na,b,c\n")
    with pytest.raises(DataError, match=rf"{path}:3: more fields than the header"):
        read_rows(path)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    rows = read_rows(path)
    assert [r.data for r in rows] == ROWS
    assert read_rows(path, limit=2)[-1].data == ROWS[1]
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "d.parquet").read_bytes()[:-20])  # cut short; not Parquet
    (tmp_path / "text.parquet").write_text("a,b\n1,2\n", encoding="utf-8")
    for name in ("cut.parquet", "text.parquet"):  # were pyarrow's ArrowInvalid with a traceback
        with pytest.raises(DataError, match=rf"^{tmp_path / name}: not a readable Parquet file \("):
            read_rows(str(tmp_path / name))


def test_txt_is_one_document(tmp_path):
    path = _write(tmp_path / "d.txt", "First line.\nSecond line.\n")
    rows = read_rows(path, text_column="body")
    assert [r.data for r in rows] == [{"body": "First line.\nSecond line.\n"}]


def test_limit(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    assert [r.data for r in read_rows(path, limit=2)] == ROWS[:2]


def test_jsonl_row_that_is_not_json(tmp_path):
    path = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{'text': 'x'}\n")
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        read_rows(path)


def test_jsonl_row_that_is_not_an_object(tmp_path):
    path = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object, got list"):
        read_rows(path)


def test_missing_column_named_with_file_and_line(tmp_path):
    from tiny import tokenizer

    path = _jsonl(tmp_path / "d.jsonl", [ROWS[0], {"text": "no label here"}])
    rows = read_rows(path)
    with pytest.raises(DataError, match=rf"{path}:2: column 'label' is missing \(columns in this row: text\)"):
        encode_cls(rows, tokenizer(), "text", "label", {0: 0, 1: 1}, max_length=32)


def test_missing_sft_column_named_with_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}, {"question": "q", "output": "a"}])
    with pytest.raises(DataError, match=rf"{path}:2: column 'instruction' is missing"):
        [to_messages(r, {}) for r in read_rows(path)]


@pytest.mark.parametrize(
    "name, body", [("d.jsonl", "\n  \n"), ("d.csv", "text,label\n"), ("d.json", "[]"), ("d.txt", ""), ("d.tsv", "")]
)
def test_empty_file(tmp_path, name, body):
    path = _write(tmp_path / name, body)
    with pytest.raises(DataError, match=rf"{path} holds no rows"):
        read_rows(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a folder"):
        read_rows(str(tmp_path))


@pytest.mark.parametrize("name, why", [("rows.jsonl.gz", "not .gz"), ("rows", "this one has no extension")])
def test_a_local_file_of_another_kind_is_named_as_such(tmp_path, name, why):
    """It was sent to the datasets hub and reported as "not a local file"."""
    (tmp_path / name).write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / name))}: deltatune reads data files ending in "
                       rf"\.jsonl, .*; {why} \(rename it"):  # fmt: skip
        read_rows(str(tmp_path / name))


def test_hub_name_while_offline(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        read_rows("no-such-user/no-such-dataset:train")
    message = str(info.value)
    assert "'no-such-user/no-such-dataset' is not a local file" in message
    assert "hub" in message and "HF_HUB_OFFLINE=1" in message


def _numbered(tmp_path, ext: str, n: int = 10) -> str:
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(n)]
    if ext == ".jsonl":  # a blank line after row 3: rows are counted, not lines
        lines = [json.dumps(r) for r in rows]
        return _write(tmp_path / "d.jsonl", "\n".join(lines[:4] + [""] + lines[4:]) + "\n")
    if ext == ".json":
        return _write(tmp_path / "d.json", json.dumps(rows))
    return _write(tmp_path / "d.csv", "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv"])
@pytest.mark.parametrize("cut", ["2:5", ":3", "7:", "-2:", "-3:-1", "8:20", "0:0", " 1 : 4 "])
def test_row_range_is_a_python_slice_of_the_rows(tmp_path, ext, cut):
    path = _numbered(tmp_path, ext)
    everything = read_rows(path)
    start, stop = (int(p) if p.strip() else None for p in cut.split(":"))
    want = everything[start:stop]
    if not want:
        with pytest.raises(DataError, match=rf"\[{cut}\] selects no rows \((the file has 10|it ends where it starts)"):
            read_rows(f"{path}[{cut}]")
        return
    got = read_rows(f"{path}[{cut}]")
    assert [r.data for r in got] == [r.data for r in want]
    assert [r.source for r in got] == [r.source for r in want]  # each row still names its own line


def test_row_range_keeps_the_line_and_takes_the_limit_after(tmp_path):
    path = _numbered(tmp_path, ".jsonl")
    rows = read_rows(f"{path}[3:9]", limit=2)
    assert [r.data["text"] for r in rows] == ["row 3", "row 4"]
    assert [r.source for r in rows] == [f"{path}:4", f"{path}:6"]  # line 5 is blank


@pytest.mark.parametrize(
    "cut, message",
    [
        ("1:2:3", r"a row range is written \[start:stop\] in whole numbers.*got \[1:2:3\]"),
        ("a:b", r"a row range is written \[start:stop\].*e\.g\. d\.jsonl\[1000:2000\]"),
        ("5", r"got \[5\]"),
        ("1.5:3", r"got \[1\.5:3\]"),
        ("20:30", r"selects no rows \(the file has 10\)"),
        ("6:3", r"selects no rows \(it ends where it starts or before\)"),
        ("4:4", r"selects no rows \(it ends where it starts or before\)"),
        ("-100:-50", r"selects no rows \(the file has 10\)"),
    ],
)
def test_bad_row_range(tmp_path, cut, message):
    path = _numbered(tmp_path, ".jsonl")
    with pytest.raises(DataError, match=rf"^{path}\[{cut}\]: .*{message}"):
        read_rows(f"{path}[{cut}]")


def test_row_range_of_a_missing_or_plain_text_file(tmp_path):
    with pytest.raises(DataError, match=r"data file '.*nope\.jsonl' does not exist"):
        read_rows(str(tmp_path / "nope.jsonl[1:2]"))
    path = _write(tmp_path / "d.txt", "one document")
    with pytest.raises(DataError, match=r"d\.txt\[0:1\]: a \.txt file is one document"):
        read_rows(f"{path}[0:1]")
