"""Templates probe 22: a built-in template the tokenizer cannot carry is refused in one line when training, where it
trained on [UNK]s in the conversation's place (its markers outside a word-level vocabulary) or trained no stop (alpaca
and plain close an answer with the EOS, and the tokenizer has none: LLaMA-Factory's ``fix_special_tokens`` adds
``<|endoftext|>`` there); a prompt for chat or serve (an old run's) renders as before."""

from __future__ import annotations

import pytest

from deltatune.data.load import DataError
from deltatune.data.templates import encode_chat, render

MESSAGES = [
    {"role": "system", "content": "w1"},
    {"role": "user", "content": "w2 w3"},
    {"role": "assistant", "content": "w4 yes"},
]


@pytest.mark.parametrize("template, marker", [("chatml", "<|im_start|>system"), ("alpaca", "### Instruction:")])
def test_markers_the_tokenizer_encodes_as_unk_are_refused(template, marker):
    """The word-level tokenizer read chatml's ``w2 w3<|im_end|>`` as w2 [UNK]: the user's w3 and the system's w1 were
    lost, 6 of the row's 10 tokens [UNK]; now one line names the marker. ``plain`` (line breaks
    only) still encodes every word, and the generation prompt of an old run's chat still renders."""
    from tiny import word_tokenizer

    tok = word_tokenizer()
    with pytest.raises(DataError, match=rf"^data.template={template}: .*marker '{marker}'.*\[UNK\]"):
        encode_chat(MESSAGES, tok, template)
    ids, labels = encode_chat(MESSAGES, tok, "plain")
    assert tok.convert_ids_to_tokens(ids) == ["w1", "w2", "w3", "w4", "yes", "[EOS]"]
    assert labels == [-100, -100, -100, *ids[3:]]
    with pytest.raises(DataError, match="marker"):  # (the check is cached per tokenizer and template: still refused)
        encode_chat(MESSAGES, tok, template)
    assert render(MESSAGES[:2], tok, template, add_generation_prompt=True)[0].endswith(
        "### Response:\n" if template == "alpaca" else "assistant\n"
    )


def test_markers_in_pieces_pass():
    """chatml's ``<|im_start|>`` in WordPiece pieces (MiniLM has no such token) is not refused: the text as before."""
    from tiny import tokenizer

    text, spans = render(MESSAGES, tokenizer(), "chatml")
    assert text == ("<|im_start|>system\nw1<|im_end|>\n<|im_start|>user\nw2 w3<|im_end|>\n"
                    "<|im_start|>assistant\nw4 yes[SEP]<|im_end|>\n")  # fmt: skip
    assert [text[a:b] for a, b in spans] == ["w4 yes[SEP]"]


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_no_eos_refused_where_nothing_trains_the_stop(template):
    """With no EOS, alpaca and plain trained the answer's words alone (span "w4 yes", no stop after it) and chat has
    no stop id (``stop_ids`` []); LLaMA-Factory adds an EOS there. chatml trains its ``<|im_end|>`` instead: kept."""
    from tiny import tokenizer

    tok = tokenizer()
    tok.eos_token = None
    with pytest.raises(DataError, match=rf"^data.template={template} closes each answer with the tokenizer's EOS"):
        render(MESSAGES, tok, template)
    text, _ = render(MESSAGES[:2], tok, template, add_generation_prompt=True)  # an old run's chat prompt
    assert text.endswith("w2 w3\n" + ("\n### Response:\n" if template == "alpaca" else ""))
    text, spans = render(MESSAGES, tok, "chatml")
    assert [text[a:b] for a, b in spans] == ["w4 yes<|im_end|>\n"]


@pytest.mark.parametrize("role", ["developer", "function", "observation"])
def test_a_role_the_template_has_no_pattern_for_is_one_line(role):
    """A role outside system/user/assistant (OpenAI's developer, LLaMA-Factory's function and observation, handed to
    render through the Python API) failed with AttributeError: 'Template' object has no attribute 'developer'."""
    from tiny import tokenizer

    from deltatune.data.templates import ChatTemplateError

    with pytest.raises(ChatTemplateError, match=rf"^messages\[0\]\.role: data.template=chatml .* not '{role}'$"):
        render([{"role": role, "content": "x"}, *MESSAGES[1:]], tokenizer(), "chatml")


@pytest.mark.parametrize("content, kind", [([{"type": "text", "text": "Yo"}], "list"), (None, "NoneType")])
def test_content_that_is_not_text_is_one_line(content, kind):
    """A list of parts or None as content (the Python API's; a file's rows are read to text) failed with TypeError:
    can only concatenate list (not "str") to list, or argument of type 'NoneType' is not iterable."""
    from tiny import tokenizer

    from deltatune.data.templates import ChatTemplateError

    with pytest.raises(
        ChatTemplateError, match=rf"^messages\[2\]\.content: data.template=alpaca renders text, not {kind} "
    ):
        render([*MESSAGES[:2], {"role": "assistant", "content": content}], tokenizer(), "alpaca")


@pytest.mark.parametrize("template", ["plain", "alpaca"])
def test_a_reward_models_input_is_not_refused_for_a_tokenizer_without_an_eos(template):
    """A reward model generates nothing: MiniLM's tokenizer (no eos_token; its [SEP] closes the input as a special
    token) scored conversational rows under plain / alpaca before 749018c, whose no-EOS refusal then refused them."""
    from tiny import minilm_path
    from transformers import AutoTokenizer

    from deltatune.data import encode
    from deltatune.data.sample import Sample

    bert = AutoTokenizer.from_pretrained(minilm_path())
    assert bert.eos_token is None
    s = Sample("x:1", "messages", [{"role": "user", "content": "hi there"}])
    answer = [{"role": "assistant", "content": "good answer"}]
    enc, _ = encode.scored_example(s, answer, bert, template, 64)
    assert bert.decode(enc["input_ids"]).endswith("good answer [SEP]")
    with pytest.raises(DataError, match=rf"^data.template={template} closes each answer with the tokenizer's EOS"):
        encode.sft_example(Sample("x:1", "messages", s.messages + answer), bert, template)  # (sft trains a stop)
