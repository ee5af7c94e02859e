"""Probe 21 of the cls / tag stages against transformers' run_glue / run_classification and the metrics they report
(GLUE's evaluate metrics: sklearn's): a multi-label run's eval file of class ids names its classes as a single-label
run's does (run_classification builds the label list from the union of the splits), and the classification eval
reports Matthews' correlation, GLUE's CoLA metric, as sklearn's ``matthews_corrcoef``."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef
from tiny import tokenizer

from deltatune.train import metrics as M
from deltatune.train.cls import prepare_cls
from deltatune.train.config import build


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_multi_label_eval_files_class_ids_are_classes_as_a_single_labels(tok, tmp_path):
    """HEAD refused the multi-label eval row of id 3 ('label 3 ... is not in the label set ['0', '1', '2']') where the
    single-label run of the same ids trains it as class 3 (an id data.limit left out of train), and
    run_classification adds the eval labels to the label list. Now both runs have the classes 0..3, the eval row's
    multi-hot target (ids 3 and 1) [0, 1, 0, 1]."""
    train = _write(tmp_path / "m.jsonl", [{"text": "a", "label": [0, 1]}, {"text": "b", "label": [2]}])
    ev = _write(tmp_path / "e.jsonl", [{"text": "c", "label": [3, 1]}])
    single_train = _write(tmp_path / "s.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    single_ev = _write(tmp_path / "f.jsonl", [{"text": "c", "label": 3}])
    single = prepare_cls(build({"stage": "cls", "data": {"train": single_train, "eval": single_ev}}), tok)
    multi = prepare_cls(build({"stage": "cls", "data": {"train": train, "eval": ev}}), tok)
    assert single.labels == ["0", "2", "3"] and multi.labels == ["0", "1", "2", "3"]
    assert [e["labels"] for e in multi.eval] == [[0.0, 1.0, 0.0, 1.0]]
    assert [e["labels"] for e in multi.train] == [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_the_classification_eval_reports_matthews_correlation_as_sklearns(tok, tmp_path, classes):
    """GLUE's CoLA is scored by Matthews' correlation (evaluate's glue metric: sklearn's matthews_corrcoef, run_glue's
    eval_matthews_correlation); HEAD reported accuracy and F1 only, so a CoLA run had no figure to compare and
    train.metric_for_best_model: matthews_correlation no key to read. Equal to sklearn's to 1e-12 on random
    predictions, K classes alike, and 0.0 where one side holds one class (sklearn's)."""
    rows = [{"text": f"t {i}", "label": i % classes} for i in range(classes)]
    prepared = prepare_cls(build({"stage": "cls", "data": {"train": _write(tmp_path / "c.jsonl", rows)}}), tok)
    rng = random.Random(classes)
    for _ in range(20):
        labels = np.array([rng.randrange(classes) for _ in range(rng.randint(2, 30))])
        guess = np.array([rng.randrange(classes) if rng.random() < 0.6 else y for y in labels])
        got = prepared.compute_metrics(SimpleNamespace(predictions=np.eye(classes)[guess], label_ids=labels))
        assert got["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, guess), abs=1e-12)
    one = np.zeros(6, dtype=int)
    for labels, guess in ((one, np.array([0, 1, 0, 1, 1, 0])), (np.array([0, 1, 0, 1, 1, 0]), one), (one, one)):
        assert M.matthews(guess.tolist(), labels.tolist()) == matthews_corrcoef(labels, guess) == 0.0
    assert M.matthews([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(-1 / 3)  # sklearn's docstring example's -0.33


def test_metric_for_best_model_may_name_a_per_type_entity_score(tok, tmp_path):
    """Under data.return_entity_level_metrics the tag eval reports run_ner's <type>_f1 (and _precision, _recall,
    _number) keys, but train.metric_for_best_model: eval_location_f1 was refused before training ('which stage tag's
    evaluation does not report; it reports loss, f1, precision, recall, accuracy'). Now the scores of a type the eval
    rows' true tags hold pass, a type they do not hold is refused (tests/test_heads_fix21.py: through train(), a
    type only in train or data.labels, and <type>_number)."""
    from deltatune.config import ConfigError
    from deltatune.train.config_train import check_best_metric
    from deltatune.train.metrics import true_entity_types
    from deltatune.train.tag import prepare_tag

    rows = [{"tokens": ["Ann", "in", "New", "York"], "ner_tags": ["B-person", "O", "B-location", "I-location"]}]
    data = {"train": _write(tmp_path / "t.jsonl", rows), "return_entity_level_metrics": True}
    prepared = prepare_tag(build({"stage": "tag", "data": {**data, "eval": data["train"]}}), tok)
    names = prepared.labels
    true = np.array([[-100, *[names.index(t) for t in rows[0]["ner_tags"]], -100]])
    got = prepared.compute_metrics(
        SimpleNamespace(predictions=np.eye(len(names))[np.maximum(true, 0)], label_ids=true)
    )
    types = true_entity_types(prepared.eval, names)
    assert types == ["location", "person"]
    for key in ("location_f1", "person_precision", "location_recall"):
        assert key in got
        train = {"metric_for_best_model": f"eval_{key}", "load_best_model_at_end": True}
        cfg = build({"stage": "tag", "data": {**data, "eval": data["train"]}, "train": train})
        check_best_metric(cfg, prepared.metric, None, types)
    cfg = build(
        {"stage": "tag", "data": {**data, "eval": data["train"]}, "train": {"metric_for_best_model": "eval_org_f1"}}
    )
    with pytest.raises(ConfigError, match=r"'eval_org_f1', but the eval rows \(data.eval\) hold no org entity"):
        check_best_metric(cfg, prepared.metric, None, types)


@pytest.mark.parametrize(
    "stage, pair, max_length", [("cls", False, 1), ("cls", False, 2), ("cls", True, 3), ("tag", False, 2)]
)
def test_a_max_length_that_leaves_no_text_token_is_one_line(tok, tmp_path, stage, pair, max_length):
    """A limit at or under the tokenizer's special tokens (BERT's [CLS] [SEP]; a pair's 3): transformers' tokenizer
    logs an error and returns the row uncut (6 tokens at max_length 1, which HEAD trained and counted as truncated),
    or keeps the special tokens alone ([CLS] [SEP] [SEP] for a pair at 3: no text to classify); HEAD's tag stage said
    'no row has a word with a token to tag'. Now one line names data.max_length, the count and the least limit
    that fits; that limit trains (the text's first token; a pair needs one token of each text: test_heads_fix21)."""
    from deltatune.config import ConfigError
    from deltatune.train.tag import prepare_tag

    text, other = "a long text here", "and a pair"
    assert len(tok(text, truncation=True, max_length=1)["input_ids"]) == 6  # the reference: uncut
    assert tok(text, other, truncation=True, max_length=3)["input_ids"] == [101, 102, 102]  # no text left
    rows = [{"text": text, "p": other, "label": "x", "tokens": text.split(), "ner_tags": ["B-x", "O", "O", "O"]}]
    rows.append({**rows[0], "label": "y"})
    data = {"train": _write(tmp_path / "d.jsonl", rows), **({"text_pair_column": "p"} if pair else {})}
    prepare = prepare_cls if stage == "cls" else prepare_tag
    with pytest.raises(ConfigError) as err:
        prepare(build({"stage": stage, "data": {**data, "max_length": max_length}}), tok)
    special, least = (3, 5) if pair else (2, 3)
    assert str(err.value).startswith(f"data.max_length={max_length}: the tokenizer adds {special} special tokens")
    assert str(err.value).endswith(f"; set data.max_length to {least} or more")
    kept = prepare(build({"stage": stage, "data": {**data, "max_length": least}}), tok)
    assert [e["input_ids"][:2] for e in kept.train] == [[101, 1037]] * len(kept.train)
    assert all(len(e["input_ids"]) == least for e in kept.train)
