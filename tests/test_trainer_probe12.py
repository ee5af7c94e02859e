"""Probe 12 of the training loop: a recipe's train section against transformers' Trainer on a peft model (same start,
data, seed and arguments), for the Trainer keys a recipe refused as unknown until now: AdamW's betas and epsilon, the
schedule's kwargs, the best checkpoint loaded at the end, the dataloader keys, and steps given as a fraction."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from test_trainer_probe11 import files, recipe  # noqa: F401  (files: the module's fixture, a tiny llama and rows)
from transformers import Trainer, TrainingArguments, set_seed

from deltatune.config import ConfigError
from deltatune.train import build, train


def reference(cfg, out, callbacks=(), **args) -> tuple[Trainer, dict]:
    """transformers' Trainer on a peft LoRA holding the run's start (its seed, its data as the run encodes it), after
    training with ``args``: the trainer, and the adapter in the run's key names."""
    from deltatune.train.models import load_processor
    from deltatune.train.run import build_model, start_model
    from deltatune.train.table import prepare

    set_seed(cfg.train.seed)  # as the run draws its start
    tok = load_processor(cfg.model.name_or_path, "sft")
    prepared = prepare(cfg, tok)
    start, _ = start_model(cfg, tok)
    ref = peft.get_peft_model(
        build_model(cfg, tok), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    ours = {k.replace(".default", ""): v for k, v in start.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for k, v in ref.named_parameters():
            if "lora_" in k:
                v.copy_(ours[k.replace(".default", "").replace("base_model.model.", "base_model.", 1)])
    t = cfg.train
    targs = TrainingArguments(str(out), per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                              max_steps=t.max_steps, num_train_epochs=t.epochs, learning_rate=t.lr, seed=t.seed,
                              save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                              remove_unused_columns=False, **{"data_seed": t.seed, "logging_steps": 1, **args})  # fmt: skip
    trainer = Trainer(model=ref, args=targs, train_dataset=prepared.train, eval_dataset=prepared.eval,
                      data_collator=prepared.collator, callbacks=list(callbacks))  # fmt: skip
    trainer.train()
    return trainer, peft.get_peft_model_state_dict(ref)


def logged(out, key: str) -> list[float]:
    with open(out / "log_history.jsonl") as fh:
        return [h[key] for h in map(json.loads, fh) if key in h and "eval_loss" not in h]


def test_adam_betas_and_epsilon_train_as_the_trainers(files, tmp_path):  # noqa: F811
    """adam_beta1 / adam_beta2 / adam_epsilon were refused as unknown keys. Set, the run's AdamW state after 2 steps
    (the checkpoint's optimizer.pt) and adapter equal the Trainer's with those arguments; the defaults would not."""
    keys = {"adam_beta1": 0.5, "adam_beta2": 0.9, "adam_epsilon": 1e-3}
    raw = recipe(files, tmp_path / "ours", save_steps=2, **keys)
    train(build(raw))
    adapter = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    state = torch.load(tmp_path / "ours" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    trainer, ref = reference(build(raw), tmp_path / "ref", **keys)
    ref_state = trainer.optimizer.state_dict()
    assert [g["betas"] for g in state["param_groups"]] == [(0.5, 0.9)] * len(state["param_groups"])
    assert [(g["betas"], g["eps"]) for g in state["param_groups"]] == [
        (tuple(g["betas"]), g["eps"]) for g in ref_state["param_groups"]
    ]
    assert state["state"].keys() == ref_state["state"].keys()
    for i, s in state["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert (s[name] - ref_state["state"][i][name]).abs().max() < 1e-6
    diff = max((adapter[k] - ref[k]).abs().max().item() for k in ref)
    _, plain = reference(build(raw), tmp_path / "plain")  # the keys left out: the test can tell
    moved = max((plain[k] - ref[k]).abs().max().item() for k in ref)
    assert diff < 1e-5 < moved, (diff, moved)


@pytest.mark.parametrize(
    ("scheduler", "kwargs"),
    [
        ("cosine_with_restarts", {"num_cycles": 2}),
        ("cosine_with_min_lr", {"min_lr_rate": 0.3}),
    ],
)
def test_lr_scheduler_kwargs_give_the_trainers_lr_at_every_step(files, tmp_path, scheduler, kwargs):  # noqa: F811
    """lr_scheduler_kwargs was refused, and with it cosine_with_min_lr; the learning rate logged at each of 6 steps
    equals the Trainer's with the same kwargs (exactly), and differs from the schedule without them."""
    raw = recipe(files, tmp_path / "ours", max_steps=6, grad_accum=1, warmup_steps=1, scheduler=scheduler,
                 lr_scheduler_kwargs=kwargs)  # fmt: skip
    train(build(raw))
    lrs = logged(tmp_path / "ours", "learning_rate")
    trainer, _ = reference(build(raw), tmp_path / "ref", warmup_steps=1, lr_scheduler_type=scheduler,
                           lr_scheduler_kwargs=kwargs)  # fmt: skip
    ref = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(lrs) == 6 and lrs == ref
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    plain_name = "cosine" if scheduler == "cosine_with_min_lr" else scheduler
    plain = get_scheduler(plain_name, opt, num_warmup_steps=1, num_training_steps=6)
    without = []
    for _ in range(6):
        without.append(plain.get_last_lr()[0])
        opt.step()
        plain.step()
    assert lrs != pytest.approx(without, rel=1e-6)


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"scheduler": "cosine_with_min_lr"}, "train.scheduler=cosine_with_min_lr needs train.lr_scheduler_kwargs"),
        ({"scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1, "min_lr_rate": 0.1}},
         "Only one of min_lr or min_lr_rate should be set"),
        ({"scheduler": "cosine", "lr_scheduler_kwargs": {"num_cycle": 2}}, "unexpected keyword argument 'num_cycle'"),
        ({"scheduler": "constant", "lr_scheduler_kwargs": {"num_cycles": 2}}, "the constant schedule takes none"),
        ({"adam_beta2": 1.0}, "train.adam_beta2 must be in [0, 1), got 1.0"),
        ({"adam_epsilon": -1e-8}, "train.adam_epsilon must be >= 0"),
        ({"load_best_model_at_end": True}, "train.load_best_model_at_end picks the checkpoint with the best "
         "evaluation, but data.eval is not set"),
        ({"torch_compile": True}, "torch_compile (TrainingArguments') is not taken by a recipe"),
        ({"logging_steps": 2.5}, "train.logging_steps must be a whole number when over 1"),
        ({"save_steps": -0.5}, "train.save_steps must be >= 1 (or null: the default), got -0.5"),
    ],
)  # fmt: skip
def test_a_bad_trainer_key_is_refused_in_one_line_naming_it(keys, says):
    with pytest.raises(ConfigError) as err:
        build({"train": keys})
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert f"train.{next(iter(keys))}" in str(err.value) or "lr_scheduler_kwargs" in str(err.value)


def test_load_best_model_at_end_refuses_checkpoints_off_the_evaluations():
    base = {"data": {"train": "x.jsonl", "eval": "x.jsonl"}}
    for keys in ({"eval_steps": 2}, {"eval_steps": 2, "save_steps": 3}, {"eval_steps": 0.5, "save_steps": 2}):
        with pytest.raises(ConfigError, match=r"^train.load_best_model_at_end needs a checkpoint at each evaluation"):
            build({**base, "train": {"load_best_model_at_end": True, **keys}})
    with pytest.raises(ConfigError, match=r"^train.load_best_model_at_end picks .* grpo's own loop keeps no best"):
        build({**base, "stage": "grpo", "train": {"load_best_model_at_end": True}})
    ok = build({**base, "train": {"load_best_model_at_end": True, "eval_steps": 0.25, "save_steps": 0.25}})
    assert (ok.train.eval_steps, ok.train.save_steps) == (0.25, 0.25)
    assert build({**base, "train": {"load_best_model_at_end": True, "eval_steps": 2, "save_steps": 2.0}})
    assert build({**base, "train": {"load_best_model_at_end": True}}).train.load_best_model_at_end
    for stage in ("ppo", "grpo"):  # their own loops
        with pytest.raises(ConfigError, match=rf"^train.adam_beta1: {stage}'s own loop runs torch's AdamW"):
            build({"stage": stage, "train": {"adam_beta1": 0.8}})
        with pytest.raises(ConfigError, match=rf"^train.lr_scheduler_kwargs: {stage}'s own loop"):
            build({"stage": stage, "train": {"scheduler": "cosine", "lr_scheduler_kwargs": {"num_cycles": 1}}})


def test_load_best_model_at_end_leaves_the_best_checkpoints_adapter_and_fractions_of_steps_count(files, tmp_path):  # noqa: F811
    """load_best_model_at_end was refused as unknown. With greater_is_better on the eval loss (so the best is the
    worst: not the last step), the run's adapter file and the model it evaluates at the end are the checkpoint the
    Trainer's rule picks from the logged evaluations (the highest eval_loss), kept by the rotation; eval_steps and
    save_steps 0.25 of 4 steps evaluate and save at every step, logging_steps 0.5 logs at steps 2 and 4, as the
    Trainer reads fractions (they were refused as not int)."""
    out = tmp_path / "run"
    raw = recipe(files, out, max_steps=4, eval_steps=0.25, save_steps=0.25, logging_steps=0.5, save_total_limit=2,
                 load_best_model_at_end=True, greater_is_better=True)  # fmt: skip
    raw["data"]["eval"] = files["sft"]
    metrics = train(build(raw))
    with open(out / "log_history.jsonl") as fh:
        history = [json.loads(line) for line in fh]
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert sorted(evals) == [1, 2, 3, 4]
    assert [h["step"] for h in history if "loss" in h and "eval_loss" not in h] == [2, 4]
    best = max(evals, key=evals.get)
    assert best != 4 and len(set(evals.values())) == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [f"checkpoint-{best}",
                                                                                          "checkpoint-4"]  # fmt: skip
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(out / f"checkpoint-{best}")
    adapter = load_file(str(out / "adapter_model.safetensors"))
    kept = load_file(str(out / f"checkpoint-{best}" / "adapter_model.safetensors"))
    last = load_file(str(out / "checkpoint-4" / "adapter_model.safetensors"))
    assert all(torch.equal(adapter[k], kept[k]) for k in kept)
    assert not all(torch.equal(adapter[k], last[k]) for k in last)
    assert metrics["eval_loss"] == pytest.approx(evals[best], rel=1e-6)  # the model in memory is the best one too


def test_dataloader_drop_last_and_pin_memory_reach_the_trainer(files, tmp_path):  # noqa: F811
    """dataloader_drop_last / dataloader_pin_memory were refused as unknown. 8 rows in batches of 3 make 3 steps an
    epoch, 2 with the last incomplete batch dropped, as the Trainer counts them (8 // 3)."""
    from types import SimpleNamespace

    from deltatune.train.run import _training_args

    raw = recipe(files, tmp_path / "drop", batch_size=3, grad_accum=1, max_steps=-1, epochs=1,
                 dataloader_drop_last=True)  # fmt: skip
    assert train(build(raw))["train_steps"] == 2  # (8 // 3; kept, the last batch of 2 is a third step)
    cfg = build({"train": {"dataloader_pin_memory": False, "dataloader_drop_last": True}})
    args = _training_args(cfg, SimpleNamespace(eval=None, loss_only=True), str(tmp_path / "args"))
    assert (args.dataloader_pin_memory, args.dataloader_drop_last) == (False, True)


def test_trainable_token_rows_on_a_tied_head_train_under_trls_fused_head(tmp_path):
    """A tied-embedding model with LoRA's trainable_token_indices was refused by trl_trainer (an adapter on lm_head),
    so it could not run TRL's DPO/KTO/GRPO; the fused head reads only lm_head.weight (and .bias, which the token
    layer lacked: an AttributeError inside TRL), and the token layer's weight holds its rows differentiably. Its rows'
    gradients under the fused head equal the unfused loss's (max abs diff ~6e-7 of ~0.6), and a DPO step trains
    them with the base weights unchanged. A LoRA on lm_head is still refused (its rows would never train)."""
    import trl
    from datasets import Dataset
    from test_align_probe11 import PAIRS
    from tiny import save_tiny, tokenizer
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    base = save_tiny(tmp_path / "tied", tie_word_embeddings=True)

    def lora(**extra) -> dt.DeltaModel:
        torch.manual_seed(0)
        config = dt.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM", **extra)
        return dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)

    model = lora(trainable_token_indices=[5, 7, 9])
    tied = model.get_base_model()
    assert tied.lm_head.base_layer.weight is tied.model.embed_tokens.base_layer.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens" in name:
                p.add_(torch.randn_like(p) * 0.3)
    args = trl.DPOConfig(str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                         use_cpu=True, bf16=False, learning_rate=1e-2, save_strategy="no")  # fmt: skip
    trainer = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                             processing_class=tokenizer())  # fmt: skip
    ids = torch.tensor([[1, 5, 7, 3, 9, 2, 5], [4, 9, 9, 7, 1, 5, 6]])
    labels = ids.clone()
    labels[:, :2] = -100
    model.train()

    def grads(**fused) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(input_ids=ids, labels=labels, **fused).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, fused = grads(), grads(fused_lm_head=True)
    assert type(model(input_ids=ids, labels=labels, fused_lm_head=True)).__name__ == "FusedCausalLMOutput"  # TRL's
    rows = next(n for n in plain if "trainable_tokens" in n)
    assert plain[rows].abs().max() > 0.1
    assert max((plain[n] - fused[n]).abs().max().item() for n in plain) < 1e-5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    assert not torch.equal(before[rows], after[rows])
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n and "trainable_tokens" not in n)
    torch.manual_seed(0)
    on_head = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base),
                                 dt.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))  # fmt: skip
    with pytest.raises(ValueError, match=r"^an adapter on lm_head \(\w+\) is not supported under TRL"):
        dt.trl_trainer(trl.DPOTrainer)(model=on_head, args=args, train_dataset=Dataset.from_list(PAIRS),
                                       processing_class=tokenizer())  # fmt: skip


def test_dataloader_keys_are_named_ignored_on_the_stages_with_their_own_loop():
    from deltatune.train.config import ignored_keys

    for stage in ("ppo", "grpo"):
        named = dict(ignored_keys(build({"stage": stage, "train": {"dataloader_drop_last": True}})))
        assert "train.dataloader_drop_last" in named and stage not in named["train.dataloader_drop_last"].split(", ")
    assert not ignored_keys(build({"stage": "dpo", "train": {"dataloader_pin_memory": False}}))


def test_a_best_metric_the_evaluation_does_not_report_is_one_line(files, tmp_path):  # noqa: F811
    """metric_for_best_model naming a metric sft's evaluation has not (accuracy) was the Trainer's KeyError, a
    traceback after the first evaluation: now one line naming the key and the metrics there are."""
    raw = recipe(files, tmp_path / "run", max_steps=1, eval_steps=1, save_steps=1, load_best_model_at_end=True,
                 metric_for_best_model="accuracy")  # fmt: skip
    raw["data"]["eval"] = files["sft"]
    with pytest.raises(ConfigError, match=r"^train.metric_for_best_model is 'accuracy', which stage sft's evaluation "
                       r"during training does not report \(.*\); it reports loss$"):  # fmt: skip
        train(build(raw))


def test_a_run_written_before_the_new_keys_resumes_without_a_change_named(tmp_path):
    """A run.yaml of an older deltatune has no train.adam_beta1, lr_scheduler_kwargs, ... : each was named as changed
    (None -> 0.9) and the resume refused without --resume-changed, though the run trained with those defaults."""
    import yaml

    from deltatune.train.run import RUN_FILE, _check_resume_recipe, _recipe_dict

    recipe_now = _recipe_dict(build({"train": {"max_steps": 2}}))
    old = {**recipe_now, "train": dict(recipe_now["train"])}
    for key in (
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "lr_scheduler_kwargs",
        "load_best_model_at_end",
        "metric_for_best_model",
        "greater_is_better",
        "dataloader_drop_last",
        "dataloader_pin_memory",
    ):
        del old["train"][key]
    (tmp_path / RUN_FILE).write_text(yaml.safe_dump(old))
    assert _check_resume_recipe(str(tmp_path), recipe_now, False) is False
    changed = {**recipe_now, "train": {**recipe_now["train"], "adam_beta2": 0.95}}
    with pytest.raises(ConfigError, match=r"train.adam_beta2: 0.999 -> 0.95"):
        _check_resume_recipe(str(tmp_path), changed, False)


def test_data_seed_orders_the_data_alone_as_the_trainers(files, tmp_path):  # noqa: F811
    """train.data_seed was refused (a hint to train.seed, which seeds both): a run with seed 3 and data_seed 11
    trains as the Trainer with those arguments (adapter max abs diff < 1e-5; the data order differs from seed 3's,
    the start does not)."""
    raw = recipe(files, tmp_path / "ours", data_seed=11)
    train(build(raw))
    adapter = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    _, ref = reference(build(raw), tmp_path / "ref", data_seed=11)
    _, plain = reference(build(raw), tmp_path / "plain")  # data_seed = seed
    diff = max((adapter[k] - ref[k]).abs().max().item() for k in ref)
    moved = max((plain[k] - ref[k]).abs().max().item() for k in ref)
    assert diff < 1e-5 < moved, (diff, moved)
    with pytest.raises(ConfigError, match=r"^train.data_seed: grpo's own loop orders its prompts by train.seed"):
        build({"stage": "grpo", "train": {"data_seed": 1}})


def test_checking_a_schedule_while_validating_warns_nothing():
    """The schedule built once to check its kwargs printed transformers' warning (num_stable_steps over
    num_training_steps) while the recipe was validated, before the run printed it again."""
    import warnings

    import transformers.optimization  # noqa: F401  (its import's own warnings are not the check's)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = build({"train": {"scheduler": "warmup_stable_decay",
                               "lr_scheduler_kwargs": {"num_decay_steps": 2, "num_stable_steps": 5}}})  # fmt: skip
    assert cfg.train.lr_scheduler_kwargs == {"num_decay_steps": 2, "num_stable_steps": 5}


@pytest.mark.parametrize(
    ("scheduler", "kwargs", "floats"),
    [
        ("reduce_lr_on_plateau", "{mode: max, patience: 0, min_lr: 1e-6}", {"mode": "max", "patience": 0, "min_lr": 1e-6}),
        ("cosine_with_min_lr", "{min_lr: 1e-5}", {"min_lr": 1e-5}),
        ("polynomial", "{lr_end: 1e-7, power: 2}", {"lr_end": 1e-7, "power": 2}),
    ],
)  # fmt: skip
def test_schedule_kwargs_yaml_reads_as_text_are_numbers_from_a_recipe_file(tmp_path, scheduler, kwargs, floats):
    """YAML 1.1 reads 1e-6 (no dot) as text: from a recipe file, reduce_lr_on_plateau's min_lr passed the check and
    was torch's TypeError at the first evaluation, cosine_with_min_lr's was refused with a wrong cause. The rate of
    each step equals transformers' schedule built with the numbers (exact), through a plateau's steps too."""
    from transformers import get_scheduler

    from deltatune.train.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"data: {{train: x.jsonl, eval: x.jsonl}}\ntrain: {{scheduler: {scheduler}, lr: 1e-3, "
                    f"lr_scheduler_kwargs: {kwargs}}}\n")  # fmt: skip
    cfg = load_recipe(str(path))
    assert cfg.train.lr_scheduler_kwargs == floats

    def rates(kw: dict) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
        sched = get_scheduler(scheduler, opt, num_warmup_steps=1, num_training_steps=6, scheduler_specific_kwargs=kw)
        out = []
        for _ in range(6):
            opt.step()
            sched.step(*[1.0] * (scheduler == "reduce_lr_on_plateau"))  # (a flat metric: the plateau cuts)
            out.append(opt.param_groups[0]["lr"])
        return out

    assert rates(cfg.train.lr_scheduler_kwargs) == rates(floats)


def test_load_best_model_at_end_needs_a_checkpoint_on_every_evaluation():
    """save_steps a multiple of eval_steps (4 of 2, fractions 0.5 of 0.25) passed: an evaluation off a checkpoint
    that scored best left the Trainer's best_model_checkpoint None, and the run ended with the last step's adapter
    (review: best at step 3, checkpoint-10 kept). Now checkpoints must be the evaluations' steps, in one line."""
    base = {"data": {"train": "x.jsonl", "eval": "x.jsonl"}}
    for evals, save in ((2, 4), (0.25, 0.5), (2, 1), (0.5, 2), (3, None)):
        with pytest.raises(ConfigError) as err:
            build({**base, "train": {"load_best_model_at_end": True, "eval_steps": evals, "save_steps": save}})
        assert str(err.value) == (f"train.load_best_model_at_end needs a checkpoint at each evaluation: "
                                  f"train.save_steps ({save}) must equal train.eval_steps ({evals}), or both be "
                                  "null (each epoch)")  # fmt: skip
    from deltatune.train.config import field_help

    help_text = dict((k, h) for k, _, h in field_help()["train"])["load_best_model_at_end"]
    assert "save_steps equal to eval_steps" in help_text and "multiple" not in help_text


def test_best_model_keys_and_adam_keys_unread_are_named_ignored():
    """metric_for_best_model / greater_is_better without load_best_model_at_end (and, for the metric, no plateau
    schedule), either on ppo or grpo, and adam_beta* with optim sgd trained as if absent, unnamed; an empty metric
    name was taken."""
    from deltatune.train.config import ignored_keys

    ev = {"train": "x.jsonl", "eval": "x.jsonl"}
    named = dict(
        ignored_keys(build({"data": ev, "train": {"metric_for_best_model": "loss", "greater_is_better": True}}))
    )
    assert named == {"train.metric_for_best_model": "sft with train.load_best_model_at_end or train.scheduler "
                     "reduce_lr_on_plateau or greedy", "train.greater_is_better": "sft with train.load_best_model_at_end"}  # fmt: skip
    plateau = build({"data": ev, "train": {"scheduler": "reduce_lr_on_plateau", "metric_for_best_model": "loss"}})
    assert ignored_keys(plateau) == []  # (the plateau steps on it)
    best = build({"data": ev, "train": {"load_best_model_at_end": True, "metric_for_best_model": "loss",
                                       "greater_is_better": False}})  # fmt: skip
    assert ignored_keys(best) == []
    for stage in ("ppo", "grpo"):
        named = dict(ignored_keys(build({"stage": stage, "train": {"metric_for_best_model": "loss"}})))
        assert stage not in named["train.metric_for_best_model"].split(", ")
    sgd = build({"train": {"optim": "sgd", "adam_beta1": 0.5, "adam_epsilon": 1e-3}})
    assert ignored_keys(sgd) == [("train.adam_beta1", "sft with an Adam train.optim"),
                                 ("train.adam_epsilon", "sft with an Adam train.optim")]  # fmt: skip
    assert ignored_keys(build({"train": {"optim": "adamw_torch", "adam_beta1": 0.5}})) == []
    with pytest.raises(ConfigError, match=r"^train.metric_for_best_model is empty; name an evaluation metric"):
        build({"data": ev, "train": {"load_best_model_at_end": True, "metric_for_best_model": ""}})


def test_a_best_metric_only_the_final_evaluation_reports_is_refused_before_the_model_loads(files, tmp_path):  # noqa: F811
    """perplexity is sft's final evaluation's, not the Trainer's evaluations': refused only after the first one
    (the model loaded and a step trained); now before the model loads, and nothing is written."""
    out = tmp_path / "run"
    raw = recipe(files, out, max_steps=2, eval_steps=1, save_steps=1, load_best_model_at_end=True,
                 metric_for_best_model="eval_perplexity")  # fmt: skip
    raw["data"]["eval"] = files["sft"]
    from unittest import mock

    loads = mock.patch("deltatune.train.run.start_model", side_effect=AssertionError("the model loaded"))
    with (
        loads,
        pytest.raises(ConfigError, match=r"^train.metric_for_best_model is 'eval_perplexity', which stage sft"),
    ):
        train(build(raw))
    assert not out.exists()


def test_a_run_yaml_without_a_whole_section_names_none_of_its_keys_changed(tmp_path):
    """A run.yaml of an older deltatune without the align section named each align key changed (None -> 0.1)."""
    import yaml

    from deltatune.train.run import RUN_FILE, _check_resume_recipe, _recipe_dict

    now = _recipe_dict(build({"train": {"max_steps": 2}}))
    (tmp_path / RUN_FILE).write_text(yaml.safe_dump({k: v for k, v in now.items() if k != "align"}))
    assert _check_resume_recipe(str(tmp_path), now, False) is False
    changed = {**now, "align": {**now["align"], "beta": 0.5}}
    with pytest.raises(ConfigError, match=r"in align.beta: 0.1 -> 0.5; pass --resume-changed"):
        _check_resume_recipe(str(tmp_path), changed, False)
