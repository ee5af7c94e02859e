"""Probe 16 of saving and loading adapters and the CLI around them, against peft 0.21.2 and transformers."""

from __future__ import annotations

import os

import pytest
import torch
from tiny import tiny_model

import deltatune as dt
from deltatune.cli import main


@pytest.fixture
def adapter(tmp_path):
    """A LoRA adapter folder of a tiny llama (its config names a base folder that exists)."""
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    base.config._name_or_path = str(tmp_path / "base")
    torch.manual_seed(0)
    delta = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    delta.save_pretrained(tmp_path / "adapter")
    return str(tmp_path / "adapter")


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_merge_out_the_file_system_refuses_is_one_line_naming_the_path(capsys, tmp_path, adapter, where):
    """``merge --out`` under a file, or in a folder nothing can be created in, was os.makedirs' traceback
    (NotADirectoryError / PermissionError from <frozen os>); now one line naming the path, exit 2, nothing written."""
    if where == "under_a_file":
        (tmp_path / "f").write_text("x")
        out, parent = tmp_path / "f" / "merged", tmp_path / "f"
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        if os.system(f"chattr +i {parent} 2>/dev/null") != 0:  # (root ignores chmod)
            os.chmod(parent, 0o555)
        if os.access(parent, os.W_OK) and os.geteuid() != 0 or not _refuses(parent):
            pytest.skip("no way to make a read-only folder here")
        out = parent / "merged"
    capsys.readouterr()  # (the fixture's progress bars)
    try:
        assert main(["merge", "--adapter", adapter, "--out", str(out)]) == 2
    finally:
        os.system(f"chattr -i {parent} 2>/dev/null")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltatune merge: error: ") and str(parent) in err[0], err
    assert not os.path.exists(out)


def _refuses(folder) -> bool:
    try:
        os.mkdir(folder / "probe")
    except OSError:
        return True
    os.rmdir(folder / "probe")
    return False
