"""Nothing lost: one run per folder at a time (an atomic lock with pid and host; stale locks taken over),
``--overwrite`` replaces a run only once the new one has started, ``--resume`` continues only what it should
(not a finished run, not with a changed recipe unless asked, from the newest checkpoint that reads), and
``merge --out`` publishes a whole folder or nothing."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess

import pytest
import torch
from reliability_helpers import cli, one_error_line, snapshot, write_recipe
from safetensors.torch import load_file

from deltatune.train.runfolder import Replacement, RunLock


def _lock_path(folder) -> str:
    parent, name = os.path.split(os.path.abspath(folder))
    return os.path.join(parent, f".{name}.lock")


def _race(recipe: str, barrier, results) -> None:
    from deltatune.config import ConfigError
    from deltatune.train import load_recipe, train

    cfg = load_recipe(recipe)
    barrier.wait()
    try:
        train(cfg)
        results.put("ran")
    except ConfigError as exc:
        results.put(f"refused: {exc}")


def test_two_runs_started_at_once_on_one_folder(base, tmp_path):
    """Two processes pass a barrier and start the same run on one folder at the same instant: exactly one runs,
    the other is refused naming the lock's owner, and the folder holds one complete run."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base.model, base.data, str(out), max_steps=2)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(recipe, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    got = sorted(results.get(timeout=5) for _ in procs)
    assert got[0] == "ran" and got[1].startswith("refused: output.dir"), got
    assert "is in use by another run (pid " in got[1] and "on this host" in got[1]
    assert "metrics.json" in os.listdir(out) and not os.path.exists(_lock_path(out))


def test_lock_of_a_dead_process_is_taken_over(base, tmp_path):
    out = tmp_path / "run"
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(_lock_path(out), "w") as fh:
        json.dump({"pid": dead.pid, "host": socket.gethostname()}, fh)
    recipe = write_recipe(tmp_path / "r.yaml", base.model, base.data, str(out), max_steps=1)
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert not os.path.exists(_lock_path(out))


@pytest.mark.parametrize(
    "owner, words",
    [
        (lambda: {"pid": os.getppid(), "host": socket.gethostname()}, "on this host"),
        (lambda: {"pid": 1, "host": "other-machine"}, "on host other-machine"),
    ],
    ids=["live-here", "other-host"],
)
def test_lock_of_a_live_or_foreign_run_refuses(run_copy, owner, words):
    lock = _lock_path(run_copy.dir)
    with open(lock, "w") as fh:
        json.dump(owner(), fh)
    before = snapshot(run_copy.dir)
    code, _, err = cli("train", run_copy.recipe, "--overwrite")
    line = one_error_line(err)
    assert code == 2 and "is in use by another run" in line and words in line and lock in line
    assert snapshot(run_copy.dir) == before and os.path.exists(lock)


def test_lock_released_after_a_failed_run(run_copy):
    code, _, _ = cli("train", run_copy.recipe, "train.scheduler=bogus", "--overwrite")
    assert code == 2 and not os.path.exists(_lock_path(run_copy.dir))
    with RunLock(run_copy.dir):
        assert os.path.exists(_lock_path(run_copy.dir))
    assert not os.path.exists(_lock_path(run_copy.dir))


def test_overwrite_replaces_once_started(run_copy):
    old = load_file(os.path.join(run_copy.dir, "adapter_model.safetensors"))
    code, _, err = cli("train", run_copy.recipe, "train.seed=4", "--overwrite")
    assert code == 0, err
    new = load_file(os.path.join(run_copy.dir, "adapter_model.safetensors"))
    assert any(not torch.equal(old[k], new[k]) for k in old)  # really the new run (another seed)
    assert sorted(os.listdir(run_copy.tmp)) == ["recipe.yaml", "run"]  # the old run is gone, not left aside


def test_replacement_puts_the_old_run_back_when_the_new_one_fails_before_starting(run_copy):
    before = snapshot(run_copy.dir)
    r = Replacement(run_copy.dir, replace=True)
    r.begin()
    assert os.listdir(run_copy.dir) == []
    with open(os.path.join(run_copy.dir, "run.yaml"), "w") as fh:
        fh.write("half-written new run")
    r.failed()
    assert snapshot(run_copy.dir) == before
    assert sorted(os.listdir(run_copy.tmp)) == ["recipe.yaml", "run"]


def test_resume_of_a_finished_run_changes_nothing(run_copy):
    before = snapshot(run_copy.dir)
    code, _, err = cli("train", run_copy.recipe, "--resume")
    assert code == 2 and "is finished (metrics.json written); nothing to resume" in one_error_line(err)
    assert snapshot(run_copy.dir) == before


@pytest.fixture
def interrupted(base, tmp_path):
    """A 4-step run with checkpoints at 2 and 4 whose end was lost (no metrics.json, no final adapter), and the
    adapter the uninterrupted run ended with."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base.model, base.data, str(out), max_steps=4, save_steps=2)
    code, _, err = cli("train", recipe)
    assert code == 0, err
    whole = load_file(out / "adapter_model.safetensors")
    for name in os.listdir(out):
        if not name.startswith(("checkpoint-", "run.yaml")):
            path = out / name
            (os.remove if path.is_file() else __import__("shutil").rmtree)(path)
    return out, recipe, whole


def test_resume_with_a_changed_recipe_is_refused_listing_the_changes(interrupted):
    out, recipe, _ = interrupted
    before = snapshot(out)
    code, _, err = cli("train", recipe, "train.lr=0.02", "method.r=4", "train.logging_steps=2", "--resume")
    line = one_error_line(err)
    assert code == 2 and "method.r: 2 -> 4" in line and "train.lr: 0.01 -> 0.02" in line
    assert "logging_steps" not in line and "--resume-changed" in line  # when to log is not a change that matters
    assert snapshot(out) == before


def test_resume_falls_back_past_an_unreadable_checkpoint(interrupted):
    """checkpoint-4's adapter is truncated: the resume says so, continues from checkpoint-2, and ends with the
    adapter the uninterrupted run had."""
    out, recipe, whole = interrupted
    path = out / "checkpoint-4" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    assert "checkpoint-4 is unreadable (adapter_model.safetensors does not read" in err
    resumed = load_file(out / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], atol=1e-6, rtol=0)


def test_merge_out_refuses_a_full_folder_and_publishes_whole(base, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = cli("merge", "--adapter", base.run, "--out", str(out))
    assert code == 2 and "already holds files; pass --overwrite" in one_error_line(err, "merge")
    assert os.listdir(out) == ["mine.txt"]
    code, _, err = cli("merge", "--adapter", base.run, "--out", str(out), "--overwrite")
    assert code == 0, err
    assert "model.safetensors" in os.listdir(out) and "mine.txt" not in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no staging or old copy left beside it


def test_merge_out_never_replaces_the_adapter_or_base_it_reads(base, tmp_path):
    """--out naming the run being merged (or a folder holding it, or the base model's folder) with --overwrite
    replaced it with the merged model: the run was lost. Now one line, and nothing changes."""
    import shutil

    run, model = tmp_path / "runs" / "run", tmp_path / "models" / "base"
    shutil.copytree(base.run, run)
    shutil.copytree(base.model, model)
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(model)}))
    before = snapshot(tmp_path)
    cases = [
        (run, [], f"--out '{run}' is the adapter's folder '{run}'"),
        (run.parent, [], f"--out '{run.parent}' holds the adapter's folder '{run}'"),
        (model, [], f"--out '{model}' is the base model's folder '{model}'"),  # as the adapter recorded it
        (model.parent, ["--model", str(model)], f"--out '{model.parent}' holds the base model's folder '{model}'"),
    ]
    for out, extra, words in cases:
        code, _, err = cli("merge", "--adapter", str(run), "--out", str(out), "--overwrite", *extra)
        assert code == 2 and words in one_error_line(err, "merge"), err
        assert snapshot(tmp_path) == before
    code, _, err = cli("merge", "--adapter", str(run), "--out", str(run / "merged"))  # inside the run: a new folder
    assert code == 0, err
    assert (run / "merged" / "model.safetensors").exists() and (run / "adapter_model.safetensors").exists()


def test_overwrite_never_deletes_what_the_new_run_reads(base, tmp_path):
    """A base merged into the old run's folder (RUN/merged), or data kept there: --overwrite replaced the old run
    once the new one started, deleting the base and data it was reading. Now one line, and nothing changes."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(base.run, old)
    shutil.copytree(base.model, old / "merged")
    shutil.copy(base.data, old / "train.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", str(old / "merged"), base.data, str(old), max_steps=2)
    before = snapshot(tmp_path)
    for extra, words in [
        ([], f"output.dir '{old}' holds model.name_or_path '{old / 'merged'}'"),
        ([f"model.name_or_path={base.model}", f"data.train={old / 'train.jsonl'}[0:6]"],
         f"output.dir '{old}' holds data.train '{old / 'train.jsonl'}'"),
    ]:  # fmt: skip
        code, _, err = cli("train", recipe, *extra, "--overwrite")
        assert code == 2 and words in one_error_line(err), err
        assert snapshot(tmp_path) == before
    code, _, err = cli("train", recipe, f"model.name_or_path={base.model}", "--overwrite")  # what it is for
    assert code == 0, err
    assert not (old / "merged").exists() and (old / "metrics.json").exists()


def test_resume_changed_accepts_and_records_the_new_values(interrupted):
    out, recipe, _ = interrupted
    code, _, err = cli("train", recipe, "train.lr=0.02", "--resume", "--resume-changed")
    assert code == 0, err
    import yaml

    assert yaml.safe_load((out / "run.yaml").read_text())["train"]["lr"] == 0.02
    assert "metrics.json" in os.listdir(out)


def test_recipe_changes_ignore_what_the_run_derived():
    """A reward run records model.num_labels: 1 and the labels it found; the same recipe resumed names neither, and
    that is no change. A changed seed or method field is; when to log is not."""
    from deltatune.train.runfolder import recipe_changes

    recorded = {"model": {"num_labels": 1}, "data": {"labels": ["a", "b"]}, "train": {"seed": 1, "logging_steps": 5},
                "method": {"name": "lora", "r": 8}}  # fmt: skip
    same = {"model": {"num_labels": None}, "data": {"labels": None}, "train": {"seed": 1, "logging_steps": 1},
            "method": {"name": "lora", "r": 8}}  # fmt: skip
    assert recipe_changes(recorded, same) == []
    changed = {**same, "train": {"seed": 2, "logging_steps": 5}, "method": {"name": "lora", "r": 4}}
    assert recipe_changes(recorded, changed) == ["method.r: 8 -> 4", "train.seed: 1 -> 2"]


def _race_for_the_lock(folder, start, done):
    start.wait()
    try:
        RunLock(folder).acquire()
        got = True
    except Exception:  # noqa: BLE001 (the loser's one line)
        got = False
    done.wait()  # the holder lives until both have tried: its lock is not stale meanwhile
    os._exit(0 if got else 3)


def test_two_processes_breaking_one_stale_lock_leave_one_holder(tmp_path):
    """Both read the dead run's lock; the second then removed the first's fresh lock and took the folder too (15 of
    40 trials). Now one process breaks a stale lock, and only while it still holds what was read."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    dead = subprocess.Popen(["true"])
    dead.wait()
    for trial in range(12):
        folder = tmp_path / f"run{trial}"
        with open(_lock_path(folder), "w") as fh:
            json.dump({"pid": dead.pid, "host": socket.gethostname()}, fh)
        start, done = ctx.Barrier(2), ctx.Barrier(2)
        procs = [ctx.Process(target=_race_for_the_lock, args=(str(folder), start, done)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert sorted(p.exitcode for p in procs) == [0, 3], trial  # one holder, one refused


@pytest.mark.parametrize("content", ["12345", "[1, 2]", '{"pid": 0}', '{"pid": true}', '{"pid": -1}'])
def test_a_lock_holding_json_that_is_no_record_is_one_line(run_copy, content):
    """(pid 0, -1 or true: os.kill reaches the process group or init, so such a lock never read as dead.)"""
    lock = _lock_path(run_copy.dir)
    with open(lock, "w") as fh:
        fh.write(content)
    code, _, err = cli("train", run_copy.recipe, "--overwrite")
    assert code == 2 and "which does not name its run" in one_error_line(err)


def test_sigterm_is_an_interrupt_undoing_what_ctrl_c_undoes(monkeypatch, capsys):
    """SIGTERM during train --overwrite left the old run hidden (only Ctrl-C put it back); now it is Ctrl-C, and the
    previous handler comes back after the command."""
    import signal

    from deltatune import cli as cli_module

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not interrupted")

    def outside(signum, frame):  # this process's own handler while the test runs (a regression fails, not kills)
        raise RuntimeError("SIGTERM reached the handler outside the command")

    before = signal.signal(signal.SIGTERM, outside)
    try:
        monkeypatch.setitem(cli_module._COMMANDS, "info", killed)
        assert cli_module.main(["info", "minilm"]) == 130
        assert "deltatune info: interrupted" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_key_left_out_of_the_resumed_recipe_is_a_change():
    """A recipe leaving out keys the run had set (method.lora_dropout 0.1, data.limit 6, data.template chatml) was
    accepted: the resumed steps trained with the defaults while run.yaml kept the old values. A method key at its
    default is the same written or not; what a stage derived (data.labels) need not be named again."""
    from deltatune.train.runfolder import recipe_changes

    old = {"method": {"name": "lora", "r": 4, "lora_dropout": 0.1}, "data": {"limit": 6, "template": "chatml",
           "labels": ["neg", "pos"]}, "train": {"lr": 0.01}}  # fmt: skip
    new = {"method": {"name": "lora", "r": 4}, "data": {"limit": None, "template": None, "labels": None},
           "train": {"lr": 0.01}}  # fmt: skip
    assert recipe_changes(old, new) == [
        "data.limit: 6 -> None", "data.template: 'chatml' -> None", "method.lora_dropout: 0.1 -> 0.0"]  # fmt: skip
    same = {**new, "data": old["data"], "method": {"name": "lora", "r": 4, "lora_dropout": 0.1, "lora_alpha": 8}}
    assert recipe_changes(old, same) == []  # lora_alpha 8 is LoRA's default, written or not


def test_a_refused_run_leaves_no_folders_it_made(base, tmp_path):
    """output.dir=out/exp1/sweep/run3 with a data file that is missing: the one-line refusal left out/exp1/sweep/
    created (for the run's lock). A run that starts keeps them."""
    out = tmp_path / "out" / "exp1" / "sweep" / "run3"
    recipe = write_recipe(tmp_path / "r.yaml", base.model, str(tmp_path / "missing.jsonl"), str(out), max_steps=1)
    code, _, err = cli("train", recipe)
    assert code == 2 and "missing.jsonl" in one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["r.yaml"]
    recipe = write_recipe(tmp_path / "r.yaml", base.model, base.data, str(out), max_steps=1)
    assert cli("train", recipe)[0] == 0 and (out / "adapter_model.safetensors").is_file()


def test_resume_after_the_data_file_or_the_processes_changed_is_refused(base, tmp_path, monkeypatch):
    """Rows appended to data.train, or a run started in 2 processes resumed in 1 (train.batch_size is per process):
    the resume was accepted silently and trained on another order or global batch than the run had."""
    import shutil

    data = tmp_path / "train.jsonl"
    shutil.copy(base.data, data)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base.model, str(data), str(out), max_steps=4, save_steps=2)
    assert cli("train", recipe)[0] == 0
    for name in ("metrics.json", "adapter_model.safetensors", "checkpoint-4"):  # stopped after checkpoint-2
        (shutil.rmtree if (out / name).is_dir() else os.remove)(out / name)
    before = snapshot(out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli("train", recipe, "--resume")
    assert code == 2 and "since checkpoint-2 was written, world_size was 1, now 2, so" in one_error_line(err)
    monkeypatch.delenv("WORLD_SIZE")
    data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])
    code, _, err = cli("train", recipe, "--resume")
    assert code == 2 and "the file of data.train changed" in one_error_line(err) and "--resume-changed" in err
    assert snapshot(out) == before
    assert cli("train", recipe, "--resume", "--resume-changed")[0] == 0


def test_run_yaml_keeps_local_paths_absolute(tmp_path, monkeypatch):
    """run.yaml kept ``models/base`` and ``data/eval.jsonl`` as typed: eval, generate, chat and merge run from
    another folder with its own models/ and data/ read those (scoring the wrong model on the wrong data, exit 0)."""
    from deltatune.train.config import build
    from deltatune.train.run import _recipe_dict

    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eval.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    recipe = {"stage": "sft", "model": {"name_or_path": "models/base"}, "output": {"dir": "runs/x"},
              "data": {"train": "data/eval.jsonl[0:1]", "eval": "data/eval.jsonl"}}  # fmt: skip
    kept = _recipe_dict(build(recipe))
    assert kept["model"]["name_or_path"] == str(tmp_path / "models" / "base")
    assert kept["data"]["train"] == str(tmp_path / "data" / "eval.jsonl") + "[0:1]"  # the row range kept
    assert kept["data"]["eval"] == str(tmp_path / "data" / "eval.jsonl")
    hub = _recipe_dict(build({**recipe, "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M"}}))
    assert hub["model"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M"  # not a local folder: as written


def test_a_run_yaml_with_relative_paths_resumes_unchanged(tmp_path, monkeypatch):
    """A run.yaml written before paths were kept absolute holds them as typed: --resume called that a change."""
    from deltatune.train.runfolder import recipe_changes

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    old = {"model": {"name_or_path": "models/base"}, "data": {"train": "data/t.jsonl"}}
    new = {
        "model": {"name_or_path": str(tmp_path / "models" / "base")},
        "data": {"train": str(tmp_path / "data" / "t.jsonl")},
    }
    assert recipe_changes(old, new) == []
    moved = {"model": {"name_or_path": "/elsewhere/base"}, "data": new["data"]}
    assert recipe_changes(old, moved) == ["model.name_or_path: 'models/base' -> '/elsewhere/base'"]
