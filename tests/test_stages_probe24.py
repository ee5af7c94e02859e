"""Probe 24 of the cls / tag / seq2seq stages and ``deltatune eval`` against transformers' run_ner.py (its label list,
its reuse of a trained head's label2id, its tokenize_and_align_labels) and the routing of a plain adapter folder's
image rows."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

from deltatune.train.config import build
from deltatune.train.evaluation import _recipe
from deltatune.train.tag import prepare_tag
from tests.tiny import minilm_path

ROWS = [
    {"tokens": ["EU", "rejects", "German", "callisthenics", "lamb"], "ner_tags": ["B-ORG", "O", "B-MISC", "O", "O"]},
    {"tokens": ["Peter", "Blackburnshire", "went", "to", "Paris"], "ner_tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]},
    {"tokens": ["the", "New", "York", "Times"], "ner_tags": ["O", "B-ORG", "I-ORG", "I-ORG"]},
]
# dslim/bert-base-NER's id2label: a NER model's head order, which run_ner keeps when the data's tags are its tags
HEAD_ORDER = ["O", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]


def _tag_cfg(tmp_path, rows, model=None):
    path = tmp_path / "tags.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": str(path), "eval": str(path), "tokens_column": "tokens", "tags_column": "ner_tags"}
    return build({"stage": "tag", "model": {"name_or_path": model or minilm_path()}, "data": data})


def _run_ner(tok, rows, label_list, label_to_id):
    """run_ner's tokenize_and_align_labels (label_all_tokens off): the first sub-token of a word carries its tag."""
    enc = tok([r["tokens"] for r in rows], truncation=True, max_length=128, is_split_into_words=True)
    labels = []
    for i, r in enumerate(rows):
        previous, ids = None, []
        for word in enc.word_ids(batch_index=i):
            ids.append(-100 if word is None or word == previous else label_to_id[r["ner_tags"][word]])
            previous = word
        labels.append(ids)
    return enc["input_ids"], labels


def test_lowercase_bio_tags_are_the_classes_run_ner_reads_with_no_unused_class(tmp_path):
    # run_ner's label list is the tags seen (sorted); before, b-per / i-per / o gained B-per and I-per, two classes
    # no row named (a head of 9 outputs for 5 tags)
    rows = [{"tokens": ["x", "y", "z"], "ner_tags": ["b-per", "i-per", "o"]}, {"tokens": ["w"], "ner_tags": ["b-loc"]}]
    tok = AutoTokenizer.from_pretrained(minilm_path())
    prepared = prepare_tag(_tag_cfg(tmp_path, rows), tok)
    seen = sorted({t for r in rows for t in r["ner_tags"]})  # (+ i-loc: deltatune's B-/I- pair of each type)
    assert sorted(prepared.labels) == sorted([*seen, "i-loc"])
    assert prepared.labels[0] == "o"
    label_to_id = {name: i for i, name in enumerate(prepared.labels)}
    ids, labels = _run_ner(tok, rows, prepared.labels, label_to_id)
    assert [ex["input_ids"] for ex in prepared.train] == ids
    assert [ex["labels"] for ex in prepared.train] == labels


def test_a_base_trained_on_the_tags_keeps_its_heads_order_as_run_ner_does(tmp_path):
    # run_ner: "Model has labels -> use them": a base whose id2label holds the data's tags keeps its order. Before,
    # deltatune's order (O, B-LOC, I-LOC, B-MISC, ...) renamed the trained head's classes: its loss on the rows
    # was another tag's for 8 of the 9 outputs.
    tok = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, id2label=dict(enumerate(HEAD_ORDER)),
                        label2id={t: i for i, t in enumerate(HEAD_ORDER)})  # fmt: skip
    torch.manual_seed(0)
    model = BertForTokenClassification(config).eval()
    with torch.no_grad():  # a head that scores each of its tags (HEAD_ORDER's id i) where that tag is true
        model.classifier.weight.normal_()
    model.save_pretrained(tmp_path / "ner")
    tok.save_pretrained(tmp_path / "ner")
    prepared = prepare_tag(_tag_cfg(tmp_path, ROWS, str(tmp_path / "ner")), tok)
    assert prepared.labels == HEAD_ORDER

    # run_ner's label ids over the model's order, and its loss (the model's own) on the same rows
    label_to_id = {t: i for i, t in enumerate(HEAD_ORDER)}
    ids, labels = _run_ner(tok, ROWS, HEAD_ORDER, label_to_id)
    assert [ex["input_ids"] for ex in prepared.train] == ids
    assert [ex["labels"] for ex in prepared.train] == labels
    batch = prepared.collator(prepared.train)
    width = max(len(x) for x in ids)
    ref = {
        "input_ids": torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
    }
    with torch.no_grad():
        ours = model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).loss
        theirs = model(**ref).loss
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_a_base_with_other_tags_keeps_deltatunes_order(tmp_path):
    # run_ner warns and keeps the data's classes when the model's labels are not the data's
    tok = AutoTokenizer.from_pretrained(minilm_path())
    other = ["O", "B-X", "I-X"]
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, id2label=dict(enumerate(other)))  # fmt: skip
    BertForTokenClassification(config).save_pretrained(tmp_path / "other")
    prepared = prepare_tag(_tag_cfg(tmp_path, ROWS, str(tmp_path / "other")), tok)
    assert prepared.labels == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def test_eval_of_a_plain_adapter_routes_image_rows_by_the_columns_the_overrides_name(tmp_path):
    # peft saves no task_type for an image classifier: rows with an image and a label column are image_cls's. Before,
    # only columns named image and label were seen: data.image_column=img rows went to sft (a text stage)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": None,
                                                             "base_model_name_or_path": "some/vit"}))  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"img": "a.png", "y": 1}) + "\n")
    overrides = ["data.image_column=img", "data.label_column=y"]
    raw, _ = _recipe(str(adapter), str(data), False, overrides)
    assert raw["stage"] == "image_cls"
    raw, _ = _recipe(str(adapter), str(data), False, ['data.image_column="img"', "data.label_column=y"])
    assert raw["stage"] == "image_cls"
    raw, _ = _recipe(str(adapter), str(data), False, [])  # (no override: the columns are not an image row's)
    assert raw["stage"] != "image_cls"


def test_a_roberta_or_gpt2_base_reads_its_words_as_run_ner_does_with_add_prefix_space(tmp_path):
    # run_ner loads a bloom / gpt2 / roberta / deberta model's tokenizer with add_prefix_space=True (RoBERTa's
    # tokenizer then sets its ByteLevel pre-tokenizer's add_prefix_space): the first word is "ĠEU", as every other
    # word. Before, deltatune read the words from the text without it: "EU", the first word of every row otherwise.
    import copy

    from tokenizers import pre_tokenizers
    from transformers import RobertaConfig

    from tests.tiny import smollm2_tokenizer

    tok = smollm2_tokenizer()  # (a byte-level BPE, as GPT-2's and RoBERTa's, loaded without the prefix space)
    RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=37).save_pretrained(tmp_path / "roberta")  # fmt: skip
    prepared = prepare_tag(_tag_cfg(tmp_path, ROWS, str(tmp_path / "roberta")), tok)
    reference = copy.deepcopy(tok)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    label_to_id = {t: i for i, t in enumerate(prepared.labels)}
    ids, labels = _run_ner(reference, ROWS, prepared.labels, label_to_id)
    assert reference.convert_ids_to_tokens(ids[0])[0] == "ĠEU"
    assert [ex["input_ids"] for ex in prepared.train] == ids
    assert [ex["labels"] for ex in prepared.train] == labels
    assert tok.backend_tokenizer.pre_tokenizer.add_prefix_space is False  # (the run's tokenizer left as it was)
