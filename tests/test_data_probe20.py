"""Data probe 20: reading data files against the datasets library (pyarrow's JSON reader refuses a key written twice),
a NUL byte past a CSV's first 64 KiB, a .json list's rows named by their line and decoded only up to data.limit,
pandas' NaN in an alpaca history (LLaMA-Factory's converter reads a non-list history as none), and ``data inspect``'s
chat-rendering flags on a classification file."""

from __future__ import annotations

import json

import pytest

from deltatune.config import ConfigError
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row, read_rows


def test_a_nul_byte_past_the_first_64_kib_of_a_csv_is_refused_at_its_line(tmp_path):
    """HEAD looked for NUL bytes in a CSV's first 64 KiB only: one further down was read into the row's text
    ('bad\\x00row') and trained on, where a NUL in the first 64 KiB (or anywhere in a .jsonl, .json or .txt) is
    refused at its line. Line 3002: the header, 3000 rows, then the bad one."""
    body = "text,label\n" + "".join(f"row {i} padding padding padding,1\n" for i in range(3000))
    assert len(body.encode()) > 1 << 16
    f = tmp_path / "nul.csv"
    f.write_text(body + "bad\x00row,0\n", newline="")
    with pytest.raises(DataError, match=r"^.*nul\.csv:3002: a NUL byte in the text \(a damaged or binary file\?\)"):
        read_rows(str(f))
    f.write_text(body + '"multi\nline\x00 field",0\n', newline="")  # (a quoted record: named at its first line)
    with pytest.raises(DataError, match=r"nul\.csv:3002: a NUL byte"):
        read_rows(str(f))


@pytest.mark.parametrize(
    ("name", "text", "line", "key"),
    [
        ("dup.jsonl", '{"text": "a"}\n\n{"text": "b", "text": "c"}\n', 3, "text"),
        (
            "dup.json",
            '[\n  {"text": "a"},\n  {"messages": [{"role": "user",\n "role": "assistant"}]}\n]\n',
            r"3 \(item 1\)",
            "role",
        ),
        ("one.json", '\n{"text": "a",\n "text": "c"}\n', 2, "text"),
        ("nest.jsonl", '{"text": "a", "x": {"k": 1, "k": 2}}\n', 1, "k"),
    ],
)
def test_a_key_written_twice_in_one_object_is_refused_as_the_datasets_library_refuses_it(
    tmp_path, name, text, line, key
):
    """json keeps the last of two same-named keys and drops the first without a word: HEAD trained on 'c' and never
    read 'b'. The datasets library's JSON reader (pyarrow) refuses the file ('Column(/text) was specified twice'), as
    deltatune's CSV reader refuses a header naming a column twice; here the line of the object is named. Stricter than
    datasets for .json lists and nested objects: datasets (5.2) refuses a key written twice only at the top level of
    a .jsonl row and keeps the last value in a .json list's items and in nested objects (a value lost all the same).
    """
    pa_json = pytest.importorskip("pyarrow.json")
    pa = pytest.importorskip("pyarrow")
    f = tmp_path / name
    f.write_text(text)
    if name.endswith(".jsonl"):  # (pyarrow reads one object a line: the reference for the .jsonl file)
        with pytest.raises(pa.ArrowInvalid, match="specified twice"):
            pa_json.read_json(str(f))
    with pytest.raises(DataError, match=rf"^.*{name}:{line}: key '{key}' written twice in one object"):
        read_rows(str(f))


def test_a_json_lists_rows_are_named_by_their_line_and_decoded_only_up_to_the_limit(tmp_path):
    """A .json list's rows were named by their index ('alpaca.json[1]: column ...'), which an editor cannot jump to
    in a pretty-printed file (LLaMA-Factory's datasets are such lists); they are named by the line they start on, as
    a .jsonl's rows, with the index beside it where a list is written on one line. The whole list was decoded before
    data.limit applied; it stops at the limit, as a .jsonl is read: an item past it is not decoded."""
    items = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(items, indent=2))  # each item 4 lines: '[', then items at lines 2, 6, 10
    rows = read_rows(str(f))
    assert [r.data for r in rows] == json.loads(f.read_text())
    assert [r.source.rsplit("/", 1)[1] for r in rows] == ["alpaca.json:2", "alpaca.json:6", "alpaca.json:10"]
    bad = dict(items[1], output=None)
    f.write_text(json.dumps([items[0], bad], indent=2))
    with pytest.raises(DataError, match=r"alpaca\.json:6: column 'output' is null"):
        read_samples(read_rows(str(f)), stage="sft")
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(items))
    assert [r.source.rsplit("/", 1)[1] for r in read_rows(str(flat), limit=2)] == [
        "flat.json:1 (item 0)",
        "flat.json:1 (item 1)",
    ]
    cut = tmp_path / "cut.json"
    cut.write_text('[{"text": "a"},\n {"text": "b"},\n {"text": }]')
    assert [r.data for r in read_rows(str(cut), limit=2)] == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(DataError, match=r"cut\.json:3: not valid JSON \(Expecting value at column 11\)"):
        read_rows(str(cut))


def test_an_alpaca_history_of_nan_reads_as_none_and_a_nan_turn_is_refused():
    """A history column pandas wrote as NaN (its missing value, in a .jsonl through json.dumps) read "column 'history'
    must be a list"; LLaMA-Factory's AlpacaDatasetConverter reads a history that is no list as none, so the row is
    the one without it. A NaN inside a pair trained on the text 'nan'; it is refused naming the turn."""
    plain = read_samples([Row({"instruction": "q", "output": "a"}, "t.jsonl:1")], stage="sft")[0]
    nan = read_samples([Row({"instruction": "q", "output": "a", "history": float("nan")}, "t.jsonl:1")], stage="sft")
    assert (
        nan[0].messages == plain.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    )
    row = Row({"instruction": "q", "output": "a", "history": [["x", float("nan")]]}, "t.jsonl:4")
    with pytest.raises(DataError, match=r"^t\.jsonl:4: history\[0\]\[1\] must be text, got NaN$"):
        read_samples([row], stage="sft")


@pytest.mark.parametrize("flag", ["template", "data_format"])
def test_data_inspect_refuses_chat_flags_on_a_classification_file(tmp_path, flag):
    """``deltatune data inspect sst2.csv --template chatml`` printed the classification report as if the template had
    been used (--template and --format were dropped without a word for the cls and tag stages, which read their
    columns as they are); the flag is refused naming it."""
    from deltatune.data.inspect import inspect

    f = tmp_path / "sst2.csv"
    f.write_text("text,label\ngood film,1\nbad film,0\n")
    assert "classes (2)" in inspect(str(f))
    kwargs = {"template": "chatml"} if flag == "template" else {"stage": "cls", "data_format": "alpaca"}
    name = "--template" if flag == "template" else "--format"
    with pytest.raises(ConfigError, match=rf"^{name}: stage cls reads the text and label columns as they are"):
        inspect(str(f), **kwargs)


def test_a_later_rows_null_format_column_is_named_not_called_another_format(tmp_path):
    """The datasets library writes a column a row lacks as null (pyarrow's JSON reader here, as load_dataset reads a
    .jsonl). Such a row read as a row of another format: 'this row is in the prompt format (prompt only) but ... began
    the file in the preference format', or of none ('the row's fields (none; null: messages) match no known data
    format'). The null column is named."""
    pa_json = pytest.importorskip("pyarrow.json")
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "c"}\n')
    records = pa_json.read_json(str(f)).to_pylist()
    assert records[1] == {"prompt": "q", "chosen": "c", "rejected": None}
    rows = [Row(r, f"pairs.jsonl:{i}") for i, r in enumerate(records, 1)]
    with pytest.raises(DataError, match=r"^pairs\.jsonl:2: column 'rejected' is null \(a missing value\), and "
                       r"pairs\.jsonl:1 began the file in the preference format"):  # fmt: skip
        read_samples(rows, stage="dpo")
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    rows = [Row({"messages": chat}, "m.jsonl:1"), Row({"messages": float("nan")}, "m.jsonl:2")]
    with pytest.raises(DataError, match=r"^m\.jsonl:2: column 'messages' is NaN \(a missing value\), and m\.jsonl:1"):
        read_samples(rows, stage="sft")
    other = [Row({"prompt": "p", "chosen": "a", "rejected": "b"}, "o.jsonl:1"), Row({"prompt": "q"}, "o.jsonl:2")]
    with pytest.raises(DataError, match=r"^o\.jsonl:2: this row is in the prompt format"):  # (a row of another format)
        read_samples(other)


def test_a_nan_field_of_a_message_reads_as_missing():
    """A message's field pandas wrote as NaN (an assistant turn's tool_calls beside turns that have them) read
    'messages[1].tool_calls: a tool call needs a function name, got nan'; as a missing field, the row reads as the
    one without it (a NaN weight and reasoning already did)."""
    chat = [{"role": "user", "content": "a", "name": float("nan")}, {"role": "assistant", "content": "b"}]
    plain = read_samples([Row({"messages": chat}, "t.jsonl:1")], stage="sft")[0].messages
    chat[1] = {**chat[1], "tool_calls": float("nan"), "function_call": float("nan")}
    assert (
        read_samples([Row({"messages": chat}, "t.jsonl:1")], stage="sft")[0].messages
        == plain
        == [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
        ]
    )


def test_a_missing_column_names_the_header_name_that_differs_only_in_spaces_or_case(tmp_path):
    """A header written 'text, label' names a column ' label' (pandas, which the datasets library reads a CSV with,
    keeps the space too): 'column 'label' is missing (columns in this row:  label, text)' hid the space. The near
    name is pointed out."""
    pd = pytest.importorskip("pandas")
    f = tmp_path / "sst2.csv"
    f.write_text("text, label\ngood film, 1\n")
    assert list(pd.read_csv(f).columns) == ["text", " label"]
    row = read_rows(str(f))[0]
    assert list(row.data) == ["text", " label"]
    with pytest.raises(DataError, match=r"sst2\.csv:2: column 'label' is missing \(columns in this row:  label, text\); "
                       r"' label' differs from it only in spaces$"):  # fmt: skip
        row.get("label")
    with pytest.raises(DataError, match=r"t\.csv:2: .*\); 'Label' differs from it only in case$"):
        Row({"Label": "1"}, "t.csv:2").get("label")
    with pytest.raises(DataError, match=r"t\.csv:2: column 'label' is missing \(columns in this row: text\)$"):
        Row({"text": "a"}, "t.csv:2").get("label")


def test_a_csv_cell_of_json_messages_is_refused_with_the_reason(tmp_path):
    """A CSV cell holds text: pandas (the datasets library's CSV reader) gives the messages column as the JSON text,
    and so does deltatune; the refusal said 'got str' alone. It names the JSON text and the way out."""
    pd = pytest.importorskip("pandas")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    f = tmp_path / "chat.csv"
    pd.DataFrame({"messages": [json.dumps(chat)]}).to_csv(f, index=False)
    assert isinstance(pd.read_csv(f)["messages"][0], str)
    rows = read_rows(str(f))
    assert rows[0].data == pd.read_csv(f).to_dict("records")[0]
    with pytest.raises(DataError, match=r"chat\.csv:2: column 'messages' must be a non-empty list of messages, got str "
                       r"\(JSON text: a CSV cell holds text"):  # fmt: skip
        read_samples(rows, stage="sft")


def test_data_inspect_names_the_stage_of_a_classification_file_given_another(tmp_path):
    """``data inspect sst2.csv --stage sft`` said the text format is not sft's and pointed at stage pt alone; the file's
    text and label columns are what stage cls reads (the stage data inspect picks for it by itself)."""
    from deltatune.data.inspect import inspect

    f = tmp_path / "sst2.csv"
    f.write_text("text,label\ngood film,1\nbad film,0\n")
    assert "stage: cls" in inspect(str(f)).splitlines()
    with pytest.raises(DataError, match=r"stage sft does not read the text format; .*; its text and label columns are "
                       r"stage cls's \(--stage cls\)$"):  # fmt: skip
        inspect(str(f), stage="sft")


def test_jsonl_lines_share_one_decoder_and_a_json_lists_rows_share_their_key_strings(tmp_path, monkeypatch):
    """HEAD's ``json.loads(line, object_pairs_hook=...)`` built a decoder a line (a .jsonl read 1.18x slower), and a
    .json list decoded an item a ``scan_once`` call kept a copy of each key string a row (json.loads of the whole list
    shares them: 248 -> 211 MB peak on 200k alpaca rows). The rows equal json's."""
    items = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(items, indent=1))
    rows, ref = read_rows(str(f)), json.loads(f.read_text())
    assert [r.data for r in rows] == ref == items
    assert all(a is b for a, b in zip(ref[0], ref[2]))  # (json's own key memo, over one document)
    assert all(a is b for a, b in zip(rows[0].data, rows[2].data))
    made = []
    init = json.JSONDecoder.__init__
    monkeypatch.setattr(json.JSONDecoder, "__init__", lambda self, **kw: made.append(1) or init(self, **kw))
    g = tmp_path / "alpaca.jsonl"
    g.write_text("".join(json.dumps(x) + "\n" for x in items))
    assert [r.data for r in read_rows(str(g))] == items
    assert made == []


def test_a_key_written_twice_in_a_json_list_on_one_line_names_its_item(tmp_path):
    """A list written on one line names its rows 'file:1 (item i)'; a key written twice in one of its items named only
    'file:1'."""
    f = tmp_path / "dm.json"
    f.write_text('[{"text": "a"}, {"text": "b", "text": "c"}]')
    with pytest.raises(DataError, match=r"dm\.json:1 \(item 1\): key 'text' written twice in one object"):
        read_rows(str(f))
    f.write_text('[{"text": "a"}, {"text": "b"}]')
    assert [r.source.rsplit("/", 1)[1] for r in read_rows(str(f))] == ["dm.json:1 (item 0)", "dm.json:1 (item 1)"]


def test_a_stray_nul_in_a_short_csv_row_past_64_kib_is_not_called_utf16(tmp_path):
    """A NUL past the first 64 KiB in a short row ('a\\x00,1': a third of its fields' text) read 'UTF-16 without a
    byte-order mark?'; the clean first 64 KiB already rule UTF-16 out (its NULs are in the header)."""
    body = "text,label\n" + "".join(f"row {i} padding padding padding,1\n" for i in range(3000))
    f = tmp_path / "nul.csv"
    f.write_text(body + "a\x00,1\n", newline="")
    with pytest.raises(DataError, match=r"nul\.csv:3002: a NUL byte in the text \(a damaged or binary file\?\); "
                       r"remove it$"):  # fmt: skip
        read_rows(str(f))


def test_pt_fewer_than_one_block_names_the_file_of_a_one_line_json_list(tmp_path):
    """'pt.json:1 (item 0)' (a list on one line) was named whole, where the message names the file, not a row."""
    from deltatune.data.tasks import encode_pt

    class Tok:
        eos_token_id, sep_token_id = 0, None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] * len(text.split())}

    f = tmp_path / "pt.json"
    f.write_text(json.dumps([{"text": "a b"}, {"text": "c"}]))
    rows = read_rows(str(f))
    assert rows[0].source.endswith("pt.json:1 (item 0)")
    with pytest.raises(DataError, match=r"^[^ ]*pt\.json: the text holds 5 tokens, fewer than one block"):
        encode_pt(rows, Tok(), "text", 512)


def test_the_near_column_hint_says_spaces_where_the_recipes_column_has_them():
    """A recipe's column ' label' (the space on its side) against a row's 'label' was called a difference in case."""
    with pytest.raises(DataError, match=r"'label' differs from it only in spaces$"):
        Row({"label": "1"}, "t.csv:2").get(" label")
    with pytest.raises(DataError, match=r"'Label' differs from it only in spaces and case$"):
        Row({"Label": "1"}, "t.csv:2").get(" label")
    with pytest.raises(DataError, match=r"' Label' differs from it only in spaces and case$"):
        Row({" Label": "1"}, "t.csv:2").get("label")


def test_a_null_column_outside_the_first_rows_format_is_not_named_as_the_difference():
    """A preference file with an extra 'text' column, then a prompt/completion row whose 'text' is null: 'text' is no
    part of the preference format, so not why the formats differ; the row is named as one of another format."""
    rows = [
        Row({"prompt": "p", "chosen": "a", "rejected": "b", "text": "x"}, "t.jsonl:1"),
        Row({"prompt": "q", "completion": "c", "text": None}, "t.jsonl:2"),
    ]
    with pytest.raises(DataError, match=r"^t\.jsonl:2: this row is in the prompt_completion format \(prompt \+ "
                       r"completion\) but t\.jsonl:1 began the file in the preference format"):  # fmt: skip
        read_samples(rows)


def test_a_nan_role_is_named_nan_not_none():
    """A message's NaN fields read as missing; its role NaN was reported 'unknown role=None', a value not in the row."""
    chat = [{"role": float("nan"), "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match=r"^t\.jsonl:1: messages\[0\]\.role: unknown role=nan \(known roles"):
        read_samples([Row({"messages": chat}, "t.jsonl:1")], stage="sft")


def test_a_byte_order_mark_inside_a_jsonl_is_named_as_json_loads_names_it(tmp_path):
    """Two .jsonl files joined: the second's byte-order mark starts a line. json.loads names it ('Unexpected UTF-8
    BOM'); the one decoder for all lines (e1278a1) read 'Expecting value at column 1'."""
    f = tmp_path / "joined.jsonl"
    f.write_bytes(b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads('\ufeff{"text": "b"}')
    assert ref.value.msg == "Unexpected UTF-8 BOM (decode using utf-8-sig)"
    with pytest.raises(DataError, match=r"joined\.jsonl:2: not valid JSON \(Unexpected UTF-8 BOM \(decode using "
                       r"utf-8-sig\) at column 1\)$"):  # fmt: skip
        read_rows(str(f))
