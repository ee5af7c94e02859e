"""Reading run folders for the board, safely while they are being written.

A run folder is what ``deltatune train`` writes: ``run.yaml`` (the recipe, first), ``log_history.jsonl`` (one
line per Trainer log, as it happens), checkpoints, and at the end ``metrics.json``, ``report.md``, the adapter
files. Every read here tolerates a file that is missing or half-written (a partial JSON object, a cut last line):
it is taken as not there yet, never as an error. Only files under the runs folder are read: run names come from
the listing, and every path is resolved (symlinks included) and checked to lie inside the folder.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import socket
import struct
import time
from typing import Any

RUN_FILE = "run.yaml"
LOG_FILE = "log_history.jsonl"  # deltatune.train.trainer.LOG_FILE (not imported: the board needs no torch)
HEADLINE = (
    "eval_accuracy",
    "eval_f1",
    "eval_pearson",
    "eval_f1_micro",
    "eval_rougeL",
    "eval_reward_accuracy",
    "eval_loss",
    "train_loss",
)
STALE_S = 600.0
"""A run with no metrics.json whose files have not changed for this long is taken as stopped (failed)."""


def inside(root: str, *parts: str) -> str | None:
    """The real path of ``root/parts...`` if it lies inside ``root`` (after resolving symlinks), else None."""
    real_root = os.path.realpath(root)
    try:
        path = os.path.realpath(os.path.join(real_root, *parts))
    except ValueError:  # an embedded NUL byte
        return None
    if os.path.commonpath([real_root, path]) != real_root:
        return None
    return path


def _in(folder: str, name: str) -> str:
    """``folder/name`` resolved, or "" (which every read here takes as missing) when a symlink leads out of
    ``folder``: a run's report.md linked to a file elsewhere is not served."""
    return inside(folder, name) or ""


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):  # missing, or being written: not there yet
        return None


def _read_yaml(path: str) -> Any:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _row(line: str) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # a partial line, or one nested past the parser's depth
        return None


def _last_step(folder: str) -> int:
    """The step of the log's last complete line, read from its end (the listing must not grow with the log), else
    of the whole history (a checkpoint's trainer_state.json); 0 when there is none."""
    try:
        with open(_in(folder, LOG_FILE), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.seek(max(0, fh.tell() - 65536))
            lines = fh.read().decode("utf-8", errors="replace").splitlines()[1 if size else 0 :]
    except OSError:
        lines = []
    rows = [r for r in map(_row, reversed(lines)) if isinstance(r, dict)] or history(folder)[::-1]
    return next((r["step"] for r in rows if isinstance(r.get("step"), int)), 0)


def history(folder: str) -> list[dict[str, Any]]:
    """The run's log history: ``log_history.jsonl`` (skipping a partial last line), else the newest checkpoint's
    ``trainer_state.json``."""
    rows: list[dict[str, Any]] = []
    try:
        with open(_in(folder, LOG_FILE), encoding="utf-8", errors="replace") as fh:  # bad bytes: a line skipped
            for line in fh:
                row = _row(line)
                if isinstance(row, dict):
                    rows.append(_finite(row))
    except OSError:
        pass
    if rows:
        return rows
    states = sorted(glob.glob(os.path.join(glob.escape(folder), "checkpoint-*", "trainer_state.json")), key=_step)
    for path in reversed(states):
        state = _read_json(_in(folder, os.path.relpath(path, folder)))
        if isinstance(state, dict) and isinstance(state.get("log_history"), list):
            return [_finite(r) for r in state["log_history"] if isinstance(r, dict)]
    return []


def _step(path: str) -> int:
    name = os.path.basename(os.path.dirname(path))
    return int(name.rpartition("-")[2]) if name.rpartition("-")[2].isdecimal() else -1


def _finite(value: Any) -> Any:
    # JSON has no NaN: a diverged loss is shown as missing rather than breaking the page's JSON.parse (at any depth).
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def trainable_parameters(folder: str) -> int | None:
    """The number of values in ``adapter_model.safetensors``, read from its header alone (no tensor is loaded)."""
    path = _in(folder, "adapter_model.safetensors")
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for key, value in header.items() if isinstance(header, dict) else ():
        shape = value.get("shape") or [1] if isinstance(value, dict) else None
        if key != "__metadata__" and isinstance(shape, list) and all(type(n) is int for n in shape):
            total += math.prod(shape)
    return total


def _lock_alive(folder: str) -> bool | None:
    """Whether the training process holding the run's lock (``<parent>/.<name>.lock``, written by ``train``:
    {"pid", "host"}) is alive; None when there is no readable lock or it belongs to another host."""
    parent, name = os.path.split(folder.rstrip(os.sep))
    lock = _read_json(os.path.join(parent, f".{name}.lock"))
    if not isinstance(lock, dict) or not isinstance(lock.get("pid"), int) or lock.get("host") != socket.gethostname():
        return None
    try:
        os.kill(lock["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, owned by someone else
        return True
    return True


def _mtime(folder: str) -> float:
    newest = 0.0
    for name in (RUN_FILE, LOG_FILE, "metrics.json"):
        with contextlib.suppress(OSError):
            newest = max(newest, os.path.getmtime(_in(folder, name)))
    return newest


def summary(root: str, name: str) -> dict[str, Any] | None:
    """One row of the run list, or None when ``name`` is no run folder inside ``root``."""
    folder = inside(root, name)
    if folder is None or not os.path.isfile(_in(folder, RUN_FILE)):
        return None
    recipe = _finite(_read_yaml(_in(folder, RUN_FILE)) or {})
    metrics = _read_json(_in(folder, "metrics.json"))
    metrics = _finite(metrics) if isinstance(metrics, dict) else None
    updated = _mtime(folder)
    live = _lock_alive(folder)
    if metrics is not None:
        status = "finished"
    elif live or (live is None and time.time() - updated < STALE_S):
        status = "running"
    else:
        status = "failed"
    method = recipe.get("method") if isinstance(recipe.get("method"), dict) else {}
    model = recipe.get("model") if isinstance(recipe.get("model"), dict) else {}
    headline = {k: metrics[k] for k in HEADLINE if metrics and metrics.get(k) is not None}
    return {
        "name": name,
        "stage": recipe.get("stage"),
        "method": method.get("name"),
        "model": model.get("name_or_path"),
        "status": status,
        "metrics": headline,
        "trainable_params": trainable_parameters(folder),
        "steps": _last_step(folder),
        "updated": updated,
    }


def list_runs(root: str) -> list[dict[str, Any]]:
    """Every run folder under ``root`` (a folder holding run.yaml, at most two levels down), newest first."""
    names = []
    real_root = os.path.realpath(root)
    for depth in ("*", os.path.join("*", "*")):
        for path in glob.glob(os.path.join(glob.escape(real_root), depth, RUN_FILE)):
            name = os.path.relpath(os.path.dirname(path), real_root).replace(os.sep, "/")
            if name.encode("utf-8", errors="replace").decode() == name:  # a name that is not UTF-8: skipped
                names.append(name)
    runs = []
    for name in names:
        try:
            row = summary(root, name)
        except Exception:  # noqa: BLE001 (one run's odd file must not hide every run)
            continue
        if row is not None:
            runs.append(row)
    return sorted(runs, key=lambda r: -r["updated"])


def detail(root: str, name: str) -> dict[str, Any] | None:
    """A run's summary plus its recipe, every final metric, its log history and its report (markdown)."""
    row = summary(root, name)
    if row is None:
        return None
    folder = inside(root, name)
    assert folder is not None
    metrics = _read_json(_in(folder, "metrics.json"))
    try:
        with open(_in(folder, "report.md"), encoding="utf-8") as fh:
            report = fh.read()
    except (OSError, UnicodeDecodeError):
        report = None
    return {
        **row,
        "recipe": _finite(_read_yaml(_in(folder, RUN_FILE)) or {}),
        "all_metrics": _finite(metrics) if isinstance(metrics, dict) else {},
        "history": history(folder),
        "report": report,
    }
