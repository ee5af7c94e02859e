"""A save's hidden folder (``.saving-<pid>@<host>~<random>``, made inside the folder it saves to), and what a save
killed midway (SIGKILL, a power cut) left there: removed, or, when the save had begun moving its files in, finished.

A save holds a lock (``fcntl.flock``) on ``LOCK`` in its hidden folder while it lives (``saving``); the kernel drops
it when the process dies, so a hidden folder whose lock another process can take is a killed save's, whatever pid
namespace it ran in (``_claim``). ``files_save.move_in`` writes ``MOVES`` (every adapter's folder, the files it moves
in and those it takes out, and each destination's file before and after: mtime, size) before its first rename; a
save killed between two renames left its folder part new, part old, and the files still to move in sit in the
hidden folder beside that list. ``finish_saves`` (a load's) and ``remove_stale_saves`` (a save's) do the rest of
the moves of an adapter whose files are still as the kill left them; an adapter written since (another save, peft's)
is left as it is, with a warning: a load never makes a folder worse than it found it, and never reads one half
moved in (it refuses, naming the folder and the hidden one). The save folder's own lock (``folder_lock``) is held
by ``move_in`` while it renames and by a finisher while it finishes, and each file is looked at again just before
its rename: a save and a finisher never rename into the folder at once.
Split from files.py in session 59, when files.py was at its limit; files.py imports it (and names it for its users).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator

SAVING = ".saving-"
"""The prefix of a save's temporary folder (``.saving-<pid>@<host>~<random>``) inside the folder it saves to."""

MOVES = ".moves.json"
"""The list of a save's moves, in its hidden folder: {adapter: {"folder": path relative to the save folder, "files":
[moved in], "gone": [an earlier save's files taken out], "old": {file: its destination's identity before the
save, or None}, "new": {file: the staged file's identity}}} (``identity``). Written whole (a rename) before the
first move."""

LOCK = ".deltatune-save.lock"
"""The file in a save's hidden folder it holds its lock on (a file opened for writing: NFS locks no directory)."""

WAIT = 2.0
"""Seconds a load waits for a save under way whose moves have begun (its lock held) before refusing."""


def _host() -> str:
    import socket

    return "".join(c for c in socket.gethostname() if c.isalnum() or c in ".-")[:64] or "host"


@contextlib.contextmanager
def saving(folder: str) -> Iterator[str]:
    """A save's hidden folder in ``folder``, locked while the save runs; removed at the end, then unlocked."""
    tmp = tempfile.mkdtemp(prefix=f"{SAVING}{os.getpid()}@{_host()}~", dir=folder)
    fd, _ = _lock(os.path.join(tmp, LOCK))  # (None on a filesystem with no locks: the name's pid then tells alone)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _release(fd)


@contextlib.contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """The save folder's own lock (its directory's flock), held while a save renames its files in (``move_in``) and
    while a finisher finishes a killed save's (``_settle``); waited for (5 x ``WAIT`` at most, then gone on without,
    as where there are no locks: Windows, NFS)."""
    fd, held = _lock(folder)
    until = time.monotonic() + 5 * WAIT
    while fd is None and held and time.monotonic() < until:
        time.sleep(0.01)
        fd, held = _lock(folder)
    try:
        yield
    finally:
        _release(fd)


def _lock(path: str) -> tuple[int | None, bool]:
    """(an fd of ``path`` holding its lock, or None where it could not be taken; whether another process holds it).
    A file is opened for writing (made if missing), a folder for reading."""
    try:
        import fcntl
    except ImportError:  # (no flock: Windows)
        return None, False
    try:
        fd = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        try:  # (a read-only folder: a local flock needs no write)
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None, False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, False
    except OSError as exc:
        os.close(fd)
        return None, exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _release(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)


def _claim(folder: str, name: str, moving: bool) -> int | str:
    """An fd holding the lock of ``folder/name``, the hidden folder of a save of this host killed midway (its lock
    free; where locks are not to be had, its pid gone: -1), or "live" (another process holds its lock: a save under
    way, or another load finishing it; where no lock is to be had, its pid runs), or "unknown" (another host's, one
    named without its host, an older deltatune's save whose pid runs: it may be under way). ``moving``: it holds a
    ``MOVES`` with identities, which only a save that locks writes, so a free lock tells though its pid runs again
    (reused)."""
    owner, done, _ = name[len(SAVING) :].partition("~")
    pid, _, host = owner.partition("@")
    fd, held = _lock(os.path.join(folder, name, LOCK))
    if held:
        return "live"
    if done and host == _host() and pid.isdecimal():
        if fd is not None and (moving or not process_alive(int(pid))):
            return fd
        if fd is None:
            return "live" if process_alive(int(pid)) else -1
    _release(fd)
    return "unknown"


def identity(path: str) -> list[int] | None:
    """A file's (mtime in ns, size), unchanged by a rename, and by a copy that keeps mtimes (cp -a, rsync -a, tar:
    new inodes); None: no file there."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return [-1, -1]  # (not to be told: never equal to a recorded one)
    return [st.st_mtime_ns, st.st_size]


def _same(now: list[int] | None, recorded: object) -> bool:
    """Whether a file's ``identity`` now is the one recorded (a list of 0b7d7fc's had the inode first: not compared)."""
    if now is None or recorded is None:
        return now is None and recorded is None
    return isinstance(recorded, list) and len(recorded) >= 2 and now == recorded[-2:]


def _listed(moves: dict | None) -> bool:
    """Whether ``moves`` has each destination's identities (a list of a save that locks; not an older deltatune's)."""
    ok = isinstance(moves, dict) and all(isinstance(m, dict) for m in moves.values())
    return ok and all(isinstance(m.get("old"), dict) and isinstance(m.get("new"), dict) for m in moves.values())


def _moves(tmp: str) -> dict | None:
    try:
        with open(os.path.join(tmp, MOVES), encoding="utf-8") as fh:
            moves = json.load(fh)
    except (OSError, ValueError):
        return None  # (killed before its first move: nothing of it is in the folder)
    return moves if isinstance(moves, dict) else None


def _state(folder: str, tmp: str, adapter: str, move: dict) -> str:
    """ "todo" (moves left, every destination as the kill left it), "done", "changed" (a destination written since
    the kill by something else), or "older" (a list of an older deltatune's, with no identities to tell)."""
    dest, old, new, todo = os.path.join(folder, move["folder"]), move.get("old"), move.get("new"), False
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "older"
    for file in move["files"]:
        staged = os.path.lexists(os.path.join(tmp, adapter, file))
        todo |= staged
        if not _same(identity(os.path.join(dest, file)), (old if staged else new).get(file)):
            return "changed"
    for file in move["gone"]:
        now = identity(os.path.join(dest, file))
        if now is not None and not _same(now, old.get(file)):
            return "changed"
        todo |= now is not None
    return "todo" if todo else "done"


def _settle(folder: str, name: str, moves: dict, claim: int | str, load: bool) -> None:
    """The moves left of the save in ``folder/name`` (``claim``: ``_claim``'s) done where it is a killed one, for
    every adapter whose files are as the kill left them; its hidden folder then removed. A load refuses a save
    it may not finish whose moves are not all done (a half-moved folder); an adapter written since is left. The
    states are taken, and the moves done, holding the save folder's lock (``folder_lock``)."""
    tmp = os.path.join(folder, name)
    if not isinstance(claim, int):
        states = {adapter: _state(folder, tmp, adapter, move) for adapter, move in moves.items()}
        if load and (claim == "live" or "todo" in states.values()):  # (live: its moves may run on as we look)
            where = "is moving its files in" if claim == "live" else "of another host stopped between its renames"
            then = "once it is done" if claim == "live" else "on that host (which finishes it)"
            raise OSError(errno.EBUSY, f"a save into {folder} {where}: the folder is part new, part old, the rest "
                          f"in {tmp}; load again {then}, or save its adapters into the folder again")  # fmt: skip
        return
    try:
        with folder_lock(folder):  # (no save renames its files in while these are looked at and finished)
            states = {adapter: _state(folder, tmp, adapter, move) for adapter, move in moves.items()}
            for adapter, move in moves.items():
                if states[adapter] == "todo" and _finish(folder, tmp, adapter, move) is False:
                    states[adapter] = "changed"
    except OSError as exc:
        raise OSError(exc.errno, f"a save into {folder} was killed midway and could not be finished "
                      f"({exc.strerror or exc}); its files are in {tmp}: load it where the folder is writable, "
                      "which finishes it") from None  # fmt: skip
    changed = sorted(adapter for adapter, state in states.items() if state == "changed")
    older = sorted(adapter for adapter, state in states.items() if state == "older")
    if changed:
        warnings.warn(f"a save into {folder} killed midway left files of adapter(s) {', '.join(changed)} that were "
                      f"written over since; those are kept as they are now, and its leftover ({tmp}) removed",
                      stacklevel=4)  # fmt: skip
    if older:
        warnings.warn(f"a save into {folder} killed midway left an older deltatune's list of its moves (adapter(s) "
                      f"{', '.join(older)}), which cannot tell whether they are as the kill left them: the folder is "
                      f"kept as it is now, and the leftover ({tmp}) removed; save again if it does not load",
                      stacklevel=4)  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)


def _finish(folder: str, tmp: str, adapter: str, move: dict) -> bool:
    """The moves left of ``adapter``, each destination looked at again just before its rename; False: one was found
    written over (by a writer that takes no lock: peft's save), it and the rest left."""
    dest, old = os.path.normpath(os.path.join(folder, move["folder"])), move["old"]
    for file in move["files"]:
        if os.path.lexists(os.path.join(tmp, adapter, file)):
            if not _same(identity(os.path.join(dest, file)), old.get(file)):
                return False
            os.makedirs(dest, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # (a race: checked above)
                os.replace(os.path.join(tmp, adapter, file), os.path.join(dest, file))
    for file in move["gone"]:
        now = identity(os.path.join(dest, file))
        if now is not None:
            if not _same(now, old.get(file)):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(dest, file))
    return True


def remove_stale_saves(folder: str) -> None:
    """(A save's, before it writes.) Delete the ``SAVING`` folders in ``folder`` that a save killed midway left
    (``_claim``), once the moves a killed save had begun are done where its adapters are as the kill left them
    (``_settle``; one that cannot be finished, a read-only file, stays). Another host's (a shared disk), a live
    one's and one named without its host (an older deltatune's) may be a save under way: they stay."""
    for name in os.listdir(folder):
        if not name.startswith(SAVING):
            continue
        moves = _moves(os.path.join(folder, name))
        claim = _claim(folder, name, _listed(moves))
        if not isinstance(claim, int):
            continue
        try:
            _settle(folder, name, moves or {}, claim, load=False)
        except OSError:
            continue  # (its files kept: a later load says which folder could not be finished)
        finally:
            _release(claim)


def finish_saves(folder: str, only: str | None = None) -> None:
    """(A load's.) Finish the saves into ``folder`` that were killed between their renames (see the module's
    docstring) and remove their hidden folders; ``only``: just those that moved files into ``folder/only``. A save
    under way whose moves have begun is waited for (``WAIT``); one that cannot be finished here and left the folder
    half moved in is refused. A load calls this once for the folder it reads and the one above it.

    Raises:
        OSError: naming the save folder and the hidden one (a read-only folder; a save under way or another host's).
    """
    try:
        names = [n for n in os.listdir(folder) if n.startswith(SAVING)]
    except OSError:
        return
    for name in names:
        tmp = os.path.join(folder, name)
        moves = _moves(tmp)
        if (
            moves is None
            or only is not None
            and not any(os.path.normpath(m["folder"]) == only for m in moves.values())
        ):
            continue
        claim, until = _claim(folder, name, _listed(moves)), time.monotonic() + WAIT
        while claim == "live" and time.monotonic() < until and os.path.lexists(tmp):
            time.sleep(0.02)
            claim = _claim(folder, name, _listed(moves))
        try:
            if os.path.lexists(os.path.join(tmp, MOVES)):
                _settle(folder, name, moves, claim, load=True)
        finally:
            _release(claim if isinstance(claim, int) else None)


_WINDOWS = os.name == "nt"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's counts). On Windows asked of the kernel (os.kill
    there ends the process, whatever the signal); where it cannot be told, taken as running (never taken over)."""
    if _WINDOWS:
        return _alive_windows(pid)
    try:
        os.kill(pid, 0) if pid > 0 else None  # (0 and -1 would name process groups)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, another user's
        return True
    return pid > 0


def _alive_windows(pid: int) -> bool:
    try:
        import ctypes

        kernel = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel.OpenProcess(0x1000, False, pid)  # (PROCESS_QUERY_LIMITED_INFORMATION)
        if not handle:
            return kernel.GetLastError() == 5  # (ERROR_ACCESS_DENIED: it runs, another user's)
        code = ctypes.c_ulong()
        try:
            told = kernel.GetExitCodeProcess(handle, ctypes.byref(code))
        finally:
            kernel.CloseHandle(handle)
        return not told or code.value == 259  # (STILL_ACTIVE)
    except Exception:
        return pid > 0
