"""Folders published whole: written in a hidden staging folder beside their destination, then renamed into place
(``staging_folder`` / ``publish_folder``), and the check that a command's output folder is apart from what it reads
(``check_apart``). A leaf of train/: it imports the config error, nothing else of deltatune."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator

from ..config import ConfigError


def _sibling(folder: str, tag: str) -> str:
    """A hidden path beside ``folder``: ``<parent>/.<name>.<tag>`` (outside it, so moving the folder keeps it)."""
    folder = os.path.realpath(folder)  # one lock for a folder, whatever symlink names it
    parent, name = os.path.split(folder.rstrip(os.sep))
    return os.path.join(parent, f".{name}.{tag}")


def check_link(path: str, name: str) -> None:
    """Refuse ``path`` (the output ``name``: output.dir, --out) where it is a link that leads to nothing: its target
    missing (shown as the link reads it and, where relative, as the path it names), or a loop of links. Such a path
    is no file and no folder to ``os.path.exists``, and failed only after the work, creating the folder.

    Raises:
        ConfigError: naming the link and its target.
    """
    if not os.path.islink(path) or os.path.exists(path):
        return
    try:
        os.stat(path)
    except OSError as exc:
        target = os.readlink(path)
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"{name} {path!r} is a link to {target!r}, a loop of links; choose another {name}"
            ) from None
        shown = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), target))
        where = repr(target) if shown == target else f"{target!r} ({shown})"
        raise ConfigError(
            f"{name} {path!r} is a link to {where}, which does not exist; create that folder or choose another {name}"
        ) from None


@contextlib.contextmanager
def staging_folder(out: str, overwrite: bool) -> Iterator[str]:
    """A fresh hidden folder beside ``out`` to write into; removed whatever happens, unless published.

    Raises:
        ConfigError: ``out`` is a file, a link to nothing, or a folder holding files and ``overwrite`` is not set.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is a file, not a folder")
    check_link(out, "--out")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f"--out {out!r} already holds files; pass --overwrite to replace them, or choose another")
    staging = _sibling(out, f"staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.makedirs(staging)
    except OSError as exc:  # --out under a file, a read-only folder: named as typed, not the hidden folder beside
        raise ConfigError(f"--out {out!r} cannot be created: {exc.strerror}") from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sweep_staging(out: str) -> None:
    """Remove the staging folders (``staging_folder``'s ``.<out>.staging-<pid>``) that commands killed mid-write
    left beside ``out``: those whose process is gone from this host's /proc (none where there is no /proc). A write
    into the same ``out`` from another host or pid namespace is not seen as alive (merge takes no lock). A parent that
    cannot be listed (a drop folder, mode 0733: writing into it needs no read permission) is swept of nothing."""
    parent, prefix = os.path.split(_sibling(out, "staging-"))
    names: list[str] = []
    with contextlib.suppress(OSError):  # (missing, not a folder, not readable)
        names = os.listdir(parent) if os.path.isdir("/proc/self") else []
    for name in names:
        pid = name.removeprefix(prefix)
        if name.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def check_apart(out: str, reads: dict[str, str | None], name: str = "--out") -> None:
    """Refuse an output folder that is, or holds, a file or folder the command reads (``reads``: what it is ->
    path): replacing the folder, as ``--overwrite`` does, would delete it. ``name``: the output's key or flag.

    Raises:
        ConfigError: naming the output, what it would delete, and its path; or that it is empty.
    """
    if not str(out).strip():  # ('' is the working folder to realpath: "holds the adapter's folder" misled)
        raise ConfigError(f"{name} is empty; give the folder to write")
    mine = os.path.realpath(out)
    for what, path in reads.items():
        if not path or not os.path.exists(path):
            continue
        theirs = os.path.realpath(path)
        if theirs == mine or os.path.commonpath([mine, theirs]) == mine:
            how = "is" if theirs == mine else "holds"
            raise ConfigError(
                f"{name} {out!r} {how} {what} {path!r}, which this command reads (--overwrite would delete it); "
                "choose another folder"
            )


def publish_folder(staging: str, out: str) -> None:
    """Move the finished ``staging`` folder to ``out``, replacing what ``out`` held only at this moment."""
    aside = _sibling(out, f"old-{os.getpid()}")
    if os.path.isdir(out):
        os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        if os.path.isdir(aside):
            os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
