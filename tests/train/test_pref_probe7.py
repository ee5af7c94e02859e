"""Preference stages against TRL 1.16 where a probe found them apart: KTO paired its eval rows for the reference point
z0 within each eval batch, where TRL's KTOTrainer pairs them when it prepares the data, in blocks of the train batch
size (each row with the row before it in its block, the block's first with its last): at train batch 4 and eval
batch 2, eval_loss 0.499936 against TRL's 0.499647, and an eval batch of one was refused where TRL takes it."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import trl
from datasets import Dataset
from tiny import save_tiny
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.train import build
from deltatune.train.models import load_tokenizer
from deltatune.train.run import _training_args
from deltatune.train.table import prepare as _prepare

PAIRS = [("what is your name", "my name is delta", "i will not say"), ("hello there friend", "hi", "go away now"),
         ("how are you", "fine thanks", "no"), ("tell me", "a story", "nothing at all")]  # fmt: skip
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                   "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def trained_looking(base: str) -> dt.DeltaModel:
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def prepared(base: str, tmp_path, stage: str, rows: list[dict], align: dict, train: dict):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": stage, "model": {"name_or_path": base},
                 "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                 "data": {"train": str(path), "eval": str(path), "max_length": 64}, "align": align,
                 "train": {**train, "report_to": ["none"]}, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    tok = load_tokenizer(cfg.model.name_or_path)
    return cfg, tok, _prepare(cfg, tok)


def ours_evaluated(cfg, prep, model, tmp_path) -> dict[str, float]:
    return prep.trainer_class(model=model, args=_training_args(cfg, prep, str(tmp_path / "run")),
                              train_dataset=prep.train, eval_dataset=prep.eval, data_collator=prep.collator,
                              compute_metrics=prep.compute_metrics).evaluate()  # fmt: skip


@pytest.mark.parametrize("train_batch, eval_batch", [(4, 2), (4, 1), (3, 2)])
def test_kto_eval_pairs_rows_in_blocks_of_the_train_batch_as_trl(base, tmp_path, train_batch, eval_batch):
    """8 eval rows (4 pairs unpaired); at train batch 3 the blocks are 3, 3, 2 rows, the eval batches 2 each."""
    cfg, tok, prep = prepared(base, tmp_path, "kto", CONVERSATIONAL, {"beta": 0.3},
                              {"batch_size": train_batch, "eval_batch_size": eval_batch})  # fmt: skip
    model = trained_looking(base)
    ours = ours_evaluated(cfg, prep, model, tmp_path)
    args = trl.KTOConfig(str(tmp_path / "trl"), per_device_train_batch_size=train_batch,
                         per_device_eval_batch_size=eval_batch, report_to=[], use_cpu=True, bf16=False, beta=0.3,
                         max_length=64)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trl.KTOTrainer)(model=model, ref_model=AutoModelForCausalLM.from_pretrained(base),
                                                args=args, train_dataset=Dataset.from_list(CONVERSATIONAL),
                                                eval_dataset=Dataset.from_list(CONVERSATIONAL),
                                                processing_class=tok).evaluate()  # fmt: skip
    assert theirs["eval_kl"] > 0.01  # the reference point takes part
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], abs=2e-6)
