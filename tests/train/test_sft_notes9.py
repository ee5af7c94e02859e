"""An SFT row whose every answer has weight 0 is dropped under its own reason, not as one cut by data.max_length."""

import json

import pytest
from tiny import minilm_path
from transformers import AutoTokenizer

from deltatune.data.load import DataError
from deltatune.train.config import build
from deltatune.train.sft import prepare_sft

HI = {"role": "user", "content": "Hi"}


def _prepare(tmp_path, rows, max_length=64):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows), encoding="utf-8")
    cfg = build({"stage": "sft", "model": {"name_or_path": "smollm2"},
                 "data": {"train": str(path), "template": "chatml", "max_length": max_length}})  # fmt: skip
    return prepare_sft(cfg, AutoTokenizer.from_pretrained(minilm_path())), path


def test_a_row_of_weight_0_answers_is_noted_apart(tmp_path):
    quiet = [HI, {"role": "assistant", "content": "Yo.", "weight": 0}]
    long = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "Hello."}]
    prepared, path = _prepare(tmp_path, [quiet, [HI, {"role": "assistant", "content": "Hello."}], long])
    assert len(prepared.train) == 1
    assert (
        f"1 train rows were dropped: every answer has weight 0 (nothing to train); the first: {path}:1"
        in prepared.notes
    )
    assert (
        f"1 train rows were dropped: no response token fits within data.max_length; the first: {path}:3"
        in prepared.notes
    )


def test_no_row_left_names_each_reason(tmp_path):
    quiet = [HI, {"role": "assistant", "content": "Yo.", "weight": 0}]
    with pytest.raises(
        DataError,
        match=r"no training row has a response token to train \(1 with every answer weighted 0, the first: .*t\.jsonl:1\)$",
    ):
        _prepare(tmp_path, [quiet])
