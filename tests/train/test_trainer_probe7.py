"""Probe 7 of the training loop: ``deltatune.Trainer`` against transformers' Trainer on a peft model, same data,
seed and arguments. Each test failed before its fix."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny import tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import deltatune as dt


def collate(batch):
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
    labels = torch.tensor([r["input_ids"] + [-100] * (width - len(r["input_ids"])) for r in batch])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rows(lengths=(3, 8, 5, 6)):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 100, (n,), generator=g).tolist()} for n in lengths]


def _pair(tmp_path, family="llama", task="causal_lm", **kw):
    """(deltatune's trainer on a DeltaModel, transformers' on a peft model): the same LoRA, data and arguments."""
    out = []
    for kind in ("dt", "peft"):
        torch.manual_seed(0)
        config = dict(r=2, target_modules=["q_proj", "query"], init_lora_weights=False)
        base = tiny_model(family, task)
        model = dt.get_delta_model(base, dt.LoraConfig(**config)) if kind == "dt" else peft.get_peft_model(
            base, peft.LoraConfig(**config))  # fmt: skip
        args = TrainingArguments(str(tmp_path / kind), per_device_train_batch_size=2, per_device_eval_batch_size=4,
                                 report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                                 label_names=["labels"], **kw)  # fmt: skip
        rows = _rows()
        cls = dt.Trainer if kind == "dt" else Trainer
        out.append(cls(model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=collate))
    return out


def test_label_smoothing_scores_a_causal_lm_against_the_next_token(tmp_path):
    """The Trainer shifts the smoothed labels only for a causal LM's class (a peft model's base): a DeltaModel's
    loss was scored token t against label t, eval and training loss 5.906 against the Trainer's 4.909."""
    ours, ref = _pair(tmp_path, label_smoothing_factor=0.1, gradient_accumulation_steps=2, max_steps=1)
    assert ours.evaluate()["eval_loss"] == pytest.approx(ref.evaluate()["eval_loss"], rel=1e-6)
    assert ours.train().training_loss == pytest.approx(ref.train().training_loss, rel=1e-6)


class _AdapterTrainerCallback(TrainerCallback):
    """The adapters library's AdapterTrainerCallback.on_step_end, for a model whose fusion trains."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.fusion_regularization_loss().backward()


def test_a_fusions_regulariser_trains_as_the_adapters_library_trains_it(tmp_path):
    """The adapters library's AdapterTrainer backpropagates the fusion regulariser 0.01 ||I - W_v||^2 after each
    optimizer step; deltatune's trainers never added it. They now train the model's ``regularization_loss()``
    (fusion's, through the registry), as the AdapterTrainer does."""
    rows = [{"input_ids": [5 + i, 9, 3 * i + 4, 7], "labels": i % 2} for i in range(4)]

    def trained(cls, callbacks=(), fusion=True):
        torch.manual_seed(0)
        model = dt.DeltaModel(tiny_model("bert", "seq_cls"))
        for name in ("a", "b"):
            model.add_adapter(name, dt.BottleneckConfig(config="pfeiffer", reduction_factor=4, init_weights=False))
        if fusion:
            model.add_fusion(["a", "b"], name="f", init_weights=False)  # W_v away from I: the regulariser pulls
        assert (model.regularization_loss() is not None) == fusion
        args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=0.05,
                                 report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", remove_unused_columns=False)  # fmt: skip
        cls(model=model, args=args, train_dataset=rows, callbacks=list(callbacks)).train()
        return [p.detach().clone() for n, p in model.named_parameters() if "value" in n or "adapter" in n]

    reference = trained(Trainer, [_AdapterTrainerCallback()])
    ours = trained(dt.Trainer)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, reference))
    plain = trained(Trainer)  # the plain Trainer adds no regulariser: W_v ends elsewhere
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(plain, reference))
    # without a fusion the hook answers None and the two trainers agree
    assert all(torch.equal(a, b) for a, b in zip(trained(dt.Trainer, fusion=False), trained(Trainer, fusion=False)))


def test_the_fused_loss_ignores_a_padded_positions_minus_inf_logit_as_transformers_loss_does():
    """A padded position (label -100) whose logit at token id 0 is -inf (a masked vocabulary, an fp16 overflow)
    made the fused loss nan (-inf times 0), where transformers' ForCausalLMLoss skips the position: 1.64 there."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from deltatune.loss import causal_lm_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    logits[1, 2:, 0] = float("-inf")
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100]])
    ours, ref = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got, want = causal_lm_loss(ours, labels, 7), ForCausalLMLoss(ref, labels, 7)
    got.backward()
    want.backward()
    assert torch.isfinite(want) and got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(ours.grad, ref.grad)


def test_label_smoothing_on_a_prompt_tuned_causal_lm_is_refused_in_one_line(tmp_path):
    """The shifted smoother cannot score the first label (its logit sits on the last virtual token), so smoothed and
    unsmoothed losses would cover different tokens (transformers' Trainer on peft crashes on a size mismatch)."""
    model = dt.get_delta_model(tiny_model("llama"), dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="^label smoothing does not score a prompt-tuned causal LM's first label"):
        dt.Trainer(model=model, args=args, eval_dataset=_rows(), data_collator=collate)
    dt.Trainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True), data_collator=collate)
