"""Fixes after the review of heads probe 21: a per-type entity score (run_ner's ``<type>_f1`` under
data.return_entity_level_metrics) as train.metric_for_best_model is taken only for a type the eval rows' true tags
hold (seqeval reports a type only where the evaluation's true or predicted tags hold one: a type only in train, or
only in data.labels, stopped the run at its first evaluation, after steps trained), checked through ``train`` before
the model loads; ``<type>_number`` (a constant count) is no score to keep a checkpoint by; cls / tag's data.max_length
check names the way out, counts one special token as one, and keeps a token of each text of a pair."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from seqeval.metrics import classification_report
from tiny import save_tiny, tokenizer

from deltatune.config import ConfigError
from deltatune.train import build, train
from deltatune.train.cls import prepare_cls
from deltatune.train.tag import prepare_tag

TRAIN = [
    {"tokens": ["Ann", "at", "Acme"], "ner_tags": ["B-person", "O", "B-org"]},
    {"tokens": ["Bo", "in", "Oslo"], "ner_tags": ["B-person", "O", "B-location"]},
]
EVAL = [{"tokens": ["Ann", "at", "home"], "ner_tags": ["B-person", "O", "O"]}]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def tiny_tag(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "bert", "bert", "token_cls")


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _raw(tmp_path: Path, model: str, metric: str, **data) -> dict:
    files = {"train": _write(tmp_path / "tr.jsonl", TRAIN), "eval": _write(tmp_path / "ev.jsonl", EVAL)}
    return {"stage": "tag", "model": {"name_or_path": model},
            "data": {**files, "return_entity_level_metrics": True, "max_length": 16, **data},
            "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
            "output": {"dir": str(tmp_path / "o")},
            "train": {"max_steps": 2, "eval_steps": 1, "save_steps": 1, "load_best_model_at_end": True,
                      "metric_for_best_model": metric, "report_to": ["none"]}}  # fmt: skip


@pytest.fixture
def unloaded(monkeypatch):
    """train() up to the model's load: the checks before it run, the model does not load."""
    import deltatune.train.run as run

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(run, "start_model", loaded)


def _reported(tok, tmp_path: Path, predicted: list[str]) -> tuple[set[str], set[str]]:
    """The keys the stage's compute_metrics reports for the eval row predicted as ``predicted``, and seqeval's types
    for it (the reference: evaluate's seqeval, which run_ner flattens to <type>_f1 ...)."""
    data = {"train": _write(tmp_path / "tr.jsonl", TRAIN), "eval": _write(tmp_path / "ev.jsonl", EVAL)}
    prepared = prepare_tag(build({"stage": "tag", "data": {**data, "return_entity_level_metrics": True}}), tok)
    names, true = prepared.labels, [t for r in EVAL for t in r["ner_tags"]]
    ids = np.array([[-100, *[names.index(t) for t in true], -100]])
    guess = np.array([[0, *[names.index(t) for t in predicted], 0]])
    got = prepared.compute_metrics(SimpleNamespace(predictions=np.eye(len(names))[guess], label_ids=ids))
    ref = classification_report([true], [predicted], output_dict=True, zero_division=0)
    return set(got), {k for k in ref if not k.endswith(" avg")}


def test_seqeval_reports_a_type_only_where_the_eval_tags_hold_one(tok, tmp_path):
    """The reference's behaviour that the check follows: org, which the eval row does not hold, is reported only by
    an evaluation that predicts one (seqeval and the stage alike); person, which it holds, always."""
    keys, ref = _reported(tok, tmp_path, ["B-person", "O", "O"])
    assert ref == {"person"} and "person_f1" in keys and "org_f1" not in keys
    keys, ref = _reported(tok, tmp_path, ["O", "O", "B-org"])
    assert ref == {"person", "org"} and {"person_f1", "org_f1"} <= keys


def test_a_type_the_eval_rows_hold_passes_through_train(tiny_tag, tmp_path, unloaded):
    """train(build(raw)) with eval_person_f1 (person: in the eval row's true tags) gets to the model's load."""
    for metric in ("eval_person_f1", "person_precision", "eval_person_recall", "eval_f1"):
        with pytest.raises(AssertionError, match="the model loaded"):
            train(build(_raw(tmp_path, tiny_tag, metric)))


@pytest.mark.parametrize(
    "labels", [None, ["O", "B-person", "I-person", "B-org", "I-org", "B-location", "I-location", "B-misc", "I-misc"]]
)
@pytest.mark.parametrize("kind", ["org", "misc", "location"])
def test_a_type_the_eval_rows_do_not_hold_is_refused_before_the_model_loads(
    tiny_tag, tmp_path, unloaded, kind, labels
):
    """org (and location): only in the train rows; misc: only in data.labels (or nowhere). HEAD took eval_org_f1
    (a class of prepared.labels), loaded the model and trained, and the Trainer's KeyError came at the first
    evaluation (reviewer's p2.py). Now one line before the model loads, naming the eval rows' types."""
    data = {"labels": labels} if labels else {}
    with pytest.raises(ConfigError) as refused:
        train(build(_raw(tmp_path, tiny_tag, f"eval_{kind}_f1", **data)))
    assert str(refused.value) == (
        f"train.metric_for_best_model is 'eval_{kind}_f1', but the eval rows (data.eval) hold no {kind} entity: "
        f"seqeval reports a type's scores only at an evaluation whose true or predicted tags hold one, so the first "
        f"evaluation without one would stop the run; the eval rows hold person"
    )


def test_the_held_out_rows_are_named_as_the_eval_rows(tiny_tag, tmp_path, unloaded):
    """data.val_size's held-out rows are the eval rows checked (here: the one train row held out, person and
    location; org stays in train)."""
    raw = _raw(tmp_path, tiny_tag, "eval_org_f1", val_size=1)
    del raw["data"]["eval"]
    prepared = prepare_tag(build(raw), tokenizer())
    held = {t for e in prepared.eval for i in e["labels"] if i != -100 for t in [prepared.labels[i]]}
    assert held == {"B-person", "O", "B-location"}
    with pytest.raises(ConfigError, match=r"but the eval rows \(held out by data.val_size\) hold no org entity: .*; "
                       r"the eval rows hold location, person$"):  # fmt: skip
        train(build(raw))
    raw["train"]["metric_for_best_model"] = "location_f1"
    with pytest.raises(AssertionError, match="the model loaded"):
        train(build(raw))


@pytest.mark.parametrize("metric", ["eval_person_number", "org_number"])
def test_a_types_count_is_no_score_to_keep_a_checkpoint_by(tiny_tag, tmp_path, unloaded, metric):
    """<type>_number is the number of the type's true entities in the eval rows: the same at every evaluation, so
    load_best_model_at_end kept the first checkpoint whatever it scored. HEAD took it (and org's, a type the eval
    rows lack)."""
    kind = metric.removeprefix("eval_").split("_")[0]
    with pytest.raises(ConfigError) as refused:
        train(build(_raw(tmp_path, tiny_tag, metric)))
    assert str(refused.value) == (
        f"train.metric_for_best_model is {metric!r}, the number of {kind} entities in the eval rows: the same at "
        f"every evaluation, no score to keep a checkpoint by; name {kind}_f1, {kind}_precision or {kind}_recall (a run resumed with it: "
        "with --resume-changed)"
    )


def _rows(tmp_path: Path) -> str:
    rows = [{"text": "a long text here", "p": "and a pair", "label": "x", "tokens": ["a", "long", "text", "here"],
             "ner_tags": ["B-x", "O", "O", "O"]}]  # fmt: skip
    return _write(tmp_path / "d.jsonl", [*rows, {**rows[0], "label": "y"}])


@pytest.mark.parametrize(
    "stage, pair, max_length",
    [("cls", False, 1), ("cls", False, 2), ("cls", True, 3), ("cls", True, 4), ("tag", False, 2)],
)
def test_a_max_length_without_room_names_the_way_out(tok, tmp_path, stage, pair, max_length):
    """The refusal names the tokenizer as seq2seq's does (HEAD: 'BertTokenizer adds ...', a class name that says
    nothing of which tokenizer) and the limit to set, as seq2seq's check_room; a pair needs a token of each text
    (HEAD took 4: [CLS] a [SEP] [SEP] dropped the second text whole)."""
    data = {"train": _rows(tmp_path), "max_length": max_length, **({"text_pair_column": "p"} if pair else {})}
    prepare = prepare_cls if stage == "cls" else prepare_tag
    with pytest.raises(ConfigError) as refused:
        prepare(build({"stage": stage, "data": data}), tok)
    if pair:
        assert str(refused.value) == (
            f"data.max_length={max_length}: the tokenizer adds 3 special tokens to each text pair "
            "(data.text_pair_column), which leaves no room for one token of each text (cut to 4 it drops one text "
            "whole, to 3 it keeps the special tokens alone; below, it cuts nothing); set data.max_length to 5 or more"
        )
    else:
        assert str(refused.value) == (
            f"data.max_length={max_length}: the tokenizer adds 2 special tokens to each row, which leaves no room for "
            "its text (cut to 2 it keeps them alone; below, it cuts nothing); set data.max_length to 3 or more"
        )


def test_a_pair_at_two_tokens_of_text_keeps_one_of_each(tok, tmp_path):
    """The reference's cut at 4 and 5 (transformers' longest_first), and the stage's encoding at 5."""
    text, other = "a long text here", "and a pair"
    assert tok.convert_ids_to_tokens(tok(text, other, truncation=True, max_length=4)["input_ids"]) == [
        "[CLS]", "a", "[SEP]", "[SEP]"]  # fmt: skip
    five = tok(text, other, truncation=True, max_length=5)["input_ids"]
    assert tok.convert_ids_to_tokens(five) == ["[CLS]", "a", "[SEP]", "and", "[SEP]"]
    data = {"train": _rows(tmp_path), "max_length": 5, "text_pair_column": "p"}
    kept = prepare_cls(build({"stage": "cls", "data": data}), tok)
    assert [e["input_ids"] for e in kept.train] == [five, five]


def test_one_special_token_is_counted_as_one():
    """A tokenizer that adds one token (a BOS, Llama's): 'adds 1 special token', not 'tokens'."""
    from deltatune.data.tasks import check_room

    class Bos:
        def num_special_tokens_to_add(self, pair=False):
            return 2 if pair else 1

    with pytest.raises(ConfigError) as refused:
        check_room(Bos(), 1)
    assert str(refused.value) == (
        "data.max_length=1: the tokenizer adds 1 special token to each row, which leaves no room for its text "
        "(cut to 1 it keeps it alone; below, it cuts nothing); set data.max_length to 2 or more"
    )
    check_room(Bos(), 2)
    check_room(Bos(), 4, pair=True)
    with pytest.raises(ConfigError, match="set data.max_length to 4 or more$"):
        check_room(Bos(), 3, pair=True)


def test_seq2seqs_check_shares_the_message_and_counts_one_token_as_one():
    """seq2seq's check_room and cls / tag's give one message (tasks.refuse_no_room); T5's tokenizer adds one token
    (</s>) to a source and a target: HEAD's seq2seq said 'adds 1 special tokens ... keeps them alone'."""
    from deltatune.train.seq2seq import check_room

    def t5_like(text="", text_target=None):
        return {"input_ids": [1]}

    with pytest.raises(ConfigError) as refused:
        check_room(t5_like, 1, 8)
    assert str(refused.value) == (
        "data.max_length=1: the tokenizer adds 1 special token to each source, which leaves no room for its text "
        "(cut to 1 it keeps it alone; below, it cuts nothing); set data.max_length to 2 or more"
    )


def test_the_eval_rows_types_are_those_seqeval_reports_whatever_is_predicted():
    """metrics.true_entity_types of encoded rows (ids, -100 off a word's first token) equals the types seqeval's
    classification_report holds for those rows predicted all "O" (the types it reports at every evaluation), over
    random rows of IOB2, IOBES, multi-hyphen and typeless tags (a chunk running on into the next row included)."""
    import random

    from deltatune.train.metrics import true_entity_types

    rng = random.Random(0)
    for names in (["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], ["O", "B-PER", "E-PER", "S-PER", "S-LOC", "I-a-b"],
                  ["O", "X", "B-", "I-x", "PER"]):  # fmt: skip
        for _ in range(100):
            rows = [[rng.randrange(len(names)) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 4))]
            examples = [{"labels": [-100, *[i for t in r for i in (t, -100)]]} for r in rows]
            tags = [[names[i] for i in r] for r in rows]
            ref = classification_report(tags, [["O"] * len(r) for r in tags], output_dict=True, zero_division=0)
            assert true_entity_types(examples, names) == sorted(k for k in ref if not k.endswith(" avg"))
