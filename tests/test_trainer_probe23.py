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


def _mean_ce(outputs, labels, num_items_in_batch=None):
    """A user's loss that ignores the Trainer's count: a mean per micro-batch (0 / 0 where it labels nothing)."""
    logits = outputs["logits"][:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def test_an_empty_micro_batch_under_a_mean_loss_trains_on_and_a_real_nan_still_stops(tmp_path):
    """Accumulating 2 micro-batches, one labelling nothing, under a compute_loss_func that ignores the step's count:
    its loss is a NaN beside a gradient of 0, transformers' Trainer trains on, and deltatune.Trainer stopped ("the
    training loss became nan at step 2"): 1d03e99 read the step's count, not the micro-batch's labels (review).
    A NaN from a micro-batch that labels tokens (the LM head's output poisoned at step 2) still stops the run."""
    from transformers import TrainerCallback

    from deltatune.train.trainer import NonFiniteLossError

    def args(folder):
        return TrainingArguments(str(folder), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                 max_steps=2, learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, logging_steps=1, train_sampling_strategy="sequential")  # fmt: skip

    rows = [{**r, "labels": [-100] * 6} if i == 2 else r for i, r in enumerate(_rows()[:3] + _rows()[:1])]
    cfg = peft.LoraConfig(target_modules=["q_proj"], r=4)
    ref = Trainer(model=peft.get_peft_model(tiny_model("llama"), cfg), args=args(tmp_path / "ref"), train_dataset=rows,
                  data_collator=_collate, compute_loss_func=_mean_ce)  # fmt: skip
    ref.train()
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(target_modules=["q_proj"], r=4))
    trainer = dt.Trainer(model=ours, args=args(tmp_path / "ours"), train_dataset=rows, data_collator=_collate,
                         compute_loss_func=_mean_ce)  # fmt: skip
    trainer.train()
    assert _logged(trainer) == pytest.approx(_logged(ref), rel=1e-5) and len(_logged(ref)) == 4

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.on = state.global_step + 1 == 2

    poison = Poison()
    poison.on = False
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(target_modules=["q_proj"], r=4))
    model.get_base_model().lm_head.register_forward_hook(lambda m, i, o: o * float("nan") if poison.on else o)
    rows = _rows()[:3] * 2  # (every micro-batch labels tokens)
    trainer = dt.Trainer(model=model, args=args(tmp_path / "nan"), train_dataset=rows, data_collator=_collate,
                         compute_loss_func=_mean_ce, callbacks=[poison])  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="the training loss became nan at step 2"):
        trainer.train()
