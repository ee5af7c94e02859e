"""The ``deltatune`` command line: help, recipe errors, and train -> eval / merge / generate on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import save_tiny
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from deltatune import BottleneckConfig, LoraConfig, PromptTuningConfig
from deltatune.cli import main
from deltatune.model import DeltaModel, get_delta_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ["train.max_steps=2", "train.report_to=[none]", "train.lr=1e-2"]

GOOD = ["a fine film", "great acting and a warm story", "I loved it", "wonderful, funny and kind"]
BAD = ["a dull film", "boring and far too long", "I hated it", "flat, grim and cold"]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _run(tmp, recipe: str, *overrides: str) -> str:
    out = str(tmp / "run")
    assert main(["train", recipe, *TRAIN_ARGS, f"output.dir={out}", *overrides]) == 0
    return out


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A 2-step LoRA run on a tiny BERT classifier (the real MiniLM tokenizer), with its files."""
    tmp = tmp_path_factory.mktemp("cls")
    model = save_tiny(tmp / "m", "bert", "seq_cls")
    train = _jsonl(
        tmp / "train.jsonl", [{"text": t, "label": 1} for t in GOOD] + [{"text": t, "label": 0} for t in BAD]
    )
    test = _jsonl(
        tmp / "test.jsonl",
        [
            {"text": "a warm and funny film", "label": 1},
            {"text": "grim, dull and long", "label": 0},
            {"text": "I loved the story", "label": 1},
        ],
    )
    recipe = tmp / "cls.yaml"
    recipe.write_text(
        f"stage: cls\nmodel: {{name_or_path: {model}}}\n"
        "method: {name: lora, r: 4, lora_alpha: 8, target_modules: [query, value]}\n"
        f"data: {{train: {train}, eval: {train}, max_length: 32}}\ntrain: {{batch_size: 4}}\n"
    )
    return SimpleNamespace(
        tmp=tmp, model=model, train=train, test=test, recipe=str(recipe), run=_run(tmp, str(recipe))
    )


# Help


@pytest.mark.parametrize(
    "command, options",
    [
        ([], ["train", "eval", "generate", "merge", "info"]),
        (["train"], ["recipe", "overrides", "--overwrite", "--resume"]),
        (["eval"], ["--adapter", "--data", "overrides"]),
        (["generate"], ["--adapter", "--model", "--prompt", "--max-new-tokens", "--num-beams", "--merged"]),
        (["merge"], ["--adapter", "--out", "--model"]),
        (["info"], ["model", "--task"]),
    ],
)
def test_help(capsys, command, options):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: deltatune")
    for option in options:
        assert option in out


def _train_help_lists_recipe_keys(out: str) -> None:
    for key in [
        "stage: one of pt, sft, cls",
        "method.name",
        "method.towers (default [language])",  # popped before the method's config: it was not listed
        "model.name_or_path",
        "data.max_length (default 512)",
        "train.lr (default 0.0002)",
        "train.report_to",
        "output.dir",
    ]:
        assert key in out


def test_train_help_lists_recipe_keys(capsys, monkeypatch):
    # As the console script calls it: main() reading sys.argv.
    monkeypatch.setattr(sys, "argv", ["deltatune", "train", "--help"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    _train_help_lists_recipe_keys(capsys.readouterr().out)


def test_train_help_lists_recipe_keys_when_called_with_argv(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    _train_help_lists_recipe_keys(capsys.readouterr().out)


# Recipe errors and output folders


def test_unknown_key_exits_2_naming_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: cls\ntrain: {lr: 1.0e-3, batch_sise: 4}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "deltatune.cli", "train", str(recipe)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == 2
    assert "unknown key 'train.batch_sise'" in proc.stderr and "did you mean 'batch_size'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_override_returns_2(capsys, cls_run):
    assert main(["train", cls_run.recipe, "method.rr=4", f"output.dir={cls_run.tmp / 'other'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune train: error: unknown key 'method.rr'")
    assert not os.path.exists(cls_run.tmp / "other")


def test_output_folder_with_another_run_is_refused(capsys, cls_run):
    before = sorted(os.listdir(cls_run.run))
    assert main(["train", cls_run.recipe, *TRAIN_ARGS, f"output.dir={cls_run.run}"]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--overwrite" in err and "--resume" in err
    assert sorted(os.listdir(cls_run.run)) == before  # nothing was touched


def test_overwrite_replaces_and_resume_needs_a_checkpoint(capsys, cls_run, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stale.txt").write_text("from an older run", encoding="utf-8")
    assert main(["train", cls_run.recipe, *TRAIN_ARGS, f"output.dir={tmp_path / 'run'}", "--resume"]) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err
    # A folder that is not a deltatune run is never deleted, not even with --overwrite.
    assert main(["train", cls_run.recipe, *TRAIN_ARGS, f"output.dir={tmp_path / 'run'}", "--overwrite"]) == 2
    assert "not a deltatune run" in capsys.readouterr().err
    assert (tmp_path / "run" / "stale.txt").is_file()
    (tmp_path / "run" / "run.yaml").write_text("stage: cls\n", encoding="utf-8")  # an older run's folder
    assert _run(tmp_path, cls_run.recipe, "--overwrite") == str(tmp_path / "run")
    files = os.listdir(tmp_path / "run")
    assert "stale.txt" not in files and "adapter_model.safetensors" in files


# info, eval, merge, generate


def test_info_prints_a_parameter_table(capsys, cls_run):
    assert main(["info", cls_run.model]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(cls_run.model).parameters())
    assert "family (model_type): bert" in out
    assert f"parameters: {total:,d}" in out
    assert "| method (defaults) | trainable params | % of total |" in out
    lora = next(line for line in out.splitlines() if line.startswith("| lora |"))
    assert int(lora.split("|")[2].replace(",", "")) > 0


def test_info_on_a_vision_model_and_bad_input(capsys, tmp_path):
    """A ViT was read as a text classifier (a transformers traceback); a missing model, a file, a folder without a
    config and an unknown or unfitting --task were tracebacks too. Now the image table, and one line each."""
    vit = save_tiny(tmp_path / "vit", "vit", "image_cls")
    assert main(["info", vit]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in AutoModelForImageClassification.from_pretrained(vit).parameters())
    assert "family (model_type): vit    task: IMAGE_CLS" in out and f"parameters: {total:,d}" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines()[8:]}
    assert int(rows["lora"].replace(",", "")) > 0 and int(rows["vpt"].replace(",", "")) > 0
    assert rows["prompt_tuning"].startswith("n/a: model type 'vit' has no token embedding")
    (tmp_path / "empty").mkdir()
    llama = save_tiny(tmp_path / "llama", "llama")
    adapter = tmp_path / "adapter"
    get_delta_model(AutoModelForCausalLM.from_pretrained(llama), LoraConfig(r=2)).save_pretrained(adapter)
    capsys.readouterr()
    assert main(["info", llama]) == 0  # an n/a cell keeps its first clause whole (the vpt row was cut mid-word)
    cells = {
        line.split("|")[1].strip(): line.split("|")[2].strip() for line in capsys.readouterr().out.splitlines()[8:]
    }
    assert (
        cells["vpt"] == "n/a: vpt: visual prompt tuning works on ViT-style models (vit, deit), got model type 'llama'"
    )
    for args, words in [
        ([str(tmp_path / "nowhere")], f"model '{tmp_path / 'nowhere'}': no such folder"),
        ([cls_path := str(tmp_path / "vit" / "config.json")], f"model '{cls_path}' is a file"),
        ([str(tmp_path / "empty")], f"model '{tmp_path / 'empty'}': "),
        ([llama, "--task", "FOO"], "--task 'FOO': one of CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, IMAGE_CLS"),
        ([llama, "--task", "IMAGE_CLS"], f"--task IMAGE_CLS does not fit model '{llama}' (model_type llama)"),
        ([llama, "--task", "image_cls"], "--task IMAGE_CLS does not fit"),  # peft's names in either case
        (
            [str(adapter)],
            f"'{adapter}' is an adapter folder (adapter_config.json); info describes a base model: its "
            f"base is '{llama}'",
        ),  # was "Unrecognized model ... should have a model_type key"
    ]:
        assert main(["info", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"deltatune info: error: {words}"), err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C printed the traceback of wherever torch was; now one line (train: how to go on) and the shell's 130."""
    import deltatune.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    for command, argv in (("train", ["train", "r.yaml"]), ("eval", ["eval", "--adapter", "x"])):
        monkeypatch.setitem(cli._COMMANDS, command, interrupted)
        assert main(argv) == 130
        more = " before its recipe was read; nothing written" if command == "train" else ""  # (no out_dir set)
        assert capsys.readouterr().err == f"deltatune {command}: interrupted{more}\n"
    with pytest.raises(KeyboardInterrupt):
        main(["--debug", "eval", "--adapter", "x"])


def test_train_writes_the_run(cls_run):
    files = set(os.listdir(cls_run.run))
    assert {"adapter_config.json", "adapter_model.safetensors", "run.yaml", "metrics.json", "report.md"} <= files
    with open(os.path.join(cls_run.run, "metrics.json"), encoding="utf-8") as fh:
        metrics = json.load(fh)
    assert metrics["train_steps"] == 2 and {"eval_accuracy", "eval_f1", "eval_loss"} <= set(metrics)


def _delta(cls_run) -> DeltaModel:
    base = AutoModelForSequenceClassification.from_pretrained(cls_run.model)
    return DeltaModel.from_pretrained(base, cls_run.run).eval()


def _batch(cls_run, texts):
    tok = AutoTokenizer.from_pretrained(cls_run.run)
    return tok(texts, return_tensors="pt", padding=True)


def test_eval_prints_metrics_json_on_its_last_line(capsys, cls_run):
    assert main(["eval", "--adapter", cls_run.run, "--data", cls_run.test]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"eval_accuracy", "eval_f1", "eval_loss"} <= set(metrics)
    # The same numbers, computed here from the saved adapter.
    with open(cls_run.test, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    labels = torch.tensor([r["label"] for r in rows])
    with torch.no_grad():
        logits = _delta(cls_run)(**_batch(cls_run, [r["text"] for r in rows])).logits
    assert metrics["eval_accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert metrics["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-4)


def test_eval_takes_a_checkpoint_of_the_run(capsys, cls_run, tmp_path):
    """run/checkpoint-N (the adapter at step N, no run.yaml of its own) is evaluated with its run's recipe and
    tokenizer: checkpoint-2 gives the finished run's figures, checkpoint-1 its own (by hand). It was refused."""
    run = _run(tmp_path, cls_run.recipe, "train.save_steps=1")
    assert sorted(p.name for p in Path(run).glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    def figures(adapter):
        assert main(["eval", "--adapter", adapter, "--data", cls_run.test]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert figures(str(Path(run) / "checkpoint-2")) == figures(run)
    with open(cls_run.test, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    base = AutoModelForSequenceClassification.from_pretrained(cls_run.model)
    with torch.no_grad():
        logits = (
            DeltaModel.from_pretrained(base, str(Path(run) / "checkpoint-1"))
            .eval()(**_batch(cls_run, [r["text"] for r in rows]))
            .logits
        )
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([r["label"] for r in rows])).item()
    first = figures(str(Path(run) / "checkpoint-1"))
    assert first["eval_loss"] == pytest.approx(loss, rel=1e-4) and first["eval_loss"] != figures(run)["eval_loss"]


def test_eval_reads_a_named_file_whole_whatever_the_runs_data_limit(capsys, cls_run, tmp_path):
    """A run trained on data.limit=2 rows: --data FILE scores all 3 rows of FILE (checked by hand), and the run's
    own eval file keeps the run's limit unless the command line sets another. (Its two rows hold one label: the
    classes are named, since whole-number labels are the sorted values seen, 718ab0b.)"""
    run = _run(tmp_path, cls_run.recipe, "data.limit=2", "data.labels=[0,1]")
    with open(cls_run.test, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    base = AutoModelForSequenceClassification.from_pretrained(cls_run.model)
    with torch.no_grad():
        delta = DeltaModel.from_pretrained(base, run).eval()
        logits = delta(**_batch(cls_run, [r["text"] for r in rows])).logits
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([r["label"] for r in rows])).item()
    capsys.readouterr()
    assert main(["eval", "--adapter", run, "--data", cls_run.test]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_loss"] == pytest.approx(loss, rel=1e-4)
    assert main(["eval", "--adapter", run, "--data", cls_run.test, "data.limit=1"]) == 0
    one = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([rows[0]["label"]])).item()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_loss"] == pytest.approx(one, rel=1e-4)


def test_eval_batches_as_the_run_evaluated(monkeypatch, capsys, cls_run):
    """deltatune eval evaluates train.eval_batch_size examples at a time (the run's, or an override), batch_size
    when it has none: as the run's own evaluation did."""
    import transformers

    sizes = []

    class Spy(transformers.TrainingArguments):
        def __post_init__(self):
            super().__post_init__()
            sizes.append(self.per_device_eval_batch_size)

    monkeypatch.setattr(transformers, "TrainingArguments", Spy)
    assert main(["eval", "--adapter", cls_run.run]) == 0
    assert main(["eval", "--adapter", cls_run.run, "train.eval_batch_size=3"]) == 0
    assert sizes == [4, 3]  # the recipe's batch_size is 4
    capsys.readouterr()


def test_eval_runs_at_the_runs_precision(capsys, cls_run, tmp_path):
    """A run trained and evaluated under bf16 autocast: deltatune eval scores its eval file under the same
    precision, to the run's own figures (in fp32 its loss differs in the fifth decimal)."""
    run = _run(tmp_path, cls_run.recipe, "train.precision=bf16")
    with open(os.path.join(run, "metrics.json"), encoding="utf-8") as fh:
        trained = json.load(fh)
    capsys.readouterr()
    assert main(["eval", "--adapter", run]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)
    assert main(["eval", "--adapter", run, "train.precision=fp32"]) == 0
    fp32 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fp32["eval_loss"] != pytest.approx(trained["eval_loss"], abs=1e-6)
    # a GPU's fp16 run (fp16 needs CUDA) evaluated on a CPU: in fp32, not refused
    if not torch.cuda.is_available():
        assert main(["eval", "--adapter", run, "train.precision=fp16"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == fp32


def test_a_run_that_records_more_labels_than_its_classes_still_loads(capsys, cls_run, tmp_path):
    """Before model.num_labels had to equal the data's classes, a run could record more (its head had one output
    per class all the same): eval and merge load such a run folder with the head it saved."""
    import shutil

    import yaml

    run = str(tmp_path / "run")
    shutil.copytree(cls_run.run, run)
    with open(os.path.join(run, "run.yaml"), encoding="utf-8") as fh:
        recipe = yaml.safe_load(fh)
    assert len(recipe["data"]["labels"]) == 2
    recipe["model"]["num_labels"] = 5
    with open(os.path.join(run, "run.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(recipe, fh)
    figures = []
    for folder in (cls_run.run, run):
        assert main(["eval", "--adapter", folder, "--data", cls_run.test]) == 0
        figures.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert figures[1] == figures[0]
    assert main(["merge", "--adapter", run, "--out", str(tmp_path / "merged")]) == 0
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").config.num_labels == 2


def test_eval_compare_rebuilds_the_runs_start(capsys, cls_run, tmp_path):
    """--compare evaluates the run's start (a new classifier head drawn from the recipe's seed, LoRA at identity)
    beside the trained adapter: its figures are those of the run's own evaluation before the first step."""
    run = _run(tmp_path, cls_run.recipe, "train.eval_on_start=true")
    with open(os.path.join(run, "log_history.jsonl"), encoding="utf-8") as fh:
        start = json.loads(fh.readline())  # the run's evaluation before the first step
    assert start["step"] == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", run, "--compare"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads(printed[-1])
    for key in ("eval_loss", "eval_accuracy", "eval_f1"):
        assert metrics[f"{key}_before"] == pytest.approx(start[key], rel=1e-6), key
    with open(os.path.join(run, "metrics.json"), encoding="utf-8") as fh:
        trained = json.load(fh)
    assert metrics["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-6)
    assert printed[-2] == (
        f"eval_accuracy: {start['eval_accuracy']:.4f} before training -> {trained['eval_accuracy']:.4f} after"
    )


def test_eval_compare_refuses_a_t2i_run(capsys, tmp_path):
    (tmp_path / "run.yaml").write_text(
        "stage: t2i\nmodel: {name_or_path: nowhere}\nmethod: {name: lora}\ndata: {train: a.jsonl, eval: a.jsonl}\n",
        encoding="utf-8",
    )
    assert main(["eval", "--adapter", str(tmp_path), "--compare"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltatune eval: error: --compare is not available for t2i runs") and "\n" not in err


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_takes_a_plain_adapter_folder(capsys, cls_run, tmp_path):
    """An adapter folder without run.yaml (the two files peft's save_pretrained writes) is evaluated on --data: its
    base from adapter_config.json, its stage from the task type. Copied out of a run, it scores as the run. It was
    refused ("holds no run.yaml")."""
    import shutil

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(os.path.join(cls_run.run, name), plain / name)
    assert main(["eval", "--adapter", cls_run.run, "--data", cls_run.test]) == 0
    run = _last_json(capsys)
    assert main(["eval", "--adapter", str(plain), "--data", cls_run.test]) == 0
    got = _last_json(capsys)
    assert got["eval_accuracy"] == run["eval_accuracy"]
    assert got["eval_loss"] == pytest.approx(run["eval_loss"], abs=1e-6)


def test_eval_on_a_peft_adapter_gives_peft_models_figures(capsys, cls_run, tmp_path):
    """A LoRA classifier saved by peft itself (random B, so the delta counts; its head in modules_to_save): the
    loss and accuracy deltatune eval prints are those of the peft model on the same rows."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(cls_run.model)
    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False)
    peft = get_peft_model(base, config).eval()
    peft.save_pretrained(tmp_path / "peft")
    tok = AutoTokenizer.from_pretrained(cls_run.model)
    with open(cls_run.test, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    with torch.no_grad():
        logits = torch.cat([peft(**tok(r["text"], return_tensors="pt")).logits for r in rows])
    labels = torch.tensor([r["label"] for r in rows])
    assert main(["eval", "--adapter", str(tmp_path / "peft"), "--data", cls_run.test]) == 0
    got = _last_json(capsys)
    assert got["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), abs=1e-5)
    assert got["eval_accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())


def test_eval_on_a_peft_causal_lm_adapter_reads_the_datas_format(capsys, tmp_path):
    """A causal LM adapter's stage follows its data's format: plain text rows are evaluated as stage pt (blocks of
    data.max_length), and the loss is the peft model's on those blocks."""
    from peft import LoraConfig, get_peft_model

    from deltatune.data.load import read_rows
    from deltatune.data.tasks import encode_pt

    model = save_tiny(tmp_path / "llama", "llama")
    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model), config).eval()
    peft.save_pretrained(tmp_path / "peft")
    data = _jsonl(tmp_path / "text.jsonl", [{"text": t} for t in GOOD + BAD])
    blocks = encode_pt(read_rows(data), AutoTokenizer.from_pretrained(model), "text", 8).examples
    ids = torch.tensor([b["input_ids"] for b in blocks])
    with torch.no_grad():
        expected = peft(input_ids=ids, labels=ids).loss.item()
    assert main(["eval", "--adapter", str(tmp_path / "peft"), "--data", data, "data.max_length=8"]) == 0
    assert _last_json(capsys)["eval_loss"] == pytest.approx(expected, abs=1e-5)


def test_eval_on_a_plain_adapter_folder_refuses_in_one_line(capsys, cls_run, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(os.path.join(cls_run.run, name), plain / name)
    cases = [
        ([], "is an adapter folder without a recipe (run.yaml): pass --data FILE"),
        (["--data", cls_run.test, "--compare"], "--compare rebuilds a run's start from its recipe and seed"),
    ]
    for extra, message in cases:
        assert main(["eval", "--adapter", str(plain), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert main(["eval", "--adapter", str(tmp_path), "--data", cls_run.test]) == 2  # neither run.yaml nor adapter
    assert "or an adapter folder (adapter_config.json)" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["method.r=16", "method=ia3", " method.lora_alpha=2"])
def test_eval_refuses_a_method_override_in_one_line(capsys, cls_run, override):
    """The adapter brings its method and settings, so ``method.*`` was silently ignored by eval (and ``--compare``
    rebuilt a start with the overridden method): now refused in one line naming the override and the adapter."""
    before = sorted(os.listdir(cls_run.run))
    assert main(["eval", "--adapter", cls_run.run, "--data", cls_run.test, "--compare", override]) == 2
    err = capsys.readouterr().err.strip()
    assert f"override {override!r}" in err and "adapter_config.json" in err and "\n" not in err
    assert sorted(os.listdir(cls_run.run)) == before


@pytest.mark.parametrize(
    "config, words",
    [
        (PromptTuningConfig(num_virtual_tokens=2), "prompt_tuning adapter 'default' adds virtual tokens"),
        (BottleneckConfig(), "adapter 'default' (BottleneckLayer) adds a computation of its own"),
    ],
)
def test_merge_of_a_method_that_does_not_fold_in_is_one_line(capsys, tmp_path, config, words):
    """merge (and generate --merged) of a token method's or a bottleneck adapter was merge_adapter's TypeError with
    its traceback; one line now, and no --out folder."""
    llama = save_tiny(tmp_path / "llama", "llama")
    get_delta_model(AutoModelForCausalLM.from_pretrained(llama), config).save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    for argv in (["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")],
                 ["generate", "--adapter", str(tmp_path / "adapter"), "--prompt", "hi", "--merged", "--raw"]):  # fmt: skip
        assert main(argv) == 2
        lines = [
            x for x in capsys.readouterr().err.splitlines() if x and not x.startswith("Loading weights")
        ]  # its bar
        assert len(lines) == 1 and lines[0].startswith(f"deltatune {argv[0]}: error: cannot merge: {words}"), lines
        assert lines[0].endswith("; use the adapter as it is (generate, serve)")
    assert not (tmp_path / "out").exists()


def test_merge_writes_a_plain_transformers_model(capsys, cls_run):
    out = str(cls_run.tmp / "merged")
    assert main(["merge", "--adapter", cls_run.run, "--out", out]) == 0
    assert out in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = _batch(cls_run, ["a warm and funny film", "grim"])
    with torch.no_grad():
        got = merged(**batch).logits
        want = _delta(cls_run)(**batch).logits
        base = AutoModelForSequenceClassification.from_pretrained(cls_run.model).eval()(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - base).abs().max() > 1e-4  # the adapter (and trained head) changed the output


def test_merge_saves_the_model_as_its_base_is_stored(capsys, tmp_path):
    """A bfloat16 base was merged and saved as float32 (twice the size, and not what the base is); now merged in
    float32 and saved in the base's own dtype."""
    base = save_tiny(tmp_path / "llama", "llama")
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)
    get_delta_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, init_lora_weights=False)
    ).save_pretrained(tmp_path / "adapter")
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "config.json", encoding="utf-8") as fh:
        assert json.load(fh)["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    want = DeltaModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter"
    )
    with torch.no_grad():
        got = merged.state_dict()["model.layers.0.self_attn.q_proj.weight"]
        q = want.merge_and_unload().state_dict()["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)
    assert torch.equal(got, q)  # merged in float32, rounded once


def test_generate_prints_text(capsys, tmp_path):
    model = save_tiny(tmp_path / "lm", "llama")
    data = _jsonl(
        tmp_path / "sft.jsonl",
        [{"instruction": f"Count to {n}.", "output": " ".join(["one"] * n)} for n in range(1, 5)],
    )
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        f"stage: sft\nmodel: {{name_or_path: {model}}}\nmethod: {{name: lora, r: 4}}\n"
        f"data: {{train: {data}, max_length: 48}}\ntrain: {{batch_size: 2}}\n",
        encoding="utf-8",
    )
    run = _run(tmp_path, str(recipe))
    capsys.readouterr()
    prompt = "Count to 3."
    assert main(["generate", "--adapter", run, "--prompt", prompt, "--max-new-tokens", "6", "--raw"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    # The same greedy continuation, from the saved adapter.
    tok = AutoTokenizer.from_pretrained(run)
    delta = DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), run).eval()
    enc = tok(prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = delta.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert expected and printed == expected
