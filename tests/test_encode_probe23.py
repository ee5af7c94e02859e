"""Encode probe 23: a row's tool schema is read as vLLM (and ``deltatune serve``) read a request's tools: parameters
written as JSON text are the object they hold (they trained as a quoted text where a served prompt holds the
schema), and a description that is not a text or parameters that are not an object are refused naming the row and
the tool (they trained a prompt the server refuses to build)."""

from __future__ import annotations

import json

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
        ({"tools": DEEP}, "column 'tools' is not valid JSON"),
        ({"tools": [{"name": "get_weather", "parameters": DEEP}]}, "tools[0]: the parameters are not valid JSON"),
        ({"messages": [U, {**CALL, "tool_calls": DEEP}]}, "messages[1].tool_calls: a function call must be JSON"),
        (
            {"messages": [U, {**CALL, "tool_calls": [{"name": "get_weather", "arguments": DEEP}]}]},
            "messages[1].tool_calls[0].arguments: not valid JSON",
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
