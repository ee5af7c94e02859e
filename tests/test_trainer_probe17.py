"""Probe 17 of the train keys against transformers 5's Trainer: a learning-rate schedule or an optimizer that the
Trainer builds (or steps) only once training starts, and then refuses with a traceback from inside torch or
transformers, is one line naming the key when the recipe is read. Each test failed before its fix (the recipe
passed; the error came at the first step)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import Trainer, TrainingArguments, get_scheduler

from deltatune.config import ConfigError
from deltatune.train import build


def _rates(name: str, kwargs: dict, lr: float, steps: int = 10, warmup: int = 1) -> list[float]:
    """transformers' schedule on an optimizer at ``lr``, stepped as the Trainer steps it (``warmup`` steps): the rate
    before the first step and after each."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = get_scheduler(
        name, opt, num_warmup_steps=warmup, num_training_steps=steps, scheduler_specific_kwargs=kwargs
    )
    out = [opt.param_groups[0]["lr"]]  # the first step's rate
    for _ in range(steps):
        opt.step()
        schedule.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def _refused(train: dict) -> str:
    with pytest.raises(ConfigError) as err:
        build({"train": train})
    message = str(err.value)
    assert "\n" not in message and ("train.lr_scheduler_kwargs" in message or "train.optim_args" in message)
    return message


def test_polynomial_lr_end_is_checked_against_the_runs_lr():
    """The check built the schedule at lr 1e-3: lr_end 5e-4 under train.lr 1e-4 passed, and transformers' ValueError
    came when the Trainer built it at the run's rate."""
    with pytest.raises(ValueError, match="lr_end"):  # the Trainer's, at the run's lr
        _rates("polynomial", {"lr_end": 5e-4}, lr=1e-4)
    message = _refused({"scheduler": "polynomial", "lr": 1e-4, "lr_scheduler_kwargs": {"lr_end": 5e-4}})
    assert "lr_end (0.0005) must be smaller than initial lr (0.0001)" in message
    _rates("polynomial", {"lr_end": 5e-5}, lr=1e-4)  # below the run's rate: both take it
    assert build({"train": {"scheduler": "polynomial", "lr": 1e-4, "lr_scheduler_kwargs": {"lr_end": 5e-5}}})


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "says"),
    [
        ("cosine_with_restarts", {"num_cycles": "a"}, ValueError, "could not convert string to float: 'a'"),
        ("inverse_sqrt", {"timescale": 0}, ZeroDivisionError, "division by zero"),
        ("polynomial", {"power": "x"}, TypeError, "unsupported operand type(s) for ** or pow()"),
    ],
)
def test_a_schedule_value_read_only_after_warm_up_is_one_line_where_a_run_starts(tmp_path, name, kwargs, error, says):
    """The schedule was built, never stepped: a value its rate reads only after the warm-up passed, and the Trainer's
    first step after it was a traceback from inside the schedule's lambda. checks.check_run steps it; build() only
    builds it, so a finished run that never left its warm-up (warmup_steps 20, 10 steps) still loads."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=10, scheduler_specific_kwargs=kwargs)  # builds
    with pytest.raises(error):
        _rates(name, kwargs, lr=1e-3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_scheduler(name, opt, num_warmup_steps=20, num_training_steps=10, scheduler_specific_kwargs=kwargs)
    for _ in range(10):  # a run that never leaves warm-up trains (the Trainer steps the schedule after each step)
        opt.step()
        schedule.step()
    cfg = build({"train": {"scheduler": name, "lr_scheduler_kwargs": kwargs, "warmup_steps": 20, "max_steps": 10}})
    assert says in _run_refused(tmp_path, cfg)
    assert says in _run_refused(tmp_path, build({"train": {"scheduler": name, "lr_scheduler_kwargs": kwargs}}))


def _run_refused(tmp_path, cfg) -> str:
    """checks.check_run's one line (where a training run starts) for ``cfg`` on a model folder that exists."""
    from deltatune.train.checks import check_run

    cfg.model.name_or_path, cfg.train.report_to, cfg.train.precision = str(tmp_path), ["none"], "fp32"
    with pytest.raises(ConfigError) as err:
        check_run(cfg)
    message = str(err.value)
    assert "\n" not in message and "train.lr_scheduler_kwargs" in message
    return message


def test_a_warm_up_start_above_the_peak_is_one_line_where_a_run_starts(tmp_path):
    """cosine_warmup_with_min_lr's warmup_lr_rate is the first step's rate over train.lr: at 5 the Trainer's first
    step trains at 5x the peak, silently. check_schedule_floor never read the first step's rate; a run without
    warm-up never reads warmup_lr_rate (taken, as by the Trainer)."""
    kwargs = {"min_lr_rate": 0.1, "warmup_lr_rate": 5.0}
    args = TrainingArguments(str(tmp_path), learning_rate=2e-4, warmup_steps=2, lr_scheduler_type="cosine_warmup_with_min_lr",
                             lr_scheduler_kwargs=kwargs, use_cpu=True, report_to=[])  # fmt: skip
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # the Trainer's first step: 5x the peak
    cfg = build({"train": {"scheduler": "cosine_warmup_with_min_lr", "lr": 2e-4, "warmup_steps": 2,
                           "lr_scheduler_kwargs": kwargs}})  # fmt: skip
    message = _run_refused(tmp_path, cfg)
    assert "climb above train.lr (0.0002) to 0.001" in message and "warmup_lr_rate" in message
    ok = {"min_lr_rate": 0.1, "warmup_lr_rate": 0.5}
    assert max(_rates("cosine_warmup_with_min_lr", ok, lr=2e-4)) <= 2e-4
    from deltatune.train.config_train import check_schedule_floor

    for train in ({"warmup_steps": 2, "lr_scheduler_kwargs": ok}, {"lr_scheduler_kwargs": kwargs}):
        check_schedule_floor(build({"train": {"scheduler": "cosine_warmup_with_min_lr", "lr": 2e-4, **train}}))


@pytest.mark.parametrize(
    ("name", "kwargs", "below"),
    [
        ("cosine_with_min_lr", {"min_lr": 1e-3}, {"min_lr": 1e-5}),  # above train.lr 2e-4
        ("cosine_with_min_lr", {"min_lr_rate": 2.0}, {"min_lr_rate": 0.1}),
        ("warmup_stable_decay", {"num_decay_steps": 3, "min_lr_ratio": 2.0}, {"num_decay_steps": 3, "min_lr_ratio": 0.1}),
    ],
)  # fmt: skip
def test_a_schedule_floor_above_the_peak_is_one_line_where_a_run_starts(name, kwargs, below):
    """transformers takes a floor above the peak and climbs to it (cosine_with_min_lr's min_lr 1e-3 under lr 2e-4
    ends the run at 5x the peak rate), silently. Refused where a training run starts (checks.check_run calls
    check_schedule_floor): a finished run's run.yaml with such a floor still builds."""
    from deltatune.train.config_train import check_schedule_floor

    rates = _rates(name, kwargs, lr=2e-4, warmup=0)  # (the recipe warms up no step)
    assert max(rates) > 2e-4 * 1.5  # the Trainer's schedule climbs
    cfg = build({"train": {"scheduler": name, "lr": 2e-4, "lr_scheduler_kwargs": kwargs}})  # an old run loads
    with pytest.raises(ConfigError) as err:
        check_schedule_floor(cfg)
    assert f"climb above train.lr (0.0002) to {max(rates):g}" in str(err.value) and "\n" not in str(err.value)
    assert "train.lr_scheduler_kwargs" in str(err.value)
    assert max(_rates(name, below, lr=2e-4)) <= 2e-4  # a floor below the peak: both take it
    check_schedule_floor(build({"train": {"scheduler": name, "lr": 2e-4, "lr_scheduler_kwargs": below}}))


@pytest.mark.parametrize(
    ("optim", "optim_args", "says"),
    [
        ("sgd", "momentum=-1", "Invalid momentum value: -1.0"),
        ("sgd", "nesterov=true", "Nesterov momentum requires a momentum and zero dampening"),
        ("sgd", "momentum=0.9,dampening=0.1,nesterov=true", "Nesterov momentum requires a momentum and zero"),
        ("rmsprop", "alpha=-1", "Invalid alpha value: -1.0"),
        ("adagrad", "lr_decay=-1", "Invalid lr_decay value: -1.0"),
    ],
)
def test_optim_args_torch_refuses_are_one_line_naming_the_key(tmp_path, optim, optim_args, says):
    """The values passed the recipe check (finite numbers) and torch refused them when the Trainer built the
    optimizer, after the model had loaded."""
    args = TrainingArguments(str(tmp_path), optim=optim, optim_args=optim_args, use_cpu=True, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    with pytest.raises(ValueError, match=says.split(":")[0]):  # the Trainer's, building the optimizer
        cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    message = _refused({"optim": optim, "optim_args": optim_args})
    assert f"train.optim {optim}" in message and says in message


def test_optim_args_torch_takes_pass_and_reach_the_optimizer_as_the_trainers(tmp_path):
    args = TrainingArguments(str(tmp_path), optim="sgd", optim_args="momentum=0.9,nesterov=true", use_cpu=True,
                             report_to=[])  # fmt: skip
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.SGD and kwargs["nesterov"] is True and kwargs["momentum"] == 0.9
    cfg = build({"train": {"optim": "sgd", "optim_args": {"momentum": 0.9, "nesterov": True}}})
    assert cfg.train.optim_args == {"momentum": 0.9, "nesterov": True}


def test_the_collators_tokenizer_is_saved_with_the_adapter_as_the_trainer_saves_it(tmp_path):
    """Given no processing_class, the Trainer saves the data collator's tokenizer into each checkpoint and with
    save_model (peft's model under transformers' Trainer); deltatune.Trainer saved none, so the adapter folder could
    not be loaded with its tokenizer."""
    import peft
    from tiny import tiny_model, word_tokenizer
    from transformers import DataCollatorForLanguageModeling

    import deltatune as dt

    tok = word_tokenizer()
    rows = [{"input_ids": [5 + i, 6, 7 + i, 8]} for i in range(4)]
    folders = {}
    for name, trainer_class in (("peft", Trainer), ("ours", dt.Trainer)):
        torch.manual_seed(0)
        base = tiny_model("llama")
        model = (
            peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
            if name == "peft"
            else dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["q_proj"]))
        )
        args = TrainingArguments(str(tmp_path / name), per_device_train_batch_size=2, max_steps=1, save_strategy="steps",
                                 save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
        trainer = trainer_class(model=model, args=args, train_dataset=rows, data_collator=collator)
        assert trainer.processing_class is None
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        folders[name] = [tmp_path / name / "checkpoint-1", tmp_path / name / "final"]
    for ref, ours in zip(folders["peft"], folders["ours"], strict=True):
        want = {p.name for p in ref.iterdir() if p.name.startswith("tokenizer")}
        assert want and want <= {p.name for p in ours.iterdir()}
        assert all((ref / f).read_text() == (ours / f).read_text() for f in want)


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adafactor_layerwise", "apollo_adamw"])
def test_an_optimizer_needing_optim_target_modules_is_one_line(tmp_path, optim):
    """GaLore and APOLLO train the modules named by TrainingArguments' optim_target_modules, which a recipe does not
    take: the recipe passed and the Trainer refused when it built the optimizer, after the model loaded."""
    args = TrainingArguments(str(tmp_path), optim=optim, use_cpu=True, report_to=[])
    with pytest.raises((ImportError, ValueError)):  # the Trainer's (its package first, then the missing modules)
        Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=f"train.optim {optim} trains the modules named by .* optim_target_modules"):
        build({"train": {"optim": optim}})
    with pytest.raises(ConfigError, match=f"train.optim {optim} trains the modules named by"):  # before optim_args'
        build({"train": {"optim": optim, "optim_args": "rank=4"}})


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_loop_stage_ignores_train_optim_so_its_run_yaml_still_loads(stage):
    """ppo's and grpo's own loops run torch's AdamW whatever train.optim says (ignored_keys notes it): a finished
    run.yaml with train.optim galore_adamw was refused by build(), so merge / generate / serve could not load it."""
    from deltatune.train.config import ignored_keys

    cfg = build({"stage": stage, "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"},
                 "train": {"optim": "galore_adamw"}})  # fmt: skip
    assert cfg.train.optim == "galore_adamw" and any(key == "train.optim" for key, _ in ignored_keys(cfg))


def _unavailable(monkeypatch, fake) -> None:
    """transformers' is_*_available helpers replaced by ``fake`` where the Trainer (trainer_optimizer) and
    check_optim_package (import_utils) ask them, and the modules checked by import absent."""
    import importlib.util

    import transformers.trainer_optimizer as topt
    from transformers.utils import import_utils

    for module in (topt, import_utils):
        for name in dir(module):
            if name.startswith("is_") and name.endswith("_available"):
                monkeypatch.setattr(module, name, lambda *a, _n=name, **k: fake(_n, *a))
    find = importlib.util.find_spec
    absent = ("torchdistx", "torch_xla", "torch_npu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else find(name, *a))


def test_an_optimizer_whose_package_is_missing_is_one_line_where_a_run_starts(tmp_path, monkeypatch):
    """The Trainer's ImportError came after the model had loaded; check_optim_package (called by checks.check_run)
    names the key and the package, and a finished run's run.yaml still builds without it. The table is complete: with
    every package missing, the Trainer refuses exactly its names (GaLore and APOLLO aside: build() refuses them)."""
    from transformers.training_args import OptimizerNames

    from deltatune.train.config_train import OPTIM_PACKAGES, check_optim_package

    _unavailable(monkeypatch, lambda name, *a: False)
    trainer_refuses, ours_refuses = set(), set()
    for optim in (o.value for o in OptimizerNames):
        args = TrainingArguments(str(tmp_path), optim=optim, use_cpu=True, report_to=[])
        try:
            Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(2, 2))
        except (ImportError, ValueError) as exc:  # (grokadamw's, torch_xla's ... are ValueErrors)
            assert "install" in str(exc) or "import" in str(exc), str(exc)
            trainer_refuses.add(optim)
        if not optim.startswith(("galore_", "apollo_")):
            try:
                check_optim_package(build({"train": {"optim": optim}}))  # an old run.yaml loads
            except ConfigError as exc:
                assert f"train.optim {optim} needs the package " in str(exc) and "\n" not in str(exc)
                ours_refuses.add(optim)
    galore = {o for o in trainer_refuses if o.startswith(("galore_", "apollo_"))}
    assert galore and trainer_refuses - galore == ours_refuses == set(OPTIM_PACKAGES)
    check_optim_package(
        build(
            {
                "stage": "ppo",
                "model": {"name_or_path": "x"},
                "data": {"train": "t.jsonl"},
                "train": {"optim": "adamw_8bit"},
            }
        )
    )  # fmt: skip  (ppo's loop runs torch's AdamW)


@pytest.mark.parametrize(
    ("installed", "optim", "says"),
    [
        ({"schedulefree": "1.3.0"}, "schedule_free_radam", "schedulefree>=1.4.0, which is not installed here (or is"),
        ({"schedulefree": "1.2.0"}, "schedule_free_adamw", "schedulefree>=1.2.6"),
        ({"bitsandbytes": "0.45.0"}, "adamw_8bit", "bitsandbytes>=0.46.1"),
        ({"torchao": "0.14.0"}, "adamw_torch_4bit", "torchao>=0.15.0"),
    ],
)
def test_an_optimizer_package_older_than_transformers_needs_is_one_line(tmp_path, monkeypatch, installed, optim, says):
    """transformers 5.25 needs bitsandbytes >= 0.46.1, torchao >= 0.15.0, schedulefree >= 1.2.6 (1.4.0 for RAdam):
    with an older one installed the Trainer refuses after the model loaded, and check_optim_package (a find_spec)
    passed. It asks transformers' own helpers, each at the version the Trainer asks."""
    from packaging import version
    from transformers.utils import import_utils

    from deltatune.train.config_train import check_optim_package

    least = {"is_bitsandbytes_available": import_utils.BITSANDBYTES_MIN_VERSION,
             "is_torchao_available": import_utils.TORCHAO_MIN_VERSION,
             "is_schedulefree_available": import_utils.SCHEDULEFREE_MIN_VERSION}  # fmt: skip
    package = {"is_bitsandbytes_available": "bitsandbytes", "is_torchao_available": "torchao",
               "is_schedulefree_available": "schedulefree"}  # fmt: skip

    def fake(name, *wanted):  # installed at the given version, as _is_package_available reports it
        have = installed.get(package.get(name, ""))
        return have is not None and version.parse(have) >= version.parse((*wanted, least[name])[0])

    _unavailable(monkeypatch, fake)
    args = TrainingArguments(str(tmp_path), optim=optim, use_cpu=True, report_to=[])
    with pytest.raises(ImportError):  # the Trainer's
        Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=re.escape(f"train.optim {optim} needs the package {says}")):
        check_optim_package(build({"train": {"optim": optim}}))
    if optim == "schedule_free_radam":  # 1.3.0 serves AdamW and SGD
        check_optim_package(build({"train": {"optim": "schedule_free_adamw"}}))
