"""SFT probe 20: a chat template that writes no assistant turn is refused naming the row (TRL 1.16's SFTTrainer trains
nothing of such a row too), where it was counted as a row whose answers are all weighted 0; packed SFT blocks read
and score as the rows do alone (TRL's padding-free position ids)."""

from __future__ import annotations

import pytest

from deltatune.data.encode import encode_sft_samples
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row
from deltatune.data.templates import IGNORE_INDEX

# ChatML that writes every turn but the assistant's, and no generation prompt (with one, the turn is refused as one
# rendered unlike itself ending the conversation: templates.render's line, naming the row and the turn).
DROPS_ANSWERS = (
    "{% for m in messages %}{% if m.role != 'assistant' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
)
Q = [{"role": "user", "content": "What colour is a ripe lemon?"}]
A = [{"role": "assistant", "content": "Yellow."}]


@pytest.fixture(scope="module")
def tok():
    from tiny import smollm2_tokenizer

    t = smollm2_tokenizer()
    t.chat_template = DROPS_ANSWERS
    return t


def _samples(rows):
    return read_samples([Row(r, f"t.jsonl:{i + 1}") for i, r in enumerate(rows)], {}, stage="sft")


@pytest.mark.parametrize("shape", ["messages", "prompt_completion"])
@pytest.mark.parametrize("mask_history", [False, True])
def test_a_template_that_drops_the_assistant_turn_is_refused_naming_the_row(tok, shape, mask_history):
    """It was counted as a row whose answers are all weighted 0 (the run then failed with "1 with every answer weighted
    0", a weight the row never had). TRL's own tokenization of the row trains nothing either."""
    from trl.data_utils import _tokenize, common_prefix_length

    p = _tokenize(tok, Q, add_generation_prompt=True)["input_ids"]
    ids = _tokenize(tok, Q + A)["input_ids"]
    assert common_prefix_length(p, ids) == len(ids)  # TRL: a completion mask of zeros, the row dropped unseen
    # (messages: the row before it, its answer weighted 0, is left out and counted; a completion has no weight)
    rows = (
        [{"messages": Q + [{**A[0], "weight": 0}]}, {"messages": Q + A}]
        if shape == "messages"
        else [{"prompt": Q, "completion": A}]
    )
    with pytest.raises(
        DataError, match=rf"^t\.jsonl:{len(rows)}: the chat template renders none of the row's assistant"
    ) as e:
        encode_sft_samples(_samples(rows), tok, None, 64,
                           mask_history=mask_history)  # fmt: skip
    assert "\n" not in str(e.value)


def test_answers_weighted_0_are_still_counted_not_refused():
    """A row whose answers are all weighted 0 is still left out and counted (nothing the template dropped)."""
    weighted = [{**A[0], "weight": 0}]
    from tiny import CHAT_TEMPLATE, smollm2_tokenizer

    tok0 = smollm2_tokenizer()
    tok0.chat_template = CHAT_TEMPLATE
    enc = encode_sft_samples(_samples([{"messages": Q + weighted}, {"messages": Q + A}]), tok0, None, 64)
    assert enc.unweighted == 1 and len(enc.examples) == 1
    labels = enc.examples[0]["labels"]
    assert tok0.decode([x for x in labels if x != IGNORE_INDEX]) == "Yellow.<|im_end|>\n"


def _prepare(tmp_path, rows, max_length=64, eval_rows=None):
    import json

    from tiny import minilm_path
    from transformers import AutoTokenizer

    from deltatune.train.config import build
    from deltatune.train.sft import prepare_sft

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows), encoding="utf-8")
    data = {"train": str(path), "template": "chatml", "max_length": max_length}
    if eval_rows is not None:
        data["eval"] = str(tmp_path / "e.jsonl")
        (tmp_path / "e.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in eval_rows), "utf-8")
    cfg = build({"stage": "sft", "model": {"name_or_path": "smollm2"}, "data": data})
    return prepare_sft(cfg, AutoTokenizer.from_pretrained(minilm_path())), path


HI = {"role": "user", "content": "Hi"}
QUIET = [HI, {"role": "assistant", "content": "Yo.", "weight": 0}]
LONG = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "Hello."}]


def test_rows_dropped_for_max_length_or_weight_0_name_the_first_of_them(tmp_path):
    """The notes counted the rows left out (TRL drops a row truncation leaves fully masked without a word) but named
    none of them, so a user could not find which rows no answer fits."""
    prepared, path = _prepare(tmp_path, [[HI, {"role": "assistant", "content": "Hello."}], LONG, QUIET, LONG])
    assert len(prepared.train) == 1
    assert f"2 train rows were dropped: no response token fits within data.max_length; the first: {path}:2" in (
        prepared.notes
    )
    assert f"1 train rows were dropped: every answer has weight 0 (nothing to train); the first: {path}:3" in (
        prepared.notes
    )
    with pytest.raises(DataError, match=r"\(1 with none within data\.max_length=64, the first: .*t\.jsonl:1; "
                                        r"1 with every answer weighted 0, the first: .*t\.jsonl:2\)$"):  # fmt: skip
        _prepare(tmp_path, [LONG, QUIET])


def test_an_eval_file_with_no_row_to_score_is_refused(tmp_path):
    """An eval file whose every row was dropped (no answer token within data.max_length) gave an empty eval split:
    the run went on evaluating nothing, without a word (transformers' evaluate() of no rows reports no eval_loss)."""
    ok = [HI, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(DataError, match=r"^no eval row has a response token to score \(2 with none within "
                                        r"data\.max_length=64, the first: .*e\.jsonl:1\)$"):  # fmt: skip
        _prepare(tmp_path, [ok], eval_rows=[LONG, LONG])
    assert len(_prepare(tmp_path, [ok], eval_rows=[LONG, ok])[0].eval) == 1
