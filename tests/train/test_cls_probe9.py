"""Stage cls's other two problem types, as transformers' AutoModelForSequenceClassification and run_glue have them.
A regression (STS-B: ``model.num_labels: 1``) was refused ("model.num_labels is 1 but the data has 6 classes"), and a
label column of lists (multi-label) was refused row by row. Now: MSE on the one logit / BCE with logits on multi-hot
targets, equal to transformers' own loss; Pearson, Spearman and MSE as scipy; micro/macro F1 and subset accuracy as
sklearn; eval, ``deltatune eval`` and peft's PeftModel on the saved head agree."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score
from tiny import save_tiny
from transformers import AutoModelForSequenceClassification

from deltatune.config import ConfigError
from deltatune.data.load import DataError
from deltatune.train import build, train
from deltatune.train import metrics as M
from deltatune.train.cls import multi_label_loss, regression_loss

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]
SCORES = [0.0, 3.8, 5.0, 2.5, 1.25, 4.2, 0.6, 3.8]
TAGS = [["pos"], ["neg", "pos"], [], ["pos"], ["pos", "fun"], ["sad", "pos"], ["fun", "pos"], ["neg", "pos"]]


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "bert"
    return save_tiny(path, "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _write(path, labels) -> str:
    rows = [{"text": f"a {w} film {i}", "label": y} for i, (w, y) in enumerate(zip(WORDS, labels))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(model: str, data: str, out: str, **model_args) -> dict:
    return {
        "stage": "cls",
        "model": {"name_or_path": model, **model_args},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {"train": data, "eval": data, "max_length": 16},
        "train": {"batch_size": 4, "lr": 5e-2, "seed": 3, "max_steps": 4, "report_to": ["none"]},
        "output": {"dir": out},
    }


def _batch(tok_path: str, n: int = 4) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    return dict(tok([f"a {w} film" for w in WORDS[:n]], padding=True, return_tensors="pt"))


@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_the_losses_are_transformers_own_and_weigh_an_accumulated_step_as_one_batch(tiny_cls, problem):
    regression = problem == "regression"
    n = 1 if regression else 3
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_cls, num_labels=n, problem_type=problem, ignore_mismatched_sizes=True
    ).eval()
    batch = _batch(tiny_cls)
    labels = torch.tensor(SCORES[:4]) if regression else torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]])
    loss_fn = regression_loss if regression else multi_label_loss
    with torch.no_grad():
        out = model(**batch, labels=labels)
        ours = loss_fn(out, labels)
        torch.testing.assert_close(ours, out.loss, rtol=1e-6, atol=0)
        # Two micro-batches of 1 and 3 rows, each over the step's count, sum to the whole batch's mean.
        parts = [
            loss_fn(model(**{k: v[s] for k, v in batch.items()}), labels[s], num_items_in_batch=labels.numel())
            for s in (slice(0, 1), slice(1, 4))
        ]
    torch.testing.assert_close(sum(parts), out.loss, rtol=1e-5, atol=0)


def test_the_metrics_are_scipys_and_sklearns():
    x = [0.1, 2.0, 2.0, 3.5, -1.0, 2.0, 0.3]
    y = [0.0, 1.0, 3.8, 3.8, 0.5, 2.0, 0.3]
    assert M.pearson(x, y) == pytest.approx(pearsonr(x, y).statistic, abs=1e-12)
    assert M.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)  # ties: average ranks
    assert M.ranks([2, 1, 2, 3]) == [2.5, 1.0, 2.5, 4.0]
    # Class 3 is never true nor predicted: sklearn's macro F1 counts it as 0 (a mean over 4 classes, not 3).
    true = [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]
    pred = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0]]
    got = M.multi_label_scores(pred, true)
    t, p = np.array(true), np.array(pred)
    assert got["f1_micro"] == pytest.approx(f1_score(t, p, average="micro"), abs=1e-12)
    assert got["f1_macro"] == pytest.approx(f1_score(t, p, average="macro", zero_division=0), abs=1e-12)
    assert got["subset_accuracy"] == pytest.approx(accuracy_score(t, p)) == 0.4


def _peft_logits(tiny_cls: str, run: str, n: int, batch: dict, problem: str) -> torch.Tensor:
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_cls, num_labels=n, problem_type=problem, ignore_mismatched_sizes=True
    )
    with torch.no_grad():
        return PeftModel.from_pretrained(base, run).eval()(**batch).logits


def _rows_batch(run: str) -> dict:
    """The data file's rows as one batch, tokenized by the run's tokenizer."""
    from transformers import AutoTokenizer

    texts = [f"a {w} film {i}" for i, w in enumerate(WORDS)]
    return dict(AutoTokenizer.from_pretrained(run)(texts, padding=True, return_tensors="pt"))


def _our_logits(run: str, batch: dict) -> torch.Tensor:
    from deltatune.train.run import load_adapter_model

    model, _ = load_adapter_model(run)
    with torch.no_grad():
        return model.eval()(**batch)["logits"]


def test_a_regression_run_trains_mse_reports_pearson_and_reloads(tiny_cls, tmp_path, capsys):
    """Driven as a user drives it: ``deltatune train recipe.yaml``, then ``deltatune eval --adapter RUN``."""
    import yaml

    from deltatune.cli import main
    from deltatune.train.evaluation import evaluate

    data = _write(tmp_path / "sts.jsonl", SCORES)
    run = str(tmp_path / "run")
    (tmp_path / "sts.yaml").write_text(yaml.safe_dump(_recipe(tiny_cls, data, run, num_labels=1)))
    assert main(["train", str(tmp_path / "sts.yaml")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score", "eval_mse"} <= metrics.keys()
    assert "eval_accuracy" not in metrics
    batch = _rows_batch(run)
    ours = _our_logits(run, batch)
    assert ours.shape == (8, 1)
    torch.testing.assert_close(_peft_logits(tiny_cls, run, 1, batch, "regression"), ours, rtol=0, atol=1e-5)
    pred = ours.reshape(-1).double().numpy()
    assert metrics["eval_pearson"] == pytest.approx(pearsonr(pred, SCORES).statistic, abs=1e-4)
    assert metrics["eval_spearmanr"] == pytest.approx(spearmanr(pred, SCORES).statistic, abs=1e-4)
    assert metrics["eval_combined_score"] == pytest.approx((metrics["eval_pearson"] + metrics["eval_spearmanr"]) / 2)
    assert metrics["eval_mse"] == pytest.approx(float(np.mean((pred - SCORES) ** 2)), rel=1e-4)
    capsys.readouterr()
    assert main(["eval", "--adapter", run]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("eval_loss", "eval_pearson", "eval_spearmanr", "eval_combined_score", "eval_mse"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-5), key
    # peft's folder alone (no run.yaml): its head of one output is named, and model.num_labels=1 scores it.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(tmp_path / "run" / name, plain / name)
    with pytest.raises(ConfigError, match=r"the head \(classifier\) has 1 output, a regression; .* shows 7 classes: "
                       "pass model.num_labels=1"):  # fmt: skip
        evaluate(str(plain), data=data)
    assert evaluate(str(plain), data=data, overrides=["model.num_labels=1"])["eval_pearson"] == pytest.approx(
        metrics["eval_pearson"], abs=1e-5
    )
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_mse"], rel=1e-4)  # the loss is the MSE


def test_a_multi_label_run_trains_bce_reports_f1_and_reloads(tiny_cls, tmp_path):
    from deltatune.train.evaluation import evaluate

    data = _write(tmp_path / "tags.jsonl", TAGS)
    run = str(tmp_path / "run")
    metrics = train(build(_recipe(tiny_cls, data, run)))
    assert {"eval_f1_micro", "eval_f1_macro", "eval_subset_accuracy"} <= metrics.keys()
    saved = (tmp_path / "run" / "run.yaml").read_text()
    assert "- fun\n" in saved and "- sad\n" in saved  # the classes, sorted: fun, neg, pos, sad
    batch = _rows_batch(run)
    ours = _our_logits(run, batch)
    assert ours.shape == (8, 4)
    peft = _peft_logits(tiny_cls, run, 4, batch, "multi_label_classification")
    torch.testing.assert_close(peft, ours, rtol=0, atol=1e-5)
    names = ["fun", "neg", "pos", "sad"]
    true = np.array([[int(c in row) for c in names] for row in TAGS])
    pred = (torch.sigmoid(ours) >= 0.5).int().numpy()
    assert metrics["eval_f1_micro"] == pytest.approx(f1_score(true, pred, average="micro", zero_division=0))
    assert metrics["eval_f1_macro"] == pytest.approx(f1_score(true, pred, average="macro", zero_division=0))
    assert metrics["eval_subset_accuracy"] == pytest.approx(accuracy_score(true, pred))
    assert metrics["eval_f1_micro"] > 0 and 0 < metrics["eval_f1_macro"] < metrics["eval_f1_micro"]
    again = evaluate(run)
    for key in ("eval_loss", "eval_f1_micro", "eval_f1_macro", "eval_subset_accuracy"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-5), key


@pytest.mark.parametrize(
    ("labels", "model", "said"),
    [([1.0, "high", *SCORES[2:]], {"num_labels": 1}, r"sts.jsonl:2: label 'high' in column 'label' is not a finite "
      r"number; a regression \(model.num_labels 1\)"),
     ([[0, 1, 1], *TAGS[1:]], {}, r"sts.jsonl:1: label list \[0, 1, 1\] in column 'label' names a class twice; .*"
      "not a multi-hot vector"),
     ([[], [], *TAGS[2:3] * 6], {}, r"sts.jsonl: no class in column 'label'; classification needs at least two")],
)  # fmt: skip
def test_bad_rows_are_named(tiny_cls, tmp_path, labels, model, said):
    data = _write(tmp_path / "sts.jsonl", labels)
    with pytest.raises(DataError, match=said):
        train(build(_recipe(tiny_cls, data, str(tmp_path / "run"), **model)))


def test_data_labels_beside_a_regression_are_refused(tiny_cls, tmp_path):
    data = _write(tmp_path / "sts.jsonl", SCORES)
    with pytest.raises(ConfigError, match=r"^data.labels names classes \(low, high\), but model.num_labels: 1 trains"):
        train(build({**_recipe(tiny_cls, data, str(tmp_path / "run"), num_labels=1), "data": {
            "train": data, "labels": ["low", "high"]}}))  # fmt: skip


def test_fractions_without_num_labels_1_stay_classes(tiny_cls, tmp_path):
    """The default is kept (half stars are classes, tests/data/test_tasks.py); the note names the switch."""
    from deltatune.train.cls import prepare_cls
    from deltatune.train.models import load_processor

    data = _write(tmp_path / "sts.jsonl", SCORES)
    prepared = prepare_cls(build({"stage": "cls", "data": {"train": data, "max_length": 16}}), load_processor(
        tiny_cls, "cls", False, None))  # fmt: skip
    assert prepared.labels == ["0.0", "0.6", "1.25", "2.5", "3.8", "4.2", "5.0"]
    assert any("model.num_labels: 1 asks for one" in n for n in prepared.notes)


def test_an_eval_file_of_lists_makes_the_run_multi_label_and_an_object_is_named(tiny_cls, tmp_path):
    """Train labels one per row, eval labels lists (or an object): a TypeError 'unhashable type: list' from deep in
    the class map. Lists in either file make the run multi-label (a single label a list of one); an object is
    named."""
    from deltatune.train.cls import prepare_cls
    from deltatune.train.models import load_processor

    tok = load_processor(tiny_cls, "cls", False, None)
    train_file = _write(tmp_path / "train.jsonl", ["a", "b", "a", "b"])

    def prepared(eval_labels):
        data = {"train": train_file, "eval": _write(tmp_path / "eval.jsonl", eval_labels), "max_length": 16}
        return prepare_cls(build({"stage": "cls", "data": data}), tok)

    p = prepared([["a"], ["b", "a"], [], "b"])
    assert p.metric == "eval_f1_micro" and p.labels == ["a", "b"]
    assert [ex["labels"] for ex in p.train] == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    assert [ex["labels"] for ex in p.eval] == [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]
    said = r"eval.jsonl:2: label in column 'label' is a dict; .*; a list of them is a multi-label row \(text class"
    with pytest.raises(DataError, match=said):
        prepared(["a", {"x": 1}, "a", "b"])


def test_a_nan_prediction_gives_scipys_nan_not_a_perfect_correlation():
    """A NaN logit (an fp16 overflow in eval) clamped to Pearson r = 1.0 (min(1.0, nan) is 1.0) and ranked as a
    number for Spearman (0.8); scipy gives nan for both. An infinity ranks last, as scipy ranks it."""
    x, y = [1.0, float("nan"), 3.0, 2.0], [1.0, 2.0, 3.0, 5.0]
    assert np.isnan(M.pearson(x, y)) and np.isnan(pearsonr(x, y).statistic)
    assert np.isnan(M.spearman(x, y)) and np.isnan(spearmanr(x, y).statistic)
    inf = [float("inf"), 1.0, 2.0, 3.0]
    assert np.isnan(M.pearson(inf, y))
    assert M.spearman(inf, y) == pytest.approx(spearmanr(inf, y).statistic, abs=1e-12)


def test_a_regression_target_of_minus_100_counts(tiny_cls, tmp_path):
    """The Trainer counts a step's targets as the labels other than -100 (class ids' ignore index): a score of
    -100.0 (on a -100..100 scale) was left out, so the train and eval loss were the MSE x 4/3 (4600.03 for 3450.02
    on these rows). Now every target counts: both equal the MSE (lr 1e-9: the step leaves the logits as they were)."""
    data = _write(tmp_path / "s.jsonl", [-100.0, 20.0, 50.0, -30.0])
    r = _recipe(tiny_cls, data, str(tmp_path / "run"), num_labels=1)
    r["train"] |= {"batch_size": 2, "grad_accum": 2, "max_steps": 1, "lr": 1e-9}
    metrics = train(build(r))
    assert metrics["eval_mse"] > 3000
    assert metrics["train_loss"] == pytest.approx(metrics["eval_mse"], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_mse"], rel=1e-5)
