"""``DeltaModel.save_pretrained``'s files (``save_adapters``): every adapter written into a hidden folder beside, then
moved in once all are (``publish``)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from .files import (
    TRAINING_STATE,
    adapter_folder,
    atomic_write,
    embedding_copies,
    key_prefix,
    pick_tensors,
    remove_stale_saves,
    write_adapter,
    write_failure,
)
from .saves import MOVES, folder_lock, identity, saving


def save_adapters(
    model: Any,
    save_directory: str | os.PathLike[str],
    names: list[str],
    save_embedding_layers: bool | str,
    path_initial_model_for_weight_conversion: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    safe_serialization: bool = True,
    **_: Any,
) -> None:
    """``DeltaModel.save_pretrained``'s files: each adapter of ``names`` in its folder (``adapter_folder``), its config
    in inference mode and naming the base model, the embedding copies peft's ``save_embedding_layers`` asks for
    (``embedding_copies``) and its training state, all written beside and moved in once every adapter's files are
    (``publish``: a refusal or a failed write, a full disk, leaves every adapter's files as they were; a crash
    between the renames is finished by the next load or save of the folder, ``saves.finish_saves``). ``names``
    empty: the folder alone, as peft (which writes its model card there). ``path_initial_model_for_weight_conversion`` (peft's: a LoRA saved right after its init):
    each adapter written as the plain LoRA of its change since (the LoRA method's
    ``convert_to_plain_lora``, as peft's conversion). ``state_dict`` (peft's): the tensors, embedding copies
    included, are taken from it (``pick_tensors``), e.g. a full state dict gathered from sharded (FSDP / ZeRO-3) parameters.
    ``safe_serialization`` False: peft's ``torch.save`` file, ``adapter_model.bin``, written and moved in as the
    safetensors one is (an earlier save's ``adapter_model.safetensors``, which loaders prefer, then removed). An
    adapter with no task type gets peft's ``auto_mapping`` (the base model's class and module), which peft's
    ``AutoPeftModel`` builds the base model from (a converted one too, as peft's)."""
    folders = check_folders(save_directory, names)  # every name and folder checked before writing
    if not names:
        os.makedirs(save_directory, exist_ok=True)
    path = getattr(getattr(model.base_model, "config", None), "_name_or_path", None) or None
    base_class = type(model.base_model)  # (peft's auto_mapping: the class AutoPeftModel builds for no task type)
    auto = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    initial, convert = path_initial_model_for_weight_conversion, getattr(model, "convert_to_plain_lora", None)
    writes = {}  # every adapter's files made (a state_dict= lacking a tensor refused) before any is written
    for name in names:
        given = model.peft_config[name]
        if initial is not None:  # the method's own conversion (any method's model function)
            if given.peft_type != "LORA" or convert is None:
                raise ValueError(f"adapter {name!r} ({given.method}): path_initial_model_for_weight_conversion "
                                 "converts LoRA adapters only")  # fmt: skip
            continue
        config = given.replace(inference_mode=True, base_model_name_or_path=given.base_model_name_or_path or path)
        training = {f"{p}|{k}": v for p, layer in model._layers() if name in layer.adapter_names
                    for k, v in layer.training_state(name).items()}  # fmt: skip
        tensors = model.adapter_state_dict(name)
        for pname, p in embedding_copies(model.base_model, config, save_embedding_layers).items():
            tensors.setdefault(key_prefix(config) + pname, p)
        tensors = tensors if state_dict is None else pick_tensors(model, name, state_dict, tensors)
        writes[name] = (tensors, config, training, safe_serialization, auto if config.task_type is None else None)

    def write(name: str, staged: str) -> None:
        if initial is None:
            return write_adapter(staged, *writes[name])
        convert(initial, staged, name)
        config_file = os.path.join(staged, CONFIG_NAME)
        with open(config_file, encoding="utf-8") as fh:
            fields = json.load(fh)
        if fields.get("task_type") is None:  # peft's auto_mapping, as write_adapter writes it (fields sorted)
            text = json.dumps(dict(sorted((fields | {"auto_mapping": auto}).items())), indent=2)
            atomic_write(config_file, lambda f: Path(f).write_text(text, encoding="utf-8"))
        if not safe_serialization:  # the converted adapter as peft's torch.save file
            from safetensors.torch import load_file

            tensors = load_file(os.path.join(staged, WEIGHTS_NAME))
            atomic_write(os.path.join(staged, PICKLE_WEIGHTS_NAME), lambda f: torch.save(tensors, f))
            os.remove(os.path.join(staged, WEIGHTS_NAME))

    publish(os.fspath(save_directory), folders, write)


def check_folders(save_directory: str | os.PathLike[str], names: list[str]) -> dict[str, str]:
    """Each adapter of ``names`` -> its folder (``adapter_folder``), refused as peft refuses it (``save_directory``, or
    an adapter's sub-folder, a file); nothing written. Called on every process, the main one or not
    (``is_main_process``), as peft's checks and ``os.makedirs`` raise on every rank: a DDP job stops on every rank.

    Raises:
        ValueError: naming the adapter and the file.
    """
    adapter_folder(save_directory, "default")  # (a file there refused, with no adapter too)
    folders = {name: adapter_folder(save_directory, name) for name in names}
    refuse_files(folders)
    return folders


def refuse_files(folders: dict[str, str]) -> None:
    """Refuse, in one line, an adapter folder that is a file (``save_dir/other`` a plain file), before any write.

    Raises:
        ValueError: naming the adapter and the file.
    """
    for name, folder in folders.items():
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{folder!r} is a file; adapter {name!r} is saved into a folder")


def refuse_read_only(folders: list[str]) -> None:
    """Refuse, in one line naming it, a folder of ``folders`` that exists and this process may not write into (a
    read-only save folder, or an adapter's sub-folder of an earlier save), before anything is staged or moved in.

    Raises:
        PermissionError: errno EACCES, ``filename`` the folder, its text saying it is a read-only folder.
    """
    for folder in folders:
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied (a read-only folder)", folder)


def publish(save_directory: str, folders: dict[str, str], write: Callable[[str, str], object]) -> None:
    """``write(name, folder)`` each adapter of ``folders`` (name -> its destination) into a hidden folder in
    ``save_directory``, then make every destination folder and move the files in.

    A refusal (a folder that is a file, or read-only: ``refuse_read_only``) or a failed write (a full disk, named by
    its destination file, errno kept) leaves every adapter's files as they were, and so does a move refused after
    others went in (a sticky folder whose files another user owns: ``move_in`` puts back what it moved); a crash
    between the renames (a power cut, SIGKILL) leaves some files new and some old, and the rest in the hidden folder
    beside the list of moves (``saves.MOVES``): the next load of an adapter there, or save into the folder, finishes
    them (``saves.finish_saves``); the hidden folder of a save killed before its first move is removed by the next
    save into the folder (``remove_stale_saves``).
    """
    os.makedirs(save_directory, exist_ok=True)
    refuse_read_only([save_directory, *folders.values()])
    with saving(save_directory) as tmp:  # (locked while this save runs: no load or save takes it over)
        remove_stale_saves(os.fspath(save_directory))  # (ours stays: its lock is held)
        for name, folder in folders.items():
            staged = os.path.join(tmp, name)
            try:
                write(name, staged)
            except Exception as exc:
                failure = write_failure(exc)
                if failure is None or isinstance(exc, FileNotFoundError) and tmp not in str(exc):
                    raise  # (not a write: a file read, the initial adapter of a conversion, is not there)
                text = str(failure)
                text = text.replace(staged, folder) if staged in text else f"could not write {folder}: {text}"
                error = OSError(text.replace(tmp, os.fspath(save_directory)))
                error.errno = failure.errno
                raise error from None
        refuse_files(folders)  # (again: made a file while writing)
        move_in(tmp, folders)


def move_in(tmp: str, folders: dict[str, str]) -> None:
    """``_move_in``, holding the save folder's lock (``saves.folder_lock``): no finisher of a killed save renames
    into the folder while this save's identities are taken and its files moved in."""
    with folder_lock(os.path.dirname(tmp)):
        _move_in(tmp, folders)


def _move_in(tmp: str, folders: dict[str, str]) -> None:
    """Move each adapter's staged files (``tmp/<name>/``) into its folder, and out an earlier save's files the new
    ones replace (its training state; its safetensors beside a new .bin, which loaders read before it), all or none:
    each file replaced is kept aside in ``tmp`` (a hard link, or a copy where linking is refused) until every move
    succeeded, so a move that fails (EPERM in a sticky folder whose file another user owns, which ``os.access`` does
    not tell) puts back every file already moved, removes the folders it made, and is raised as one line naming
    the destination file (errno kept). An earlier file that cannot be put back is not lost: it is kept beside its
    destination as ``<file>.before-save`` (``keep_beside``) and the error names it. The files are moved one rename
    each, once the list of them (``saves.MOVES``, with each destination's identity before and after) is written: a
    SIGKILL between two is finished by the next load or save where the files are as the kill left them
    (``saves.finish_saves``; an adapter written since is left as it is).
    """
    aside = os.path.join(tmp, ".before")  # (no adapter is named so: names hold no '.')
    os.makedirs(aside)
    moves = {}  # (MOVES: what a killed save's next load or save finishes, saves.finish_saves)
    for name, folder in folders.items():
        staged = os.listdir(os.path.join(tmp, name))
        gone = [TRAINING_STATE] + ([WEIGHTS_NAME] if PICKLE_WEIGHTS_NAME in staged else [])
        gone = [f for f in gone if f not in staged]  # (identities: a finisher moves only over files as they were)
        moves[name] = {"folder": os.path.relpath(folder, os.path.dirname(tmp)), "files": staged, "gone": gone,
                       "old": {f: identity(os.path.join(folder, f)) for f in staged + gone},
                       "new": {f: identity(os.path.join(tmp, name, f)) for f in staged}}  # fmt: skip
    text = json.dumps(moves)
    atomic_write(os.path.join(tmp, MOVES), lambda f: Path(f).write_text(text, encoding="utf-8"))
    done: list[tuple[str, str | None]] = []  # (destination, its earlier file kept aside, or None: there was none)
    made = [folder for folder in folders.values() if not os.path.isdir(folder)]
    dest = ""
    try:
        for folder in folders.values():  # every folder made before the first file moves in
            os.makedirs(folder, exist_ok=True)
        for name, folder in folders.items():
            staged = moves[name]["files"]
            for file in staged + moves[name]["gone"]:
                dest, kept = os.path.join(folder, file), os.path.join(aside, f"{len(done)}")
                if file not in staged:  # an earlier save's file the new one leaves out: moved aside
                    if os.path.exists(dest):
                        os.replace(dest, kept)
                        done.append((dest, kept))
                    continue
                if os.path.lexists(dest):
                    try:
                        os.link(dest, kept, follow_symlinks=False)
                    except OSError:
                        shutil.copy2(dest, kept, follow_symlinks=False)
                os.replace(os.path.join(tmp, name, file), dest)
                done.append((dest, kept if os.path.lexists(kept) else None))
    except BaseException as exc:
        with contextlib.suppress(OSError):  # (put back, not finished: a kill from here on leaves it part put back)
            os.remove(os.path.join(tmp, MOVES))
        notes = []  # (what could not be put back, each named)
        for path, kept in reversed(done):
            try:
                os.replace(kept, path) if kept is not None else os.remove(path)
            except OSError:
                beside = None if kept is None else keep_beside(kept, path)
                notes.append(f"new file left at {path}" if kept is None else f"earlier file kept at {beside}"
                             if beside else f"earlier file of {path} lost")  # fmt: skip
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        note = f"; could not put back every file: {', '.join(notes)}" if notes else ""
        if isinstance(exc, OSError) and exc.errno is not None and dest:
            raise OSError(exc.errno, (exc.strerror or str(exc)) + note, dest) from None  # (PermissionError for EPERM)
        if note:
            exc.add_note(note[2:])
        raise


def keep_beside(kept: str, path: str) -> str | None:
    """An earlier file (``kept``, in the hidden folder a save removes) that could not be put back at ``path``, moved
    beside it as ``<path>.before-save`` (``.before-save.1``, ... where taken), or copied there where moving fails,
    or, last, moved into the save folder itself (``<file>.before-save-<pid>``, beside the hidden folder ``kept``
    sits in: the same filesystem; no ``.saving-`` name, so the next save leaves it). Returns its new path, or None
    where none of these worked."""
    beside, n = f"{path}.before-save", 0
    while os.path.lexists(beside):
        n += 1
        beside = f"{path}.before-save.{n}"
    try:
        os.replace(kept, beside)
    except OSError:
        try:
            shutil.copy2(kept, beside, follow_symlinks=False)
        except OSError:
            top = os.path.dirname(os.path.dirname(os.path.dirname(kept)))  # (kept: <save>/.saving-*/.before/<n>)
            beside = os.path.join(top, f"{os.path.basename(path)}.before-save-{os.getpid()}-{os.path.basename(kept)}")
            try:
                os.replace(kept, beside)
            except OSError:
                return None
    return beside
