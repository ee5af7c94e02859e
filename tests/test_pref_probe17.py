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


@pytest.mark.parametrize("order", ["dudu", "udd"])
def test_kto_eval_reports_trls_eval_statistics(base, tmp_path, order):
    """Unpaired rows paired in a block of train.batch_size 4 and evaluated in batches of 2: TRL's KTOTrainer.evaluate
    reports eval_kl, eval_entropy, eval_logps/*, eval_logits/* (the mean of its batches'); deltatune's now too, equal.
    HEAD reported the rewards only. "dudu" (desirable, not, desirable, not): equal batches, where eval_rewards/* (over
    all the rows in deltatune's, a mean of batch means in TRL's) agree too; "udd" (a batch of 2, then 1): eval_rewards/*
    differ (margins -0.0559 TRL's, -0.0653 deltatune's over the rows, as dpo's: test_align_probe11), so only the new
    statistics are compared, which agree on unequal batches too."""
    kinds = {True: iter([r for r in KTO_ROWS if r[2]]), False: iter([r for r in KTO_ROWS if not r[2]])}
    picked = [next(kinds[c == "d"]) for c in order]
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
             "label": good} for p, c, good in picked]  # fmt: skip
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
    rewards = {k for k in want if k.startswith("eval_rewards/")}
    names = _compare(want, got, rewards if order == "udd" else set())
    assert {"eval_kl", "eval_entropy", "eval_logps/chosen", "eval_logits/rejected"} <= set(names)
    assert want["eval_kl"] > 0
    if order == "udd":  # (what the skip leaves out: a mean of batch means against the mean over all the rows)
        assert got["eval_rewards/margins"] != pytest.approx(want["eval_rewards/margins"], abs=1e-3)
    else:
        assert "eval_rewards/margins" in names


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


def test_eval_statistics_are_every_process_s(monkeypatch):
    """Under DDP each process evaluates its own batches: each averaged its own (2 processes, 3 pairs in batches of 1:
    eval_logps/chosen -159.54 on rank 0, -149.26 on rank 1, so a metric_for_best_model naming it could keep another
    best checkpoint on each). TRL gathers each batch's values across the processes before the mean; gather_stats now
    gathers every process's batch values (gather_object, stubbed here as two ranks'), the same on every process."""
    from types import SimpleNamespace

    import accelerate.utils

    from deltatune.train.pairs import gather_stats

    mine, theirs = {"logps/chosen": [-1.0, -2.0], "kl": [0.5]}, {"logps/chosen": [-4.0, -5.0], "kl": [0.25]}
    calls = []

    def gather_object(obj):  # each process's list, concatenated in rank order (accelerate's all_gather_object)
        calls.append(obj)
        return [*obj, theirs]

    monkeypatch.setattr(accelerate.utils, "gather_object", gather_object)
    got = gather_stats(mine, SimpleNamespace(num_processes=2))
    assert got == {"logps/chosen": [-1.0, -2.0, -4.0, -5.0], "kl": [0.5, 0.25]} and calls == [[mine]]
    assert gather_stats(mine, SimpleNamespace(num_processes=1)) is mine and len(calls) == 1  # (one process: no call)


def test_deltatune_eval_reports_no_training_tokens(base, tmp_path):
    """A finished dpo run's evaluation during training reports TRL's eval_num_tokens (the training tokens so far);
    ``deltatune eval`` (and --compare's start) trained nothing: HEAD reported eval_num_tokens 0.0 and
    eval_num_tokens_before 0.0; now neither, the other statistics kept."""
    from deltatune.train import train
    from deltatune.train.evaluation import evaluate

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CUT_CONVERSATIONAL))
    run = tmp_path / "run"
    train(build({"stage": "dpo", "model": {"name_or_path": base}, "data": {"train": str(path), "eval": str(path),
                 "max_length": 64}, "train": {"report_to": ["none"], "max_steps": 1, "batch_size": 3},
                 "output": {"dir": str(run)}}))  # fmt: skip
    trained = json.loads((run / "metrics.json").read_text())
    assert trained.get("eval_num_tokens", 0) > 0  # (kept in the run's own evaluation)
    got = evaluate(str(run), compare=True)
    assert "eval_logps/chosen" in got and "eval_logps/chosen_before" in got
    assert "eval_num_tokens" not in got and "eval_num_tokens_before" not in got


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_a_best_metric_is_no_token_count(stage):
    """eval_num_tokens is the training tokens so far: it only grows (and restarts at 0 on --resume, as TRL's), so the
    best checkpoint by it is the last; train.metric_for_best_model naming it is refused in one line, which names the
    statistics it may name."""
    from deltatune.config import ConfigError
    from deltatune.train.config_train import check_best_metric

    raw = {"stage": stage, "data": {"eval": "e.jsonl"}, "train": {"metric_for_best_model": "eval_num_tokens"}}
    with pytest.raises(ConfigError, match="eval_num_tokens.*it reports loss, .*logps/chosen"):
        check_best_metric(build(raw), {"dpo": "eval_accuracy", "kto": "eval_margin"}[stage])


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_a_best_metric_may_name_a_moe_base_s_aux_loss(stage, tmp_path):
    """dpo and kto on a Mixture-of-Experts base (Mixtral's config: router_aux_loss_coef 0.001) add its load-balancing
    loss, and their evaluations report eval_aux_loss (as TRL's): train.metric_for_best_model naming it is taken there;
    on a base without one (Llama) it is refused, as before."""
    from transformers import LlamaConfig, MixtralConfig

    from deltatune.config import ConfigError
    from deltatune.train.config_train import check_best_metric
    from deltatune.train.run import moe_base

    headline = {"dpo": "eval_accuracy", "kto": "eval_margin"}[stage]
    for name, config in (("moe", MixtralConfig()), ("dense", LlamaConfig())):
        config.save_pretrained(str(tmp_path / name))
    raw = {"stage": stage, "data": {"eval": "e.jsonl"}, "train": {"metric_for_best_model": "eval_aux_loss"}}
    check_best_metric(build({**raw, "model": {"name_or_path": str(tmp_path / "moe")}}), headline, moe_base)
    with pytest.raises(ConfigError, match="eval_aux_loss"):
        check_best_metric(build({**raw, "model": {"name_or_path": str(tmp_path / "dense")}}), headline, moe_base)
