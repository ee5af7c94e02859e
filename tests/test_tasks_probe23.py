"""Probe 23 of the cls / tag / seq2seq / image_cls stages' metrics against their references (seqeval, scikit-learn)
and of the digits writer's command line."""

from __future__ import annotations

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score

from deltatune.train import metrics as M

LOWER = [["b-per", "i-per", "O", "b-per", "b-per", "i-loc"], ["B-per", "i-per", "O", "b-loc"]]
PRED = [["b-per", "i-per", "O", "b-per", "i-per", "i-loc"], ["B-per", "I-per", "O", "b-loc"]]


def test_lowercase_bio_tags_score_as_seqeval_reads_them():
    """seqeval's default (conlleval) scheme knows B / I / E / S / O only in upper case: a tag set written b-per /
    i-per is read by its types alone (a chunk runs while the type stays: b-per b-per is one entity), as run_ner's
    evaluate-seqeval scores it; deltatune's entity F1 is the same figure."""
    with pytest.warns(UserWarning, match="seems not to be NE tag"):
        want = {
            "precision": precision_score(LOWER, PRED),
            "recall": recall_score(LOWER, PRED),
            "f1": f1_score(LOWER, PRED),
        }
    got = M.entity_prf([M.one_sequence(PRED)], [M.one_sequence(LOWER)])
    assert got == pytest.approx(want, abs=1e-12)
    assert M.entities(["b-per", "b-per", "O"]) == {("per", 0, 2)}  # one entity, as seqeval's get_entities


@pytest.mark.parametrize("sub", ["", "sub"])
def test_digits_into_a_file_is_refused_in_one_line(tmp_path, capsys, sub):
    """An output path that is a file (or under one) failed with os.makedirs' NotADirectoryError traceback."""
    from deltatune.data import digits

    target = tmp_path / "a-file"
    target.write_text("kept")
    out = target / sub if sub else target
    with pytest.raises(SystemExit) as done:
        digits.main([str(out)])
    assert done.value.code == 2 and target.read_text() == "kept"
    last = capsys.readouterr().err.splitlines()[-1]
    want = (
        f"error: {out} is a file, not a folder: name a folder to write the digits into"
        if not sub
        else f"error: {out}: cannot write the digits: [Errno 20] Not a directory: '{out}'"
    )
    assert last.endswith(want)
