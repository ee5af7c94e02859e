"""Chat and instruction rows -> token ids and labels, with the loss on assistant tokens only.

The check is exact: the labelled positions form one contiguous run per assistant turn, and each run's ids are
the tokens of that turn's content plus its end marker (the chat template's ``<|im_end|>``, or EOS for the
built-in templates, chatml's followed by its ``<|im_end|>`` where the EOS is no ``<|im_end|>``, untrained). Everything else, the system and user turns and the role headers, is -100.
"""

from __future__ import annotations

import pytest
from tiny import tokenizer

from deltatune.data.load import DataError, Row
from deltatune.data.templates import IGNORE_INDEX, TEMPLATES, encode_chat, render, to_messages

IM_END = "<|im_end|>"  # the end marker of the tokenizer's ChatML template (tests/tiny.py)
EOS = "[SEP]"  # the tiny tokenizer's EOS, which the built-in templates append to each answer

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, then red."},
]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The labelled ids, grouped into contiguous runs; every label is either -100 or its own input id."""
    assert len(ids) == len(labels)
    runs, previous = [], IGNORE_INDEX
    for tok_id, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == tok_id
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def _tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _expect_answers(tok, messages, template: str | None) -> None:
    ids, labels = encode_chat(messages, tok, template)
    marker = IM_END if template is None else EOS  # (chatml's <|im_end|>\n after MiniLM's [SEP] does not train)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _runs(ids, labels)
    assert runs == [_tokens(tok, a + marker) for a in answers]
    assert [tok.decode(r) for r in runs] == [tok.decode(_tokens(tok, a + marker)) for a in answers]
    # What is not labelled holds the prompts (the user's words are never learned).
    prompt_ids = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX]
    for m in messages:
        if m["role"] != "assistant":
            words = _tokens(tok, m["content"])
            assert any(prompt_ids[k : k + len(words)] == words for k in range(len(prompt_ids)))


@pytest.mark.parametrize("template", [None, "chatml", "alpaca", "plain"])
def test_alpaca_row(tok, template):
    row = Row({"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."}, "d.jsonl:1")
    messages = to_messages(row, {})
    assert messages == [
        {"role": "user", "content": "Add the numbers.\n2 and 3"},  # LLaMA-Factory joins them with one newline
        {"role": "assistant", "content": "The sum is 5."},
    ]
    _expect_answers(tok, messages, template)


def test_alpaca_row_with_system_and_renamed_columns(tok):
    row = Row({"q": "Say hi.", "a": "Hi!", "sys": "Be kind.", "ctx": ""}, "d.jsonl:1")
    messages = to_messages(row, {"instruction": "q", "output": "a", "system": "sys", "input": "ctx"})
    assert messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ]
    _expect_answers(tok, messages, None)


@pytest.mark.parametrize("template", [None, "chatml", "alpaca", "plain"])
def test_chat_row_role_content(tok, template):
    row = Row(
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
        "d.jsonl:1",
    )
    _expect_answers(tok, to_messages(row, {}), template)


def test_sharegpt_row_from_value(tok):
    row = Row(
        {
            "conversations": [
                {"from": "system", "value": "You are terse."},
                {"from": "human", "value": "Name a colour."},
                {"from": "gpt", "value": "Blue."},
                {"from": "human", "value": "Another one?"},
                {"from": "gpt", "value": "Green, then red."},
            ]
        },
        "d.jsonl:1",
    )
    messages = to_messages(row, {})
    assert messages == MULTI_TURN
    _expect_answers(tok, messages, None)


@pytest.mark.parametrize("template", [None, "chatml", "alpaca", "plain"])
def test_multi_turn_trains_on_every_assistant_turn(tok, template):
    ids, labels = encode_chat(MULTI_TURN, tok, template)
    assert len(_runs(ids, labels)) == 2
    _expect_answers(tok, MULTI_TURN, template)


def test_tokenizer_template_renders_the_text(tok):
    text, spans = render(MULTI_TURN[1:3], tok, None)
    assert text == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
    assert [text[s:e] for s, e in spans] == ["Blue.<|im_end|>\n"]
    prompt, _ = render(MULTI_TURN[1:2], tok, None, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "template, expected, trained",
    [
        (
            "chatml",
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
            "<|im_start|>assistant\nBlue.[SEP]<|im_end|>\n",
            "Blue.[SEP]",  # through the EOS: the <|im_end|>\n after MiniLM's [SEP] does not train (TRL's add_eos)
        ),
        (
            "alpaca",
            "You are terse.### Instruction:\nName a colour.\n\n### Response:\nBlue.[SEP]\n\n",  # (LLaMA-Factory's)
            "Blue.[SEP]",
        ),
        ("plain", "You are terse.\nName a colour.\nBlue.[SEP]\n", "Blue.[SEP]"),
    ],
)
def test_built_in_templates_render_the_text(tok, template, expected, trained):
    text, spans = render(MULTI_TURN[:3], tok, template)
    assert text == expected
    assert [text[s:e] for s, e in spans] == [trained]
    prompt, _ = render(MULTI_TURN[:2], tok, template, add_generation_prompt=True)
    assert prompt.endswith(TEMPLATES[template].generation_prefix)
    assert text.startswith(prompt)


def test_unknown_template(tok):
    with pytest.raises(DataError, match="unknown template 'vicuna'; built-in templates: chatml, alpaca, plain"):
        encode_chat(MULTI_TURN, tok, "vicuna")


def test_tokenizer_without_chat_template():
    tok = tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template; set data.template"):
        encode_chat(MULTI_TURN, tok, None)


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "yo"}], "role='narrator'"),
        ([], "non-empty list"),
    ],
)
def test_bad_conversations(messages, error):
    with pytest.raises(DataError, match=rf"d.jsonl:4: .*{error}"):
        to_messages(Row({"messages": messages}, "d.jsonl:4"), {})


# Gemma's templates raise "System role not supported", Mistral's "Conversation roles must alternate": jinja2's
# TemplateError came out of deltatune as a traceback. Now one line naming the row (or the request, or the prompt).
REFUSING = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_refuses_a_conversation_names_the_row_the_prompt_and_the_request():
    from deltatune.data.encode import encode_sft_samples, prompt_ids, rendered
    from deltatune.data.formats import read_samples
    from deltatune.serve.app import _chat_ids
    from deltatune.serve.engine import RequestError
    from deltatune.train import chat

    tok = tokenizer()
    tok.chat_template = REFUSING
    rows = [Row({"messages": MULTI_TURN[1:3]}, "d.jsonl:1"), Row({"messages": MULTI_TURN}, "d.jsonl:2")]
    samples = read_samples(rows, {}, stage="sft")
    assert len(encode_sft_samples(samples[:1], tok, None, 64).examples) == 1  # no system turn: rendered
    why = "the model's chat template refuses this conversation: System role not supported"
    with pytest.raises(DataError, match=rf"^d.jsonl:2: {why}$"):
        encode_sft_samples(samples, tok, None, 64)
    with pytest.raises(DataError, match=rf"^d.jsonl:2: {why}$"):
        rendered(samples[1], tok, None, "sft")  # what data inspect and the report show
    with pytest.raises(DataError, match=rf"^d.jsonl:2: {why}$"):
        prompt_ids(samples[1], tok, None, 64)
    with pytest.raises(DataError, match=rf"^{why}$"):  # deltatune generate --system
        chat.prompt_ids(tok, "Hi?", system="Be terse.")
    user = [{"role": "user", "content": "Hi?"}]
    assert (
        chat.prompt_ids(tok, "Hi?")
        == tok.apply_chat_template(user, add_generation_prompt=True, return_dict=True)["input_ids"]
    )
    with pytest.raises(RequestError, match=rf"^{why}$"):  # served: a 400 naming the reason, not a 500
        _chat_ids(tok, MULTI_TURN[:2])
    from deltatune.train.grpo import encode_prompts

    with pytest.raises(DataError, match=rf"^g.jsonl:1: {why}$"):  # a GRPO prompt given as messages
        encode_prompts([Row({"prompt": MULTI_TURN[:2]}, "g.jsonl:1")], tok, "prompt", 64, "truncate")


def test_an_earlier_turn_given_as_content_parts_is_relocated_as_its_text():
    """A vision-language row's assistant content is a list of parts: where the generation prompt is no prefix of the
    rendered turn, the relocation failed "'in <string>' requires string as left operand, not list"."""
    from deltatune.data.templates import _relocated

    text, before, through = "U: hi\nA: hello<end>\nU: more\n", "U: hi\nA: ", "U: hi\nA: hello<end>\n"
    spans = [_relocated(text, before, through, {"role": "assistant", "content": c}, lambda: "U: hi\n")
             for c in ("hello", [{"type": "text", "text": "hello"}])]  # fmt: skip
    assert spans == [(len(before), len("U: hi\nA: hello<end>\n")), spans[0]]
