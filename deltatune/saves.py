"""A save's hidden folder (``.saving-<pid>@<host>~<random>``, made inside the folder it saves to), and what a save
killed midway (SIGKILL, a power cut) left there: removed, or, when the save had begun moving its files in, finished.

``files_save.move_in`` writes ``MOVES`` (every adapter's folder, the files it moves in and those it takes out) into
its hidden folder before its first rename; a save killed between two renames left its folder part new, part old, and
the files still to move in sit in the hidden folder beside that list. ``finish_saves`` does the rest of the moves.
Split from files.py in session 59, when files.py was at its limit; files.py imports it (and names it for its users).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

SAVING = ".saving-"
"""The prefix of a save's temporary folder (``.saving-<pid>@<host>~<random>``) inside the folder it saves to."""

MOVES = ".moves.json"
"""The list of a save's moves, in its hidden folder: {adapter: {"folder": path relative to the save folder, "files":
[moved in], "gone": [an earlier save's files taken out]}}. Written whole (a rename) before the first move."""


def _host() -> str:
    import socket

    return "".join(c for c in socket.gethostname() if c.isalnum() or c in ".-")[:64] or "host"


def _dead(name: str) -> bool:
    """Whether ``name`` is the hidden folder of a save by a process of this host that is gone."""
    owner, done, _ = name[len(SAVING) :].partition("~")
    pid, _, host = owner.partition("@")
    return (
        name.startswith(SAVING) and bool(done) and host == _host() and pid.isdecimal() and not process_alive(int(pid))
    )


def remove_stale_saves(folder: str) -> None:
    """Delete the ``SAVING`` folders in ``folder`` that a save killed midway left (a power cut, SIGKILL): those of a
    process of this host that is gone, once the moves a killed save had begun are done (``finish_saves``; one that
    cannot be finished stays). Another host's (a shared disk) and one named without its host (an older deltatune's)
    may be a save under way: they stay."""
    for name in os.listdir(folder):
        if _dead(name):
            try:
                _finish(folder, name)
            except OSError:
                continue  # (its files kept: a later load says which folder could not be finished)
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def finish_saves(folder: str, only: str | None = None) -> None:
    """Finish the saves into ``folder`` that were killed between their renames (see the module's docstring), and remove
    their hidden folders; ``only``: just those that moved files into ``folder/only``. A load calls this for the folder
    it reads and the one above it (an adapter's sub-folder), so it never reads a half-moved adapter.

    Raises:
        OSError: a move could not be done (a read-only folder), naming the save folder and the hidden one.
    """
    try:
        names = [n for n in os.listdir(folder) if n.startswith(SAVING)]
    except OSError:
        return
    for name in names:
        if not _dead(name):
            continue
        try:
            if not _finish(folder, name, only):
                continue
        except OSError as exc:
            raise OSError(exc.errno, f"a save into {folder} was killed midway and could not be finished "
                          f"({exc.strerror or exc}); its files are in {os.path.join(folder, name)}") from None  # fmt: skip
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _finish(folder: str, name: str, only: str | None = None) -> bool:
    """The moves left of the killed save in ``folder/name`` done; False where it touches no ``only`` folder."""
    tmp = os.path.join(folder, name)
    try:
        with open(os.path.join(tmp, MOVES), encoding="utf-8") as fh:
            moves = json.load(fh)
    except (OSError, ValueError):
        return only is None  # (killed before its first move: nothing of it is in the folder)
    if only is not None and not any(os.path.normpath(m["folder"]) == only for m in moves.values()):
        return False
    for adapter, move in moves.items():
        dest = os.path.normpath(os.path.join(folder, move["folder"]))
        os.makedirs(dest, exist_ok=True)
        for file in move["files"]:  # (FileNotFoundError: moved already, by another load finishing it too)
            with contextlib.suppress(FileNotFoundError):
                os.replace(os.path.join(tmp, adapter, file), os.path.join(dest, file))
        for file in move["gone"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(dest, file))
    return True


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0) if pid > 0 else None  # (0 and -1 would name process groups)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, another user's
        return True
    return pid > 0
