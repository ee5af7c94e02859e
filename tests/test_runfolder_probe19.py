"""Probe 19 of run folders, checkpoints and resume against transformers 5.25's Trainer: a checkpoint lacking the
state the Trainer would quietly go on without, a model.dtype 'auto' that resolves otherwise on resume, a moved
base."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "reliability"))
from reliability_helpers import ROWS, cli, one_error_line, write_recipe  # noqa: E402
from tiny import save_tiny  # noqa: E402

from deltatune.config import ConfigError  # noqa: E402
from deltatune.train.runfolder import resume_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """A tiny classifier trained 6 steps uninterrupted, a checkpoint every 2."""
    tmp = tmp_path_factory.mktemp("probe19")
    model = save_tiny(tmp / "bert", "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    run = tmp / "whole"
    recipe = write_recipe(
        tmp / "whole.yaml", model, str(data), str(run), max_steps=6, save_steps=2, save_total_limit=None
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err
    return SimpleNamespace(tmp=tmp, model=model, data=str(data), run=run)


def _stopped_at_4(whole, tmp_path):
    """The run as a stop after step 4's checkpoint left it (its checkpoints 2 and 4, run.yaml, the live log)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(whole.run / name, out / name)
    for name in ("run.yaml", "log_history.jsonl"):
        shutil.copy(whole.run / name, out / name)
    recipe = write_recipe(
        tmp_path / "r.yaml", whole.model, whole.data, str(out), max_steps=6, save_steps=2, save_total_limit=None
    )
    return out, recipe


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors"])
def test_a_checkpoint_without_the_state_the_trainer_skips_is_passed_over_by_name(whole, tmp_path, name):
    """The Trainer's _load_optimizer_and_scheduler loads nothing when optimizer.pt or scheduler.pt is missing, and
    _load_rng_state only logs a missing rng_state.pth: the run went on from a fresh AdamW (its adapter 0.019 off the
    uninterrupted run's); without its adapter's weights the resume was refused, not taken from the checkpoint
    before. Such a checkpoint is skipped, named, for the newest complete one."""
    out, _ = _stopped_at_4(whole, tmp_path)
    os.remove(out / "checkpoint-4" / name)
    path, notes = resume_checkpoint(str(out))
    assert os.path.basename(path) == "checkpoint-2"
    assert notes == [f"checkpoint-4 is unreadable (no {name}); skipped"]
    os.remove(out / "checkpoint-2" / name)
    with pytest.raises(ConfigError, match=f"checkpoint-2 is unreadable \\(no {name}\\)"):
        resume_checkpoint(str(out))


def test_a_resume_past_a_checkpoint_without_its_optimizer_ends_as_the_uninterrupted_run(whole, tmp_path):
    out, recipe = _stopped_at_4(whole, tmp_path)
    os.remove(out / "checkpoint-4" / "optimizer.pt")
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    assert "checkpoint-4 is unreadable (no optimizer.pt); skipped" in err
    a, b = load_file(whole.run / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-7, rtol=0)


def test_a_resume_where_dtype_auto_resolves_otherwise_is_refused_naming_it(whole, tmp_path, monkeypatch):
    """run.yaml records model.dtype 'auto', not what it resolved to: a run begun in bfloat16 (a GPU) and resumed on a
    CPU without fast bf16 went on in float32, a change the recipe comparison cannot see. The checkpoint records it."""
    import yaml

    from deltatune.train import models
    from deltatune.train.runfolder import facts_changes, run_facts
    from deltatune.train.trainer import SUMS

    out, recipe = _stopped_at_4(whole, tmp_path)
    for path in (out / "run.yaml", recipe):
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        data["model"]["dtype"] = "auto"
        Path(path).write_text(yaml.safe_dump(data), encoding="utf-8")
    from deltatune.train import load_recipe

    cfg = load_recipe(recipe)
    monkeypatch.setattr(models, "fast_bf16", lambda: True)
    began = run_facts(cfg)
    assert began["model.dtype"] == "bfloat16"
    sums = out / "checkpoint-4" / SUMS
    sums.write_text(json.dumps({**json.loads(sums.read_text()), "facts": began}))
    assert facts_changes(str(out / "checkpoint-4"), began) == []
    monkeypatch.setattr(models, "fast_bf16", lambda: False)
    said = "model.dtype auto resolved to bfloat16 when the run began, to float32 on this machine"
    assert facts_changes(str(out / "checkpoint-4"), run_facts(cfg)) == [said]
    before = sorted(os.listdir(out))
    code, _, err = cli("train", recipe, "--resume")
    line = one_error_line(err)
    assert code == 2 and said in line and "--resume-changed" in line
    assert sorted(os.listdir(out)) == before
    # an explicit dtype is the recipe's to compare, and a checkpoint from before records none: no fact
    cfg.model.dtype = "float32"
    assert "model.dtype" not in run_facts(cfg)


def test_a_run_whose_base_moved_says_to_pass_model(whole, tmp_path):
    """generate / chat / merge of a run whose recorded base is gone: the one line says --model takes its new place
    (it named only the missing folder); with --model the run loads and generates as before."""
    import yaml

    run = tmp_path / "copied"
    shutil.copytree(whole.run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    moved = tmp_path / "moved-bert"
    shutil.copytree(whole.model, moved)
    recipe = yaml.safe_load((run / "run.yaml").read_text(encoding="utf-8"))
    recipe["model"]["name_or_path"] = str(tmp_path / "gone" / "bert")
    (run / "run.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, _, err = cli("merge", "--adapter", str(run), "--out", str(tmp_path / "m"))
    line = one_error_line(err, "merge")
    assert code == 2 and "gone/bert': no such folder; if the base moved, pass --model" in line
    code, _, err = cli("merge", "--adapter", str(run), "--out", str(tmp_path / "m"), "--model", str(moved))
    assert code == 0, err
    code, _, err = cli("merge", "--adapter", str(run), "--out", str(tmp_path / "n"), "--model", str(tmp_path / "x"))
    assert code == 2 and "--model" in one_error_line(err, "merge") and "if the base moved" not in err


def test_ctrl_c_after_the_run_finished_does_not_send_to_resume(whole, tmp_path, monkeypatch):
    """A Ctrl-C while the summary prints (train() returned) said "--resume continues from its newest checkpoint",
    where --resume refuses a finished run. It is said finished by train() having returned (args.finished): with no
    metrics.json in the folder yet, and under --overwrite, whose folder holds the old run's metrics.json."""
    import deltatune.cli as cli_module
    import deltatune.train as train_module

    run = tmp_path / "finished"
    shutil.copytree(whole.run, run, ignore=shutil.ignore_patterns("metrics.json"))
    recipe = write_recipe(tmp_path / "r.yaml", whole.model, whole.data, str(run), max_steps=6, save_steps=2)
    monkeypatch.setattr(train_module, "train", lambda cfg, **kw: {"train_loss": 0.5})

    def interrupted(metrics):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_print_change", interrupted)
    finished = f"deltatune train: interrupted after the run finished; metrics.json and report.md are in {run}"
    code, _, err = cli("train", recipe)
    assert (code, err.strip()) == (130, finished)
    shutil.copy(whole.run / "metrics.json", run / "metrics.json")  # (what the real train() wrote)
    code, _, err = cli("train", recipe, "--overwrite")
    assert (code, err.strip()) == (130, finished)
    monkeypatch.undo()
    code, _, err = cli("train", recipe, "--resume")  # what the old line sent the user to
    assert code == 2 and "is finished" in one_error_line(err)


def test_ctrl_c_in_an_overwrite_of_a_finished_run_before_its_first_step_says_the_old_run_is_kept(
    whole, tmp_path, monkeypatch
):
    """train --overwrite of a finished run, interrupted while its model loads, said "after the run finished;
    metrics.json and report.md are in ..." (the old run's, not this one's). The old run is kept as it was."""
    import deltatune.train.run as run_module

    run = tmp_path / "finished"
    shutil.copytree(whole.run, run)
    recipe = write_recipe(tmp_path / "r.yaml", whole.model, whole.data, str(run), max_steps=6, save_steps=2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "start_model", interrupted)
    code, _, err = cli("train", recipe, "--overwrite")
    assert code == 130
    assert err.strip().splitlines()[-1] == (
        f"deltatune train: interrupted before the new run's first step; the finished run in {run} is kept as it was"
    )
    assert (run / "metrics.json").read_bytes() == (whole.run / "metrics.json").read_bytes()


def test_a_resumed_runs_logged_summary_is_the_whole_runs_as_its_metrics(whole, tmp_path):
    """The Trainer's closing log (train_loss, train_runtime) covers the steps since the resume: log_history.jsonl
    of a run resumed at step 4 of 6 said train_loss 0.6808 where its metrics.json (and the uninterrupted run) said
    0.6945. The log now carries the whole run's figures, as metrics.json and report.md do."""
    out, recipe = _stopped_at_4(whole, tmp_path)
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    logged = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    summary = logged[-1]
    assert summary["train_loss"] == metrics["train_loss"]
    sums = json.loads((out / "checkpoint-4" / "deltatune_sums.json").read_text())
    assert metrics["train_runtime_s"] > sums["runtime_s"]  # (the steps before the resume, and those after)
    assert abs(summary["train_runtime"] - metrics["train_runtime_s"]) <= 0.01
    uninterrupted = [json.loads(line) for line in (whole.run / "log_history.jsonl").read_text().splitlines()]
    assert abs(summary["train_loss"] - uninterrupted[-1]["train_loss"]) <= 1e-7
    assert f"| train_loss | {metrics['train_loss']:.4f} |" in (out / "report.md").read_text()
    # the per-step losses are the uninterrupted run's
    steps = [(h["step"], h["loss"]) for h in logged if "loss" in h]
    assert steps == [(h["step"], h["loss"]) for h in uninterrupted if "loss" in h]


def test_a_moved_run_resumed_keeps_and_loads_its_best_checkpoint(whole, tmp_path):
    """load_best_model_at_end: trainer_state.json names the best checkpoint by the path the run had. Moved, then
    resumed, the Trainer dropped that path ("does not exist anymore"), its rotation (save_total_limit 1) deleted the
    best checkpoint, and the run ended with its last adapter (0.072 off; eval_loss 0.7004 for the best's 0.6956). It
    keeps and loads its best, as the uninterrupted run does."""
    import yaml

    def recipe(path, out, limit):
        r = write_recipe(path, whole.model, whole.data, str(out), max_steps=6, save_steps=2, eval_steps=2, lr=0.05,
                         save_total_limit=limit, load_best_model_at_end=True)  # fmt: skip
        data = yaml.safe_load(Path(r).read_text(encoding="utf-8"))
        data["data"]["eval"] = whole.data
        Path(r).write_text(yaml.safe_dump(data), encoding="utf-8")
        return r

    best = tmp_path / "best"
    code, _, err = cli("train", recipe(tmp_path / "b.yaml", best, None))
    assert code == 0, err
    state = json.loads((best / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_global_step"] == 2
    out = tmp_path / "moved"
    out.mkdir()
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(best / name, out / name)
        path = out / name / "trainer_state.json"
        state = json.loads(path.read_text())
        state["best_model_checkpoint"] = str(tmp_path / "gone" / "checkpoint-2")  # where it was written
        path.write_text(json.dumps(state))
    for name in ("run.yaml", "log_history.jsonl"):
        shutil.copy(best / name, out / name)
    code, _, err = cli("train", recipe(tmp_path / "m.yaml", out, 1), "--resume")
    assert code == 0, err
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2"]  # the best, kept
    a, b = load_file(best / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)
    assert (
        json.loads((out / "metrics.json").read_text())["eval_loss"]
        == json.loads((best / "metrics.json").read_text())["eval_loss"]
    )


def _best_recipe(whole, path, out, limit):
    """A recipe evaluating every 2 steps that loads its best checkpoint at the end."""
    import yaml

    r = write_recipe(path, whole.model, whole.data, str(out), max_steps=6, save_steps=2, eval_steps=2, lr=0.05,
                     save_total_limit=limit, load_best_model_at_end=True)  # fmt: skip
    data = yaml.safe_load(Path(r).read_text(encoding="utf-8"))
    data["data"]["eval"] = whole.data
    Path(r).write_text(yaml.safe_dump(data), encoding="utf-8")
    return r


def test_a_run_resumed_with_its_folder_spelled_otherwise_keeps_its_best_checkpoint(whole, tmp_path, monkeypatch):
    """Begun with a relative output.dir, resumed with the same folder spelled absolute (save_total_limit 1): the
    callback kept the recorded 'run/checkpoint-2' (the same folder), the Trainer's rotation compares path strings
    with output_dir's glob, deleted the best checkpoint, and load_best_model_at_end failed (exit 2, no
    metrics.json). It keeps and loads its best, as the uninterrupted run does."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("train", _best_recipe(whole, tmp_path / "a.yaml", "run", None))
    assert code == 0, err
    out = tmp_path / "run"
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["best_model_checkpoint"], state["best_global_step"]) == (os.path.join("run", "checkpoint-2"), 2)
    uninterrupted = {
        "metrics": json.loads((out / "metrics.json").read_text()),
        "adapter": load_file(out / "adapter_model.safetensors"),
    }
    (out / "metrics.json").unlink()  # as a stop after step 4's checkpoint left it
    shutil.rmtree(out / "checkpoint-6")
    code, _, err = cli("train", _best_recipe(whole, tmp_path / "b.yaml", out, 1), "--resume")
    assert code == 0, err
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2"]  # the best, kept
    adapter = load_file(out / "adapter_model.safetensors")
    for k, v in uninterrupted["adapter"].items():
        torch.testing.assert_close(adapter[k], v, atol=0, rtol=0)
    assert json.loads((out / "metrics.json").read_text())["eval_loss"] == uninterrupted["metrics"]["eval_loss"]


def test_a_copied_run_without_its_best_checkpoint_does_not_load_the_original_folders(tmp_path, capsys):
    """A run folder copied without its best checkpoint (checkpoint-2), the original folder still there: the resumed
    run kept the recorded path into the original folder, and load_best_model_at_end read that folder's adapter.
    Its best is now none (a line says so); one inside the folder, however spelled, is the folder's own."""
    from transformers.trainer_callback import TrainerState

    from deltatune.train.trainer_callbacks import BestInThisFolder

    orig, copy = tmp_path / "orig", tmp_path / "copy"
    for d in (orig / "checkpoint-2", orig / "checkpoint-4", copy / "checkpoint-4", copy / "checkpoint-6"):
        d.mkdir(parents=True)

    def best(out, recorded, step):
        state = TrainerState(global_step=6, best_model_checkpoint=recorded, best_global_step=step)
        BestInThisFolder().on_train_begin(SimpleNamespace(output_dir=str(out)), state, None)
        return state.best_model_checkpoint

    assert best(copy, str(orig / "checkpoint-2"), 2) is None
    assert f"the best checkpoint ({orig / 'checkpoint-2'}) is not in {copy}" in capsys.readouterr().err
    assert best(copy, str(orig / "checkpoint-4"), 4) == str(copy / "checkpoint-4")  # copied too: the copy's own
    assert best(orig, str(orig / "checkpoint-2"), 2) == str(orig / "checkpoint-2")
    assert best(copy, str(tmp_path / "gone" / "checkpoint-2"), 2) == str(tmp_path / "gone" / "checkpoint-2")
    assert capsys.readouterr().err == ""  # (a path that is gone the Trainer drops itself)


def test_a_two_process_checkpoint_without_each_processes_rng_state_is_named(whole, tmp_path):
    """A checkpoint of a 2-process run (its deltatune_sums.json records world_size 2) holds rng_state_0.pth and
    rng_state_1.pth (the Trainer's _save_rng_state, one per process); with rng_state_1.pth alone it read as whole,
    and process 0's _load_rng_state only logs the missing file and goes on with other draws."""
    from deltatune.train.runfolder import readable

    ck = tmp_path / "checkpoint-4"
    shutil.copytree(whole.run / "checkpoint-4", ck)
    sums = json.loads((ck / "deltatune_sums.json").read_text())
    sums["facts"]["world_size"] = 2
    (ck / "deltatune_sums.json").write_text(json.dumps(sums))
    (ck / "rng_state.pth").rename(ck / "rng_state_1.pth")
    assert readable(str(ck)) == "no rng_state_0.pth"
    shutil.copy(ck / "rng_state_1.pth", ck / "rng_state_0.pth")
    assert readable(str(ck)) is None
    (ck / "rng_state_1.pth").unlink()
    assert readable(str(ck)) == "no rng_state_1.pth"
    assert readable(str(whole.run / "checkpoint-4")) is None  # one process: rng_state.pth


@pytest.mark.parametrize("where", ["file", "offline hub id"])
def test_a_run_whose_base_is_a_file_or_an_uncached_hub_id_offline_is_not_said_to_have_moved(
    whole, tmp_path, monkeypatch, where
):
    """The "if the base moved, pass --model" hint belongs to a recorded base folder that is gone; a base that is a
    file, or a hub id with the hub offline and no cached copy, got it too."""
    import yaml

    run = tmp_path / "copied"
    shutil.copytree(whole.run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    recipe = yaml.safe_load((run / "run.yaml").read_text(encoding="utf-8"))
    if where == "file":
        (tmp_path / "bert").write_text("not a model", encoding="utf-8")
        recipe["model"]["name_or_path"] = str(tmp_path / "bert")
        want = "bert' is a file; give a model folder (config.json and weights) or a hub id"
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        recipe["model"]["name_or_path"] = "deltatune-nobody/not-a-model"
        want = "is not a local folder, and the hub is offline (HF_HUB_OFFLINE=1) with no cached copy"
    (run / "run.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, _, err = cli("merge", "--adapter", str(run), "--out", str(tmp_path / "m"))
    line = one_error_line(err, "merge")
    assert code == 2 and line.endswith(want) and "if the base moved" not in err
