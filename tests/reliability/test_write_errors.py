"""A checkpoint that cannot be written (disk full): one line naming the path, the last complete checkpoint kept,
nothing half-written left behind, and --resume continues from that checkpoint."""

from __future__ import annotations

import errno
import os

from reliability_helpers import cli, one_error_line, write_recipe

from deltatune.model import DeltaModel


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(base, tmp_path, monkeypatch):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base.model, base.data, str(out), max_steps=3, save_steps=1)
    real, calls = DeltaModel.save_pretrained, []

    def full_disk(self, folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:  # the second checkpoint: the disk is full half-way through
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, "adapter_model.safetensors"), "wb").close()
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, "adapter_model.safetensors"))
        return real(self, folder, *args, **kwargs)

    monkeypatch.setattr(DeltaModel, "save_pretrained", full_disk)
    code, _, err = cli("train", recipe)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and "step 2" in line and "adapter_model.safetensors" in line
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-1"]
    assert os.path.getsize(out / "checkpoint-1" / "adapter_model.safetensors") > 0
    assert not any(".staging" in root for root, _, _ in os.walk(out))

    monkeypatch.setattr(DeltaModel, "save_pretrained", real)
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint"))[-1] == "checkpoint-3"
