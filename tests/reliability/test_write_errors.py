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


def _file_size_limit(limit: int):
    def cap():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return cap


def test_a_real_full_disk_is_one_line_and_leaves_no_half_written_file(base, tmp_path):
    """safetensors and tokenizers raise their own errors around the OSError (SafetensorError "I/O error: ... (os
    error 27)", a bare Exception): a traceback, a .staging checkpoint and a truncated tokenizer.json were left.
    RLIMIT_FSIZE stands in for the full disk: checkpoints (tens of KB) fit, tokenizer.json (711 KB) does not."""
    import subprocess
    import sys

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", base.model, base.data, str(out), max_steps=2, save_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "deltatune.cli", "train", recipe]
    done = subprocess.run(args, env=env, capture_output=True, text=True, preexec_fn=_file_size_limit(200_000))
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and f"could not write into {out}" in line and "os error 27" in line, done.stderr
    assert not (out / "tokenizer.json").exists() and (out / "adapter_model.safetensors").is_file()
    assert not [p for p in os.listdir(out) if p.startswith(".saving")]
    small = tmp_path / "small"  # a checkpoint that does not fit: the last one kept, no .staging left
    recipe = write_recipe(tmp_path / "s.yaml", base.model, base.data, str(small), max_steps=2, save_steps=1)
    done = subprocess.run(
        args[:-1] + [recipe], env=env, capture_output=True, text=True, preexec_fn=_file_size_limit(4000)
    )
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and "writing the checkpoint of step 1 failed" in line, line
    assert not any(".staging" in root for root, _, _ in os.walk(small))
