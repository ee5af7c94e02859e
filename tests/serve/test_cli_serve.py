"""``deltatune serve`` and ``deltatune board`` refuse bad command lines with one line naming the culprit, before
loading any model."""

from __future__ import annotations

import pytest

from deltatune.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--host", "0.0.0.0", "--model", "x"], "--host 0.0.0.0 listens beyond this machine: give --api-key"),
        (["serve", "--adapter", "lora"], "--adapter 'lora': write NAME=PATH"),
        (["serve", "--adapter", "a=x", "--adapter", "a=y"], "the name 'a' is given twice"),
        (["serve", "--adapter", "a=/no/such/folder"], "no adapter_config.json in '/no/such/folder'"),
        (["serve"], "no base model: pass --model"),
        (["board", "--runs", "/no/such/folder"], "--runs '/no/such/folder' is not a folder"),
        (["board", "--runs", "/", "--host", "0.0.0.0"], "--host 0.0.0.0: the board has no authentication"),
    ],
)
def test_bad_command_lines(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"deltatune {argv[0]}: error: ") and message in err and "\n" not in err
