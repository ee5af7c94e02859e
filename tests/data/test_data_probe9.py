"""Data probe 9: OpenAI's deprecated function-calling rows, and which tokens train where a chat template renders an
earlier turn otherwise than the conversation cut after it (DiffusionGemma after a tool response, Qwen3.5 once a
later user turn moves its last query), against TRL's training templates."""

from __future__ import annotations

import pytest
from tiny import tokenizer, trl_template

from deltatune.data.encode import encode_sft_samples
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row
from deltatune.data.templates import IGNORE_INDEX

SCHEMA = {"name": "get_weather", "description": "The weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip


def _samples(rows: list[dict]) -> list:
    return read_samples([Row(r, f"t.jsonl:{i + 3}") for i, r in enumerate(rows)], stage="sft")


def _qwen25():
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = trl_template("qwen2_5")
    return tok


def test_openais_deprecated_function_call_rows_train_the_call_as_tool_calls_rows_do():
    """Was: an assistant message's ``function_call`` was dropped without a word (the turn trained 'Checking.' alone,
    the call never), and the role ``function`` that answers it was refused. Now they read as OpenAI's fine-tuning
    format defines them: the call a tool call, ``function`` a tool message, the ``functions`` column the schemas."""
    legacy = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}], "functions": [SCHEMA]}  # fmt: skip
    call = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    modern = {"messages": [
        legacy["messages"][0], {"role": "assistant", "content": "Checking.", "tool_calls": call},
        {"role": "tool", "name": "get_weather", "content": "sunny"}, legacy["messages"][3]],
        "tools": [{"type": "function", "function": SCHEMA}]}  # fmt: skip
    tok = _qwen25()
    (old,) = encode_sft_samples(_samples([legacy]), tok, None, 512).examples
    (new,) = encode_sft_samples(_samples([modern]), tok, None, 512).examples
    assert old == new
    trained = tok.decode([lab for lab in old["labels"] if lab != IGNORE_INDEX])
    assert trained.startswith('checking. < tool _ call > { " name " : " get _ weather "')
    both = {**legacy["messages"][1], "tool_calls": call}
    with pytest.raises(DataError, match=r"^t.jsonl:3: messages\[1\]: both tool_calls and function_call"):
        _samples([{"messages": [legacy["messages"][0], both], "functions": [SCHEMA]}])
