"""Rows in the shapes public datasets and tools write them, each of which trained the wrong tokens or failed deep
inside a library: a string prompt beside conversations that hold it (ultrafeedback_binarized), reasoning traces
(Qwen3's reasoning_content, gpt-oss's thinking), TRL's image placeholders, pandas' NaN, templates that render an
earlier turn unlike a last one (Phi-3, Qwen3), tool schemas without a name, CSV files with long or unclosed fields.
"""

from __future__ import annotations

import csv
import json

import pytest
from tiny import tokenizer

from deltatune.data.formats import read_samples
from deltatune.data.inspect import inspect
from deltatune.data.load import DataError, Row, read_rows
from deltatune.data.templates import ChatTemplateError, render

Q, U = "What colour is a ripe lemon?", {"role": "user", "content": "Hi"}


def one(data: dict, stage: str | None = None):
    return read_samples([Row(data, "t.jsonl:1")], stage=stage)[0]


def test_a_text_prompt_beside_conversations_that_hold_it_is_their_shared_beginning():
    """TRL's maybe_extract_prompt takes the prompt from the pair; the user turn was rendered twice."""
    trl = pytest.importorskip("trl.data_utils")
    row = {"prompt": Q, "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": "Yellow."}],
           "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": "Purple."}]}  # fmt: skip
    s = one(row, "dpo")
    ref = trl.maybe_extract_prompt(row)
    assert (s.messages, s.chosen, s.rejected) == (ref["prompt"], ref["chosen"], ref["rejected"])
    # A text prompt beside answers alone keeps its prompt (TRL's extraction would lose it)
    alone = one({"prompt": Q, "chosen": [{"role": "assistant", "content": "Yellow."}],
                 "rejected": [{"role": "assistant", "content": "Purple."}]}, "dpo")  # fmt: skip
    assert alone.messages == [{"role": "user", "content": Q}]


THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>"
    "{% endif %}{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_reasoning_trace_trains_where_the_template_reads_it_and_is_refused_where_it_would_be_dropped():
    tok = tokenizer()
    row = {"messages": [U, {"role": "assistant", "reasoning_content": "2+2 is 4.", "content": "4"}]}
    s = one(row, "sft")
    assert s.messages[-1]["reasoning_content"] == "2+2 is 4."
    tok.chat_template = THINKING_TEMPLATE
    text, spans = render(s.messages, tok, None)
    assert [text[a:b] for a, b in spans] == ["<think>2+2 is 4.</think>4<|end|>\n"]
    with pytest.raises(DataError, match=r"messages\[1\]\.reasoning_content: the model's chat template does not"):
        render(s.messages, tokenizer(), None)  # ChatML here never reads it
    with pytest.raises(DataError, match=r"messages\[1\]\.reasoning_content: data.template=chatml does not"):
        render(s.messages, tok, "chatml")
    with pytest.raises(DataError, match=r"t.jsonl:1: messages\[1\]\.thinking: a reasoning trace must be text"):
        one({"messages": [U, {"role": "assistant", "thinking": ["x"], "content": "4"}]})


# Phi-3's template (EOS after the last turn only) and Qwen3's (a think block on the last turn only), cut down
PHI3 = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
QWEN3 = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}"
    "<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    "template, trained",
    [
        (PHI3, ["Hello.<|end|>\n", "Sure.<|end|>\n[SEP]"]),
        (QWEN3, ["Hello.<|im_end|>\n", "<think>\n\n</think>\n\nSure.<|im_end|>\n"]),
    ],
)
def test_templates_that_render_an_earlier_turn_unlike_a_last_one_train_every_turn(template, trained):
    """Multi-turn SFT was refused with these (each prefix must be a prefix of the whole); now each earlier turn is
    its content after the prompt, through the end marker both renderings write (no piece of the next turn's)."""
    tok = tokenizer()
    tok.chat_template = template
    msgs = [U, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Sure."}]  # fmt: skip
    text, spans = render(msgs, tok, None)
    assert [text[a:b] for a, b in spans] == trained


def test_a_template_that_renders_an_earlier_turn_past_recognition_is_refused_naming_the_turn():
    tok = tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content | upper if not loop.last else m.content }}\n{% endfor %}"  # noqa: E501
    )
    msgs = [U, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Sure."}]  # fmt: skip
    with pytest.raises(DataError, match=r"^messages\[1\]: the tokenizer's chat template renders this assistant"):
        render(msgs, tok, None)


def test_image_placeholder_parts_mark_the_images_column_and_null_fields_are_skipped():
    """TRL's and LLaVA's {"type": "image"} placeholders were counted as images of their own (with path "")."""
    s = one({"images": ["cat.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."}]})  # fmt: skip
    assert (s.images, s.messages[0]["content"]) == (["cat.png"], "<image>What is this?")
    s = one({"messages": [
        {"role": "user", "content": [{"type": "image", "image_url": None, "image": "a.png"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "A."}]})  # fmt: skip
    assert s.images == ["a.png"]


def test_nan_is_missing_in_the_system_images_and_tools_columns():
    nan = float("nan")
    s = one({"instruction": "Add 4 and 5.", "output": "9.", "system": nan, "images": nan})
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.images == []
    s = one({"messages": [U, {"role": "assistant", "content": "Hello."}], "tools": nan})
    assert s.tools is None


@pytest.mark.parametrize(
    "data, message",
    [
        ({"messages": [U, {"role": "assistant", "content": "Yo"}], "tools": [{"type": "function", "function": {}}]},
         r"t.jsonl:1: tools\[0\]: a tool schema needs a function name"),
        ({"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "},
                                                   {"from": "human", "value": "Again"}, {"from": "gpt", "value": "Yes."}]},
         r"t.jsonl:1: conversations\[1\]\.value: the assistant turn is empty"),
    ],
)  # fmt: skip
def test_a_bad_row_names_the_fields_as_the_file_has_them(data, message):
    """A nameless tool schema was a bare KeyError; a sharegpt row's empty turn was named messages[2].content."""
    with pytest.raises(DataError, match=rf"^{message}"):
        one(data, "sft")


def test_a_template_failing_on_a_conversation_is_one_line():
    """DeepSeek-V3's template joins a tool call's arguments as a string; jinja's TypeError was a traceback."""
    tok = tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m.role + m.content + m.arguments }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"^t.jsonl:1: the model's chat template fails on this conversation"):
        from deltatune.data.templates import apply_chat_template

        apply_chat_template(tok, [{"role": "user", "content": "x", "arguments": {}}], "t.jsonl:1", tokenize=False)


def test_csv_fields_of_any_length_and_an_unclosed_quote_refused_at_its_line(tmp_path):
    big = tmp_path / "big.csv"
    with open(big, "w", newline="") as fh:
        csv.writer(fh).writerows([["prompt", "completion"], ["Summarise.", "x" * 200_000], ["Hi", "Hello."]])
    rows = read_rows(str(big))
    assert [len(r.data["completion"]) for r in rows] == [200_000, 6]
    assert csv.field_size_limit() == 131072  # left as it was
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,completion\n"a","b"\n"x","12 inch screen\n' + "".join(f"q{i},a{i}\n" for i in range(20)))
    with pytest.raises(DataError, match=r"bad.csv:3: a quoted field is not closed before the end of the file$"):
        read_rows(str(bad))  # all twenty rows after it were read into its field
    bad.write_text(
        'prompt,completion\n"a","b"\n"x","12 inch screen\n' + "".join(f'"q{i}","a{i}"\n' for i in range(20))
    )
    with pytest.raises(DataError, match=r"bad.csv:3: not valid CSV \(',' expected after '\"'\)$"):
        read_rows(str(bad))


def test_inspect_says_what_pre_training_and_ppo_do_with_long_rows(tmp_path):
    """Stage pt joins rows into blocks and cuts none; PPO reads the prompt alone: both were said to cut rows."""
    pt = tmp_path / "pt.jsonl"
    pt.write_text("".join(json.dumps({"text": " ".join(["word"] * 40)}) + "\n" for _ in range(3)))
    from tiny import minilm_path

    out = inspect(str(pt), model=minilm_path(), max_length=16, show=0)
    assert "rows are joined and cut into blocks of data.max_length=16" in out and "rows longer" not in out
    ppo = tmp_path / "ppo.jsonl"
    ppo.write_text(json.dumps({"prompt": "Tell me.", "chosen": "Once " * 80, "rejected": "No."}) + "\n")
    out = inspect(str(ppo), model=minilm_path(), stage="ppo", max_length=64, template="chatml", show=0)
    assert "prompts longer than data.max_length=64: 0 (their beginning cut, or refused with truncation=refuse)" in out
