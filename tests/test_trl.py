"""TRL's trainers with a DeltaModel: ``deltatune.trl_trainer(SFTTrainer | DPOTrainer)`` trains the adapter with TRL's
own loss and writes adapter-only checkpoints; the plain TRL class is refused in one line."""

import math
import os

import pytest
import torch
import trl
from datasets import Dataset
from tiny import save_tiny, tokenizer
from transformers import AutoModelForCausalLM

import deltatune as dt

CHAT = [{"role": "user", "content": "what is your name"}, {"role": "assistant", "content": "my name is delta"}]


def delta_model(path: str) -> dt.DeltaModel:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path)
    return dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def args_for(cls, out: str, **extra):
    # fp32: TRL turns bf16 autocast on by default where the CPU has it, which the logits compared below would show
    return cls(out, max_steps=3, per_device_train_batch_size=2, save_steps=2, logging_steps=1, report_to=[],
               use_cpu=True, seed=0, bf16=False, **extra)  # fmt: skip


def adapter_state(model: dt.DeltaModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def base_state(model: dt.DeltaModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k}


def test_sft_trainer_trains_the_adapter_with_trl_loss_and_saves_only_the_adapter(tmp_path):
    path = save_tiny(tmp_path / "base")
    model = delta_model(path)
    before, frozen = adapter_state(model), base_state(model)
    ds = Dataset.from_list([{"messages": CHAT}] * 8)
    out = str(tmp_path / "out")
    trainer = dt.trl_trainer(trl.SFTTrainer)(
        model=model, args=args_for(trl.SFTConfig, out, learning_rate=1e-2), train_dataset=ds,
        processing_class=tokenizer(),
    )  # fmt: skip
    row = trainer.train_dataset[0]
    trainer.train()
    # step 1 runs before any update and LoRA starts at zero: TRL's loss is the base model's NLL on TRL's labels
    plain = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor([row["labels"]])  # TRL's own labels (-100 where it does not train)
    expected = plain(input_ids=ids, labels=labels).loss.item()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, abs=1e-4)
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(frozen[k], v) for k, v in base_state(model).items())
    checkpoint = os.path.join(out, "checkpoint-3")
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files
    reloaded = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), checkpoint)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_dpo_trainer_starts_at_log_2_and_saves_only_the_adapter(tmp_path):
    path = save_tiny(tmp_path / "base")
    model = delta_model(path)
    before = adapter_state(model)
    pair = {"prompt": "what is your name", "chosen": " my name is delta", "rejected": " i will not say"}
    out = str(tmp_path / "out")
    trainer = dt.trl_trainer(trl.DPOTrainer)(
        model=model, args=args_for(trl.DPOConfig, out, learning_rate=1e-2), train_dataset=Dataset.from_list([pair] * 8),
        processing_class=tokenizer(),
    )  # fmt: skip
    trainer.train()
    # the reference is the model as given (a frozen copy, as peft's is its starting adapter): every margin is 0 at
    # step 1 and the sigmoid loss is -log(sigmoid(0)) = log 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in adapter_state(model).items())
    files = set(os.listdir(os.path.join(out, "checkpoint-3")))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files


def test_plain_trl_trainer_is_refused_in_one_line(tmp_path):
    model = delta_model(save_tiny(tmp_path / "base"))
    ds = Dataset.from_list([{"messages": CHAT}] * 2)
    with pytest.raises(TypeError, match=r"deltatune\.trl_trainer\(SFTTrainer\)") as info:
        trl.SFTTrainer(model=model, args=args_for(trl.SFTConfig, str(tmp_path / "out")), train_dataset=ds,
                       processing_class=tokenizer())  # fmt: skip
    assert "\n" not in str(info.value)
    assert "forward" not in vars(model)  # nothing was patched


def test_dpo_after_sft_takes_the_model_as_given_for_its_reference(tmp_path):
    """TRL loads a non-peft model's reference from the base's path: after an SFT adapter (the usual SFT -> DPO), the
    first loss was 0.705, not log 2 (and 0.693 with precompute_ref_log_probs, which TRL calls a memory switch), a
    merge or a 4-bit base was lost. The reference is now a frozen copy of the DeltaModel as given, as peft's is."""
    path = save_tiny(tmp_path / "base")
    pair = {"prompt": "what is your name", "chosen": " my name is delta", "rejected": " i will not say"}
    for precompute in (False, True):
        model = delta_model(path)
        with torch.no_grad():  # an adapter trained before (SFT)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        trainer = dt.trl_trainer(trl.DPOTrainer)(
            model=model, args=args_for(trl.DPOConfig, str(tmp_path / f"out{precompute}"),
                                       precompute_ref_log_probs=precompute),
            train_dataset=Dataset.from_list([pair] * 2), processing_class=tokenizer())  # fmt: skip
        trainer.train()
        assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_reward_trainer_evaluates_and_a_lora_on_lm_head_is_refused(tmp_path):
    """The mixin gave TRL's RewardTrainer the base's label names over its own (none), so evaluate() computed no loss
    and returned no metric. A LoRA on lm_head trained silently ignored under TRL's fused head (TRL refuses peft's)."""
    from transformers import AutoModelForSequenceClassification

    path = save_tiny(tmp_path / "base")
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    base.config.pad_token_id = 0
    model = dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    pairs = Dataset.from_list([{"chosen": "my name is delta", "rejected": "i will not say"}] * 4)
    trainer = dt.trl_trainer(trl.RewardTrainer)(model=model, args=args_for(trl.RewardConfig, str(tmp_path / "rm")),
                                                train_dataset=pairs, eval_dataset=pairs, processing_class=tokenizer())  # fmt: skip
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and 0 <= metrics["eval_accuracy"] <= 1
    headed = dt.get_delta_model(
        AutoModelForCausalLM.from_pretrained(path), dt.LoraConfig(target_modules=["q_proj", "lm_head"])
    )
    with pytest.raises(ValueError, match=r"^an adapter on lm_head \(LoraLinear\) is not supported under TRL"):
        dt.trl_trainer(trl.SFTTrainer)(model=headed, args=args_for(trl.SFTConfig, str(tmp_path / "sft")),
                                       train_dataset=Dataset.from_list([{"messages": CHAT}] * 2),
                                       processing_class=tokenizer())  # fmt: skip
