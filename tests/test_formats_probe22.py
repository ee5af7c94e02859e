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


LF_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
           "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}  # fmt: skip
"""LLaMA-Factory's DatasetAttr tag defaults, which data.tags overrides."""


def _lf_openai(messages: list[dict], tags: dict, ranking: bool = False) -> list[str] | None:
    """LLaMA-Factory's OpenAIDatasetConverter with dataset_info.json ``tags``: the aligned roles it keeps, None for a
    row it drops. A message's role read by role_tag, the tag of a system message first taken off, an assistant or
    function message with tool_calls a function call, observations merged and flushed only before a later message
    (trailing ones lost), then turns alternating user/observation and assistant/function, an even count (odd for a
    ranking row's prompt)."""
    t = {**LF_TAGS, **tags}
    mapping = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["observation_tag"]: "observation",
               t["function_tag"]: "function", t["system_tag"]: "system"}  # fmt: skip
    if t["system_tag"] and messages and messages[0][t["role_tag"]] == t["system_tag"]:
        messages = messages[1:]
    aligned, pending = [], []
    for m in messages:
        role = m[t["role_tag"]]
        if role in (t["assistant_tag"], t["function_tag"]) and m.get("tool_calls"):
            role = t["function_tag"]
        if role == t["observation_tag"]:
            pending.append(m[t["content_tag"]])
            continue
        if pending:
            aligned.append("observation")
            pending = []
        aligned.append(mapping[role])
    accept = (("user", "observation"), ("assistant", "function"))
    if not all(r in accept[i % 2] for i, r in enumerate(aligned)) or len(aligned) % 2 != int(ranking):
        return None
    return aligned


OPENAI_TAGS_GIVEN = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "observation_tag": "tool", "function_tag": "function", "system_tag": "system"}  # fmt: skip
FUNCTION = {"role": "function", "content": '{"name": "f", "arguments": {}}'}


def test_openai_formatting_reads_data_tags_as_llamafactory():
    """Under data.format=openai data.tags was not read: function_tag: function (LLaMA-Factory's assistant-side call)
    read as OpenAI's deprecated function result, a tool message, and the row refused as "a 'function' message after
    a 'user' message ... LLaMA-Factory drops the row", which LLaMA-Factory keeps. Now the tags are read as its
    converter reads them: the call is an answer holding the call, the order checked by the tags."""
    tags = OPENAI_TAGS_GIVEN
    row = {"messages": [_u(), FUNCTION, {"role": "tool", "content": "1"}, _a()], "tools": TOOLS}
    assert _lf_openai(row["messages"], tags) == ["user", "function", "observation", "assistant"]
    s = read_samples([Row(row, "f:1")], None, "openai", tags, "sft")[0]
    assert [(m["role"], m["content"], [c["function"]["name"] for c in m.get("tool_calls", [])]) for m in s.messages] == [
        ("user", "q", []), ("assistant", "", ["f"]), ("tool", "1", []), ("assistant", "a", [])]  # fmt: skip
    # the order by the tags: a call answered by an answer is out of order for LLaMA-Factory too
    bad = {"messages": [_u(), FUNCTION, _a()], "tools": TOOLS}
    assert _lf_openai(bad["messages"], tags) is None
    with pytest.raises(
        DataError, match=r"^f:1: messages\[2\].role: an 'assistant' message after a 'function' message"
    ):
        read_samples([Row(bad, "f:1")], None, "openai", tags, "sft")
    # renamed tags: a row of {speaker, text} with its own role names
    named = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}
    rows = [Row({"messages": [{"speaker": "me", "text": "q"}, {"speaker": "bot", "text": "a"}]}, "f:2")]
    assert _lf_openai(rows[0].data["messages"], named) == ["user", "assistant"]
    s = read_samples(rows, None, "openai", named, "sft")[0]
    assert [(m["role"], m["content"]) for m in s.messages] == [("user", "q"), ("assistant", "a")]
    two = [
        Row(
            {
                "messages": [
                    {"speaker": "me", "text": "q"},
                    {"speaker": "me", "text": "r"},
                    rows[0].data["messages"][1],
                ]
            },
            "f:3",
        )
    ]
    assert _lf_openai(two[0].data["messages"], named) is None
    with pytest.raises(DataError, match=r"^f:3: messages\[1\].speaker: a 'me' message after a 'me' message"):
        read_samples(two, None, "openai", named, "sft")


def test_openai_formatting_order_reads_from_keys():
    """The openai order check read m["role"] only, where the messages are read by 'role' or 'from' ('value'): rows
    of {from, value} skipped it (two user turns trained as written)."""
    msgs = [{"from": "user", "value": "q"}, {"from": "user", "value": "r"}, {"from": "assistant", "value": "a"}]
    assert _lf_openai(msgs, {"user_tag": "user", "assistant_tag": "assistant"}) is None
    with pytest.raises(DataError, match=r"^f:1: messages\[1\].role: a 'user' message after a 'user' message"):
        read_samples([Row({"messages": msgs}, "f:1")], data_format="openai", stage="sft")


def test_openai_conversation_ending_with_tool_results_is_refused():
    """LLaMA-Factory's openai converter merges tool results only when a later message comes: trailing ones are
    never read, so a ranking row whose conversation ends with them ends on the call and is dropped (an even count);
    after a user message they are lost and the row kept; PPO's prompt loses them and the call. Under data.format=openai
    such rows were read with the results as the prompt's end, or refused as "a 'tool' message after a 'user' message
    ... LLaMA-Factory drops the row"; now refused saying so. Detected messages rows read them."""
    tool = {"role": "tool", "content": "1"}
    msgs = [_u(), CALL, tool]
    row = {"messages": msgs, "chosen": _a("x"), "rejected": _a("y"), "tools": TOOLS}
    assert _lf_openai(msgs, OPENAI_TAGS_GIVEN, ranking=True) is None
    with pytest.raises(DataError) as err:
        read_samples([Row(row, "f:4")], data_format="openai", stage="dpo")
    assert str(err.value) == (
        "f:4: messages[2].role: the conversation ends with tool results, which data.format=openai (LLaMA-Factory's "
        "formatting) reads only before a later message (its converter leaves them out; a ranking row then ends on "
        "the call, and is dropped); give them before a user message"
    )
    assert [m["role"] for m in read_samples([Row(row, "f:4")], stage="dpo")[0].messages] == [
        "user",
        "assistant",
        "tool",
    ]
    # after a user message: kept by LLaMA-Factory without them
    after_user = {**row, "messages": [_u(), tool, tool]}
    assert _lf_openai(after_user["messages"], OPENAI_TAGS_GIVEN, ranking=True) == ["user"]
    with pytest.raises(
        DataError, match=r"^f:4: messages\[1\].role: the conversation ends with tool results, .*out\); "
    ):
        read_samples([Row(after_user, "f:4")], data_format="openai", stage="dpo")
    # PPO: LLaMA-Factory's prompt is the user message alone (the call its response), the results lost
    assert _lf_openai(msgs, OPENAI_TAGS_GIVEN) == ["user", "function"]
    with pytest.raises(
        DataError, match=r"^f:4: messages\[2\].role: the conversation ends with tool results, .*a later"
    ):
        read_samples([Row({"messages": msgs, "tools": TOOLS}, "f:4")], data_format="openai", stage="ppo")


def test_openai_formatting_keeps_an_opening_answer():
    """Kept on purpose: a conversation opening with an answer (a greeting) trains under data.format=openai, where
    LLaMA-Factory's converter drops the row (as for sharegpt, see _sharegpt_order)."""
    msgs = [_a("hello"), _u(), _a()]
    assert _lf_openai(msgs, OPENAI_TAGS_GIVEN) is None
    s = read_samples([Row({"messages": msgs}, "f:5")], data_format="openai", stage="sft")[0]
    assert [(m["role"], m["content"]) for m in s.messages] == [
        ("assistant", "hello"),
        ("user", "q"),
        ("assistant", "a"),
    ]


@pytest.mark.parametrize("tag", ["system_tag", "function_tag", "observation_tag"])
def test_a_null_role_tag_keeps_the_sharegpt_turn_order(tag):
    """A null role tag names no role, and the list is still sharegpt's: its turn order holds (7f8cedf read a sharegpt
    list by a 'function' role among the tags', so a null function_tag let two human turns in a row train)."""
    rows = [Row({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"},
                                   {"from": "gpt", "value": "a"}]}, "f:1")]  # fmt: skip
    with pytest.raises(DataError, match=r"^f:1: conversations\[1\].from: a 'human' turn after a 'human' turn"):
        read_samples(rows, None, "sharegpt", {tag: None}, "sft")
