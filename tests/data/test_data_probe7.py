"""Data probe 7: what reaches the model and which tokens train, against TRL's training templates and the shapes
LLaMA-Factory and OpenAI write (tool calls a template leaves out, null contents, refusals naming their row)."""

from __future__ import annotations

import pytest
from tiny import tokenizer, trl_template

from deltatune.data.encode import encode_sft_samples
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row
from deltatune.data.templates import IGNORE_INDEX

TOOLS = [{"type": "function", "function": {"name": "multiply", "description": "Multiply two integers.",
          "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]  # fmt: skip
CALL = [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 2, "b": 3}}}]
TOOL_CHAT = [
    {"role": "user", "content": "What is 2 * 3?"},
    {"role": "assistant", "content": None, "tool_calls": CALL},
    {"role": "tool", "content": "6"},
    {"role": "assistant", "content": "It is 6."},
]


def _samples(rows: list[dict]) -> list:
    return read_samples([Row(r, f"t.jsonl:{i + 3}") for i, r in enumerate(rows)], stage="sft")


@pytest.mark.parametrize("name", ["deepseek_r1_distill", "lfm2"])
def test_a_tool_call_the_template_does_not_render_is_refused_naming_the_row_and_the_call(name):
    """Was: the call trained as nothing. DeepSeek-R1-Distill's template writes a call only for a null content (which
    transformers drops), LFM2's only the content: the rendered turn held '<｜end▁of▁sentence｜>' (DeepSeek) or
    '<|im_end|>' (LFM2) and no call, so the model learnt to answer a tool question with an empty turn."""
    tok = tokenizer()
    tok.chat_template = trl_template(name)
    samples = _samples([{"messages": TOOL_CHAT, "tools": TOOLS}])
    with pytest.raises(DataError, match=r"^t.jsonl:3: messages\[1\].tool_calls\[0\]: .* does not render this call to 'multiply'"):  # fmt: skip
        encode_sft_samples(samples, tok, None, 512)


def test_a_template_that_renders_the_call_still_trains_it_as_trl_marks_it():
    """Qwen2.5's template writes the call: the call and the answer train through their <|im_end|>, the tokens
    TRL's generation-tagged copy marks."""
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = trl_template("qwen2_5")
    (ex,) = encode_sft_samples(_samples([{"messages": TOOL_CHAT, "tools": TOOLS}]), tok, None, 512).examples
    ref = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS, chat_template=trl_template("qwen2_5_training"),
                                  return_dict=True, return_assistant_tokens_mask=True)  # fmt: skip
    assert ex["input_ids"] == list(ref["input_ids"])
    ours = [i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX]
    theirs = [i for i, bit in enumerate(ref["assistant_masks"]) if bit]
    assert ours == theirs  # (MiniLM's WordPiece writes no token for the line break)
    assert tok.decode([ex["input_ids"][i] for i in ours]) == (
        '< tool _ call > { " name " : " multiply ", " arguments " : { " a " : 2, " b " : 3 } } < / tool _ call > '
        "<|im_end|> it is 6. <|im_end|>"
    )


def test_a_refusal_found_while_rendering_names_the_row():
    """Was: 'messages[1].reasoning_content: the model's chat template does not render reasoning traces ...' with no
    file or line: the row-level refusals of the renderer (a reasoning trace or tool call left out, a turn that cannot
    be located) were not prefixed as the template's own refusals are."""
    tok = tokenizer()
    thought = {"role": "assistant", "content": "Hello.", "reasoning_content": "They greet me."}
    samples = _samples([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."}]},
                        {"messages": [{"role": "user", "content": "Hi"}, thought]}])  # fmt: skip
    with pytest.raises(DataError, match=r"^t.jsonl:4: messages\[1\].reasoning_content: the model's chat template"):
        encode_sft_samples(samples, tok, None, 512)
    with pytest.raises(DataError, match=r"^t.jsonl:4: messages\[1\].reasoning_content: data.template=chatml"):
        encode_sft_samples(samples, tok, "chatml", 512)


@pytest.mark.parametrize(
    "row, where",
    [
        ({"messages": [{"role": "system", "content": None}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}]}, r"messages\[0\].content: the system message"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "Hello."}]},
         r"messages\[0\].content: the user message"),
        ({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "Hello."}]},
         r"conversations\[0\].value: the user message"),
        ({"prompt": [{"role": "user", "content": None}], "completion": "Hello."}, r"prompt\[0\].content: the user message"),
    ],
)  # fmt: skip
def test_a_null_or_missing_content_outside_an_assistant_turn_is_refused_naming_the_key(row, where):
    """Was: read as "" and trained: an empty user turn, or an empty system turn that replaced the template's default
    system prompt (Qwen2.5's, SmolLM2's) without a word. TRL passes the null to the template, which fails on it."""
    with pytest.raises(DataError, match=rf"^t.jsonl:3: {where} has no content \(null or missing\)"):
        _samples([row])
    # an assistant's null content beside its tool calls is OpenAI's own shape, read as before
    (s,) = _samples([{"messages": TOOL_CHAT, "tools": TOOLS}])
    assert s.messages[1] == {"role": "assistant", "content": "", "tool_calls": CALL}


SPACED = (  # a generation prompt ending in a space: the answer's first word is one token with it (" Hello")
    "{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n{% else %}Assistant: {% generation %}"
    "{{ m.content }}{{ eos_token }}{{ '\\n' }}{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def _bpe_tokenizer():
    """SmolLM2's byte-level BPE tokenizer (a word takes the space before it), skipped where it is not installed."""
    from transformers import AutoTokenizer

    from deltatune.config import ConfigError
    from deltatune.train.models import resolve_path

    try:
        return AutoTokenizer.from_pretrained(resolve_path("smollm2"))
    except ConfigError as exc:
        pytest.skip(str(exc))


def test_the_token_that_opens_an_answer_with_the_prompts_last_space_trains_as_transformers_marks_it():
    """Was: ' Hello' (its space the generation prompt's) was left out of the labels of every answer, only tokens
    wholly inside an answer trained: the first word of each answer never trained. transformers' assistant mask (TRL's
    assistant_only_loss) marks every token overlapping the answer."""
    tok = _bpe_tokenizer()
    tok.chat_template = SPACED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]  # fmt: skip
    (ex,) = encode_sft_samples(_samples([{"messages": chat}]), tok, None, 512).examples
    ref = tok.apply_chat_template(chat, chat_template=SPACED, return_dict=True, return_assistant_tokens_mask=True)
    assert ex["input_ids"] == list(ref["input_ids"])
    trained = [i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX]
    marked = [i for i, bit in enumerate(ref["assistant_masks"]) if bit]
    assert trained == marked
    assert tok.decode([ex["input_ids"][i] for i in trained]) == " Hello there.<|im_end|>\n Goodbye.<|im_end|>\n"


def test_a_null_field_is_named_as_null_not_as_missing(tmp_path):
    """Was: 'column 'output' is missing (columns in this row: instruction, output)' for a row that has it as null
    (the datasets library writes a column a row lacks so), and a row of nulls 'match no known data format' listing
    the null fields as its fields."""
    from deltatune.data.load import read_rows

    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "Add 4 and 5.", "output": "9."}\n{"instruction": "Double it.", "output": null}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: column 'output' is null$"):
        read_samples(read_rows(str(path)), stage="sft")
    path.write_text('{"instruction": null, "output": null}\n')
    with pytest.raises(DataError, match=rf"^{path}:1: the row's fields \(none; null: instruction, output\) match no"):
        read_samples(read_rows(str(path)), stage="sft")


def test_data_tags_read_a_file_of_role_content_messages_as_sharegpt_without_data_format():
    """Was: data.tags {role_tag: role, content_tag: content, user_tag: human, assistant_tag: bot} on a messages file
    (LLaMA-Factory's OpenAI-style sharegpt entry) detected it as messages and refused: "unknown role='human' (...;
    data.tags renames sharegpt roles)", the tags it had been given left unread unless data.format was set too."""
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "human", "assistant_tag": "bot"}
    rows = [Row({"messages": [{"role": "human", "content": "Hi"}, {"role": "bot", "content": "Hello."}]}, "t.jsonl:1")]
    want = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert [s.messages for s in read_samples(rows, tags=tags, stage="sft")] == [want]
    assert read_samples(rows, tags=tags, stage="sft") == read_samples(rows, None, "sharegpt", tags, "sft")
    plain = [Row({"messages": want}, "t.jsonl:1")]
    assert read_samples(plain, stage="sft")[0].format == "messages"  # without tags: as before


def test_a_ppo_prompt_ending_with_an_assistant_turn_is_continued_as_trl_renders_it():
    """Was: a prefill ('Let me think.') closed and followed by a new assistant header, so the policy sampled a second
    answer after a finished one: '...Let me think.<|im_end|>\\n<|im_start|>assistant\\n'. TRL's
    maybe_apply_chat_template continues the final message (continue_final_message); a built-in template as well."""
    from trl.data_utils import maybe_apply_chat_template

    from deltatune.data.encode import prompt_ids, rendered

    tok = tokenizer()
    prompt = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Let me think."}]
    (s,) = read_samples([Row({"prompt": prompt}, "t.jsonl:1")], stage="ppo")
    ref = maybe_apply_chat_template({"prompt": prompt}, tok)["prompt"]
    assert ref.endswith("<|im_start|>assistant\nLet me think.")
    assert prompt_ids(s, tok, None, 512) == tok(ref, add_special_tokens=False)["input_ids"]
    assert rendered(s, tok, None, "ppo") == [("prompt", ref, [])]
    built_in = tok.decode(prompt_ids(s, tok, "chatml", 512), skip_special_tokens=True)
    assert built_in.endswith("assistant let me think.")  # (MiniLM lowercases)
    (q,) = read_samples([Row({"prompt": prompt[:1]}, "t.jsonl:2")], stage="ppo")  # a user turn: the header, as before
    ref = maybe_apply_chat_template({"prompt": prompt[:1]}, tok)["prompt"]
    assert prompt_ids(q, tok, None, 512) == tok(ref, add_special_tokens=False)["input_ids"]


def test_an_assistant_turn_of_weight_0_is_not_trained_as_openais_fine_tuning_format_has_it():
    """Was: OpenAI's chat fine-tuning rows mark the assistant turns not to learn from with "weight": 0; every turn
    trained regardless. Now such a turn is context only (both template paths); other weights are refused."""
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad answer.", "weight": 0},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Good answer.", "weight": 1}]  # fmt: skip
    tok = tokenizer()
    for template in (None, "chatml"):
        (ex,) = encode_sft_samples(_samples([{"messages": chat}]), tok, template, 512).examples
        trained = tok.decode([lab for lab in ex["labels"] if lab != IGNORE_INDEX])
        assert trained.startswith("good answer.") and "bad" not in trained
        assert "bad answer" in tok.decode(ex["input_ids"])  # still read as context
    with pytest.raises(DataError, match=r"^t.jsonl:3: messages\[1\].weight: must be 0 \(the turn is not trained\)"):
        _samples([{"messages": [chat[0], {**chat[1], "weight": 0.5}]}])
