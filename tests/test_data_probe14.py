"""Data probe 14: LLaMA-Factory's mask_history cut (earlier turns fill what the last leaves), its sharegpt rows
that open with a gpt turn, the own-template encoder's cost in turns, and the stop of a tokenizer with no EOS, on
SmolLM2's tokenizer (its chat template is chatml, as LLaMA-Factory's qwen template)."""

from __future__ import annotations

import pytest

# LLaMA-Factory's supervised processor, re-implemented as written there (infer_seqlen and the turn loop)
from test_data_probe12 import _llamafactory  # noqa: E402

from deltatune.data.encode import encode_sft_samples, sft_example
from deltatune.data.sample import Sample
from deltatune.data.templates import IGNORE_INDEX


@pytest.fixture(scope="module")
def smol():
    from tiny import smollm2_tokenizer

    return smollm2_tokenizer()


def _row(system, turns):
    msgs = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]
    return Sample("t.jsonl:1", "messages", [{"role": "system", "content": system}, *msgs])


WORDS = " ".join(f"w{i}" for i in range(40))
THREE = ["First " + WORDS, "One " + WORDS, "Second " + WORDS, "Two " + WORDS, "Third?", "Three."]


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("template", [None, "chatml"])
@pytest.mark.parametrize("cutoff", [30, 60, 100, 150, 200, 250])
def test_mask_history_fills_the_cutoff_with_earlier_turns_as_llamafactory(smol, cutoff, template, train_on_prompt):
    """Under mask_history a row whose last turn fits kept that turn alone; LLaMA-Factory fills what cutoff_len
    leaves with the turns before it (from the last back, each cut by infer_seqlen): its ids and labels, exactly."""
    s = _row("Be brief.", THREE)
    full, _ = sft_example(s, smol, template, mask_history=True)
    assert len(full) > cutoff
    want = _llamafactory(smol, "Be brief.", THREE, cutoff, mask_history=True, train_on_prompt=train_on_prompt)
    enc = encode_sft_samples([s], smol, template, cutoff, mask_history=True, train_on_prompt=train_on_prompt)
    got = (enc.examples[0]["input_ids"], enc.examples[0]["labels"])
    assert enc.truncated == 1
    assert got == want
    trained = [i for i, lab in zip(*got) if lab != IGNORE_INDEX]
    if not train_on_prompt:
        assert smol.decode(trained) == "Three.<|im_end|>\n"


# -- a conversation that opens with an assistant turn (a sharegpt greeting) ---------------------------------------

GREETING = {
    "conversations": [
        {"from": "gpt", "value": "Hi! How can I help?"},
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "Blue."},
    ]
}


@pytest.mark.parametrize("name", ["qwen2_5", "smollm2"])
def test_an_opening_gpt_turn_trains_as_trls_assistant_mask(smol, name):
    """A sharegpt row opening with a gpt turn was refused under the tokenizer's own template ("messages[0].role")
    while the built-in chatml trained it; apply_chat_template renders it, and TRL's training template
    (qwen2_5_training, its {% generation %} spans: assistant_only_loss) trains it: the same ids and labels now."""
    import copy

    from tiny import trl_template

    from deltatune.data.formats import read_samples
    from deltatune.data.load import Row

    [s] = read_samples([Row(GREETING, "t.jsonl:1")], {}, stage="sft")
    tok = copy.deepcopy(smol)
    if name == "qwen2_5":
        tok.chat_template = trl_template("qwen2_5")
    ids, labels = sft_example(s, tok, None)
    ref = tok.apply_chat_template(
        s.messages,
        chat_template=trl_template("qwen2_5_training") if name == "qwen2_5" else None,
        return_dict=True,
        return_assistant_tokens_mask=name == "qwen2_5",
    )
    assert ids == ref["input_ids"]
    if name == "qwen2_5":
        mask = ref["assistant_masks"]  # (each run opens with the header's line break, which deltatune leaves out)
        want = [i if m and j and mask[j - 1] else IGNORE_INDEX for j, (i, m) in enumerate(zip(ref["input_ids"], mask))]
        assert labels == want
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert trained == "Hi! How can I help?<|im_end|>\nBlue.<|im_end|>\n"
    assert sft_example(s, tok, "chatml")[1].count(IGNORE_INDEX) < len(ids)  # (the built-in one trains it too)


# -- a tokenizer with no EOS: chatml's <|im_end|> trains in its place, and generation stops on it -------------------


def test_stop_ids_hold_the_chatml_marker_a_tokenizer_without_eos_trains(smol):
    """With no EOS, the built-in chatml trains each answer through ``<|im_end|>\\n`` (nothing else ends it), but
    generation had no stop id: it ran to max_new_tokens. ``stop_ids`` now names the marker's id (and only the EOS
    where there is one, or the template is the tokenizer's own)."""
    import copy

    from deltatune.data.templates import stop_ids

    tok = copy.deepcopy(smol)
    tok.eos_token = None
    assert tok.eos_token_id is None
    s = Sample("t.jsonl:1", "messages", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}])
    ids, labels = sft_example(s, tok, "chatml")
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(trained) == "Yo.<|im_end|>\n" and trained[-2] == im_end
    assert stop_ids(tok, "chatml") == [im_end]
    assert stop_ids(tok, "alpaca") == [] and stop_ids(tok, None) == []
    assert stop_ids(smol, "chatml") == [smol.eos_token_id] == stop_ids(smol, None)


# -- a system column beside OpenAI messages; a system column that is not text -------------------------------------


def _read(row: dict, stage: str = "sft"):
    from deltatune.data.formats import read_samples
    from deltatune.data.load import Row

    return read_samples([Row(row, "t.jsonl:3")], {}, stage=stage)[0]


def test_a_system_column_beside_messages_is_the_system_prompt_as_llamafactorys_openai_rows():
    """A messages row's system column was dropped without a word (a sharegpt row's was read); LLaMA-Factory's openai
    converter takes it as the system prompt where the messages open with none, as sharegpt's does."""
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    s = _read({"messages": turns, "system": "Be brief."})
    assert s.messages == [{"role": "system", "content": "Be brief."}, *turns]
    own = [{"role": "system", "content": "Own."}, *turns]
    assert _read({"messages": own, "system": "Be brief."}).messages == own  # the messages' own system wins
    assert _read({"messages": turns, "system": ""}).messages == turns


@pytest.mark.parametrize("value", [["Be brief."], {"text": "Be brief."}])
def test_a_system_column_that_is_not_text_is_one_line(value):
    """An alpaca row's system written as a list became the system prompt "['Be brief.']" (its Python repr)."""
    from deltatune.data.load import DataError

    kind = type(value).__name__
    with pytest.raises(DataError, match=rf"^t\.jsonl:3: column 'system' must be text, got {kind}$"):
        _read({"instruction": "q", "output": "a", "system": value})
