"""Shared pieces of the reliability tests: a tiny classifier's data, recipes, folder snapshots, and the CLI called
in-process with its exit code and output. (The fixtures that use them are in conftest.py; test modules import these
from here, never from ``conftest``, which names whichever conftest.py pytest imported last.)"""

from __future__ import annotations

import contextlib
import io
import os

import yaml

from deltatune.cli import main

ROWS = [{"text": f"a {w} film number {i}", "label": i % 2} for i, w in enumerate(["good", "bad", "fine", "dull"] * 2)]


def write_recipe(path, model: str, data: str, out: str, **train) -> str:
    recipe = {
        "stage": "cls",
        "model": {"name_or_path": model},
        "method": {"name": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
        "data": {"train": data, "max_length": 16},
        "train": {"batch_size": 4, "lr": 1e-2, "seed": 3, "logging_steps": 1, "report_to": ["none"], **train},
        "output": {"dir": out},
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


def cli(*args: str) -> tuple[int, str, str]:
    """``deltatune ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def snapshot(folder) -> dict[str, tuple[bytes, int] | None]:
    """Every file (bytes and mode) and folder under ``folder``, hidden ones too; what 'unchanged' compares."""
    folder = os.fspath(folder)
    out: dict[str, tuple[bytes, int] | None] = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = None
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = (fh.read(), os.stat(path).st_mode)
    return out


def one_error_line(err: str, command: str = "train") -> str:
    """The single error line of ``err`` (asserting that it is the only line and carries no traceback)."""
    assert "Traceback" not in err, err
    # transformers' own "Loading weights" progress bar (a terminal redraws it in place) is not an error line
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"deltatune {command}: error: "), lines[0]
    return lines[0]
