"""Formats probe 22: LLaMA-Factory's openai formatting (``data.format: openai``) in its converter's turn order (a row
it drops, refused in one line naming file:line and the turn), and two malformed fields that raised a TypeError or
trained a Python repr (a sharegpt role that is a list, a text content part whose text is not text)."""

from __future__ import annotations

import pytest

from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
}


def _lf_openai_keeps(messages: list[dict]) -> bool:
    """LLaMA-Factory's OpenAIDatasetConverter (not ranking): the system message taken off the front, an assistant
    turn with tool_calls read as function_call, consecutive tool turns merged into one observation, then turns must
    alternate user/observation and assistant/function, an even number of them; else it drops the row."""
    if messages and messages[0]["role"] == "system":
        messages = messages[1:]
    aligned, pending = [], []
    for m in messages:
        role = "function" if m["role"] == "assistant" and m.get("tool_calls") else m["role"]
        if role == "tool":
            pending.append(m["content"])
            continue
        if pending:
            aligned.append("observation")
            pending = []
        aligned.append(role)
    accept = (("user", "observation"), ("assistant", "function"))
    return all(r in accept[i % 2] for i, r in enumerate(aligned)) and len(aligned) % 2 == 0


def _u(text: str = "q") -> dict:
    return {"role": "user", "content": text}


def _a(text: str = "a") -> dict:
    return {"role": "assistant", "content": text}


ORDERS = {
    "alternating": ([{"role": "system", "content": "S"}, _u(), _a(), _u(), _a()], None),
    "two tool results merged": ([_u(), CALL, {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, _a()],
                                None),
    "two user turns": ([_u(), _u(), _a()], "messages[1].role: a 'user' message after a 'user' message"),
    "two answers": ([_u(), _a(), _a()], "messages[2].role: an 'assistant' message after an 'assistant' message"),
    "a tool result after the user": ([_u(), {"role": "tool", "content": "1"}, _a()],
                                     "messages[1].role: a 'tool' message after a 'user' message"),
    "a system message later": ([_u(), _a(), {"role": "system", "content": "S"}, _u(), _a()],
                               "messages[2].role: a system message after the first"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ORDERS))
def test_openai_formatting_refuses_the_rows_llamafactory_drops(name):
    """Each row LLaMA-Factory's openai converter drops for its turn order is refused naming file:line and the turn
    (under data.format=openai every order was read, two user turns in a row trained as written); the rows it keeps
    read."""
    messages, why = ORDERS[name]
    rows = [Row({"messages": messages, "tools": TOOLS}, "train.jsonl:4")]
    assert (why is None) == _lf_openai_keeps(messages)
    if why is None:
        s = read_samples(rows, data_format="openai", stage="sft")[0]
        assert [m["role"] for m in s.messages] == [m["role"] for m in messages]
        return
    with pytest.raises(DataError) as err:
        read_samples(rows, data_format="openai", stage="sft")
    assert str(err.value).startswith(f"train.jsonl:4: {why}") and "\n" not in str(err.value)
    # TRL's and OpenAI's messages (the format detected, not LLaMA-Factory's formatting) keep any order, as before
    assert [m["role"] for m in read_samples(rows, stage="sft")[0].messages] == [m["role"] for m in messages]


def test_openai_formatting_order_in_kto_ppo_and_ranking_rows():
    """The order holds for LLaMA-Factory's openai rows in every stage (KTO's labelled rows, PPO's prompts, ranking
    rows), the refusal naming the file's column (data.columns renames it)."""
    bad = [_u(), _u(), _a()]
    cases = [
        ({"conv": bad, "kto_tag": True}, {"messages": "conv", "kto_tag": "kto_tag"}, "kto"),
        ({"conv": bad}, {"messages": "conv"}, "ppo"),
        ({"conv": bad[:2], "chosen": _a("x"), "rejected": _a("y")}, {"messages": "conv"}, "dpo"),
    ]
    for row, columns, stage in cases:
        with pytest.raises(DataError, match=r"^f.jsonl:2: conv\[1\].role: a 'user' message after a 'user' message"):
            read_samples([Row(row, "f.jsonl:2")], columns, "openai", stage=stage)
        good = {**row, "conv": [_u(), _a()] if stage != "dpo" else [_u()]}
        assert read_samples([Row(good, "f.jsonl:2")], columns, "openai", stage=stage)


def test_sharegpt_role_that_is_a_list_is_one_line():
    """A role written as a list ({"from": ["human"]}) raised TypeError: unhashable type: 'list' from deep in the
    reader; now the unknown role, named by its field."""
    row = {"conversations": [{"from": ["human"], "value": "a"}, {"from": "gpt", "value": "b"}]}
    with pytest.raises(DataError, match=r"^f.jsonl:3: conversations\[0\].from: unknown role=\['human'\]"):
        read_samples([Row(row, "f.jsonl:3")], stage="sft")


@pytest.mark.parametrize("text, got", [(["a"], "list"), (None, "null"), ({"t": 1}, "dict")])
def test_a_text_part_whose_text_is_not_text_is_refused(text, got):
    """An OpenAI content part {"type": "text", "text": [...]} trained as its Python repr ("['a']", "None"); now one
    line naming the message's content."""
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}, _a()]}
    with pytest.raises(DataError) as err:
        read_samples([Row(row, "f.jsonl:5")], stage="sft")
    assert str(err.value) == f"f.jsonl:5: messages[0].content: a text content part's 'text' must be text, got {got}"
    ok = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, _a()]
    }
    assert read_samples([Row(ok, "f.jsonl:5")], stage="sft")[0].messages[0]["content"] == "ab"


@pytest.mark.parametrize("key", ["name", "tool_call_id"])
def test_a_tool_messages_name_that_is_not_text_is_refused(key):
    """A tool message's name or tool_call_id written as a list was handed to the chat template as is (a template
    that writes it puts its Python repr in the prompt: "['f']"); now one line naming the field."""
    tool = {"role": "tool", "content": "1", key: ["f"]}
    row = {"messages": [_u(), CALL, tool, _a()], "tools": TOOLS}
    with pytest.raises(DataError) as err:
        read_samples([Row(row, "f.jsonl:6")], stage="sft")
    assert str(err.value) == f"f.jsonl:6: messages[2].{key}: the tool message's {key} must be text, got list"
    row["messages"][2] = {**tool, key: "f"}
    assert read_samples([Row(row, "f.jsonl:6")], stage="sft")[0].messages[2][key] == "f"


@pytest.mark.parametrize(
    "data_format, column",
    [("sharegpt", "conversations"), ("sharegpt_preference", "conversations"), ("messages", "messages"),
     ("openai", "messages")],
)  # fmt: skip
def test_a_forced_conversation_format_names_its_own_missing_column(data_format, column):
    """data.format=sharegpt on a row with neither column said "column 'messages' is missing" (and messages / openai
    said 'conversations'): the fallback column, not the one the format reads (LLaMA-Factory's sharegpt default is
    conversations, its openai one messages)."""
    pair = {"chosen": "x", "rejected": "y"} if data_format == "sharegpt_preference" else {}
    row = Row({"instruction": "a", "output": "b", **pair}, "f.jsonl:7")
    with pytest.raises(DataError) as err:
        read_samples([row], data_format=data_format)
    assert str(err.value).startswith(f"f.jsonl:7: column {column!r} is missing (columns in this row: ")


def test_data_inspect_refuses_an_openai_row_training_refuses(tmp_path):
    """``deltatune data inspect --format openai`` read the file as detected messages (any order) where training
    (data.format=openai) refuses the row LLaMA-Factory drops: the report must fail as training does."""
    import json

    from deltatune.data.inspect import inspect

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [_u(), _u(), _a()]}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: messages\[1\].role: a 'user' message after a 'user'"):
        inspect(str(path), data_format="openai", stage="sft")


@pytest.mark.parametrize(
    "image, got",
    [({"type": "image", "image": 5}, "an 'image' content part must name a path or URL, got 5"),
     ({"type": "image_url", "image_url": {"detail": "high"}},
      'an \'image_url\' content part must name a path or URL, got {"detail": "high"}')],
)  # fmt: skip
def test_an_image_part_with_no_path_is_refused(image, got):
    """An image part whose image is a number, or an object without a url, read as the image path "5" or "" (the
    caption stage then looked for that file); now one line naming the message. datasets' {bytes, path} object reads
    its path, OpenAI's {url} its url."""

    def row(part: dict) -> Row:
        return Row({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}, _a()]}, "f:1")

    with pytest.raises(DataError) as err:
        read_samples([row(image)])
    assert str(err.value) == f"f:1: messages[0].content: {got}"
    parts = [
        {"type": "image", "image": {"bytes": None, "path": "a.png"}},
        {"type": "image_url", "image_url": {"url": "x.png"}},
    ]
    assert [read_samples([row(p)])[0].images for p in parts] == [["a.png"], ["x.png"]]


@pytest.mark.parametrize(
    "columns, tags, why",
    [({"prompt": ["q"]}, None, "data.columns.prompt: must be a column name, got ['q']"),
     ({"prompt": 5}, None, "data.columns.prompt: must be a column name, got 5"),
     (None, {"user_tag": ["human"]}, "data.tags.user_tag: must be a tag (a role or field name of the rows), got ['human']"),
     (None, {"role_tag": 5}, "data.tags.role_tag: must be a tag (a role or field name of the rows), got 5")],
)  # fmt: skip
def test_a_renaming_that_is_not_text_is_one_line(columns, tags, why):
    """data.columns and data.tags values that are no text: a list raised TypeError: unhashable type from inside the
    reader, a number was not read at all (the row then matched no format, or its roles fell back to 'from')."""
    from deltatune.config import ConfigError

    rows = [Row({"prompt": "a", "completion": "b", "conversations": [{"from": "human", "value": "a"}]}, "f:1")]
    with pytest.raises(ConfigError) as err:
        read_samples(rows, columns, "sharegpt" if tags else None, tags)
    assert str(err.value) == why


# -- review of probe 22 --------------------------------------------------------------------------------------


def _png(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("path", ["a.png", None])
def test_a_content_parts_image_bytes_are_not_trained_as_its_path(path):
    """datasets' {bytes, path} image in a content part read its path, whatever the bytes held (datasets'
    Image.decode_example and data.images.image_value read the bytes first): a part with both trained on the local
    file the path names; one with bytes alone was refused with its base64 in the message. Now one line, no bytes."""
    import base64

    b64 = base64.b64encode(_png((255, 0, 0))).decode()
    part = {"type": "image", "image": {"bytes": b64, "path": path}}
    row = Row({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "x"}]}, _a()]}, "f:2")
    with pytest.raises(DataError) as err:
        read_samples([row], stage="sft")
    assert str(err.value) == (
        "f:2: messages[0].content: an 'image' content part's embedded image bytes are not read; give a path, or the "
        "image in data.image_column"
    )
    # datasets writes a missing field as null: {"url": null, "path": ...} names its path, {"bytes": null} too
    for image in ({"url": None, "path": "b.png"}, {"bytes": None, "path": "b.png"}, {"bytes": b"", "path": "b.png"}):
        row = Row({"messages": [{"role": "user", "content": [{"type": "image", "image": image}]}, _a()]}, "f:2")
        assert read_samples([row], stage="sft")[0].images == ["b.png"]


def test_an_images_column_of_datasets_images_reads_paths_or_refuses_bytes():
    """An images column of datasets' {bytes, path} objects was str()-ed into the path "{'bytes': None, 'path':
    'a.png'}"; now its path as data.images.image_value reads it, or (bytes) one line naming the column."""
    from deltatune.data.images import image_value

    rows = [Row({"messages": [_u("<image>x"), _a()], "images": [{"bytes": None, "path": "a.png"}]}, "f:3")]
    value = rows[0].data["images"][0]
    assert read_samples(rows, stage="sft")[0].images == [image_value(value, "f:3", "images")[1]] == ["a.png"]
    rows = [Row({"messages": [_u("<image>x"), _a()], "pics": [{"bytes": _png((0, 0, 255)), "path": "a.png"}]}, "f:3")]
    with pytest.raises(DataError) as err:
        read_samples(rows, {"images": "pics"}, stage="sft")
    assert str(err.value) == (
        "f:3: column 'pics': an image's embedded bytes are not read; give image paths, or the image in "
        "data.image_column"
    )


def test_a_null_role_tag_means_no_such_tag():
    """data.tags.system_tag: null (LLaMA-Factory: no system tag, its converter then reads no system turn) was a
    ConfigError since 6d9bbf9; null is taken for the five role tags (no role matches it), not for role_tag or
    content_tag (the fields every turn is read by)."""
    from deltatune.config import ConfigError

    row = Row({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "f:1")
    s = read_samples([row], None, "sharegpt", {"system_tag": None}, "sft")[0]
    assert [(m["role"], m["content"]) for m in s.messages] == [("user", "q"), ("assistant", "a")]
    bad = Row({"conversations": [{"from": "system", "value": "S"}, *row.data["conversations"]]}, "f:1")
    with pytest.raises(DataError, match=r"^f:1: conversations\[0\].from: unknown role='system' \(known roles: "
                                        r"'human', 'gpt', 'observation', 'function_call';"):  # fmt: skip
        read_samples([bad], None, "sharegpt", {"system_tag": None}, "sft")
    for tag in ("role_tag", "content_tag"):
        with pytest.raises(ConfigError, match=rf"^data.tags.{tag}: must be a tag"):
            read_samples([row], None, "sharegpt", {tag: None}, "sft")


@pytest.mark.parametrize("key", ["name", "tool_call_id"])
def test_a_tool_messages_number_id_is_written_as_text(key):
    """A tool message's tool_call_id or name given as a number (7) was refused since 6bbfd89; a template writes it
    as its digits, so it is read as "7" (a list or an object is still refused)."""
    call = {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "id": "7"}]}
    row = {"messages": [_u(), call, {"role": "tool", "content": "1", key: 7}, _a()], "tools": TOOLS}
    assert read_samples([Row(row, "f:6")], stage="sft")[0].messages[2][key] == "7"
    row["messages"][2][key] = {"id": 7}
    with pytest.raises(
        DataError, match=rf"^f:6: messages\[2\].{key}: the tool message's {key} must be text, got dict"
    ):
        read_samples([Row(row, "f:6")], stage="sft")
