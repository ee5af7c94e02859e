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


@pytest.mark.parametrize(
    "second",
    [
        dt.IA3Config(target_modules=["v_proj"], feedforward_modules=[]),  # (refused by deltatune's check)
        dt.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True),  # (refused by the LoRA method's conversion)
    ],
    ids=["ia3", "dora"],
)
def test_a_refused_weight_conversion_writes_no_adapter(tmp_path, second):
    """``save_pretrained(path_initial_model_for_weight_conversion=...)`` with a second adapter it cannot convert wrote
    the first adapter's converted files, then refused the second (a half-written save); now nothing is written."""
    torch.manual_seed(0)
    delta = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    delta.save_pretrained(tmp_path / "init")
    delta.add_adapter("other", second)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="other"):
        delta.save_pretrained(out, path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_a_state_dict_lacking_the_second_adapter_writes_no_adapter(tmp_path):
    """``save_pretrained(state_dict=...)`` lacking a tensor of the second adapter wrote the first adapter, then
    refused; now the refusal comes before any file."""
    torch.manual_seed(0)
    delta = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    delta.add_adapter("other", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    state = {k: v for k, v in delta.state_dict().items() if ".other." not in k or "lora_B" not in k}
    with pytest.raises(ValueError, match="adapter 'other'"):
        delta.save_pretrained(tmp_path / "out", state_dict=state)
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []
    delta.save_pretrained(tmp_path / "full", state_dict=delta.state_dict())  # the full one: both, as without it
    delta.save_pretrained(tmp_path / "live")
    from safetensors.torch import load_file

    for sub in ("", "other"):
        a, b = (
            load_file(tmp_path / "full" / sub / "adapter_model.safetensors"),
            load_file(tmp_path / "live" / sub / "adapter_model.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def saved_run(tmp_path):
    """A tiny llama folder with its tokenizer, and a LoRA adapter on it (random B, so the merge changes weights)."""
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM

    base = save_tiny(tmp_path / "base", "llama")
    torch.manual_seed(0)
    delta = dt.get_delta_model(
        AutoModelForCausalLM.from_pretrained(base),
        dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    delta.save_pretrained(tmp_path / "adapter")
    return base, str(tmp_path / "adapter")


def test_merge_max_shard_size_writes_transformers_shards_and_index(tmp_path, saved_run, capsys):
    """LLaMA-Factory's export takes export_size (GB per shard); deltatune merge had no such flag (one 14 GB file for
    a 7B model, transformers' default being 50GB). ``--max-shard-size`` now gives the shards and the index that
    transformers' own ``save_pretrained(max_shard_size=)`` writes of peft's merged model, with equal tensors."""
    import json

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, adapter = saved_run
    assert main(["merge", "--adapter", adapter, "--out", str(tmp_path / "ours"), "--max-shard-size", "1000KB"]) == 0
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    theirs.save_pretrained(tmp_path / "theirs", max_shard_size="1000KB")
    index = [json.loads((tmp_path / d / "model.safetensors.index.json").read_text()) for d in ("ours", "theirs")]
    assert index[0]["weight_map"] == index[1]["weight_map"] and len(set(index[0]["weight_map"].values())) > 1
    for shard in set(index[0]["weight_map"].values()):
        a, b = load_file(tmp_path / "ours" / shard), load_file(tmp_path / "theirs" / shard)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == (
        tmp_path / "base" / "chat_template.jinja"
    ).read_text()


@pytest.mark.parametrize("size", ["5XB", "0MB", "GB", "1.5GB"])
def test_merge_max_shard_size_not_a_size_is_one_line_naming_the_flag(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "out"), "--max-shard-size", size])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err.startswith("deltatune merge: error: argument --max-shard-size: ")
    assert f"{size!r} is not a size" in err and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "body",
    [b"---\nfoo: [unclosed\n---\ntext\n", b"\xff\xfe not utf-8\n", b"---\n- a list\n---\n"],
    ids=["yaml", "bytes", "list"],
)
def test_a_readme_that_is_no_model_card_refuses_the_save_before_any_file(tmp_path, body):
    """peft reads the folder's README.md (its model card) before it writes an adapter, so a card it cannot read
    leaves the folder as it was; deltatune wrote the adapter first, then raised (a non-UTF-8 one as a bare
    UnicodeDecodeError, naming no file). Now as peft's: nothing written, one line naming the file."""
    import peft

    folders = {}
    for who in ("ours", "peft"):
        torch.manual_seed(0)
        model = tiny_model("llama")
        if who == "ours":
            model = dt.get_delta_model(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
        else:
            model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
        folders[who] = tmp_path / who
        folders[who].mkdir()
        (folders[who] / "README.md").write_bytes(body)
        with pytest.raises(Exception) as refused:
            model.save_pretrained(folders[who])
        if who == "ours":
            assert isinstance(refused.value, ValueError) and str(folders[who] / "README.md") in str(refused.value)
            assert "\n" not in str(refused.value)
    assert sorted(os.listdir(folders["ours"])) == sorted(os.listdir(folders["peft"])) == ["README.md"]
    assert (folders["ours"] / "README.md").read_bytes() == body


def test_a_full_disk_at_the_second_adapter_leaves_both_as_saved_before(tmp_path, monkeypatch):
    """Each file was written atomically, but adapter by adapter: a full disk while writing the second adapter left
    the first one's new files beside the second one's old ones (a save half new, half old, that loads without a
    word). Now every adapter is written beside first and moved in once all are: both stay as they were."""
    import safetensors.torch

    torch.manual_seed(0)
    delta = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    delta.add_adapter("other", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    delta.save_pretrained(tmp_path)
    files = [tmp_path / "adapter_model.safetensors", tmp_path / "other" / "adapter_model.safetensors"]
    before = [f.read_bytes() for f in files]
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(1.0)
    real, calls = safetensors.torch.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second adapter's tensors
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        delta.save_pretrained(tmp_path)
    assert [f.read_bytes() for f in files] == before
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]


def _two_adapters():
    torch.manual_seed(0)
    delta = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    delta.add_adapter("other", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    return delta


def test_a_save_killed_midway_leaves_no_hidden_folder_after_the_next_save(tmp_path):
    """A save SIGKILLed between its writes left its .saving-<pid>@<host>~ folder (whole adapter copies, a .tmp) in
    the save folder for good: save_adapters never called remove_stale_saves. The next save of the folder removes
    it (the killed pid is gone on this host)."""
    import signal

    import safetensors.torch

    delta = _two_adapters()
    delta.save_pretrained(tmp_path)
    pid = os.fork()
    if pid == 0:  # the child: killed after the second adapter's tensors are written beside
        real, calls = safetensors.torch.save_file, []

        def kill(tensors, path, metadata=None):
            calls.append(path)
            real(tensors, path, metadata)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        safetensors.torch.save_file = kill
        try:
            delta.save_pretrained(tmp_path)
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] & 0x7F == signal.SIGKILL
    assert [n for n in os.listdir(tmp_path) if n.startswith(".saving-")]  # what the killed save left
    delta.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
    assert sorted(os.listdir(tmp_path / "other")) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("how", ["safetensors", "oserror"])
def test_a_full_disk_names_the_destination_file_not_the_hidden_folder(tmp_path, monkeypatch, how):
    """Since the save writes beside, a full disk named .saving-<pid>@<host>~<random>/other/adapter_model.safetensors,
    a path the user never gave; now the destination file, errno kept (28 where the OSError had it)."""
    import errno

    import safetensors.torch

    delta = _two_adapters()

    def full_disk(tensors, path, metadata=None):
        if how == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError) as refused:
        delta.save_pretrained(tmp_path)
    text = str(refused.value)
    assert text.startswith(f"could not write {tmp_path / 'adapter_model.safetensors'}: ") and ".saving-" not in text
    assert "No space left on device" in text and "\n" not in text
    assert refused.value.errno == (errno.ENOSPC if how == "oserror" else None)
    assert os.listdir(tmp_path) == []


def test_an_adapter_folder_that_is_a_file_is_refused_before_any_adapter_moves_in(tmp_path):
    """``save_dir/other`` a plain file: the first adapter's new files were moved in, then os.makedirs of the second
    raised FileExistsError (a save half done, a bare error). Now one line naming the file, and nothing changed."""
    delta = _two_adapters()
    delta.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    import shutil

    shutil.rmtree(tmp_path / "other")
    (tmp_path / "other").write_text("a file")
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(1.0)
    with pytest.raises(ValueError) as refused:
        delta.save_pretrained(tmp_path)
    assert str(refused.value) == f"{str(tmp_path / 'other')!r} is a file; adapter 'other' is saved into a folder"
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert (tmp_path / "other").read_text() == "a file"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".saving-")]


def test_an_oserror_from_a_library_under_the_standard_librarys_folder_is_a_traceback(tmp_path):
    """_is_ours popped every frame whose file lay under sysconfig's stdlib folder; with site-packages inside it
    (pyenv, conda, a python:3.x image without a venv) an OSError raised in torch, called from deltatune, was cut to
    one line. The standard library is now known by module name: torch's frame stays (a traceback), os.makedirs'
    frame under a deltatune call still goes (one line)."""
    import sysconfig

    import deltatune.cli as cli

    stdlib = sysconfig.get_paths()["stdlib"]
    package = os.path.dirname(os.path.abspath(cli.__file__))
    torch_file = os.path.join(stdlib, "site-packages", "torch", "serialization.py")
    lib = {"__name__": "torch.serialization"}
    exec(compile("def load(p):\n    open(p, 'rb')\n", torch_file, "exec"), lib)
    ours = {"__name__": "deltatune.train.fake", "os": os}
    exec(compile("def caller(f, p):\n    f(p)\n", os.path.join(package, "train", "fake.py"), "exec"), ours)
    with pytest.raises(OSError) as theirs:
        ours["caller"](lib["load"], str(tmp_path / "missing" / "optimizer.pt"))
    assert not cli._is_ours(theirs.value)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError) as refused:  # os.makedirs (the standard library's) of a path under a file
        ours["caller"](os.makedirs, str(tmp_path / "f" / "out"))
    assert cli._is_ours(refused.value)


def test_merge_out_under_a_file_names_the_out_not_the_staging_folder(capsys, tmp_path, adapter):
    """``merge --out f/merged`` (f a file) said "[Errno 20] Not a directory: 'f/.merged.staging-<pid>'", a path the
    user never typed; the line names --out's value."""
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "merged"
    capsys.readouterr()
    assert main(["merge", "--adapter", adapter, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {str(out)!r} cannot be created" in err[0] and "staging" not in err[0], err


@pytest.mark.parametrize("size", ["5gb", "5Gb", "500mb", "1kb"])
def test_merge_max_shard_size_lowercase_b_is_refused_not_read_as_bits(tmp_path, capsys, size):
    """transformers' convert_file_size_to_int reads a lowercase final b as bits (5gb -> 625,000,000 bytes, shards
    8 times smaller than 5GB); the flag took it (re.IGNORECASE). Now refused in one line saying B is bytes."""
    from transformers.utils.hub import convert_file_size_to_int

    from deltatune.cli_parser import _shard_size

    assert convert_file_size_to_int(size) * 8 == convert_file_size_to_int(size[:-1] + "B")  # the trap
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "out"), "--max-shard-size", size])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("deltatune merge: error: argument --max-shard-size: ")
    assert f"{size!r}: write the unit with a capital B (bytes: {size[:-1]}B)" in err[-1] and "bits" in err[-1]
    for fine in ("5GB", "2gib", "2GiB", "500mB"):  # GiB's b is not bits to transformers
        assert _shard_size(fine) == fine


def test_a_missing_initial_adapter_is_its_file_not_found_not_a_write_failure(tmp_path):
    """Review of 558c0f0: a conversion's initial adapter that is not there (a read, not a write) came back as
    "could not write <save folder>", a plain OSError; it is the FileNotFoundError naming the initial file again."""
    delta = _two_adapters()
    with pytest.raises(FileNotFoundError, match="no-such-init") as err:
        delta.save_pretrained(tmp_path, selected_adapters=["default"],
                              path_initial_model_for_weight_conversion=str(tmp_path / "no-such-init"))  # fmt: skip
    assert "could not write" not in str(err.value) and os.listdir(tmp_path) == []


def test_merge_max_shard_size_reaches_save_pretrained_in_bytes(tmp_path, saved_run, monkeypatch):
    """A diffusers denoiser's save_pretrained reads sizes with huggingface_hub's parser (no GiB; 5gb as bytes):
    the flag is passed as transformers reads it, in whole bytes, so both savers split alike."""
    from transformers import PreTrainedModel

    seen, real = [], PreTrainedModel.save_pretrained

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("max_shard_size"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", spy)
    _, adapter = saved_run
    assert main(["merge", "--adapter", adapter, "--out", str(tmp_path / "m"), "--max-shard-size", "2GiB"]) == 0
    assert seen == [2 * 2**30]


@pytest.mark.parametrize("out", ["", "  "])
def test_merge_out_empty_says_so(tmp_path, saved_run, capsys, out):
    """An empty --out is the working folder to realpath: it was refused as holding the adapter's folder."""
    _, adapter = saved_run
    assert main(["merge", "--adapter", adapter, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "deltatune merge: error: --out is empty; give the folder to write"
