"""Stage grpo (probe 18): prompts with media the text-only rollouts would ignore (an images column, TRL's image
content parts, LLaMA-Factory's <image> / <video> / <audio> markers) refused in one line naming the row, as the other
text stages refuse them (``sample.refuse_multimodal``); the same prompts as plain text still encode as before."""

from __future__ import annotations

import pytest

from deltatune.data.load import DataError, Row


@pytest.fixture(scope="module")
def tok():
    from tiny import tokenizer

    return tokenizer()


USER_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]


@pytest.mark.parametrize(
    "data, what",
    [
        ({"prompt": "<image>What is this?", "images": ["a.png"]}, "column 'images'"),
        ({"prompt": "What is this?", "image": "a.png"}, "column 'image'"),
        ({"prompt": "<image>What is this?"}, "the <image> marker in column 'prompt'"),
        ({"prompt": "<audio>What is said?"}, "the <audio> marker in column 'prompt'"),
        ({"prompt": [{"role": "user", "content": "<video> what"}]}, "the <video> marker in column 'prompt'"),
        ({"prompt": USER_IMAGE}, "a content part of type 'image' in column 'prompt'"),
    ],
)
def test_a_multimodal_prompt_is_refused_naming_the_row(tok, data, what):
    from deltatune.train.grpo import encode_prompts

    rows = [Row({"prompt": "fine"}, "t.jsonl:1"), Row(data, "t.jsonl:2")]
    with pytest.raises(DataError) as e:
        encode_prompts(rows, tok, "prompt", 64, "truncate")
    assert str(e.value).startswith(f"t.jsonl:2: a multimodal prompt ({what}); stage grpo")
    assert "\n" not in str(e.value)


def test_text_prompts_and_an_assistant_prefill_mentioning_audio_still_encode(tok):
    from deltatune.data.preference import bos_prefix
    from deltatune.train.grpo import encode_prompts

    chat = [{"role": "user", "content": "Name the tag."}, {"role": "assistant", "content": "It is <audio>"}]
    rows = [Row({"prompt": "What is 2 + 2?", "answer": "4"}, "t.jsonl:1"), Row({"prompt": chat}, "t.jsonl:2")]
    items, cut = encode_prompts(rows, tok, "prompt", 64, "truncate")
    assert cut == 0 and items[0].columns == {"answer": "4"}
    assert items[0].ids == bos_prefix(tok) + tok("What is 2 + 2?", add_special_tokens=False)["input_ids"]
    text = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert items[1].ids == tok(text, add_special_tokens=False)["input_ids"]
