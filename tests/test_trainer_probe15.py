"""Probe 15 of the training loop against transformers 5.25's Trainer: train_sampling_strategy (transformers 4's
group_by_length) and a report_to the Trainer refuses."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer_probe11 import files, recipe  # noqa: F401  (files: the module's fixture, a tiny llama and rows)
from test_trainer_probe14 import _quick, reference  # noqa: F401  (_quick: probe14's, no plots, frozen gc)
from transformers.trainer_pt_utils import LengthGroupedSampler

from deltatune.config import ConfigError
from deltatune.train import build, train


def _rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_length_stages_are_those_whose_rows_the_trainers_sampler_counts(files, tmp_path):  # noqa: F811
    """BY_LENGTH (where train_sampling_strategy group_by_length is taken) against each stage's prepared rows: the
    Trainer's LengthGroupedSampler counts a row of pt, sft, cls, tag, seq2seq and kto by its input_ids; a pair row
    (rm, dpo, and orpo, simpo, cpo's) holds its tokens under chosen and rejected, the Trainer's ValueError."""
    from deltatune.train.config_train import BY_LENGTH
    from deltatune.train.models import load_processor
    from deltatune.train.table import prepare

    tok = load_processor(files["model"], "sft")
    pairs = _rows(tmp_path / "p.jsonl", [{"prompt": "a b", "chosen": "c d e", "rejected": "f"}] * 2)
    data = {
        "pt": _rows(tmp_path / "t.jsonl", [{"text": "a b c d " * 20}]),
        "sft": files["sft"],
        "cls": _rows(tmp_path / "c.jsonl", [{"text": "a b c", "label": "x"}, {"text": "a", "label": "y"}]),
        "tag": _rows(tmp_path / "g.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["B-X", "O"]}] * 2),
        "seq2seq": _rows(tmp_path / "s.jsonl", [{"source": "a b c", "target": "d"}, {"source": "a", "target": "e f"}]),
        "kto": _rows(tmp_path / "k.jsonl", [{"prompt": "a", "completion": "b c", "label": True},
                                            {"prompt": "d e", "completion": "f", "label": False}]),
        "rm": pairs, "dpo": pairs,
    }  # fmt: skip
    counted = []
    for stage, path in data.items():
        prepared = prepare(build({"stage": stage, "data": {"train": path, "max_length": 32}}), tok)
        try:
            lengths = LengthGroupedSampler(2, dataset=prepared.train).lengths
        except ValueError as exc:
            assert "input_ids" in str(exc), (stage, exc)
            continue
        assert lengths == [len(prepared.train[i]["input_ids"]) for i in range(len(prepared.train))]
        counted.append(stage)
    assert counted == [*BY_LENGTH, "kto"]


def _varied(files, tmp_path, n: int) -> dict:  # noqa: F811
    """``files`` with n sft rows of 4 to 23 words (max_length 256: none cut, lengths vary)."""
    import random

    from tiny import WORDS

    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = [{"instruction": words(3), "output": words(rng.randint(1, 20))} for _ in range(n)]
    return {**files, "sft": _rows(tmp_path / "varied.jsonl", rows)}


def test_group_by_length_batches_the_rows_as_the_trainer(files, tmp_path):  # noqa: F811
    """train_sampling_strategy group_by_length (transformers 4's group_by_length, refused as unknown): the run trains on
    the Trainer's LengthGroupedSampler order for the same seed, so its adapter is the Trainer's; that order is not the
    random one (the test can tell). 130 rows of varied length, more than the sampler's mega-batch of 50 x batch, so
    the order also depends on how the rows are split into mega-batches (the seed's permutation)."""
    from safetensors.torch import load_file

    varied = _varied(files, tmp_path, 130)
    raw = recipe(varied, tmp_path / "ours", max_steps=2, train_sampling_strategy="group_by_length", grad_accum=1)
    raw["data"]["max_length"] = 256
    train(build(raw))
    adapter = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    trainer, ref = reference(build(raw), tmp_path / "ref", train_sampling_strategy="group_by_length")
    diff = max((adapter[k] - ref[k]).abs().max().item() for k in ref)
    assert diff < 1e-5, diff
    lengths = [len(row["input_ids"]) for row in trainer.train_dataset]
    assert len(lengths) > 50 * 2 and len(set(lengths)) > 10  # more than one mega-batch, lengths that vary
    grouped = list(trainer._get_train_sampler())
    trainer.args.train_sampling_strategy = "random"
    assert grouped != list(trainer._get_train_sampler())


def _cut_at_step_10(files, tmp_path, keys: dict):  # noqa: F811
    """A group_by_length run trained whole (8 rows: 8 steps an epoch), and a folder holding its checkpoint-10 and
    run.yaml alone, as a run cut there leaves it: (whole, cut)."""
    import shutil

    whole, cut = tmp_path / "whole", tmp_path / "resumed"
    train(build(recipe(files, whole, train_sampling_strategy="group_by_length", **keys)))
    cut.mkdir()
    shutil.copytree(whole / "checkpoint-10", cut / "checkpoint-10")
    shutil.copy(whole / "run.yaml", cut / "run.yaml")
    return whole, cut


def test_a_group_by_length_run_resumed_past_its_first_epoch_trains_on_the_same_rows(files, tmp_path):  # noqa: F811
    """The Trainer's LengthGroupedSampler draws each epoch's order from torch's global RNG as the epoch starts: a run
    resumed mid-epoch past epoch 0 drew from the state the resume left, another order (the plain Trainer's flaw too;
    adapter ~1e-2 off). The epoch's starting state is in each checkpoint now: the resumed run's adapter is the
    uninterrupted run's, exactly."""
    from safetensors.torch import load_file

    keys = {"batch_size": 1, "grad_accum": 1, "max_steps": 12, "save_steps": 10, "logging_steps": 4}
    whole, resumed = _cut_at_step_10(files, tmp_path, keys)
    train(build(recipe(files, resumed, train_sampling_strategy="group_by_length", **keys)), resume=True)
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize(
    ("stage", "keys", "says"),
    [
        ("sft", {"train_sampling_strategy": "by_length"}, r"^train.train_sampling_strategy must be one of random, "
         r"sequential, group_by_length, batch_rebalance, got 'by_length'$"),
        ("dpo", {"train_sampling_strategy": "group_by_length"}, r"^train.train_sampling_strategy group_by_length "
         r"groups rows by their input_ids' length, and stage dpo's rows have none \(the Trainer's ValueError, as "
         r"under TRL\); stages: pt, sft, cls, tag, seq2seq, kto$"),
        ("image_cls", {"train_sampling_strategy": "batch_rebalance"}, r"^train.train_sampling_strategy "
         r"batch_rebalance groups rows by their input_ids' length, and stage image_cls's rows have none"),
        ("grpo", {"train_sampling_strategy": "sequential"}, r"^train.train_sampling_strategy: grpo's own loop draws "
         r"its prompts by train.seed \(TRL's GRPOConfig.shuffle_dataset: false, which deltatune's loop does not "
         r"take\); drop it$"),
        ("sft", {"group_by_length": True}, r"^unknown key 'train.group_by_length' in recipe: group_by_length "
         r"\(TrainingArguments'\) is not a recipe key: transformers 5 names it train_sampling_strategy: set "
         r"train.train_sampling_strategy: group_by_length$"),
        ("sft", {"length_column_name": "n"}, r"^unknown key 'train.length_column_name' in recipe: length_column_name "
         r"\(TrainingArguments'\) is not a recipe key: each row's length is counted from its input_ids"),
    ],
)  # fmt: skip
def test_a_sampling_strategy_a_stage_cannot_take_is_one_line(stage, keys, says):
    with pytest.raises(ConfigError, match=says):
        build({"stage": stage, "data": {"train": "t.jsonl"}, "train": keys})


def test_the_sampling_strategies_a_stage_takes_pass():
    for stage, keys in (("sft", {}), ("cls", {}), ("dpo", {}), ("grpo", {}), ("dpo", {"loss_type": "sigmoid"})):
        for strategy in ("random", "sequential", "group_by_length"):
            if strategy != "random" and stage == "grpo" or strategy == "group_by_length" and stage == "dpo":
                continue
            assert build({"stage": stage, "train": {"train_sampling_strategy": strategy}, "align": keys})
    for loss in ("apo_zero_unpaired", "kto"):  # (kto: its KL pairs are its batch's, or its block's; any order)
        kto = {"stage": "kto", "align": {"loss_type": loss}, "train": {"train_sampling_strategy": "group_by_length"}}
        assert build(kto).train.train_sampling_strategy == "group_by_length"


def test_kto_with_its_kl_term_trains_under_group_by_length(files, tmp_path):  # noqa: F811
    """Stage kto with align.loss_type kto was refused under group_by_length, "as TRL's KTOTrainer" (whose rule is
    another: sequential only for its KL losses, and its group_by_length fails on its rows). deltatune pairs each row's
    KL completion with the row before it in its batch, so a grouped batch's pairs are mismatched as a random one's:
    the run trains on the Trainer's grouped order (each batch a mega-batch, sorted) with a finite KL term."""
    from deltatune.train.kto import KTOCollator

    rows = [{"prompt": f"p{i} " * (1 + i % 3), "completion": "a b " * (1 + i % 5), "label": i % 2 == 0}
            for i in range(12)]  # fmt: skip
    raw = {"stage": "kto", "model": {"name_or_path": files["model"]},
           "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "data": {"train": _rows(tmp_path / "k.jsonl", rows), "max_length": 64},
           "train": {"batch_size": 3, "max_steps": 2, "lr": 1e-2, "seed": 3, "logging_steps": 1,
                     "report_to": ["none"], "train_sampling_strategy": "group_by_length"},
           "output": {"dir": str(tmp_path / "kto")}}  # fmt: skip
    batches = []
    call = KTOCollator.__call__

    def seen(self, examples):
        batches.append([(e["input_ids"][: e["n_prompt"]], e["input_ids"][e["n_prompt"] :]) for e in examples])
        return call(self, examples)

    KTOCollator.__call__ = seen
    try:
        train(build(raw))
    finally:
        KTOCollator.__call__ = call
    log = [json.loads(line) for line in (tmp_path / "kto" / "log_history.jsonl").read_text().splitlines()]
    kl = [h["kl"] for h in log if "kl" in h]
    assert len(kl) == 2 and all(k == k for k in kl), log  # (finite: nan != nan)
    lengths = [[len(p) + len(c) for p, c in batch] for batch in batches[:2]]  # (mega-batches of 12 // 4 rows here)
    assert all(n == sorted(n, reverse=True) and len(set(n)) > 1 for n in lengths), (
        lengths
    )  # each sorted, longest first


@pytest.mark.parametrize(
    ("report_to", "says"),
    [
        (["tensorboard", "all"], r"^train.report_to \['tensorboard', 'all'\]: all stands alone \(none: no logger; "
         r"all: every one installed\)$"),
        (["none", "tensorboard"], r"^train.report_to \['none', 'tensorboard'\]: none stands alone"),
        (["tensorboard", "tensorboard"], r"^train.report_to \['tensorboard', 'tensorboard'\]: each logger once"),
    ],
)  # fmt: skip
def test_a_report_to_the_trainer_refuses_is_one_line_and_nothing_is_written(
    files,  # noqa: F811
    tmp_path,
    monkeypatch,
    report_to,
    says,
):
    """The Trainer refuses all or none beside a logger ("all is not supported", a ValueError once the model had
    loaded: deltatune dropped none and passed the rest on), and writes a duplicate's events twice: one line naming
    train.report_to before the model loads, and no output folder."""
    import deltatune.train.run as run

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(run, "start_model", loaded)
    raw = recipe(files, tmp_path / "out", report_to=report_to)
    with pytest.raises(ConfigError, match=says):
        train(build(raw))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("keys", "args"),
    [({"weight_decay": 0.5, "lr": 5e-2}, {"weight_decay": 0.5, "learning_rate": 5e-2}),
     ({"optim": "adafactor"}, {"optim": "adafactor"}),
     ({"max_grad_norm": 0.05}, {"max_grad_norm": 0.05})],
    ids=["weight_decay", "adafactor", "clipped"],
)  # fmt: skip
def test_more_trainer_keys_train_as_the_trainer(files, tmp_path, keys, args):  # noqa: F811
    """Probed, not fixed (a regression check): weight decay (the Trainer's groups: no decay on biases and norms),
    Adafactor and a clipping norm that bites give the Trainer's adapter (max abs diff ~1e-7); the Trainer without the
    key would not (~1e-3 to 4e-2)."""
    from safetensors.torch import load_file

    raw = recipe(files, tmp_path / "ours", **keys)
    train(build(raw))
    adapter = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    _, ref = reference(build(raw), tmp_path / "ref", **args)
    _, plain = reference(build(raw), tmp_path / "plain")
    diff = max((adapter[k] - ref[k]).abs().max().item() for k in ref)
    moved = max((plain[k] - ref[k]).abs().max().item() for k in ref)
    assert diff < 1e-5 < moved, (diff, moved)


def test_fsdp_config_without_fsdp_is_one_line(files, tmp_path, monkeypatch):  # noqa: F811
    """The Trainer reads fsdp_config only when fsdp is set (TrainingArguments keeps it and nothing reads it): a recipe's
    train.fsdp_config without train.fsdp trained as plain DDP, silently. One line as a training run starts, before
    the model loads and before any folder is made; with fsdp it passes."""
    import deltatune.train.run as run

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(run, "start_model", loaded)
    with pytest.raises(ConfigError, match=r"^train.fsdp_config is read only with train.fsdp \(e.g. 'full_shard "
                       r"auto_wrap'\), which is empty: set train.fsdp, or drop train.fsdp_config$"):  # fmt: skip
        train(build(recipe(files, tmp_path / "out", fsdp_config={"use_orig_params": True})))
    assert not (tmp_path / "out").exists()
    cfg = build({"train": {"fsdp": "full_shard auto_wrap", "fsdp_config": {"use_orig_params": True}}})
    assert cfg.train.fsdp_config == {"use_orig_params": True}


def test_a_finished_run_from_before_with_fsdp_config_and_no_fsdp_still_loads(files, tmp_path):  # noqa: F811
    """A run.yaml written before the check (fsdp_config, fsdp empty) is read by build() for deltatune eval and
    load_adapter_model (generate, merge, serve, chat): the check ran in build() and all of them refused the run."""
    import yaml

    from deltatune.train.evaluation import evaluate

    out = tmp_path / "old"
    train(build(recipe(files, out, max_steps=1)))
    saved = yaml.safe_load((out / "run.yaml").read_text())
    saved["train"].update(fsdp="", fsdp_config={"use_orig_params": True})
    (out / "run.yaml").write_text(yaml.safe_dump(saved))
    assert build(saved).train.fsdp_config == {"use_orig_params": True}
    assert evaluate(str(out), data=files["sft"])["eval_loss"] > 0


@pytest.mark.parametrize(
    ("keys", "args"),
    [({"optim": "sgd", "optim_args": {"momentum": 0.9, "nesterov": True}},
      {"optim": "sgd", "optim_args": "momentum=0.9,nesterov=true"}),
     ({"optim": "rmsprop", "optim_args": "momentum=0.5, centered=true", "lr": 1e-3},
      {"optim": "rmsprop", "optim_args": "momentum=0.5,centered=true", "learning_rate": 1e-3}),
     ({"optim": "sgd", "optim_args": "momentum=0.9,nesterov=True"},
      {"optim": "sgd", "optim_args": "momentum=0.9,nesterov=True"})],
    ids=["sgd_momentum", "rmsprop_centered", "sgd_nesterov_True"],
)  # fmt: skip
def test_optim_args_train_as_the_trainers(files, tmp_path, keys, args):  # noqa: F811
    """train.optim_args (TrainingArguments' "k=v,k=v"; a mapping too) was refused as not a recipe key, yet the
    Trainer reads it (sgd's momentum and nesterov, rmsprop's momentum and centered, ...): the adapter is the Trainer's
    with it, and the Trainer's without it is another."""
    from safetensors.torch import load_file

    raw = recipe(files, tmp_path / "ours", max_steps=3, grad_accum=1, **keys)
    train(build(raw))
    adapter = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    _, ref = reference(build(raw), tmp_path / "ref", **args)
    _, plain = reference(build(raw), tmp_path / "plain", **{k: v for k, v in args.items() if k != "optim_args"})
    diff = max((adapter[k] - ref[k]).abs().max().item() for k in ref)
    moved = max((plain[k] - ref[k]).abs().max().item() for k in ref)
    assert diff < 1e-6 < moved, (diff, moved)


@pytest.mark.parametrize(
    ("stage", "keys", "says"),
    [("sft", {"optim": "sgd", "optim_args": {"momentun": 0.9}}, r"^train.optim_args: 'momentun' is not read by "
      r"train.optim sgd's optimizer \(the Trainer would ignore it\); it reads momentum, dampening, nesterov$"),
     ("sft", {"optim_args": "eps=1e-6"}, r"^train.optim_args: 'eps' is not read by train.optim adamw_torch_fused's "
      r"optimizer \(the Trainer would ignore it\); it reads none$"),
     ("sft", {"optim": "sgd", "optim_args": "momentum=0.9,weight_decay=0.1"}, r"^train.optim_args: weight_decay is "
      r"train.weight_decay's \(the Trainer's decay groups\); set train.weight_decay$"),
     ("sft", {"optim": "sgd", "optim_args": "momentum"}, r"^train.optim_args must be 'key=value,key=value' \(or a "
      r"mapping\), got 'momentum'$"),
     ("sft", {"optim": "sgd", "optim_args": {"momentum": "high"}}, r"^train.optim_args: momentum must be a number"),
     ("sft", {"optim": "sgd", "optim_args": "momentum=nan"}, r"^train.optim_args: momentum must be a number, got "
      r"'nan'$"),
     ("sft", {"optim": "rmsprop", "optim_args": {"alpha": float("inf")}}, r"^train.optim_args: alpha must be a "
      r"number, got 'inf'$"),
     ("grpo", {"optim_args": {"momentum": 0.9}}, r"^train.optim_args: grpo's own loop runs torch's AdamW"),
     ("sft", {"optim": "stable_adamw", "optim_args": {"decouple_lr": False}}, r"^train.optim_args: decouple_lr "
      r"'false' would turn it on \(the Trainer takes any text as true\); only leaving decouple_lr out turns it off$"),
     ("sft", {"optim": "stable_adamw", "optim_args": "kahan_sum=0"}, r"^train.optim_args: kahan_sum '0' would turn"),
     ("sft", {"optim": "adamw_torch_4bit", "optim_args": {"block_size": 128}}, r"^train.optim_args: the Trainer "
      r"passes block_size to torchao's adamw_torch_4bit as text \('128'\), which it cannot use; drop it"),
     ("sft", {"optim": "sgd", "optim_args": {"momentum": "0.9,nesterov=true"}}, r"^train.optim_args: momentum: "
      r"'0.9,nesterov=true' holds ',' or '=', which the Trainer's 'k=v,k=v' cannot carry$"),
     ("sft", {"optim": "rmsprop_bnb", "optim_args": {"alpha": 0.9}}, r"^train.optim_args: the Trainer passes "
      r"'alpha' to train.optim rmsprop_bnb's RMSprop as text, which its numbers cannot take; drop optim_args$"),
     ("sft", {"torch_empty_cache_steps": 0}, r"^train.torch_empty_cache_steps must be >= 1 \(or null: never\), "
      r"got 0$"),
     ("ppo", {"torch_empty_cache_steps": 5}, r"^train.torch_empty_cache_steps: ppo's own loop never empties")],
)  # fmt: skip
def test_an_optim_args_key_the_optimizer_does_not_read_is_one_line(stage, keys, says):
    """The Trainer ignores a misspelt optim_args key, and one for another optimizer, silently."""
    with pytest.raises(ConfigError, match=says):
        build({"stage": stage, "data": {"train": "t.jsonl"}, "train": keys})


def test_torch_empty_cache_steps_reaches_the_trainer_and_may_change_on_resume(files, tmp_path):  # noqa: F811
    """Refused before as not a recipe key; it lowers peak CUDA memory and changes no result, so --resume with another
    value is no change (runfolder's HARMLESS)."""
    from deltatune.train.models import load_processor
    from deltatune.train.run import _training_args
    from deltatune.train.runfolder import recipe_changes
    from deltatune.train.table import prepare

    cfg = build(recipe(files, tmp_path / "out", torch_empty_cache_steps=4, optim="sgd", optim_args="momentum=0.9"))
    args = _training_args(cfg, prepare(cfg, load_processor(files["model"], "sft")), str(tmp_path))
    assert (args.torch_empty_cache_steps, args.optim_args) == (4, "momentum=0.9")
    old = recipe(files, tmp_path / "out", torch_empty_cache_steps=4)
    assert recipe_changes(old, recipe(files, tmp_path / "out", torch_empty_cache_steps=None)) == []


def test_optim_args_the_trainer_takes_in_any_case_pass():
    """The Trainer lowercases nesterov and centered (true, 1, yes): True and Yes were refused."""
    from deltatune.train.config_train import optim_args

    for keys in ({"optim": "sgd", "optim_args": {"nesterov": "True", "momentum": 0.9}}, {"optim": "rmsprop", "optim_args": "centered=Yes"},
                 {"optim": "stable_adamw", "optim_args": {"decouple_lr": True, "kahan_sum": "yes"}}):  # fmt: skip
        assert optim_args(build({"data": {"train": "t.jsonl"}, "train": keys}).train)


@pytest.mark.parametrize("strategy", ["sequential", "batch_rebalance"])
def test_data_seed_beside_an_order_it_does_not_seed_is_one_line_as_a_run_starts(files, tmp_path, strategy):  # noqa: F811
    """Refused where a training run starts (checks.check_run), not in build(): a finished run's run.yaml with it
    (accepted before) still loads for deltatune eval and load_adapter_model; build() refused it and them."""
    import yaml

    from deltatune.train.evaluation import evaluate

    says = {"sequential": "is the data's", "batch_rebalance": r"is fixed \(the Trainer's sampler seeds it with 42"}
    with pytest.raises(ConfigError, match=r"^train.data_seed orders train_sampling_strategy random \(and "
                       rf"group_by_length's eval batches\); the {strategy} order {says[strategy]}"):  # fmt: skip
        train(build(recipe(files, tmp_path / "new", train_sampling_strategy=strategy, data_seed=1)))
    assert not (tmp_path / "new").exists()
    out = tmp_path / "old"
    train(build(recipe(files, out, max_steps=1)))
    saved = yaml.safe_load((out / "run.yaml").read_text())
    saved["train"].update(train_sampling_strategy=strategy, data_seed=7)
    (out / "run.yaml").write_text(yaml.safe_dump(saved))
    assert build(saved).train.data_seed == 7
    assert evaluate(str(out), data=files["sft"])["eval_loss"] > 0


def test_data_seed_orders_group_by_length_eval_batches_as_the_trainers(files, tmp_path):  # noqa: F811
    """transformers 5.25 seeds group_by_length's eval LengthGroupedSampler with data_seed: taken, not refused."""
    from deltatune.train.models import load_processor
    from deltatune.train.run import _training_args
    from deltatune.train.table import prepare

    cfg = build(recipe(files, tmp_path / "out", train_sampling_strategy="group_by_length", data_seed=5))
    args = _training_args(cfg, prepare(cfg, load_processor(files["model"], "sft")), str(tmp_path))
    assert (args.data_seed, args.seed, args.train_sampling_strategy) == (5, cfg.train.seed, "group_by_length")


def test_a_checkpoint_from_before_the_epoch_rng_file_warns_on_resume_under_group_by_length(files, tmp_path):  # noqa: F811
    """A checkpoint written before cbca1b0 holds no deltatune_epoch_rng file: resumed past epoch 0 under
    group_by_length it trains on other rows (the review's 0/15), silently before; now one warning names the file."""
    import os

    keys = {"batch_size": 1, "grad_accum": 1, "max_steps": 11, "save_steps": 10, "logging_steps": 4}
    _, resumed = _cut_at_step_10(files, tmp_path, keys)
    os.remove(resumed / "checkpoint-10" / "deltatune_epoch_rng_0.pt")
    with pytest.warns(UserWarning, match=r"^checkpoint-10 holds no deltatune_epoch_rng_0.pt \(written before "
                      r"deltatune saved it\): the resumed epoch's group_by_length order is drawn afresh"):  # fmt: skip
        train(build(recipe(files, resumed, train_sampling_strategy="group_by_length", **keys)), resume=True)
