"""Preference stages against TRL 1.16 where a probe found them apart: KTO on preference rows read them interleaved
(chosen 1, rejected 1, chosen 2, ...), so in a sequential eval batch each rejected row's mismatched neighbour was its
own prompt's chosen answer, a matched pair in the reference point z0 (eval_loss 0.49962 against TRL's 0.49965 here);
TRL's ``unpair_preference_dataset`` gives each 1000 rows' chosen completions, then their rejected ones. A reward
model on a decoder without a chat template scored the tokenizer's pair template, with no EOS, so its reward was read
at the response's last word; TRL's RewardTrainer appends the EOS and reads it there (a probe's first reward: 0.037
against TRL's 0.188); its training logged none of TRL's accuracy, margin, min/mean/max_reward. KTO's reference point
under DDP was each process's own, clamped at 0 there; TRL's is the mean of every process's mean, clamped after. A KTO
eval batch of one row paired the row with itself in z0 (TRL's mismatched pairs come from blocks of the train batch
size): refused as a train batch of one is. ORPO and SimPO logged TRL's rewards but not its logps/chosen and
logps/rejected."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import trl
from datasets import Dataset
from tiny import save_tiny, tiny_config, tokenizer, word_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainingArguments

import deltatune as dt
from deltatune.data.preference import PairCollator
from deltatune.train import build
from deltatune.train.config import AlignArgs
from deltatune.train.kto import KTOTrainer, kl_reference_point
from deltatune.train.models import load_tokenizer
from deltatune.train.orpo import ORPOTrainer as DeltaORPOTrainer
from deltatune.train.reward import RewardTrainer
from deltatune.train.run import _training_args
from deltatune.train.simpo import SimPOTrainer
from deltatune.train.table import prepare as _prepare

with warnings.catch_warnings():  # TRL keeps ORPO and CPO in trl.experimental, which warns on import
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

PAIRS = [("what is your name", "my name is delta", "i will not say"), ("hello there friend", "hi", "go away now"),
         ("how are you", "fine thanks", "no"), ("tell me", "a story", "nothing at all")]  # fmt: skip
PLAIN = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS[:2]]
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                   "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def trained_looking(base: str, std: float = 0.5) -> dt.DeltaModel:
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model


def prepared(base: str, tmp_path, stage: str, rows: list[dict], align: dict | None = None, eval_batch_size: int = 4):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": stage, "model": {"name_or_path": base},
                 "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                 "data": {"train": str(path), "eval": str(path), "max_length": 64}, "align": align or {},
                 "train": {"batch_size": 4, "eval_batch_size": eval_batch_size, "report_to": ["none"]},
                 "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    tok = load_tokenizer(cfg.model.name_or_path)
    return cfg, tok, _prepare(cfg, tok)


def test_kto_eval_on_preference_rows_equals_trl(base, tmp_path):
    cfg, tok, prep = prepared(base, tmp_path, "kto", CONVERSATIONAL, {"beta": 0.3})
    model = trained_looking(base)
    ours = prep.trainer_class(model=model, args=_training_args(cfg, prep, str(tmp_path / "run")),
                              train_dataset=prep.train, eval_dataset=prep.eval, data_collator=prep.collator,
                              compute_metrics=prep.compute_metrics).evaluate()  # fmt: skip
    args = trl.KTOConfig(str(tmp_path / "trl"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                         report_to=[], use_cpu=True, bf16=False, beta=0.3, max_length=64)  # fmt: skip
    theirs = dt.trl_trainer(trl.KTOTrainer)(model=model, ref_model=AutoModelForCausalLM.from_pretrained(base),
                                            args=args, train_dataset=Dataset.from_list(CONVERSATIONAL),
                                            eval_dataset=Dataset.from_list(CONVERSATIONAL),
                                            processing_class=tok).evaluate()  # fmt: skip
    assert theirs["eval_kl"] > 0.1  # the reference point takes part
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], abs=2e-6)
    assert ours["eval_reward_desirable"] == pytest.approx(theirs["eval_rewards/chosen"], abs=2e-5)
    assert ours["eval_reward_undesirable"] == pytest.approx(theirs["eval_rewards/rejected"], abs=2e-5)
    assert [e["desirable"] for e in prep.eval] == [True] * 4 + [False] * 4  # TRL's order


def test_reward_model_on_a_decoder_without_template_reads_the_eos_as_trl(tmp_path):
    """The word tokenizer adds no special token and has no chat template (RAW rows); its pad is not its EOS, so the
    classifier reads the last real token: TRL's appended EOS."""
    tok = word_tokenizer()
    config = tiny_config("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, num_labels=1)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [{"prompt": "w1 w2 w3", "chosen": " w4 w5", "rejected": " w6"}, {"prompt": "w7", "chosen": " w8 w9 w10",
            "rejected": " w11 w12"}]  # fmt: skip
    cfg, tok, prep = prepared(str(tmp_path / "m"), tmp_path, "rm", rows)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    args = trl.RewardConfig(str(tmp_path / "trl"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                            report_to=[], use_cpu=True, bf16=False)  # fmt: skip
    theirs = dt.trl_trainer(trl.RewardTrainer)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                               eval_dataset=Dataset.from_list(rows), processing_class=tok)  # fmt: skip
    batch, ours = next(iter(theirs.get_eval_dataloader())), prep.collator(prep.eval)
    assert ours["input_ids"].tolist() == batch["input_ids"].tolist()  # [w1 w2 w3 w4 w5 EOS] ...
    assert ours["input_ids"][0, 5] == tok.eos_token_id
    trainer = RewardTrainer(model=model, args=_training_args(cfg, prep, str(tmp_path / "run")), eval_dataset=prep.eval)
    with torch.no_grad():
        expected = theirs.compute_loss(model, dict(batch)).item()
        assert trainer.compute_loss(model, ours).item() == pytest.approx(expected, abs=1e-6)
        model.train()  # (the tiny llama has no dropout) logged in training, as TRL's RewardTrainer names them
        theirs.compute_loss(model, dict(batch))
        trainer.compute_loss(model, ours)
    model.eval()
    logged = {k: v[-1] for k, v in theirs._metrics["train"].items() if k != "num_tokens"}
    assert len(logged) == 5 and {k: trainer._stats[k][0] for k in logged} == pytest.approx(logged, abs=1e-6)


def test_kto_reference_point_is_the_mean_over_every_process(base, tmp_path, monkeypatch):
    """Two processes' mismatched log-ratio means -0.5 (here) and 1.5: TRL's z0 = max(0, mean(-0.5, 1.5)) = 0.5 on
    both; each process's own gave 0 here and 1.5 there."""
    policy, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0])  # log-ratios 0 and -1: mean -0.5
    assert kl_reference_point(policy, ref).item() == 0.0
    both = kl_reference_point(policy, ref, lambda t: torch.cat([t, torch.tensor([1.5])]))
    assert both.item() == pytest.approx(0.5)
    trainer = KTOTrainer(model=trained_looking(base), args=TrainingArguments(str(tmp_path), report_to=[],
                         use_cpu=True), align=AlignArgs(beta=0.3))  # fmt: skip
    gathered = []
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "gather", lambda t: gathered.append(t) or torch.cat([t, t + 1.0]))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0], [5, 6, 11, 0], [9, 10, 7, 8]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, 7, 8], [-100, -100, 11, -100], [-100, -100, 11, -100], [-100, -100, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "desirable": torch.tensor([True, False])}
    with torch.no_grad():
        _, _, kl, _ = trainer._losses(trainer.model, batch)
    assert len(gathered) == 1 and kl.item() == pytest.approx(max(0.0, gathered[0].item() + 0.5), abs=1e-6)


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_orpo_and_simpo_log_trls_logps(base, tmp_path, stage):
    """TRL's ORPOTrainer and CPOTrainer (loss_type simpo) log logps/chosen and logps/rejected, the mean token
    log-probs of each side, with the rewards; deltatune logged the rewards only."""
    model = trained_looking(base).eval()
    cls, config, extra = (ORPOTrainer, ORPOConfig, {}) if stage == "orpo" else (CPOTrainer, CPOConfig,
                                                                               {"loss_type": "simpo"})  # fmt: skip
    args = config(str(tmp_path / "trl"), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                  beta=2.0, **extra)  # fmt: skip
    theirs = dt.trl_trainer(cls)(model=model, args=args, train_dataset=Dataset.from_list(PLAIN),
                                 processing_class=tokenizer())  # fmt: skip
    batch = next(iter(theirs.get_train_dataloader()))
    with torch.no_grad():
        _, metrics = theirs.get_batch_loss_metrics(model, batch)
    sides = [{"input_ids": batch[f"{s}_input_ids"][i][batch[f"{s}_attention_mask"][i].bool()].tolist(),
              "labels": batch[f"{s}_labels"][i][batch[f"{s}_attention_mask"][i].bool()].tolist()}
             for s in ("chosen", "rejected") for i in range(2)]  # fmt: skip
    for side in sides:
        side["attention_mask"] = [1] * len(side["input_ids"])
    inputs = PairCollator(tokenizer().pad_token_id)([{"chosen": sides[i], "rejected": sides[2 + i]} for i in range(2)])
    trainer_class = DeltaORPOTrainer if stage == "orpo" else SimPOTrainer
    ours = trainer_class(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                         align=AlignArgs(beta=2.0, simpo_gamma=0.5))  # fmt: skip
    model.train()  # (logged while training; the tiny llama and the LoRA have no dropout)
    with torch.no_grad():
        ours.compute_loss(model, inputs)
    model.eval()
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
        assert ours._stats[key][0] == pytest.approx(float(metrics[key]), abs=2e-5), key
