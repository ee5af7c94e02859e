"""Probe 14 of the CLI, ``info`` and the run folder (a hostile tester): a folder without config.json, a ``--model``
path that is no folder (serve, board), and a resumed run that finishes without the stopped.json of its last stop."""

from __future__ import annotations

import json

import pytest
from tiny import save_tiny

from deltatune.cli import main
from deltatune.train import trainer as trainer_module
from deltatune.train.runfolder import STOPPED_FILE, Replacement


@pytest.mark.parametrize("pipeline", [False, True])
def test_info_on_a_folder_without_config_json_is_one_line_naming_it(capsys, tmp_path, pipeline):
    """HEAD showed transformers' "Unrecognized model in ... Should have a `model_type` key in its config.json" for a
    folder that has no config.json at all. Now the folder and the missing file; a diffusers pipeline is named too."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model\n")
    if pipeline:
        (folder / "model_index.json").write_text("{}")
    before = sorted(p.name for p in folder.iterdir())
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"deltatune info: error: model '{folder}': the folder holds no config.json"), err
    assert "\n" not in err and "model_type" not in err
    assert ("diffusers pipeline" in err) is pipeline
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing changed


@pytest.mark.parametrize("command", ["serve", "board"])
def test_model_path_that_is_no_folder_is_named_missing_not_sent_to_the_hub(capsys, tmp_path, command):
    """``serve --model /abs/missing`` said "not a local model folder, and the hub could not provide it (Repo id must be
    in the form 'repo_name' ...)": an absolute path is no hub id. Now one line naming --model as missing, before any
    model loads; a file is named as a file."""
    missing, file = tmp_path / "missing", tmp_path / "file"
    file.write_text("x")
    extra = ["--runs", str(tmp_path)] if command == "board" else []
    assert main([command, "--model", str(missing), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"deltatune {command}: error: --model '{missing}': no such folder"
    assert main([command, "--model", str(file), *extra]) == 2
    assert f"--model '{file}' is a file" in capsys.readouterr().err
    assert not missing.exists()


def test_begin_of_a_resumed_run_drops_its_stopped_json(tmp_path):
    """The folder a resumed run begins in loses the stopped.json of its last stop; an overwritten run's goes with it."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / STOPPED_FILE).write_text(json.dumps({"reason": "KeyboardInterrupt: ", "interrupted": True}))
    (folder / "run.yaml").write_text("stage: cls\n")
    Replacement(str(folder), False).begin()
    assert sorted(p.name for p in folder.iterdir()) == ["run.yaml"]


def test_a_resumed_run_that_finishes_keeps_no_stopped_json(capsys, tmp_path, monkeypatch):
    """A run stopped (Ctrl-C) after its checkpoint-1 has stopped.json; resumed to its end it wrote metrics.json and
    kept HEAD's stopped.json beside it (a finished folder saying "stopped"). Now it is gone, as in a run that never
    stopped; a plain finished run has none either."""
    model = save_tiny(tmp_path / "m", "bert", "seq_cls")
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["a fine film", "dull", "I loved it", "grim"])]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "cls.yaml"
    recipe.write_text(
        f"stage: cls\nmodel: {{name_or_path: {model}}}\n"
        "method: {name: lora, r: 2, target_modules: [query]}\n"
        f"data: {{train: {data}, max_length: 16}}\ntrain: {{batch_size: 4, max_steps: 2, save_steps: 1}}\n"
    )
    out = tmp_path / "run"
    argv = ["train", str(recipe), "train.report_to=[none]", f"output.dir={out}"]
    step = trainer_module.DeltaTrainer.training_step

    def interrupted(self, *args, **kwargs):
        if self.state.global_step >= 1:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.DeltaTrainer, "training_step", interrupted)
        assert main(argv) == 130
    names = {p.name for p in out.iterdir()}
    assert {STOPPED_FILE, "checkpoint-1", "run.yaml"} <= names and "metrics.json" not in names
    capsys.readouterr()
    assert main(["board", "--runs", str(out), "--inspect"]) == 0
    assert capsys.readouterr().out.split()[:5] == ["run", "stopped", "(KeyboardInterrupt:)", "step", "1"]
    assert main([*argv, "--resume"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "metrics.json" in names and STOPPED_FILE not in names
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 2


def _board_client(root):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from deltatune.board import create_app

    return TestClient(create_app(str(root)), base_url="http://127.0.0.1")


def test_board_serves_runs_by_the_names_its_list_gives_only(tmp_path):
    """``/api/run?name=`` ("", ".", "a/..") answered the runs folder itself as a run (its run.yaml; the list never
    shows it) and "a/." run a again under another name. Now 404 for each, as for "../x"; the listed names still
    answer, and a run named by a symlink out of the folder is not read. (TensorBoard's runs, too, are only the
    names its listing gives.)"""
    root = tmp_path / "runs"
    for name in ("a", "g/b"):
        (root / name).mkdir(parents=True)
        (root / name / "run.yaml").write_text("stage: sft\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "run.yaml").write_text("stage: sft\n")
    (root / "link").symlink_to(outside)
    client = _board_client(root)
    assert sorted(r["name"] for r in client.get("/api/runs").json()["runs"]) == ["a", "g/b"]
    for name in ("a", "g/b"):
        assert client.get("/api/run", params={"name": name}).status_code == 200
    for name in ("", ".", "a/..", "a/.", "a/", "./a", "g//b", "../outside", "link", str(outside), "g/b/..", "g/.."):
        response = client.get("/api/run", params={"name": name})
        assert response.status_code == 404, name
        assert response.json()["error"]["message"] == f"no run {name!r} in the runs folder"
        assert client.get("/api/file", params={"run": name, "name": "training_curve.png"}).status_code == 404


def test_board_shows_a_report_with_a_stray_byte(tmp_path):
    """A report.md with a byte that is not UTF-8 was not shown at all (None); now shown with U+FFFD in its place, as
    the log's lines are read."""
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "run.yaml").write_text("stage: sft\n")
    (folder / "report.md").write_bytes(b"# report\nloss fell \xff to 0.5\n")
    data = _board_client(tmp_path).get("/api/run", params={"name": "a"}).json()
    assert data["report"] == "# report\nloss fell \ufffd to 0.5\n"


@pytest.mark.parametrize(
    "command", [["eval", "--data", "x.jsonl"], ["generate", "--prompt", "hi"], ["chat"], ["merge", "--out", "o"]]
)
def test_an_adapter_that_is_a_file_is_named_as_a_file(capsys, tmp_path, command):
    """``--adapter FILE`` read "'FILE' holds no run.yaml" (eval) or "no adapter_config.json at 'FILE'", as if a folder
    were there. Now one line naming it a file, before anything loads; nothing written."""
    file = tmp_path / "adapter_model.safetensors"
    file.write_bytes(b"x")
    assert main([command[0], "--adapter", str(file), *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"deltatune {command[0]}: error: --adapter '{file}' is a file; give a run folder or an adapter " + (
        "folder (adapter_config.json)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors"]


def test_board_inspect_lists_the_runs_as_the_board_does(capsys, tmp_path):
    """There was no way to see from the shell which runs finished, stopped or failed (the board's page only).
    ``board --inspect`` (as ``tensorboard --inspect``) prints one line per run: the board's status, reason, last step,
    stage/method and headline metrics, for a folder of runs or one run's folder, and exits."""
    runs = tmp_path / "runs"
    done, stopped = runs / "done", runs / "group" / "stopped"
    for folder, method in ((done, "lora"), (stopped, "ia3")):
        folder.mkdir(parents=True)
        (folder / "run.yaml").write_text(f"stage: sft\nmethod: {{name: {method}}}\n")
        (folder / "log_history.jsonl").write_text('{"loss": 2.0, "step": 1}\n{"loss": 1.5, "step": 2}\n{"lo')
    (done / "metrics.json").write_text(json.dumps({"eval_loss": 1.23456, "train_loss": 1.5}))
    (stopped / STOPPED_FILE).write_text(json.dumps({"reason": "NonFiniteLossError: nan", "interrupted": False}))
    assert main(["board", "--runs", str(runs), "--inspect"]) == 0
    lines = sorted(line.split() for line in capsys.readouterr().out.splitlines())
    assert lines == [
        ["done", "finished", "step", "2", "sft/lora", "eval_loss", "1.235", "train_loss", "1.5"],
        ["group/stopped", "failed", "(NonFiniteLossError:", "nan)", "step", "2", "sft/ia3"],
    ]
    assert main(["board", "--runs", str(done), "--inspect"]) == 0
    assert capsys.readouterr().out.split()[:2] == ["done", "finished"]


def test_board_inspect_refuses_odd_folders_in_one_line(capsys, tmp_path):
    """A missing path, a file, a folder with no run, a serving flag: one line naming it, exit 2, nothing written."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for name, why in (("missing", "does not exist"), ("file", "is a file; give a run folder or a folder of runs"),
                      ("empty", "holds no run (no run.yaml in it or one or two folders below it)")):  # fmt: skip
        path = tmp_path / name
        assert main(["board", "--runs", str(path), "--inspect"]) == 2
        assert capsys.readouterr().err == f"deltatune board: error: --runs '{path}' {why}\n"
    assert main(["board", "--runs", str(tmp_path), "--inspect", "--model", "m"]) == 2
    assert capsys.readouterr().err == "deltatune board: error: --inspect prints the runs and exits: drop --model\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]


def test_a_run_stopped_before_its_first_log_line_shows_its_checkpoints_step(tmp_path):
    """A run stopped after checkpoint-3 but before its first log line (logging_steps > 3) was listed at step 0."""
    folder = tmp_path / "a"
    (folder / "checkpoint-3").mkdir(parents=True)
    (folder / "checkpoint-x").mkdir()
    (folder / "run.yaml").write_text("stage: sft\n")
    (folder / "log_history.jsonl").write_text("")
    assert [r["steps"] for r in _board_client(tmp_path).get("/api/runs").json()["runs"]] == [3]


@pytest.mark.parametrize("name", ["", "  "])
def test_info_on_an_empty_name_is_one_line(capsys, name):
    """``deltatune info ""`` showed the hub client's "Repo id must use alphanumeric chars, ..." for a name never given."""
    assert main(["info", name]) == 2
    assert capsys.readouterr().err == (
        f"deltatune info: error: model {name!r} is empty: give a model folder, a hub id or 'minilm'\n"
    )


def test_board_on_one_runs_folder_lists_it_as_dot_as_tensorboard(tmp_path):
    """``board --runs runs/a`` (a run's own folder) showed an empty list; TensorBoard names a logdir holding events
    itself ".". Now the run is listed as "." and answers; its sub-runs too, "" and "a/.." still do not."""
    (tmp_path / "run.yaml").write_text("stage: sft\n")
    (tmp_path / "log_history.jsonl").write_text('{"loss": 1.0, "step": 4}\n')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.yaml").write_text("stage: sft\n")
    client = _board_client(tmp_path)
    assert sorted((r["name"], r["steps"]) for r in client.get("/api/runs").json()["runs"]) == [(".", 4), ("b", 0)]
    assert client.get("/api/run", params={"name": "."}).json()["history"] == [{"loss": 1.0, "step": 4}]
    for name in ("", "b/..", "./b"):
        assert client.get("/api/run", params={"name": name}).status_code == 404, name


@pytest.mark.parametrize("command", [["eval", "--data", "x.jsonl"], ["generate", "--prompt", "hi"], ["chat"]])
@pytest.mark.parametrize(
    "body, why",
    [
        (b'{"peft_type": ', "is not valid JSON (truncated?): Expecting value: line 1 column 15 (char 14)"),
        (b'\xff{"peft_type": "LORA"}', "is not UTF-8 text (byte 0); an adapter config is JSON"),
    ],
)
def test_an_adapter_config_that_does_not_parse_is_one_line(capsys, tmp_path, command, body, why):
    """A truncated adapter_config.json read, for eval, "does not say which base model it was trained on"; one with a
    byte that is not UTF-8 was a UnicodeDecodeError's traceback (generate, chat, merge). Now one line naming the file."""
    (tmp_path / "adapter_config.json").write_bytes(body)
    assert main([command[0], "--adapter", str(tmp_path), *command[1:]]) == 2
    assert capsys.readouterr().err == f"deltatune {command[0]}: error: {tmp_path / 'adapter_config.json'} {why}\n"


@pytest.mark.parametrize(
    "body, why",
    [
        (b"stage: sft\n\xff: 1\n", " is not UTF-8 text (byte 11); a run.yaml is a YAML recipe"),
        (b"stage: sft\nmodel: [\n", ":3: not valid YAML (expected the node content, but found '<stream end>')"),
    ],
)
def test_a_run_yaml_that_does_not_parse_is_one_line_with_its_line(capsys, tmp_path, body, why):
    """A run.yaml with a byte that is not UTF-8 was a UnicodeDecodeError's traceback (generate, eval); a YAML error
    read "cannot be read (ParserError)", naming neither line nor fault."""
    (tmp_path / "run.yaml").write_bytes(body)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    for command in (["generate", "--prompt", "hi"], ["eval", "--data", "x.jsonl"]):
        assert main([command[0], "--adapter", str(tmp_path), *command[1:]]) == 2
        assert capsys.readouterr().err == f"deltatune {command[0]}: error: {tmp_path / 'run.yaml'}{why}\n"
