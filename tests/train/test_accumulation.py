"""Gradient accumulation is a way to fit a batch, not another loss: for every stage whose loss is a mean over the
whole batch, 2 micro-batches x 2 accumulated give the same logged losses and the same adapter as batches of 4.

Responses of very different lengths, so that a loss averaged over tokens per micro-batch (instead of over the whole
step's tokens) would show: ORPO's NLL term and the tag stage's loss did, before they took their divisor from the
step, and T5's own loss was taken once per micro-batch unscaled (twice the loss and gradient at 2 x 2). KTO is left
out: its reference point is, as in TRL, a statistic of each micro-batch."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from tiny import WORDS, save_tiny

from deltatune.train import build, train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accumulation")
    rng = random.Random(0)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    lengths = [1, 9, 2, 12, 3, 7, 1, 10]  # chosen responses: short and long in every pair of micro-batches
    rows = {
        "pairs": [{"prompt": words(3), "chosen": words(n), "rejected": words(13 - n)} for n in lengths],
        "sft": [{"instruction": words(3), "output": words(n)} for n in lengths],
        "pt": [{"text": words(n + 2)} for n in lengths],
        "seq2seq": [{"source": words(3), "target": words(n)} for n in lengths],
        "tag": [{"tokens": words(n).split(), "ner_tags": [rng.choice(["O", "B-x", "I-x"]) for _ in range(n)]}
                for n in lengths],
    }  # fmt: skip
    quiet = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # both runs must compute alike
    out = {"llama": save_tiny(tmp / "llama", "llama", "causal_lm"),
           "t5": save_tiny(tmp / "t5", "t5", "seq2seq", dropout_rate=0.0),
           "bert": save_tiny(tmp / "bert", "bert", "token_cls", **quiet)}  # fmt: skip
    for name, data in rows.items():
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        out[name] = str(path)
    return out


# stage -> (data, model, LoRA targets)
DECODER = ["q_proj", "v_proj"]
STAGES = {"sft": ("sft", "llama", DECODER), "pt": ("pt", "llama", DECODER), "dpo": ("pairs", "llama", DECODER),
          "orpo": ("pairs", "llama", DECODER), "simpo": ("pairs", "llama", DECODER), "rm": ("pairs", "llama", DECODER),
          "seq2seq": ("seq2seq", "t5", ["q", "v"]), "tag": ("tag", "bert", ["query", "value"])}  # fmt: skip


def run(files, stage: str, out: str, batch_size: int, grad_accum: int) -> tuple[dict, list[tuple[float, float]]]:
    """The adapter after two steps, and each step's (loss, gradient norm) as logged (the sampler's order is the
    seed's, whatever the batch size, so both runs see the same rows at each step)."""
    data, model, targets = STAGES[stage]
    recipe = {
        "stage": stage,
        "model": {"name_or_path": files[model]},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": targets},
        "data": {"train": files[data], "max_length": 32},
        "train": {"batch_size": batch_size, "grad_accum": grad_accum, "max_steps": 2, "lr": 1e-2, "seed": 3,
                  "logging_steps": 1, "report_to": ["none"]},
        "output": {"dir": out},
    }  # fmt: skip
    train(build(recipe))
    with open(f"{out}/log_history.jsonl") as fh:
        steps = [(h["loss"], h["grad_norm"]) for h in map(json.loads, fh) if "loss" in h]
    return load_file(f"{out}/adapter_model.safetensors"), steps


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_accumulated_micro_batches_equal_one_batch(files, tmp_path, stage):
    big, big_steps = run(files, stage, str(tmp_path / "big"), 4, 1)
    acc, acc_steps = run(files, stage, str(tmp_path / "acc"), 2, 2)
    assert [x for step in acc_steps for x in step] == pytest.approx([x for step in big_steps for x in step], rel=1e-5)
    assert big.keys() == acc.keys()
    for k in big:  # fp32 sums in another order: a few ulps after two AdamW steps
        torch.testing.assert_close(acc[k], big[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert len(big_steps) == 2 and big_steps[0][0] != big_steps[1][0]  # the guard: it trained
