"""Probe 11 of the data formats: what LLaMA-Factory users bring (dataset_info.json column keys, KTO rows as a
conversation with a kto_tag) read as LLaMA-Factory reads them, and encoded as TRL encodes the same rows."""

from __future__ import annotations

import json

import pytest

from deltatune.config import ConfigError
from deltatune.data.encode import encode_prompt_response
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, read_rows
from deltatune.data.sample import unpaired_examples

ROLE_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def _rows(tmp_path, rows: list[dict]):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_rows(str(path))


def _u(text: str) -> dict:
    return {"role": "user", "content": text}


def _a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _smollm2():
    from tiny import smollm2_tokenizer

    return smollm2_tokenizer()


# -- dataset_info.json's column keys -------------------------------------------------------------------------


def test_llamafactory_alpaca_columns_read_as_there(tmp_path):
    """dataset_info.json's alpaca columns {prompt, query, response, system, history} name the instruction, input,
    output, system and history columns (LLaMA-Factory's parser.DatasetAttr); the row reads as the same row written
    with alpaca's own names."""
    lf = {"q": "Add the numbers.", "i": "4 and 5", "r": "9.", "s": "Be brief.", "h": [["Hi.", "Hello."]]}
    ours = {"instruction": "Add the numbers.", "input": "4 and 5", "output": "9.", "system": "Be brief.",
            "history": [["Hi.", "Hello."]]}  # fmt: skip
    columns = {"prompt": "q", "query": "i", "response": "r", "system": "s", "history": "h"}
    got = read_samples(_rows(tmp_path, [lf]), columns, stage="sft")[0]
    want = read_samples(_rows(tmp_path, [ours]), stage="sft")[0]
    assert (got.format, got.messages) == ("alpaca", want.messages)
    assert got.messages[-2:] == [_u("Add the numbers.\n4 and 5"), _a("9.")]  # LLaMA-Factory's "prompt\nquery"


def test_llamafactory_columns_with_the_prompt_columns_default(tmp_path):
    """The trainers pass data.prompt_column's default ("prompt") beside the user's columns; with only query and
    response given, the instruction is LLaMA-Factory's default column, "instruction"."""
    row = {"instruction": "Add the numbers.", "question": "4 and 5", "answer": "9."}
    columns = {"prompt": "prompt", "label": "label", "query": "question", "response": "answer"}
    s = read_samples(_rows(tmp_path, [row]), columns, stage="sft")[0]
    assert s.messages == [_u("Add the numbers.\n4 and 5"), _a("9.")]


def test_unknown_column_key_names_the_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"data.columns: unknown key 'audio'.*query, response, kto_tag"):
        read_samples(
            _rows(tmp_path, [{"instruction": "a", "output": "b"}]), {"audio": "a"}
        )  # (audios: a key, 2b04bc6)


# -- KTO rows as LLaMA-Factory writes them ------------------------------------------------------------------


def test_llamafactory_kto_sharegpt_reads_last_turn_as_completion(tmp_path):
    """kto_en_demo's shape: messages of {role, content} (tags), a bool label (kto_tag); LLaMA-Factory's converter
    takes the last message as the response and the rest as the prompt."""
    rows = [
        {"messages": [_u("Hi."), _a("Hello."), _u("Name a fruit.")] + [_a("A lemon.")], "label": True},
        {"messages": [_u("Name a colour."), _a("Seven.")], "label": False},
    ]
    samples = read_samples(_rows(tmp_path, rows), {"kto_tag": "label"}, "sharegpt", ROLE_TAGS, "kto")
    assert [s.format for s in samples] == ["unpaired", "unpaired"]
    assert unpaired_examples(samples) == [
        ([_u("Hi."), _a("Hello."), _u("Name a fruit.")], [_a("A lemon.")], True),
        ([_u("Name a colour.")], [_a("Seven.")], False),
    ]


def test_llamafactory_kto_detected_and_forced(tmp_path):
    """Without data.format: a messages file with a label column is KTO data in stage kto; forced
    data.format=unpaired reads a from/value sharegpt file with a kto_tag column the same way."""
    got = read_samples(_rows(tmp_path, [{"messages": [_u("Hi."), _a("Hello.")], "label": 0}]), stage="kto")[0]
    assert (got.messages, got.completion, got.label) == ([_u("Hi.")], [_a("Hello.")], False)
    row = {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}], "kto_tag": True}
    got = read_samples(_rows(tmp_path, [row]), {"kto_tag": "kto_tag"}, "unpaired")[0]
    assert (got.format, got.messages, got.completion, got.label) == ("unpaired", [_u("Hi.")], [_a("Hello.")], True)


def test_llamafactory_kto_alpaca(tmp_path):
    row = {"instruction": "Add.", "input": "4 and 5", "output": "9.", "history": [["Hi.", "Hello."]], "kto_tag": False}
    s = read_samples(_rows(tmp_path, [row]), {"kto_tag": "kto_tag"}, stage="kto")[0]
    assert (s.messages, s.completion, s.label, s.conversational) == (
        [_u("Hi."), _a("Hello."), _u("Add.\n4 and 5")], [_a("9.")], False, False)  # fmt: skip


def test_kto_conversation_bad_rows_one_line(tmp_path):
    rows = _rows(tmp_path, [{"messages": [_u("Hi."), _a("Hello."), _u("Bye.")], "label": True}])
    with pytest.raises(DataError, match=r"t.jsonl:1: the conversation's last message is a user turn; KTO"):
        read_samples(rows, stage="kto")
    rows = _rows(tmp_path, [{"messages": [_u("Hi."), _a("Hello.")], "label": "maybe"}])
    with pytest.raises(DataError, match=r"t.jsonl:1: column 'label' must be true or false"):
        read_samples(rows, stage="kto")
    rows = _rows(tmp_path, [{"instruction": "Add.", "output": "9.", "kto_tag": True}])
    with pytest.raises(DataError, match=r"t.jsonl:1: .*stage kto does not read.*alpaca rows with a 'label' column"):
        read_samples(rows, stage="kto")


def test_sft_keeps_a_label_column_out(tmp_path):
    """Outside stage kto a label column beside a conversation changes nothing (LLaMA-Factory reads kto_tag only
    where the dataset names it; SFT trains every assistant turn)."""
    s = read_samples(_rows(tmp_path, [{"messages": [_u("Hi."), _a("Hello.")], "label": True}]), stage="sft")[0]
    assert (s.format, s.completion, s.label) == ("messages", None, None)


def test_kto_conversation_tokens_equal_trl(tmp_path):
    """The KTO row's ids equal apply_chat_template's on the whole conversation, and the labels cover exactly the
    tokens after the prompt rendered with the generation prompt (TRL's prompt/completion split)."""
    tok = _smollm2()
    conv = [{"role": "system", "content": "Be brief."}, _u("Hi."), _a("Hello."), _u("Name a fruit."), _a("A lemon.")]
    s = read_samples(_rows(tmp_path, [{"messages": conv, "label": True}]), stage="kto")[0]
    (prompt, completion, good) = unpaired_examples([s])[0]
    ex, cut = encode_prompt_response(prompt, completion, tok, None, 4096, s.tools)
    full = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    head = tok.apply_chat_template(conv[:-1], tokenize=True, return_dict=True, add_generation_prompt=True)
    n = len(head["input_ids"])
    assert full[:n] == head["input_ids"] and not cut and good
    assert ex["input_ids"] == full
    trained = [i for i, lab in enumerate(ex["labels"]) if lab != -100]
    assert trained == list(range(n, len(full)))
    assert tok.decode(full[n:]) == "A lemon.<|im_end|>\n"


# -- PPO prompts from conversations, as LLaMA-Factory's PPO reads its alpaca and sharegpt data ------------------


def test_llamafactory_ppo_prompts(tmp_path):
    """LLaMA-Factory's PPO takes every turn before the last answer as the prompt; an alpaca output may be empty
    (its 'unsupervised' rows) or missing."""
    rows = [{"instruction": "Add.", "input": "4 and 5", "output": "9.", "system": "Be brief."},
            {"instruction": "Double 9.", "output": ""}, {"instruction": "Halve 8."}]  # fmt: skip
    got = [(s.format, s.messages, s.conversational) for s in read_samples(_rows(tmp_path, rows), stage="ppo")]
    assert got == [
        ("prompt", [{"role": "system", "content": "Be brief."}, _u("Add.\n4 and 5")], False),
        ("prompt", [_u("Double 9.")], False),
        ("prompt", [_u("Halve 8.")], False),
    ]
    conv = [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]
    conv += [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "A lemon."}]
    s = read_samples(_rows(tmp_path, [{"conversations": conv}]), stage="ppo")[0]
    assert (s.format, s.messages) == ("prompt", [_u("Hi."), _a("Hello."), _u("Name a fruit.")])
    with pytest.raises(DataError, match=r"t.jsonl:1: the conversation holds no prompt before its answer"):
        read_samples(_rows(tmp_path, [{"messages": [{"role": "system", "content": "S."}, _a("Hi.")]}]), stage="ppo")


def test_ppo_prompt_ids_equal_the_generation_prompt(tmp_path):
    """The prompt's ids are apply_chat_template's with the generation prompt (TRL's prompt-only rows)."""
    from deltatune.data.encode import choose_template, prompt_ids

    tok = _smollm2()
    conv = [_u("Hi."), _a("Hello."), _u("Name a fruit."), _a("A lemon.")]
    samples = read_samples(_rows(tmp_path, [{"messages": conv}]), stage="ppo")
    template = choose_template(samples, tok, None, "ppo")
    want = tok.apply_chat_template(conv[:-1], tokenize=True, return_dict=True, add_generation_prompt=True)
    assert prompt_ids(samples[0], tok, template, 4096) == want["input_ids"]


def test_llamafactory_openai_formatting_is_messages(tmp_path):
    """dataset_info.json's "formatting": "openai" copied into data.format reads OpenAI messages."""
    conv = [{"role": "system", "content": "Be brief."}, _u("Hi."), _a("Hello.")]
    s = read_samples(_rows(tmp_path, [{"messages": conv}]), data_format="openai", stage="sft")[0]
    assert (s.format, s.messages) == ("messages", conv)


def test_llamafactory_alpaca_ranking_prompt_column(tmp_path):
    """An alpaca ranking entry names only its instruction column ({prompt: q, chosen, rejected}) with formatting
    alpaca: LLaMA-Factory's prompt is "q\\ninput", so the input column is not lost."""
    row = {"q": "Add.", "input": "4 and 5", "chosen": "9.", "rejected": "8."}
    s = read_samples(_rows(tmp_path, [row]), {"prompt": "q"}, "alpaca_preference", stage="dpo")[0]
    assert (s.messages, s.chosen, s.rejected) == ([_u("Add.\n4 and 5")], [_a("9.")], [_a("8.")])
    row = {"instruction": "Add.", "input": "4 and 5", "output": "9.", "prompt": "unused"}
    s = read_samples(_rows(tmp_path, [row]), {"prompt": "prompt"}, "alpaca", stage="sft")[0]
    assert s.messages == [_u("Add.\n4 and 5"), _a("9.")]


def test_llamafactory_ranking_under_its_formatting(tmp_path):
    """dataset_info.json's {"formatting": "sharegpt", "ranking": true} copied as data.format=sharegpt: the rows hold
    chosen and rejected, so they are the sharegpt ranking rows (alpaca's likewise); the ids equal
    apply_chat_template's and the labels cover the answer after the generation prompt (TRL's DPO split)."""
    from deltatune.data.encode import choose_template, lm_example

    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a fruit."}]
    row = {"conversations": conv, "chosen": {"from": "gpt", "value": "A lemon."}, "rejected": {"from": "gpt",
           "value": "A stone."}}  # fmt: skip
    s = read_samples(_rows(tmp_path, [row]), data_format="sharegpt", stage="dpo")[0]
    prompt = [{"role": "system", "content": "Be brief."}, _u("Name a fruit.")]
    assert (s.format, s.messages, s.chosen, s.rejected) == ("sharegpt_preference", prompt, [_a("A lemon.")],
                                                            [_a("A stone.")])  # fmt: skip
    row = {"instruction": "Add.", "input": "4 and 5", "chosen": "9.", "rejected": "8."}
    got = read_samples(_rows(tmp_path, [row]), data_format="alpaca", stage="dpo")[0]
    assert (got.format, got.messages, got.chosen) == ("alpaca_preference", [_u("Add.\n4 and 5")], [_a("9.")])
    tok = _smollm2()
    ex, _ = lm_example(s, s.rejected, tok, choose_template([s], tok, None, "dpo"), 4096)
    full = tok.apply_chat_template(prompt + [_a("A stone.")], tokenize=True, return_dict=True)["input_ids"]
    n = len(tok.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"])
    assert ex["input_ids"] == full
    assert [i for i, lab in enumerate(ex["labels"]) if lab != -100] == list(range(n, len(full)))


def test_text_rows_in_sft_point_to_stage_pt(tmp_path):
    with pytest.raises(DataError, match=r"t.jsonl:1: the data is in the text format .*stage pt trains on text"):
        read_samples(_rows(tmp_path, [{"text": "The lemon tree grows in warm places."}]), stage="sft")


def test_data_inspect_reads_llamafactory_kto_and_ppo_rows(tmp_path):
    """`deltatune data inspect --stage kto|ppo` reads what the stages read (it refused these formats up front)."""
    from deltatune.data.inspect import inspect

    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"messages": [_u("Hi."), _a("Hello.")], "label": True}) + "\n")
    out = inspect(str(kto), stage="kto")
    assert "format: messages, detected from the rows; read by stage kto as unpaired (conversational)" in out
    assert "[[Hello.<|im_end|>\n]]" in out
    ppo = tmp_path / "ppo.jsonl"
    ppo.write_text(json.dumps({"instruction": "Add.", "input": "4 and 5"}) + "\n")
    assert "format: alpaca, detected from the rows; read by stage ppo as prompt (standard)" in inspect(
        str(ppo), stage="ppo"
    )
    with pytest.raises(DataError, match=r"stage kto does not read the alpaca format; .*with a 'label' column"):
        inspect(
            str(_rows(tmp_path, [{"instruction": "Add.", "output": "9."}])[0].source.rsplit(":", 1)[0]), stage="kto"
        )
    assert "format: messages" in inspect(str(kto), data_format="openai", stage="sft")


# -- a folder of data files (dataset_info.json's file_name may name one) -----------------------------------------


def test_a_folder_of_data_files_reads_as_one_dataset(tmp_path):
    """LLaMA-Factory loads every file of a file_name folder (of one kind); rows keep their own file:line."""
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "b.jsonl").write_text(json.dumps({"instruction": "B.", "output": "2."}) + "\n")
    (folder / "a.jsonl").write_text(
        "".join(json.dumps({"instruction": f"A{i}.", "output": "1."}) + "\n" for i in (1, 2))
    )
    rows = read_rows(str(folder))
    assert [r.source.rsplit("/", 1)[1] for r in rows] == ["a.jsonl:1", "a.jsonl:2", "b.jsonl:1"]
    assert [r.data["instruction"] for r in read_rows(str(folder), limit=2)] == ["A1.", "A2."]
    assert len(read_samples(rows, stage="sft")) == 3
    (folder / "c.csv").write_text("instruction,output\nC.,3.\n")
    with pytest.raises(DataError, match=r"d: a data folder holds files of one kind, this one .csv, .jsonl"):
        read_rows(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty is a folder holding no data file"):
        read_rows(str(tmp_path / "empty"))


# -- review 11c: inspect's errors and columns, mixed files in kto/ppo, openai ranking rows, folders ---------------


def _file(tmp_path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_data_inspect_passes_a_row_error_through(tmp_path):
    """A bad second row is named as it is (it was replaced by a false "stage kto does not read the alpaca format")."""
    from deltatune.data.inspect import inspect

    kto = _file(tmp_path, "kto.jsonl", [{"instruction": "Q", "output": "A", "label": True},
                                        {"instruction": "Q2", "output": "A2", "label": "yes"}])  # fmt: skip
    with pytest.raises(DataError, match=r"kto.jsonl:2: column 'label' must be true or false .*got 'yes'"):
        inspect(kto, stage="kto")
    conv = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    bad = [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]
    ppo = _file(tmp_path, "ppo.jsonl", [{"conversations": conv}, {"conversations": bad}])
    with pytest.raises(DataError, match=r"ppo.jsonl:2: conversations\[1\].from: unknown role='bot'"):
        inspect(ppo, stage="ppo")
    sft = _file(tmp_path, "sft.jsonl", [{"text": "Lemons grow in warm places."}])  # the first row's format: reworded
    with pytest.raises(DataError, match=r"sft.jsonl: stage sft does not read the text format; it reads alpaca"):
        inspect(sft, stage="sft")


def test_data_inspect_maps_llamafactory_columns_before_detecting(tmp_path):
    """{prompt: q, query: i, response: r} is an alpaca entry: inspect renders it for sft with its response (it
    detected "prompt" on the raw columns and rendered a PPO prompt without the response)."""
    from deltatune.data.inspect import inspect

    path = _file(tmp_path, "lf.jsonl", [{"q": "Add the numbers.", "i": "4 and 5", "r": "9."}])
    out = inspect(path, columns={"prompt": "q", "query": "i", "response": "r"})
    assert "format: alpaca, detected from the rows" in out and "stage: sft" in out
    assert "Add the numbers.\n4 and 5" in out and "[[9." in out


@pytest.mark.parametrize(
    "stage, rows",
    [
        (
            "kto",
            [{"instruction": "Q1", "output": "A1", "label": True}, {"messages": [_u("Q2"), _a("A2")], "label": 0}],
        ),
        (
            "kto",
            [{"prompt": "Q3", "completion": "A3", "label": True}, {"instruction": "Q1", "output": "A1", "label": 1}],
        ),
        ("ppo", [{"prompt": "Q"}, {"instruction": "Q1", "output": "A1"}]),
        ("ppo", [{"prompt": "Q"}, {"messages": [_u("Q2"), _a("A2")]}]),
        ("ppo", [{"instruction": "Q1", "output": "A1"}, {"conversations": [{"from": "human", "value": "Q"}]}]),
    ],
)
def test_kto_and_ppo_refuse_a_file_that_mixes_formats(tmp_path, stage, rows):
    """Every row was reshaped to unpaired / prompt before the one-format check, so mixed files passed (refused at
    1a6bf35, as the docs say): the row's own format is compared with the first row's."""
    with pytest.raises(
        DataError, match=r"t.jsonl:2: this row is in the \w+ format .* but .*t.jsonl:1 began the file in"
    ):
        read_samples(_rows(tmp_path, rows), stage=stage)


def test_kto_and_ppo_still_read_one_reshaped_format(tmp_path):
    rows = [{"instruction": "Q1", "output": "A1", "label": True}, {"instruction": "Q2", "output": "A2", "label": 0}]
    got = read_samples(_rows(tmp_path, rows), stage="kto")
    assert [(s.format, s.messages, s.completion, s.label) for s in got] == [
        ("unpaired", [_u("Q1")], [_a("A1")], True), ("unpaired", [_u("Q2")], [_a("A2")], False)]  # fmt: skip
    got = read_samples(_rows(tmp_path, [{"instruction": "Q1"}, {"instruction": "Q2", "output": "A2"}]), stage="ppo")
    assert [(s.format, s.messages) for s in got] == [("prompt", [_u("Q1")]), ("prompt", [_u("Q2")])]


@pytest.mark.parametrize("data_format", ["openai", None])
def test_openai_ranking_rows_read_by_dpo(tmp_path, data_format):
    """LLaMA-Factory's OpenAIDatasetConverter reads {messages, chosen, rejected} of role/content (formatting openai,
    ranking true); dpo refused them (openai) or named role 'user' unknown (detected)."""
    conv = [{"role": "system", "content": "Be brief."}, _u("Name a fruit.")]
    row = {"messages": conv, "chosen": _a("A lemon."), "rejected": _a("A stone.")}
    s = read_samples(_rows(tmp_path, [row]), data_format=data_format, stage="dpo")[0]
    assert (s.format, s.messages, s.chosen, s.rejected) == ("sharegpt_preference", conv, [_a("A lemon.")],
                                                            [_a("A stone.")])  # fmt: skip
    with pytest.raises(
        DataError, match=r"t.jsonl:1: chosen\[0\].role: unknown role='bot' \(known roles: 'system', 'user'"
    ):
        read_samples(_rows(tmp_path, [dict(row, chosen={"role": "bot", "content": "x"})]), data_format=data_format,
                     stage="dpo")  # fmt: skip


def test_a_folder_row_range_and_json_with_jsonl(tmp_path):
    """folder[0:2] is its first two rows across its files (it fell through to a hub error); .json beside .jsonl is
    one kind, as LLaMA-Factory reads both as json (refused)."""
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in (1, 2)))
    (folder / "b.json").write_text(json.dumps([{"text": "b1"}, {"text": "b2"}]))
    rows = read_rows(str(folder))
    assert [r.data["text"] for r in rows] == ["a1", "a2", "b1", "b2"]
    assert [r.source.rsplit("/", 1)[1] for r in read_rows(f"{folder}[1:3]")] == ["a.jsonl:2", "b.json:1 (item 0)"]
    assert [r.data["text"] for r in read_rows(f"{folder}[-1:]")] == ["b2"]
    from deltatune.data.load import data_path

    assert data_path(f"{folder}[:640]") == str(folder)


def test_format_note_names_the_given_format_and_the_reshaped_one(tmp_path):
    """data.format=sharegpt in stage kto: the note said "unpaired (conversational), set by data.format"."""
    from deltatune.data.encode import format_note

    conv = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    got = read_samples(_rows(tmp_path, [{"conversations": conv, "label": True}]), data_format="sharegpt", stage="kto")
    assert format_note(got, "sharegpt", "kto") == (
        "data format: sharegpt, set by data.format; read by stage kto as unpaired (conversational)"
    )
    got = read_samples(_rows(tmp_path, [{"conversations": conv}]), data_format="sharegpt", stage="sft")
    assert format_note(got, "sharegpt", "sft") == "data format: sharegpt (conversational), set by data.format"
    assert format_note(got, None, "sft") == "data format: sharegpt (conversational), detected from the rows"


def test_ppo_reads_the_prompt_of_a_pair_whose_answer_is_empty(tmp_path):
    """recipes/ppo.yaml as written (hh_rlhf, data.limit 256) failed "train.jsonl:76: column 'chosen' is empty":
    PPO checked answers it never reads (review A). The preference stages still refuse the row."""
    rows = [{"prompt": "Hi there", "chosen": "Hello.", "rejected": "Go."},
            {"prompt": "Name a fruit", "chosen": "", "rejected": "A rock."}]  # fmt: skip
    samples = read_samples(_rows(tmp_path, rows), stage="ppo")
    assert [s.messages for s in samples] == [read_samples(_rows(tmp_path, [{"prompt": p}]), stage="ppo")[0].messages
                                           for p in ("Hi there", "Name a fruit")]  # fmt: skip
    with pytest.raises(DataError, match=r":2: column 'chosen' is empty"):
        read_samples(_rows(tmp_path, rows), stage="dpo")
