"""Recipes: parsing, dotted overrides with YAML types, and errors that name the key (and the one meant)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from deltatune.config import ConfigError
from deltatune.methods.lora import LoraConfig
from deltatune.train.config import RunConfig, apply_overrides, build, field_help, load_recipe

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "*.yaml")))
QUICKSTART = next(r for r in RECIPES if r.endswith("quickstart.yaml"))
SENTIMENT = next(r for r in RECIPES if r.endswith("sentiment-minilm.yaml"))


def _recipe(tmp_path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_parses(path):
    cfg = load_recipe(path)
    assert isinstance(cfg, RunConfig)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr > 0
    assert cfg.method_config().method == cfg.method["name"]


def test_quickstart_fields():
    """The LLM quick start: LoRA SFT of the embedded SmolLM2 on the identity set, answers shown before/after."""
    cfg = load_recipe(QUICKSTART)
    assert (cfg.stage, cfg.model.name_or_path) == ("sft", "smollm2")
    assert cfg.data.train.endswith("identity_train.jsonl") and cfg.data.eval.endswith("identity_eval.jsonl")
    assert cfg.output.samples == 12 and cfg.train.report_to == ["none"]
    method = cfg.method_config("CAUSAL_LM")
    assert isinstance(method, LoraConfig) and method.target_modules == "all-linear"


def test_sentiment_quickstart_fields():
    cfg = load_recipe(SENTIMENT)
    assert cfg.stage == "cls"
    assert cfg.model.name_or_path == "minilm"
    assert cfg.data.max_length == 64 and cfg.data.train.endswith("sentiment_train.jsonl")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.report_to) == (3, 16, 1e-3, ["none"])
    method = cfg.method_config("SEQ_CLS")
    assert isinstance(method, LoraConfig)
    assert (method.r, method.lora_alpha, method.target_modules, method.task_type) == (
        8,
        16,
        ["query", "value"],
        "SEQ_CLS",
    )


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-4 as the string "5e-4"; a recipe means the number.
    cfg = load_recipe(
        _recipe(tmp_path, "stage: cls\ntrain: {lr: 5e-4, warmup_ratio: 1e-1}\nmethod: {name: lora, lora_alpha: 3e1}\n")
    )
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.warmup_ratio == 0.1
    assert cfg.method_config().lora_alpha == 30.0


def test_overrides_take_yaml_types():
    cfg = load_recipe(
        QUICKSTART,
        [
            "train.lr=1e-4",
            "method.r=16",
            "train.report_to=[none]",
            "data.packing=true",
            "method.target_modules=[query, key, value]",
            "data.labels=[neg, pos]",
            "train.max_steps=1e3",
            "output.dir=/tmp/x y",
            "stage=cls",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.method["r"] == 16 and type(cfg.method["r"]) is int
    assert cfg.method_config().r == 16
    assert cfg.train.report_to == ["none"]
    assert cfg.data.packing is True
    assert cfg.method["target_modules"] == ["query", "key", "value"]
    assert cfg.data.labels == ["neg", "pos"]
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int
    assert cfg.output.dir == "/tmp/x y"


def test_an_int_where_a_float_is_meant_and_one_value_where_a_list_is():
    cfg = load_recipe(QUICKSTART, ["train.lr=1", "train.report_to=none"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.report_to == ["none"]  # not the characters n, o, n, e


def test_apply_overrides_leaves_its_input_alone():
    raw = {"model": {"quantization": {"bits": 8}}, "train": {"lr": 0.1}}
    out = apply_overrides(raw, ["model.quantization.bits=4", "train.lr=0.2", "data.train=a.jsonl"])
    assert out == {"model": {"quantization": {"bits": 4}}, "train": {"lr": 0.2}, "data": {"train": "a.jsonl"}}
    assert raw == {"model": {"quantization": {"bits": 8}}, "train": {"lr": 0.1}}


@pytest.mark.parametrize(
    "override, error",
    [
        ("train.lr", r"override 'train.lr' is not of the form key=value"),
        ("stage.x=1", r"'stage' is not a section"),
    ],
)
def test_malformed_overrides(override, error):
    with pytest.raises(ConfigError, match=error):
        load_recipe(QUICKSTART, [override])


@pytest.mark.parametrize(
    "override, key, near",
    [
        ("model.name_or_pth=x", "model.name_or_pth", "name_or_path"),
        ("data.text_colum=x", "data.text_colum", "text_column"),
        ("train.lrr=0.1", "train.lrr", "lr"),
        ("train.batchsize=4", "train.batchsize", "batch_size"),
        ("output.dirr=x", "output.dirr", "dir"),
        ("method.lora_alpa=4", "method.lora_alpa", "lora_alpha"),
        ("tran.lr=0.1", "tran", "train"),
    ],
)
def test_unknown_key_names_it_and_the_nearest(override, key, near):
    with pytest.raises(ConfigError) as info:
        load_recipe(QUICKSTART, [override])
    assert f"unknown key {key!r}" in str(info.value)
    assert f"did you mean {near!r}?" in str(info.value)


def test_unknown_key_with_nothing_near_lists_the_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'output.zzz' in .*; valid keys: dir, samples, sample_tokens$"):
        load_recipe(QUICKSTART, ["output.zzz=1"])


def test_unknown_stage():
    with pytest.raises(ConfigError, match=r"stage must be one of pt, sft, cls, tag, seq2seq, .*got 'clss'"):
        build({"stage": "clss"})


def test_unknown_method():
    with pytest.raises(ConfigError, match=r"unknown method 'lorra'; registered methods: .*\blora\b"):
        build({"method": {"name": "lorra"}})
    with pytest.raises(ConfigError, match=r"method.name is missing"):
        build({"method": {"r": 4}})


def test_method_given_as_a_name():
    assert build({"method": "ia3"}).method_config().method == "ia3"


@pytest.mark.parametrize(
    "override, error",
    [
        ("method.r=0", r"\br must be a positive integer, got 0"),
        ("method.lora_dropout=1.5", r"lora_dropout"),
        ("train.lr=0", r"train.lr must be > 0, got 0"),
        ("data.labels=[neg, pos, neg]", r"data.labels names 'neg' twice; each class needs its own name"),
        ("train.seed=-1", r"train.seed must be in \[0, 2\*\*32\), got -1"),  # was numpy's ValueError, mid-run
        ("train.seed=4294967296", r"train.seed must be in \[0, 2\*\*32\), got 4294967296"),
        ("output.samples=-1", r"output.samples must be >= 0 and output.sample_tokens >= 1, got -1 and 40"),
        ("output.sample_tokens=0", r"output.samples must be >= 0 and output.sample_tokens >= 1, got 12 and 0"),
        ("train.lr=abc", r"train.lr must be float, got 'abc'"),
        ("train.batch_size=0", r"train.batch_size"),
        ("train.batch_size=2.5", r"train.batch_size must be int, got 2.5"),
        ("data.max_length=0", r"data.max_length must be >= 1"),
        ("data.truncation=cut", r"data.truncation must be 'truncate' or 'refuse', got 'cut'"),
        ("train.precision=fp64", r"train.precision must be"),
        ("data.packing=maybe", r"data.packing must be bool, got 'maybe'"),
        # method fields are checked against their annotations too: these were TypeErrors from inside the method
        ("method.target_modules=5", r"^method.target_modules must be list or str or null, got 5$"),
        ("method.lora_dropout=nan", r"^method.lora_dropout must be float, got 'nan'$"),
        ("method.lora_dropout=.nan", r"^method.lora_dropout must be a finite number, got nan$"),
        ("train.lr=.inf", r"^train.lr must be a finite number, got inf$"),  # trained until the loss was nan
        ("train.epochs=.inf", r"^train.epochs must be a finite number, got inf$"),
    ],
)
def test_bad_values_name_the_field(override, error):
    with pytest.raises(ConfigError, match=error):
        load_recipe(QUICKSTART, [override])


def test_an_unknown_quantization_key_is_refused_before_the_model_loads():
    """model.quantization={bit: 4} was a TypeError traceback from quantize(), after the model had loaded."""
    import inspect

    from deltatune import quantize

    with pytest.raises(ConfigError, match=r"unknown key 'model.quantization.bit' .*did you mean 'bits'\?"):
        load_recipe(QUICKSTART, ["model.quantization={bit: 4}"])
    keys = list(inspect.signature(quantize).parameters)[1:]
    cfg = load_recipe(QUICKSTART, [f"model.quantization={{{', '.join(f'{k}: null' for k in keys)}}}"])
    assert list(cfg.model.quantization) == keys  # every key quantize() takes is known


def test_schedules_that_cannot_run_from_a_recipe_are_refused_in_one_line():
    """cosine_with_min_lr and warmup_stable_decay need scheduler kwargs a recipe has no key for, and the schedules
    that step on the eval loss need an evaluation: each was a traceback once training began."""
    for name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"):
        with pytest.raises(ConfigError, match=rf"^train.scheduler={name} needs train.lr_scheduler_kwargs"):
            load_recipe(QUICKSTART, [f"train.scheduler={name}"])
    for name in ("reduce_lr_on_plateau", "greedy"):
        with pytest.raises(ConfigError, match=rf"^train.scheduler={name} steps on the eval loss"):
            load_recipe(QUICKSTART, [f"train.scheduler={name}", "data.eval=null", "train.eval_on_start=false"])
    assert load_recipe(QUICKSTART, ["train.scheduler=reduce_lr_on_plateau"]).train.scheduler == "reduce_lr_on_plateau"


def test_an_evaluation_scheduled_without_eval_data_is_refused():
    """``train.eval_steps`` or ``train.eval_on_start`` with no ``data.eval`` was silently without effect (the run
    trained with no evaluation at all); PPO and GRPO evaluate before and after only, so eval_steps is refused there."""
    with pytest.raises(ConfigError, match=r"^train.eval_on_start schedules an evaluation, but data.eval is not set"):
        load_recipe(QUICKSTART, ["data.eval=null"])  # the quick start has eval_on_start: true
    with pytest.raises(ConfigError, match=r"^train.eval_steps schedules an evaluation, .*drop train.eval_steps$"):
        load_recipe(QUICKSTART, ["data.eval=null", "train.eval_on_start=false", "train.eval_steps=4"])
    assert load_recipe(QUICKSTART, ["data.eval=null", "train.eval_on_start=false"]).data.eval is None
    assert load_recipe(QUICKSTART, ["train.eval_steps=4"]).train.eval_steps == 4
    grpo = next(r for r in RECIPES if r.endswith("grpo-arithmetic.yaml"))
    with pytest.raises(ConfigError, match=r"^train.eval_steps: grpo evaluates data.eval after training"):
        load_recipe(grpo, ["train.eval_steps=4"])


def test_settings_the_ppo_and_grpo_loops_never_read_are_refused():
    """grad_accum 4 trained the same adapter as 1, bit for bit, in both loops (and bf16 the same as fp32 in PPO's,
    which has no autocast), while run.yaml and the report stated them. PPO's loop splits each mini-batch into
    grad_accum micro-batches since 2026-12-06 (TRL's gradient_accumulation_steps), so only GRPO refuses it."""
    grpo = next(r for r in RECIPES if r.endswith("grpo-arithmetic.yaml"))
    ppo = next(r for r in RECIPES if r.endswith("ppo.yaml"))
    with pytest.raises(ConfigError, match=r"^train.grad_accum: grpo takes one update per batch of "):
        load_recipe(grpo, ["train.grad_accum=4"])
    assert load_recipe(ppo, ["train.grad_accum=4"]).train.grad_accum == 4  # micro-batches per mini-batch, as TRL
    for precision in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=rf"^train.precision: ppo trains in fp32 .*, got {precision}$"):
            load_recipe(ppo, [f"train.precision={precision}"])
    assert load_recipe(grpo, ["train.precision=bf16"]).train.precision == "bf16"  # GRPO's loop runs autocast


def test_overrides_after_a_flag_are_overrides(capsys):
    """``train RECIPE --overwrite train.lr=0``: a key=value after a flag is an override (it was argparse's
    "unrecognized arguments"); an unknown flag is still refused."""
    from deltatune.cli import main

    assert main(["train", QUICKSTART, "--overwrite", "train.lr=0"]) == 2
    assert capsys.readouterr().err.strip() == "deltatune train: error: train.lr must be > 0, got 0.0"
    with pytest.raises(SystemExit):
        main(["train", QUICKSTART, "--overwrite", "train.lr=0", "--zzz"])
    assert "unrecognized arguments: --zzz" in capsys.readouterr().err


def test_a_recipe_read_from_a_pipe(tmp_path):
    """``deltatune train /dev/stdin`` (or a shell's ``<(...)``) was "does not exist": a pipe is not a regular file."""
    import threading

    pipe = tmp_path / "recipe"
    os.mkfifo(pipe)
    text = Path(QUICKSTART).read_text(encoding="utf-8")
    writer = threading.Thread(target=lambda: pipe.write_text(text, encoding="utf-8"))
    writer.start()
    try:
        assert load_recipe(str(pipe), ["train.lr=0.5"]).train.lr == 0.5
    finally:
        writer.join()


def test_section_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match=r"train must be a mapping"):
        build({"train": [1, 2]})


def test_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(
        ConfigError, match=r"\.yaml:2: not valid YAML: expected the node content, but found '<stream end>'$"
    ):
        load_recipe(_recipe(tmp_path, "train: {lr: [\n"))  # the file's line (it named "<unicode string>")
    with pytest.raises(ConfigError, match=r"\.yaml:3: not valid YAML: mapping values are not allowed here$"):
        load_recipe(_recipe(tmp_path, "stage: sft\ntrain:\n  lr: a: b\n"))
    (tmp_path / "bin.yaml").write_bytes(b"stage: sft\n\xff\xfe")
    with pytest.raises(ConfigError, match=r"bin.yaml is not UTF-8 text \(byte 11\)"):
        load_recipe(str(tmp_path / "bin.yaml"))
    with pytest.raises(ConfigError, match="is a folder; give a recipe file"):  # was "does not exist"
        load_recipe(str(tmp_path))
    with pytest.raises(ConfigError, match=r"a recipe is a mapping of sections .*, got a list$"):  # a dict() error
        load_recipe(_recipe(tmp_path, "- stage: sft\n"))


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """YAML keeps the last of two equal keys: a second train: section replaced the first whole (its lr gone)."""
    path = _recipe(tmp_path, "stage: sft\ntrain: {lr: 1.0e-3}\nmodel: {name_or_path: minilm}\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"r.yaml:4: key 'train' is given twice \(first on line 2\)"):
        load_recipe(path)
    with pytest.raises(ConfigError, match=r":2: key 'lr' is given twice \(first on line 2\)"):  # within a section
        load_recipe(_recipe(tmp_path, "stage: sft\ntrain: {lr: 1.0e-3, epochs: 1, lr: 2.0e-3}\n"))
    assert load_recipe(_recipe(tmp_path, "stage: sft\ntrain: {lr: 1.0e-3}\n")).train.lr == 1e-3


def test_defaults_and_field_help():
    cfg = build({})
    assert (cfg.stage, cfg.method, cfg.train.lr) == ("sft", {"name": "lora"}, 2e-4)
    help_ = field_help()
    assert list(help_) == ["model", "data", "train", "align", "output"]
    keys = {section: [k for k, _, _ in rows] for section, rows in help_.items()}
    assert {"name_or_path", "dtype"} <= set(keys["model"]) and {"lr", "max_steps", "report_to"} <= set(keys["train"])
    assert all(text for rows in help_.values() for _, _, text in rows)  # every key has its help line
    assert dict((k, d) for k, d, _ in help_["train"])["lr"] == 2e-4


@pytest.mark.parametrize(("fast", "want"), [(True, "bfloat16"), (False, "float32")])
def test_model_dtype_auto_is_bf16_only_where_the_machine_has_fast_bf16(monkeypatch, fast, want):
    import torch

    from deltatune.train import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert models.fast_bf16() is fast and models.resolved_dtype("auto") == want
    assert models.resolved_dtype("float16") == "float16"  # a dtype asked for by name is kept


def test_a_bad_model_dtype_is_one_line_naming_the_key():
    from deltatune.train.models import load_model

    with pytest.raises(ConfigError, match="model.dtype must be float32, bfloat16, float16 or auto, got 'fp8'"):
        load_model("unused", "CAUSAL_LM", "fp8")


@pytest.mark.parametrize(
    ("override", "said"),
    [("stage=[sft]", "stage must be one of pt, sft, "),
     ("method=[lora]", "method must be a method's name or a mapping with a name"),
     ("method.name=[lora]", "method must be a method's name or a mapping with a name"),
     ("data.labels=[[0],[1]]", r"data.labels must be a list of class names, got \[\[0\], \[1\]\]$"),
     # YAML's yes/no are True/False, and True is the key 1: the classes swapped with JSON true/false labels
     ("data.labels=[yes,no]", r"data.labels must be a list of class names, got \[True, False\]; YAML reads yes, no"),
     ("data.labels=[a,off]", r"data.labels must be a list of class names, got \['a', False\]; YAML reads yes"),
     ("train.fsdp=full_shard nosuch", "train.fsdp: unknown option 'nosuch'; options: auto_wrap, full_shard"),
     ("output.dir=''", "output.dir is empty"),
     ("data.max_target_length=0", "data.max_target_length must be >= 1, got 0"),
     ("data.max_target_length=-5", "data.max_target_length must be >= 1, got -5")],
)  # fmt: skip
def test_values_of_the_wrong_shape_are_one_line(override, said):
    """Each was a traceback (unhashable list, 'int' has no attribute 'items', transformers' FSDP error, the Trainer's
    makedirs(''), T5's shift), or (max_target_length -5) trained on targets cut from the end, silently."""
    with pytest.raises(ConfigError, match=f"^{said}"):
        load_recipe(QUICKSTART, [override])


def test_a_recursive_anchor_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stage: &x [*x]\n")
    with pytest.raises(ConfigError, match=r"r.yaml: a YAML anchor refers to itself"):
        load_recipe(str(path))


def test_a_tilde_is_the_home_folder_in_every_path(monkeypatch, tmp_path):
    """output.dir=~/runs/x put the checkpoints in $HOME/runs/x (the Trainer expands it) and the adapter, run.yaml and
    metrics in ./~/runs/x (deltatune did not): one run in two folders, and --resume found no checkpoint. A model or
    data path under ~ was refused as missing."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_recipe(QUICKSTART, ["output.dir=~/runs/x", "model.name_or_path=~/m", "data.train=~/t.jsonl",
                                   "data.eval=~/e.jsonl"])  # fmt: skip
    assert (cfg.output.dir, cfg.model.name_or_path) == (f"{tmp_path}/runs/x", f"{tmp_path}/m")
    assert (cfg.data.train, cfg.data.eval) == (f"{tmp_path}/t.jsonl", f"{tmp_path}/e.jsonl")


def test_overrides_into_a_shorthand_or_empty_section():
    """``method: lora`` and an empty ``train:`` are valid recipes; overriding a key in them was refused as "'method'
    is not a section"."""
    raw = {"stage": "sft", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "method": "lora",
           "train": None}  # fmt: skip
    cfg = build(apply_overrides(raw, ["method.r=16", "train.lr=1e-3"]))
    assert cfg.method == {"name": "lora", "r": 16} and cfg.train.lr == 1e-3
    with pytest.raises(ConfigError, match=r"^override 'stage.x': 'stage' is not a section"):
        apply_overrides(raw, ["stage.x=1"])


def test_a_fusion_recipe_is_refused_saying_where_fusion_is_made():
    """No recipe key loads the bottleneck adapters a fusion combines: the run failed after loading the model with
    "no bottleneck adapter named 'sst2' in the model", a dead end."""
    with pytest.raises(ConfigError, match=r"^method.name=fusion: it combines bottleneck adapters already trained, .*"
                                          r"model.add_fusion"):  # fmt: skip
        load_recipe(QUICKSTART, ["method={name: fusion, adapter_names: [a, b]}"])
