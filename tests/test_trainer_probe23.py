"""Probe 23 of deltatune.Trainer and the fused causal-LM loss against transformers 5's Trainer and ForCausalLMLoss:
a step with no labelled token (a row whose answer the prompt crowded out) is 0 / 0 = NaN beside a gradient of 0 in
transformers, whose Trainer filters the NaN from its log and trains on; deltatune.Trainer stopped the run with a
NonFiniteLossError, and the fused loss's gradient was NaN."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny import tiny_model
from transformers import Trainer, TrainingArguments
from transformers.loss.loss_utils import ForCausalLMLoss

import deltatune as dt
from deltatune.loss import causal_lm_loss


@pytest.mark.parametrize("count", [None, 0], ids=["mean", "count_0"])
def test_fused_loss_gives_no_label_rows_transformers_zero_gradient(count):
    """All labels -100: transformers' loss is NaN (0 / 0) and its gradient 0; the fused one's gradient was NaN (0 x inf)."""
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.full((2, 5), -100)
    kw = {} if count is None else {"num_items_in_batch": torch.tensor(count)}
    got = []
    for loss_fn in (ForCausalLMLoss, causal_lm_loss):
        x = logits.clone().requires_grad_(True)
        loss = loss_fn(x, labels, 11, **kw)
        loss.backward()
        got.append((loss.detach(), x.grad))
    (ref, ref_grad), (fused, fused_grad) = got
    assert ref.isnan() and fused.isnan()
    assert torch.equal(ref_grad, torch.zeros_like(ref_grad))
    assert torch.equal(fused_grad, ref_grad)


def _rows() -> list[dict]:
    rows = []
    for i in range(4):
        ids = [(5 * i + k) % 100 + 3 for k in range(6)]
        rows.append({"input_ids": ids, "labels": [-100] * 6 if i == 3 else ids})  # the last step labels nothing
    return rows


def _collate(batch):
    return {k: torch.tensor([r[k] for r in batch]) for k in batch[0]}


def _args(folder) -> TrainingArguments:
    return TrainingArguments(str(folder), per_device_train_batch_size=1, max_steps=4, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
                             train_sampling_strategy="sequential")  # fmt: skip


def _logged(trainer) -> list[float]:
    return [v for h in trainer.state.log_history if "loss" in h for v in (h["loss"], h["grad_norm"])]


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    """transformers' Trainer on a peft LoRA: its log (loss, grad norm per step) and training loss."""
    ref = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"], r=4))
    trainer = Trainer(
        model=ref, args=_args(tmp_path_factory.mktemp("ref")), train_dataset=_rows(), data_collator=_collate
    )
    out = trainer.train()
    return _logged(trainer), out.training_loss


@pytest.mark.parametrize("fused", [False, True], ids=["model_loss", "fused_loss"])
def test_a_step_with_no_labelled_token_trains_on_as_the_trainers(trainers, tmp_path, fused):
    """transformers' Trainer on a peft LoRA logs loss 0 and grad norm 0 for the step labelling nothing and finishes;
    deltatune.Trainer raised "the training loss became nan at step 4 ... Lower train.lr" (and with the fused loss, had
    it gone on, "the gradient norm became nan")."""
    want_logs, want_loss = trainers
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(target_modules=["q_proj"], r=4), fused_loss=fused)
    trainer = dt.Trainer(model=model, args=_args(tmp_path), train_dataset=_rows(), data_collator=_collate)
    out = trainer.train()
    assert want_logs[-2:] == [0.0, 0.0] and len(want_logs) == 8
    assert _logged(trainer) == pytest.approx(want_logs, rel=1e-5)
    assert out.training_loss == pytest.approx(want_loss, rel=1e-5)
    assert out.global_step == 4
