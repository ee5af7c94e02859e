"""Files deltatune writes and reads: adapter and checkpoint files get the run folder's mode (not mkstemp's 0600);
the package never runs code from data it reads (no eval/exec, no pickle, yaml.safe_load only, torch.load only with
weights_only=True)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from reliability_helpers import cli, write_recipe

import deltatune

PACKAGE = Path(deltatune.__file__).parent


def test_every_file_of_a_run_has_the_same_mode(base, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base.model, base.data, str(out), max_steps=2, save_steps=1)
    old = os.umask(0o022)
    try:
        code, _, err = cli("train", recipe)
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {}
    for root, _, files in os.walk(out):
        for f in files:
            path = os.path.join(root, f)
            modes[os.path.relpath(path, out)] = stat.S_IMODE(os.stat(path).st_mode)
    assert {"adapter_model.safetensors", "adapter_config.json", "checkpoint-2/adapter_model.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o644}, {k: oct(v) for k, v in modes.items() if v != 0o644}


# (pattern, why it is refused); each line of the package is matched after dropping comments
FORBIDDEN = [
    (re.compile(r"(?<![\w.])eval\("), "eval( runs a string as code"),
    (re.compile(r"(?<![\w.])exec\("), "exec( runs a string as code"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load runs code from the file"),
    (re.compile(r"\byaml\.(load|unsafe_load|full_load)\("), "yaml.load can build arbitrary objects; use safe_load"),
    (re.compile(r"\bUnpickler\b"), "unpickling runs code from the file"),
]


def _lines():
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield path.relative_to(PACKAGE.parent), i, line.split("#", 1)[0]


def test_no_code_runs_from_what_the_package_reads():
    bad = [f"{p}:{i}: {why}" for p, i, line in _lines() for pattern, why in FORBIDDEN if pattern.search(line)]
    assert not bad, "\n".join(bad)


def test_torch_load_only_with_weights_only():
    calls = [(p, i, line) for p, i, line in _lines() if "torch.load(" in line]
    bad = [f"{p}:{i}" for p, i, line in calls if "weights_only=True" not in line]
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_the_checks_can_fail():
    """The patterns above do match what they are meant to catch (so a clean package is a real result)."""
    samples = ["x = eval(s)", "exec(code)", "pickle.load(fh)", "yaml.load(fh)", "u = pickle.Unpickler(f)"]
    assert all(any(p.search(s) for p, _ in FORBIDDEN) for s in samples)
    assert not any(p.search(s) for p, _ in FORBIDDEN for s in ["model.eval()", "yaml.safe_load(fh)", "exec_module"])


def test_write_error_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A full disk while saving (ENOSPC from the writer): one error naming the file, no half-written or
    temporary file left, and the adapter saved before it untouched."""
    import errno

    import safetensors.torch
    from tiny import tiny_model

    import deltatune as dt

    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as info:
        model.save_pretrained(tmp_path)
    assert str(info.value) == f"could not write {tmp_path / 'adapter_model.safetensors'}: No space left on device"
    assert info.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
