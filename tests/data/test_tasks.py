"""Rows -> examples per stage: labels, sub-token alignment, truncation, pre-training blocks, packing, collation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model, tokenizer

from deltatune.data.encode import encode_sft
from deltatune.data.load import DataError, Row
from deltatune.data.tasks import (
    MAX_CLASSES,
    Collator,
    class_id,
    class_names,
    class_of,
    encode_cls,
    encode_pt,
    encode_seq2seq,
    encode_tag,
    label_map,
    pack,
)
from deltatune.data.templates import IGNORE_INDEX

X = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _rows(*data: dict) -> list[Row]:
    return [Row(d, f"d.jsonl:{i}") for i, d in enumerate(data, 1)]


# Classification


def test_label_map():
    assert label_map(_rows({"y": 2}, {"y": 0}), "y", None) == {0: 0, 2: 1}  # the sorted values (run_glue's)
    assert label_map(_rows({"y": "pos"}, {"y": "neg"}), "y", None) == {"neg": 0, "pos": 1}  # sorted names
    given = label_map(_rows({"y": "pos"}), "y", ["pos", "neg"])
    assert given == {"pos": 0, "neg": 1, 0: 0, 1: 1}  # the recipe's order; names and ids both accepted


@pytest.mark.parametrize("labels", [[1, 2, 3, 4, 5], ["1", "2", "3", "4", "5"], None])
def test_classes_named_by_numbers_are_names_not_ids(tok, labels):
    """Star ratings 1-5 named in data.labels: a value is a name, star s class s-1, in a JSONL (ints) and a CSV (text)
    file alike. The names' map took ids as well, and the id won: stars 4 and 5 both trained as class "5", star 1 as
    "2". A run re-read with the names it saved (["1", "2", "other"]) mapped 1 to class 1 likewise."""
    stars = [{"t": f"s{s}", "y": s} for s in range(1, 6)]
    for rows in (_rows(*stars), _rows(*[{**r, "y": str(r["y"])} for r in stars])):
        mapping = label_map(rows, "y", labels and [str(x) for x in labels])
        ids = [ex["labels"] for ex in encode_cls(rows, tok, "t", "y", mapping, 16).examples]
        assert ids == [0, 1, 2, 3, 4]  # without names too: the sorted values, star s class s-1 (run_glue's)
    mixed = _rows({"y": 1}, {"y": 2}, {"y": "other"})
    trained = label_map(mixed, "y", None)
    assert trained == {"1": 0, "2": 1, "other": 2}
    reread = label_map(mixed, "y", class_names(trained, None))
    assert [class_of(r.get("y"), reread) for r in mixed] == [0, 1, 2]


@pytest.mark.parametrize(
    ("value", "said"),
    [("", "label in column 'y' is empty"), (" ", "label in column 'y' is empty"),
     (["a", "b"], "label in column 'y' is a list; stage cls trains one class per row"),
     ({"a": 1}, "label in column 'y' is a dict")],
)  # fmt: skip
def test_blank_list_and_object_labels_are_refused(value, said):
    """A blank CSV cell became a class named "" (sorted first, shifting every name); a list (multi-label) or an
    object was a TypeError from deep in the label map."""
    with pytest.raises(DataError, match=rf"^d.jsonl:2: {said}"):
        label_map(_rows({"y": "a"}, {"y": value}), "y", None)


def test_csv_ids_are_ids_not_names(tok):
    # CSV values are text: "10" sorts after "2" as a number, not between "0" and "2" as text.
    rows = _rows({"t": "a", "y": "0"}, {"t": "b", "y": "10"}, {"t": "c", "y": "2"})
    mapping = label_map(rows, "y", None)
    assert [ex["labels"] for ex in encode_cls(rows, tok, "t", "y", mapping, 16).examples] == [0, 2, 1]
    # ... and a JSONL train file (int labels) agrees with a CSV eval file (the same ids as text).
    json_mapping = label_map(_rows({"y": 0}, {"y": 1}), "y", None)
    assert encode_cls(_rows({"t": "x", "y": "1"}), tok, "t", "y", json_mapping, 16).examples[0]["labels"] == 1


def test_whole_float_labels_are_ids(tok):
    # pandas writes an int label column with a gap as floats (2.0): the number 2, and a train file in floats agrees
    # with an eval file in ints or in text ("2.0", "2").
    floats = _rows({"t": "a", "y": 0.0}, {"t": "b", "y": 2.0})
    mapping = label_map(floats, "y", None)
    assert mapping == {0: 0, 2: 1}
    assert class_names(mapping, None) == ["0", "2"]
    other = _rows({"t": "c", "y": 0}, {"t": "d", "y": "2.0"}, {"t": "e", "y": "2"}, {"t": "f", "y": 2.0})
    assert [ex["labels"] for ex in encode_cls(other, tok, "t", "y", mapping, 16).examples] == [0, 1, 1, 1]
    # A label that is not a whole number is a class name (half stars are classes), named in sorted order.
    halves = label_map(_rows({"y": 4.5}, {"y": 1}, {"y": "x"}), "y", None)
    assert halves == {"1": 0, "4.5": 1, "x": 2} and class_names(halves, None) == ["1", "4.5", "x"]
    assert class_of(True, halves) is None and class_id(True) is None  # a bool is not an id


def test_an_id_past_the_class_limit_is_refused():
    # An id column or a score read as class ids.
    with pytest.raises(
        DataError, match=r"d.jsonl:2: label 1000000000.0 in column 'y' would be class id 1,000,000,000"
    ):
        label_map(_rows({"y": 3}, {"y": 1e9}), "y", None)
    assert label_map(_rows({"y": MAX_CLASSES - 1}), "y", None) == {MAX_CLASSES - 1: 0}


def test_a_text_column_that_is_not_text_is_refused(tok):
    # A multi-reference list named as the target (E2E's "references") trained on its Python repr.
    with pytest.raises(DataError, match=r"d.jsonl:2: column 'target' must be text, got list$"):
        encode_seq2seq(_rows({"source": "a", "target": "b"}, {"source": "a", "target": ["b", "c"]}), tok,
                       "source", "target", 16, 16)  # fmt: skip
    with pytest.raises(DataError, match=r"d.jsonl:1: column 't' must be text, got dict$"):
        encode_cls(_rows({"t": {"a": 1}, "y": 0}), tok, "t", "y", {0: 0}, 16)
    with pytest.raises(DataError, match=r"d.jsonl:1: column 'text' must be text, got bool$"):
        encode_pt(_rows({"text": True}), tok, "text", 4)
    # A number is text as written.
    assert (
        encode_cls(_rows({"t": 7, "y": 0}), tok, "t", "y", {0: 0}, 16).examples[0]["input_ids"]
        == tok("7")["input_ids"]
    )


def test_encode_cls_names_and_ids(tok):
    rows = _rows(
        {"text": "a fine film", "label": "pos"}, {"text": "dull", "label": "neg"}, {"text": "fine", "label": 1}
    )
    enc = encode_cls(rows, tok, "text", "label", label_map(rows, "label", ["neg", "pos"]), max_length=32)
    assert [ex["labels"] for ex in enc.examples] == [1, 0, 1]
    assert enc.examples[0]["input_ids"] == tok("a fine film")["input_ids"]
    assert enc.examples[0]["attention_mask"] == [1] * 5
    assert enc.truncated == 0


def test_encode_cls_text_pair(tok):
    rows = _rows({"a": "a b", "b": "c d", "y": 0})
    ex = encode_cls(rows, tok, "a", "y", {0: 0}, 32, text_pair_column="b").examples[0]
    assert ex["input_ids"] == tok("a b", "c d")["input_ids"]
    assert ex["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


def test_label_outside_the_label_set(tok):
    rows = _rows({"text": "ok", "label": "pos"}, {"text": "meh", "label": "neutral"})
    with pytest.raises(DataError, match=r"d.jsonl:2: label 'neutral' in column 'label' is not in the label set"):
        encode_cls(rows, tok, "text", "label", label_map(rows[:1], "label", ["neg", "pos"]), 32)


# Token classification

TAGS = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3, "I-LOC": 4}
WORDS = {
    "tokens": ["unaffable", "John", "Smith", "visited", "Paris"],
    "ner_tags": ["O", "B-PER", "I-PER", "O", "B-LOC"],
}


def test_tag_labels_on_first_sub_token(tok):
    # WordPiece: [CLS] una ##ffa ##ble john smith visited paris [SEP]
    ex = encode_tag(_rows(WORDS), tok, "tokens", "ner_tags", TAGS, max_length=32).examples[0]
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == [
        "[CLS]",
        "una",
        "##ffa",
        "##ble",
        "john",
        "smith",
        "visited",
        "paris",
        "[SEP]",
    ]
    assert ex["labels"] == [X, 0, X, X, 1, 2, 0, 3, X]


def test_tag_truncation(tok):
    enc = encode_tag(
        _rows(WORDS, {"tokens": ["Paris"], "ner_tags": ["B-LOC"]}), tok, "tokens", "ner_tags", TAGS, max_length=5
    )
    assert enc.truncated == 1
    assert tok.convert_ids_to_tokens(enc.examples[0]["input_ids"]) == ["[CLS]", "una", "##ffa", "##ble", "[SEP]"]
    assert enc.examples[0]["labels"] == [X, 0, X, X, X]
    assert enc.examples[1]["labels"] == [X, 3, X]


def test_tag_errors(tok):
    with pytest.raises(DataError, match=r"d.jsonl:2: tag 'B-ORG' is not in the label set"):
        encode_tag(_rows(WORDS, {"tokens": ["Acme"], "ner_tags": ["B-ORG"]}), tok, "tokens", "ner_tags", TAGS, 32)
    # The stage's map takes names and ids (data.labels given): a tag outside it is one line naming the names (the
    # message sorted names and ids together, a TypeError).
    both = TAGS | {i: i for i in range(len(TAGS))}
    for tag in ("B-ORG", 7):
        with pytest.raises(DataError, match=rf"d.jsonl:1: tag {tag!r} is not in the label set \['O', 'B-PER', "):
            encode_tag(_rows({"tokens": ["Acme"], "ner_tags": [tag]}), tok, "tokens", "ner_tags", both, 32)
    with pytest.raises(DataError, match=r"d.jsonl:1: 'tokens' and 'ner_tags' must be lists of equal length"):
        encode_tag(_rows({"tokens": ["a", "b"], "ner_tags": ["O"]}), tok, "tokens", "ner_tags", TAGS, 32)
    for row in ({"tokens": ["a", None], "ner_tags": ["O", "O"]}, {"tokens": ["a"], "ner_tags": [None]}):
        column = "tokens" if None in row["tokens"] else "ner_tags"  # trained as the text "None", or a class "None"
        with pytest.raises(DataError, match=rf"d.jsonl:1: '{column}' holds a null, list or object"):
            encode_tag(_rows(row), tok, "tokens", "ner_tags", TAGS | {"None": 3}, 32)


# Truncation

LONG = "one two three four five six seven eight nine ten"


def test_truncate_counts_rows(tok):
    rows = _rows({"text": "short", "label": 0}, {"text": LONG, "label": 1}, {"text": LONG + " more", "label": 0})
    enc = encode_cls(rows, tok, "text", "label", {0: 0, 1: 1}, max_length=6)
    assert enc.truncated == 2
    assert [len(ex["input_ids"]) for ex in enc.examples] == [3, 6, 6]
    assert tok.decode(enc.examples[1]["input_ids"]) == "[CLS] one two three four [SEP]"


def test_refuse_names_file_and_line(tok):
    rows = _rows({"text": "short", "label": 0}, {"text": LONG, "label": 1})
    with pytest.raises(DataError, match=r"d.jsonl:2: 12 tokens, more than data.max_length=6"):
        encode_cls(rows, tok, "text", "label", {0: 0, 1: 1}, max_length=6, truncation="refuse")
    sft = _rows({"instruction": "q", "output": "a"}, {"instruction": "q", "output": LONG})
    with pytest.raises(DataError, match=r"d.jsonl:2: \d+ tokens, more than data.max_length=12"):
        encode_sft(sft, tok, {}, "plain", max_length=12, truncation="refuse")


def test_sft_truncation_and_dropped_rows(tok):
    # plain: "[CLS] q a [SEP] [SEP]" is 5 tokens; the long answer is cut at 8; a prompt of 8+ tokens leaves no
    # answer token, so that row is dropped (and counted), not trained on with all labels -100.
    rows = _rows(
        {"instruction": "q", "output": "a"}, {"instruction": "q", "output": LONG}, {"instruction": LONG, "output": "a"}
    )
    enc = encode_sft(rows, tok, {}, "plain", max_length=8)
    assert (enc.truncated, enc.dropped, len(enc.examples)) == (2, 1, 2)
    cut = enc.examples[1]
    assert len(cut["input_ids"]) == 8
    assert tok.decode([t for t in cut["labels"] if t != X]) == "one two three four five six"


# Pre-training and seq2seq


def test_pretraining_blocks(tok):
    # stream: hello world [SEP] good morning to you [SEP] (8 tokens) -> blocks of 3, the last 2 tokens dropped
    rows = _rows({"text": "Hello world"}, {"text": "good morning to you"})
    enc = encode_pt(rows, tok, "text", block_size=3)
    assert [tok.decode(ex["input_ids"]) for ex in enc.examples] == ["hello world [SEP]", "good morning to"]
    assert all(ex["labels"] == ex["input_ids"] and ex["attention_mask"] == [1, 1, 1] for ex in enc.examples)
    with pytest.raises(DataError, match="fewer than one block of data.max_length=9"):
        encode_pt(rows, tok, "text", block_size=9)


def test_seq2seq(tok):
    rows = _rows({"src": "translate: good morning", "tgt": "guten morgen"})
    ex = encode_seq2seq(rows, tok, "src", "tgt", max_length=32, max_target_length=32).examples[0]
    assert ex["input_ids"] == tok("translate: good morning")["input_ids"]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert ex["labels"] == tok(text_target="guten morgen")["input_ids"]


def test_seq2seq_truncation(tok):
    rows = _rows({"s": LONG, "t": LONG}, {"s": "hi", "t": LONG}, {"s": "hi", "t": "ok"})
    enc = encode_seq2seq(rows, tok, "s", "t", max_length=4, max_target_length=5)
    assert enc.truncated == 2  # rows, not cut parts: row 1 has both cut and counts once
    assert [(len(ex["input_ids"]), len(ex["labels"])) for ex in enc.examples] == [(4, 5), (3, 5), (3, 3)]
    # Cut as the tokenizer cuts (the evaluation's generation does): the end token stays, in source and target. A
    # target cut without it taught the model never to stop.
    assert enc.examples[0]["input_ids"] == tok(LONG, truncation=True, max_length=4)["input_ids"]
    assert [tok.decode(ex["labels"]) for ex in enc.examples[:2]] == ["[CLS] one two three [SEP]"] * 2
    with pytest.raises(DataError, match=r"d.jsonl:2: 12 tokens, more than data.max_target_length=5"):
        encode_seq2seq(rows[1:], tok, "s", "t", max_length=4, max_target_length=5, truncation="refuse")


# Packing


def test_pack_layout():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [X, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]},
    ]
    assert pack(examples, block_size=5) == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [X, 2, 3, X, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9], "labels": [X, 7, 8, 9], "position_ids": [0, 1, 2, 3]},
    ]


def _token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of per-token cross-entropy (next-token, -100 ignored) and the number of label tokens."""
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1]  # (batch, seq - 1, vocab): position t predicts token t + 1
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=X, reduction="sum")
    return ce, int((targets != X).sum())


def test_packed_loss_equals_unpacked_loss(tok):
    """Token-level mean loss (sum of per-token CE / number of label tokens) is the same packed and unpacked:
    restarting position ids keep packed examples apart, and each example's first label is dropped either way."""
    rows = _rows(
        *[
            {"instruction": q, "output": a}
            for q, a in [
                ("Name a colour.", "Blue."),
                ("Add 2 and 3.", "The sum is 5."),
                ("Say hi.", "Hi there, friend!"),
                ("Capital of France?", "Paris."),
                ("Count to three.", "One, two, three."),
            ]
        ]
    )
    examples = encode_sft(rows, tok, {}, "alpaca", max_length=96).examples  # (alpaca: LLaMA-Factory's system too)
    blocks = pack(examples, block_size=80)
    assert 1 < len(blocks) < len(examples)
    model = tiny_model("llama", vocab_size=len(tok))
    model.config.use_cache = False  # as train.run does: a KV cache turns off the packed-sequence masks
    collate = Collator(tok.pad_token_id)
    with torch.no_grad():
        unpacked_sum, unpacked_n = _token_loss(model, collate(examples))
        packed_sum, packed_n = _token_loss(model, collate(blocks))
        # Positions that run on across examples let later examples see earlier ones: the loss changes.
        leaky = collate(blocks)
        leaky.pop("position_ids")
        leaky_sum, _ = _token_loss(model, leaky)
    assert packed_n == unpacked_n == sum(sum(t != X for t in ex["labels"][1:]) for ex in examples)
    torch.testing.assert_close(packed_sum / packed_n, unpacked_sum / unpacked_n, atol=1e-5, rtol=0)
    assert abs(leaky_sum - unpacked_sum) / unpacked_n > 1e-4  # ten times the tolerance above


# Collator


def test_collator_pads():
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 1, 1], "labels": 1},
        {"input_ids": [8], "attention_mask": [1], "token_type_ids": [0], "labels": 0},
    ]
    batch = Collator(pad_token_id=9)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]  # scalar labels are stacked


def test_collator_pads_token_labels_and_positions_to_a_multiple():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [X, 6, 7], "position_ids": [0, 1, 0]},
        {"input_ids": [8, 4], "labels": [X, 4], "position_ids": [0, 1]},
    ]
    batch = Collator(pad_token_id=9, pad_to_multiple_of=4)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9], [8, 4, 9, 9]]
    assert batch["labels"].tolist() == [[X, 6, 7, X], [X, 4, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0], [0, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_tag_words_of_a_byte_level_bpe_are_its_tokens_of_the_text():
    """Given one by one (is_split_into_words), a byte-level BPE (SmolLM2's, GPT-2's, Qwen's) lost each word's leading
    space: "approach" became appro + ach, not the Ġapproach it learned (9% more pieces on WNUT17). Its words are now
    read from the text: the tokens of "Stabilized approach or not ?", the first of each word tagged."""
    from transformers import AutoTokenizer

    from deltatune.train.models import resolve_path

    bpe = AutoTokenizer.from_pretrained(resolve_path("smollm2"))
    words, tags = ["Stabilized", "approach", "or", "not", "?"], ["O", "B-x", "I-x", "O", "O"]
    enc = encode_tag(
        _rows({"tokens": words, "ner_tags": tags}), bpe, "tokens", "ner_tags", {"O": 0, "B-x": 1, "I-x": 2}, 32
    )
    ex = enc.examples[0]
    assert ex["input_ids"] == bpe(" ".join(words))["input_ids"] and "offset_mapping" not in ex
    pieces = bpe.convert_ids_to_tokens(ex["input_ids"])
    assert "Ġapproach" in pieces
    first = {i for i, label in enumerate(ex["labels"]) if label != X}
    assert [pieces[i] for i in sorted(first)] == ["St", "Ġapproach", "Ġor", "Ġnot", "Ġ?"]
    assert [ex["labels"][i] for i in sorted(first)] == [0, 1, 2, 0, 0]
    cut = encode_tag(
        _rows({"tokens": words, "ner_tags": tags}), bpe, "tokens", "ner_tags", {"O": 0, "B-x": 1, "I-x": 2}, 4
    )
    assert len(cut.examples[0]["input_ids"]) == 4 and cut.truncated == 1
