"""SFT probe 20: a chat template that writes no assistant turn is refused naming the row (TRL 1.16's SFTTrainer trains
nothing of such a row too), where it was counted as a row whose answers are all weighted 0, by training and by
``deltatune data inspect`` alike (data.template raw: a completion that adds no token); the rows dropped are named;
an eval file with no row to score is refused, naming the way out (and, read by ``deltatune eval``, as rows to score)."""

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
    from tiny import tokenizer

    t = tokenizer()  # (MiniLM's, shipped: the refusal runs everywhere; SmolLM2's ChatML renders alike)
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
    from tiny import tokenizer

    tok0 = tokenizer()  # (its ChatML-like template writes every turn; WordPiece lowercases and splits the markers)
    enc = encode_sft_samples(_samples([{"messages": Q + weighted}, {"messages": Q + A}]), tok0, None, 64)
    assert enc.unweighted == 1 and len(enc.examples) == 1 and enc.first_unweighted == "t.jsonl:1"
    labels = enc.examples[0]["labels"]
    assert tok0.decode([x for x in labels if x != IGNORE_INDEX]) == "yellow. < | im _ end | >"


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
                                        r"data\.max_length=64, the first: .*e\.jsonl:1\); raise data\.max_length, "
                                        r"or leave data\.eval \(and train\.eval_steps, eval_on_start\) out$"):  # fmt: skip
        _prepare(tmp_path, [ok], eval_rows=[LONG, LONG])
    assert len(_prepare(tmp_path, [ok], eval_rows=[LONG, ok])[0].eval) == 1


def test_the_eval_refusal_names_a_way_out_that_works(tmp_path):
    """The refusal named no way out: a run interrupted before it resumed into it with nothing to change. data.eval is
    HARMLESS on --resume (runfolder), and data.eval left out with train.eval_steps is a config that builds; a longer
    data.max_length keeps the rows (rows weighted 0 are not helped by it, so it is not offered for them)."""
    from deltatune.train.runfolder import HARMLESS

    ok = [HI, {"role": "assistant", "content": "Hello."}]
    assert "data.eval" in HARMLESS and "train.eval_steps" in HARMLESS
    with pytest.raises(DataError, match=r"^no eval row has a response token to score \(1 with every answer weighted "
                                        r"0, the first: .*e\.jsonl:1\); leave data\.eval \(and train\.eval_steps, eval_on_start\) "
                                        r"out$"):  # fmt: skip
        _prepare(tmp_path, [ok], eval_rows=[QUIET])
    assert len(_prepare(tmp_path, [ok], max_length=256, eval_rows=[LONG])[0].eval) == 1  # raised: kept


def test_inspect_refuses_a_row_the_template_writes_no_answer_for_as_training_does(tmp_path, tok):
    """``deltatune data inspect`` said "rows left out of training: 1 (every answer has weight 0, nothing to learn)"
    of a row whose answer the chat template never writes, where training refuses the row naming it."""
    import json

    from deltatune.data.inspect import inspect

    tok.save_pretrained(tmp_path / "tok")
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": [HI, {"role": "assistant", "content": "Hello."}]}) + "\n", "utf-8")
    with pytest.raises(DataError) as trained:
        encode_sft_samples(_samples([{"messages": [HI, {"role": "assistant", "content": "Hello."}]}]), tok, None, 64)
    with pytest.raises(DataError) as inspected:
        inspect(str(path), model=str(tmp_path / "tok"), stage="sft")
    assert str(inspected.value) == str(trained.value).replace("t.jsonl:1", f"{path}:1")
    assert str(inspected.value).startswith(f"{path}:1: the chat template renders none of the row's assistant answers")
    path.write_text(json.dumps({"messages": QUIET}) + "\n", "utf-8")  # a weight 0 answer: still counted
    report = inspect(str(path), model=str(tmp_path / "tok"), stage="sft", show=0)
    assert report.splitlines()[-1] == "rows left out of training: 1 (every answer has weight 0, nothing to learn)"


def test_raw_a_completion_that_adds_no_token_is_refused_without_naming_a_chat_template():
    """data.template raw renders no chat template, yet the refusal blamed "the chat template" and offered a built-in
    one. TRL's standard prompt-completion tokenization trains nothing of the row either (its completion mask all 0)."""
    from tiny import minilm_path
    from transformers import AutoTokenizer
    from trl.data_utils import common_prefix_length

    plain = AutoTokenizer.from_pretrained(minilm_path())  # (no EOS: nothing closes the completion)
    p, ids = plain("Hi")["input_ids"], plain("Hi\u200b")["input_ids"]
    assert plain.eos_token is None and common_prefix_length(p, ids) == len(ids)
    rows = _samples([{"prompt": "Hi", "completion": "\u200b"}])
    with pytest.raises(DataError, match=r"^t\.jsonl:1: the completion adds no token after the prompt, so nothing "
                                        r"would train; fix or drop the row$"):  # fmt: skip
        encode_sft_samples(rows, plain, "raw", 64)


def test_deltatune_eval_of_a_file_with_no_row_to_score_says_so(tmp_path):
    """``deltatune eval --data F`` reads F as data.train (and data.eval): a file whose every row is dropped was
    refused as "no training row has a response token to train", of a command that trains nothing."""
    import json

    from tiny import minilm_path

    from deltatune.train.evaluation import evaluate

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"task_type": "CAUSAL_LM", "base_model_name_or_path": minilm_path()}), "utf-8"
    )
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (LONG, LONG)), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^no row of {path} has a response token to score \(2 with none within "
                                        rf"data\.max_length=64, the first: {path}:1\)$"):  # fmt: skip
        evaluate(str(adapter), str(path), ["data.template=chatml", "data.max_length=64"])
