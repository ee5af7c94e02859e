"""Probe 14 of the training loop: a recipe's train keys against transformers 5's TrainingArguments / Trainer. A
warmup_steps fraction (transformers 5 folded warmup_ratio into warmup_steps), a metric_for_best_model that a stage's
compute_metrics does not report (refused before the model loads), and ``deltatune eval`` of a dataloader_drop_last
run (the Trainer drops an evaluation's last partial batch too)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_trainer_probe12
from test_trainer_probe11 import files, recipe  # noqa: F401  (files: the module's fixture, a tiny llama and rows)
from tiny import save_tiny
from transformers import EvalPrediction

from deltatune.config import ConfigError
from deltatune.train import build, train
from deltatune.train.config_train import EVAL_METRICS, PAIRED, check_best_metric


@pytest.fixture(scope="module", autouse=True)
def _quick():
    """No test here reads a run's training_curve.png (matplotlib's drawing was 0.9 s CPU of each run's 3); and the
    objects of the imports frozen out of the garbage collector, whose full pass accelerate runs at each train()'s
    end (0.8 s of a heap of torch, transformers and matplotlib objects). 56 s of wall time under load was 15 s CPU."""
    import gc

    from deltatune.train import report

    plot, report.plot = report.plot, lambda *args, **kwargs: None
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        report.plot = plot


def reference(cfg, out, **args):
    """probe 12's reference Trainer (a peft LoRA holding the run's start), with ``args`` over its own arguments
    (its logging_steps too)."""
    from transformers import TrainingArguments

    def arguments(*a, **kw):
        return TrainingArguments(*a, **{**kw, **args})

    given = test_trainer_probe12.TrainingArguments
    test_trainer_probe12.TrainingArguments = arguments
    try:
        return test_trainer_probe12.reference(cfg, out)
    finally:
        test_trainer_probe12.TrainingArguments = given


def _rates(out) -> list[float]:
    with open(out / "log_history.jsonl") as fh:
        return [h["learning_rate"] for h in map(json.loads, fh) if "learning_rate" in h]


def test_a_warmup_steps_fraction_warms_up_as_the_trainers(files, tmp_path):  # noqa: F811
    """transformers 5 reads warmup_steps below 1 as a fraction of the run's steps (its warmup_ratio is gone): a recipe's
    warmup_steps: 0.5 was refused ("must be int"). Now each step's learning rate equals the Trainer's, exactly."""
    raw = recipe(files, tmp_path / "ours", max_steps=4, grad_accum=1, warmup_steps=0.5, save_steps=4)
    train(build(raw))
    ours = _rates(tmp_path / "ours")
    trainer, _ = reference(build(raw), tmp_path / "ref", warmup_steps=0.5)
    theirs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(ours) == 4 and ours == theirs, (ours, theirs)
    assert ours[0] == 0 < ours[1] < ours[2] == max(ours) > ours[3]  # ceil(4 * 0.5) = 2 warm-up steps: it acted
    assert build(recipe(files, tmp_path / "r", warmup_steps=0.5)).train.warmup_ratio == 0.5


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"warmup_steps": 1.5}, r"^train.warmup_steps must be a whole number when over 1 \(a fraction only below 1\)"),
        ({"warmup_steps": 0.2, "warmup_ratio": 0.1}, r"^train.warmup_steps 0.2 is a fraction of the run's steps, as "
         r"train.warmup_ratio \(0.1\) is: give one of them$"),
    ],
)  # fmt: skip
def test_a_warmup_steps_the_trainer_would_cut_or_double_is_one_line(files, tmp_path, keys, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        build(recipe(files, tmp_path / "r", **keys))


def _texts(path, labels) -> str:
    texts = ["a good film", "a bad film", "a fine film", "a dull film"]
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    return str(path)


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "bert", "bert", "seq_cls")


def test_a_best_metric_a_cls_run_does_not_report_is_refused_before_the_model_loads(tiny_cls, tmp_path, monkeypatch):
    """A cls run's compute_metrics reports accuracy and f1: metric_for_best_model f1_macro (a multi-label run's) was
    the Trainer's KeyError at the first evaluation, after the model loaded and a step trained. Now one line before."""
    import deltatune.train.run as run

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(run, "start_model", loaded)
    data = _texts(tmp_path / "d.jsonl", ["pos", "neg", "pos", "neg"])
    raw = {"stage": "cls", "model": {"name_or_path": tiny_cls}, "data": {"train": data, "eval": data, "max_length": 16},
           "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]}, "output": {"dir": str(tmp_path / "o")},
           "train": {"max_steps": 1, "eval_steps": 1, "save_steps": 1, "load_best_model_at_end": True,
                     "metric_for_best_model": "f1_macro", "report_to": ["none"]}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"^train.metric_for_best_model is 'f1_macro', which stage cls's evaluation "
                       r"does not report; it reports loss, accuracy, f1, matthews_correlation$"):  # fmt: skip
        train(build(raw))
    for ok in ("f1", "eval_accuracy", "loss", "runtime"):  # what the stage does report passes
        raw["train"]["metric_for_best_model"] = ok
        check_best_metric(build(raw), "eval_accuracy")


def test_a_preference_stage_s_best_metric_is_checked_against_what_it_reports():
    """dpo reports the pair metrics and TRL's rewards/* (paired_change's after an eval_on_start evaluation too); kto
    its rewards: a name outside them (TRL's rewards/accuracies is dpo's, not kto's) is one line naming them."""
    raw = {"stage": "dpo", "data": {"eval": "e.jsonl"}, "train": {"metric_for_best_model": "rewards/accuracy"}}
    with pytest.raises(ConfigError, match=r"^train.metric_for_best_model is 'rewards/accuracy', which stage dpo's "
                       r"evaluation does not report; it reports loss, accuracy, margin, margin_se, sign_p, "
                       r"reward_chosen, .*, rewards/accuracies, logps/chosen, .*, mean_token_accuracy$"):  # fmt: skip
        check_best_metric(build(raw), "eval_accuracy")
    for ok in ("rewards/accuracies", "eval_margin", "sign_p"):
        raw["train"]["metric_for_best_model"] = ok
        check_best_metric(build(raw), "eval_accuracy")
    raw["train"]["metric_for_best_model"] = "gained"
    with pytest.raises(ConfigError, match=r"^train.metric_for_best_model is 'gained'"):
        check_best_metric(build(raw), "eval_accuracy")
    check_best_metric(build({**raw, "train": {**raw["train"], "eval_on_start": True}}), "eval_accuracy")
    kto = {**raw, "stage": "kto", "train": {"metric_for_best_model": "rewards/accuracies"}}
    with pytest.raises(ConfigError, match=r"^train.metric_for_best_model is 'rewards/accuracies', which stage kto's"):
        check_best_metric(build(kto), "eval_margin")


def test_the_reported_metrics_table_is_each_stage_s_compute_metrics(tiny_cls, tmp_path):
    """EVAL_METRICS (what the check above reads) against the keys each stage's compute_metrics returns, on
    predictions of the stage's shapes: a stage that reports another metric fails here, not a user's run."""
    from PIL import Image
    from transformers import AutoModelForImageClassification, SwiftFormerConfig

    from deltatune.train.models import load_processor
    from deltatune.train.table import prepare

    rng = np.random.default_rng(0)
    got = {}
    tok = load_processor(tiny_cls, "cls", False, None)
    for labels, pred, ids, heads in (
        (["a", "b", "a", "c"], rng.normal(size=(4, 3)), np.array([0, 1, 0, 2]), None),
        ([1.0, 2.0, 3.0, 4.0], rng.normal(size=(4, 1)), np.array([1.0, 2.0, 3.0, 4.0]), 1),
        ([["a"], ["b", "a"], [], ["c"]], rng.normal(size=(4, 3)), np.eye(4, 3)[[0, 1, 3, 2]], None),
    ):
        data = {"train": _texts(tmp_path / "c.jsonl", labels)}
        p = prepare(build({"stage": "cls", "model": {"num_labels": heads}, "data": data}), tok)
        got[("cls", p.metric)] = p.compute_metrics(EvalPrediction(pred, ids))
    tags = tmp_path / "t.jsonl"
    tags.write_text(json.dumps({"tokens": ["a", "film"], "ner_tags": ["B-X", "O"]}) + "\n")
    p = prepare(build({"stage": "tag", "data": {"train": str(tags)}}), tok)
    n = len(p.labels)
    got[("tag", p.metric)] = p.compute_metrics(
        EvalPrediction(rng.normal(size=(2, 4, n)), np.array([[0, 1, -100, -100]] * 2))
    )
    config = SwiftFormerConfig(depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], num_labels=2)
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path / "swift")
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (40, 90, 200) if c == "a" else (200, 9, 9)).save(tmp_path / "img" / c / "0.png")
    cfg = build({"stage": "image_cls", "model": {"name_or_path": str(tmp_path / "swift")},
                 "method": {"name": "lora", "target_modules": ["to_query"]}, "data": {"train": str(tmp_path / "img")}})  # fmt: skip
    p = prepare(cfg, None)
    got[("image_cls", p.metric)] = p.compute_metrics(EvalPrediction(rng.normal(size=(2, 2)), np.array([0, 1])))
    from deltatune.train import dpo, kto
    from deltatune.train.pairs import pair_metrics, paired_change

    scores = rng.normal(size=(4, 2))
    got[("rm", "eval_accuracy")] = pair_metrics(scores)  # (reward.py's compute)
    for stage in ("dpo", "orpo", "simpo", "cpo"):  # (orpo's, simpo's and cpo's are prepare_dpo's)
        got[(stage, "eval_accuracy")] = dpo._metrics(EvalPrediction(scores, None))
    got[("kto", "eval_margin")] = kto._metrics(EvalPrediction(np.array([[0.5, 1.0], [-0.2, 0.0]]), None))
    assert {k: tuple(v) for k, v in got.items()} == EVAL_METRICS
    assert tuple(paired_change(scores, scores)) == PAIRED


def test_eval_drops_the_last_partial_batch_of_a_drop_last_run_as_the_trainer(files, tmp_path):  # noqa: F811
    """The Trainer's dataloader_drop_last drops an evaluation's last partial batch too (get_eval_dataloader): the run's
    own eval_loss (the Trainer's evaluate, 6 of 8 rows in batches of 3) and ``deltatune eval``'s (every row) differed.
    Now ``deltatune eval`` scores as the run did, to float rounding; without the key it scores all 8 (the test can tell)."""
    from deltatune.train.evaluation import evaluate

    raw = recipe(files, tmp_path / "run", max_steps=1, eval_batch_size=3, dataloader_drop_last=True)
    raw["data"]["eval"] = files["sft"]
    ours = train(build(raw))["eval_loss"]
    again = evaluate(str(tmp_path / "run"))["eval_loss"]
    whole = evaluate(str(tmp_path / "run"), overrides=["train.dataloader_drop_last=false"])["eval_loss"]
    assert abs(again - ours) < 1e-6 < abs(whole - ours), (ours, again, whole)


def test_logging_first_step_logs_the_steps_the_trainer_logs(files, tmp_path):  # noqa: F811
    """logging_first_step was refused as an unknown key ("did you mean 'logging_steps'?"). Set, the run logs the
    steps the Trainer logs (1, then every logging_steps), with its losses and learning rates; its last step (4), off
    the logging grid, unlogged as the Trainer leaves it."""
    raw = recipe(files, tmp_path / "ours", max_steps=4, grad_accum=1, logging_steps=3, logging_first_step=True)
    train(build(raw))
    with open(tmp_path / "ours" / "log_history.jsonl") as fh:
        ours = [h for h in map(json.loads, fh) if "loss" in h]
    trainer, _ = reference(build(raw), tmp_path / "ref", logging_steps=3, logging_first_step=True)
    theirs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in ours] == [h["step"] for h in theirs] == [1, 3]
    assert [h["learning_rate"] for h in ours] == [h["learning_rate"] for h in theirs]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs)) < 1e-5


def test_eval_accumulation_steps_is_passed_and_scores_alike(tiny_cls, tmp_path):
    """eval_accumulation_steps was refused as an unknown key. Set, a cls run's evaluation (its predictions moved off
    the device every batch) reports what an evaluation of its adapter without it reports (``deltatune eval`` with
    the key null, and with it), and the Trainer was given the key."""
    data = _texts(tmp_path / "d.jsonl", ["pos", "neg", "pos", "neg"])
    raw = {"stage": "cls", "model": {"name_or_path": tiny_cls}, "output": {"dir": str(tmp_path / "o1")},
           "data": {"train": data, "eval": data, "max_length": 16},
           "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
           "train": {"max_steps": 1, "batch_size": 2, "eval_batch_size": 1, "eval_accumulation_steps": 1,
                     "report_to": ["none"]}}  # fmt: skip
    ours = train(build(raw))
    from deltatune.train.evaluation import evaluate

    for overrides in ([], ["train.eval_accumulation_steps=null"]):
        again = evaluate(str(tmp_path / "o1"), overrides=overrides)
        assert again["eval_accuracy"] == ours["eval_accuracy"]
        assert abs(again["eval_loss"] - ours["eval_loss"]) < 1e-6, (overrides, again, ours)
    from deltatune.train.run import _training_args

    assert (
        _training_args(build(raw), type("P", (), {"eval": None, "loss_only": False})(), "x").eval_accumulation_steps
        == 1
    )


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("save_only_model", "a checkpoint keeps the optimizer, schedule and RNG states, which --resume reads"),
        ("group_by_length", "transformers 5 names it train_sampling_strategy"),
        ("average_tokens_across_devices", "a step's loss is a mean over every process's label tokens"),
        ("logging_strategy", "train.logging_steps sets the steps between logs"),
    ],
)
def test_a_trainer_key_a_recipe_does_not_build_is_one_line_saying_why(key, why):
    with pytest.raises(ConfigError, match=rf"^unknown key 'train.{key}' in recipe: {key} \(TrainingArguments'\) is "
                       rf"not a recipe key: {why}"):  # fmt: skip
        build({"train": {key: True}})


def test_the_new_keys_are_named_where_a_stage_s_own_loop_ignores_them():
    from deltatune.train.config import ignored_keys

    named = dict(
        ignored_keys(build({"stage": "ppo", "train": {"logging_first_step": True, "eval_accumulation_steps": 2}}))
    )
    assert {"train.logging_first_step", "train.eval_accumulation_steps"} <= set(named)
    assert not ignored_keys(build({"stage": "sft", "train": {"logging_first_step": True}}))


def test_a_fractional_epoch_count_runs_the_trainers_steps_and_rates(files, tmp_path):  # noqa: F811
    """epochs 1.5 with max_steps -1 (the Trainer's num_train_epochs / max_steps): as many steps as the Trainer takes
    (8 rows in batches of 4: 2 a pass, 3 in all) at the same learning rates, and the same adapter."""
    from safetensors.torch import load_file

    raw = recipe(files, tmp_path / "ours", max_steps=-1, epochs=1.5, batch_size=4, grad_accum=1, save_steps=100)
    got = train(build(raw))
    trainer, ref = reference(build(raw), tmp_path / "ref", num_train_epochs=1.5, max_steps=-1)
    assert got["train_steps"] == trainer.state.global_step == 3
    assert _rates(tmp_path / "ours") == [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    adapter = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert max((adapter[k] - ref[k]).abs().max().item() for k in ref) < 1e-5


def test_max_grad_norm_0_trains_unclipped_as_the_trainer(files, tmp_path):  # noqa: F811
    """max_grad_norm 0 (no clipping) gives the Trainer's adapter; clipped at 0.01 it would not (the test can tell).
    null is refused in one line (the Trainer's TypeError, None > 0, came from its training loop)."""
    from safetensors.torch import load_file

    raw = recipe(files, tmp_path / "ours", max_grad_norm=0, lr=5e-2)
    train(build(raw))
    adapter = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    _, ref = reference(build(raw), tmp_path / "ref", max_grad_norm=0.0)
    _, clipped = reference(build(raw), tmp_path / "clipped", max_grad_norm=0.01)
    diff = max((adapter[k] - ref[k]).abs().max().item() for k in ref)
    moved = max((clipped[k] - ref[k]).abs().max().item() for k in ref)
    assert diff < 1e-5 < moved, (diff, moved)
    with pytest.raises(ConfigError, match=r"^train.max_grad_norm must be float, got None$"):
        build(recipe(files, tmp_path / "r", max_grad_norm=None))
