"""Probe 11 of the training loop: a recipe's train section against transformers' Trainer on a peft model, same
start, data, seed and arguments. Each test failed before its fix (the keys were refused as unknown)."""

from __future__ import annotations

import json
import random

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny import WORDS, save_tiny
from transformers import Trainer, TrainingArguments, set_seed

from deltatune.config import ConfigError
from deltatune.train import build, train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe11")
    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = [{"instruction": words(3), "output": words(n)} for n in (1, 9, 2, 12, 3, 7, 1, 10)]
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": save_tiny(tmp / "llama", "llama", "causal_lm"), "sft": str(tmp / "sft.jsonl")}


def recipe(files, out, **train_keys) -> dict:
    return {
        "stage": "sft",
        "model": {"name_or_path": files["model"]},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": files["sft"], "max_length": 32},
        "train": {"batch_size": 2, "grad_accum": 2, "max_steps": 2, "lr": 1e-2, "seed": 3, "logging_steps": 1,
                  "report_to": ["none"], **train_keys},
        "output": {"dir": str(out)},
    }  # fmt: skip


def reference(cfg, out, **args) -> tuple[dict, list[float]]:
    """transformers' Trainer on a peft LoRA holding the run's start (its seed, its data as the run encodes it):
    the adapter after training, and each step's logged loss."""
    from deltatune.train.models import load_processor
    from deltatune.train.run import build_model, start_model
    from deltatune.train.table import prepare

    set_seed(cfg.train.seed)  # as the run draws its start
    tok = load_processor(cfg.model.name_or_path, "sft")
    prepared = prepare(cfg, tok)
    start, _ = start_model(cfg, tok)
    ref = peft.get_peft_model(
        build_model(cfg, tok), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    name = lambda k: k.replace(".default", "").removeprefix("base_model.model.")  # noqa: E731  (peft's)
    ours = {
        k.replace(".default", "").removeprefix("base_model."): v for k, v in start.state_dict().items() if "lora_" in k
    }
    with torch.no_grad():
        for k, v in ref.named_parameters():
            if "lora_" in k:
                v.copy_(ours[name(k)])
    t = cfg.train
    targs = TrainingArguments(str(out), per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                              max_steps=t.max_steps, learning_rate=t.lr, seed=t.seed, data_seed=t.seed,
                              logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                              remove_unused_columns=False, **args)  # fmt: skip
    trainer = Trainer(model=ref, args=targs, train_dataset=prepared.train, data_collator=prepared.collator)
    trainer.train()
    state = peft.get_peft_model_state_dict(ref)
    return state, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def ours(files, out, **keys) -> tuple[dict, list[float]]:
    cfg = build(recipe(files, out, **keys))
    train(cfg)
    with open(out / "log_history.jsonl") as fh:
        losses = [h["loss"] for h in map(json.loads, fh) if "loss" in h]
    return load_file(str(out / "adapter_model.safetensors")), losses


@pytest.mark.parametrize(
    "keys",
    [{"neftune_noise_alpha": 5.0}, {"label_smoothing_factor": 0.1}, {"optim": "sgd"}],
    ids=["neftune", "label_smoothing", "optim"],
)
def test_a_recipe_key_of_the_trainer_trains_as_the_trainer_does(files, tmp_path, keys):
    """NEFTune (the same noise on the same seed), label smoothing and the optimizer, set in a recipe, train the
    adapter as transformers' Trainer with those arguments trains peft's LoRA (max abs diff ~1e-7 on the adapter);
    without the key the run would differ (checked: the noise alone moves the step-1 loss by ~1e-2)."""
    adapter, losses = ours(files, tmp_path / "ours", **keys)
    cfg = build(recipe(files, tmp_path / "unused", **keys))
    ref, ref_losses = reference(cfg, tmp_path / "ref", **keys)
    plain, plain_losses = reference(cfg, tmp_path / "plain")  # the key left out: the test can tell
    assert adapter.keys() == ref.keys()
    diff = max((adapter[k] - ref[k]).abs().max().item() for k in ref)
    moved = max((plain[k] - ref[k]).abs().max().item() for k in ref)
    assert diff < 1e-5 < moved, (diff, moved)
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert losses != pytest.approx(plain_losses, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("learning_rate", 1e-4, "learning_rate (TrainingArguments', SFTConfig's) is train.lr in a recipe"),
        ("gradient_accumulation_steps", 4, "is train.grad_accum"),
        ("max_seq_length", 64, "is data.max_length"),
        ("padding_free", True, "is data.packing (rows packed into data.max_length blocks"),
        ("completion_only_loss", True, "sft always trains on the response tokens only"),
        ("optim", "adamw_trch", "train.optim: unknown optimizer 'adamw_trch'; did you mean 'adamw_torch'?"),
        ("optim", "adamw", "train.optim: unknown optimizer 'adamw'; did you mean 'adamw_torch'?"),  # not grokadamw
        ("optim", "adamw_torch_fuse", "did you mean 'adamw_torch_fused'?"),  # difflib's answer kept (review F)
        ("neftune_noise_alpha", 0, "train.neftune_noise_alpha must be > 0"),
        ("label_smoothing_factor", 1.0, "train.label_smoothing_factor must be in [0, 1)"),
    ],
)
def test_a_trainer_name_or_a_bad_value_is_refused_in_one_line_naming_the_key(key, value, says):
    with pytest.raises(ConfigError) as err:
        build({"train": {key: value}})
    assert says in str(err.value) and "\n" not in str(err.value)
    assert f"train.{key}" in str(err.value)


def test_neftune_and_label_smoothing_are_named_ignored_on_a_stage_that_does_not_read_them():
    from deltatune.train.config import ignored_keys

    cfg = build({"stage": "dpo", "train": {"neftune_noise_alpha": 5, "label_smoothing_factor": 0.1}})
    assert ("train.neftune_noise_alpha", "pt, sft") in ignored_keys(cfg)
    assert ("train.label_smoothing_factor", "pt, sft, seq2seq") in ignored_keys(cfg)
    for stage in ("ppo", "grpo"):  # their own loops step AdamW: train.optim trained nothing else there (review C)
        named = dict(ignored_keys(build({"stage": stage, "train": {"optim": "sgd"}})))
        assert "train.optim" in named and stage not in named["train.optim"].split(", ")
    assert "train.optim" not in dict(ignored_keys(build({"stage": "dpo", "train": {"optim": "sgd"}})))


def test_deltatune_eval_scores_a_label_smoothed_run_as_its_training_evaluated(files, tmp_path):
    """A run with label smoothing reports the smoothed eval loss, as Trainer.evaluate does; ``deltatune eval`` of
    the run scored the plain loss (10.33847 against the run's 10.33789 here) until it took the run's smoothing too."""
    from deltatune.train.evaluation import evaluate

    raw = recipe(files, tmp_path / "run", label_smoothing_factor=0.1)
    raw["data"]["eval"] = files["sft"]
    metrics = train(build(raw))
    again = evaluate(str(tmp_path / "run"))
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)


def test_a_run_resumed_at_an_epochs_last_step_trains_on_as_the_uninterrupted_run(files, tmp_path):
    """A checkpoint written at an epoch's last step comes before that epoch's evaluation, which drew from torch's
    random generator (a DataLoader pass draws its base seed): the uninterrupted run's dropout after it ran on another
    stream than the resumed run's (adapter max abs diff 0.021 with lora_dropout 0.2), and adding data.eval changed
    the trained adapter. The evaluation now leaves the generators as it found them."""
    import os
    import shutil

    def run(out, evaluate=True, **keys):
        raw = recipe(files, out, max_steps=4, save_steps=2, **keys)
        raw["method"]["lora_dropout"] = 0.2
        if evaluate:
            raw["data"]["eval"] = files["sft"]  # 8 rows of 2 x 2: an epoch is 2 steps, evaluated at its end
        return raw

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(build(run(whole)))
    shutil.copytree(whole, resumed)
    for name in os.listdir(resumed):  # the run as it stood when it stopped after checkpoint-2
        if name not in ("checkpoint-2", "run.yaml", "log_history.jsonl"):
            (shutil.rmtree if (resumed / name).is_dir() else os.remove)(resumed / name)
    train(build(run(resumed)), resume=True)
    train(build(run(tmp_path / "no_eval", evaluate=False)))
    a = load_file(str(whole / "adapter_model.safetensors"))
    for other in (resumed, tmp_path / "no_eval"):
        b = load_file(str(other / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), other.name


def test_save_total_limit_null_keeps_every_checkpoint(tmp_path):
    """train.save_total_limit: null (the Trainer's default: keep every checkpoint) was refused "must be int"; PPO's
    and GRPO's rotation keep every one too."""
    from deltatune.train.ppo_checkpoint import rotate

    assert build({"train": {"save_total_limit": None}}).train.save_total_limit is None
    with pytest.raises(ConfigError, match=r"^train.save_total_limit must be >= 1"):
        build({"train": {"save_total_limit": 0}})
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
    rotate(str(tmp_path), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    rotate(str(tmp_path), 1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]
