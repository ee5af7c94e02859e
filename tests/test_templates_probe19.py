"""Templates probe 19: the built-in chatml and alpaca templates against LLaMA-Factory's rule written out by hand
(``Template._encode``: prefix + system only where the system is non-empty, each user slot untrained, each assistant
slot trained) on SmolLM2's tokenizer, whose EOS is chatml's ``<|im_end|>``; sharegpt and alpaca rows read as
LLaMA-Factory's converters read them, a row out of its turn order refused in one line naming file:line."""

from __future__ import annotations

import pytest

from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row
from deltatune.data.templates import IGNORE_INDEX, encode_chat, render


@pytest.fixture(scope="module")
def tok():
    from tiny import smollm2_tokenizer

    return smollm2_tokenizer()


def _lf_chatml(tok, system: str, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's chatml (efficient_eos False, replace_eos: the EOS is <|im_end|>): each slot encoded on its
    own, ``if system or tools`` the system slot before the first user slot, the assistant slot trained whole."""
    ids, labels = [], []
    for i, (query, answer) in enumerate(turns):
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if i == 0 and system else ""
        prompt = tok.encode(head + f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n",
                            add_special_tokens=False)  # fmt: skip
        response = tok.encode(f"{answer}<|im_end|>\n", add_special_tokens=False)
        ids += prompt + response
        labels += [IGNORE_INDEX] * len(prompt) + response
    return ids, labels


def _messages(system: str | None, turns: list[tuple[str, str]]) -> list[dict]:
    out = [] if system is None else [{"role": "system", "content": system}]
    for q, a in turns:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


TURNS = [("Hi", "Hello."), ("What is 2+2?", "4, of course.")]


@pytest.mark.parametrize("system", [None, "Be brief.", ""])
def test_chatml_ids_and_labels_are_llamafactorys(tok, system):
    """Multi-turn, with a system prompt, and with an empty one: LLaMA-Factory writes no system block for system ""
    (its ``if system or tools``); the built-in chatml rendered an empty ``<|im_start|>system\\n<|im_end|>\\n``."""
    ids, labels = encode_chat(_messages(system, TURNS), tok, "chatml")
    want_ids, want_labels = _lf_chatml(tok, system or "", TURNS)
    assert tok.decode(ids) == tok.decode(want_ids)
    assert (ids, labels) == (want_ids, want_labels)


@pytest.mark.parametrize("template", ["chatml", "alpaca", "plain"])
def test_empty_system_message_writes_nothing(tok, template):
    """An OpenAI row's system message "" (LLaMA-Factory's openai converter reads it as system "", then no system
    slot): the built-in templates render the conversation as without it (alpaca wrote a stray "\\n\\n" first)."""
    with_empty = render(_messages("", TURNS), tok, template)
    assert with_empty == render(_messages(None, TURNS), tok, template)
    assert not with_empty[0].startswith(("\n", "<|im_start|>system"))


def test_alpaca_answers_train_through_eos(tok):
    """The built-in alpaca: LLaMA-Factory's prompt text (its user slot ends with ``### Response:\\n``) and each answer
    trained through the EOS; the ``\\n\\n`` LLaMA-Factory's slot writes after the EOS stays untrained here (TRL's rule:
    nothing after the EOS trains); since probe 24 after LLaMA-Factory's default system."""
    ids, labels = encode_chat(_messages(None, TURNS), tok, "alpaca")
    text = tok.decode(ids)
    assert text == ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                    "request.\n\n### Instruction:\nHi\n\n### Response:\nHello.<|im_end|>\n\n"
                    "### Instruction:\nWhat is 2+2?\n\n### Response:\n4, of course.<|im_end|>\n\n")  # fmt: skip
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert trained == tok.encode("Hello.<|im_end|>4, of course.<|im_end|>", add_special_tokens=False)


def _read(row: dict):
    return read_samples([Row(row, "f.jsonl:3")], {}, stage="sft")[0].messages


def test_alpaca_history_and_input_as_llamafactory_converts():
    """AlpacaDatasetConverter: system column, history pairs, then instruction + "\\n" + input as one user turn."""
    row = {"instruction": "Q", "input": "ctx", "output": "A", "history": [["q1", "a1"]], "system": "S"}
    assert _read(row) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "Q\nctx"},
        {"role": "assistant", "content": "A"},
    ]


@pytest.mark.parametrize(
    "turns, why",
    [
        (["human", "human", "gpt"], "conversations[1].from: a 'human' turn after a 'human' turn"),
        (["human", "observation", "gpt"], "conversations[1].from: an 'observation' turn after a 'human' turn"),
        (["human", "gpt", "human"], "last message is a user turn"),
        (["human", "gpt", "system", "human", "gpt"], "conversations[2].from: a system turn"),
    ],
)
def test_sharegpt_out_of_order_is_one_line(turns, why):
    """SharegptDatasetConverter drops these rows ('Invalid role tag', 'Invalid message count'): one line here."""
    row = {"conversations": [{"from": r, "value": f"t{i}"} for i, r in enumerate(turns)]}
    with pytest.raises(DataError) as err:
        _read(row)
    assert str(err.value).startswith("f.jsonl:3: ") and why in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "call, where",
    [
        ({"name": "get_weather", "parameters": {"city": "Paris"}}, "f.jsonl:3: conversations[1].value"),
        ([{"name": "get_weather", "parameters": {"city": "Paris"}}], "f.jsonl:3: conversations[1].value[0]"),
        ({"function": {"name": "get_weather", "parameters": {"city": "Paris"}}}, "f.jsonl:3: conversations[1].value"),
        (
            {"name": "get_weather", "arguments": None, "parameters": {"city": "Paris"}},
            "f.jsonl:3: conversations[1].value",
        ),
    ],
)
def test_call_with_parameters_not_arguments_is_one_line(call, where):
    """A call written {name, parameters} (Llama 3's output shape): LLaMA-Factory's FunctionFormatter reads
    ``tool_call["arguments"]`` and fails on it; it was read as a call with no arguments (``{}``), trained so."""
    import json

    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ],
        "tools": json.dumps([{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}]),
    }
    with pytest.raises(DataError) as err:
        _read(row)
    assert str(err.value).startswith(f"{where}: the call writes its arguments under 'parameters'")
    row["conversations"][1]["value"] = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert _read(row)[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_flat_tool_schema_is_wrapped_as_chat_completions_send_it():
    """A flat schema with OpenAI Responses' ``"type": "function"`` beside its name renders as the nested one a chat
    completions request sends (and LLaMA-Factory's ToolFormatter reads: ``tool["function"]`` where the type is
    "function"); the type was kept inside the function, so the rendered tools differed from a served request's."""
    from deltatune.data.tools import row_tools

    fn = {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}}
    nested = row_tools(Row({"tools": [{"type": "function", "function": fn}]}, "f.jsonl:3"), "tools")
    assert row_tools(Row({"tools": [{"type": "function", **fn}]}, "f.jsonl:3"), "tools") == nested
    assert row_tools(Row({"tools": [fn]}, "f.jsonl:3"), "tools") == nested == [{"type": "function", "function": fn}]
