"""``deltatune serve`` and ``deltatune board`` refuse bad command lines with one line naming the culprit, before
loading any model."""

from __future__ import annotations

import json

import pytest

from deltatune.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--host", "0.0.0.0", "--model", "x"], "--host 0.0.0.0 listens beyond this machine: give --api-key"),
        (["serve", "--adapter", "lora"], "--adapter 'lora': write NAME=PATH"),
        (["serve", "--adapter", "a=x", "--adapter", "a=y"], "the name 'a' is given twice"),
        (["serve", "--adapter", "a=/no/such/folder"], "no adapter_config.json at '/no/such/folder'"),
        # the base's name was refused only once the base had loaded (the model named does not exist)
        (["serve", "--model", "/no/such/model", "--adapter", "base=/x"], "the name 'base' is the base model's"),
        (["serve"], "no base model: pass --model"),
        # accepted before: a batch of 0 rows left every request waiting; the others failed later or never
        (["serve", "--model", "/no/such/model", "--max-batch-size", "0"], "--max-batch-size must be >= 1, got 0"),
        (["serve", "--model", "/no/such/model", "--max-wait-ms", "-5"], "--max-wait-ms must be >= 0, got -5.0"),
        (["serve", "--model", "/no/such/model", "--max-wait-ms", "nan"], "--max-wait-ms must be >= 0, got nan"),
        (["serve", "--model", "/no/such/model", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
        (
            ["serve", "--model", "/no/such/model", "--adapter-dir", "/no/such/dir"],
            "--adapter-dir '/no/such/dir': no such",
        ),
        (["board", "--runs", "/no/such/folder"], "--runs '/no/such/folder' is not a folder"),
        (["board", "--runs", "/", "--host", "0.0.0.0"], "--host 0.0.0.0: the board has no authentication"),
    ],
)
def test_bad_command_lines(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"deltatune {argv[0]}: error: ") and message in err and "\n" not in err


def test_a_classifier_adapter_is_refused_before_the_model_loads(tmp_path, capsys):
    """A SEQ_CLS adapter was loaded into the base as a causal LM (transformers' report of newly initialised weights)
    and then refused for tensors that fit no module; now one line from its config alone."""
    import deltatune as dt

    (tmp_path / "cls").mkdir()
    config = dt.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"]).to_dict()
    (tmp_path / "cls" / "adapter_config.json").write_text(json.dumps(config))
    assert main(["serve", "--model", "/no/such/model", "--adapter", f"c={tmp_path / 'cls'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"deltatune serve: error: --adapter c={tmp_path / 'cls'}: adapter 'c' is a SEQ_CLS adapter; serve generates "
        "text, with causal language models' adapters ('deltatune eval' scores a classifier)"
    )


@pytest.mark.parametrize("command", ["serve", "board"])
def test_a_port_it_cannot_listen_on_is_refused_before_the_model_loads(command, capsys):
    """A port out of range (OverflowError from the socket) or in use (uvicorn's error) came after the model had
    loaded; now one line first. The model named does not exist: had it been loaded, that would be the error."""
    import socket

    where = ["--model", "/no/such/model"] + (["--runs", "/"] if command == "board" else [])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for value, message in [(99999, "--port 99999: a port is 0-65535"),
                               (port, f"--port {port}: cannot listen on 127.0.0.1:{port} (")]:  # fmt: skip
            assert main([command, *where, "--port", str(value)]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"deltatune {command}: error: {message}") and "\n" not in err, err
