"""Encode probe 23: a row's tool schema is read as vLLM (and ``deltatune serve``) read a request's tools: parameters
written as JSON text are the object they hold (they trained as a quoted text where a served prompt holds the
schema), and a description that is not a text or parameters that are not an object are refused naming the row and
the tool (they trained a prompt the server refuses to build)."""

from __future__ import annotations

import json
import re

import pytest

from deltatune.data.encode import choose_template, encode_sft_samples
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row
from deltatune.serve.engine import RequestError
from deltatune.serve.prompts import _tools

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
U = {"role": "user", "content": "Weather in Paris?"}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
MESSAGES = [U, CALL, {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]


@pytest.fixture(scope="module")
def tok():
    from tiny import smollm2_tokenizer, trl_template

    t = smollm2_tokenizer()
    t.chat_template = trl_template("qwen2_5")  # (prints each tool schema with tojson)
    return t


def _encode(tok, tools):
    s = read_samples([Row({"messages": MESSAGES, "tools": tools}, "t.jsonl:1")], {}, stage="sft")
    return encode_sft_samples(s, tok, choose_template(s, tok, None, "sft"), 4096).examples[0]["input_ids"]


def _served(tok, tool):
    """The prompt ids a served request with ``tool`` gets (deltatune serve's tools, vLLM's dump)."""
    tools = _tools({"tools": [tool], "tool_choice": "none"})
    msgs = [U, {**CALL, "tool_calls": [{"type": "function", "function": CALL["tool_calls"][0]}]}, *MESSAGES[2:]]
    return tok(tok.apply_chat_template(msgs, tools=tools, tokenize=False), add_special_tokens=False)["input_ids"]


def test_parameters_written_as_json_text_train_the_served_schema(tok):
    """They trained as ``"parameters": "{\\"type\\": ...}"``; the served prompt (and the same row with the object)
    holds the schema itself."""
    fn = {"name": "get_weather", "description": "Weather of a city"}
    served = _served(tok, {"type": "function", "function": {**fn, "parameters": PARAMS}})
    as_text = {**fn, "parameters": json.dumps(PARAMS)}
    for tools in ([as_text], json.dumps([as_text]), [{"type": "function", "function": as_text}]):
        ids = _encode(tok, tools)
        assert ids == served
        assert '"properties": {"city"' in tok.decode(ids)
    assert _encode(tok, [{**fn, "parameters": PARAMS}]) == served


@pytest.mark.parametrize(
    "bad, says",
    [
        ({"parameters": [1]}, "the parameters must be a JSON Schema object, got list"),
        ({"parameters": '["city"]'}, "the parameters must be a JSON Schema object, got list"),
        ({"parameters": "{city"}, "the parameters are not valid JSON"),
        ({"description": 5}, "the description must be a text, got int"),
    ],
)
def test_a_schema_the_server_refuses_is_refused_naming_the_row(tok, bad, says):
    """Each was accepted and trained (``"parameters": [1]``, ``"description": 5`` in the prompt); deltatune serve,
    as vLLM, refuses such a tool in a request."""
    fn = {"name": "get_weather", "description": "Weather of a city", "parameters": PARAMS, **bad}
    if not isinstance(bad.get("parameters"), str):
        with pytest.raises(RequestError):
            _tools({"tools": [{"type": "function", "function": fn}], "tool_choice": "none"})
    with pytest.raises(DataError, match=rf"^t\.jsonl:1: tools\[0\]: {says}$"):
        _encode(tok, [fn])


DEEP = "[" * 100_000 + "]" * 100_000  # (json.loads: RecursionError, not a JSONDecodeError)


@pytest.mark.parametrize(
    "row, says",
    [
        ({"tools": DEEP}, "column 'tools': JSON nested too deep to read"),
        ({"tools": [{"name": "get_weather", "parameters": DEEP}]}, "tools[0]: the parameters: JSON nested too deep"),
        ({"messages": [U, {**CALL, "tool_calls": DEEP}]}, "messages[1].tool_calls: JSON nested too deep to read"),
        (
            {"messages": [U, {**CALL, "tool_calls": [{"name": "get_weather", "arguments": DEEP}]}]},
            "messages[1].tool_calls[0].arguments: JSON nested too deep to read",
        ),
    ],
)
def test_json_nested_too_deep_is_refused_in_one_line(tok, row, says):
    """A tools column, schema parameters, tool calls or arguments nested past Python's recursion limit raised
    RecursionError from inside json (deltatune serve answers such arguments with a 400)."""
    row = {"messages": MESSAGES, "tools": [{"name": "get_weather", "parameters": PARAMS}], **row}
    with pytest.raises(DataError) as e:
        read_samples([Row(row, "t.jsonl:1")], {}, stage="sft")
    assert str(e.value).startswith("t.jsonl:1: " + says) and "\n" not in str(e.value)


def test_json_nested_600_deep_decodes_but_is_refused_naming_the_row_when_rendered(tok):
    """Nested 600 deep, json decodes the parameters; transformers' chat-template rendering copies them recursively
    and raised a bare RecursionError naming no row."""
    deep = '{"a": ' + "[" * 600 + "]" * 600 + "}"
    with pytest.raises(DataError, match=r"^t\.jsonl:1: JSON nested too deep to render with the chat template$"):
        _encode(tok, [{"name": "get_weather", "parameters": deep}])


def test_chat_template_kwargs_nested_too_deep_is_refused_naming_the_row():
    row = {"messages": MESSAGES, "tools": [{"name": "get_weather"}], "chat_template_kwargs": DEEP}
    with pytest.raises(DataError, match=r"^t\.jsonl:1: column 'chat_template_kwargs': JSON nested too deep to read$"):
        read_samples([Row(row, "t.jsonl:1")], {}, stage="sft")


@pytest.mark.parametrize("name", ["deep.jsonl", "deep.json"])
def test_a_file_line_nested_too_deep_is_refused_naming_file_and_line(tmp_path, name):
    """A .jsonl line (or a .json list's item) nested 5000 deep raised RecursionError from inside json."""
    from deltatune.data.load import read_rows

    row = f'{{"messages": {json.dumps(MESSAGES)}, "tools": [{{"name": "f", "parameters": {DEEP[::20]}}}]}}'
    path = tmp_path / name
    path.write_text(f"{json.dumps({'messages': MESSAGES})}\n{row}\n" if name.endswith("l") else f"[{{}},\n{row}]\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: nested too deep to read$"):
        read_rows(str(path))


def test_a_tool_whose_type_is_not_function_is_refused_naming_row_and_tool(tok):
    """``{"type": "retrieval", ...}`` trained as written; deltatune serve (as vLLM's ChatCompletionToolsParam, a
    Literal["function"]) refuses it in a request."""
    tool = {"type": "retrieval", "function": {"name": "get_weather", "parameters": PARAMS}}
    with pytest.raises(RequestError):
        _tools({"tools": [tool], "tool_choice": "none"})
    with pytest.raises(DataError, match=r"^t\.jsonl:1: tools\[0\]: the tool's type must be 'function'.*'retrieval'$"):
        _encode(tok, [tool])


def test_deltatunes_own_recursion_on_a_shallow_row_is_raised_as_it_is(tok, monkeypatch):
    """bec5493 turned any RecursionError while a row renders into "JSON nested too deep" on that row: a recursion
    bug of deltatune's own on a shallow row read as the user's data (review). Now only a row nested 100 deep is."""
    import deltatune.data.templates as T

    def recursing(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded (deltatune's own)")

    monkeypatch.setattr(T, "encode_chat", recursing)
    with pytest.raises(RecursionError, match="deltatune's own"):
        _encode(tok, [{"name": "get_weather"}])


def test_serve_answers_tools_too_deep_to_render_with_a_400(tok):
    """JSON reads a tool's parameters 600 deep, transformers' rendering does not: a 500 from the engine's request
    path (a bare RecursionError); a 400 as training's one line (review)."""
    from deltatune.serve.fields import RequestError
    from deltatune.serve.prompts import _chat_ids, _rendering

    deep = {"a": json.loads("[" * 600 + "]" * 600)}
    body = {"tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}], "tool_choice": "none"}
    with pytest.raises(RequestError, match="JSON nested too deep to render with the chat template"):
        _chat_ids(tok, [{"role": "user", "content": "hi"}], None, _rendering(body, None))
