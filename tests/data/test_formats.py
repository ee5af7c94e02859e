"""Data as users bring it (issue 17): every format detected and mapped to one structure, rendered with the chat
template, the loss on exactly the response tokens, bad rows refused in one line with file:line and field.

The fixture files under tests/fixtures/formats/ hold a few rows each in the public shape of each format (rows
written for these tests). The tiny models' tokenizer has a ChatML chat template (tests/tiny.py), so "the template
applied by hand" below is ChatML written out: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from tiny import save_tiny, tokenizer

from deltatune.cli import main
from deltatune.data.encode import choose_template, encode_pair_samples, encode_sft_samples, lm_example
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row, read_rows
from deltatune.data.sample import refuse_multimodal, unpaired_examples
from deltatune.data.templates import IGNORE_INDEX, render

FIXTURES = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "fixtures", "formats"))
TAGS = ["data.format=sharegpt", "data.columns={messages: dialog}",
        "data.tags={role_tag: speaker, content_tag: text, user_tag: person, assistant_tag: bot}"]  # fmt: skip

# (fixture, detected format, conversational, extra CLI overrides)
FILES = {
    "alpaca": ("alpaca.jsonl", "alpaca", False, []),
    "sharegpt": ("sharegpt.jsonl", "sharegpt", True, []),
    "sharegpt_tags": ("sharegpt_tags.jsonl", "sharegpt", True, TAGS),
    "messages": ("messages.jsonl", "messages", True, []),
    "pc_standard": ("prompt_completion_standard.jsonl", "prompt_completion", False, []),
    "pc_conversational": ("prompt_completion_conversational.jsonl", "prompt_completion", True, []),
    "prompt": ("prompt.jsonl", "prompt", False, []),
    "pref_standard": ("preference_standard.jsonl", "preference", False, []),
    "pref_conversational": ("preference_conversational.jsonl", "preference", True, []),
    "implicit_standard": ("preference_implicit_standard.jsonl", "preference_implicit", False, []),
    "implicit_conversational": ("preference_implicit_conversational.jsonl", "preference_implicit", True, []),
    "sharegpt_preference": ("sharegpt_preference.jsonl", "sharegpt_preference", True, []),
    "alpaca_preference": ("alpaca_preference.jsonl", "alpaca_preference", False, []),
    "unpaired": ("unpaired.jsonl", "unpaired", False, []),
    "text": ("text.jsonl", "text", False, []),
    "tools_messages": ("tools_messages.jsonl", "messages", True, []),
    "tools_sharegpt": ("tools_sharegpt.jsonl", "sharegpt", True, []),
}
PREFERENCE = ["pref_standard", "pref_conversational", "implicit_standard", "implicit_conversational",
              "sharegpt_preference", "alpaca_preference"]  # fmt: skip
STAGE_RUNS = (
    [(k, "sft") for k in ("alpaca", "sharegpt", "sharegpt_tags", "messages", "pc_standard", "pc_conversational")]
    + [(k, "sft") for k in ("tools_messages", "tools_sharegpt")]
    + [(k, stage) for stage in ("rm", "dpo") for k in PREFERENCE]
    + [(k, "ppo") for k in ("prompt", "pref_conversational")]  # the other formats' prompts: test_ppo_prompts_...
    + [("text", "pt")]
    + [(k, "kto") for k in ("unpaired", "pref_conversational", "sharegpt_preference")]
)

# A ChatML template that renders tools and tool calls (as Qwen2.5's does, shortened), for the tool-call rows.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m.get('tool_calls') %}<|im_start|>assistant\n"
    "{% for c in m['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def fixture(key: str) -> str:
    return os.path.join(FIXTURES, FILES[key][0])


SEEN_PROMPTS: list[str] = []


def length_reward(prompts, responses):
    """A programmatic PPO reward (align.reward_model=test_formats:length_reward): shorter responses score higher.
    Records the prompts it is given."""
    SEEN_PROMPTS.extend(prompts)
    return [-len(r.split()) / 10 for r in responses]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def tool_tok():
    t = tokenizer()
    t.chat_template = TOOL_TEMPLATE
    return t


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    llama = save_tiny(tmp / "llama", "llama", "causal_lm", max_position_embeddings=256)
    tools = str(tmp / "llama-tools")
    shutil.copytree(llama, tools)
    with open(os.path.join(tools, "tokenizer_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    config["chat_template"] = TOOL_TEMPLATE
    with open(os.path.join(tools, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(tools, name)):
            os.remove(os.path.join(tools, name))
    recipe = tmp / "recipe.yaml"
    recipe.write_text("# the stage, model and data come as overrides\nstage: sft\n", encoding="utf-8")
    rm = save_tiny(tmp / "llama-rm", "llama", "seq_cls", max_position_embeddings=256)
    return {"causal": llama, "tools": tools, "rm": rm, "recipe": str(recipe)}


def samples(key: str, stage: str | None = None):
    file, _, _, extra = FILES[key]
    kw = {}
    if key == "sharegpt_tags":
        kw = dict(columns={"messages": "dialog"}, data_format="sharegpt",
                  tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "person",
                        "assistant_tag": "bot"})  # fmt: skip
    return read_samples(read_rows(os.path.join(FIXTURES, file)), stage=stage, **kw)


# -- detection and mapping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(FILES))
def test_each_format_is_detected(key):
    _, fmt, conversational, _ = FILES[key]
    got = samples(key)
    assert {s.format for s in got} == {fmt}
    assert got[0].conversational == conversational
    assert len(got) == len(read_rows(fixture(key)))


def chatml(messages: list[dict]) -> tuple[str, list[tuple[str, bool]]]:
    """ChatML by hand: the text, and its pieces with whether each is trained (an assistant turn's content and
    end marker)."""
    pieces = []
    for m in messages:
        pieces.append((f"<|im_start|>{m['role']}\n", False))
        pieces.append((f"{m['content']}<|im_end|>\n", m["role"] == "assistant"))
    return "".join(p for p, _ in pieces), pieces


# The first row of each SFT fixture, written out by hand as the conversation it must become.
LEMON = [{"role": "user", "content": "What colour is a ripe lemon?"}, {"role": "assistant", "content": "Yellow."}]
SFT_FIRST = {
    "alpaca": [{"role": "user", "content": "Name the colour of a ripe lemon."},
               {"role": "assistant", "content": "Yellow."}],
    "sharegpt": LEMON, "sharegpt_tags": LEMON, "messages": LEMON, "pc_standard": LEMON, "pc_conversational": LEMON,
}  # fmt: skip
# Multi-turn rows: alpaca with system + history, sharegpt with a system column, messages with two answers.
SFT_MULTI = {
    ("alpaca", 2): [
        {"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Add 4 and 5."},
        {"role": "assistant", "content": "9."}, {"role": "user", "content": "And now double it."},
        {"role": "assistant", "content": "That gives 18."},
    ],
    ("sharegpt", 2): [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Which is larger, a mouse or a horse?"},
        {"role": "assistant", "content": "A horse."},
        {"role": "user", "content": "And a cat or a dog?"}, {"role": "assistant", "content": "Usually a dog."},
    ],
    ("messages", 3): [
        {"role": "system", "content": "You are a quiz host."},
        {"role": "user", "content": "Is ice colder than steam?"},
        {"role": "assistant", "content": "Yes, much colder."}, {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Steam is water above its boiling point."},
    ],
}  # fmt: skip


def check_tokens(tok, ids: list[int], labels: list[int], pieces: list[tuple[str, bool]]) -> None:
    """Token by token: the ids are the pieces' tokens in order, and the labels are exactly the trained pieces'."""
    want_ids, want_labels = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        want_ids += piece
        want_labels += piece if trained else [IGNORE_INDEX] * len(piece)
    assert ids == want_ids
    assert labels == want_labels
    assert any(lab != IGNORE_INDEX for lab in labels) and any(lab == IGNORE_INDEX for lab in labels)


@pytest.mark.parametrize("key, row", [*[(k, 0) for k in SFT_FIRST], *SFT_MULTI])
def test_sft_text_is_the_template_by_hand_and_labels_are_the_assistant_tokens(tok, key, row):
    s = samples(key, "sft")[row]
    messages = SFT_FIRST[key] if row == 0 else SFT_MULTI[(key, row)]
    text, pieces = chatml(messages)
    conversation, start = s.sft()
    assert conversation == messages
    assert render(conversation, tok, None)[0] == text == tok.apply_chat_template(messages, tokenize=False)
    example = encode_sft_samples([s], tok, None, max_length=512).examples[0]
    check_tokens(tok, example["input_ids"], example["labels"], pieces)


def test_tool_calls_render_through_the_template_and_train_on_call_and_answer_only(tool_tok, tok):
    """The function_call/observation roles of sharegpt and the tool_calls/tool messages of OpenAI rows become
    the same conversation; the loss covers the assistant's tool call and its answer, not the tool's result."""
    row_m, row_s = samples("tools_messages", "sft")[0], samples("tools_sharegpt", "sft")[0]
    assert row_m.messages == row_s.messages[:2] + [{**row_s.messages[2], "name": "get_weather"}] + row_s.messages[3:]
    assert row_m.tools == row_s.tools
    tools = json.dumps(row_m.tools)
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    pieces = [
        (f"<|im_start|>system\nTools: {tools}<|im_end|>\n", False),
        ("<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        (f"<tool_call>{call}</tool_call><|im_end|>\n", True),
        ("<|im_start|>tool\n21 degrees and sunny<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("It is 21 degrees and sunny in Paris.<|im_end|>\n", True),
    ]
    for s in (row_m, row_s):
        assert choose_template([s], tool_tok, None, "sft") is None
        assert render(s.messages, tool_tok, None, tools=s.tools)[0] == "".join(p for p, _ in pieces)
        example = encode_sft_samples([s], tool_tok, None, max_length=512).examples[0]
        check_tokens(tool_tok, example["input_ids"], example["labels"], pieces)
    with pytest.raises(DataError, match=r"tools_messages.jsonl:1: .*chat template has no tool support"):
        choose_template([row_m], tok, None, "sft")
    with pytest.raises(DataError, match=r"tools_sharegpt.jsonl:1: .*data.template=chatml has no tool support"):
        choose_template([row_s], tool_tok, "chatml", "sft")


@pytest.mark.parametrize("key", [k for k in PREFERENCE if k != "pref_standard"])
def test_preference_shapes_give_the_plain_pair_tokens(tok, key):
    """Each TRL preference shape (and LLaMA-Factory's) gives, row by row, the same chosen and rejected tokens and
    labels as the pair written as plain strings (preference_standard.jsonl), rendered with the template."""
    plain = encode_pair_samples(samples("pref_standard"), tok, None, 512, "truncate", causal=True).examples
    other = encode_pair_samples(samples(key), tok, None, 512, "truncate", causal=True).examples
    assert other == plain
    # ... and that is the template by hand, with labels on the response (content and end marker) only.
    s = samples("pref_standard")[0]
    for response, answer in ((s.chosen, "Yellow."), (s.rejected, "Purple.")):
        ex, cut = lm_example(s, response, tok, None, 512)
        assert not cut
        _, pieces = chatml([{"role": "user", "content": "What colour is a ripe lemon?"}])
        pieces += [("<|im_start|>assistant\n", False), (f"{answer}<|im_end|>\n", True)]
        check_tokens(tok, ex["input_ids"], ex["labels"], pieces)
    scored = encode_pair_samples(samples(key), tok, None, 512, "truncate", causal=False).examples
    assert scored == encode_pair_samples(samples("pref_standard"), tok, None, 512, "truncate", causal=False).examples


PROMPT_FORMATS = ["prompt", "pc_standard", "pc_conversational", "unpaired", *PREFERENCE]


@pytest.mark.parametrize("key", PROMPT_FORMATS)
def test_ppo_prompts_are_the_template_by_hand_with_the_generation_prompt(tok, key):
    """Every format PPO reads gives its first prompt as ChatML by hand plus the assistant header, kept from the
    end when longer than data.max_length."""
    from deltatune.data.encode import prompt_ids

    s = samples(key, "ppo")[0]
    text, _ = chatml([{"role": "user", "content": "What colour is a ripe lemon?"}])
    want = tok(text + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert choose_template([s], tok, None, "ppo") is None
    assert prompt_ids(s, tok, None, 512) == want
    assert prompt_ids(s, tok, None, 9) == want[-9:]


def test_unpaired_rows_for_kto(tok):
    from deltatune.data.encode import encode_prompt_response

    triples = unpaired_examples(samples("unpaired"))
    assert [t[2] for t in triples] == [True, False, True, False]
    assert triples[1] == ([{"role": "user", "content": "How many legs does a spider have?"}],
                          [{"role": "assistant", "content": "Three."}], False)  # fmt: skip
    # Encoded for the KTO stage, an undesirable completion is the same tokens as that rejected response in DPO.
    pair = samples("pref_standard")[1]
    assert encode_prompt_response(*triples[1][:2], tok, None, 512) == lm_example(pair, pair.rejected, tok, None, 512)
    paired = unpaired_examples(samples("pref_conversational"))
    assert len(paired) == 8 and [t[2] for t in paired[:2]] == [True, False] and paired[0][0] == paired[1][0]


def test_multimodal_rows_are_refused_naming_the_row_and_keep_their_images():
    got = read_samples(read_rows(os.path.join(FIXTURES, "multimodal.jsonl")))
    assert got[1].images == ["pictures/lemon.png"]
    with pytest.raises(
        DataError, match=r"multimodal.jsonl:2: a multimodal row \(1 image\(s\)\); stage sft .*image_cls"
    ):
        refuse_multimodal(got, "sft")
    marker = [Row({"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A."}]},
                  "m.jsonl:7")]  # fmt: skip
    with pytest.raises(DataError, match=r"m.jsonl:7: a multimodal row \(a <image> marker\)"):
        refuse_multimodal(read_samples(marker), "dpo")


# -- through the CLI ----------------------------------------------------------------------------------------


def cli_args(models, key: str, stage: str, out: str) -> list[str]:
    model = models["rm"] if stage == "rm" else models["tools"] if key.startswith("tools") else models["causal"]
    args = ["train", models["recipe"], f"stage={stage}", f"model.name_or_path={model}",
            "model.dtype=float32", "model.gradient_checkpointing=false",
            "method={name: lora, r: 2, lora_alpha: 4, target_modules: [q_proj, v_proj]}",
            f"data.train={fixture(key)}", "data.eval=null", "data.max_length=96", "train.max_steps=2",
            "train.batch_size=2", "train.grad_accum=1", "train.logging_steps=1", "train.report_to=[none]",
            "train.eval_on_start=false", f"output.dir={out}", *FILES[key][3]]  # fmt: skip
    length = 16 if stage == "pt" else 256 if key.startswith("tools") else None  # (tools: schemas fill a system turn)
    if length:  # in place: a key given twice is said on stderr
        args[args.index("data.max_length=96")] = f"data.max_length={length}"
    if stage == "ppo":
        args += ["align.reward_model=test_formats:length_reward", "align.max_new_tokens=3", "align.mini_batch_size=2",
                 "align.ppo_epochs=1"]  # fmt: skip
    return args


@pytest.mark.parametrize("key, stage", STAGE_RUNS, ids=[f"{k}-{s}" for k, s in STAGE_RUNS])
def test_two_steps_through_the_cli(models, tmp_path, capsys, key, stage):
    out = tmp_path / "run"
    assert main(cli_args(models, key, stage, str(out))) == 0, capsys.readouterr().err
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics.get("train_steps", 2) == 2
    report = (out / "report.md").read_text(encoding="utf-8")
    fmt, conversational = FILES[key][1], FILES[key][2]
    if stage == "pt":
        assert "data format: text, detected from the rows" in report
    else:
        assert f"data format: {fmt}" in report
        shape = "" if fmt == "alpaca" else " (conversational)" if conversational else " (standard)"
        assert (
            f"data format: {fmt}{shape}, " + ("set by data.format" if key == "sharegpt_tags" else "detected") in report
        )
        assert f"first train row ({fixture(key)}:1) as rendered" in report
        assert "<|im_start|>assistant" in report
    if stage == "ppo":
        # The policy samples after the rendered prompt; the reward function reads the user's own words.
        questions = {r.data["prompt"] for r in read_rows(fixture("prompt"))}
        assert SEEN_PROMPTS and set(SEEN_PROMPTS) <= questions, SEEN_PROMPTS
        SEEN_PROMPTS.clear()
    if stage == "dpo":
        # At step 0 the adapter is the identity (LoRA B = 0): policy = reference, so every pair costs log 2.
        assert first_loss(out) == pytest.approx(math.log(2), abs=1e-6)


def first_loss(out) -> float:
    """The first logged training loss of a run: step 1's, computed before the first update."""
    if (out / "log_history.jsonl").exists():
        history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines() if line]
    else:
        history = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())["log_history"]
    return next(h["loss"] for h in history if "loss" in h)


# -- bad input: one line, file:line and the field, nothing written --------------------------------------------


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


U = {"role": "user", "content": "Hi?"}
A = {"role": "assistant", "content": "Hello."}
BAD = {
    "mixed": ("sft", [{"messages": [U, A]}, {"instruction": "Hi?", "output": "Hello."}],
              r"bad.jsonl:2: this row is in the alpaca format .* but .*bad.jsonl:1 began the file in the messages"),
    "unknown_role": ("sft", [{"messages": [U, A]}, {"messages": [{"role": "narrator", "content": "x"}, A]}],
                     r"bad.jsonl:2: messages\[0\].role: unknown role='narrator'"),
    "empty_assistant": ("sft", [{"messages": [U, {"role": "assistant", "content": " "}]}],
                        r"bad.jsonl:1: messages\[1\].content: the assistant turn is empty"),
    "ends_with_user": ("sft", [{"messages": [U, A]}, {"messages": [U, A, U]}],
                       r"bad.jsonl:2: the conversation.s last message is a user turn"),
    "chosen_is_rejected": ("dpo", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Bye."},
                                   {"prompt": [U], "chosen": [A], "rejected": [A]}],
                           r"bad.jsonl:2: 'chosen' and 'rejected' are identical"),
    "prompt_is_a_number": ("dpo", [{"prompt": 5, "chosen": "Hello.", "rejected": "Bye."}],
                           r"bad.jsonl:1: column 'prompt' must be text or a list of messages, got int$"),
    "no_messages": ("sft", [{"messages": [U, A]}, {"messages": []}],
                    r"bad.jsonl:2: column 'messages' must be a non-empty list of messages, got an empty list$"),
    "output_is_a_list": ("sft", [{"instruction": "Hi?", "output": ["Hello.", "Hi."]}],
                         r"bad.jsonl:1: column 'output' must be text, got list$"),
    "chat_for_orpo": ("orpo", [{"messages": [U, A]}],  # was a TypeError from inside the pair encoder (and simpo's)
                      r"bad.jsonl:1: the data is in the messages format .*, which stage orpo does not read; "
                      r"stage orpo reads: preference, preference_implicit, sharegpt_preference"),
    "chat_for_simpo": ("simpo", [{"messages": [U, A]}],
                       r"bad.jsonl:1: the data is in the messages format .*, which stage simpo does not read"),
    "chat_for_pt": ("pt", [{"messages": [U, A]}],
                    r"bad.jsonl:1: the data is in the messages format .*, which stage pt does not read; "
                    r"stage pt reads: text"),
    "call_without_schema": ("sft", [{"tools": [{"type": "function", "function": {"name": "get_time"}}], "messages": [
        U, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather"}}]},
        {"role": "tool", "content": "sunny"}, A]}],
        r"bad.jsonl:1: messages\[1\].tool_calls\[0\].function.name: the call to 'get_weather' has no matching schema"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_with_file_line_and_field(models, tmp_path, capsys, case):
    stage, rows, message = BAD[case]
    path = write(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "run"
    args = cli_args(models, "messages", stage, str(out))
    args[args.index(f"data.train={fixture('messages')}")] = f"data.train={path}"
    model = models["tools"] if case == "call_without_schema" else models["causal"]
    args = [a if not a.startswith("model.name_or_path=") else f"model.name_or_path={model}" for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert pytest.importorskip("re").search(message, err), err
    assert not out.exists()


def test_an_unknown_key_of_data_columns_or_data_tags_is_refused():
    """data.columns={promt: question} (a typo of the field) was ignored, and the rows then matched no format;
    data.tags={user: human} (for user_tag) was ignored too. Now each names the key and what may be renamed."""
    from deltatune.config import ConfigError

    rows = [Row({"question": "Hi?", "answer": "Hello."}, "d.jsonl:1")]
    with pytest.raises(ConfigError, match=r"^data.columns: unknown key 'promt'; it renames instruction, input, "):
        read_samples(rows, {"promt": "question", "completion": "answer"})
    with pytest.raises(ConfigError, match=r"^data.tags: unknown key 'user'; it renames role_tag, content_tag, "):
        read_samples(rows, {"prompt": "question", "completion": "answer"}, tags={"user": "human"})
    assert read_samples(rows, {"prompt": "question", "completion": "answer"})[0].format == "prompt_completion"


def test_forced_format_that_does_not_fit_and_stage_that_does_not_read_it(tmp_path):
    with pytest.raises(DataError, match=r"alpaca.jsonl:1: column 'prompt' is missing"):
        read_samples(read_rows(fixture("alpaca")), data_format="preference")
    with pytest.raises(
        DataError, match=r"alpaca.jsonl:1: the data is in the alpaca format .* stage dpo does not read"
    ):
        read_samples(read_rows(fixture("alpaca")), stage="dpo")


# -- deltatune data inspect ---------------------------------------------------------------------------------


def test_data_inspect(models, tmp_path, capsys):
    assert main(["data", "inspect", fixture("messages"), "--model", models["causal"], "--max-length", "30"]) == 0
    out = capsys.readouterr().out
    assert "format: messages (conversational), detected from the rows" in out and "rows: 4" in out
    assert "stage: sft" in out and "template: the tokenizer's chat template" in out
    tok = tokenizer()
    lengths = sorted(
        len(encode_sft_samples([s], tok, None, 10**6).examples[0]["input_ids"]) for s in samples("messages")
    )
    assert f"tokens per row: p50 {lengths[1]}, p90 {lengths[3]}, p99 {lengths[3]}, max {lengths[3]}" in out
    assert f"rows longer than data.max_length=30: {sum(n > 30 for n in lengths)}" in out
    assert "<|im_start|>assistant\n[[Yellow.<|im_end|>\n]]" in out
    assert main(["data", "inspect", fixture("pref_conversational")]) == 0
    out = capsys.readouterr().out
    assert "format: preference (conversational)" in out and "stage: dpo" in out and "[[Purple.<|im_end|>\n]]" in out
    bad = write(tmp_path / "pairs.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Bye."},
                                           {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}])  # fmt: skip
    assert main(["data", "inspect", bad]) == 0
    said = ("bad pairs (an empty or non-assistant response, chosen == rejected, or a ranking conversation "
            f"LLaMA-Factory drops): 1, refused unless data.bad_pairs=skip: {bad}:2")  # fmt: skip
    assert said in capsys.readouterr().out
    assert main(["data", "inspect", fixture("text"), "--rows", "1"]) == 0  # pt: no template, its first row shown
    out = capsys.readouterr().out
    assert "template: none (pre-training reads the text as it is)" in out and out.count("\n[text]\n[[") == 1
    assert main(["data", "inspect", os.path.join(FIXTURES, "multimodal.jsonl")]) == 2
    assert "multimodal.jsonl:2: a multimodal row" in capsys.readouterr().err


def test_data_inspect_on_labelled_columns(models, tmp_path, capsys):
    """Rows of text + label (sst2, trec) are classification data and rows of words + tags (wnut17) tagging data: inspect
    shows each class's share, the lengths a model's tokenizer gives them, and the rows; they were reported as
    pre-training text ("stage: pt") and as "match no known data format"."""
    cls = write(tmp_path / "cls.jsonl", [{"text": "the cat sat", "label": "pos"}, {"text": "a dog", "label": "neg"},
                                         {"text": "the big red house", "label": "pos"}])  # fmt: skip
    assert main(["data", "inspect", cls, "--model", models["causal"], "--max-length", "4", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "format: text + label (sequence classification), detected from the columns" in out
    assert "stage: cls" in out and "classes (2): neg: 1 (33.3%); pos: 2 (66.7%)" in out
    tok = tokenizer()
    lengths = sorted(len(tok(t)["input_ids"]) for t in ("the cat sat", "a dog", "the big red house"))
    assert f"tokens per row: p50 {lengths[1]}, p90 {lengths[2]}, p99 {lengths[2]}, max {lengths[2]}" in out
    assert f"rows longer than data.max_length=4: {sum(n > 4 for n in lengths)}" in out
    assert "[text]\nthe cat sat\n[label] pos" in out and "a dog" not in out
    tag = write(tmp_path / "tag.jsonl", [{"tokens": ["the", "cat"], "ner_tags": ["O", "B-animal"]},
                                         {"tokens": ["a", "dog", "ran"], "ner_tags": ["O", "B-animal", "O"]}])  # fmt: skip
    assert main(["data", "inspect", tag]) == 0
    out = capsys.readouterr().out
    assert "format: tokens + ner_tags (token classification)" in out and "stage: tag" in out
    assert "tags (2): B-animal: 2 (40.0%); O: 3 (60.0%)" in out and "words per row: p50 2, p90 3, max 3" in out
    assert "the/O cat/B-animal" in out
    assert main(["data", "inspect", cls, "--stage", "pt"]) == 0  # asked for: the text as pre-training text
    assert "format: text, detected from the rows" in capsys.readouterr().out
    uneven = write(tmp_path / "uneven.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["O"]}])
    assert main(["data", "inspect", uneven]) == 2
    assert "uneven.jsonl:1: 'tokens' and 'ner_tags' must be lists of equal length" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rows", "-1"], "--rows must be >= 0, got -1"),  # was rows[:-1], all but the last
        (["--max-length", "0"], "--max-length must be >= 1, got 0"),
        (["--stage", "seq2seq"], "--stage seq2seq: data inspect reads the stages of text, chat or preference rows"),
        (["--stage", "cls"], "messages.jsonl:1: column 'label' is missing"),
        (["--format", "nope"], "--format 'nope' is not a known format; formats: alpaca, "),  # was blamed on dpo
        (["--stage", "orpo"], "stage orpo does not read the messages format; it reads preference, "),
        (["--model", "/nowhere/model"], "--model '/nowhere/model': no such folder"),  # was the hub client's OSError
    ],
)
def test_data_inspect_refuses_bad_options_in_one_line(capsys, extra, message):
    assert main(["data", "inspect", fixture("messages"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltatune data: error: ") and message in err and "\n" not in err, err


def test_without_a_chat_template_plain_pairs_keep_the_plain_encoding_and_conversations_are_refused():
    """A tokenizer with no chat template (an encoder's, a base model's): rm, dpo and ppo read plain-string pairs as
    before chat templates (prompt then response); a conversational row needs data.template."""
    from deltatune.data.encode import RAW
    from deltatune.data.preference import encode_lm

    plain = tokenizer()
    plain.chat_template = None
    s = samples("pref_standard")[0]
    assert choose_template(samples("pref_standard"), plain, None, "dpo") == RAW
    assert lm_example(s, s.chosen, plain, RAW, 512) == encode_lm(plain, "What colour is a ripe lemon?", "Yellow.", 512)
    with pytest.raises(
        DataError, match=r"preference_conversational.jsonl:1: a conversational row needs a chat template"
    ):
        choose_template(samples("pref_conversational"), plain, None, "dpo")
    assert choose_template(samples("pref_conversational"), plain, "chatml", "dpo") == "chatml"


def test_reward_scoring_renders_pairs_as_the_reward_run_was_trained(tok):
    """PPO's reward models score a (prompt, response) text pair exactly as stage rm encoded that pair: through the
    chat template for a decoder whose tokenizer has one, through the pair template for an encoder."""
    from deltatune.data.encode import RAW, score_inputs, scored_example, scorer_template
    from deltatune.data.preference import encode_scored

    assert scorer_template({"data": {"template": None}}, tok, encoder=False) is None
    assert scorer_template({"data": {"template": None}}, tok, encoder=True) == RAW
    assert scorer_template({"data": {"template": "alpaca"}}, tok, encoder=False) == "alpaca"
    s = samples("pref_conversational")[0]
    for template in (None, "chatml"):
        want = scored_example(s, s.chosen, tok, template, 64)[0]
        assert score_inputs(tok, template, "What colour is a ripe lemon?", "Yellow.", 64) == want
    assert score_inputs(tok, RAW, "Q?", "A.", 64) == encode_scored(tok, "Q?", "A.", 64)[0]


# -- faults a hostile pass found (each test failed before its fix) ----------------------------------------------


def test_alpaca_preference_rows_prompt_with_instruction_input_system_and_history():
    """LLaMA-Factory's ranking rows (instruction, input, chosen, rejected) were read as implicit-prompt pairs: the
    instruction was dropped and the answers' shared first words became the prompt ("The answer is")."""
    row = Row({"instruction": "What is 2+2?", "input": "Show it.", "chosen": "The answer is 4.",
               "rejected": "The answer is 5.", "system": "Be exact.", "history": [["Hi.", "Hello."]]}, "p.jsonl:3")  # fmt: skip
    s = read_samples([row], stage="dpo")[0]
    assert s.format == "alpaca_preference"
    assert s.messages == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Hi."},
                          {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "What is 2+2?\nShow it."}]  # fmt: skip
    assert s.chosen == [{"role": "assistant", "content": "The answer is 4."}]
    assert s.rejected == [{"role": "assistant", "content": "The answer is 5."}]


def test_implicit_string_pairs_keep_the_files_text_without_a_chat_template():
    """HH-RLHF-style string pairs on a tokenizer without a chat template were encoded as "...Assistant:Yellow.":
    the space between prompt and answer was stripped from both. TRL's split keeps it with the answers."""
    from deltatune.data.encode import RAW, rendered
    from deltatune.data.preference import encode_lm

    plain = tokenizer()
    plain.chat_template = None
    chosen, rejected = "\n\nHuman: What colour is a lemon?\n\nAssistant: Yellow.", "\n\nHuman: What colour is a lemon?\n\nAssistant: Purple."  # fmt: skip
    s = read_samples([Row({"chosen": chosen, "rejected": rejected}, "hh.jsonl:1")])[0]
    assert s.messages[0]["content"] == "Human: What colour is a lemon?\n\nAssistant:"  # what a chat template reads
    assert choose_template([s], plain, None, "dpo") == RAW
    want = encode_lm(plain, "\n\nHuman: What colour is a lemon?\n\nAssistant:", " Yellow.", 512)
    assert lm_example(s, s.chosen, plain, RAW, 512) == want
    part, text, spans = rendered(s, plain, RAW, "dpo")[1]
    assert part == "rejected" and text == rejected + "[SEP]" and text[spans[0][0] :] == " Purple.[SEP]"


def test_a_conversation_opening_with_an_assistant_turn_trains_it(tok):
    """The opening answer trains, as the built-in templates and TRL's assistant masks train it (refused until probe
    14; tests/test_data_probe14.py compares it with TRL's qwen2_5_training)."""
    from deltatune.data.encode import encode_sft_samples

    row = Row({"messages": [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi."},
                            {"role": "assistant", "content": "How can I help?"}]}, "a.jsonl:2")  # fmt: skip
    ex = encode_sft_samples(read_samples([row], stage="sft"), tok, None, 64).examples[0]
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    assert trained.startswith("hello!") and "how can i help?" in trained and "hi." not in trained


def test_a_conversations_column_of_role_content_messages_is_read():
    row = Row({"conversations": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
              "c.jsonl:1")  # fmt: skip
    s = read_samples([row], stage="sft")[0]
    assert s.format == "messages" and s.messages == [{"role": "user", "content": "Hi?"},
                                                     {"role": "assistant", "content": "Hello."}]  # fmt: skip


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tools": [1]}, r"t.jsonl:1: tools\[0\] must be a tool schema \(a JSON object\), got int"),
        ({"tools": '["get_weather"]'}, r"t.jsonl:1: tools\[0\] must be a tool schema \(a JSON object\), got str"),
        ({"instruction": "Add.", "output": "9.", "history": [["Add 4 and 5.", None]]},
         r"t.jsonl:1: history\[0\]\[1\] must be text, got empty"),
        ({"instruction": "Add.", "output": "9.", "history": [[["a"], "9."]]},
         r"t.jsonl:1: history\[0\]\[0\] must be text, got a list"),
        ({"instruction": "Add.", "output": " "}, r"t.jsonl:1: column 'output' is empty"),
        ({"instruction": "Add.", "output": float("nan")}, r"t.jsonl:1: column 'output' is NaN \(a missing value\)"),
    ],
)  # fmt: skip
def test_bad_fields_found_later_are_one_line(fields, message):
    """Each was a traceback (tools), trained Python's text ("None", "['a']"), or named a field the file lacks."""
    row = Row({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
               **fields} if "tools" in fields else fields, "t.jsonl:1")  # fmt: skip
    with pytest.raises(DataError, match=rf"^{message}"):
        read_samples([row], stage="sft")


def test_nan_is_a_missing_value():
    """pandas writes a missing value as NaN, which JSON readers take as a float: it was trained as the text "nan"."""
    s = read_samples([Row({"instruction": "Add 4 and 5.", "input": float("nan"), "output": "9."}, "n.jsonl:1")])[0]
    assert s.messages[0] == {"role": "user", "content": "Add 4 and 5."}


def test_chatml_closes_an_answer_once_when_the_eos_is_its_end_marker(tok):
    """data.template=chatml on a model whose EOS is <|im_end|> (Qwen, SmolLM2) wrote <|im_end|><|im_end|>."""
    im = tokenizer()
    im.eos_token = "<|im_end|>"
    text, spans = render(LEMON, im, "chatml")
    assert (
        text == "<|im_start|>user\nWhat colour is a ripe lemon?<|im_end|>\n<|im_start|>assistant\nYellow.<|im_end|>\n"
    )
    assert [text[a:b] for a, b in spans] == ["Yellow.<|im_end|>\n"]  # through its line break, as SmolLM2's own
    assert render(LEMON, tok, "chatml")[0].endswith("Yellow.[SEP]<|im_end|>\n")  # another EOS: appended as before


def test_output_samples_read_the_renamed_prompt_column(tmp_path):
    """The run's before/after answers read the eval file with data.columns only, so a data.prompt_column rename
    made them fail after training."""
    from deltatune.train.chat import eval_prompts
    from deltatune.train.config import build

    path = write(tmp_path / "q.jsonl", [{"question": "Why?", "completion": "Because."}])
    cfg = build({"stage": "sft", "data": {"train": path, "prompt_column": "question"}})
    assert eval_prompts(cfg, 1) == [[{"role": "user", "content": "Why?"}]]
