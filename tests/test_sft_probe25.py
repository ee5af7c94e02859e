"""Probe 25 (chat / SFT encoding): the built-in chatml template and SmolLM2's own chat template (chatml too) give the
same ids as the tokenizer's apply_chat_template, for training rows and for a generation prompt."""

from __future__ import annotations

import pytest
import tiny

from deltatune.data.encode import encode_sft_samples
from deltatune.data.formats import read_samples
from deltatune.data.load import Row
from deltatune.train.chat import prompt_ids

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "More?"},
    {"role": "assistant", "content": "Sure."},
]


@pytest.fixture(scope="module")
def tok():
    return tiny.smollm2_tokenizer()


def _ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


@pytest.mark.parametrize("template", [None, "chatml"])
def test_generation_prompt_keeps_the_conversations_own_system(tok, template):
    # A conversation with its own system prompt and --system: the tokenizer's path keeps the conversation's own; the
    # built-in template wrote both (two system turns) before.
    ref = _ids(tok, CONV[:2], add_generation_prompt=True)
    assert prompt_ids(tok, CONV[:2], system="Another.", template=template) == ref
    assert prompt_ids(tok, CONV[1:2], system="Be brief.", template=template) == ref


@pytest.mark.parametrize("template", [None, "chatml"])
def test_sft_ids_and_labels_match_apply_chat_template(tok, template):
    ex = encode_sft_samples(read_samples([Row({"messages": CONV}, "t:1")], {}, stage="sft"), tok, template, 512)
    ex = ex.examples[0]
    assert ex["input_ids"] == _ids(tok, CONV)
    # Trained: each answer through its <|im_end|>\n, what the chat template adds after its generation prompt.
    want = [-100] * len(ex["input_ids"])
    for k in (3, 5):
        a, b = len(_ids(tok, CONV[: k - 1], add_generation_prompt=True)), len(_ids(tok, CONV[:k]))
        want[a:b] = ex["input_ids"][a:b]
    assert ex["labels"] == want


@pytest.mark.parametrize("template", [None, "chatml"])
def test_a_final_assistant_turn_goes_on(tok, template):
    # transformers' continue_final_message (its text-generation pipeline's default for a conversation ending with
    # an assistant turn): the prefill stays open; it was closed with <|im_end|> and a new assistant header opened.
    prefill = [*CONV[:2], {"role": "assistant", "content": "Sure, "}]
    ref = _ids(tok, prefill, continue_final_message=True)
    assert prompt_ids(tok, prefill, template=template) == ref
