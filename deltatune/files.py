"""Adapter files on disk or on the hub: atomic writes, local-or-hub resolution, safe reading.

Reading prefers ``adapter_model.safetensors``; a pickle ``adapter_model.bin`` can run code when loaded, so it
is read only when the caller passes ``allow_pickle=True``. A truncated or corrupt file is an AdapterLoadError
naming the file, never a traceback from deep inside safetensors.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable

import torch

from .config import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME


class AdapterLoadError(ValueError):
    """An adapter file is missing, corrupt, or does not fit the base model. Nothing was changed."""


# An adapter name becomes a folder name (save_pretrained writes every adapter but "default" to <folder>/<name>) and a
# key of the nn.ModuleDicts inside the layers, which refuse "." in keys. So: letters, digits, "-" and "_", 1-64 of
# them. No "/", "\\", "..", absolute paths or empty names, and no dot at all (the rule allows inner dots, but
# torch's ModuleDict does not, and one rule for names everywhere is worth more than the dot).
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_adapter_name(name: object) -> str:
    """``name`` if it is a valid adapter name (letters, digits, ``-``, ``_``; 1-64 characters), else ValueError.

    Every place where an adapter name becomes a path or a module key calls this before anything is written.
    """
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '-' or '_' "
            "(names become folder names, so no '/', '.', spaces or absolute paths)"
        )
    return name


def adapter_folder(root: str | os.PathLike[str], name: str) -> str:
    """The folder adapter ``name`` is saved to under ``root``: ``root`` itself for "default", else ``root/name``.

    The name is checked, and the resolved path must lie inside ``root`` (a symlink named like the adapter that
    points elsewhere is refused too).
    """
    root = os.fspath(root)
    if name == "default":
        return root
    folder = os.path.join(root, check_adapter_name(name))
    real_root, real = os.path.realpath(root), os.path.realpath(folder)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise ValueError(f"adapter {name!r} would be written to {real}, outside {real_root}")
    return folder


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Write ``path`` through ``write(tmp)`` into a temporary file beside it, then rename: never half-written."""
    folder = os.path.dirname(path) or "."
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        write(tmp)
        # mkstemp creates 0600; give the file the mode every other file of the folder gets (0666 less the umask).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):  # disk full, read-only, no such folder: one line naming the file
            error = OSError(f"could not write {path}: {exc.strerror or exc}")
            error.errno = exc.errno
            raise error from None
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def resolve(model_id: str | os.PathLike[str], filename: str, subfolder: str | None, revision: str | None) -> str:
    """A local file path for ``filename`` in a folder or (when reachable) a hub repo."""
    folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    if os.path.isdir(os.fspath(model_id)):
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {filename} in {folder!r}")
        return path
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(os.fspath(model_id), filename, subfolder=subfolder, revision=revision)
    except Exception as exc:  # offline, unknown repo, missing file: one clear message
        raise FileNotFoundError(
            f"{model_id!r} is not a local folder and {filename} could not be fetched from the hub ({type(exc).__name__})"
        ) from None


def read_weights(
    model_id: str | os.PathLike[str], subfolder: str | None, revision: str | None, allow_pickle: bool
) -> tuple[dict[str, torch.Tensor], str]:
    """An adapter's tensors and the file they came from: safetensors, or a pickle only with ``allow_pickle``."""
    try:
        path = resolve(model_id, WEIGHTS_NAME, subfolder, revision)
    except FileNotFoundError:
        try:
            path = resolve(model_id, PICKLE_WEIGHTS_NAME, subfolder, revision)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) at {os.fspath(model_id)!r}"
            ) from None
        if not allow_pickle:
            raise AdapterLoadError(
                f"{path} is a pickle file, which can run arbitrary code when loaded; deltatune reads safetensors "
                "only unless you pass allow_pickle=True for a file you trust"
            ) from None
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as exc:
            raise AdapterLoadError(f"{path} could not be read (truncated or corrupt?): {exc}") from None
    from safetensors.torch import load_file

    try:
        return load_file(path), path
    except Exception as exc:
        raise AdapterLoadError(f"{path} is truncated or not a safetensors file: {exc}") from None
