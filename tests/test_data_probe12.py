"""Data probe 12: the built-in chatml template against the model's own chat template (transformers'
apply_chat_template, TRL's prompt/completion split), the report line of a reshaped file, and LLaMA-Factory's
multi-turn encodings (mask_history, train_on_prompt, tool calls, cutoff_len) on SmolLM2's tokenizer."""

from __future__ import annotations

import copy
import json

import pytest

from deltatune.data.encode import encode_sft_samples, format_note, lm_example, sft_example
from deltatune.data.formats import read_samples
from deltatune.data.load import Row
from deltatune.data.sample import Sample
from deltatune.data.templates import IGNORE_INDEX, render

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    SYSTEM,
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def smol():
    from tiny import smollm2_tokenizer

    return smollm2_tokenizer()


def _trained(ids: list[int], labels: list[int]) -> list[int]:
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    return [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


# -- leftover 1: chatml's <|im_end|> trains with its line break, as the model's own template trains it -------------


def test_built_in_chatml_sft_equals_the_tokenizers_own_template(smol):
    """SmolLM2's own template is chatml: the built-in one now gives the same ids and the same labels (each answer
    through ``<|im_end|>\\n``); it trained ``<|im_end|>`` without its ``\\n``."""
    s = Sample("t.jsonl:1", "messages", TURNS)
    own = sft_example(s, smol, None)
    built_in = sft_example(s, smol, "chatml")
    assert built_in[0] == smol.apply_chat_template(TURNS, tokenize=True, return_dict=False)
    assert built_in == own
    assert smol.decode(_trained(*built_in)) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_built_in_chatml_preference_labels_equal_trls_completion(smol, stage):
    """DPO / KTO / ORPO / SimPO (``lm_example``): the answer's labels are TRL's completion, the text
    ``maybe_apply_chat_template`` writes after the prompt's generation prompt (``Green.<|im_end|>\\n``)."""
    from trl.data_utils import maybe_apply_chat_template

    prompt, answer = TURNS[:4], [TURNS[4]]
    if stage == "dpo":
        s = Sample(
            "t.jsonl:1", "preference", prompt, chosen=answer, rejected=[{"role": "assistant", "content": "No."}]
        )
        ref = maybe_apply_chat_template({"prompt": prompt, "chosen": answer, "rejected": s.rejected}, smol)["chosen"]
    else:
        s = Sample("t.jsonl:1", "unpaired", prompt, completion=answer, label=True)
        ref = maybe_apply_chat_template({"prompt": prompt, "completion": answer}, smol)["completion"]
    assert ref == "Green.<|im_end|>\n"
    ref_ids = smol(ref, add_special_tokens=False)["input_ids"]
    for template in ("chatml", None):
        enc, cut = lm_example(s, answer, smol, template, 512)
        assert not cut and _trained(enc["input_ids"], enc["labels"]) == ref_ids
        assert enc["input_ids"] == smol.apply_chat_template(prompt + answer, tokenize=True, return_dict=False)


def test_chatml_on_a_tokenizer_without_eos_trains_its_end_marker(smol):
    """With no EOS to append, the built-in chatml trained the answer's words alone (never how to stop)."""
    from tiny import tokenizer

    tok = tokenizer()
    tok.eos_token = None
    text, spans = render(TURNS[:3], tok, "chatml")
    assert [text[a:b] for a, b in spans] == ["Blue.<|im_end|>\n"]


# -- leftover 2: the report line of a reshaped file names the format the rows hold -----------------------------


@pytest.mark.parametrize(
    "row, stage, expected",
    [
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}], "label": True}, "kto",
         "data format: sharegpt, detected from the rows; read by stage kto as unpaired (conversational)"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "ppo",
         "data format: messages, detected from the rows; read by stage ppo as prompt (conversational)"),
        ({"instruction": "Hi", "output": "Yo", "label": False}, "kto",
         "data format: alpaca, detected from the rows; read by stage kto as unpaired (standard)"),
    ],
)  # fmt: skip
def test_a_detected_reshaped_format_is_named_as_the_rows_hold_it(row, stage, expected):
    """It said ``unpaired (conversational), detected from the rows`` of a sharegpt file (nothing in it is
    "unpaired"); a forced format already said both."""
    samples = read_samples([Row(row, "d.jsonl:1")], {}, None, stage=stage)
    assert format_note(samples, None, stage) == expected
    forced = samples[0].written
    assert format_note(read_samples([Row(row, "d.jsonl:1")], {}, forced, stage=stage), forced, stage) == (
        expected.replace("detected from the rows", "set by data.format")
    )


# -- LLaMA-Factory's mask_history and train_on_prompt (its supervised processor) --------------------------------


def _llamafactory_qwen(tok, system: str, turns: list[str], mask_history=False, train_on_prompt=False):
    """LLaMA-Factory's encoding of (user, assistant) pairs with its ``qwen`` template (no cutoff): each pair is
    source = [system turn, on the first] + user turn + assistant header, target = answer + ``<|im_end|>\\n``, each
    tokenized alone; sources train only with train_on_prompt, targets all but the last with mask_history."""
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids, labels = [], []
    pairs = list(zip(turns[::2], turns[1::2]))
    for k, (user, answer) in enumerate(pairs):
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if k == 0 else ""
        source = enc(f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
        target = enc(f"{answer}<|im_end|>\n")
        ids += source + target
        labels += (source if train_on_prompt else [IGNORE_INDEX] * len(source)) + (
            [IGNORE_INDEX] * len(target) if mask_history and k < len(pairs) - 1 else target
        )
    return ids, labels


@pytest.mark.parametrize("mask_history, train_on_prompt", [(False, False), (True, False), (False, True), (True, True)])
def test_mask_history_and_train_on_prompt_equal_llamafactorys(smol, mask_history, train_on_prompt):
    """LLaMA-Factory's ``mask_history`` (the last turn trains alone) and ``train_on_prompt`` (every token trains)
    were missing; the ids and labels now equal its qwen template's on SmolLM2's chatml (a system prompt, two turns).
    (Its mask_history with train_on_prompt trains the earlier prompts, not the earlier answers: so does ours.)"""
    turns = ["Name a colour.", "Blue.", "Another?", "Green."]
    want = _llamafactory_qwen(smol, "Be brief.", turns, mask_history, train_on_prompt)
    s = Sample("t.jsonl:1", "messages", TURNS)
    assert sft_example(s, smol, None, mask_history, train_on_prompt) == want
    assert sft_example(s, smol, "chatml", mask_history, train_on_prompt) == want
    enc = encode_sft_samples([s], smol, None, 512, mask_history=mask_history, train_on_prompt=train_on_prompt)
    assert (enc.examples[0]["input_ids"], enc.examples[0]["labels"]) == want


def test_mask_history_keeps_the_last_turn_when_a_row_is_cut(smol):
    """Cut to data.max_length, a row keeps its start (TRL's truncation), which may leave its answers out (the row is
    then dropped and counted); under mask_history it keeps its last turn from the start of that turn's prompt (it
    kept its last tokens: the middle of an earlier turn)."""
    long = [
        SYSTEM,
        *[{"role": r, "content": f"Turn {k} " + "word " * 20} for k, r in enumerate(["user", "assistant"] * 3)],
    ]
    long[-1] = {"role": "assistant", "content": "Done."}
    s = Sample("t.jsonl:4", "messages", long)
    ids, labels = sft_example(s, smol, None)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)  # the first answer's first token
    start = encode_sft_samples([s], smol, None, first + 3)
    assert start.truncated == 1 and start.examples[0]["input_ids"] == ids[: first + 3]
    dropped = encode_sft_samples([s], smol, None, first)
    assert dropped.dropped == 1 and not dropped.examples
    full_ids, _ = sft_example(s, smol, None, mask_history=True)
    n = len(full_ids) - 20
    assert "Done." not in smol.decode(
        _trained(*[encode_sft_samples([s], smol, None, n).examples[0][k] for k in ("input_ids", "labels")])
    )
    kept = encode_sft_samples([s], smol, None, n, mask_history=True)
    last_turn = smol(f"<|im_start|>user\n{long[-2]['content']}<|im_end|>\n<|im_start|>assistant\nDone.<|im_end|>\n")
    got = kept.examples[0]["input_ids"]  # LLaMA-Factory's: the last turn, what is left filled with earlier turns
    assert kept.truncated == 1 and len(got) == n and got[-len(last_turn["input_ids"]) :] == last_turn["input_ids"]
    assert smol.decode(_trained(kept.examples[0]["input_ids"], kept.examples[0]["labels"])) == "Done.<|im_end|>\n"


# -- probe 12c: weight 0 under train_on_prompt, mask_history's cut (LLaMA-Factory's infer_seqlen), EOS, notes ------


def _infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's processor_utils.infer_seqlen, as written there."""
    if target_len * 2 < cutoff_len:  # truncate source
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # truncate target
        max_target_len = cutoff_len - source_len
    else:  # truncate both
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    new_source_len = min(max_source_len, source_len)
    return new_source_len, new_target_len


def _llamafactory(tok, system, turns, cutoff=10**9, mask_history=False, train_on_prompt=False, loss_mask=None):
    """LLaMA-Factory's SupervisedDatasetProcessor._encode_data_example with its qwen template (no efficient_eos):
    pairs reversed under mask_history, each cut by infer_seqlen to what cutoff_len leaves, a loss_mask 0 answer at
    -100 whatever train_on_prompt."""
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = []
    for k, (user, answer) in enumerate(zip(turns[::2], turns[1::2])):
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if k == 0 else ""
        pairs.append(
            (enc(f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"), enc(f"{answer}<|im_end|>\n"))
        )
    masks = loss_mask or [1] * len(pairs)
    order = list(range(len(pairs)))[::-1] if mask_history else list(range(len(pairs)))
    ids, labels, total = [], [], 0
    for turn_idx, k in enumerate(order):
        if total >= cutoff:
            break
        ns, nt = _infer_seqlen(len(pairs[k][0]), len(pairs[k][1]), cutoff - total)
        source, target = pairs[k][0][:ns], pairs[k][1][:nt]
        total += ns + nt
        source_label = source if train_on_prompt else [IGNORE_INDEX] * ns
        masked = (mask_history and turn_idx != 0) or masks[k] == 0
        target_label = [IGNORE_INDEX] * nt if masked else target
        if mask_history:
            ids, labels = source + target + ids, source_label + target_label + labels
        else:
            ids, labels = ids + source + target, labels + source_label + target_label
    return ids, labels


def _rows(system, turns, weights=None):
    msgs = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]
    for k, w in enumerate(weights or []):
        if w == 0:
            msgs[2 * k + 1]["weight"] = 0
    return Sample("t.jsonl:1", "messages", [{"role": "system", "content": system}, *msgs])


@pytest.mark.parametrize("mask_history", [False, True])
def test_train_on_prompt_keeps_a_weight_0_answer_untrained(smol, mask_history):
    """train_on_prompt trained an answer marked weight 0 (LLaMA-Factory keeps a loss_mask 0 answer at -100 under it:
    only the prompts switch to training); ids and labels now equal its encoding, and the first-row note marks the
    same characters."""
    from deltatune.data.encode import rendered

    turns = ["Name a colour.", "Blue.", "Another?", "Green.", "More?", "Red."]
    s = _rows("Be brief.", turns, [1, 0, 1])
    want = _llamafactory(
        smol, "Be brief.", turns, mask_history=mask_history, train_on_prompt=True, loss_mask=[1, 0, 1]
    )
    for template in (None, "chatml"):
        assert sft_example(s, smol, template, mask_history, True) == want
    assert "Green." not in smol.decode(_trained(*want))
    [(_, text, spans)] = rendered(s, smol, None, "sft", mask_history, True)
    assert "".join(text[a:b] for a, b in spans) == smol.decode(_trained(*want))
    enc = encode_sft_samples([s], smol, None, 512, mask_history=mask_history, train_on_prompt=True)
    assert (enc.examples[0]["input_ids"], enc.examples[0]["labels"]) == want


@pytest.mark.parametrize("mask_history", [False, True])
def test_a_row_of_weight_0_answers_is_dropped_under_train_on_prompt(smol, mask_history):
    """A row whose every answer has weight 0 (under mask_history: whose last one has) is dropped and counted in
    ``unweighted`` with train_on_prompt too (it was kept, its prompts and the weight-0 answers trained)."""
    s = _rows("Be brief.", ["Hi", "Yo.", "Again", "Yo again."], [1 if mask_history else 0, 0])
    for train_on_prompt in (False, True):
        enc = encode_sft_samples([s], smol, None, 512, mask_history=mask_history, train_on_prompt=train_on_prompt)
        assert (len(enc.examples), enc.unweighted, enc.dropped) == (0, 1, 0)


def test_infer_seqlen_equals_llamafactorys():
    from deltatune.data.encode import infer_seqlen

    cases = [(s, t, c) for s in (0, 1, 7, 20, 63) for t in (0, 1, 9, 30, 200) for c in (1, 16, 64, 100)]
    assert all(infer_seqlen(*x) == _infer_seqlen(*x) for x in cases)


LONG = " ".join(str(i) for i in range(200))


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize(
    "turns, cutoff",
    [
        (["Write numbers.", LONG], 64),  # one turn, its answer past the cutoff: the prompt and the answer's start
        (["Write numbers.", LONG], 100),
        (["Hi", "Hello.", "Write numbers.", LONG], 64),  # the last turn alone does not fit: the same
        (["Write numbers.", LONG, "Again, short.", "1 2 3"], 40),  # the last turn fits: from its prompt's start
    ],
)
def test_mask_history_cuts_a_row_as_llamafactorys_infer_seqlen(smol, turns, cutoff, train_on_prompt):
    """Under mask_history an over-long row kept only the tail of its last answer (no prompt, no assistant header,
    every token trained). It now keeps the last turn from its prompt's start, and where that alone is too long, the
    prompt and the answer's start as LLaMA-Factory's infer_seqlen splits them: its ids and labels there (where the
    last turn fits, LLaMA-Factory goes on filling cutoff_len with earlier turns cut at their ends: the kept turn is
    its sequence's end)."""
    s = _rows("Be brief.", turns)
    want = _llamafactory(smol, "Be brief.", turns, cutoff, mask_history=True, train_on_prompt=train_on_prompt)
    enc = encode_sft_samples([s], smol, None, cutoff, mask_history=True, train_on_prompt=train_on_prompt)
    got = (enc.examples[0]["input_ids"], enc.examples[0]["labels"])
    assert enc.truncated == 1 and len(got[0]) <= cutoff
    head = "<|im_start|>system\nBe brief.<|im_end|>\n" if len(turns) == 2 else ""
    last_len = len(smol(f"{head}<|im_start|>user\n{turns[-2]}<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    last_len += len(smol(f"{turns[-1]}<|im_end|>\n")["input_ids"])
    assert got == want  # (where the last turn fits, the earlier turns fill what it leaves: probe 14)
    if last_len <= cutoff:
        assert smol.decode(got[0][-last_len:]).startswith("<|im_start|>user\nAgain, short.")
    assert "<|im_start|>assistant\n" in smol.decode(got[0])


@pytest.mark.parametrize("eos", ["minilm", "<|endoftext|>"])
def test_chatml_trains_nothing_after_a_tokenizer_eos_that_is_not_im_end(smol, eos):
    """The built-in chatml writes ``answer EOS <|im_end|>\n`` where the tokenizer's EOS is another token (MiniLM's
    [SEP], SmolLM2 with EOS <|endoftext|>, Qwen2.5 base's shape): ``<|im_end|>\n`` trained after the EOS, tokens
    the model never generates. The answer now trains through its EOS, as TRL's completion does (SFTTrainer's add_eos
    appends the EOS and nothing after it)."""
    from tiny import tokenizer

    if eos == "minilm":
        tok = tokenizer()
    else:
        tok = copy.deepcopy(smol)
        tok.eos_token = eos
    s = Sample("t.jsonl:1", "messages", [{"role": "user", "content": "Name a colour."},
                                         {"role": "assistant", "content": "Blue."}])  # fmt: skip
    trained = _trained(*sft_example(s, tok, "chatml"))
    assert trained == tok("Blue." + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert trained[-1] == tok.eos_token_id


def _prepare(tmp_path, rows, max_length=512, **data):
    from tiny import minilm_path
    from transformers import AutoTokenizer

    from deltatune.train.config import build
    from deltatune.train.sft import prepare_sft

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows), encoding="utf-8")
    cfg = build({"stage": "sft", "model": {"name_or_path": "smollm2"},
                 "data": {"train": str(path), "template": "chatml", "max_length": max_length, **data}})  # fmt: skip
    return prepare_sft(cfg, AutoTokenizer.from_pretrained(minilm_path()))


def test_mask_history_notes_say_what_a_row_keeps_and_why_it_was_dropped(tmp_path):
    """Under mask_history a row whose last answer has weight 0 was noted as "every answer has weight 0" (its first
    one had weight 1); the truncation line now says such rows keep their last turn."""
    hi, ok = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
    quiet = [hi, ok, hi, {"role": "assistant", "content": "Yo.", "weight": 0}]
    long = [{"role": "user", "content": "word " * 80}, ok, hi, ok]
    notes = _prepare(tmp_path, [quiet, [hi, ok], long], 40, mask_history=True).notes
    assert any(n.startswith("1 train rows were dropped: their last answer (data.mask_history trains it alone) has "
                            "weight 0 (nothing to train); the first: ") and n.endswith("t.jsonl:1") for n in notes)  # fmt: skip
    assert "1 train rows were longer than data.max_length=40 tokens and were truncated to their last turn " \
           "(data.mask_history)" in notes  # fmt: skip
    from deltatune.data.load import DataError

    with pytest.raises(DataError, match=r"\(1 with their last answer weighted 0, the first: .*t\.jsonl:1\)$"):
        _prepare(tmp_path, [quiet], mask_history=True)


@pytest.mark.parametrize("value", ['{"name": ""}', "{}", {}, "null", None, {"name": "  "}])
def test_a_bad_function_call_value_names_the_sharegpt_field(value):
    """A function_call value with no usable name was refused naming fields the sharegpt row does not have
    (``messages[1].tool_calls[0].function.name``, ``value[0]`` of a value that is no list)."""
    from deltatune.data.load import DataError

    row = {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": value},
                             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
           "tools": json.dumps([WEATHER])}  # fmt: skip
    with pytest.raises(
        DataError, match=r"^glaive.json:3: conversations\[1\]\.value: a tool call needs a function name"
    ):
        read_samples([Row(row, "glaive.json:3")], {}, None, stage="sft")


def test_a_sharegpt_call_with_no_schema_names_the_sharegpt_field():
    from deltatune.data.load import DataError

    row = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Weather?"},
           {"from": "function_call", "value": '{"name": "get_time", "arguments": {}}'},
           {"from": "observation", "value": "9:00"}, {"from": "gpt", "value": "Nine."}], "tools": json.dumps([WEATHER])}  # fmt: skip
    with pytest.raises(DataError, match=r"^glaive.json:3: conversations\[1\]\.value: the call to 'get_time' has no"):
        read_samples([Row(row, "glaive.json:3")], {}, None, stage="sft")


def test_the_docs_kto_report_line_matches_its_example_row():
    """docs/data-formats.md's report line for LLaMA-Factory's KTO rows named sharegpt beside a messages row."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "data-formats.md").read_text(encoding="utf-8")
    part = doc[doc.index("LLaMA-Factory's KTO rows") :]
    line = re.search(r"`(data format: [^`]+)`", part).group(1)
    row = json.loads(part.split("```json\n", 1)[1].split("\n", 1)[0])
    assert line == format_note(read_samples([Row(row, "d.jsonl:1")], {}, None, stage="kto"), None, "kto")


# -- LLaMA-Factory's tool rows (function_call / observation) against its qwen formatter --------------------------

WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip
CLOCK = {"name": "get_time", "description": "The time in a city.",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip
QWEN_TOOL_PROMPT = (  # LLaMA-Factory's tool_utils.QWEN_TOOL_PROMPT (Qwen2.5's own words)
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}'
    "\n</tool_call>"
)


def _call(name: str, city: str) -> dict:
    return {"name": name, "arguments": {"city": city}}


def _llamafactory_tools(tok, system: str | None, turns: list[tuple[str, str]], tools: list[dict], mask_history=False):
    """LLaMA-Factory's qwen template on a sharegpt tool row: the tools appended to the system prompt (its default
    when the row has none), a function_call target written as <tool_call> blocks, an observation a user turn of
    <tool_response>; human and observation turns are sources (-100), function_call and gpt turns targets (with
    mask_history, the last alone)."""
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    listed = "".join("\n" + json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
    head = (
        system or "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    ) + QWEN_TOOL_PROMPT.format(tools=listed)
    ids, labels, opened = [], [], "<|im_end|>\n<|im_start|>assistant\n"
    for k, (role, value) in enumerate(turns):
        if role == "human":
            text = (f"<|im_start|>system\n{head}<|im_end|>\n" if k == 0 else "") + f"<|im_start|>user\n{value}{opened}"
        elif role == "observation":
            text = f"<|im_start|>user\n<tool_response>\n{value}\n</tool_response>{opened}"
        elif role == "function_call":
            calls = json.loads(value)
            calls = calls if isinstance(calls, list) else [calls]
            text = "\n".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls)
            text += "<|im_end|>\n"
        else:
            text = f"{value}<|im_end|>\n"
        part = enc(text)
        ids += part
        source = role in ("human", "observation") or (mask_history and k < len(turns) - 1)
        labels += [IGNORE_INDEX] * len(part) if source else part
    return ids, labels


@pytest.mark.parametrize(
    "system, turns",
    [
        (None, [("human", "Weather in Paris?"), ("function_call", json.dumps(_call("get_weather", "Paris"))),
                ("observation", '{"temp": 21}'), ("gpt", "It is 21 degrees.")]),
        (None, [("human", "Weather and time in Oslo?"),
                ("function_call", json.dumps([_call("get_weather", "Oslo"), _call("get_time", "Oslo")])),
                ("observation", "snow, 9:00"), ("gpt", "Snowing; it is nine.")]),
        ("Be brief.", [("human", "Hi"), ("gpt", "Hello."), ("human", "Weather in Rome?"),
                       ("function_call", json.dumps(_call("get_weather", "Rome"))), ("observation", "sunny"),
                       ("gpt", "Sunny.")]),
    ],
)  # fmt: skip
def test_tool_rows_equal_llamafactorys_qwen_formatter(smol, system, turns):
    """A glaive-style sharegpt row (function_call, observation, a tools column as a JSON string), rendered with
    Qwen2.5's chat template: ids and labels equal LLaMA-Factory's qwen template (single, parallel and multi-turn
    calls, with and without a system prompt)."""
    from tiny import trl_template

    tok = copy.deepcopy(smol)
    tok.chat_template = trl_template("qwen2_5")
    row = {"conversations": [{"from": r, "value": v} for r, v in turns], "tools": json.dumps([WEATHER, CLOCK])}
    if system:
        row["system"] = system
    samples = read_samples([Row(row, "glaive.json:1")], {}, None, stage="sft")
    for mask_history in (False, True):
        ex = encode_sft_samples(samples, tok, None, 4096, mask_history=mask_history).examples[0]
        assert (ex["input_ids"], ex["labels"]) == _llamafactory_tools(
            tok, system, turns, [WEATHER, CLOCK], mask_history
        )


def test_llamafactory_ranking_rows_with_the_built_in_chatml_equal_its_pairwise_encoding(smol):
    """A sharegpt ranking row (LLaMA-Factory's dpo_en_demo shape: a system turn, history, chosen and rejected
    gpt messages) under stage dpo with data.template=chatml: each side is its qwen template's prompt ids + answer ids,
    labels on the answer through ``<|im_end|>\\n`` (the built-in chatml left the ``\\n`` out)."""
    from deltatune.data.encode import encode_pair_samples

    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Colour?"}],
           "chosen": {"from": "gpt", "value": "Blue."}, "rejected": {"from": "gpt", "value": "I will not."}}  # fmt: skip
    samples = read_samples([Row(row, "dpo_en_demo.json:1")], {}, "sharegpt", stage="dpo")
    prompt = smol(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello."
        "<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )["input_ids"]
    pair = encode_pair_samples(samples, smol, "chatml", 512, "truncate", causal=True).examples[0]
    for side, answer in (("chosen", "Blue."), ("rejected", "I will not.")):
        target = smol(f"{answer}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert pair[side]["input_ids"] == prompt + target
        assert pair[side]["labels"] == [IGNORE_INDEX] * len(prompt) + target


# -- sharegpt rows with odd role orders and odd values: one line naming file:line and the field -----------------


def test_an_empty_function_call_names_the_sharegpt_field():
    """A function_call turn whose value is ``[]`` was refused as ``messages[1].content: the assistant turn is empty``,
    a field the sharegpt row does not have."""
    from deltatune.data.load import DataError

    row = {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": "[]"},
                             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
           "tools": json.dumps([WEATHER])}  # fmt: skip
    with pytest.raises(
        DataError, match=r"^glaive.json:3: conversations\[1\]\.value: the function_call turn holds no call"
    ):
        read_samples([Row(row, "glaive.json:3")], {}, None, stage="sft")


@pytest.mark.parametrize("name", ["qwen2_5", "qwen2_5_vl", "qwen3_instruct_2507", "qwen3_vl"])
def test_built_in_chatml_equals_qwens_own_templates_on_a_multi_turn_row_with_a_system_prompt(smol, name):
    """The chatml models' own templates (TRL's copies) render a system prompt and two turns as the built-in chatml
    does: the same ids, and the labels their own template gives (each answer through ``<|im_end|>\\n``)."""
    from tiny import trl_template

    tok = copy.deepcopy(smol)
    tok.chat_template = trl_template(name)
    s = Sample("t.jsonl:1", "messages", TURNS)
    assert sft_example(s, tok, "chatml") == sft_example(s, tok, None)
    assert sft_example(s, tok, "chatml")[0] == tok.apply_chat_template(TURNS, tokenize=True, return_dict=False)


@pytest.mark.parametrize("mask_history, train_on_prompt", [(False, False), (True, False), (False, True), (True, True)])
def test_the_first_row_note_marks_what_mask_history_and_train_on_prompt_train(smol, mask_history, train_on_prompt):
    """The report's first row (``first_row_note``) marks the characters ``sft_example`` trains under each option."""
    from deltatune.data.encode import first_row_note, rendered

    s = Sample("t.jsonl:1", "messages", TURNS)
    [(_, text, spans)] = rendered(s, smol, None, "sft", mask_history, train_on_prompt)
    assert "".join(text[a:b] for a, b in spans) == smol.decode(
        _trained(*sft_example(s, smol, None, mask_history, train_on_prompt))
    )
    body = first_row_note("train", s, smol, None, "sft", mask_history, train_on_prompt).split("```text", 1)[1]
    assert body.count("[[") == len(spans) == (1 if train_on_prompt != mask_history else 2)
    trained = [part.split("]]")[0] for part in body.split("[[")[1:]]
    assert "Green.<|im_end|>" in trained[-1] and any("Blue." in t for t in trained) != mask_history
