"""``deltatune.Trainer`` from Python, as a transformers user drives it: the best checkpoint kept through rotation and
named where it lies, an eval batch with no label token, a plain transformers model and a peft model (trained and
resumed as the Trainer does). Each test failed before its fix."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny import tiny_model
from transformers import TrainingArguments

import deltatune as dt

ROWS = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 8


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, report_to=[], use_cpu=True, learning_rate=1e-2,
                disable_tqdm=True, save_strategy="no")  # fmt: skip
    return TrainingArguments(**{**base, **kw})


def _lora():
    torch.manual_seed(0)
    return dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))


def test_the_best_checkpoint_survives_rotation_and_is_named_where_it_lies(tmp_path):
    """save_total_limit=1 deleted the best checkpoint (load_best_model_at_end then failed), and its trainer_state
    named it by the hidden staging folder (so a resumed run lost it)."""
    scores = iter([10.0, 1.0, 1.0, 1.0])  # the best at step 1
    args = _args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                 save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="score")  # fmt: skip
    trainer = dt.Trainer(model=_lora(), args=args, train_dataset=ROWS, eval_dataset=ROWS[:2],
                         compute_metrics=lambda p: {"score": next(scores)})  # fmt: skip
    trainer.train()
    best = str(tmp_path / "checkpoint-1")
    assert trainer.state.best_model_checkpoint == best and os.path.isdir(best)
    state = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == best  # (the Trainer removes the last one at the end: limit 1)


def test_an_eval_batch_without_label_tokens_adds_nothing(tmp_path):
    """A row whose labels are all -100 alone in a batch made the per-token eval loss nan (its loss nan, times 0)."""
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]},
            {"input_ids": [5, 6, 7, 8], "labels": [-100] * 4},
            {"input_ids": [9, 10, 11, 12], "labels": [-100, -100, 11, 12]}]  # fmt: skip
    model = _lora()
    losses = [dt.Trainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=b), eval_dataset=rows)
              .evaluate()["eval_loss"] for b in (1, 3)]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] == losses[0]


@pytest.mark.parametrize("kind", ["plain", "peft"])
def test_a_plain_or_peft_model_trains_and_resumes_as_under_the_trainer(kind, tmp_path):
    """A plain transformers model failed at the first batch (get_base_model); a peft model could not resume
    (load_adapter_weights)."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    if kind == "peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    dt.Trainer(model=model, args=args, train_dataset=ROWS).train()
    args = _args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    trainer = dt.Trainer(model=model, args=args, train_dataset=ROWS)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 3
