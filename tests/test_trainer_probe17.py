"""Probe 17 of the train keys against transformers 5's Trainer: a learning-rate schedule or an optimizer that the
Trainer builds (or steps) only once training starts, and then refuses with a traceback from inside torch or
transformers, is one line naming the key when the recipe is read. Each test failed before its fix (the recipe
passed; the error came at the first step)."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments, get_scheduler

from deltatune.config import ConfigError
from deltatune.train import build


def _rates(name: str, kwargs: dict, lr: float, steps: int = 10) -> list[float]:
    """transformers' schedule on an optimizer at ``lr``, stepped as the Trainer steps it (1 warm-up step)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=steps, scheduler_specific_kwargs=kwargs)
    out = []
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
def test_a_schedule_value_read_only_after_warm_up_is_one_line(name, kwargs, error, says):
    """The schedule was built, never stepped: a value its rate reads only after the warm-up passed, and the Trainer's
    first step after it was a traceback from inside the schedule's lambda."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=10, scheduler_specific_kwargs=kwargs)  # builds
    with pytest.raises(error):
        _rates(name, kwargs, lr=1e-3)
    assert says in _refused({"scheduler": name, "lr_scheduler_kwargs": kwargs})


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

    rates = _rates(name, kwargs, lr=2e-4)
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


def test_an_optimizer_whose_package_is_missing_is_one_line_where_a_run_starts(tmp_path, monkeypatch):
    """The Trainer's ImportError came after the model had loaded; check_optim_package (called by checks.check_run)
    names the key and the package, and a finished run's run.yaml still builds without it. Every name is one of
    transformers' optimizers."""
    import importlib.util

    from transformers.training_args import OptimizerNames

    from deltatune.train.config_train import OPTIM_PACKAGES, check_optim_package

    assert set(OPTIM_PACKAGES) <= {o.value for o in OptimizerNames}
    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "schedulefree" else find(name, *a)
    )
    args = TrainingArguments(str(tmp_path), optim="schedule_free_adamw", use_cpu=True, report_to=[])
    import transformers.trainer_optimizer as topt

    monkeypatch.setattr(topt, "is_schedulefree_available", lambda: False)
    with pytest.raises(ImportError, match="schedulefree"):  # the Trainer's
        Trainer.get_optimizer_cls_and_kwargs(args)
    cfg = build({"train": {"optim": "schedule_free_adamw"}})  # an old run.yaml loads
    with pytest.raises(ConfigError, match="train.optim schedule_free_adamw needs the package schedulefree, which is"):
        check_optim_package(cfg)
    check_optim_package(build({"train": {"optim": "adamw_torch"}}))  # none needed
