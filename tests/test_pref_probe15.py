"""Probe 15 of the preference stages against TRL 1.16: TR-DPO (TRL's sync_ref_model, ref_model_mixup_alpha,
ref_model_sync_steps) on a full fine-tune, refused with an adapter as TRL refuses it with a PEFT model; the reward
stage's eval num_tokens.

TRL runs on the same tiny Llama, rows and token ids as deltatune; the rows are test_align_probe11's."""

import warnings

import pytest
import torch
import trl
from datasets import Dataset
from test_align_probe11 import PAIRS
from test_dpo_probe12 import _lora
from tiny import save_tiny, tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainingArguments

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.data.preference import PairCollator
from deltatune.train.config import AlignArgs
from deltatune.train.dpo import DPOTrainer
from deltatune.train.reward import RewardTrainer

STEPS = dict(max_steps=3, logging_steps=1, learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def _tr_dpo(**keys) -> AlignArgs:
    """AlignArgs with TRL's TR-DPO keys (set on the instance: the trainers read them with TRL's defaults)."""
    align = AlignArgs(beta=0.3)
    for k, v in keys.items():
        setattr(align, k, v)
    return align


def _rows(trl_rows) -> list[dict]:
    """TRL's tokenized pairs as deltatune's prepared examples: the same ids, labels on the response."""
    out = []
    for r in trl_rows:
        p = r["prompt_ids"]
        sides = {}
        for s in ("chosen", "rejected"):
            ids = p + r[f"{s}_ids"]
            sides[s] = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(p) + r[f"{s}_ids"]}
        out.append(sides)
    return out


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _trl_dpo(base, tmp_path, **keys):
    args = trl.DPOConfig(str(tmp_path / "trl"), per_device_train_batch_size=2, bf16=False, beta=0.3, **keys, **STEPS)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base)
        trainer = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                                 processing_class=tokenizer())  # fmt: skip
        trainer.train()
    return trainer


def _our_dpo(base, tmp_path, rows, align):
    torch.manual_seed(0)
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.FullConfig())
    args = TrainingArguments(str(tmp_path / "dt"), per_device_train_batch_size=2, remove_unused_columns=False, **STEPS)
    trainer = DPOTrainer(model=model, args=args, align=align, train_dataset=rows, data_collator=PairCollator(0))
    trainer.train()
    return trainer


def test_tr_dpo_full_fine_tune_equals_trls_sync_ref_model(base, tmp_path):
    """A full fine-tune, 3 AdamW steps at lr 1e-2, the reference mixed halfway toward the policy after every step
    (alpha 0.5, tau 1): the three losses equal TRL's DPOTrainer's (sync_ref_model=True; TRL keeps a reference copy
    for a model that is not a PEFT model), max abs diff about 1e-6, where TRL's unsynced reference gives a third loss
    1e-3 off. HEAD refused the keys at parse and, given them, scored the adapter-off 'reference' of a full
    fine-tune, which is the policy itself: every loss log 2."""
    keys = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    theirs = _trl_dpo(base, tmp_path, **keys)
    want = _losses(theirs)
    ours = _our_dpo(base, tmp_path, _rows(theirs.train_dataset), _tr_dpo(**keys))
    got = _losses(ours)
    assert len(got) == len(want) == 3
    assert max(abs(a - b) for a, b in zip(want, got)) < 2e-5, (want, got)
    unsynced = _losses(_trl_dpo(base, tmp_path / "fixed"))
    assert abs(unsynced[2] - want[2]) > 5e-4  # (the mixing is what the two agree on)
    # the copy was mixed toward the policy: after the last step, ref = (ref + policy) / 2 differs from both
    name, p = next((n, p) for n, p in ours.model.named_parameters() if "q_proj" in n)
    ref = dict(ours.ref_model.named_parameters())[name]
    assert not ref.requires_grad and not ours.ref_model.training
    start = dict(dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.FullConfig()).named_parameters())
    assert (ref - p).abs().max() > 1e-4 and (ref - start[name]).abs().max() > 1e-4


def test_tr_dpo_refused_with_an_adapter_or_a_precomputed_reference(base, tmp_path):
    """TRL refuses sync_ref_model with a PEFT model (its reference is the adapter-off base, nothing to sync) and with
    precompute_ref_log_probs: one line naming the key each, nothing built. Off (TRL's default) the LoRA run keeps its
    adapter-off reference and no copy."""
    args = TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match="align.sync_ref_model .*method.name=lora.*TRL refuses"):
        DPOTrainer(model=_lora(base), args=args, align=_tr_dpo(sync_ref_model=True))
    full = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.FullConfig())
    with pytest.raises(ConfigError, match="align.precompute_ref"):
        DPOTrainer(model=full, args=args, align=_tr_dpo(sync_ref_model=True, precompute_ref=True))
    with pytest.raises(ConfigError, match="align.ref_model_sync_steps must be"):
        DPOTrainer(model=full, args=args, align=_tr_dpo(sync_ref_model=True, ref_model_sync_steps=0))
    assert DPOTrainer(model=_lora(base), args=args, align=AlignArgs()).ref_model is None


def test_reward_eval_logs_num_tokens_and_rewards_as_trl(base, tmp_path):
    """TRL's RewardTrainer logs num_tokens (the training tokens so far) and min/mean/max_reward in evaluation too:
    before training (0 tokens) and after 2 steps (80) deltatune's evaluate gives the same eval_num_tokens and, on the
    same ids (one eval batch), the same eval_loss and reward extremes. HEAD's evaluate had no eval_num_tokens."""
    from deltatune.train.reward import rm_metrics

    def model():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)

    keys = {**STEPS, "max_steps": 2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2}
    rows = Dataset.from_list([{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]}
                              for p in PAIRS])  # fmt: skip
    args = trl.RewardConfig(str(tmp_path / "trl"), bf16=False, **keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trl.RewardTrainer)(model=model(), args=args, train_dataset=rows, eval_dataset=rows,
                                                   processing_class=tokenizer())  # fmt: skip
        want = [theirs.evaluate(), theirs.train() and theirs.evaluate()]
    ours_rows = [{s: {"input_ids": r[f"{s}_ids"], "attention_mask": [1] * len(r[f"{s}_ids"])}
                  for s in ("chosen", "rejected")} for r in theirs.train_dataset]  # fmt: skip
    args = TrainingArguments(str(tmp_path / "dt"), remove_unused_columns=False, **keys)
    ours = RewardTrainer(model=dt.get_delta_model(model(), dt.FullConfig()), args=args, train_dataset=ours_rows,
                         eval_dataset=ours_rows, data_collator=PairCollator(0),
                         compute_metrics=rm_metrics)  # fmt: skip
    got = [ours.evaluate(), ours.train() and ours.evaluate()]
    assert [w["eval_num_tokens"] for w in want] == [g["eval_num_tokens"] for g in got] == [0.0, 80.0]
    for w, g in zip(want, got):
        for k in ("eval_loss", "eval_min_reward", "eval_mean_reward", "eval_max_reward", "eval_accuracy"):
            assert abs(w[k] - g[k]) < 1e-5, (k, w[k], g[k])


def test_orpo_nll_takes_the_prompt_as_trls_orpo_trainer(base, tmp_path):
    """TRL 1.16's ORPOTrainer (and the ORPO authors' code by default) takes its NLL over the chosen sequences' prompt
    and response tokens: with align.disable_prompt_loss false deltatune's whole loss (NLL included), every LoRA
    gradient and the nll stat equal TRL's on probe 14's prepared conversational batch. HEAD took the responses only
    (its loss 0.02 off here). True (the authors' flag) keeps the responses-only NLL: by hand, -sum of the chosen
    response log-probs / their token count."""
    from test_align_probe11 import ATOL, _grads
    from test_dpo_probe12 import _args, _same
    from test_pref_probe14 import _prepared, _trl

    trl_trainer = _trl(base, tmp_path, "orpo", 36, beta=0.2)
    batch = next(iter(trl_trainer.get_train_dataloader()))
    model = trl_trainer.model
    model.train()
    expected, metrics = trl_trainer.get_batch_loss_metrics(model, batch)
    expected.backward()
    want = _grads(model)
    _, ours = _prepared(base, tmp_path, "orpo", 36, {"beta": 0.2})
    trainer = ours.trainer_class(model=model, args=_args(tmp_path / "dt"))
    trainer.align.disable_prompt_loss = False  # (TRL's NLL: the prompt too)
    inputs = ours.collator(ours.train)
    got = trainer.compute_loss(model, inputs)
    got.backward()
    assert abs(got.item() - expected.item()) < ATOL * max(1.0, abs(expected.item())), (got.item(), expected.item())
    _same(want, _grads(model))
    assert trainer._stats["nll"][0] == pytest.approx(metrics["nll_loss"], abs=1e-5)
    # answers only: the NLL is the chosen responses' mean token NLL
    trainer.align.disable_prompt_loss = True
    trainer._stats.clear()
    with torch.no_grad():
        trainer.compute_loss(model, inputs)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    n = len(inputs["input_ids"]) // 2
    labels = inputs["labels"][:n, 1:]
    logp = torch.log_softmax(logits[:n, :-1].float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    by_hand = -(logp * (labels != -100)).sum() / (labels != -100).sum()
    assert trainer._stats["nll"][0] == pytest.approx(by_hand.item(), abs=1e-5)
    assert abs(by_hand.item() - metrics["nll_loss"]) > 1e-2


@pytest.mark.parametrize("stage", ["kto", "dpo"])
def test_raw_rows_train_the_tokenizers_closing_sep_as_trl(base, tmp_path, stage):
    """A BERT tokenizer (MiniLM's) puts [CLS] before and [SEP] after a text of its own accord: TRL 1.16's KTO and
    DPO trainers tokenize prompt + completion + EOS text whole and train everything after the prompt's ids, so an
    answer ends [SEP] [SEP], both trained, after a leading [CLS]. deltatune's data.template raw rows now have the same
    ids and labels; HEAD's had no [CLS] and one [SEP]."""
    import json

    from test_align_probe11 import ROWS

    from deltatune.train import build
    from deltatune.train.models import load_tokenizer
    from deltatune.train.table import prepare

    rows = ROWS if stage == "kto" else PAIRS
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": stage, "model": {"name_or_path": base}, "train": {"report_to": ["none"]},
                 "data": {"train": str(path), "max_length": 64, "template": "raw"},
                 "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    ours = prepare(cfg, load_tokenizer(base)).train
    config, trainer = (trl.KTOConfig, trl.KTOTrainer) if stage == "kto" else (trl.DPOConfig, trl.DPOTrainer)
    args = config(str(tmp_path / "trl"), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base)
        theirs = dt.trl_trainer(trainer)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                         processing_class=tokenizer())  # fmt: skip
    sides = ["completion"] if stage == "kto" else ["chosen", "rejected"]
    seen = 0
    for want, got in zip(theirs.train_dataset, ours, strict=True):
        for side in sides:
            mine = got if stage == "kto" else got[side]
            answer = want[f"{side}_ids"]
            assert mine["input_ids"] == want["prompt_ids"] + answer
            assert mine["labels"] == [-100] * len(want["prompt_ids"]) + answer
            assert answer[-2:] == [102, 102] and mine["input_ids"][0] == 101
            seen += 1
    assert seen == len(rows) * len(sides)


def test_tr_dpo_in_kto_equals_trls_sync_ref_model(base, tmp_path):
    """TRL's KTOTrainer takes sync_ref_model too: a full fine-tune on four raw rows (one batch), 3 AdamW steps at lr
    1e-2, alpha 0.5, tau 1. deltatune's KTO losses equal TRL's (max abs diff 2e-5: fp32 sums of the mismatched-pair
    estimate in another order), where TRL's unsynced reference is 0.18 off by the third step."""
    import json

    from test_align_probe11 import ROWS

    from deltatune.train import build
    from deltatune.train.kto import KTOTrainer
    from deltatune.train.models import load_tokenizer
    from deltatune.train.table import prepare

    keys = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    steps = {**STEPS, "per_device_train_batch_size": 4}
    want = {}
    for name, sync in (("synced", keys), ("fixed", {})):
        args = trl.KTOConfig(str(tmp_path / name), bf16=False, beta=0.3, **sync, **steps)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(base)
            theirs = dt.trl_trainer(trl.KTOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                                                    processing_class=tokenizer())  # fmt: skip
            theirs.train()
        want[name] = _losses(theirs)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = build({"stage": "kto", "model": {"name_or_path": base}, "train": {"report_to": ["none"]},
                 "align": {"beta": 0.3}, "data": {"train": str(path), "max_length": 64, "template": "raw"},
                 "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    prepared = prepare(cfg, load_tokenizer(base))
    for k, v in keys.items():
        setattr(cfg.align, k, v)
    torch.manual_seed(0)
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.FullConfig())
    args = TrainingArguments(str(tmp_path / "dt"), remove_unused_columns=False, **steps)
    ours = KTOTrainer(model=model, args=args, align=cfg.align, train_dataset=prepared.train,
                      data_collator=prepared.collator)  # fmt: skip
    ours.train()
    got = _losses(ours)
    assert len(got) == 3 and max(abs(a - b) for a, b in zip(want["synced"], got)) < 5e-5, (want, got)
    assert abs(want["fixed"][2] - want["synced"][2]) > 0.1


def _tr_dpo_recipe(base: str, data: str, out: str, stage: str) -> dict:
    return {"stage": stage, "model": {"name_or_path": base}, "method": {"name": "full"},
            "data": {"train": data, "max_length": 64, "template": "raw"},
            "align": {"beta": 0.3, "sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5},
            "train": {"batch_size": 2, "lr": 1e-2, "seed": 0, "max_steps": 4, "save_steps": 2, "logging_steps": 1,
                      "report_to": ["none"]},
            "output": {"dir": out}}  # fmt: skip


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_tr_dpo_resumed_run_equals_the_uninterrupted_one(base, tmp_path, stage):
    """A recipe run (full fine-tune, TR-DPO mixing every step) stopped after checkpoint-2 and resumed with --resume
    logs the uninterrupted run's losses and ends with its weights: each checkpoint holds the synced reference copy
    (sync_ref_model.safetensors), which --resume loads (before: rebuilt from the start, losses 0.455 vs 0.829)."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file
    from test_align_probe11 import ROWS

    from deltatune.train import build
    from deltatune.train.run import train

    rows = PAIRS * 4 if stage == "dpo" else ROWS * 2
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    train(build(_tr_dpo_recipe(base, str(data), whole, stage)))
    assert "sync_ref_model.safetensors" in os.listdir(os.path.join(whole, "checkpoint-2"))
    shutil.copytree(os.path.join(whole, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    shutil.copy(os.path.join(whole, "run.yaml"), resumed)
    shutil.copy(os.path.join(whole, "log_history.jsonl"), resumed)
    train(build(_tr_dpo_recipe(base, str(data), resumed, stage)), resume=True)

    def losses(folder: str) -> list[float]:
        with open(os.path.join(folder, "log_history.jsonl")) as fh:
            return [h["loss"] for h in map(json.loads, fh) if "loss" in h]

    assert len(losses(whole)) == 4
    assert losses(resumed) == pytest.approx(losses(whole), abs=1e-5)
    files = [f for f in os.listdir(whole) if f.endswith(".safetensors")]
    assert files
    for f in files:
        a, b = load_file(os.path.join(whole, f)), load_file(os.path.join(resumed, f))
        assert a.keys() == b.keys()
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_tr_dpo_resume_from_a_checkpoint_without_the_reference_copy_is_one_line(base, tmp_path):
    """A checkpoint past the first mixing that lacks the reference copy (written before it was kept, or with
    save_only_model): --resume refuses in one line naming the checkpoint, before training."""
    import json
    import os
    import shutil

    from deltatune.train import build
    from deltatune.train.run import train

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 4))
    out = str(tmp_path / "run")
    recipe = _tr_dpo_recipe(base, str(data), out, "dpo")
    train(build(recipe))
    for name in os.listdir(out):  # stopped after checkpoint-2
        if name not in ("checkpoint-2", "run.yaml", "log_history.jsonl"):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.remove(os.path.join(out, "checkpoint-2", "sync_ref_model.safetensors"))
    with pytest.raises(ConfigError, match=r"checkpoint-2.*sync_ref_model\.safetensors"):
        train(build(recipe), resume=True)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_tr_dpo_refused_with_lora_training_biases(tmp_path, bias):
    """LoRA with bias all or lora_only trains the base's biases, yet its reference would be a LoRA model mixed
    lora_A and lora_B apart: refused in one line as every adapter (TR-DPO is for full, freeze and bitfit)."""
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    lora = dt.LoraConfig(r=4, target_modules=["c_attn"], bias=bias)
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(gpt2), lora)
    args = TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match="align.sync_ref_model .*method.name=lora.*full, freeze"):
        DPOTrainer(model=model, args=args, align=_tr_dpo(sync_ref_model=True))
