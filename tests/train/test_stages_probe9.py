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


def test_a_score_column_is_named_in_the_report_as_one_class_per_score(tok, tmp_path):
    """STS-B's similarity scores (0.0 to 5.0) are a regression target for run_glue (a float label column:
    num_labels 1). deltatune trains each distinct score as a class named by its text (half stars are classes,
    tests/data/test_tasks.py), and said nothing: 6 rows of scores trained a 6-class head without a word. The report
    now says so; whole floats (1.0, pandas' ints) and data.labels give no note."""
    import json

    from deltatune.train import build
    from deltatune.train.cls import prepare_cls

    def notes(labels, named=None):
        path = tmp_path / "sts.jsonl"
        path.write_text("".join(json.dumps({"text": f"a pair {i}", "label": v}) + "\n" for i, v in enumerate(labels)))
        data = {"train": str(path), "max_length": 16, **({"labels": named} if named else {})}
        return [n for n in prepare_cls(build({"stage": "cls", "data": data}), tok).notes if "fraction" in n]

    said = notes([0.0, 3.8, 5.0, 2.5, 1.25, 4.2])
    assert said == [
        "4 of the 6 classes are fractions (1.25, 2.5, 3.8, ...): each distinct value is a class, named as text "
        "(run_glue trains a float label column as a regression: model.num_labels: 1 asks for one); "
        "data.labels fixes the classes and their order"
    ]
    assert notes([0.0, 1.0, 2.0]) == [] and notes(["0.5", "1"], named=["0.5", "1"]) == []


def test_a_plain_adapters_head_of_more_classes_than_the_data_shows_is_named(tok, tmp_path):
    """A peft adapter folder (no run.yaml) takes its classes from the evaluation data. A 3-class head evaluated on
    rows of classes 0 and 1 built a 2-class model and failed loading it: 'classifier.weight has shape (3, 32) in
    the file but (2, 32) in this model; the adapter was made for a different base model', which it was not. Now
    refused naming the head, its 3 classes and data.labels; with data.labels the loss is peft's own on the rows."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from tiny import save_tiny
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from deltatune.config import ConfigError
    from deltatune.train.evaluation import evaluate

    base = save_tiny(tmp_path / "bert", "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = AutoConfig.from_pretrained(base, num_labels=3)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    rows = [{"text": f"a film {i}", "label": i % 2} for i in range(4)]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = [f"model.name_or_path={base}"]
    with pytest.raises(ConfigError, match=r"adapter_model.safetensors: the head \(classifier\) has 3 classes, .*two"
                       r".jsonl shows 2 \(0, 1\); pass data.labels=\[...\] naming all 3"):  # fmt: skip
        evaluate(str(tmp_path / "adapter"), str(data), over)
    got = evaluate(str(tmp_path / "adapter"), str(data), [*over, "data.labels=[0,1,2]"])
    batch = tok([r["text"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        own = peft_model.eval()(**batch, labels=torch.tensor([r["label"] for r in rows])).loss.item()
    assert got["eval_loss"] == pytest.approx(own, rel=1e-5)


def test_seq2seq_notes_name_the_limit_each_part_passed_and_a_generation_cap_below_the_targets(tok, tmp_path):
    """Rows of a 4-token source and targets of 5, 22 and 42 tokens, data.max_length 32, max_target_length 16: the
    report said '2 train rows were longer than data.max_length=32 tokens and were truncated', a limit no source
    reached. It now names the target's limit. And an eval target longer than train.generation_max_new_tokens
    (8 here; 64 by default against max_target_length 128) can never be generated whole, which lowers ROUGE-L
    and BLEU where run_summarization generates up to the target length: the report says how many."""
    import json

    from deltatune.train import build
    from deltatune.train.seq2seq import prepare_seq2seq

    path = tmp_path / "s2s.jsonl"
    path.write_text(
        "".join(json.dumps({"source": "a b", "target": " ".join(["word"] * n)}) + "\n" for n in (3, 20, 40))
    )
    data = {"train": str(path), "eval": str(path), "max_length": 32, "max_target_length": 16}
    cfg = build({"stage": "seq2seq", "data": data, "train": {"generation_max_new_tokens": 8}})
    assert prepare_seq2seq(cfg, tok).notes == [
        "2 train rows were truncated (2 targets longer than data.max_target_length=16 tokens)",
        "2 eval rows were truncated (2 targets longer than data.max_target_length=16 tokens)",
        "2 of the 3 eval targets are longer than train.generation_max_new_tokens=8 tokens: their generations stop "
        "there, which lowers ROUGE-L and BLEU",
    ]
    # (max_length 3: MiniLM adds 2 special tokens, and 2 leaves no room, refused since probe 21)
    cfg = build({"stage": "seq2seq", "data": {**data, "max_length": 3}, "train": {"generation_max_new_tokens": 16}})
    assert prepare_seq2seq(cfg, tok).notes[0] == (
        "3 train rows were truncated (3 sources longer than data.max_length=3, 2 targets longer than "
        "data.max_target_length=16 tokens)"
    )


def test_tag_refuses_a_python_tokenizer_in_one_line(tmp_path):
    """A tokenizer without the Rust backend (ByT5's, a Python one in transformers 5) has no offsets or word ids to
    align a word's tag with its first sub-token: stage tag stopped in transformers with KeyError 'offset_mapping'.
    transformers' run_ner refuses such a tokenizer up front; so does deltatune now, naming the model and class."""
    import json

    from transformers import ByT5Tokenizer

    from deltatune.config import ConfigError
    from deltatune.train import build
    from deltatune.train.tag import prepare_tag

    path = tmp_path / "tag.jsonl"
    path.write_text(json.dumps({"tokens": ["hi", "there"], "ner_tags": ["O", "B-x"]}) + "\n")
    cfg = build({"stage": "tag", "model": {"name_or_path": "google/byt5-small"}, "data": {"train": str(path)}})
    with pytest.raises(ConfigError, match=r"^model 'google/byt5-small': stage tag needs a fast .* ByT5Tokenizer is"):
        prepare_tag(cfg, ByT5Tokenizer())


def test_a_tag_row_without_words_is_dropped_and_noted_not_a_nan_loss(tok, tmp_path):
    """A row of no words (an empty sentence) has every label -100: alone in a micro-batch (batch_size 1) its loss
    was 0/0, and the run stopped at step 1 with 'the training loss became nan ... Lower train.lr' (run_ner's loss
    is NaN there too). Such a row has nothing to learn or score: it is dropped, and the report counts it."""
    import json

    import torch
    from tiny import tiny_model

    from deltatune.loss import token_loss
    from deltatune.train import build
    from deltatune.train.tag import prepare_tag

    rows = [{"tokens": ["a", "cat"], "ner_tags": ["O", "B-x"]}, {"tokens": [], "ner_tags": []}]
    path = tmp_path / "tag.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare_tag(build({"stage": "tag", "data": {"train": str(path), "eval": str(path)}}), tok)
    assert [n for n in prepared.notes if "dropped" in n] == [
        "1 train rows were dropped: no word with a token to tag (an empty row?)",
        "1 eval rows were dropped: no word with a token to tag (an empty row?)",
    ]
    model = tiny_model("bert", "token_cls")
    for example in prepared.train:
        batch = prepared.collator([example])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"] % 128, attention_mask=batch["attention_mask"]).logits
        assert torch.isfinite(token_loss({"logits": logits}, batch["labels"]))
    assert len(prepared.train) == len(prepared.eval) == 1


def test_tag_ids_written_as_floats_are_refused_as_ids(tok, tmp_path):
    """Tag ids as floats (3.0: how pandas writes an id list that held a NaN) were read as tag names: 'O' plus the
    classes '0.0', '3.0', ..., trained, and scored as entities of type '.0' (seqeval's split of '3.0'): an entity
    F1 of nothing. Integer ids were already refused asking for data.labels; float ids now are too."""
    import json

    from deltatune.train import build
    from deltatune.train.tag import prepare_tag

    path = tmp_path / "tag.jsonl"
    path.write_text(json.dumps({"tokens": ["a", "cat"], "ner_tags": [0.0, 3.0]}) + "\n")
    with pytest.raises(DataError, match=r"'ner_tags' holds integer tag ids; set data.labels"):
        prepare_tag(build({"stage": "tag", "data": {"train": str(path)}}), tok)
    cfg = build({"stage": "tag", "data": {"train": str(path), "labels": ["O", "B-x", "I-x", "B-y"]}})
    assert prepare_tag(cfg, tok).train[0]["labels"][1:3] == [0, 3]
