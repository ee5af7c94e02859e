"""Training-run invariants: resume after a kill -9 equals an uninterrupted run, accumulation 4 x 2 equals
batch 8, 2-process DDP equals one process with the same global batch, and a NaN loss stops the run with the
last good checkpoint kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny

from deltatune.train import build, train
from deltatune.train.trainer import NonFiniteLossError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory):
    """A tiny BERT classifier with dropout off (so runs that see the same batches compute the same numbers)."""
    path = tmp_path_factory.mktemp("tiny") / "bert"
    return save_tiny(path, "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]
    rows = [{"text": f"a {w} {words[(i * 3) % 8]} film number {i}", "label": i % 2} for i, w in enumerate(words * 4)]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(model: str, data: str, out: str, **train_args) -> dict:
    return {
        "stage": "cls",
        "model": {"name_or_path": model},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {"train": data, "max_length": 32},
        "train": {"batch_size": 8, "lr": 1e-2, "seed": 3, "logging_steps": 1, "report_to": ["none"], **train_args},
        "output": {"dir": out},
    }


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_adapter_trains(tiny_cls, data, tmp_path):
    """The guard for the equalities below: training really moves the adapter and the head."""
    train(build(recipe(tiny_cls, data, str(tmp_path / "a"), max_steps=3)))
    out = adapter(tmp_path / "a")
    assert any("lora_B" in k and out[k].abs().sum() > 0 for k in out)
    assert any("classifier" in k for k in out)


def test_accumulation_equals_big_batch(tiny_cls, data, tmp_path):
    train(build(recipe(tiny_cls, data, str(tmp_path / "big"), max_steps=3, batch_size=8)))
    train(build(recipe(tiny_cls, data, str(tmp_path / "acc"), max_steps=3, batch_size=2, grad_accum=4)))
    # fp32 sums in another order: a few ulps after three AdamW steps.
    assert_same_adapter(adapter(tmp_path / "big"), adapter(tmp_path / "acc"), atol=1e-5)


def _cli(args: list[str], env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deltatune.cli", *args], capture_output=True, text=True, env=env or ENV, timeout=600
    )


def _write_recipe(path, **kw) -> str:
    import yaml

    path.write_text(yaml.safe_dump(recipe(**kw)))
    return str(path)


def test_resume_after_kill_equals_uninterrupted(tiny_cls, data, tmp_path, capsys):
    """Only the killed run needs a process of its own; the others run in this one (process start-up is most of
    their cost)."""
    from deltatune.cli import main

    r = _write_recipe(
        tmp_path / "r.yaml",
        model=tiny_cls,
        data=data,
        out=str(tmp_path / "run"),
        max_steps=8,
        save_steps=2,
        batch_size=4,
    )
    assert main(["train", r, f"output.dir={tmp_path / 'whole'}"]) == 0

    killed = _cli(["train", r], env={**ENV, "DELTATUNE_TEST_KILL_AFTER_STEP": "4"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = sorted(os.listdir(tmp_path / "run"))
    assert "checkpoint-4" in left and "adapter_model.safetensors" not in left
    assert not os.path.exists(tmp_path / "run" / ".staging")

    capsys.readouterr()
    assert main(["train", r]) == 2 and "--resume" in capsys.readouterr().err

    assert main(["train", r, "--resume"]) == 0
    assert_same_adapter(adapter(tmp_path / "whole"), adapter(tmp_path / "run"), atol=1e-6)


@pytest.mark.parametrize("stopped_after", [6, 4])
def test_a_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_run(tiny_cls, data, tmp_path, stopped_after):
    """A run stopped after its last checkpoint (step 6 = max_steps: while writing its outputs) or an earlier one: the
    resumed run trains the steps left, none more, and reports the whole run's training loss. From checkpoint-6 the
    Trainer trained a 7th step (max_steps 6 is no whole number of 8-step epochs), and train_loss was the mean of the
    steps after the resume; the step-0 evaluation ran again at the resume."""
    import shutil

    from deltatune.cli import main

    kw = dict(max_steps=6, save_steps=2, batch_size=4, scheduler="constant", eval_on_start=True)
    whole, run = tmp_path / "whole", tmp_path / "run"
    r = recipe(tiny_cls, data, str(whole), **kw)
    r["data"]["eval"] = data
    metrics = train(build(r))
    shutil.copytree(whole, run)
    for name in os.listdir(run):  # what the run had written when it stopped: its checkpoints, recipe and log
        if not (name.startswith("checkpoint-") and int(name.split("-")[1]) <= stopped_after) and name not in (
            "run.yaml", "log_history.jsonl"):  # fmt: skip
            (shutil.rmtree if (run / name).is_dir() else os.remove)(run / name)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({**r, "output": {"dir": str(run)}}))
    assert main(["train", str(path), "--resume"]) == 0
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["train_steps"] == 6 and resumed["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-6)
    history = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in history if "eval_loss" in h] == [0, 6]
    assert_same_adapter(adapter(whole), adapter(run), atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_cls, data, tmp_path):
    out = tmp_path / "nan"
    cfg = build(recipe(tiny_cls, data, str(out), max_steps=20, save_steps=1, lr=1e30, max_grad_norm=0.0))
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    step = info.value.step
    assert f"step {step}" in str(info.value)
    checkpoints = sorted(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert checkpoints and checkpoints[-1] == step - 1
    last = adapter(out / f"checkpoint-{step - 1}")
    assert all(torch.isfinite(t).all() for t in last.values())
    ended = json.loads((out / "stopped.json").read_text())  # the board shows the run failed, with this line
    assert ended == {"reason": f"NonFiniteLossError: {info.value}".splitlines()[0], "interrupted": False}
    with pytest.raises(Exception, match="already holds files"):  # a refused start leaves the old mark as it was
        train(cfg)
    assert json.loads((out / "stopped.json").read_text()) == ended
    (out / "stopped.json").unlink()
    with pytest.raises(Exception, match="already holds files"):
        train(cfg)
    assert not (out / "stopped.json").exists()  # nor marks a run it never started
    with pytest.raises(NonFiniteLossError):  # a failed --resume is marked too (its run.yaml is not rewritten)
        train(cfg, resume=True)
    assert json.loads((out / "stopped.json").read_text())["reason"].startswith("NonFiniteLossError: ")


@pytest.fixture(scope="module")
def single_eight(tiny_cls, data, tmp_path_factory):
    """One process with the first 8 rows, all of them every step: the run both sharded runs are held to."""
    folder = tmp_path_factory.mktemp("single")
    small = folder / "eight.jsonl"
    small.write_text("\n".join(Path(data).read_text().splitlines()[:8]) + "\n")
    single = _write_recipe(
        folder / "single.yaml", model=tiny_cls, data=str(small), out=str(folder / "single"), epochs=3, batch_size=8
    )
    done = _cli(["train", single])
    assert done.returncode == 0, done.stderr[-2000:]
    return small, folder / "single"


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_equal_single(tiny_cls, single_eight, tmp_path, sharding):
    """2 CPU processes (gloo), 4 rows each, against one process with all 8 rows per step: the same global batch
    (8 rows, every step the whole data set), so the adapters agree to float noise. DDP, and FSDP with only the
    adapter trainable (full_shard, use_orig_params)."""
    import yaml

    small, single = single_eight
    extra = {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"use_orig_params": True, "transformer_layer_cls_to_wrap": ["BertLayer"]},
    }
    multi = recipe(
        tiny_cls, str(small), str(tmp_path / "multi"), epochs=3, batch_size=4, **(extra if sharding == "fsdp" else {})
    )
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump(multi))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = "29533" if sharding == "ddp" else "29534"
    ran = subprocess.run(
        [
            torchrun,
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "deltatune.cli",
            "train",
            str(tmp_path / "multi.yaml"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads((tmp_path / "multi" / "metrics.json").read_text())["train_steps"] == 3
    assert_same_adapter(adapter(single), adapter(tmp_path / "multi"), atol=1e-5)


def test_checkpointing_arguments_use_the_names_transformers_reads(tmp_path):
    """``activation_checkpointing*`` where TrainingArguments has them (5.25 warns on the old names), else the old
    names; nothing when off. Either way the arguments read back as checkpointing, non-reentrant."""
    import warnings

    from transformers import TrainingArguments

    from deltatune.train.run import _checkpointing

    class Old:
        __dataclass_fields__ = {"gradient_checkpointing": None, "gradient_checkpointing_kwargs": None}

    assert _checkpointing(False, TrainingArguments) == {}
    kwargs = {"use_reentrant": False}
    assert _checkpointing(True, Old) == {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = TrainingArguments(tmp_path, use_cpu=True, report_to=[], **_checkpointing(True, TrainingArguments))
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == kwargs


def test_metrics_json_the_finished_mark_is_written_last(tmp_path, monkeypatch):
    """metrics.json marks a run finished (--resume refuses such a run); it was written first, so a Ctrl-C while the
    curve or report.md were written left a run that could neither be resumed nor had a report."""
    from deltatune.train import report

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot", stopped)
    recipe_ = {"stage": "sft", "method": {"name": "lora"}, "model": {"name_or_path": "m"}}
    with pytest.raises(KeyboardInterrupt):
        report.write(str(tmp_path), recipe_, {"train_loss": 1.0}, [{"loss": 1.0, "step": 1}], [], None)
    assert not (tmp_path / "metrics.json").exists()
    monkeypatch.undo()
    report.write(str(tmp_path), recipe_, {"train_loss": 1.0}, [{"loss": 1.0, "step": 1}], [], None)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"train_loss": 1.0}
    assert (tmp_path / "report.md").exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_examples_longer_than_the_models_positions_are_refused(tmp_path):
    """data.max_length above an encoder's learned positions: the first step failed inside torch ("The size of
    tensor a (772) must match the size of tensor b (512)"). One line naming the key, before the folder changes."""
    short = save_tiny(tmp_path / "bert", "bert", "seq_cls", max_position_embeddings=16)
    rows = [{"text": " ".join(["good"] * (5 + i)), "label": i % 2} for i in range(20)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    with pytest.raises(Exception, match=r"^data.max_length=64: the longest train example is 26 tokens, more than "
                                        r"the model's 16 positions; set data.max_length to 16 or less$"):  # fmt: skip
        train(
            build(recipe(short, str(data), str(out), max_steps=1) | {"data": {"train": str(data), "max_length": 64}})
        )
    assert not out.exists()
    metrics = train(
        build(recipe(short, str(data), str(out), max_steps=1) | {"data": {"train": str(data), "max_length": 16}})
    )
    assert metrics["train_steps"] == 1


def test_a_key_the_stage_ignores_is_named_in_the_report(tiny_cls, data, tmp_path):
    """``deltatune train`` prints the note; the run's report.md keeps it, so the run folder says it too."""
    cfg = recipe(tiny_cls, data, str(tmp_path / "r"), max_steps=1)
    cfg["align"] = {"beta": 0.5}
    train(build(cfg))
    assert (
        "align.beta is read by stage dpo, grpo, kto, orpo, simpo, cpo only; stage cls ignored it"
        in (tmp_path / "r" / "report.md").read_text()
    )
