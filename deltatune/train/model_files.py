"""What a local model folder's files say, read without loading a model: which weights file and shard index
transformers reads, one key of a JSON file, the weights file that does not open, a config.json field of the wrong
type or a shard index without its weight_map, whether a JSON file reads as an object, which file names a folder's
own image processor code. Split from models.py (sessions 57, 59), which neared its line limit."""

from __future__ import annotations

import os

import torch

_WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weights files transformers' from_pretrained reads from a local folder: the first of them there."""


def read_index(path: str) -> str | None:
    """The shard index transformers reads in the model folder ``path``: none beside a single weights file it reads
    first (a leftover pytorch_model.bin.index.json beside model.safetensors is never opened)."""
    first = next((f for f in _WEIGHTS_FILES if os.path.isfile(os.path.join(path, f))), None)
    return first if first and first.endswith(".index.json") else None


def no_vocabulary(path: str, names) -> bool:
    """Whether the folder ``path`` holds none of the vocabulary files ``names``, nor a file that may be one of
    another name (``*.model``, ``*.tiktoken``, ``vocab*``, ``merges*``, ``tokenizer*`` but tokenizer_config.json):
    read only to explain a tokenizer that failed to load."""
    return not any(
        f in names
        or f.endswith((".model", ".tiktoken"))
        or f.startswith(("vocab", "merges", "tokenizer"))
        and f != "tokenizer_config.json"
        for f in os.listdir(path)
    )


def json_value(file: str, key: str):
    """``key`` of the JSON object in ``file``; None when unreadable."""
    import json

    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def broken_weights(path: str) -> tuple[str, str] | None:
    """(file, why) for the first weights file transformers reads in the model folder ``path`` (a shard index's
    shards, each) that does not open: a safetensors header that is cut or damaged, a ``.bin`` that torch cannot
    unpickle (a truncated zip, garbage). Read only after a load failed: torch's and safetensors' errors name no file
    (a RuntimeError "PytorchStreamReader failed reading zip archive" or an UnpicklingError came as a traceback)."""
    import zipfile

    from safetensors import safe_open

    first = read_index(path) or next((f for f in _WEIGHTS_FILES if os.path.isfile(os.path.join(path, f))), None)
    if first is None or not os.path.isdir(path):
        return None
    shards = json_value(os.path.join(path, first), "weight_map") if first.endswith(".index.json") else {0: first}
    for file in sorted(set(shards.values())) if isinstance(shards, dict) else ():
        full = os.path.join(path, str(file))
        if not os.path.isfile(full):  # (transformers names a missing shard itself)
            continue
        try:
            if full.endswith(".safetensors"):
                with safe_open(full, "pt"):
                    pass
            else:  # (meta and mmap: the tensors' bytes are not read)
                zipped = zipfile.is_zipfile(full)
                torch.load(full, map_location="meta", weights_only=True, mmap=zipped)
        except Exception as exc:  # noqa: BLE001 (any failure to open it is the one line's reason)
            why = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
            return str(file), why if full.endswith(".safetensors") or zipped else f"not a torch checkpoint: {why}"
    return None


def config_problem(path: str) -> str | None:
    """What is wrong with a field of the model folder ``path``'s config.json that transformers checks by type
    (``image_size: "big"``): its field and why, in one line; None when the config reads (or fails otherwise:
    the loader's own errors name that). transformers raised huggingface_hub's StrictDataclassFieldValidationError,
    three lines, from the tokenizer's, the image processor's or the model's load."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=False)  # (None: transformers asks on stdin)
    except StrictDataclassError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]  # [field, "TypeError: why"]
        why = lines[-1].split(": ", 1)[-1].split(". Errors:")[0] if lines else type(exc).__name__
        return f"has a value of the wrong type ({why})"
    except Exception:  # noqa: BLE001 (not this check's to report)
        return None
    return None


def json_problem(file: str) -> str | None:
    """What is wrong with a JSON file transformers reads as an object (config.json, a sharded checkpoint's index):
    not valid JSON, or not an object (transformers raised a JSONDecodeError or a TypeError from deep inside);
    None when it reads, or cannot be opened (transformers' own error names that)."""
    import json

    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except OSError:
        return None
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.start})"
    except ValueError as exc:
        return f"is not valid JSON (line {exc.lineno}: {exc.msg})" if hasattr(exc, "lineno") else "is not valid JSON"
    return None if isinstance(value, dict) else f"is not a JSON object (a {type(value).__name__})"


def own_image_processor(path: str) -> str | None:
    """The file whose auto_map names the folder's own image processor code, where transformers looks:
    preprocessor_config.json's (AutoImageProcessor, or AutoFeatureExtractor), else config.json's
    AutoImageProcessor (read for any model_type, llama's too); None for neither."""
    for file, names in (("preprocessor_config.json", ("AutoImageProcessor", "AutoFeatureExtractor")),
                        ("config.json", ("AutoImageProcessor",))):  # fmt: skip
        auto_map = json_value(os.path.join(path, file), "auto_map")
        if isinstance(auto_map, dict) and any(name in auto_map for name in names):
            return file if file != "config.json" else "its config.json"
    return None


def index_problem(file: str) -> str | None:
    """What is wrong with a shard index (a JSON object) that transformers' shard reader (get_checkpoint_shard_files)
    fails on with a KeyError or AttributeError from deep inside: no "weight_map" object (tensor name -> shard file),
    no "metadata" object; None when both are there."""
    for key in ("weight_map", "metadata"):
        value = json_value(file, key)
        if not isinstance(value, dict):
            got = "has none" if value is None else f"is a {type(value).__name__}"
            return f"needs a {key!r} object, as transformers writes it, and {got}"
    return None


def folder_problem(path: str) -> tuple[str, str] | None:
    """(file, what is wrong) for the model folder ``path``'s config.json or shard index where transformers fails
    deep inside: not JSON or not an object (``json_problem``), a config value of the wrong type (``config_problem``),
    an index without its weight_map or metadata (``index_problem``); None when they read."""
    index = read_index(path)
    for file in filter(None, ("config.json", index)):
        if problem := json_problem(os.path.join(path, file)):
            return file, problem
    if problem := config_problem(path):
        return "config.json", problem
    if index and (problem := index_problem(os.path.join(path, index))):
        return index, problem
    return None


def base_config(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The base model's config (``model.name_or_path`` at ``model.revision``), read as the model loader reads it;
    None where it does not load (the model loader names the problem)."""
    from transformers import AutoConfig

    from ..config import ConfigError
    from .embedded import resolve  # (models.resolve_path; models imports caption, which imports the stage table)

    try:
        hub = {"revision": revision} if revision is not None else {}
        return AutoConfig.from_pretrained(resolve(name_or_path), trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, ConfigError):  # (an embedded model not installed: its loader says so)
        return None
