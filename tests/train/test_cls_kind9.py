"""Stage cls's problem type kept past training. A multi-label run did not record it, so ``deltatune eval --data`` on
a file of one label per row (a CSV) scored the BCE-trained head as single-label (cross-entropy, accuracy); now
run.yaml records ``data.multi_label: true``. A merged regression / multi-label model saved ``problem_type: None``,
so transformers' pipeline put a sigmoid on the regression's score and a softmax over the multi-label classes; now
its config.json says "regression" / "multi_label_classification", as run_glue's saved model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tiny import save_tiny
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.train import build, train
from deltatune.train.runfolder import recipe_changes

TEXTS = ["a good film", "a bad film", "a fine film", "a dull film"]
TAGS = [["pos"], ["neg", "pos"], [], ["fun"]]


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "bert", "bert", "seq_cls")


def _jsonl(path, labels) -> str:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS, labels)))
    return str(path)


def _run(model: str, data: str, out, num_labels: int | None = None, **data_args) -> str:
    train(build({
        "stage": "cls", "model": {"name_or_path": model, **({"num_labels": num_labels} if num_labels else {})},
        "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
        "data": {"train": data, "max_length": 16, **data_args},
        "train": {"batch_size": 4, "lr": 5e-2, "max_steps": 1, "report_to": ["none"]}, "output": {"dir": str(out)},
    }))  # fmt: skip
    return str(out)


def test_a_multi_label_run_scores_a_file_of_single_labels_as_multi_label(tiny_cls, tmp_path):
    from deltatune.train.evaluation import evaluate

    run = _run(tiny_cls, _jsonl(tmp_path / "ml.jsonl", TAGS), tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["data"]["multi_label"] is True
    assert recipe_changes({"data": {"multi_label": True}}, {"data": {}}) == []  # derived: a resume's recipe need not
    csv = tmp_path / "one.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(TEXTS, ["pos", "neg", "fun", "pos"])))
    lists = evaluate(run, data=_jsonl(tmp_path / "one.jsonl", [["pos"], ["neg"], ["fun"], ["pos"]]))
    ours = evaluate(run, data=str(csv))
    assert "eval_accuracy" not in ours and set(lists) == set(ours)  # was eval_accuracy/eval_f1 of a softmax
    for key in lists:
        assert ours[key] == pytest.approx(lists[key], abs=1e-6), key


def test_data_multi_label_said_or_refused(tiny_cls, tmp_path):
    from deltatune.train.cls import prepare_cls
    from deltatune.train.models import load_processor

    tok = load_processor(tiny_cls, "cls", False, None)

    def prepared(labels, **keys):
        data = {"train": _jsonl(tmp_path / "d.jsonl", labels), "max_length": 16, **keys}
        return prepare_cls(build({"stage": "cls", "data": data}), tok)

    p = prepared(["a", "b", "a", "c"], multi_label=True)  # each row a list of one
    assert p.metric == "eval_f1_micro" and [ex["labels"] for ex in p.train][:2] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ConfigError, match=r"^data.multi_label is false, but column 'label' holds lists of labels$"):
        prepared(TAGS, multi_label=False)
    with pytest.raises(ConfigError, match=r"^data.multi_label: true asks for classes, but model.num_labels: 1 "):
        prepare_cls(build({"stage": "cls", "model": {"num_labels": 1}, "data": {
            "train": _jsonl(tmp_path / "d.jsonl", [1.0, 2.0, 3.0, 4.0]), "multi_label": True}}), tok)  # fmt: skip


@pytest.mark.parametrize(("kind", "labels", "num_labels"), [("regression", [0.0, 3.8, 5.0, 2.5], 1),
                                                            ("multi_label_classification", TAGS, None)])  # fmt: skip
def test_a_merged_model_keeps_its_problem_type_for_the_pipeline(tiny_cls, tmp_path, kind, labels, num_labels):
    run = _run(tiny_cls, _jsonl(tmp_path / "d.jsonl", labels), tmp_path / "run", num_labels)
    merged = str(tmp_path / "merged")
    assert main(["merge", "--adapter", run, "--out", merged]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["problem_type"] == kind  # was None
    model, tok = AutoModelForSequenceClassification.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    with torch.no_grad():
        logits = model(**tok(TEXTS[0], return_tensors="pt")).logits[0]
    scores = {s["label"]: s["score"] for s in pipeline("text-classification", model=model, tokenizer=tok,
                                                        top_k=None)([TEXTS[0]])[0]}  # fmt: skip
    want = logits if kind == "regression" else torch.sigmoid(logits)  # was a sigmoid / a softmax
    assert [scores[model.config.id2label[i]] for i in range(len(logits))] == pytest.approx(want.tolist(), abs=1e-6)
