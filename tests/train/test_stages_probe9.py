"""Ninth probe of the task stages (seq2seq, tag, cls, pt): faults found and fixed, each against its reference."""

from __future__ import annotations

import pytest
from tiny import tokenizer

from deltatune.data.load import DataError, Row
from deltatune.data.tasks import encode_pt


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _rows(*data: dict, file: str = "d.jsonl") -> list[Row]:
    return [Row(d, f"{file}:{i}") for i, d in enumerate(data, 1)]


def test_a_split_shorter_than_one_block_names_its_file(tok):
    """A pt eval file holding fewer tokens than one block was refused as 'the text holds 3 tokens, fewer than one
    block of data.max_length=8', with nothing to say whether the train or the eval file was short."""
    rows = _rows({"text": "good morning"}, file="/data/eval.jsonl")
    with pytest.raises(DataError, match=r"^/data/eval.jsonl: the text holds 3 tokens, fewer than one block of "):
        encode_pt(rows, tok, "text", block_size=8)
