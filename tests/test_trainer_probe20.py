"""Probe 20 of the training loop's shared settings against transformers 5's Trainer on a peft model (same start, data,
seed and arguments): the learning rate, loss and weights of each step under warm-up, cosine decay, weight decay and
gradient accumulation over a ragged last batch, and early stopping (transformers' EarlyStoppingCallback), which a
recipe could not ask for (train.early_stopping_patience was refused as an unknown key)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_trainer_probe11 import files, recipe  # noqa: F401  (files: the module's fixture, a tiny llama and rows)
from test_trainer_probe12 import reference
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from deltatune.config import ConfigError
from deltatune.train import build, train
from deltatune.train.checks import check_run
from deltatune.train.config_train import check_loss_direction


def logged(out, key: str) -> list[tuple[int, float]]:
    with open(out / "log_history.jsonl") as fh:
        return [(h["step"], h[key]) for h in map(json.loads, fh) if key in h]


@pytest.mark.parametrize(
    ("keys", "args", "logs"),
    [
        (
            {"warmup_ratio": 0.5, "scheduler": "cosine", "weight_decay": 0.1, "max_grad_norm": 0.5},
            {"warmup_steps": 0.5, "lr_scheduler_type": "cosine", "weight_decay": 0.1, "max_grad_norm": 0.5},
            4,
        ),
        (
            {
                "warmup_steps": 1,
                "scheduler": "polynomial",
                "lr_scheduler_kwargs": {"power": 2.0, "lr_end": 1e-4},
                "logging_steps": 3,
                "logging_first_step": True,
                "optim": "adamw_torch",
            },
            {
                "warmup_steps": 1,
                "lr_scheduler_type": "polynomial",
                "lr_scheduler_kwargs": {"power": 2.0, "lr_end": 1e-4},
                "logging_steps": 3,
                "logging_first_step": True,
                "optim": "adamw_torch",
            },
            2,
        ),
    ],
    ids=["cosine_warmup_ratio_decay", "polynomial_logged_every_3"],
)
def test_rates_losses_and_weights_of_each_step_are_the_trainers_over_a_ragged_epoch(files, tmp_path, keys, args, logs):  # noqa: F811
    """8 rows in batches of 3 accumulated 2 at a time, 2 epochs: steps of 6 and 2 rows (the last one micro-batch),
    under warm-up, a decaying schedule, weight decay and clipping; each logged learning rate, loss (the per-token mean
    over the whole accumulated step, averaged over the steps since the last log) and gradient norm, and the adapter at
    the end, are transformers' Trainer's on peft's LoRA."""
    keys = {"max_steps": -1, "epochs": 2, "batch_size": 3, "grad_accum": 2, **keys}
    cfg = build(recipe(files, tmp_path / "ours", **keys))
    train(cfg)
    adapter = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    ref, ref_adapter = reference(build(recipe(files, tmp_path / "u", **keys)), tmp_path / "ref", **args)
    ref_log = [h for h in ref.state.log_history if "loss" in h]
    assert len(ref_log) == logs  # 2 epochs of 2 steps (each epoch's second one micro-batch); or steps 1 and 3
    for key in ("learning_rate", "loss", "grad_norm"):
        assert logged(tmp_path / "ours", key) == [(h["step"], pytest.approx(h[key], rel=1e-4)) for h in ref_log]
    assert adapter.keys() == ref_adapter.keys()
    assert max((adapter[k] - ref_adapter[k]).abs().max().item() for k in adapter) < 1e-5


@pytest.mark.parametrize(
    "method",
    [{"name": "full"}, {"name": "lora", "target_modules": ["q_proj"], "modules_to_save": ["input_layernorm"]}],
    ids=["full", "lora_norm"],
)
def test_the_decayed_parameters_are_the_trainers_set(files, tmp_path, method):  # noqa: F811
    """The Trainer decays no bias and no norm weight: on a DeltaModel the names it reads are the base's behind a
    prefix (a trained copy of a norm too), so its set is the plain model's."""
    from deltatune.train.models import load_processor
    from deltatune.train.run import build_model, start_model

    cfg = build({**recipe(files, tmp_path), "method": method})
    tok = load_processor(cfg.model.name_or_path, "sft")
    delta, _ = start_model(cfg, tok)
    plain = build_model(cfg, tok)
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    decayed = Trainer(model=delta, args=args).get_decay_parameter_names(delta)
    plain_decayed = Trainer(model=plain, args=args).get_decay_parameter_names(plain)
    base = lambda k: k.removeprefix("base_model.").replace(".modules_to_save.default", "")  # noqa: E731
    trained = {k for k, p in delta.named_parameters() if p.requires_grad}
    norms = {k for k in trained if "layernorm" in k}
    assert norms and not norms & set(decayed)  # (a trained norm, not decayed)
    if method["name"] == "full":
        assert {base(k) for k in decayed} == {base(k) for k in plain_decayed}


def test_early_stopping_stops_as_the_trainers_callback(files, tmp_path):  # noqa: F811
    """train.early_stopping_patience and _threshold: transformers' EarlyStoppingCallback on the eval loss. With a
    threshold no evaluation clears, the first evaluation sets the best and the next two fail: the run stops at step 3
    of 6, the Trainer's step, with its adapter (before: the key was refused as unknown)."""
    keys = {"max_steps": 6, "eval_steps": 1, "save_steps": 1, "early_stopping_patience": 2,
            "early_stopping_threshold": 10.0}  # fmt: skip
    r = recipe(files, tmp_path / "ours", **keys)
    r["data"]["eval"] = files["sft"]
    cfg = build(r)
    train(cfg)
    adapter = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    steps = {s for s, _ in logged(tmp_path / "ours", "eval_loss")}
    cfg = build({**r, "output": {"dir": str(tmp_path / "u")}})
    ref, ref_adapter = reference(
        cfg,
        tmp_path / "ref",
        callbacks=[EarlyStoppingCallback(2, 10.0)],
        eval_strategy="steps",
        eval_steps=1,
        metric_for_best_model="loss",
    )
    assert ref.state.global_step == 3 and steps == {1, 2, 3}
    assert max((adapter[k] - ref_adapter[k]).abs().max().item() for k in adapter) < 1e-5
    with open(tmp_path / "ours" / "metrics.json") as fh:
        assert json.load(fh)["train_steps"] == 3


@pytest.mark.parametrize(
    ("keys", "data", "says"),
    [
        ({"early_stopping_patience": 0}, True, "train.early_stopping_patience must be a whole number >= 1"),
        ({"early_stopping_patience": -2}, True, "train.early_stopping_patience must be a whole number >= 1"),
        (
            {"early_stopping_patience": 2},
            False,
            "train.early_stopping_patience stops when the evaluation stops improving, but data.eval is not set",
        ),  # fmt: skip
        (
            {"early_stopping_patience": 2, "early_stopping_threshold": -0.1},
            True,
            "train.early_stopping_threshold must be a number >= 0, got -0.1",
        ),
        (
            {"early_stopping_patience": 2, "early_stopping_threshold": float("nan")},
            True,
            "train.early_stopping_threshold must be a finite number, got nan",
        ),
        (
            {"early_stopping_threshold": 0.1},
            True,
            "train.early_stopping_threshold is read only with train.early_stopping_patience",
        ),  # fmt: skip
    ],
)
def test_a_bad_early_stopping_key_is_one_line_naming_it(files, tmp_path, keys, data, says):  # noqa: F811
    r = recipe(files, tmp_path / "out", **keys)
    if data:
        r["data"]["eval"] = files["sft"]
    with pytest.raises(ConfigError, match="^" + says.replace("(", r"\(").replace(".", r"\.")) as err:
        build(r)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_early_stopping_is_refused_on_a_stage_with_its_own_loop():
    with pytest.raises(ConfigError, match=r"^train\.early_stopping_patience .* ppo's own loop never stops early"):
        build({"stage": "ppo", "data": {"eval": "x.jsonl"}, "train": {"early_stopping_patience": 2}})


def test_a_run_written_before_the_early_stopping_keys_resumes_without_a_change_named(tmp_path):
    import yaml

    from deltatune.train.run import RUN_FILE, _check_resume_recipe, _recipe_dict

    recipe_now = _recipe_dict(build({"train": {"max_steps": 2}}))
    old = {**recipe_now, "train": dict(recipe_now["train"])}
    del old["train"]["early_stopping_patience"], old["train"]["early_stopping_threshold"]
    (tmp_path / RUN_FILE).write_text(yaml.safe_dump(old))
    assert _check_resume_recipe(str(tmp_path), recipe_now, False) is False


def test_a_resumed_run_stops_early_at_the_uninterrupted_runs_step(files, tmp_path):  # noqa: F811
    """The count of evaluations without improvement is in each checkpoint (EarlyStoppingCallback's state) and comes
    back on --resume: a run stopped after checkpoint-2 (its count 1 of 3) stops at step 4 as the uninterrupted run
    does, with its adapter (the Trainer's default restarts the count: step 5). A patience changed with
    --resume-changed is the recipe's (the Trainer rebuilt the callback with the checkpoint's 3: step 4, not 5)."""
    import os
    import shutil

    def run(out, patience=3):
        raw = recipe(files, out, max_steps=6, eval_steps=1, save_steps=1, save_total_limit=None,
                     early_stopping_patience=patience, early_stopping_threshold=10.0)  # fmt: skip
        raw["data"]["eval"] = files["sft"]
        return build(raw)

    whole, resumed, changed = tmp_path / "whole", tmp_path / "resumed", tmp_path / "changed"
    assert train(run(whole))["train_steps"] == 4
    for folder in (resumed, changed):
        shutil.copytree(whole, folder)
        for name in os.listdir(folder):  # the run as it stood when it stopped after checkpoint-2
            if name not in ("checkpoint-2", "run.yaml", "log_history.jsonl"):
                (shutil.rmtree if (folder / name).is_dir() else os.remove)(folder / name)
    assert train(run(resumed), resume=True)["train_steps"] == 4
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"train\.early_stopping_patience: 3 -> 4"):
        train(run(changed, patience=4), resume=True)
    assert train(run(changed, patience=4), resume=True, resume_changed=True)["train_steps"] == 5


def test_the_best_metric_keys_beside_early_stopping_are_not_named_ignored(files, tmp_path):  # noqa: F811
    """Early stopping compares each evaluation with the best by metric_for_best_model and greater_is_better: read,
    so not named ignored as they are without load_best_model_at_end (or a plateau schedule)."""
    from deltatune.train.config import ignored_keys

    r = recipe(files, tmp_path, metric_for_best_model="loss", greater_is_better=False)
    r["data"]["eval"] = files["sft"]
    assert {k for k, _ in ignored_keys(build(r))} == {"train.metric_for_best_model", "train.greater_is_better"}
    r["train"]["early_stopping_patience"] = 2
    assert ignored_keys(build(r)) == []


def _es_run(files, out, **keys):  # noqa: F811
    raw = recipe(files, out, max_steps=6, eval_steps=1, save_steps=1, save_total_limit=None, **keys)
    raw["data"]["eval"] = files["sft"]
    return build(raw)


def _cut_to(folder, keep: str) -> None:
    """The run folder as it stood when the run stopped right after ``keep`` (a checkpoint-N)."""
    import os
    import shutil

    for name in os.listdir(folder):
        if name not in (keep, "run.yaml", "log_history.jsonl"):
            (shutil.rmtree if (folder / name).is_dir() else os.remove)(folder / name)


def test_a_resume_adding_early_stopping_stops_and_saves_it(files, tmp_path):  # noqa: F811
    """A run from before the keys (or one resumed with --resume-changed adding them) has checkpoints without the
    callback's state: the Trainer's save indexes stateful_callbacks by its name, so the first checkpoint after the
    resume was KeyError: 'EarlyStopping'. Now the count starts at 0 on resume (the checkpoint holds no best: step 3's
    evaluation sets it, 4 and 5 fail to beat it by 10): the run stops at step 5 and its checkpoints hold the count."""
    out = tmp_path / "run"
    train(_es_run(files, out))
    _cut_to(out, "checkpoint-2")
    cfg = _es_run(files, out, early_stopping_patience=2, early_stopping_threshold=10.0)
    assert train(cfg, resume=True, resume_changed=True)["train_steps"] == 5
    with open(out / "checkpoint-5" / "trainer_state.json") as fh:
        saved = json.load(fh)["stateful_callbacks"]["EarlyStopping"]
    assert saved["attributes"]["early_stopping_patience_counter"] == 2
    assert saved["args"] == {"early_stopping_patience": 2, "early_stopping_threshold": 10.0}


def test_a_resume_from_the_early_stops_checkpoint_trains_no_further(files, tmp_path):  # noqa: F811
    """The checkpoint written at the early stop holds the count at its patience, but the Trainer clears
    should_training_stop as it starts again and the callback acts only at the next evaluation: a run that crashed
    while writing its outputs trained eval_steps more steps on --resume (to step 4, another adapter). Now it trains none,
    and its adapter is the uninterrupted run's (as one at max_steps)."""
    import shutil

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train(_es_run(files, whole, early_stopping_patience=2, early_stopping_threshold=10.0))["train_steps"] == 3
    shutil.copytree(whole, resumed)
    _cut_to(resumed, "checkpoint-3")
    assert train(_es_run(files, resumed, early_stopping_patience=2, early_stopping_threshold=10.0),
                 resume=True)["train_steps"] == 3  # fmt: skip
    assert not (resumed / "checkpoint-4").exists()
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("stage", "keys", "says"),
    [
        ("sft", {"early_stopping_patience": 2}, r"^train\.early_stopping_patience stops when the evaluation stops "
         r"improving, but data\.eval is not set \(stage sft holds no data\.val_size rows out: only cls, tag, seq2seq, "
         r"image_cls, caption do\); drop it$"),
        ("dpo", {"early_stopping_patience": 2}, r"^train\.early_stopping_patience .* \(stage dpo holds no "),
        ("pt", {"scheduler": "reduce_lr_on_plateau"}, r"^train\.scheduler=reduce_lr_on_plateau steps on the eval "
         r"loss: it needs data\.eval, .* \(stage pt holds no data\.val_size rows out"),
    ],
)  # fmt: skip
def test_val_size_is_no_eval_set_on_a_stage_that_holds_none_out(stage, keys, says):
    """data.val_size is read by cls, tag, seq2seq, image_cls and caption only (READ_BY): on sft, pt or dpo no rows are
    held out and the Trainer evaluates nothing, so early stopping passed the check and failed as training started
    (EarlyStoppingCallback's AssertionError "requires metric_for_best_model"), a plateau schedule as TrainingArguments'
    ValueError. On a stage that holds them out, val_size is the eval set."""
    from deltatune.train.config_train import HOLDS_OUT
    from deltatune.train.evaluation import VAL_SIZE_STAGES  # (READ_BY's readers of data.val_size)

    assert sorted(HOLDS_OUT) == VAL_SIZE_STAGES
    with pytest.raises(ConfigError, match=says) as err:
        build({"stage": stage, "data": {"val_size": 0.25}, "train": keys})
    assert "\n" not in str(err.value)
    for held in ("cls", "caption"):
        build({"stage": held, "data": {"val_size": 0.25}, "train": keys})


def test_load_best_without_an_eval_set_is_refused_where_a_run_starts(files, tmp_path):  # noqa: F811
    """load_best_model_at_end on sft with data.val_size (no rows held out): the run trained with it silently off
    (run.py passes it only with an eval set). Refused as a run starts, before the folder is made; such a finished
    run's run.yaml still builds (run_load reads it)."""
    raw = recipe(files, tmp_path / "out", max_steps=2, load_best_model_at_end=True)
    raw["data"]["val_size"] = 0.25
    cfg = build(raw)  # (loads, as a finished run's would)
    with pytest.raises(ConfigError, match=r"^train\.load_best_model_at_end .* data\.eval is not set \(stage sft "
                       r"holds no data\.val_size rows out: only cls, tag, seq2seq, image_cls, caption do\); drop it$"):  # fmt: skip
        train(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("metric", [None, "loss", "eval_loss"])
def test_greater_is_better_on_the_loss_is_refused_under_early_stopping(files, tmp_path, metric):  # noqa: F811
    """greater_is_better true with the best picked by the loss (named, or run.py's default): transformers' callback
    counts a rising loss as improving (np.greater), so a run whose loss fell stopped after ``patience`` evaluations.
    Refused as a run starts, nothing written (a finished run that trained so still builds: eval, merge, generate
    read it; review of 923cdaf); a metric that is better higher (cls accuracy) is taken, as greater_is_better false is."""
    says = r"^train\.greater_is_better is true, but the best evaluation is picked by its loss \(train\.metric_for_best_model '"
    best = {"metric_for_best_model": metric} if metric else {}
    raw = recipe(files, tmp_path / "es", greater_is_better=True, early_stopping_patience=2, **best)
    raw["data"]["eval"] = files["sft"]
    cfg = build(raw)  # (loads, as a finished run's would)
    with pytest.raises(ConfigError, match=says + (metric or "loss")) as err:
        check_run(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=says):
        train(cfg)
    assert not (tmp_path / "es").exists()
    check_run(build({**raw, "train": {**raw["train"], "greater_is_better": False}}))
    check_loss_direction(build({"stage": "cls", "data": {"eval": "x.jsonl"}, "train": {"early_stopping_patience": 2,
                                "metric_for_best_model": "accuracy", "greater_is_better": True}}))  # fmt: skip


def test_a_resume_training_other_parameters_is_one_line_before_the_optimizer_loads(files, tmp_path):  # noqa: F811
    """A method key that changes the trained parameters, accepted with --resume-changed (freeze's trainable modules
    here; full's freeze_vision_tower on a vision-language model), left the checkpoint's optimizer state for another
    set: torch's load_state_dict raised "loaded state dict contains a parameter group that doesn't match the size of
    optimizer's group" as a traceback. Now one line naming both counts (the checkpoint's AdamW over 2 blocks' attention
    and MLP weights, 2 x 7 = 14 tensors; the run's over their MLPs, 2 x 3 = 6), as ppo's and grpo's checkpoints do."""

    def run(modules):
        raw = recipe(files, tmp_path / "run", max_steps=2, save_steps=1)
        raw["method"] = {"name": "freeze", "freeze_trainable_layers": 2, "freeze_trainable_modules": modules}
        return build(raw)

    train(run(["self_attn", "mlp"]))
    _cut_to(tmp_path / "run", "checkpoint-1")
    with pytest.raises(ConfigError, match=r"^--resume: checkpoint-1's optimizer holds 14 trainable tensors where the "
                       r"run now trains 6 \(a method key changed under --resume-changed\?\)") as err:  # fmt: skip
        train(run(["mlp"]), resume=True, resume_changed=True)
    assert "\n" not in str(err.value)
    kept = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != "stopped.json")  # (run.py's mark)
    assert kept == ["checkpoint-1", "log_history.jsonl", "run.yaml"]
