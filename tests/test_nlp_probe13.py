"""The classic NLP stages (tag, cls, seq2seq) against transformers' example scripts (run_ner, run_classification /
run_glue, run_summarization) and the metric libraries people compare with (seqeval, scikit-learn, rouge-score).

Probed equal: run_ner's label alignment (a word's first sub-token carries its tag, the rest and the special tokens
-100) and seqeval's entity-level precision / recall / F1 and accuracy on the same predictions; run_summarization's
labels (target truncation keeping the end token, padding -100). Fixed: a multi-label logit of exactly 0 (sigmoid
0.5) was a predicted class; run_classification's ``np.where(p > 0, 1, 0)`` leaves it out."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from tiny import tokenizer

from deltatune.data.load import DataError, Row
from deltatune.data.tasks import Collator, encode_seq2seq, encode_tag
from deltatune.data.templates import IGNORE_INDEX
from deltatune.train import build
from deltatune.train.cls import prepare_cls
from deltatune.train.seq2seq import prepare_seq2seq
from deltatune.train.tag import prepare_tag

NAMES = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
ROWS = [
    {"tokens": ["John", "Smithsonian", "visited", "Washingtonville", "."], "ner_tags": ["B-PER", "I-PER", "O", "B-LOC", "O"]},
    {"tokens": ["unaffiliated", "naïve", "Zürich"], "ner_tags": ["O", "O", "B-LOC"]},
]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_ner_labels(tok, row: dict, max_length: int) -> tuple[list[int], list[int]]:
    """run_ner's tokenize_and_align_labels with label_all_tokens False (its default)."""
    enc = tok(row["tokens"], truncation=True, max_length=max_length, is_split_into_words=True)
    out, previous = [], None
    for word in enc.word_ids():
        out.append(IGNORE_INDEX if word is None or word == previous else NAMES.index(row["ner_tags"][word]))
        previous = word
    return enc["input_ids"], out


@pytest.mark.parametrize("max_length", [64, 6])
def test_tag_labels_are_run_ners_first_sub_token_alignment(tok, max_length):
    rows = [Row(r, f"t.jsonl:{i}") for i, r in enumerate(ROWS, 1)]
    got = encode_tag(rows, tok, "tokens", "ner_tags", {n: i for i, n in enumerate(NAMES)}, max_length)
    for row, ex in zip(ROWS, got.examples):
        ids, labels = _run_ner_labels(tok, row, max_length)
        assert ex["input_ids"] == ids and ex["labels"] == labels
    assert any(ex["labels"].count(IGNORE_INDEX) > 2 for ex in got.examples)  # sub-words were there to skip
    assert got.truncated == (2 if max_length == 6 else 0)


def test_tag_scores_are_seqevals_on_the_same_predictions(tok, tmp_path):
    """The stage's compute_metrics on predicted ids (sub-words and specials -100, as run_ner scores them) equals
    seqeval's precision, recall, F1 and accuracy_score over the words, IOB2 and IOBES tags alike."""
    from seqeval import metrics as S

    names = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]
    data = _write(tmp_path / "t.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["O", "S-LOC"]}])
    prepared = prepare_tag(build({"stage": "tag", "data": {"train": data, "labels": names}}), tok)
    rng = random.Random(0)
    for _ in range(30):
        true = [[rng.choice(names) for _ in range(rng.randint(1, 7))] for _ in range(4)]
        pred = [[rng.choice(names) for _ in t] for t in true]
        width = 2 + max(2 * len(t) for t in true)
        label_ids = np.full((4, width), IGNORE_INDEX)
        logits = np.zeros((4, width, len(names)))
        for i, (t, p) in enumerate(zip(true, pred)):
            for j, (a, b) in enumerate(zip(t, p)):  # each word's first token at 1 + 2j, a sub-word after it
                label_ids[i, 1 + 2 * j] = names.index(a)
                logits[i, 1 + 2 * j, names.index(b)] = 1.0
                logits[i, 2 + 2 * j, 0] = 5.0  # a sub-word's prediction, which run_ner leaves out
        got = prepared.compute_metrics(SimpleNamespace(predictions=logits, label_ids=label_ids))
        want = {
            "precision": S.precision_score(true, pred, zero_division=0),
            "recall": S.recall_score(true, pred, zero_division=0),
            "f1": S.f1_score(true, pred, zero_division=0),
            "accuracy": S.accuracy_score(true, pred),
        }
        assert max(abs(got[k] - want[k]) for k in want) < 1e-12


def test_a_tag_outside_data_labels_is_one_line_naming_file_and_line(tok, tmp_path):
    rows = [{"tokens": ["a"], "ner_tags": ["O"]}, {"tokens": ["Oslo", "x"], "ner_tags": ["B-LOC", "B-ORG"]}]
    data = _write(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare_tag(build({"stage": "tag", "data": {"train": data, "labels": NAMES}}), tok)
    assert str(err.value).startswith(f"{data}:2: tag 'B-ORG' is not in the label set") and "\n" not in str(err.value)


def test_a_multi_label_logit_of_zero_is_not_a_class_as_run_classifications(tok, tmp_path):
    """A logit of 0 is a sigmoid of exactly 0.5: run_classification's multi-hot is ``np.where(p > 0, 1, 0)``. HEAD
    counted it as a class (logit >= 0), so a row of zero logits (an untrained head whose bias and input cancel, a
    zero-initialised head) scored every class predicted: micro F1 0.83 here where run_classification has 0.57."""
    rows = [{"text": "a", "label": ["x"]}, {"text": "b", "label": ["y", "z"]}, {"text": "c", "label": ["x", "z"]}]
    data = _write(tmp_path / "m.jsonl", rows)
    prepared = prepare_cls(build({"stage": "cls", "data": {"train": data}}), tok)
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [0.5, -3.0, 0.0]])
    labels = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=np.float32)
    got = prepared.compute_metrics(SimpleNamespace(predictions=logits, label_ids=labels))
    hot = np.array([np.where(p > 0, 1, 0) for p in logits])  # run_classification's compute_metrics
    assert got["f1_micro"] == pytest.approx(f1_score(labels, hot, average="micro"), abs=1e-12)
    assert got["f1_micro"] == pytest.approx(4 / 7, abs=1e-12)  # 2 right, 3 missed, none wrong (HEAD: 10 / 12)
    assert got["f1_macro"] == pytest.approx(f1_score(labels, hot, average="macro", zero_division=0), abs=1e-12)
    assert got["subset_accuracy"] == pytest.approx(accuracy_score(labels, hot), abs=1e-12)


def test_seq2seq_labels_are_run_summarizations(tok):
    """Targets cut at max_target_length by the tokenizer (the end token kept) and padded with -100, as
    run_summarization's preprocess_function (ignore_pad_token_for_loss) and DataCollatorForSeq2Seq give them."""
    from transformers import DataCollatorForSeq2Seq

    data = [{"src": "the cat sat on the mat today", "tgt": "cat"}, {"src": "hi", "tgt": "one two three four five"}]
    got = encode_seq2seq([Row(r, f"s.jsonl:{i}") for i, r in enumerate(data, 1)], tok, "src", "tgt", 6, 4)
    ref = []
    for r in data:
        enc = tok(r["src"], max_length=6, truncation=True)
        enc["labels"] = tok(text_target=r["tgt"], max_length=4, truncation=True)["input_ids"]
        ref.append(dict(enc))
    want = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE_INDEX)(ref)
    batch = Collator(tok.pad_token_id)(got.examples)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].tolist() == want[key].tolist(), key
    assert batch["labels"][0, -1] == IGNORE_INDEX and batch["labels"][1, -1] == tok.sep_token_id
    assert (got.truncated, got.cut_sources, got.cut_targets) == (2, 1, 1)


def _run_ner_all_tokens(tok, row: dict, max_length: int) -> list[int]:
    """run_ner's tokenize_and_align_labels with label_all_tokens True: a later sub-token carries its word's tag, a
    B- tag as its I- counterpart (b_to_i_label)."""
    b_to_i = [
        NAMES.index(f"I-{n[2:]}") if n.startswith("B-") and f"I-{n[2:]}" in NAMES else i for i, n in enumerate(NAMES)
    ]
    enc = tok(row["tokens"], truncation=True, max_length=max_length, is_split_into_words=True)
    out, previous = [], None
    for word in enc.word_ids():
        if word is None:
            out.append(IGNORE_INDEX)
        else:
            tag = NAMES.index(row["ner_tags"][word])
            out.append(tag if word != previous else b_to_i[tag])
        previous = word
    return out


@pytest.mark.parametrize("max_length", [64, 6])
def test_tag_label_all_tokens_is_run_ners(tok, max_length):
    """run_ner's --label_all_tokens (the recipe's data.label_all_tokens, encode_tag's ``label_all_tokens``): every sub-token of a word
    is labelled, B-PER's later pieces I-PER; special tokens stay -100."""
    rows = [Row(r, f"t.jsonl:{i}") for i, r in enumerate(ROWS, 1)]
    mapping = {n: i for i, n in enumerate(NAMES)} | {i: i for i in range(len(NAMES))}  # as prepare_tag's
    got = encode_tag(rows, tok, "tokens", "ner_tags", mapping, max_length, label_all_tokens=True)
    for row, ex in zip(ROWS, got.examples):
        assert ex["labels"] == _run_ner_all_tokens(tok, row, max_length)
    first = got.examples[0]["labels"]
    assert NAMES.index("B-LOC") in first and (max_length == 6 or NAMES.index("I-LOC") in first)  # a B- split


def test_seq2seq_source_prefix_is_run_summarizations(tok):
    """run_summarization's --source_prefix ("summarize: " for T5) goes before each source, inside max_length
    (the recipe's data.source_prefix, encode_seq2seq's ``source_prefix``)."""
    data = [{"src": "the cat sat on the mat today", "tgt": "cat"}, {"src": "hi", "tgt": "one"}]
    got = encode_seq2seq(
        [Row(r, f"s.jsonl:{i}") for i, r in enumerate(data, 1)], tok, "src", "tgt", 8, 4, source_prefix="summarize: "
    )
    for r, ex in zip(data, got.examples):
        assert ex["input_ids"] == tok("summarize: " + r["src"], max_length=8, truncation=True)["input_ids"]
    assert (got.truncated, got.cut_sources) == (1, 1)


def test_the_recipe_keys_reach_the_stages(tok, tmp_path):
    """data.label_all_tokens (tag) and data.source_prefix (seq2seq) from a recipe: prepared rows equal the encoders'
    with the option, and differ from those without it."""
    data = _write(tmp_path / "t.jsonl", ROWS)
    mapping = {n: i for i, n in enumerate(NAMES)} | {i: i for i in range(len(NAMES))}
    rows = [Row(r, f"t.jsonl:{i}") for i, r in enumerate(ROWS, 1)]
    raw = {"stage": "tag", "data": {"train": data, "labels": NAMES, "label_all_tokens": True}}
    prepared = prepare_tag(build(raw), tok)
    want = encode_tag(rows, tok, "tokens", "ner_tags", mapping, 128, label_all_tokens=True).examples
    assert [e["labels"] for e in prepared.train] == [e["labels"] for e in want]
    assert (
        prepared.train[0]["labels"] != encode_tag(rows, tok, "tokens", "ner_tags", mapping, 128).examples[0]["labels"]
    )
    pairs = [{"source": "the cat sat on the mat", "target": "cat"}]
    data = _write(tmp_path / "s.jsonl", pairs)
    raw = {"stage": "seq2seq", "data": {"train": data, "source_prefix": "summarize: "}}
    prepared = prepare_seq2seq(build(raw), tok)
    assert prepared.train[0]["input_ids"] == tok("summarize: " + pairs[0]["source"])["input_ids"]


def test_a_seq2seq_runs_source_prefix_reaches_generate_chat_and_the_generation_metrics(tmp_path, capsys):
    """data.source_prefix goes before every source the run saw, so deltatune generate and chat put it before the
    prompt (not with --raw), and the eval's generations read it too: targets made from the prefixed sources score
    1.0 with the prefix, less without it."""
    import io
    import sys

    import torch
    from test_cli import _jsonl, _run
    from tiny import save_tiny
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from deltatune.cli import main
    from deltatune.model import DeltaModel
    from deltatune.train.seq2seq import generation_metrics

    model = save_tiny(tmp_path / "bart", "bart", init_std=0.5)  # wide enough that the answers follow the input
    rows = [{"source": f"{w} now", "target": f"{w} done"} for w in ["cat", "dog", "tree", "house"]]
    recipe = tmp_path / "s2s.yaml"
    recipe.write_text(
        f"stage: seq2seq\nmodel: {{name_or_path: {model}}}\nmethod: {{name: lora, r: 4, init_lora_weights: false}}\n"
        f"data: {{train: {_jsonl(tmp_path / 'pairs.jsonl', rows)}, max_length: 32, source_column: source, "
        "target_column: target, source_prefix: 'translate: '}\ntrain: {batch_size: 2}\n",
        encoding="utf-8",
    )
    run = _run(tmp_path, str(recipe), "train.max_steps=1")
    tok = AutoTokenizer.from_pretrained(run)
    delta = DeltaModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model), run).eval()

    def answer(text):
        enc = tok(text, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            out = delta.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1)
        return tok.decode(out[0], skip_special_tokens=True).strip()

    expected, bare = answer("translate: cat now"), answer("cat now")
    assert expected and expected != bare
    capsys.readouterr()
    assert main(["generate", "--adapter", run, "--prompt", "cat now", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected
    assert main(["generate", "--adapter", run, "--prompt", "cat now", "--max-new-tokens", "8", "--raw"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == bare
    old = sys.stdin
    sys.stdin = io.StringIO("cat now\n/quit\n")
    try:
        assert main(["chat", "--adapter", run, "--max-new-tokens", "8"]) == 0
    finally:
        sys.stdin = old
    assert expected in capsys.readouterr().out
    sources = ["cat now", "the big red dog sat on the old mat", "blue house"]
    targets = [answer("translate: " + s) for s in sources]
    scored = [Row({"source": s, "target": t}, f"rows.jsonl:{i}") for i, (s, t) in enumerate(zip(sources, targets), 1)]
    for prefix, rouge in (("translate: ", 1.0), ("", None)):
        cfg = build({"stage": "seq2seq", "model": {"name_or_path": model}, "method": {"name": "lora"},
                     "data": {"train": "rows.jsonl", "source_column": "source", "target_column": "target",
                              "max_length": 32, "source_prefix": prefix}, "train": {"generation_max_new_tokens": 8}})  # fmt: skip
        got = generation_metrics(delta, tok, scored, cfg, batch_size=3)["eval_rougeL"]
        assert got == rouge if rouge else got < 1.0
