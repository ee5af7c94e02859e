"""Probe 17 of the preference stages against TRL 1.16: what an evaluation reports. TRL's DPO, KTO, CPO and ORPO
trainers log their training names while evaluating too (eval_logps/chosen, eval_logits/*, eval_entropy,
eval_mean_token_accuracy, eval_kl, eval_nll_loss, eval_log_odds_*: the mean of the eval batches' values); deltatune's
evaluations reported the rewards only.

TRL runs on the same tiny Llama, LoRA (not zero) and rows as deltatune; the helpers are test_pref_probe14's."""

import json
import warnings

import pytest
import trl
from datasets import Dataset
from test_dpo_probe12 import CUT_CONVERSATIONAL, _lora
from test_pref_probe14 import KTO_ROWS, _prepared, _trl
from tiny import save_tiny
from transformers import AutoModelForCausalLM, TrainingArguments

import deltatune as dt
from deltatune.train import build
from deltatune.train.models import load_tokenizer
from deltatune.train.table import prepare

# the names TRL's evaluations add that are no statistic of the rows
_NOT_STATS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time",
              "epoch"}  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def _eval_args(path, batch: int) -> TrainingArguments:
    return TrainingArguments(str(path), report_to=[], use_cpu=True, per_device_eval_batch_size=batch,
                             remove_unused_columns=False)  # fmt: skip


def _compare(theirs: dict, ours: dict, skip: set[str] = frozenset()) -> list[str]:
    """Every statistic TRL's evaluation reports is in deltatune's, with its value; the names compared."""
    names = sorted(set(theirs) - _NOT_STATS - skip)
    missing = [k for k in names if k not in ours]
    assert not missing, missing
    for key in names:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4, rel=1e-5), key
    return names


def test_dpo_eval_reports_trls_eval_statistics(base, tmp_path):
    """Three conversational pairs evaluated in batches of 2 and 1: TRL's DPOTrainer.evaluate reports eval_logps/*,
    eval_logits/*, eval_entropy and eval_mean_token_accuracy (each the mean of its batches' values); deltatune's now
    too, equal. HEAD reported none of them (its eval_rewards/*, over all pairs, are left out here: they are a mean of
    batch means in TRL's, equal only for equal batches, test_align_probe11)."""
    model = _lora(base)
    args = trl.DPOConfig(str(tmp_path / "trl"), per_device_eval_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                         beta=0.3, max_length=64)  # fmt: skip
    data = Dataset.from_list(CUT_CONVERSATIONAL)
    theirs = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=data, processing_class=load_tokenizer(base),
                                            ref_model=AutoModelForCausalLM.from_pretrained(base))  # fmt: skip
    model.eval()
    want = theirs.evaluate(eval_dataset=theirs.train_dataset)
    _, prepared = _prepared(base, tmp_path, "dpo", 64, {"beta": 0.3})
    ours = prepared.trainer_class(model=model, args=_eval_args(tmp_path / "dt", 2), data_collator=prepared.collator,
                                  compute_metrics=prepared.compute_metrics)  # fmt: skip
    got = ours.evaluate(eval_dataset=prepared.train)
    names = _compare(want, got, {k for k in want if k.startswith("eval_rewards/")})
    assert {"eval_logps/chosen", "eval_logits/rejected", "eval_entropy", "eval_mean_token_accuracy"} <= set(names)
    assert not ours._stats  # (the training log's means are not touched)


@pytest.mark.parametrize("stage, kwargs", [("orpo", {"beta": 0.2}), ("cpo", {"beta": 0.3, "loss_type": "sigmoid"}),
                                           ("simpo", {"beta": 2.0, "loss_type": "simpo", "cpo_alpha": 0.0})])  # fmt: skip
def test_cpo_orpo_simpo_eval_reports_trls_eval_statistics(base, tmp_path, stage, kwargs):
    """The same pairs in one batch of 3: TRL's CPO and ORPO trainers' evaluations report eval_logps/*, eval_logits/*,
    eval_nll_loss (and ORPO's eval_log_odds_ratio, eval_log_odds_chosen); deltatune's now too, equal (ORPO's
    eval_logits/* aside: TRL's ORPO averages the prompt and padding positions too, orpo.py; and simpo's nll_loss,
    which TRL logs as 0 where cpo_alpha is 0). HEAD reported the rewards
    only; its ORPO logged TRL's nll_loss as nll alone."""
    theirs = _trl(base, tmp_path, stage, 64, per_device_eval_batch_size=3, **kwargs)
    theirs.model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = theirs.evaluate(eval_dataset=theirs.train_dataset)
    align = {k: v for k, v in kwargs.items() if stage != "orpo" or k != "loss_type"}
    _, prepared = _prepared(base, tmp_path, stage, 64, align)
    ours = prepared.trainer_class(model=theirs.model, args=_eval_args(tmp_path / "dt", 3),
                                  data_collator=prepared.collator, compute_metrics=prepared.compute_metrics)  # fmt: skip
    got = ours.evaluate(eval_dataset=prepared.train)
    # (TRL's ORPO logits: over the prompts and padding too; TRL's nll_loss is 0 where cpo_alpha is 0: simpo.py)
    skip = {"orpo": {"eval_logits/chosen", "eval_logits/rejected"}, "simpo": {"eval_nll_loss"}}.get(stage, set())
    names = _compare(want, got, skip)
    assert {"eval_logps/chosen", "eval_logits/chosen" if stage != "orpo" else "eval_nll_loss"} <= set(names)
    if stage == "orpo":
        assert {"eval_log_odds_ratio", "eval_log_odds_chosen"} <= set(names)


def test_kto_eval_reports_trls_eval_statistics(base, tmp_path):
    """Four unpaired rows (desirable, not, desirable, not) paired in a block of train.batch_size 4 and evaluated in
    batches of 2: TRL's KTOTrainer.evaluate reports eval_kl, eval_entropy, eval_logps/*, eval_logits/* (the mean of
    its batches'); deltatune's now too, equal. HEAD reported the rewards only."""
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
             "label": good} for p, c, good in KTO_ROWS]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": "kto", "model": {"name_or_path": base}, "train": {"report_to": ["none"], "batch_size": 4},
                 "data": {"train": str(path), "eval": str(path)}, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    prepared = prepare(cfg, load_tokenizer(base))
    model = _lora(base)
    args = trl.KTOConfig(str(tmp_path / "trl"), per_device_train_batch_size=4, per_device_eval_batch_size=2,
                         report_to=[], use_cpu=True, bf16=False)  # fmt: skip
    theirs = dt.trl_trainer(trl.KTOTrainer)(model=model, args=args, processing_class=load_tokenizer(base),
                                            train_dataset=Dataset.from_list(rows),
                                            ref_model=AutoModelForCausalLM.from_pretrained(base))  # fmt: skip
    model.eval()
    want = theirs.evaluate(eval_dataset=theirs.train_dataset)
    ours = prepared.trainer_class(model=model, args=_eval_args(tmp_path / "dt", 2), data_collator=prepared.collator,
                                  compute_metrics=prepared.compute_metrics)  # fmt: skip
    got = ours.evaluate(eval_dataset=prepared.eval)
    names = _compare(want, got)
    assert {"eval_kl", "eval_entropy", "eval_logps/chosen", "eval_logits/rejected", "eval_rewards/margins"} <= set(
        names
    )
    assert want["eval_kl"] > 0


def test_eval_statistics_stay_out_of_the_training_log(base, tmp_path):
    """An evaluation in the middle of training adds nothing to the training log's means (nor takes from them), and
    reports TRL's eval_num_tokens, the training tokens so far."""
    _, prepared = _prepared(base, tmp_path, "dpo", 64)
    model = _lora(base)
    ours = prepared.trainer_class(model=model, args=_eval_args(tmp_path / "dt", 3), data_collator=prepared.collator,
                                  compute_metrics=prepared.compute_metrics)  # fmt: skip
    model.train()
    batch = prepared.collator(prepared.train)
    ours.compute_loss(model, batch)
    before = {k: list(v) for k, v in ours._stats.items()}
    got = ours.evaluate(eval_dataset=prepared.train)
    assert {k: list(v) for k, v in ours._stats.items()} == before and "eval_logps/chosen" in got
    # eval_num_tokens: the training tokens so far (both sides of the three pairs), the evaluation's not counted (TRL's)
    assert got["eval_num_tokens"] == ours.train_tokens == int(batch["attention_mask"].sum()) > 0


def test_kto_balance_warning_names_the_undesirable_weight_too():
    """10 desirable and 2 undesirable rows at weights 1, 1: lambda_D n_D / (lambda_U n_U) = 5. TRL's KTOTrainer advises
    desirable_weight in [0.2, 0.27] or undesirable_weight in [3.76, 5.0] (its 1.33 for 4/3); deltatune named the first
    only, now both: undesirable_weight 3.75 gives 10 / 7.5 = 4/3 and 5 gives 1, each in [1, 4/3] (no warning)."""
    from deltatune.train.config import AlignArgs
    from deltatune.train.kto import balance_note

    note = balance_note(10, 2, AlignArgs(), "t.jsonl")
    assert "align.desirable_weight in [0.2, 0.267]" in note and "align.undesirable_weight in [3.75, 5]" in note
    for weight in (3.75, 5.0):
        assert balance_note(10, 2, AlignArgs(undesirable_weight=weight), "t.jsonl") is None
    assert balance_note(10, 2, AlignArgs(undesirable_weight=3.7), "t.jsonl") is not None


@pytest.mark.parametrize("stage, headline, metric", [("dpo", "eval_accuracy", "eval_logps/chosen"),
                                                     ("orpo", "eval_accuracy", "eval_nll_loss"),
                                                     ("simpo", "eval_accuracy", "logits/chosen"),
                                                     ("kto", "eval_margin", "eval_kl")])  # fmt: skip
def test_a_best_metric_may_name_an_eval_statistic(stage, headline, metric):
    """train.metric_for_best_model naming one of the statistics the evaluations now report (TRL's eval_logps/chosen,
    eval_nll_loss, eval_kl, ...) is taken; check_best_metric knows compute_metrics' names only and refuses it."""
    from deltatune.train.config_train import check_best_metric

    raw = {"stage": stage, "data": {"eval": "e.jsonl"}, "train": {"metric_for_best_model": metric}}
    check_best_metric(build(raw), headline)
