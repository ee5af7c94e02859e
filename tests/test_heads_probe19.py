"""Probe 19 of the rm / cls / tag stages against TRL 1.16's RewardTrainer, transformers' sequence classification and
seqeval 1.2.2 (evaluate's seqeval, which run_ner reports): the tag stage's entity scores are seqeval's on rows whose
tags hold a chunk seqeval carries from one row into the next."""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deltatune.data.templates import IGNORE_INDEX
from deltatune.train.config import build

sys.path.insert(0, str(Path(__file__).resolve().parent))

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-PER", "S-LOC", "X"]


def _tag_prepared(tmp_path: Path, **data):
    from tiny import tokenizer

    from deltatune.train.tag import prepare_tag

    rows = [{"tokens": ["a", "b"], "ner_tags": ["B-PER", "X"]}, {"tokens": ["c"], "ner_tags": ["O"]}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prepare_tag(build({"stage": "tag", "data": {"train": str(path), "labels": TAGS, **data}}), tokenizer())


def _seqeval(true: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """evaluate's seqeval as run_ner calls it: classification_report's micro avg and per type, accuracy_score."""
    from seqeval.metrics import accuracy_score, classification_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "X seems not to be NE tag"
        report = classification_report(true, pred, output_dict=True, zero_division=0)
    out = {"precision": report["micro avg"]["precision"], "recall": report["micro avg"]["recall"]}
    out |= {"f1": report["micro avg"]["f1-score"], "accuracy": accuracy_score(true, pred)}
    for kind, got in report.items():
        if not kind.endswith(" avg"):
            out |= {f"{kind}_precision": got["precision"], f"{kind}_recall": got["recall"]}
            out |= {f"{kind}_f1": got["f1-score"], f"{kind}_number": got["support"]}
    return out


@pytest.mark.parametrize("seed", range(4))
def test_tag_entity_scores_are_seqevals_where_a_chunk_runs_into_the_next_row(tmp_path, seed):
    """seqeval joins the rows with an "O" after each; a typeless tag ("X": type "_", the "O"'s own) is a chunk the
    "O" does not end, so it runs into the next row. Scored row by row, HEAD gave precision 0.5946 where seqeval gives 0.5405
    (the first failing seed); every figure equal to 1e-12 here, the per-type ones too."""
    prepared = _tag_prepared(tmp_path, return_entity_level_metrics=True)
    names = prepared.labels
    rng = random.Random(seed)
    true = [[rng.choice(TAGS) for _ in range(rng.randint(1, 6))] for _ in range(12)]
    pred = [[rng.choice(TAGS) if rng.random() < 0.4 else t for t in s] for s in true]
    width = max(map(len, true)) + 2  # a special token first, the pads after
    label_ids = np.full((len(true), width), IGNORE_INDEX)
    guess = np.zeros((len(true), width), dtype=int)
    for i, (t, p) in enumerate(zip(true, pred)):
        label_ids[i, 1 : 1 + len(t)] = [names.index(x) for x in t]
        guess[i, 1 : 1 + len(p)] = [names.index(x) for x in p]
    logits = np.eye(len(names))[guess]
    got = prepared.compute_metrics(SimpleNamespace(predictions=logits, label_ids=label_ids))
    want = _seqeval(true, pred)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-12, (key, got[key], value)


class _BareTok:
    """A whitespace tokenizer that adds no token of its own, as GPT-2's, Qwen's and SmolLM's do: "" -> []."""

    pad_token_id = 0

    def __call__(self, text, pair=None, **kwargs):
        ids = [3 + len(w) for w in f"{text} {pair or ''}".split()]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def test_transformers_scores_a_row_without_tokens_at_a_pad():
    """The reference: a row of pads only beside a real one, transformers' classifier reads its position 0 (a pad)."""
    import torch
    from tiny import tiny_model

    model = tiny_model("llama", "seq_cls").eval()
    model.config.pad_token_id = 0
    ids = torch.tensor([[5, 6, 7], [0, 0, 0]])
    out = model(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True)
    pad_score = model.score(out.hidden_states[-1][1, 0])
    torch.testing.assert_close(out.logits[1], pad_score)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_cls_refuses_a_row_without_tokens_naming_it(tmp_path, split):
    """HEAD encoded the empty text as [] and trained the class on a pad token's score (the test above); now one line
    names the row, and the recipe is as it was (data.multi_label not set by the refused call)."""
    from deltatune.data.load import DataError
    from deltatune.train.cls import prepare_cls

    good = [{"text": "a cat", "p": "z", "label": ["pos"]}, {"text": "a dog", "p": "z", "label": ["neg"]}]
    bad = [*good, {"text": "", "p": "", "label": ["neg"]}]
    files = {}
    for name, rows in (("train", bad if split == "train" else good), ("eval", bad if split == "eval" else good)):
        files[name] = str(tmp_path / f"{name}.jsonl")
        Path(files[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": "cls", "model": {"name_or_path": "unused"}, "data": files})
    before = cfg.data.multi_label
    paired = build({"stage": "cls", "model": {"name_or_path": "unused"}, "data": {**files, "text_pair_column": "p"}})
    with pytest.raises(DataError, match=r"\.jsonl:3: 'text' and 'p' give no token \(_BareTok adds none"):
        prepare_cls(paired, _BareTok())
    with pytest.raises(DataError) as err:
        prepare_cls(cfg, _BareTok())
    assert str(err.value).startswith(f"{tmp_path / split}.jsonl:3: 'text' gives no token")
    assert "\n" not in str(err.value) and cfg.data.multi_label == before


@pytest.mark.parametrize("labels, at", [([0, 1], 0), (["O", "B-per", None], 2), (["O", 1.5], 1)])
def test_tag_refuses_data_labels_that_are_not_names_before_training(tmp_path, labels, at):
    """HEAD trained on data.labels [0, 1] and failed at the first evaluation, in the entity scorer ('int' object is
    not subscriptable; seqeval's get_entities fails alike on a number, 'int' object has no attribute 'startswith')."""
    from seqeval.metrics import f1_score
    from tiny import tokenizer

    from deltatune.config import ConfigError
    from deltatune.train.tag import prepare_tag

    with pytest.raises(AttributeError):  # the reference: seqeval cannot score numbers as tags
        f1_score([[1, 0]], [[1, 0]])
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"tokens": ["a", "cat"], "ner_tags": [1, 0]}) + "\n")
    cfg = build({"stage": "tag", "data": {"train": str(path), "labels": labels}})
    with pytest.raises(ConfigError) as err:
        prepare_tag(cfg, tokenizer())
    assert str(err.value).startswith(f"data.labels[{at}] is {labels[at]!r}, not a tag's name") and "\n" not in str(
        err.value
    )


@pytest.mark.parametrize("split", ["train", "eval"])
def test_tag_refuses_an_empty_tag_naming_the_row(tmp_path, split):
    """HEAD made "" a class of its own and scored it; seqeval (run_ner's metric) fails on it (IndexError). Now one
    line names the row; an empty name in data.labels is refused as not a tag's name."""
    from seqeval.metrics import f1_score
    from tiny import tokenizer

    from deltatune.config import ConfigError
    from deltatune.data.load import DataError
    from deltatune.train.tag import prepare_tag

    with pytest.raises(IndexError):
        f1_score([["B-per", ""]], [["B-per", ""]])
    good, bad = {"tokens": ["a", "cat"], "ner_tags": ["B-per", "O"]}, {"tokens": ["a", "cat"], "ner_tags": ["O", ""]}
    files = {}
    for name in ("train", "eval"):
        files[name] = str(tmp_path / f"{name}.jsonl")
        rows = [good, bad] if name == split else [good]
        Path(files[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        prepare_tag(build({"stage": "tag", "data": files}), tokenizer())
    assert (
        str(err.value)
        == f"{tmp_path / split}.jsonl:2: tag 2 in column 'ner_tags' is empty text; write the tag's name (B-per, O, ...)"
    )
    clean = files["eval" if split == "train" else "train"]  # (a file of good rows only)
    with pytest.raises(ConfigError, match=r"^data.labels\[2\] is '', not a tag's name"):
        prepare_tag(build({"stage": "tag", "data": {"train": clean, "labels": ["O", "B-per", ""]}}), tokenizer())
