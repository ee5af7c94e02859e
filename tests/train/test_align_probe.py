"""Preference stages against TRL where a probe found them apart: the reward model's ``margin`` column (TRL's
RewardTrainer subtracts it inside the ranking loss; deltatune read no such column) and its
``center_rewards_coefficient`` term, ORPO's logged ``log_odds_ratio`` (TRL's is the mean of log sigmoid(log OR);
deltatune logged the mean of log OR under that name), a T5 reward model, whose classifier needs an EOS token in
every input (transformers' ValueError from inside the first training step; now one line before training), and
DPO's and KTO's reference computed with the base's dropout on in training (TRL's and the precomputed one have none)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import trl
from datasets import Dataset
from tiny import save_tiny, tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainingArguments

import deltatune as dt
from deltatune.data.load import DataError
from deltatune.data.preference import PairCollator
from deltatune.train import build
from deltatune.train.config import AlignArgs
from deltatune.train.dpo import DPOTrainer
from deltatune.train.kto import KTOCollator, KTOTrainer, kl_reference_point, kto_loss
from deltatune.train.logprobs import sequence_logprobs
from deltatune.train.orpo import ORPOTrainer
from deltatune.train.reward import RewardTrainer, prepare_rm

with warnings.catch_warnings():  # TRL keeps ORPO in trl.experimental, which warns on import
    warnings.simplefilter("ignore")
    from trl.experimental.orpo import ORPOConfig
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

ROWS = [
    {"prompt": "what is your name", "chosen": " my name is delta", "rejected": " i will not say", "margin": 2.5},
    {"prompt": "hello there friend", "chosen": " hi", "rejected": " go away now please you", "margin": -1.0},
    {"prompt": "how are you", "chosen": " fine thanks", "rejected": " no", "margin": 0.0},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def unpadded(ids, mask, labels=None) -> dict:
    keep = mask.bool()
    out = {"input_ids": ids[keep].tolist(), "attention_mask": mask[keep].tolist()}
    return out | ({"labels": labels[keep].tolist()} if labels is not None else {})


@pytest.mark.parametrize("center", [None, 0.3])
def test_reward_margin_column_enters_the_loss_as_trls(tmp_path, center):
    """TRL: loss = mean of -log sigmoid(r_c - r_r - margin) (+ center_rewards_coefficient mean (r_c + r_r)^2). The
    same batch (TRL's tokens, with margins 2.5, -1 and 0) through deltatune's RewardTrainer gives TRL's loss;
    without the column it would be another number."""
    path = save_tiny(tmp_path / "llama")
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    base.config.pad_token_id = tokenizer().pad_token_id
    model = dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    with torch.no_grad():  # a head that scores: rewards well apart from 0
        base.score.weight.normal_(0, 2.0)
    args = trl.RewardConfig(str(tmp_path / "trl"), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                            bf16=False, center_rewards_coefficient=center)  # fmt: skip
    rows = [{k: v for k, v in r.items()} for r in ROWS]
    theirs = dt.trl_trainer(trl.RewardTrainer)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                               processing_class=tokenizer())  # fmt: skip
    batch = next(iter(theirs.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        expected = theirs.compute_loss(model, dict(batch)).item()
    chosen, rejected = batch["input_ids"].chunk(2), batch["attention_mask"].chunk(2)
    examples = [{"chosen": unpadded(chosen[0][i], rejected[0][i]), "rejected": unpadded(chosen[1][i], rejected[1][i]),
                 "margin": float(batch["margin"][i])} for i in range(3)]  # fmt: skip
    args = TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True)
    collate = PairCollator(tokenizer().pad_token_id)
    ours = RewardTrainer(model=model, args=args, data_collator=collate, center_rewards_coefficient=center)
    inputs = collate(examples)
    with torch.no_grad():
        got = ours.compute_loss(model, inputs).item()
        inputs.pop("margin")
        unmarked = ours.compute_loss(model, inputs).item()
    assert got == pytest.approx(expected, abs=1e-5)
    assert abs(unmarked - expected) > 0.05  # the margins matter in this batch


def rm_config(tmp_path, model: str, rows, **data):
    recipe = {
        "stage": "rm",
        "model": {"name_or_path": model},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj"]},
        "data": {"train": write_jsonl(tmp_path / "train.jsonl", rows), "max_length": 32, **data},
        "train": {"batch_size": 2, "report_to": ["none"]},
        "output": {"dir": str(tmp_path / "out")},
    }
    return build(recipe)


def test_reward_margin_column_is_read_from_the_data(tmp_path):
    """prepare_rm carries each row's margin to its pair (skipped rows left out) and into the batch."""
    model = save_tiny(tmp_path / "llama", "llama", "seq_cls")
    rows = [ROWS[0], {**ROWS[1], "chosen": ROWS[1]["rejected"]}, ROWS[2]]  # the middle row is no pair: skipped
    prepared = prepare_rm(rm_config(tmp_path, model, rows, bad_pairs="skip"), tokenizer())
    assert [e["margin"] for e in prepared.train] == [2.5, 0.0]
    assert prepared.collator(prepared.train)["margin"].tolist() == [2.5, 0.0]
    assert any("margin" in n for n in prepared.notes)
    bad = [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "margin"}]
    with pytest.raises(DataError, match=r"train\.jsonl:2: column 'margin' must be a finite number"):
        prepare_rm(rm_config(tmp_path, model, bad), tokenizer())
    plain = [{k: v for k, v in r.items() if k != "margin"} for r in ROWS]
    assert all("margin" not in e for e in prepare_rm(rm_config(tmp_path, model, plain), tokenizer()).train)


def test_t5_reward_model_without_eos_is_refused_in_one_line(tmp_path):
    """T5ForSequenceClassification reads each input's last EOS token; rows rendered with the tokenizer's chat
    template have none, and training ended in transformers' 'Each example must contain at least one <eos> token'.
    With data.template (the tokenizer's specials) every input has the same number, and it prepares."""
    model = save_tiny(tmp_path / "t5", "t5")
    rows = [{k: v for k, v in r.items() if k != "margin"} for r in ROWS]
    with pytest.raises(DataError, match=r"^stage rm on t5: its classifier scores the last EOS token .* train pair 1"):
        prepare_rm(rm_config(tmp_path, model, rows), tokenizer())
    prepared = prepare_rm(rm_config(tmp_path, model, rows, template="chatml"), tokenizer())
    counts = {e[s]["input_ids"].count(tokenizer().sep_token_id) for e in prepared.train for s in e}
    assert len(counts) == 1 and counts.pop() >= 1


def lora_policy(path: str) -> dt.DeltaModel:
    """A causal LM under a LoRA that is not zero (the policy is no longer the base)."""
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(path), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_orpo_logs_log_odds_as_trl_names_them(tmp_path):
    """TRL's ORPO logs log_odds_ratio = mean log sigmoid(log OR) and log_odds_chosen = mean log OR; deltatune
    logged the latter under the former's name (-0.6 against 0.1 here, say)."""
    path = save_tiny(tmp_path / "llama")
    model = lora_policy(path)
    rows = [{k: v for k, v in r.items() if k != "margin"} for r in ROWS]
    args = ORPOConfig(
        str(tmp_path / "trl"), per_device_train_batch_size=3, report_to=[], use_cpu=True, bf16=False, beta=0.3
    )
    theirs = dt.trl_trainer(TRLORPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                            processing_class=tokenizer())  # fmt: skip
    batch = next(iter(theirs.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        _, metrics = theirs.get_batch_loss_metrics(model, batch)
    examples = [{s: unpadded(batch[f"{s}_input_ids"][i], batch[f"{s}_attention_mask"][i], batch[f"{s}_labels"][i])
                 for s in ("chosen", "rejected")} for i in range(3)]  # fmt: skip
    ours = ORPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                       data_collator=PairCollator(tokenizer().pad_token_id), align=AlignArgs(beta=0.3))  # fmt: skip
    model.train()  # (the tiny llama has no dropout: the same numbers)
    with torch.no_grad():
        ours.compute_loss(model, PairCollator(tokenizer().pad_token_id)(examples))
    model.eval()
    keys = ("log_odds_ratio", "log_odds_chosen", *(f"rewards/{k}" for k in
            ("chosen", "rejected", "margins", "accuracies")))  # fmt: skip
    for key in keys:  # (ORPO logged no margins)
        assert ours._stats[key][0] == pytest.approx(float(metrics[key]), abs=2e-5), key
    assert abs(float(metrics["log_odds_ratio"]) - float(metrics["log_odds_chosen"])) > 0.05


@pytest.fixture
def dropout_policy(tmp_path):
    """A tiny llama whose attention drops half its weights in training mode, under a LoRA that is not zero."""
    path = save_tiny(tmp_path / "llama", attention_dropout=0.5)
    model = lora_policy(path)
    return model


def lm_row(prompt: list[int], response: list[int]) -> dict:
    ids = prompt + response
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + response}


def test_dpo_reference_on_the_fly_has_no_dropout_as_the_precomputed_one(tmp_path, dropout_policy):
    """The reference (adapter off) computed at each training step ran in training mode, with the base's dropout:
    another reference than align.precompute_ref's (computed in eval mode) and than TRL's (dropout disabled), and
    noise in every implicit reward. Now both give the same loss and rewards, the policy's dropout drawn alike."""
    model, g = dropout_policy, torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(1000, 2000, (n,), generator=g).tolist()

    rows = [{"chosen": lm_row(p, ids(4)), "rejected": lm_row(p, ids(7))} for p in (ids(5), ids(3), ids(6))]
    args = TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True, per_device_eval_batch_size=3)
    collate = PairCollator(tokenizer().pad_token_id)
    out = []
    for precompute in (False, True):
        trainer = DPOTrainer(model=model, args=args, data_collator=collate, train_dataset=rows,
                             align=AlignArgs(beta=0.5, precompute_ref=precompute))  # fmt: skip
        model.train()
        torch.manual_seed(7)  # the policy's dropout masks
        with torch.no_grad():
            loss = trainer.compute_loss(model, collate(trainer.train_dataset)).item()
        out.append((loss, trainer._stats["rewards/chosen"][0], trainer._stats["rewards/rejected"][0]))
    assert "ref_chosen_logp" in trainer.train_dataset[0]
    assert out[0] == pytest.approx(out[1], abs=1e-6)


def test_kto_reference_has_no_dropout(tmp_path, dropout_policy):
    """KTO's reference (rows and mismatched pairs) in eval mode: the loss is kto_loss of the policy's log-probs
    (training mode, its dropout drawn from the seed) against the base's eval-mode log-probs, worked out here."""
    model, g = dropout_policy, torch.Generator().manual_seed(4)
    rows = []
    for i, good in enumerate([True, False, True, False]):
        p, r = torch.randint(1000, 2000, (4 + i,), generator=g).tolist(), torch.randint(1000, 2000, (3,), generator=g)
        rows.append({**lm_row(p, r.tolist()), "n_prompt": len(p), "desirable": good})
    collate = KTOCollator(tokenizer().pad_token_id, 64)
    batch = collate(rows)
    trainer = KTOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                         data_collator=collate, align=AlignArgs(beta=0.3))  # fmt: skip
    lm = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    torch.manual_seed(7)
    with torch.no_grad():
        got = trainer.compute_loss(model, batch).item()
        torch.manual_seed(7)  # the mismatched (KL) rows first, under no_grad, then the rows: TRL's order
        policy_kl = sequence_logprobs(model, {k: v[4:] for k, v in lm.items()})
        policy = sequence_logprobs(model, {k: v[:4] for k, v in lm.items()})
        model.eval()
        with model.disable_adapter():
            ref, ref_kl = sequence_logprobs(model, lm).chunk(2)
    losses, rewards = kto_loss(policy, ref, batch["desirable"], kl_reference_point(policy_kl, ref_kl), 0.3)
    assert got == pytest.approx(losses.mean().item(), abs=1e-6)
    good = batch["desirable"].bool()  # logged as TRL's KTOTrainer names them (test_trl_losses: its values)
    want = {"rewards/chosen": rewards[good].mean(), "rewards/rejected": rewards[~good].mean(),
            "logps/chosen": policy[good].mean(), "logps/rejected": policy[~good].mean(),
            "rewards/margins": rewards[good].mean() - rewards[~good].mean()}  # fmt: skip
    assert {k: pytest.approx(v.item(), abs=1e-5) for k, v in want.items()} == {k: trainer._stats[k][0] for k in want}
