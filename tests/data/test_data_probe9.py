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


MULTIPLY = [{"type": "function", "function": {"name": "multiply", "description": "Multiply two integers.",
             "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]  # fmt: skip
CALL = [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 2, "b": 3}}}]
TOOL_CHAT = [
    {"role": "user", "content": "What is 2 * 3?"},
    {"role": "assistant", "content": "", "tool_calls": CALL},
    {"role": "tool", "name": "multiply", "content": "6"},
    {"role": "assistant", "content": "It is 6."},
]


def _trained_runs(ids: list[int], trained: list[bool]) -> list[list[int]]:
    runs, cur = [], []
    for i, bit in zip(ids, trained):
        if bit:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + [cur] if cur else runs


def test_diffusion_gemmas_answer_after_a_tool_response_trains_without_the_header_its_prompt_leaves_out():
    """Was: after a tool response DiffusionGemma's generation prompt writes nothing (the prompt ends at
    <tool_response|>), while the answer that follows opens <|turn>model\\n: that header trained with the answer.
    Now the answer trains as TRL's diffusion_gemma_training marks it ('It is 6.<turn|>\\n'); the ids are unchanged."""
    tok = tokenizer()
    specials = ["<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                "<tool_response|>", '<|"|>']  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = trl_template("diffusion_gemma")
    (ex,) = encode_sft_samples(_samples([{"messages": TOOL_CHAT, "tools": MULTIPLY}]), tok, None, 512).examples
    ref = tok.apply_chat_template(TOOL_CHAT, tools=MULTIPLY, chat_template=trl_template("diffusion_gemma_training"),
                                  return_dict=True, return_assistant_tokens_mask=True)  # fmt: skip
    assert ex["input_ids"] == list(ref["input_ids"])
    ours = _trained_runs(ex["input_ids"], [lab != IGNORE_INDEX for lab in ex["labels"]])
    theirs = _trained_runs(ex["input_ids"], [bool(b) for b in ref["assistant_masks"]])
    assert ours[-1] == theirs[-1]
    assert tok.decode(ours[-1]) == "it is 6. <turn|>"
    # (the call's run also trains the <|tool_response> the template writes where the model stops to call)
    assert tok.decode(ours[0]) == tok.decode(theirs[0]) + " <|tool_response>"


AGENT_CHAT = [
    {"role": "user", "content": "What is 2 * 3?"},
    {"role": "assistant", "content": "Let me compute.", "tool_calls": CALL},
    {"role": "tool", "name": "multiply", "content": "6"},
    {"role": "assistant", "content": "It is 6."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "Welcome."},
]


@pytest.mark.parametrize("name", ["qwen3_5_nothink", "qwen3_6"])
def test_qwen3_5_agent_rows_with_a_later_user_turn_train_each_answer_through_its_end_marker(name):
    """Was refused ('messages[3]: ... cannot be located'): Qwen3.5/3.6 write a think block on each turn after the last
    user query, so the conversation cut at the answer after the tool response renders the call turn with one, the
    whole conversation (a later user turn) without. Now each earlier answer trains as the whole conversation writes
    it, through its <|im_end|>\\n, as an earlier Qwen3 turn does; the ids are apply_chat_template's."""
    from deltatune.data.templates import encode_chat, render

    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.chat_template = trl_template(name)
    text, spans = render(AGENT_CHAT, tok, None, tools=MULTIPLY, train_stop=True)
    assert text == tok.apply_chat_template(AGENT_CHAT, tools=MULTIPLY, tokenize=False)
    call = "<tool_call>\n<function=multiply>\n<parameter=a>\n2\n</parameter>\n<parameter=b>\n3\n</parameter>\n</function>\n</tool_call>"  # fmt: skip
    last = "Welcome.<|im_end|>\n" if name == "qwen3_5_nothink" else "\n</think>\n\nWelcome.<|im_end|>\n"
    assert [text[s:e] for s, e in spans] == [f"Let me compute.\n\n{call}<|im_end|>\n", "It is 6.<|im_end|>\n", last]
    ids, _ = encode_chat(AGENT_CHAT, tok, None, MULTIPLY)
    assert ids == tok.apply_chat_template(AGENT_CHAT, tools=MULTIPLY, return_dict=True)["input_ids"]


def test_a_turn_whose_call_and_content_the_template_writes_apart_is_still_refused():
    """DiffusionGemma writes an earlier turn's call, then the tool's response, then the turn's content: no one span
    holds the turn, so it is refused rather than trained without its call."""
    tok = tokenizer()
    tok.chat_template = trl_template("diffusion_gemma")
    with pytest.raises(DataError, match=r"^t.jsonl:3: messages\[1\]: .* cannot be located"):
        encode_sft_samples(_samples([{"messages": AGENT_CHAT, "tools": MULTIPLY}]), tok, None, 512)


@pytest.mark.parametrize(("name", "lead", "trim"), [("qwen3_5_nothink", "", str.strip), ("nemotron_3_nano", "</think>", str.rstrip)])  # fmt: skip
@pytest.mark.parametrize("first", ["Hello.\n", "\nHello.", " Hello.  "])
def test_answers_with_edge_whitespace_that_the_template_trims_train_as_the_bare_answers_do(name, lead, trim, first):
    """Was refused ('messages[1]: ... cannot be located'): Qwen3.5's and Nemotron 3's templates trim an answer, so a
    multi-turn row whose earlier answer ends with a line break (as many files write them) could not be located. Now it
    trains what the template writes, as the same row with the bare answers does."""
    from deltatune.data.templates import render

    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.chat_template = trl_template(name)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Bye.\n"}]  # fmt: skip
    text, found = render(chat, tok, None, train_stop=True)
    assert text == tok.apply_chat_template(chat, tokenize=False)
    assert [text[s:e] for s, e in found] == [f"{lead}{trim(first)}<|im_end|>\n", f"{lead}Bye.<|im_end|>\n"]


def test_data_inspect_names_rows_whose_every_answer_has_weight_0_apart_from_rows_cut_by_max_length(tmp_path):
    """Was: a row whose only answer has OpenAI's weight 0 (training leaves it out: nothing trains) was counted as
    'no response token within data.max_length', though it fits. Now it is counted under its own reason."""
    import json

    from tiny import minilm_path

    from deltatune.data.inspect import inspect

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo.", "weight": 0}]
    rows = [{"messages": chat}, {"messages": [chat[0], {"role": "assistant", "content": "Hello."}]}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = inspect(str(path), minilm_path(), "sft", max_length=64, template="chatml", show=0).splitlines()
    assert report[-1] == "rows left out of training: 1 (every answer has weight 0, nothing to learn)"
    assert not any("no response token" in line for line in report)


def test_an_earlier_turn_found_by_its_content_is_refused_where_its_reasoning_would_be_left_untrained():
    """Finding a turn where the whole conversation writes its content (the Qwen3.5 rows above) trains the content
    through its end marker; where the conversation also writes the turn's reasoning before it, that span would
    leave the reasoning untrained, so such a turn is refused instead."""
    from deltatune.data.templates import ChatTemplateError, render

    tok = tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}<u>{{ m.content }}</u>{% else %}<a>{% if loop.last %}[last]"
        "{% endif %}<r>{{ m.reasoning_content }}</r>{{ m.content }}</a>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet."},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Bye.", "reasoning_content": "Part."}]  # fmt: skip
    with pytest.raises(ChatTemplateError, match=r"^messages\[1\]: .* cannot be located"):
        render(chat, tok, None)


@pytest.mark.parametrize("body", ['{"instruction": "Hi", "output": "Hello."}\n',
                                  '\n{\n  "instruction": "Hi",\n  "output": "Hello."\n}\n'])  # fmt: skip
def test_a_json_file_of_one_object_is_one_row_as_the_datasets_library_reads_it(tmp_path, body):
    """Was refused ('expected a JSON list of objects'): a .json file holding one row (a one-line JSON Lines file, or
    one object spread over lines), which ``datasets.load_dataset("json")`` reads as one row."""
    from deltatune.data.load import read_rows

    path = tmp_path / "one.json"
    path.write_text(body, encoding="utf-8")
    (row,) = read_rows(str(path))
    assert row.data == {"instruction": "Hi", "output": "Hello."}
    assert row.source == f"{path}:{1 if body.startswith('{') else 2}"
    path.write_text('"just text"', encoding="utf-8")
    with pytest.raises(DataError, match=r"one.json: expected a JSON list of objects \(or one object\), got str$"):
        read_rows(str(path))


def test_tool_call_arguments_encoded_twice_train_as_the_json_object_and_non_objects_are_refused():
    """Was: arguments written as JSON text and encoded again as a JSON string (as some converted agent sets hold them)
    reached Qwen2.5's template as a string, which it writes through tojson: the call trained
    '"arguments": "{\\"a\\": 2, ...}"', escaped. Now they decode to the object, and the row trains as the plain one;
    arguments that are no object (a list, a number) are refused naming the call."""
    import json

    def row(arguments):
        call = [{"type": "function", "function": {"name": "multiply", "arguments": arguments}}]
        return {"messages": [TOOL_CHAT[0], {"role": "assistant", "content": None, "tool_calls": call}, *TOOL_CHAT[2:]],
                "tools": MULTIPLY}  # fmt: skip

    tok = _qwen25()
    twice, once = (
        encode_sft_samples(_samples([row(args)]), tok, None, 512).examples[0]
        for args in (json.dumps(json.dumps({"a": 2, "b": 3})), {"a": 2, "b": 3})
    )
    assert twice == once
    with pytest.raises(DataError, match=r"^t.jsonl:3: messages\[1\].tool_calls\[0\].arguments: must be a JSON object"):
        _samples([row("[2, 3]")])


def test_an_alpaca_rows_tools_column_reaches_the_template_as_llama_factory_reads_it():
    """Was: an alpaca row's ``tools`` column (LLaMA-Factory's alpaca converter reads it) was dropped without a word,
    so the schemas never reached the system prompt. Now the row renders as the same messages row with its tools."""
    tok = _qwen25()
    alpaca = {"instruction": "Weather in Paris?", "output": "Sunny.", "tools": [SCHEMA]}
    messages = {"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Sunny."}],
                "tools": [SCHEMA]}  # fmt: skip
    (a,), (m,) = (encode_sft_samples(_samples([r]), tok, None, 512).examples for r in (alpaca, messages))
    assert a == m
    assert "get _ weather" in tok.decode(a["input_ids"])
