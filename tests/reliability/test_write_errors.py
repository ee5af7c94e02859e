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
    small = tmp_path / "small"  # a checkpoint that does not fit (8000 B: run.yaml, ~4 KB, fits): no .staging left
    recipe = write_recipe(tmp_path / "s.yaml", base.model, base.data, str(small), max_steps=2, save_steps=1)
    done = subprocess.run(
        args[:-1] + [recipe], env=env, capture_output=True, text=True, preexec_fn=_file_size_limit(8000)
    )
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and "writing the checkpoint of step 1 failed" in line, line
    assert not any(".staging" in root for root, _, _ in os.walk(small))


def test_saving_twice_through_a_temporary_folder_replaces_sub_folders(tmp_path):
    """A save writing a sub-folder (t2i's text_encoder_lora/) failed the second time: Directory not empty."""
    from deltatune.files import save_folder_files

    def save(version):
        def write(folder):
            os.makedirs(os.path.join(folder, "sub"))
            with open(os.path.join(folder, "sub", "w.txt"), "w") as fh:
                fh.write(version)
            with open(os.path.join(folder, "top.txt"), "w") as fh:
                fh.write(version)

        return write

    save_folder_files(save("1"), str(tmp_path))
    save_folder_files(save("2"), str(tmp_path))
    assert (tmp_path / "sub" / "w.txt").read_text() == (tmp_path / "top.txt").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["sub", "top.txt"]  # no temporary folder left


def test_only_a_librarys_error_around_a_failed_write_is_one_line_not_any_os_error():
    """Every OSError counted as deltatune's own refusal (a library's read error lost its traceback)."""
    from deltatune.cli import _is_ours

    try:
        os.stat("/nonexistent/x")  # raised outside deltatune's code: a traceback, as before
    except OSError as exc:
        assert not _is_ours(exc)
    assert _is_ours(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
