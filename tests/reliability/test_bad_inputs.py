"""One clean line for every bad input: ``deltatune train --overwrite`` over a finished run, with one bad value at a
time, exits 2 with one line naming the culprit (recipe key, or file:line), prints no traceback, and leaves the
previous run byte for byte as it was, with nothing left beside it (no lock, no moved-aside copy)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from reliability_helpers import cli, one_error_line, snapshot


def _file(tmp, name: str, content: str | bytes) -> str:
    path = tmp / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = [{"text": "a good film", "label": 1}, {"text": "a dull film", "label": 0}]
LATIN1 = _jsonl(GOOD).encode() + '{"text": "café"}\n'.encode("latin-1")  # é is byte 0xe9, not UTF-8
SHORT_CSV = "text,label\na good film,1\na dull film\n"
NAN = _jsonl(GOOD) + '{"text": "x", "label": NaN}\n'
HUGE = _jsonl([*GOOD, {"text": "x", "label": 4_000_000_000}])  # an id column read as labels: once a 4e9-entry map

# (id, overrides given the test's tmp folder, words the one line must hold)
CASES = [
    ("model-missing", lambda t: ["model.name_or_path=/nonexistent/model"], "model.name_or_path '/nonexistent/model'"),
    ("model-offline-id", lambda t: ["model.name_or_path=nobody-model-xyz"], "model.name_or_path 'nobody-model-xyz'"),
    ("model-is-file", lambda t: [f"model.name_or_path={_file(t, 'm.bin', b'x')}"], "is a file"),
    ("scheduler", lambda t: ["train.scheduler=cosinus"], "train.scheduler"),
    ("logger-unknown", lambda t: ["train.report_to=[wandbx]"], "train.report_to: unknown logger 'wandbx'"),
    ("logging-steps-0", lambda t: ["train.logging_steps=0"], "train.logging_steps must be >= 1, got 0"),
    ("gen-tokens-0", lambda t: ["train.generation_max_new_tokens=0"], "train.generation_max_new_tokens must be >= 1"),
    ("num-workers-neg", lambda t: ["train.num_workers=-1"], "train.num_workers must be >= 0, got -1"),
    ("save-steps-0", lambda t: ["train.save_steps=0"], "train.save_steps must be >= 1"),
    ("limit-0", lambda t: ["data.limit=0"], "data.limit must be >= 1"),
    ("lr-text", lambda t: ["train.lr=fast"], "train.lr must be float"),
    (
        "num-labels-1-multi",
        lambda t: ["model.num_labels=1", "data.multi_label=true"],
        "data.multi_label: true asks for classes, but model.num_labels: 1 trains a regression",
    ),  # (1 alone: regression)
    ("num-labels-large", lambda t: ["model.num_labels=3"], "model.num_labels is 3 but the data has 2 classes"),
    ("data-missing", lambda t: [f"data.train={t / 'nope.jsonl'}"], "nope.jsonl' does not exist"),
    (
        "data-not-utf8",
        lambda t: [f"data.train={_file(t, 'latin.jsonl', LATIN1)}"],
        "latin.jsonl:3: not UTF-8 text (byte 0xe9",
    ),
    (
        "csv-short-row",
        lambda t: [f"data.train={_file(t, 'short.csv', SHORT_CSV)}"],
        "short.csv:3: 1 fields, but the header has 2 (text, label)",
    ),
    (
        "label-nan",
        lambda t: [f"data.train={_file(t, 'nan.jsonl', NAN)}"],
        "nan.jsonl:3: label in column 'label' is NaN",
    ),
    (
        "label-huge-id",
        lambda t: [f"data.train={_file(t, 'huge.jsonl', HUGE)}"],
        "huge.jsonl:3: label 4000000000 in column 'label' would be class id 4,000,000,000",
    ),
    ("override-form", lambda t: ["train.lr"], "override 'train.lr' is not of the form key=value"),
]
if importlib.util.find_spec("wandb") is None:
    CASES.append(("logger-missing", lambda t: ["train.report_to=[wandb]"], "logger 'wandb' is not installed"))
if not torch.cuda.is_available():
    CASES.append(("fp16-on-cpu", lambda t: ["train.precision=fp16"], "train.precision: fp16 needs a CUDA GPU"))


@pytest.mark.parametrize("overrides, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_value_one_line_run_unchanged(run_copy, overrides, words):
    given = overrides(run_copy.tmp)  # writes the bad data files first
    before, beside = snapshot(run_copy.dir), sorted(os.listdir(run_copy.tmp))
    code, _, err = cli("train", run_copy.recipe, *given, "--overwrite")
    assert code == 2, err
    assert words in one_error_line(err)
    assert snapshot(run_copy.dir) == before
    assert sorted(os.listdir(run_copy.tmp)) == beside  # no lock, no moved-aside run, no staging folder


def test_output_dir_that_is_a_file(base, tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("mine")
    code, _, err = cli("train", base.recipe, f"output.dir={path}")
    assert code == 2 and f"output.dir '{path}' is a file" in one_error_line(err)
    assert path.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_resume_with_overwrite_refused(run_copy):
    before = snapshot(run_copy.dir)
    code, _, err = cli("train", run_copy.recipe, "--resume", "--overwrite")
    assert code == 2 and "pass one, not both" in one_error_line(err)
    assert snapshot(run_copy.dir) == before


def test_separate_process_prints_one_line_and_debug_the_traceback(run_copy):
    """The whole command in a fresh interpreter: stderr is that one line and nothing else (no warnings from
    optional backends such as torchao or bitsandbytes); --debug shows the traceback instead."""
    before = snapshot(run_copy.dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "deltatune.cli", "train", run_copy.recipe, "train.logging_steps=0", "--overwrite"]
    plain = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 2
    assert plain.stderr == "deltatune train: error: train.logging_steps must be >= 1, got 0\n"
    assert plain.stdout == ""
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    assert snapshot(run_copy.dir) == before


@pytest.mark.parametrize(
    "field, words",
    [
        ("r", "does not set r (default 8 used), and the saved tensors do not fit that"),
        ("peft_type", "has no 'peft_type' field"),
    ],
)
def test_adapter_config_missing_a_field_is_named(run_copy, base, field, words):
    """An adapter_config.json without a field it needs is blamed on that field, not on 'a different base model'."""
    path = os.path.join(run_copy.dir, "adapter_config.json")
    with open(path) as fh:
        config = json.load(fh)
    del config[field]
    with open(path, "w") as fh:
        json.dump(config, fh)
    before = snapshot(run_copy.dir)
    code, _, err = cli("eval", "--adapter", run_copy.dir, "--data", base.data)
    line = one_error_line(err, "eval")
    assert code == 2 and words in line and "different base model" not in line
    assert snapshot(run_copy.dir) == before


def test_scheduler_names_are_transformers_own():
    """train/config.py spells the schedules out (so validating a recipe imports no transformers): the same list."""
    from transformers import SchedulerType

    from deltatune.train.config import SCHEDULERS

    assert sorted(SCHEDULERS) == sorted(s.value for s in SchedulerType)
