"""Data probe 4: chat templates whose generation prompt opens a think block that a turn without reasoning does not
render (DeepSeek-R1-Distill's ``<｜Assistant｜><think>\\n``, Nemotron 3's ``<think>\\n``) were refused for every
row, even a single-turn one; their turns are now located as an earlier Qwen3 turn is, and checked against the
character spans TRL's generation-tagged training templates mark."""

from __future__ import annotations

import pytest
from tiny import tokenizer, trl_template

from deltatune.data.templates import encode_chat, render

MSGS = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, obviously."},
]


def _trl_spans(template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The text and the {% generation %} character spans of TRL's training template (transformers' own tracker)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, indices = render_jinja_template(
        [messages], chat_template=template, return_assistant_tokens_mask=True, bos_token="<s>", eos_token="</s>"
    )
    return texts[0], indices[0]


@pytest.mark.parametrize("messages", [MSGS[:3], MSGS], ids=["one turn", "two turns"])
def test_deepseek_r1_distill_trains_each_answer_and_its_end_marker_as_trl_marks_them(messages):
    """Was: DataError 'messages[2]: the tokenizer's chat template renders this assistant turn unlike ...' for every
    row. TRL's generation block opens with the turn's header (<｜Assistant｜>), which deltatune leaves in the prompt as
    the generation prompt writes it; the rest of each span is the same characters."""
    tok = tokenizer()
    tok.chat_template = trl_template("deepseek_r1_distill")
    tok.bos_token = "<s>"
    text, spans = render(messages, tok, None)
    ref_text, ref_spans = _trl_spans(trl_template("deepseek_r1_distill_training"), messages)
    header = "<｜Assistant｜>"
    assert text == ref_text
    assert all(ref_text[a : a + len(header)] == header for a, _ in ref_spans)
    assert spans == [(a + len(header), b) for a, b in ref_spans]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [text[a:b] for a, b in spans] == [a + "<｜end▁of▁sentence｜>" for a in answers]
    # the tokens are the template's own (tokenised as apply_chat_template does)
    ids, _ = encode_chat(messages, tok, None)
    assert ids == list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def test_nemotron_3_trains_from_where_the_generation_prompt_parts_from_the_turn_through_its_end_marker():
    """Nemotron 3 writes '<think></think>' before an answer without reasoning, and its generation prompt opens the
    block with '<think>\\n': the turn trains from the closing tag on (TRL's block adds the opening tag)."""
    tok = tokenizer()
    tok.chat_template = trl_template("nemotron_3_nano")
    text, spans = render(MSGS, tok, None)
    ref_text, ref_spans = _trl_spans(trl_template("nemotron_3_nano_training"), MSGS)
    assert text == ref_text
    assert spans == [(a + len("<think>"), b) for a, b in ref_spans]
    assert [text[a:b] for a, b in spans] == ["</think>Hello.<|im_end|>\n", "</think>4, obviously.<|im_end|>\n"]


def test_a_csv_header_naming_a_column_twice_is_refused_not_read_as_its_last_value(tmp_path):
    """Was: 'instruction,output,output' trained on the second output and dropped the first without a word (pandas
    and the datasets library keep both, as output and output.1)."""
    from deltatune.data.load import DataError, read_rows

    path = tmp_path / "train.csv"
    path.write_text("\ninstruction,output,output\nAdd 4 and 5.,9.,nine\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.csv:2: the header names column 'output' twice"):
        read_rows(str(path))
    # Excel's empty trailing columns (unnamed) are no column a recipe reads: still read
    path.write_text("instruction,output,,\nAdd 4 and 5.,9.,,\n", encoding="utf-8")
    assert read_rows(str(path))[0].data == {"instruction": "Add 4 and 5.", "output": "9.", "": ""}


def test_a_csv_file_opening_with_blank_lines_reads_its_header_from_the_first_line_that_has_one(tmp_path):
    """Was: 'train.csv:3: more fields than the header has' (the blank first line was read as an empty header);
    pandas, and so the datasets library, skip blank lines before the header."""
    from deltatune.data.load import read_rows

    path = tmp_path / "train.csv"
    path.write_text("\n\ninstruction,output\nAdd 4 and 5.,9.\n", encoding="utf-8")
    rows = read_rows(str(path))
    assert [(r.source.rsplit("/", 1)[-1], r.data) for r in rows] == [
        ("train.csv:4", {"instruction": "Add 4 and 5.", "output": "9."})
    ]


def _sampling_run(tmp_path, stage: str, row: dict, chat_template: bool):
    """A tiny LoRA model, its tokenizer (with or without a chat template) and a recipe answering output.samples."""
    import json

    from tiny import save_tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt
    from deltatune.train.config import build

    base = save_tiny(tmp_path / "base", "llama")
    tok = AutoTokenizer.from_pretrained(base)
    if not chat_template:
        tok.chat_template = None
    model = dt.get_delta_model(
        AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(r=2, target_modules=["q_proj"])
    )
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    cfg = build({"stage": stage, "model": {"name_or_path": base}, "method": {"name": "lora"},
                 "data": {"train": str(path)}, "output": {"samples": 2, "sample_tokens": 1}})  # fmt: skip
    return model, tok, cfg


def _prompted(monkeypatch, model, tok, cfg) -> tuple[list[dict], list[list[int]]]:
    from deltatune.train import chat

    seen: list[list[int]] = []
    real = chat.generate
    monkeypatch.setattr(chat, "generate", lambda m, t, ids, **kw: seen.append(list(ids)) or real(m, t, ids, **kw))
    return chat.run_samples(model, tok, cfg), seen


def test_the_samples_of_a_run_read_without_a_chat_template_are_prompted_with_its_plain_text(tmp_path, monkeypatch):
    """Was: a DPO run on plain-string pairs and a tokenizer without a chat template (the plain rendering, which it
    trained with) had its output.samples skipped: 'a conversation needs a chat template; this tokenizer has none'.
    The prompt is the row's text as the run read it, after the tokenizer's leading specials alone, as the run's rows
    and its PPO prompt open (``deltatune generate --raw``'s closing [SEP] too until probe 17)."""
    from deltatune.train.chat import prompt_ids

    row = {"chosen": "Human: Say cat.\n\nAssistant: cat", "rejected": "Human: Say cat.\n\nAssistant: dog"}
    model, tok, cfg = _sampling_run(tmp_path, "dpo", row, False)
    rows, seen = _prompted(monkeypatch, model, tok, cfg)
    # the implicit prompt as the file wrote it (its content is cut at the shared whitespace)
    assert [r["prompt"] for r in rows] == ["Human: Say cat.\n\nAssistant:"]
    assert seen == [prompt_ids(tok, "Human: Say cat.\n\nAssistant:")] * 2
    assert seen[0] == tok("Human: Say cat.\n\nAssistant:")["input_ids"][:-1]  # (MiniLM's [CLS] ..., no [SEP])


def test_a_pretraining_run_answers_output_samples_from_the_openings_of_its_text(tmp_path, monkeypatch):
    """Was: output.samples on a pt run (documented: pt, sft, dpo, ...) answered nothing, without a note; the text
    is prompted as it is, not through the tokenizer's chat template (pre-training read no template)."""
    text = "the cat sat on the mat\n\nthe dog ran\n"
    model, tok, cfg = _sampling_run(tmp_path, "pt", {"text": text}, True)
    rows, seen = _prompted(monkeypatch, model, tok, cfg)
    assert [r["prompt"] for r in rows] == ["the cat sat on the mat", "the dog ran"]
    assert seen[0] == tok("the cat sat on the mat")["input_ids"]  # (each prompt twice: the base, then the adapter)


def test_gpt_oss_multi_turn_trains_each_earlier_answer_through_its_end_marker_as_trl_marks_it():
    """Was: every multi-turn row refused ('messages[1]: ... cannot be located'): gpt-oss ends an earlier answer with
    <|end|> and the last with <|return|>, so the two renderings share no end marker. Each span is TRL's
    generation block less the '<|start|>assistant' the generation prompt writes."""
    tok = tokenizer()
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"]}
    )
    tok.chat_template = trl_template("gptoss")
    msgs = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4.", "thinking": "Add them."},
    ]
    text, spans = render(msgs, tok, None)
    ref_text, ref_spans = _trl_spans(trl_template("gptoss_training"), msgs)
    header = "<|start|>assistant"
    assert text == ref_text
    assert spans == [(a + len(header), b) for a, b in ref_spans]
    assert text[slice(*spans[0])] == "<|channel|>final<|message|>Hello.<|end|>"


THINKING = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4."},
]


def test_a_think_block_written_in_the_content_trains_as_a_reasoning_content_field_does_with_qwen3():
    """Was: every multi-turn row refused ('messages[1]: ... cannot be located'): Qwen3 splits a think block off the
    content and leaves it out of an earlier turn. The spans are those of the same rows with reasoning_content."""
    tok = tokenizer()
    tok.chat_template = trl_template("qwen3")
    text, spans = render(THINKING, tok, None)
    fields = [
        THINKING[0],
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
        THINKING[2],
        {"role": "assistant", "content": "4.", "reasoning_content": "Add them."},
    ]
    assert render(fields, tok, None) == (text, spans)
    assert [text[a:b] for a, b in spans] == ["Hello.<|im_end|>\n", "<think>\nAdd them.\n</think>\n\n4.<|im_end|>\n"]


def test_a_template_that_cuts_the_think_block_off_every_turn_is_refused_not_trained_without_the_reasoning():
    """Was: DeepSeek-R1's template (content.split('</think>')[-1] on every turn, the last too) trained '\\n\\n4.'
    with the reasoning silently dropped, as TRL's note on its training copy of the template warns; a reasoning_content
    field the template never reads is refused, and so is this now."""
    from deltatune.data.load import DataError

    tok = tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}<|User|>{{ m.content }}{% else %}{% set c = m.content %}"
        "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}<|Assistant|>{{ c }}<|eos|>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|Assistant|>{% endif %}"
    )
    with pytest.raises(DataError, match=r"^messages\[1\]\.content: the model's chat template leaves out the think"):
        render(THINKING[:2], tok, None)
    assert render(THINKING[:2], tok, "chatml")[0].count("Greet back.") == 1  # a built-in template writes it as it is


def test_an_alpaca_row_with_an_empty_instruction_asks_its_input_alone():
    """Was: '\\n\\nTranslate: cat' (two blank lines opening the user turn); LLaMA-Factory's alpaca converter joins
    the non-empty parts only, so the user turn is the input."""
    from deltatune.data.formats import read_samples
    from deltatune.data.load import Row

    rows = [Row({"instruction": "", "input": "Translate: cat", "output": "chat"}, "t.jsonl:1"),
            Row({"instruction": "Translate.", "input": "cat", "output": "chat"}, "t.jsonl:2")]  # fmt: skip
    assert [s.messages[0]["content"] for s in read_samples(rows, stage="sft")] == [
        "Translate: cat",
        "Translate.\ncat",  # LLaMA-Factory's AlpacaDatasetConverter: "\n".join(query), one newline
    ]


def test_data_inspect_counts_the_rows_training_leaves_out_for_want_of_a_response_token(tmp_path):
    """Was: inspect said 'rows longer than data.max_length=40: 2 (cut, ...)' and nothing more, while training left one
    of them out altogether (its prompt fills max_length, so no response token trains): the count is now the one
    encode_sft_samples drops."""
    import json

    from tiny import save_tiny
    from transformers import AutoTokenizer

    from deltatune.data.encode import encode_sft_samples
    from deltatune.data.formats import read_samples
    from deltatune.data.inspect import inspect
    from deltatune.data.load import read_rows

    base = save_tiny(tmp_path / "base", "llama")
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": "say " * 40, "output": "cat"}, {"instruction": "Hi", "output": "a dog ran " * 8}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = inspect(str(path), base, "sft", max_length=40, show=0)
    samples = read_samples(read_rows(str(path)), stage="sft")
    encoded = encode_sft_samples(samples, AutoTokenizer.from_pretrained(base), None, 40)
    assert (encoded.truncated, encoded.dropped) == (2, 1)
    assert "rows longer than data.max_length=40: 2 (cut" in report
    assert "rows left out of training: 1 (no response token within data.max_length=40)" in report.splitlines()[-1]
