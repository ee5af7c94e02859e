"""Probe 18 of base-model loading: the embedded GGUF cache (keyed by content, a killed conversion's staging folder
removed, one conversion at a time) and one line for a model folder whose JSON transformers cannot read."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune.config import ConfigError
from deltatune.train import embedded
from deltatune.train.models import load_model, load_tokenizer
from tests.tiny import save_tiny


def _fake(monkeypatch, tmp_path, delay: float = 0.0):
    """An embedded GGUF model whose conversion writes a small folder (a staging folder renamed into place)."""
    from test_chat import _fake_embedded

    def write(_pkg, _e, folder):
        time.sleep(delay)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.parent / f".{folder.name}.{os.getpid()}.{threading.get_ident()}"
        staging.mkdir()
        (staging / "config.json").write_text(json.dumps({"gguf": (_pkg / _e.member).read_bytes().hex()}))
        (staging / embedded.MANIFEST).write_text(json.dumps(embedded._manifest(staging)))
        os.replace(staging, folder)

    return tmp_path / "pkg" / "model.gguf", _fake_embedded(monkeypatch, tmp_path, write)


def test_a_gguf_of_the_same_size_is_converted_again(monkeypatch, tmp_path):
    """The cache was keyed by the GGUF's name and size: a new GGUF of the same size reused the old conversion."""
    gguf, calls = _fake(monkeypatch, tmp_path)
    first = embedded.resolve("fake")
    gguf.write_bytes(b"GGUF" + b"\1" * 100)  # another model, same size
    second = embedded.resolve("fake")
    assert second != first and len(calls) == 2
    assert json.loads((Path(second) / "config.json").read_text())["gguf"] == gguf.read_bytes().hex()
    assert embedded.resolve("fake") == second and len(calls) == 2  # and reused while it stays the same


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_conversion_killed_mid_write_leaves_no_staging_folder(monkeypatch, tmp_path):
    """A conversion killed while writing left its staging folder (about 540 MB for smollm2) for ever; it is never
    used (only a finished folder is renamed into place) and is removed by the next conversion."""
    _gguf, calls = _fake(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    name = f"fake-{embedded._fingerprint(_gguf)}"
    killed = cache / f".{name}.{embedded._host()}.{_dead_pid()}.abc123"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    folder = embedded.resolve("fake")
    assert Path(folder) == cache / name and len(calls) == 1 and embedded._valid(Path(folder))
    assert not killed.exists()


def test_concurrent_resolves_convert_once(monkeypatch, tmp_path):
    """Two processes (here threads) resolving at once each converted (30 s and several GB each for smollm2)."""
    _gguf, calls = _fake(monkeypatch, tmp_path, delay=0.5)
    out = []
    threads = [threading.Thread(target=lambda: out.append(embedded.resolve("fake"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(out)) == 1 and embedded._valid(Path(out[0]))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("load18") / "base")


def _copy(base, tmp_path, name):
    return shutil.copytree(base, tmp_path / name)


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", r"config.json is not valid JSON \(line 1"),
        ("", r"config.json is not valid JSON \(line 1"),
        ("[1]", r"config.json is not a JSON object \(a list\)"),
    ],
)
def test_a_damaged_config_is_one_line_naming_the_file(tiny_base, tmp_path, text, why):
    folder = _copy(tiny_base, tmp_path, "m")
    (folder / "config.json").write_text(text)
    with pytest.raises(Exception) as ref:  # transformers: OSError, or a TypeError from deep inside
        AutoModelForCausalLM.from_pretrained(folder)
    assert not isinstance(ref.value, ConfigError)
    with pytest.raises(ConfigError, match=rf"model '{folder}': {why}"):
        load_model(str(folder), "CAUSAL_LM")
    with pytest.raises(ConfigError, match=rf"model '{folder}': {why}"):  # was TypeError for the list
        load_tokenizer(str(folder))


def test_a_config_without_model_type_is_one_line(tiny_base, tmp_path):
    folder = _copy(tiny_base, tmp_path, "m")
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Should have a `model_type` key"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ConfigError) as got:  # (transformers 5.25 reads no model type from the folder's name)
        load_model(str(folder), "CAUSAL_LM")
    assert str(got.value) == (
        f"model '{folder}': its config.json has no model_type: add the model_type of its architecture (llama, bert, ...)"
    )
    llama = shutil.copytree(folder, tmp_path / "llama")  # a folder named after its model type: refused as well
    with pytest.raises(ValueError, match="Should have a `model_type` key"):
        AutoModelForCausalLM.from_pretrained(llama)


def _shard(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="500KB")
    return model


def test_sharded_and_bin_only_folders_load_as_transformers_does(tiny_base, tmp_path):
    ids = torch.tensor([[5, 9, 200, 7]])
    want = AutoModelForCausalLM.from_pretrained(tiny_base)(ids).logits
    sharded = _copy(tiny_base, tmp_path, "sharded")
    _shard(sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    binonly = _copy(tiny_base, tmp_path, "bin")
    from safetensors.torch import load_file

    torch.save(load_file(binonly / "model.safetensors"), binonly / "pytorch_model.bin")
    (binonly / "model.safetensors").unlink()
    for folder in (sharded, binonly):
        assert torch.equal(load_model(str(folder), "CAUSAL_LM")(ids).logits, want)


def test_a_damaged_shard_index_is_one_line_naming_it(tiny_base, tmp_path):
    folder = _copy(tiny_base, tmp_path, "m")
    _shard(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(json.JSONDecodeError):  # transformers: the parser's error, naming no file
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ConfigError, match=rf"model '{folder}': model.safetensors.index.json is not valid JSON"):
        load_model(str(folder), "CAUSAL_LM")
    AutoTokenizer.from_pretrained(folder)  # (its tokenizer does not read the index)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"])
def test_a_damaged_index_transformers_never_reads_is_not_refused(tiny_base, tmp_path, weights):
    """Every *.index.json was checked: a damaged leftover pytorch_model.bin.index.json beside model.safetensors (or
    pytorch_model.bin, or a safetensors index) was refused though transformers loads the folder."""
    from safetensors.torch import load_file

    folder = _copy(tiny_base, tmp_path, "m")
    if weights == "pytorch_model.bin":
        torch.save(load_file(folder / "model.safetensors"), folder / weights)
        (folder / "model.safetensors").unlink()
    elif weights == "model.safetensors.index.json":
        _shard(folder)
    (folder / "pytorch_model.bin.index.json").write_text('{"weight_map": ')
    ids = torch.tensor([[5, 9, 200, 7]])
    want = AutoModelForCausalLM.from_pretrained(folder)(ids).logits  # the reference loads it
    assert torch.equal(load_model(str(folder), "CAUSAL_LM")(ids).logits, want)


def test_a_local_folder_named_like_an_embedded_model_is_recorded_by_its_path(tiny_base, tmp_path, monkeypatch):
    """``resolve('minilm')`` loads a folder named minilm in the working directory, as transformers would; its
    adapters recorded MiniLM's hub id as their base (a run loaded back on another model)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_base, tmp_path / "minilm")
    model = load_model("minilm", "CAUSAL_LM")
    assert type(model).__name__ == "LlamaForCausalLM"  # the local folder, not the embedded BERT
    assert model.config._name_or_path == str(tmp_path / "minilm") == embedded.hub_id("minilm")
    assert embedded.hub_id("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize(
    "file, text, why",
    [
        ("tokenizer.json", "{bad", r"tokenizer.json is not valid JSON \(line 1"),
        ("tokenizer_config.json", "{bad", r"tokenizer_config.json is not valid JSON \(line 1"),
        ("tokenizer_config.json", "[1]", r"tokenizer_config.json is not a JSON object \(a list\)"),
        ("tokenizer.json", "[1]", r"tokenizer.json is not a JSON object \(a list\)"),
    ],
)
def test_a_damaged_tokenizer_file_is_one_line_naming_it(tiny_base, tmp_path, file, text, why):
    """transformers raised the JSON parser's error, an AttributeError or a TypeError, naming no file."""
    folder = _copy(tiny_base, tmp_path, "m")
    (folder / file).write_text(text)
    with pytest.raises((ValueError, TypeError, AttributeError)) as ref:
        AutoTokenizer.from_pretrained(folder)
    assert not isinstance(ref.value, ConfigError)
    with pytest.raises(ConfigError, match=rf"model '{folder}': {why}"):
        load_tokenizer(str(folder))


def test_a_cache_that_cannot_be_written_is_one_line(monkeypatch, tmp_path):
    """A cache root that is no folder (or not writable) was an OSError from mkdir inside the conversion."""
    _gguf, calls = _fake(monkeypatch, tmp_path)
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "afile" / "cache"))
    with pytest.raises(ConfigError, match=r"model 'fake' is converted once into .*afile/cache, which cannot be "):
        embedded.resolve("fake")
    assert not calls


def test_a_tokenizer_larger_than_the_embeddings_is_one_line(tmp_path):
    """A model folder whose tokenizer has more tokens than its embeddings: transformers loads both, and the first
    batch with a high id failed with IndexError inside torch's embedding (the run.py call is in the report)."""
    from deltatune.train.models import check_vocab

    folder = save_tiny(tmp_path / "m", vocab_size=1000)
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = tok(["zebra"], return_tensors="pt")["input_ids"]
    assert ids.max() >= 1000
    with pytest.raises(IndexError):  # the reference: the model itself, deep in torch
        model(ids)
    with pytest.raises(ConfigError, match=rf"model '{folder}': its tokenizer has {len(tok)} tokens but its embed"):
        check_vocab(folder, model, tok)
    model.config.vocab_size = len(tok)
    check_vocab(folder, AutoModelForCausalLM.from_config(model.config), tok)  # (the right size passes)


@pytest.mark.parametrize("family", ["ResNet", "ConvNext"])
def test_check_vocab_passes_a_model_without_token_embeddings(family):
    """transformers' get_input_embeddings raises NotImplementedError for ResNet and ConvNeXt: check_vocab called it
    before asking whether the run had a tokenizer at all, so every image-classification run on them failed."""
    import transformers

    from deltatune.train.models import check_vocab
    from tests.tiny import tokenizer

    config = getattr(transformers, f"{family}Config")(hidden_sizes=[8, 8], depths=[1, 1], num_labels=3)
    if family == "ConvNext":
        config.num_stages = 2
    else:
        config.embedding_size = 8
    model = getattr(transformers, f"{family}ForImageClassification")(config)
    with pytest.raises(NotImplementedError):  # the reference: transformers' accessor
        model.get_input_embeddings()
    check_vocab("cnn", model, transformers.ViTImageProcessorPil())  # a run's image processor
    check_vocab("cnn", model, tokenizer())  # (and a tokenizer: nothing to compare it with)


def test_a_run_whose_tokenizer_is_larger_than_the_embeddings_stops_before_training(tmp_path):
    """run.build_model checks the vocabulary (a run failed with IndexError in torch's embedding at the first batch
    with a high id); the line names the first id out of range and the usual cause; nothing is written."""
    from deltatune.train.config import build
    from deltatune.train.run import train

    folder = save_tiny(tmp_path / "m", vocab_size=1000)
    tok = AutoTokenizer.from_pretrained(folder)
    (tmp_path / "sft.jsonl").write_text(json.dumps({"instruction": "zebra crossing", "output": "a zebra"}) + "\n")
    cfg = build({"stage": "sft", "model": {"name_or_path": folder}, "data": {"train": str(tmp_path / "sft.jsonl")},
                 "train": {"max_steps": 1, "report_to": ["none"]}, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    first = re.escape(tok.convert_ids_to_tokens(1000))
    with pytest.raises(ConfigError, match=rf"'{folder}': its tokenizer has {len(tok)} tokens but its embeddings hold "
                       rf"1000 \(ids 1000 and up, from '{first}', fail inside the model\): usually a tokenizer that "
                       r"added tokens without resizing the model's embeddings"):  # fmt: skip
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("code", ["ENOLCK", "ENOSYS", "EOPNOTSUPP"])
def test_a_filesystem_without_locks_converts_unlocked(monkeypatch, tmp_path, code):
    """flock fails so on a filesystem without locks (NFS without lockd, Lustre without -o flock): resolve raised
    the OSError; it converts unlocked there, as before the lock came in."""
    import errno
    import fcntl

    _gguf, calls = _fake(monkeypatch, tmp_path)
    number = getattr(errno, code)

    def flock(fh, op):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(fcntl, "flock", flock)
    folder = embedded.resolve("fake")
    assert embedded._valid(Path(folder)) and len(calls) == 1


def test_a_process_waiting_for_the_lock_says_so(monkeypatch, tmp_path, capsys):
    """A second process waited silently (30 s for smollm2) while another converted; it says one line, and uses the
    other's conversion once the lock is free."""
    import fcntl

    _gguf, calls = _fake(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    name = f"fake-{embedded._fingerprint(_gguf)}"
    out = []
    with open(cache / f".{name}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: out.append(embedded.resolve("fake")))
        waiter.start()
        said = ""
        for _ in range(100):
            said += capsys.readouterr().err
            if said:
                break
            time.sleep(0.05)
        lock = cache / f".{name}.lock"
        assert (
            said == f"deltatune: waiting for another conversion of fake into {cache / name} (its lock: {lock}) ...\n"
        )
        assert waiter.is_alive() and not calls
    waiter.join()
    assert out == [str(cache / name)] and len(calls) == 1


def _staging(cache, name, tag, hours_old=0.0):
    folder = cache / f".{name}.{tag}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half")
    if hours_old:
        then = time.time() - hours_old * 3600
        os.utime(folder, (then, then))
    return folder


def test_under_the_lock_every_staging_folder_of_this_host_is_stale(monkeypatch, tmp_path):
    """Only the lock's holder converts, so every staging folder of this host it finds is a killed conversion's: one
    named by a live pid was kept (pid 1 in a container, this process's own pid in the next container, a pid reused).
    Another host's, or an unnamed one, only when an hour old: a lock local to each host (NFS mounted nolock) would
    let that host be converting into it now (second review)."""
    gguf, calls = _fake(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    name = f"fake-{embedded._fingerprint(gguf)}"
    host = embedded._host()
    stale = [_staging(cache, name, tag) for tag in (f"{host}.{os.getpid()}.abc", f"{host}.1.def")]
    stale += [_staging(cache, name, tag, hours_old=2) for tag in ("host-b.1.ghi", "jkl")]
    young = [_staging(cache, name, tag) for tag in ("host-b.1.pqr", "stu")]
    other = _staging(cache, f"{name}x", "1.mno")  # (another model's)
    folder = embedded.resolve("fake")
    assert Path(folder) == cache / name and len(calls) == 1 and embedded._valid(Path(folder))
    assert not any(s.exists() for s in stale) and all(y.exists() for y in young) and other.exists()


def test_without_locks_a_staging_folder_is_stale_by_its_pid_on_this_host_else_by_its_age(monkeypatch, tmp_path):
    """Unlocked (no flock there), another process may be converting: this host's folders go with their process,
    another host's (its pids say nothing here) and unnamed ones when an hour old."""
    import errno
    import fcntl

    gguf, calls = _fake(monkeypatch, tmp_path)

    def flock(fh, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)
    cache = tmp_path / "cache"
    name = f"fake-{embedded._fingerprint(gguf)}"
    host = embedded._host()
    gone = [
        _staging(cache, name, f"{host}.{_dead_pid()}.a"),
        _staging(cache, name, f"{host}-other.{os.getpid()}.b", hours_old=2),
        _staging(cache, name, "c", hours_old=2),
    ]
    kept = [
        _staging(cache, name, f"{host}.{os.getppid()}.d"),
        _staging(cache, name, f"{host}-other.{_dead_pid()}.e"),
        _staging(cache, name, "f"),
    ]
    embedded.resolve("fake")
    assert len(calls) == 1 and not any(g.exists() for g in gone) and all(k.exists() for k in kept)
    assert embedded._staging_prefix(cache / name) == f".{name}.{host}.{os.getpid()}."


def test_a_cache_folder_that_cannot_be_written_is_one_line_before_converting(tmp_path):
    """The cache folder exists with its .lock file (an earlier run's) but is not writable: the conversion ran (30 s
    for smollm2) and mkdtemp's PermissionError came after it. Run as another user than root (root writes anyway)."""
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="deltatune-ro-"))
    try:
        base.chmod(0o755)
        pkg, cache = base / "pkg", base / "cache"
        pkg.mkdir()
        (pkg / "model.gguf").write_bytes(b"GGUF" + b"\0" * 100)
        cache.mkdir()
        name = f"fake-{embedded._fingerprint(pkg / 'model.gguf')}"
        (cache / f".{name}.lock").touch()
        (cache / f".{name}.lock").chmod(0o666)
        cache.chmod(0o555)
        command = [sys.executable, "-c", _RO_CHILD, str(base)]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("root writes any folder, and setpriv (to run as nobody) is not installed")
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        child = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert child.stdout == (
            f"ConfigError model 'fake' is converted once into {cache}, which cannot be written (Permission denied): "
            "set DELTATUNE_CACHE to a writable folder\n"
        ), child.stderr
        assert sorted(p.name for p in cache.iterdir()) == [f".{name}.lock"]
    finally:
        (base / "cache").chmod(0o755)
        shutil.rmtree(base)


ROOT = Path(__file__).resolve().parents[1]
_RO_CHILD = """
import os, sys, tempfile
from pathlib import Path
from deltatune.train import embedded
base = Path(sys.argv[1])
e = embedded.Embedded("fake", "fake_pkg", "org/fake-model", "pip install fake", "model.gguf")
embedded.EMBEDDED["fake"] = e
embedded._package_dir = lambda _e: base / "pkg"
os.environ["DELTATUNE_CACHE"] = str(base / "cache")
def convert(_pkg, _e, folder):  # the real conversion's write step (after its 30 s of loading)
    print("converted", file=sys.stderr)
    tempfile.mkdtemp(prefix=embedded._staging_prefix(folder), dir=folder.parent)
embedded._convert = convert
try:
    embedded.resolve("fake")
except Exception as exc:
    print(type(exc).__name__, exc)
"""
