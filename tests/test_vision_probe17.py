"""Probe 17 of the cls / tag / image_cls / caption stages against transformers 5.25's example scripts (run_glue /
run_classification, run_ner, run_image_classification), seqeval and scikit-learn.

Probed and found equal (nothing to fix): entity precision / recall / F1 are seqeval's default mode on random IOB1,
IOB2 and IOBES sequences (stray I- and E- tags included) and per type its ``classification_report``; single-label
F1 is sklearn's binary F1 (two classes) or macro F1; multi-label micro / macro F1 and subset accuracy are sklearn's
on indicator matrices; Pearson and Spearman (ties) are scipy's. Bad cls / tag rows (a label column missing or null,
an unknown eval label or tag, a regression label that is no number, tokens and tags of unequal length) are one line
naming file:line.
"""

from __future__ import annotations

import json

import pytest
from tiny import tokenizer

from deltatune.data.load import DataError
from deltatune.train.config import build


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("labels", [["O", "B-per", "I-per"], None])
def test_a_boolean_tag_is_one_line_naming_the_row(tmp_path, labels):
    """A tag ``true`` among tag ids: Python's True == 1 made it tag 1 (B-per) silently with data.labels (and "integer
    tag ids" without); datasets cannot read such a column at all (arrow: "changed from number to boolean")."""
    from deltatune.train.tag import prepare_tag

    ok = {"tokens": ["a", "b"], "ner_tags": [0, 1] if labels else ["O", "B-per"]}
    bad = {"tokens": ["a", "b"], "ner_tags": [0, True] if labels else ["O", True]}
    data = {"train": _jsonl(tmp_path / "t.jsonl", [ok]), "eval": _jsonl(tmp_path / "e.jsonl", [ok, bad])}
    cfg = build({"stage": "tag", "data": {**data, **({"labels": labels} if labels else {})}})
    with pytest.raises(DataError) as err:
        prepare_tag(cfg, tokenizer())
    assert str(err.value) == (
        f"{tmp_path / 'e.jsonl'}:2: tag true in column 'ner_tags' is a boolean; write the tag's name (B-per, O, ...) "
        "or, with data.labels, its id"
    )
    if labels:  # the same ids as numbers train as given
        cfg = build({"stage": "tag", "data": {"train": data["train"], "labels": labels}})
        assert [ex["labels"] for ex in prepare_tag(cfg, tokenizer()).train][0][1:-1] == [0, 1]
