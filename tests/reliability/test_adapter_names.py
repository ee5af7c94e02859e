"""Adapter names are file names: one rule (deltatune.files.check_adapter_name) wherever a name becomes a path or a
module key: add_adapter, load_adapter, add_fusion, save_pretrained. A refused name changes nothing and writes
nothing; the folder an adapter is saved to must resolve inside the save folder (symlinks included)."""

from __future__ import annotations

import os

import pytest
import torch
from reliability_helpers import snapshot
from tiny import tiny_model

import deltatune as dt
from deltatune.files import adapter_folder, check_adapter_name

BAD = ["/tmp/abs", "../up", "a/b", "a\\b", "", ".hidden", "a.b", "..", "x" * 65, "with space", "tab\t", "é", None, 3]
GOOD = ["default", "other", "a-b_C9", "x" * 64, "-dash", "_under"]


def _model() -> dt.DeltaModel:
    return dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("name", BAD, ids=repr)
def test_rule_refuses(name):
    with pytest.raises(ValueError, match="is not allowed: use 1-64 letters, digits"):
        check_adapter_name(name)


@pytest.mark.parametrize("name", GOOD)
def test_rule_accepts(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize("name", ["/tmp/abs", "../up", "a/b", "", "a.b"], ids=repr)
def test_add_adapter_refuses_and_changes_nothing(name):
    model = _model()
    names, params = list(model.peft_config), [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="not allowed"):
        model.add_adapter(name, dt.LoraConfig(r=2, target_modules=["v_proj"]))
    assert list(model.peft_config) == names and [n for n, _ in model.named_parameters()] == params


@pytest.mark.parametrize("name", ["/tmp/abs", "../up", "a/b"], ids=repr)
def test_load_adapter_refuses_before_reading(tmp_path, name):
    model = _model()
    model.save_pretrained(tmp_path / "saved")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="not allowed"):
        model.load_adapter(tmp_path / "saved", name)
    assert list(model.peft_config) == ["default"] and snapshot(tmp_path) == before


def test_fusion_name_refused():
    base = tiny_model("llama")
    model = dt.get_delta_model(base, dt.BottleneckConfig(), adapter_name="a")
    model.add_adapter("b", dt.BottleneckConfig())
    with pytest.raises(ValueError, match="not allowed"):
        model.add_fusion(["a", "b"], name="../fusion")
    assert list(model.peft_config) == ["a", "b"]


def test_save_refuses_a_smuggled_name_before_writing_anything(tmp_path):
    """A name that got into peft_config around add_adapter (here by hand) is refused by save_pretrained before
    the first file is written: neither the good adapter nor anything outside the folder appears."""
    model = _model()
    outside = tmp_path / "outside"
    model.peft_config[str(outside)] = model.peft_config["default"]
    with pytest.raises(ValueError, match="not allowed"):
        model.save_pretrained(tmp_path / "save")
    assert not (tmp_path / "save").exists() and not outside.exists()


def test_symlinked_adapter_folder_refused(tmp_path):
    """save/other is a symlink to a folder elsewhere: writing adapter "other" through it is refused, nothing is
    written on either side."""
    model = _model()
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    elsewhere, save = tmp_path / "elsewhere", tmp_path / "save"
    elsewhere.mkdir()
    save.mkdir()
    os.symlink(elsewhere, save / "other")
    with pytest.raises(ValueError, match="outside"):
        model.save_pretrained(save)
    assert os.listdir(elsewhere) == [] and os.listdir(save) == ["other"]


def test_save_into_a_file_is_refused_and_leaves_it(tmp_path):
    """save_pretrained given a file's path was os.makedirs' FileExistsError; now one line, and the file as it was."""
    model = _model()
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    target = tmp_path / "notes.txt"
    target.write_text("mine", encoding="utf-8")
    for selected in (["default"], ["other"]):
        with pytest.raises(ValueError, match=r"notes.txt' is a file; adapters are saved into a folder$"):
            model.save_pretrained(target, selected_adapters=selected)
    assert target.read_text(encoding="utf-8") == "mine" and os.listdir(tmp_path) == ["notes.txt"]


def test_good_names_save_in_their_subfolder_and_load_back(tmp_path):
    """The positive side: allowed names land in <folder>/<name> and load back with the same weights."""
    model = _model()
    name = "x" * 64
    model.add_adapter(name, dt.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert adapter_folder(tmp_path, name) == os.path.join(tmp_path, name)
    assert sorted(os.listdir(tmp_path / name)) == ["adapter_config.json", "adapter_model.safetensors"]
    again = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    again.load_adapter(tmp_path / name, "copy")
    a = model.adapter_state_dict(name)
    b = again.adapter_state_dict("copy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
