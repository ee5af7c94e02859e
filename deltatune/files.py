"""Adapter files on disk or on the hub: the layout rules (PEFT's key prefix, one sub-folder per non-default
adapter, heads apart from bodies), atomic writes, local-or-hub resolution, safe reading.

Reading prefers ``adapter_model.safetensors``; a pickle ``adapter_model.bin`` is read with
``torch.load(weights_only=True)`` (tensors only, as peft reads it) unless the caller passes ``allow_pickle=False``.
A truncated or corrupt file is an AdapterLoadError naming the file, never a traceback from deep inside safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, DeltaConfig, named_adapters_hint, read_config_file
from .layer import ModulesToSave, unwrapped_name
from .saves import LOCK as SAVE_LOCK
from .saves import SAVING as SAVING  # (SAVING, _host, process_alive: their users import them from here)
from .saves import _host as _host
from .saves import finish_saves, remove_stale_saves, saving
from .saves import process_alive as process_alive

KEY_PREFIX = "base_model.model."
"""PEFT's prefix of an adapter's tensor keys: ``base_model.model.<module path>.lora_A.weight``. A config may set
another (``DeltaConfig.state_key_prefix``); this is the only place the usual one is spelled."""


def key_prefix(config: DeltaConfig) -> str:
    """The prefix of ``config``'s adapter tensor keys in adapter_model.safetensors."""
    return config.state_key_prefix or KEY_PREFIX


def base_key(param: str, adapter_name: str) -> str:
    """The file key (after the prefix) of a base parameter an adapter trains in place (its biases): the parameter's
    name, except that PEFT drops the adapter's name from a head copy's (``classifier.modules_to_save.default.bias``
    is saved as ``classifier.modules_to_save.bias``)."""
    return param.replace(f".modules_to_save.{adapter_name}.", ".modules_to_save.")


def split_heads(
    tensors: dict[str, torch.Tensor], heads: list[str] | None, prefix: str = KEY_PREFIX
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An adapter's tensors split into (body, heads): a key belongs to a head when it lies under one of the
    ``heads`` module names (its ``modules_to_save``), at the top (``<prefix><head>.``) or nested (``.<head>.``)."""
    marks = tuple(heads or ())
    body: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        inside = any(key.startswith(f"{prefix}{h}.") or f".{h}." in key for h in marks)
        (head if inside else body)[key] = value
    return body, head


class AdapterLoadError(ValueError):
    """An adapter file is missing, corrupt, or does not fit the base model. Nothing was changed."""


# An adapter name becomes a folder name (save_pretrained writes every adapter but "default" to <folder>/<name>) and a
# key of the nn.ModuleDicts inside the layers, which refuse "." in keys. So: letters, digits, "-" and "_", 1-64 of
# them. No "/", "\\", "..", absolute paths or empty names, and no dot at all (the rule allows inner dots, but
# torch's ModuleDict does not, and one rule for names everywhere is worth more than the dot).
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_adapter_name(name: object) -> str:
    """``name`` if it is a valid adapter name (letters, digits, ``-``, ``_``; 1-64 characters), else ValueError.
    Every place where an adapter name becomes a path or a module key calls this before anything is written."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '-' or '_' "
            "(names become folder names, so no '/', '.', spaces or absolute paths)"
        )
    return name


def adapter_folder(root: str | os.PathLike[str], name: str) -> str:
    """The folder adapter ``name`` is saved to under ``root``: ``root`` itself for "default", else ``root/name``.

    The name is checked, ``root`` must not be a file, and the resolved path must lie inside ``root`` (a symlink
    named like the adapter that points elsewhere is refused too).
    """
    root = os.fspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"{root!r} is a file; adapters are saved into a folder")
    if name == "default":
        return root
    folder = os.path.join(root, check_adapter_name(name))
    real_root, real = os.path.realpath(root), os.path.realpath(folder)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise ValueError(f"adapter {name!r} would be written to {real}, outside {real_root}")
    return folder


def match_tensors(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    base_params: dict[str, torch.Tensor],
    source: str,
) -> dict[str, torch.Tensor]:
    """Check a file's ``tensors`` against the adapter's ``expected`` ones (same keys and shapes); return the base
    parameters (of ``base_params``, keyed like the file) that the file holds full copies of.

    PEFT saves full copies of base weights next to an adapter (the embedding matrix when embeddings are targeted:
    save_embedding_layers); like PEFT, the caller loads them into the base model. A copy is the parameter of that
    name with or without the ``base_layer.`` of the adapter layers around its module (``embed_tokens.weight`` is
    ``embed_tokens.base_layer.weight`` once another adapter's LoRA wraps the embedding, and the other way round).

    Raises:
        AdapterLoadError: a tensor is missing, belongs to no module of the model, or has another shape.
    """
    unwrapped = {unwrapped_name(k): p for k, p in base_params.items()}
    base_params = {k: base_params.get(k, unwrapped.get(unwrapped_name(k))) for k in tensors if k not in expected}
    base_params = {k: p for k, p in base_params.items() if p is not None}
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise AdapterLoadError(
            f"{source}: the adapter has no tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
            + "; was it saved with another config or for another model?"
        )
    unexpected = [k for k in tensors if k not in expected and k not in base_params and not _head_echo(k, expected)
                  and not (k.endswith(".trainable_tokens_delta") and not tensors[k].numel())]  # (peft's for no token ids)  # fmt: skip
    if unexpected:
        raise AdapterLoadError(
            f"{source}: tensor {unexpected[0]!r} does not belong to any module of this model"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    full_copies = {k: base_params[k] for k in tensors if k not in expected and k in base_params}
    for key, target in {**expected, **full_copies}.items():
        got, want = tuple(tensors[key].shape), tuple(target.shape)
        if got == want:
            continue
        rank = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}.get(_factor(key), -1)
        if len(got) == len(want) > rank >= 0 and all(g == w for i, (g, w) in enumerate(zip(got, want)) if i != rank):
            raise AdapterLoadError(  # only the rank differs: the config's r (or rank_pattern) is not the file's
                f"{source}: {key} has rank {got[rank]} in the file but {want[rank]} by the config's r / rank_pattern; "
                "the config does not belong to these tensors"
            )
        raise AdapterLoadError(
            f"{source}: {key} has shape {got} in the file but {want} in this model; the adapter was made for a "
            "different base model"
        )
    return full_copies


def _head_echo(key: str, expected: dict[str, torch.Tensor]) -> bool:
    """Whether ``key`` repeats a head copy's tensor under its wrapper's name (``embed_tokens.modules_to_save.weight``
    for ``embed_tokens.weight``): peft's save_embedding_layers writes such keys for a head it trains in full, and its
    loading leaves them out."""
    head, mark, rest = key.partition(".modules_to_save.")
    return bool(mark) and (f"{head}.{rest}" in expected or f"{head}.{rest.partition('.')[2]}" in expected)


def _factor(key: str) -> str:
    """The LoRA factor a file key names (``...q_proj.lora_A.weight`` -> ``lora_A``), else ""."""
    return next((p for p in reversed(key.split(".")) if p.startswith("lora_")), "")


EMBEDDING_LAYERS = ("embed_tokens", "lm_head")
"""The module names whose being targeted makes peft save the embedding matrices beside the adapter."""


def embedding_copies(
    model: torch.nn.Module, config: DeltaConfig, save: bool | str = "auto"
) -> dict[str, torch.Tensor]:
    """The base embedding weights peft's ``save_pretrained(save_embedding_layers=save)`` writes beside an adapter,
    keyed by their names in ``model``: the input and output embeddings' (where an adapter wraps one, its base layer's).

    "auto" (peft's default) saves them when ``config`` targets ``embed_tokens`` or ``lm_head`` and trains no token
    rows (an adapter on a resized vocabulary computes with rows that a fresh resize draws anew), or when the
    vocabulary differs from the config.json in the folder ``base_model_name_or_path`` (peft also asks the hub there;
    deltatune does not)."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != "all-linear":
        names = [n for n, _ in model.named_modules() if re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYERS)})$", n)]
        targeted = any(re.fullmatch(targets, n) for n in names)
    else:
        targeted = bool(targets) and any(e in targets for e in EMBEDDING_LAYERS)
    if save == "auto":  # (peft: not for an adapter that trains embedding rows, trainable_token_indices, itself)
        tokens = getattr(config, "trainable_token_indices", None) is not None
        save = (targeted and not tokens) or _vocab_resized(model, config.base_model_name_or_path)
    if not save or not hasattr(model, "get_input_embeddings"):
        return {}
    kinds, paths = (torch.nn.Linear, torch.nn.Embedding), {id(m): n for n, m in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        base = getattr(layer, "base_layer", None)  # wrapped by an adapter: its base layer (the only one if targeted)
        module = base if isinstance(base, kinds) else None if targeted else getattr(layer, "original_module", layer)
        if isinstance(module, kinds) and id(module) in paths:
            out.update({f"{paths[id(module)]}.{n}".lstrip("."): p for n, p in module.named_parameters()})
    return out


def _vocab_resized(model: torch.nn.Module, base: str | None) -> bool:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab or not base or not os.path.isfile(os.path.join(base, "config.json")):
        return False
    try:
        return vocab != type(model.config).from_pretrained(base).vocab_size
    except Exception:  # an unreadable or foreign config.json: as peft, assume the vocabulary was kept
        return False


TRAINING_STATE = "training_state.safetensors"
"""Beside an adapter whose saved form is folded (P-tuning's or prefix tuning's encoder): the tensors going on
training it needs (``DeltaLayer.training_state``), keyed ``<layer path>|<tensor>``; peft ignores the file."""


def write_adapter(
    folder: str,
    tensors: dict[str, torch.Tensor],
    config: DeltaConfig,
    training: dict | None = None,
    safe: bool = True,
    auto_mapping: dict[str, str] | None = None,
) -> None:
    """Write ``adapter_model.safetensors`` (``safe`` False: peft's ``torch.save`` file, ``adapter_model.bin``) and
    ``adapter_config.json`` into ``folder`` (created), each atomically, and ``training`` (a training state) as
    TRAINING_STATE, or remove an earlier save's. ``auto_mapping``: peft's field of that name, written when given."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    for name, group in ((WEIGHTS_NAME if safe else PICKLE_WEIGHTS_NAME, tensors), (TRAINING_STATE, training)):
        if group is None or name == TRAINING_STATE and not group:
            continue
        group = {k: v.detach().to("cpu").contiguous().clone() for k, v in group.items()}
        if name == PICKLE_WEIGHTS_NAME:
            atomic_write(os.path.join(folder, name), lambda f, g=group: torch.save(g, f))
        else:
            atomic_write(os.path.join(folder, name), lambda f, g=group: save_file(g, f, {"format": "pt"}))
    if not training and os.path.exists(os.path.join(folder, TRAINING_STATE)):
        os.remove(os.path.join(folder, TRAINING_STATE))
    # fields sorted as peft writes them, but not what they hold: rank_pattern's first matching key wins (peft sorts
    # those too, and its file of {"v_proj": 2, "layers.*": 6} then reloads with rank 6 where it trained rank 2)
    fields = config.to_dict() | ({"auto_mapping": auto_mapping} if auto_mapping else {})
    if tensors and any(MHA_OUT_B in k for k in tensors):  # (peft 0.22 doubles the lora_B of a file without it)
        fields["peft_version"] = "0.22.0"  # MultiheadAttention's out_proj update added once, as peft >= 0.22
    text = json.dumps(dict(sorted(fields.items())), indent=2)
    atomic_write(os.path.join(folder, CONFIG_NAME), lambda f: Path(f).write_text(text, encoding="utf-8"))


MHA_OUT_B = ".base_layer.out_proj.lora_B."  # MultiheadAttention's out_proj lora_B (peft < 0.22 added it twice)


def mha_once(tensors: dict[str, Any], source: str) -> dict[str, Any]:
    """A file that peft < 0.22 wrote (its config's peft_version says so) added MultiheadAttention's out_proj update
    twice: its lora_B doubled, as peft 0.22 loads it, so it computes as it trained (deltatune adds it once). A file
    without a peft_version is deltatune's (it wrote none before "0.22.0") or peft < 0.18's: taken as deltatune's."""
    keys = [k for k in tensors if MHA_OUT_B in k]
    config = os.path.join(os.path.dirname(source), CONFIG_NAME)
    version = read_config_file(config)[1].get("peft_version") if keys and os.path.isfile(config) else None
    if not isinstance(version, str):
        return tensors
    from packaging.version import Version

    given = Version(version.partition("@")[0])
    release = Version(given.base_version)
    if not (release < Version("0.21.1") or (not given.is_devrelease and release < Version("0.22.0"))):  # peft's rule
        return tensors
    warnings.warn(f"{source}: saved by peft {version}, which added MultiheadAttention's out_proj update twice; its "
                  "lora_B is doubled to keep the adapter's outputs (as peft 0.22 loads it)", stacklevel=3)  # fmt: skip
    return {k: 2 * v if k in keys else v for k, v in tensors.items()}


def pick_tensors(
    model: Any,
    name: str,
    state_dict: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor] | None = None,
    injected: bool = False,
) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors (its saved keys; ``expected``, default its ``adapter_state_dict``, e.g. with the
    embedding copies added) taken from ``state_dict``, a state dict of the model keyed by its parameters' names:
    deltatune's (``base_model.<path>``), peft's (``base_model.model.<path>``, with peft's own module names: DoRA's
    ``lora_magnitude_vector.<name>.weight``, trainable tokens' ``token_adapter.``) or, on a model given to
    ``inject_adapter_in_model`` (``injected``), its own (``<path>``), as peft's
    ``get_peft_model_state_dict(state_dict=...)`` picks them. A tensor saved in a folded form (no parameter of its
    own: prompt learning's ``prompt_embeddings``) is the live value, as peft's, which ignores the state dict there.

    Raises:
        ValueError: the state dict lacks one of the adapter's tensors; named by the model's own name for it.
    """
    expected = model.adapter_state_dict(name) if expected is None else expected
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    magnitude = re.compile(rf"\.lora_magnitude_vector\.{re.escape(name)}\.weight$")
    peft_names = {magnitude.sub(f".lora_magnitude_vector.{name}", k).replace(".token_adapter.", "."): k
                  for k in state_dict}  # fmt: skip
    out = {}
    for key, tensor in expected.items():
        own = names.get(id(tensor))
        if own is None:
            out[key] = tensor
            continue
        path = own.removeprefix("base_model.")  # (the plain model's own name, after inject_adapter_in_model)
        found = [k for k in (own, KEY_PREFIX + path, path) if k in state_dict]
        found += [peft_names[k] for k in (KEY_PREFIX + path, path) if k in peft_names]
        if not found:
            mine, theirs = (path, path) if injected else (own, KEY_PREFIX + path)  # (injected: the model's own)
            theirs = re.sub(
                r"(^|\.)(trainable_tokens_delta\.[^.]+)$", r"\1token_adapter.\2", dora_weight_name(theirs, name)
            )
            mine = repr(mine) if mine == theirs else f"{mine!r} (or peft's {theirs!r})"
            raise ValueError(f"state_dict=: no {mine} in it, adapter {name!r}'s {key}")
        out[key] = state_dict[found[0]]
    return out


def tied_output_rows(base: torch.nn.Module, name: str) -> list[str]:
    """peft's name for the output layer's token rows beside LoRA's input-embedding ones (``name``,
    ``<path>.token_adapter.trainable_tokens_delta.<adapter>``) on a model whose output layer is tied to the input
    embedding: peft's LoRA with ``trainable_token_indices`` wraps the tied output layer too, its rows one tensor with
    the input embedding's (``lm_head.token_adapter.trainable_tokens_delta.<adapter>``); [] otherwise."""
    head, sep, tail = name.rpartition(".token_adapter.")
    if not sep or not getattr(getattr(base, "config", None), "tie_word_embeddings", False):
        return []
    try:
        emb, out = base.get_input_embeddings(), base.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        return []
    weights = [getattr(getattr(m, "base_layer", m), "weight", None) for m in (emb, out)]  # (not a wrapper's sum)
    if any(w is None for w in weights) or weights[0].data_ptr() != weights[1].data_ptr():
        return []
    paths = {id(m): p for p, m in base.named_modules()}
    emb_path, out_path = paths.get(id(emb)), paths.get(id(out))
    if not emb_path or not out_path or not (head == emb_path or head.endswith("." + emb_path)):
        return []
    return [head[: len(head) - len(emb_path)] + out_path + sep + tail]


def dora_weight_name(path: str, name: str) -> str:
    """peft's name of a parameter of adapter ``name`` that deltatune's model names ``path``: DoRA's magnitude is a
    module's ``.weight`` there (``lora_magnitude_vector.<name>.weight``); any other name as it is."""
    return re.sub(rf"\.lora_magnitude_vector\.{re.escape(name)}$", r"\g<0>.weight", path)


def upcast_adapter(layers: list[Any], name: str) -> bool:
    """peft's ``autocast_adapter_dtype`` on load: adapter ``name``'s float16 / bfloat16 tensors in the adapter
    ``layers`` (DeltaLayers; peft's tuner layers, so not a head's full copy) made float32. True when any was."""
    cast = False
    for layer in layers:
        if name in layer.adapter_names and not isinstance(layer, ModulesToSave):
            for p in layer.adapter_parameters(name).values():
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data, cast = p.data.float(), True
    return cast


def stage_training_state(layers: dict, folder: str | os.PathLike[str], name: str) -> None:
    """Hand TRAINING_STATE in ``folder`` (if any) to the ``layers`` (by path) it names, for adapter ``name``: the next
    import restores an unfolded encoder instead of folding it (resuming, as ``load_adapter_weights`` does)."""
    states = read_training_state(folder)
    for path in states.keys() - layers.keys():
        raise AdapterLoadError(f"{os.path.join(folder, TRAINING_STATE)}: no adapter layer at {path!r} in this model")
    for path, layer in layers.items():  # (None clears what an earlier, failed load left staged)
        layer.stage_training_state(name, states.get(path))


def read_training_state(folder: str | os.PathLike[str]) -> dict[str, dict[str, torch.Tensor]]:
    """TRAINING_STATE in ``folder`` by layer path ({} where there is none)."""
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(folder), TRAINING_STATE)
    if not os.path.isfile(path):
        return {}
    try:
        flat = load_file(path)
    except Exception as exc:
        raise AdapterLoadError(f"{path} is truncated or not a safetensors file: {exc}") from None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        layer, _, tensor = key.partition("|")
        out.setdefault(layer, {})[tensor] = value
    return out


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
        failure = write_failure(exc)
        if failure is not None:  # disk full, read-only, no such folder: one line naming the file
            error = OSError(f"could not write {path}: {failure.strerror or failure}")
            error.errno = failure.errno
            raise error from None
        raise


_WRITE_ERROR = re.compile(r"os error \d+|file write failed|No space left on device|File too large|inline_container")


def write_failure(exc: BaseException) -> OSError | None:
    """``exc`` as the OSError it stands for where writing a file failed: an OSError, or the error safetensors,
    torch or tokenizers raise around one (a full disk: "I/O error: No space left on device (os error 28)", "file
    write failed"); None for anything else."""
    if isinstance(exc, OSError):
        return exc
    text = " ".join(str(exc).split())
    if not isinstance(exc, Exception) or not _WRITE_ERROR.search(text):
        return None
    if "inline_container" in text:  # torch.save's zip writer: "[enforce fail at inline_container.cc:672] ..."
        text = f"torch could not write the file in full (a full disk?): {text.split('] ', 1)[-1].lstrip('. ')}"
    return OSError(text.removeprefix("Error while serializing: "))


def save_folder_files(save: Callable[[str], object], folder: str) -> None:
    """Run ``save(tmp)`` (a ``save_pretrained``) into a temporary folder inside ``folder``, then move each file it
    wrote into ``folder``: a failure (a full disk) leaves no half-written file there, and says so in one line."""
    os.makedirs(folder, exist_ok=True)
    with saving(folder) as tmp:  # (locked: no other save takes it over while it runs)
        _save_folder_files(save, folder, tmp)


def _save_folder_files(save: Callable[[str], object], folder: str, tmp: str) -> None:
    try:
        save(tmp)
        for name in os.listdir(tmp):
            if name == SAVE_LOCK:  # (this save's lock, held till it ends)
                continue
            if os.path.isdir(os.path.join(folder, name)):  # an earlier save's sub-folder: replaced whole
                shutil.rmtree(os.path.join(folder, name))
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        remove_stale_saves(folder)
    except Exception as exc:
        failure = write_failure(exc)
        if failure is None:
            raise
        raise OSError(f"could not write into {folder}: {failure.strerror or failure}") from None


def explain_missing_fields(exc: AdapterLoadError, config_file: str, config: object) -> AdapterLoadError:
    """``exc`` (the saved tensors do not fit) blamed on the fields ``config_file`` lacks, when it lacks any: a
    config written by hand or by another tool without, say, ``r`` gets the default, and the tensors then look as
    if made "for a different base model". Returns ``exc`` itself when the file sets every field."""
    import dataclasses
    import json

    try:
        with open(config_file, encoding="utf-8") as fh:
            given = set(json.load(fh))
    except (OSError, ValueError):
        return exc
    # A field the config's own file leaves out (the token methods' target_modules) is never the one to blame.
    written = set(config.to_dict()) if hasattr(config, "to_dict") else None  # type: ignore[attr-defined]
    missing = [
        f
        for f in dataclasses.fields(config)  # type: ignore[arg-type]
        if f.init and f.name not in given and (written is None or f.name in written)
    ]
    if not missing:
        return exc
    used = ", ".join(f"{f.name} (default {getattr(config, f.name)!r} used)" for f in missing)
    reason = str(exc).split("; ")[0]
    return AdapterLoadError(f"{config_file} does not set {used}, and the saved tensors do not fit that: {reason}")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


HUB_KWARGS = ("token", "cache_dir", "local_files_only", "force_download", "proxies", "repo_type", "use_auth_token")
"""peft's hub-download arguments of ``from_pretrained`` / ``load_adapter``: passed to ``hf_hub_download`` for a hub
repo; a local folder needs none of them (as with peft)."""


def resolve(
    model_id: str | os.PathLike[str],
    filename: str,
    subfolder: str | None,
    revision: str | None,
    hub: dict | None = None,
    finish: bool = True,
) -> str:
    """A local file path for ``filename`` in a folder or (when reachable) a hub repo (``hub``: ``HUB_KWARGS``).
    ``finish``: a save killed between its renames into the folder, or the one above, finished first (once a load)."""
    folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    if os.path.isdir(os.fspath(model_id)):
        if finish:  # (a save killed between its renames: finished before a file of it is read)
            finish_saves(folder)
            finish_saves(os.path.dirname(os.path.abspath(folder)), os.path.basename(os.path.abspath(folder)))
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {filename} in {folder!r}{named_adapters_hint(folder)}")
        return path
    if os.path.isfile(os.fspath(model_id)):  # (peft: "Can't find 'adapter_config.json' at <file>")
        raise FileNotFoundError(
            f"{os.fspath(model_id)!r} is a file; pass the folder that holds the adapter's {filename}"
        )
    try:
        from huggingface_hub import hf_hub_download

        hub = dict(hub or {})
        hub.setdefault("token", hub.pop("use_auth_token", None))  # (peft's older spelling)
        return hf_hub_download(os.fspath(model_id), filename, subfolder=subfolder, revision=revision, **hub)
    except Exception as exc:  # offline, unknown repo, missing file: one clear message
        raise FileNotFoundError(
            f"{model_id!r} is not a local folder and {filename} could not be fetched from the hub ({type(exc).__name__})"
        ) from None


def read_weights(
    model_id: str | os.PathLike[str],
    subfolder: str | None,
    revision: str | None,
    allow_pickle: bool,
    device: str | torch.device | None = None,
    hub: dict | None = None,
    finish: bool = True,
) -> tuple[dict[str, torch.Tensor], str]:
    """An adapter's tensors and the file they came from: safetensors, or a pickle unless ``allow_pickle`` is False;
    read onto ``device`` (peft's ``torch_device``; None: the CPU). ``finish``: ``resolve``'s."""
    tensors, path = _read_weights(model_id, subfolder, revision, allow_pickle, hub, finish)
    tensors = mha_once(tensors, path)  # (a file of peft < 0.22 with MultiheadAttention: as it trained)
    return ({k: v.to(device) for k, v in tensors.items()} if device is not None else tensors), path


def _read_weights(
    model_id: str | os.PathLike[str],
    subfolder: str | None,
    revision: str | None,
    allow_pickle: bool,
    hub: dict | None,
    finish: bool = True,
) -> tuple[dict[str, torch.Tensor], str]:
    try:
        path = resolve(model_id, WEIGHTS_NAME, subfolder, revision, hub, finish)
    except FileNotFoundError:
        try:
            path = resolve(model_id, PICKLE_WEIGHTS_NAME, subfolder, revision, hub, False)
        except FileNotFoundError:
            where = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
            raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) at {where!r}") from None
        if not allow_pickle:
            raise AdapterLoadError(
                f"{path} is a pickle file and allow_pickle=False was given; pass allow_pickle=True to read it "
                "(with torch.load(weights_only=True), as peft reads it)"
            ) from None
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's own message runs to paragraphs: its unpickler's reason is the one line
            found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please use|\n\n|$)", str(exc), re.S)
            why = " ".join((found.group(1) if found else str(exc)).split())
            raise AdapterLoadError(
                f"{path} could not be read as tensors (truncated, corrupt or other objects): {why}"
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            what = type(tensors).__name__ if not isinstance(tensors, dict) else "dict with values other than tensors"
            raise AdapterLoadError(f"{path} holds a {what}, not an adapter's named tensors") from None
        return tensors, path
    from safetensors.torch import load_file

    try:
        return load_file(path), path
    except Exception as exc:
        raise AdapterLoadError(f"{path} is truncated or not a safetensors file: {exc}") from None


class PushToHub:
    """``push_to_hub`` as peft's model has it: ``save_pretrained``'s adapter files are uploaded (the base model's
    own push_to_hub, reached through attribute passing, would upload the whole base model's weights)."""

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        from transformers.utils import PushToHubMixin

        return PushToHubMixin.push_to_hub(self, repo_id, **kwargs)

    def _upload_modified_files(self, *args: Any, **kwargs: Any) -> Any:
        from transformers.utils import PushToHubMixin

        return PushToHubMixin._upload_modified_files(self, *args, **kwargs)
