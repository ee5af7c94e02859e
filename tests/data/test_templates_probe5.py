"""Templates probe 5: GLM-4.5/4.6's chat template (TRL's ``glm4moe``) writes no end-of-turn marker after an answer,
so SFT never trained a stop token. TRL's ``glm4moe_training`` template trains the role marker that follows each answer
(<|observation|> after a tool call, else <|user|>) and writes <|user|> after a final answer; deltatune's SFT rows now
train the same tokens, with the ids otherwise those of ``apply_chat_template``."""

from __future__ import annotations

import pytest
from tiny import tokenizer, trl_template

from deltatune.data.encode import rendered, sft_example
from deltatune.data.load import DataError
from deltatune.data.sample import Sample
from deltatune.data.templates import IGNORE_INDEX, encode_chat

GLM_SPECIALS = [
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<think>",
    "</think>",
]
CHAT = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, obviously."},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "multiply",
            "description": "Multiply two integers.",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "What is 2 * 3?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 2, "b": 3}}}],
    },
    {"role": "tool", "content": "6"},
    {"role": "assistant", "content": "It is 6."},
]


def _glm_tokenizer():
    """MiniLM's tokenizer with GLM-4.5's real chat template (as TRL ships it) and its role markers as special tokens."""
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": GLM_SPECIALS})
    tok.chat_template = trl_template("glm4moe")
    return tok


def _trl_labels(tok, messages, tools):
    """TRL's SFT labels: its training template with return_assistant_tokens_mask (sft_trainer's assistant_only_loss)."""
    from trl.chat_template_utils import get_training_chat_template

    training = get_training_chat_template(tok)
    assert training == trl_template("glm4moe_training")
    out = tok.apply_chat_template(
        messages, tools=tools, chat_template=training, return_dict=True, return_assistant_tokens_mask=True
    )
    return out["input_ids"], [i if m else IGNORE_INDEX for i, m in zip(out["input_ids"], out["assistant_masks"])]


@pytest.mark.parametrize(
    ("messages", "tools"),
    [(CHAT, None), (TOOL_CHAT, TOOLS), (TOOL_CHAT[:2], TOOLS)],
    ids=["chat", "tool call", "ending with a tool call"],
)
def test_glm_sft_trains_the_stop_tokens_trl_trains(messages, tools):
    """Was: no label on <|user|> / <|observation|> after any answer (0 of 2 stop tokens trained per row)."""
    tok = _glm_tokenizer()
    sample = Sample(source="t.jsonl:1", format="messages", messages=messages, tools=tools)
    ids, labels = sft_example(sample, tok, None)
    ref_ids, ref_labels = _trl_labels(tok, messages, tools)
    assert ids == ref_ids
    assert labels == ref_labels
    stops = [tok.convert_ids_to_tokens(x) for x in labels if x in tok.convert_tokens_to_ids(GLM_SPECIALS[2:6])]
    expected = {2: ["<|observation|>"], 4: ["<|observation|>", "<|user|>"], 5: ["<|user|>", "<|user|>"]}
    assert stops == expected[len(messages)]  # was <|user|> after a final tool call
    # the ids are apply_chat_template's, plus the marker that closes the final answer
    plain = tok.apply_chat_template(messages, tools=tools, return_dict=True)["input_ids"]
    assert ids == [*plain, tok.convert_tokens_to_ids(stops[-1])]
    # `deltatune data inspect` shows the same trained text
    ((_, text, spans),) = rendered(sample, tok, None, "sft")
    assert text.endswith(stops[-1]) and all(text[a:b].endswith(("<|user|>", "<|observation|>")) for a, b in spans)


def test_other_templates_and_non_sft_encodings_are_unchanged():
    """The stop marker is added for GLM's template only, and only where SFT asks for it (DPO/KTO keep TRL's plain
    rendering, which TRL's preference trainers use)."""
    tok = _glm_tokenizer()
    ids, labels = encode_chat(CHAT, tok, None)
    assert ids == tok.apply_chat_template(CHAT, return_dict=True)["input_ids"]
    assert tok.convert_tokens_to_ids("<|user|>") not in labels
    chatml = tokenizer()
    assert encode_chat(CHAT, chatml, None, train_stop=True) == encode_chat(CHAT, chatml, None)


REASONED = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello.", "reasoning_content": "A greeting."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, obviously.", "reasoning_content": "Add them."},
]


IN_CONTENT = [
    {"role": m["role"], "content": f"<think>{m['reasoning_content']}</think>{m['content']}"}
    if m.get("reasoning_content")
    else m
    for m in REASONED
]


@pytest.mark.parametrize("messages", [REASONED, IN_CONTENT], ids=["reasoning_content", "think block in the content"])
def test_glm_multi_turn_reasoning_rows_train_as_trl_marks_them(messages):
    """Was: DataError 'messages[1]: the tokenizer's chat template renders this assistant turn unlike the same turn
    ending the conversation' for every multi-turn GLM row with reasoning: GLM writes an earlier turn's think block
    empty (<think></think>), and writes no end marker after a turn."""
    tok = _glm_tokenizer()
    ids, labels = sft_example(Sample(source="t.jsonl:1", format="messages", messages=messages), tok, None)
    assert (ids, labels) == _trl_labels(tok, messages, None)
    trained = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained.count("<think> </think>") == 1 and "add them" in trained and "a greeting" not in trained
    # without the stop tokens (preference stages), the same turns train, as apply_chat_template renders them
    ids, labels = encode_chat(messages, tok, None)
    assert ids == tok.apply_chat_template(messages, return_dict=True)["input_ids"]
    assert tok.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX]).count("<|user|>") == 0


@pytest.mark.parametrize("thought", ["greet", "think", "k", "<"])
def test_glm_earlier_reasoning_found_inside_the_think_block_however_short(thought):
    """The earlier turn's reasoning was taken out of its lead at its first occurrence, which for "think" or "k" lies
    in "<think>" itself: the row was refused where TRL trains it."""
    tok = _glm_tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "reasoning_content": thought},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4.", "reasoning_content": "add"}]  # fmt: skip
    ids, labels = sft_example(Sample(source="t.jsonl:1", format="messages", messages=messages), tok, None)
    assert (ids, labels) == _trl_labels(tok, messages, None)


def test_a_template_other_than_glms_still_needs_an_end_marker_after_an_earlier_turn():
    """Accepting an earlier turn with nothing after it (GLM's template writes no end marker) is GLM's alone: another
    template that writes <|im_end|> after every turn but a final answer trained turn 1 without its stop token."""
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}"
        "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}"
        "{% if not (loop.last and m.role == 'assistant') %}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think>Hello."},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4."}]  # fmt: skip
    with pytest.raises(DataError, match=r"messages\[1\]"):
        encode_chat(messages, tok, None)
