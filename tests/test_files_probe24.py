"""Probe 24 of saving and loading adapters (deltatune's files against peft 0.21.2 / 0.22.0's)."""

from __future__ import annotations

import os
import signal

import torch
from tiny import tiny_model

import deltatune as dt


def _delta(seed, r=2):
    torch.manual_seed(seed)
    delta = dt.get_delta_model(
        tiny_model("llama"), dt.LoraConfig(r=r, target_modules=["q_proj"], init_lora_weights=False)
    )
    delta.add_adapter("other", dt.LoraConfig(r=r, target_modules=["v_proj"], init_lora_weights=False))
    return delta


def _killed_between_renames(delta, folder, after):
    """Save ``delta`` into ``folder`` in a child process SIGKILLed right after the ``after``-th rename of move_in."""
    pid = os.fork()
    if pid == 0:
        real, calls = os.replace, []

        def replace(src, dst, *a, **k):
            real(src, dst, *a, **k)
            if ".saving-" in os.fspath(src) and ".saving-" not in os.fspath(dst):  # (a move in)
                calls.append(dst)
                if len(calls) == after:
                    os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replace
        try:
            delta.save_pretrained(folder)
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] & 0x7F == signal.SIGKILL


def _state(folder):
    new = dt.DeltaModel.from_pretrained(tiny_model("llama"), folder)
    new.load_adapter(os.path.join(folder, "other"), "other")
    return {k: v.clone() for k, v in new.adapter_state_dict("default").items()} | {
        "o." + k: v.clone() for k, v in new.adapter_state_dict("other").items()
    }


def test_a_save_killed_between_its_renames_is_finished_by_the_next_load_or_save(tmp_path):
    """A save SIGKILLed between two renames left the folder part new, part old (here adapter_config.json of r=4 beside
    the old r=2 tensors: no load; with the same r, the old tensors under the new config, silently); the next save
    then deleted the hidden folder holding the rest of the new files. Now the save writes a list of its moves before
    the first and the next load or save of the folder finishes them: every file the new one."""
    old, new = _delta(0), _delta(1, r=4)
    want = new.adapter_state_dict("default") | {f"o.{k}": v for k, v in new.adapter_state_dict("other").items()}
    for after, then in [(1, "load"), (2, "save"), (3, "load_other")]:
        folder = tmp_path / f"{after}"
        old.save_pretrained(folder)
        _killed_between_renames(new, folder, after)
        if then == "save":  # an unrelated save into the folder (another adapter) finishes it first
            solo = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["k_proj"]), "third")
            solo.save_pretrained(folder)
        if then == "load_other":
            got = dt.DeltaModel.from_pretrained(tiny_model("llama"), folder / "other", adapter_name="other")
            assert torch.equal(got.adapter_state_dict("other")[next(iter(got.adapter_state_dict("other")))],
                               want["o." + next(iter(got.adapter_state_dict("other")))])  # fmt: skip
        got = _state(folder)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), after
        assert not [n for n in os.listdir(folder) if n.startswith(".saving-")]


def test_loading_from_an_adapter_file_not_its_folder_says_so(tmp_path):
    """from_pretrained / load_adapter given the adapter's file (a common slip: the path of adapter_model.safetensors)
    said the path "is not a local folder and adapter_config.json could not be fetched from the hub
    (HFValidationError)", blaming the hub; peft refuses it too (ValueError "Can't find 'adapter_config.json' at ...").
    Now one line saying it is a file, naming it."""
    import pytest

    delta = _delta(0)
    delta.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    for load in (
        lambda: dt.DeltaModel.from_pretrained(tiny_model("llama"), file),
        lambda: delta.load_adapter(file, "third"),
    ):
        with pytest.raises(FileNotFoundError) as refused:
            load()
        text = str(refused.value)
        assert "is a file" in text and str(file) in text and "hub" not in text and "\n" not in text
    assert list(delta.peft_config) == ["default", "other"]
