"""Reading run folders for the board, safely while they are being written.

A run folder is what ``deltatune train`` writes: ``run.yaml`` (the recipe, first), ``log_history.jsonl`` (one
line per Trainer log, as it happens), checkpoints, and at the end ``metrics.json``, ``report.md``, the adapter
files. Every read here tolerates a file that is missing or half-written (a partial JSON object, a cut last line):
it is taken as not there yet, never as an error. Only files under the runs folder are read: run names come from
the listing, and every path is resolved (symlinks included) and checked to lie inside the folder.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import glob
import json
import math
import operator
import os
import socket
import stat
import struct
import threading
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
    "eval_reward_accuracy",  # (no stage writes it; kept for a metrics.json that holds it)
    "eval_rewards/accuracies",  # DPO, CPO, ORPO, SimPO (TRL's name)
    "eval_loss",
    "train_loss",
)
MAX_POINTS = 2000
"""The most log rows of one kind (the same keys: train logs, eval logs) a run's page is sent; a longer log is thinned
evenly, first and last row kept (TensorBoard keeps 1,000 scalars per tag, by reservoir sampling)."""
STOPPED_FILE = "stopped.json"
"""Written by ``train`` when a run ends without finishing: {"reason": "...", "interrupted": bool} (Ctrl-C or a
signal: *stopped*; an error: *failed*, with its one line). Taken into account only while it is newer than the run's
recipe and log (a resumed run logs again after it)."""
STALE_S = 600.0
"""A run with no metrics.json whose files have not changed for this long is taken as stopped (failed)."""


MAX_LINE = 1 << 20
"""A log line longer than this (1 MiB; a trainer's row is a few hundred bytes) is no row: skipped, and while it is the
unterminated last line, not read again on each poll."""
REPORT_MAX = 1 << 20
"""The most bytes of a run's ``report.md`` the page is sent (a report is a few KB); a longer one is cut, saying so."""


_LOGS: dict[str, _Log] = {}
_REPORTS: dict[str, tuple[tuple[int, int, int, int, int], str]] = {}
# recipes read (sanitised by _finite; None: unreadable), by file; callers send them, never change them
_RECIPES: dict[str, tuple[tuple[int, int, int, int, int], dict[str, Any] | None]] = {}
_COUNTS: dict[str, tuple[tuple[int, int, int, int, int], int | None]] = {}  # trainable_parameters, by file
_PURGED: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}  # history and purged rows, by folder
_LOGS_LOCK = threading.Lock()


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
    ``folder`` (a run's report.md linked to a file elsewhere is not served) or it is there but no regular file (a
    FIFO named log_history.jsonl blocked the reading thread for good)."""
    if os.sep not in name and name not in ("", ".", ".."):  # the common case, without resolving the folder again
        path = os.path.join(folder, name)  # (realpath twice per file was most of the time of a list of many runs)
        try:
            mode = os.lstat(path).st_mode
        except (OSError, ValueError):
            return path  # missing: every read takes it as such
        if not stat.S_ISLNK(mode):
            return path if stat.S_ISREG(mode) else ""
    path = inside(folder, name) or ""
    return path if not os.path.exists(path) or os.path.isfile(path) else ""


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):  # (a FIFO named .<run>.lock beside a run blocked the list for good)
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return _finite(json.load(fh))
    except (OSError, ValueError, RecursionError):  # missing, being written, or nested past the parser's depth
        return None


def _read_yaml(path: str) -> Any:
    """A run.yaml's mapping, or None; parsed again only when the file changed (its size, times or inode): the list of
    many runs, polled each second, spent most of its time parsing recipes that had not changed. The change time is in
    the key: a file rewritten in place at the same size with its modification time put back has a new ctime."""
    import yaml

    try:
        info = os.stat(path)
    except OSError:
        return None
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    with _LOGS_LOCK:
        cached = _RECIPES.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)  # (parsed again only when the file changes: the cache above)
    except (OSError, yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError):  # (a list in a list... 5,000
        return None  # deep: the parser's RecursionError hid the run from the list and made its page a 500)
    try:
        data = _finite(loaded, 0, [MAX_NODES])
    except ValueError:  # nested past MAX_DEPTH or holding more than MAX_NODES values: kept as unreadable (an alias
        data = None  # bomb was walked again on each poll of the list)
    else:
        if not isinstance(data, dict):
            return None  # (not kept: a file being written is read again)
    with _LOGS_LOCK:
        if len(_RECIPES) >= 4096:
            _RECIPES.pop(next(iter(_RECIPES)))
        _RECIPES[path] = (key, data)
    return data


def _row(line: str) -> Any:
    try:
        return json.loads(line.removeprefix("\ufeff"))  # (a log another tool wrote with a BOM: its first row kept)
    except (ValueError, RecursionError):  # a partial line, or one nested past the parser's depth
        return None


def _last_step(folder: str) -> int:
    """The step of the log's last complete line, read from its end (the listing must not grow with the log), else
    of the whole history (a checkpoint's trainer_state.json); at least the newest checkpoint's (a run stopped before
    its first log line showed step 0 beside its checkpoint-1); 0 when there is none."""
    try:
        with open(_in(folder, LOG_FILE), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.seek(max(0, fh.tell() - 65536))
            lines = fh.read().decode("utf-8", errors="replace").splitlines()[1 if size else 0 :]
    except OSError:
        lines = []
    step, rows = None, False
    for row in map(_row, reversed(lines)):  # one at a time, from the end: every line of the window was parsed each
        rows = rows or isinstance(row, dict)  # poll (500 runs of 2,000 rows: 250,000 lines, 2.5 s a poll of the list)
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            step = row["step"]
            break
    if not rows:
        step = next((r["step"] for r in history(folder)[::-1] if isinstance(r.get("step"), int)), None)
    saved = max(map(_step, glob.glob(os.path.join(glob.escape(folder), "checkpoint-*", ""))), default=0)
    return max(step or 0, saved)


def history(folder: str) -> list[dict[str, Any]]:
    """The run's log history: ``log_history.jsonl`` (skipping a partial last line), else the newest checkpoint's
    ``trainer_state.json``."""
    rows = _log_rows(_in(folder, LOG_FILE))
    if rows:
        return rows
    states = sorted(glob.glob(os.path.join(glob.escape(folder), "checkpoint-*", "trainer_state.json")), key=_step)
    for path in reversed(states):
        state = _read_json(_in(folder, os.path.relpath(path, folder)))
        if isinstance(state, dict) and isinstance(state.get("log_history"), list):
            return [_finite(r) for r in state["log_history"] if isinstance(r, dict)]
    return []


@dataclasses.dataclass
class _Log:
    """What is known of a log file from its last read: where its whole lines end (``offset``), their rows, how far it
    was read (``seen``), the last bytes read (``last``, up to 256 before ``seen``: the file is still the one read while
    they are where they were) and the unterminated line after ``offset`` (``tail``, None once past ``MAX_LINE``:
    skipped to its end) with its row, if it parses (``tail_rows``)."""

    ident: tuple[int, int]
    offset: int = 0
    last: bytes = b""
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seen: int = 0
    tail: bytes | None = b""
    tail_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _log_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a log file, reading only the bytes appended since the last read (a page polls every second; a
    100,000-line log took a second to parse each time, and an unterminated last line was read and parsed again on
    every poll: a 50 MB one, 50 MB a second). The cache is dropped when the file is another one, shorter, or the last
    bytes read (the unterminated line's included) are no longer what they were: a run restarted, or resumed, rewrites
    the log, a resumed one with the checkpoint's rows byte for byte, then its own (a half row cached from before
    joined to them gave a wrong row)."""
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                return []
            with _LOGS_LOCK:
                log = _LOGS.get(path)
            if log is None or log.ident != (info.st_dev, info.st_ino) or log.seen > info.st_size:
                log = _Log((info.st_dev, info.st_ino))
            fh.seek(log.seen - len(log.last))
            if fh.read(len(log.last)) != log.last:
                log = _Log((info.st_dev, info.st_ino))
            if log.seen == info.st_size:  # nothing new: not even the unterminated last line is read again
                return log.rows + log.tail_rows
            fh.seek(log.seen)
            data = fh.read()
    except OSError:
        return []
    start, buf, cut = log.offset, (log.tail or b"") + data, 0  # buf: the file from start on
    if log.tail is None:  # inside a line past MAX_LINE: its rest is skipped up to its newline, unread after
        cut = data.find(b"\n") + 1
        start, buf = (log.seen + cut, data[cut:]) if cut else (start, b"")
    end = buf.rfind(b"\n") + 1  # whole lines are kept; the last line without its newline is kept apart
    rest = buf[end:]
    tail = None if log.tail is None and not cut or len(rest.removesuffix(b"\r")) > MAX_LINE else rest
    log = _Log(
        log.ident,
        offset=start + end,
        last=(log.last + data[-256:])[-256:],
        rows=log.rows + _parse(buf[:end]),
        seen=log.seen + len(data),
        tail=tail,
        tail_rows=[] if tail is None else _parse(tail),
    )
    with _LOGS_LOCK:
        if path not in _LOGS and len(_LOGS) >= 16:  # many runs open in turn: the oldest cached log is let go
            _LOGS.pop(next(iter(_LOGS)))
        _LOGS[path] = log
    return log.rows + log.tail_rows


def _parse(data: bytes) -> list[dict[str, Any]]:
    """The rows of whole log lines; a line past ``MAX_LINE`` bytes (its newline and a trailing \\r not counted, as
    the unterminated tail is measured) is no log row."""
    rows = []
    for raw in data.split(b"\n"):
        line = raw.removesuffix(b"\r")
        if len(line) > MAX_LINE:
            continue
        for text in line.decode("utf-8", errors="replace").splitlines():  # bad bytes: a line skipped
            row = _row(text)
            if isinstance(row, dict):
                with contextlib.suppress(ValueError):  # (nested past MAX_DEPTH: no log row)
                    rows.append(_finite(row))
    return rows


AXES = ("step", "epoch", "wall_time")
"""A log row's keys that place it (its x); every other key is a value of its own (TensorBoard's tag)."""


def purged(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as TensorBoard reads a log that went back in steps (its EventAccumulator's out-of-order purge, which it
    applies to event files without a file_version; today's writers' files carry one): a row whose step is below the highest step seen before drops, for each of its values,
    that value from the earlier rows at its step or later (a row left with no value is dropped). A log written on
    after a restart from an earlier checkpoint, without being rewritten (another tool's, an older deltatune's), drew
    both runs' curves joined by a line back: the lost steps' values stayed beside the new ones."""
    top: float = -math.inf
    for row in rows:  # (the usual log: one pass over the steps, nothing copied)
        step = row.get("step")
        if type(step) is int:
            if step < top:
                break
            top = step
    else:
        return rows
    out: list[dict[str, Any]] = list(rows)
    # each value's rows, by index: their steps never decrease (a row is added at the highest step yet, or after the
    # rows at its step or later were dropped), so a purge pops from the end
    seen: dict[str, list[int]] = {}
    top = -math.inf
    for i, row in enumerate(rows):
        step = row.get("step")
        tags = [k for k in row if k not in AXES]
        if type(step) is not int or not tags:
            continue
        if step < top:  # (TensorBoard keeps its most recent step then: the highest)
            for tag in tags:
                index = seen.get(tag, [])
                while index and out[index[-1]]["step"] >= step:
                    j = index.pop()
                    out[j] = {k: v for k, v in out[j].items() if k != tag}
        else:
            top = step
        for tag in tags:
            seen.setdefault(tag, []).append(i)
    return [r for r, was in zip(out, rows) if r is was or any(k not in AXES for k in r)]


def downsample(rows: list[dict[str, Any]], limit: int = MAX_POINTS) -> list[dict[str, Any]]:
    """At most ``limit`` rows of each kind (rows with the same keys), evenly spaced, the first and last kept; the
    order of the log kept. ``limit`` < 2 keeps every row."""
    kinds: dict[frozenset[str], list[int]] = {}
    for i, row in enumerate(rows):
        kinds.setdefault(frozenset(row), []).append(i)
    if limit < 2 or all(len(v) <= limit for v in kinds.values()):
        return rows
    keep: set[int] = set()
    for index in kinds.values():
        n = len(index)
        keep.update(index if n <= limit else (index[round(i * (n - 1) / (limit - 1))] for i in range(limit)))
    return [rows[i] for i in sorted(keep)]


def _step(path: str) -> int:
    name = os.path.basename(os.path.dirname(path))
    return int(name.rpartition("-")[2]) if name.rpartition("-")[2].isdecimal() else -1


MAX_DEPTH = 100
"""The deepest nesting of lists and mappings read from a run's file (a recipe is 3 deep, a log row 1): deeper, the
file (a log row: the row) is taken as unreadable. A row 600 deep parsed, then made its run's page a 500 (this walk's
RecursionError)."""


MAX_NODES = 100_000
"""The most values (mappings, lists and scalars) a run.yaml may hold (a recipe holds about a hundred): more, the file
is taken as unreadable. YAML's aliases repeat a value without repeating its text: a few hundred bytes, 6 levels of 10
aliases ("billion laughs"), walked to 10^6 values, seconds of each poll of the list; 8 levels hung the board. (A JSON file
has no aliases: its walk is as long as its text, and it has no such limit.)"""


def _finite(value: Any, depth: int = 0, left: list[int] | None = None) -> Any:
    """``value`` as JSON can send it: a float that is not finite as None (JSON has no NaN: a diverged loss is shown as
    missing rather than breaking the page's JSON.parse), a YAML value JSON has no type for (a date, ``!!binary``
    bytes, a set) as its ``str`` and a mapping key as well (a date key made the run's page a 500, bytes that are not
    UTF-8 in a recipe's stage the whole run list), a tuple (a pair of ``!!omap`` or ``!!pairs``) as a list.
    ValueError past ``MAX_DEPTH``, or past ``left[0]`` values (counted down, when given)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} deep")
    if left is not None:
        left[0] -= 1
        if left[0] < 0:
            raise ValueError(f"more than {MAX_NODES} values")
    if isinstance(value, dict):
        return {_key(k): _finite(v, depth + 1, left) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, depth + 1, left) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value if value is None or isinstance(value, (str, int)) else str(value)


def _key(key: Any) -> Any:
    return key if key is None or isinstance(key, (str, int, float)) else str(key)


def trainable_parameters(folder: str) -> int | None:
    """The number of values in ``adapter_model.safetensors``, read from its header alone (no tensor is loaded); while
    the run has none (it trains), its newest checkpoint's (the page said "when saved" for the whole run beside
    checkpoint-500's adapter)."""
    if not os.path.isfile(_in(folder, "adapter_model.safetensors")):
        saved = glob.glob(os.path.join(glob.escape(folder), "checkpoint-*", "adapter_model.safetensors"))
        for path in sorted(saved, key=_step, reverse=True):
            checkpoint = inside(folder, os.path.basename(os.path.dirname(path)))  # (a link out of the run: not read)
            count = None if checkpoint is None else _count(checkpoint)
            if count is not None:  # (one being written: the one before)
                return count
    return _count(folder)


def _count(folder: str) -> int | None:
    path = _in(folder, "adapter_model.safetensors")
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
            with _LOGS_LOCK:
                cached = _COUNTS.get(path)
            if cached is not None and cached[0] == key:  # (the header was read and parsed again on each poll)
                return _with_encoder(folder, *cached[1])
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size)) if size <= 100_000_000 else None
    except (OSError, ValueError, RecursionError, struct.error):  # (a header nested past the parser's depth)
        return None
    total = None if header is None else 0  # (None: a header past 100 MB, not read)
    prompt = None  # the folded prefixes' count (peft's "prompt_embeddings")
    for name, value in header.items() if isinstance(header, dict) else ():
        shape = value.get("shape") or [1] if isinstance(value, dict) else None
        if name != "__metadata__" and isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape):
            total += math.prod(shape)  # type: ignore[operator]
            if name == "prompt_embeddings":
                prompt = math.prod(shape)
    with _LOGS_LOCK:
        if path not in _COUNTS and len(_COUNTS) >= 4096:
            _COUNTS.pop(next(iter(_COUNTS)))
        _COUNTS[path] = (key, (total, prompt))
    return _with_encoder(folder, total, prompt)


def _with_encoder(folder: str, total: int | None, prompt: int | None) -> int | None:
    """The file's count with its folded prefixes replaced by what trained them (a head in modules_to_save kept);
    the config read on each call: it is written after the tensors, and a count cached between the two stayed."""
    if total is None or prompt is None:
        return total
    return total - prompt + _reparametrised(_read_json(_in(folder, "adapter_config.json")), prompt)


def _reparametrised(config: Any, saved: int) -> int:
    """peft's print_trainable_parameters of a prompt method trained through a reparametrisation, from its
    adapter_config.json: only the folded prefixes are saved (prefix_projection: n x 2Ld of an n x d table and a
    d-h-2Ld MLP; P-tuning: n x d of a table and its MLP or LSTM encoder), so the file held 192 values of a run that
    trained 760. ``saved`` (the file's count) for every other method or a config that does not say."""
    if not isinstance(config, dict):
        return saved
    kind, reparam = config.get("peft_type"), config.get("encoder_reparameterization_type", "MLP")
    names = ("num_virtual_tokens", "num_transformer_submodules", "token_dim", "encoder_hidden_size", "num_layers")
    values = [config.get(k) for k in names]
    if not all(type(v) is int and v > 0 for v in values):
        return saved
    n, subs, d, h, layers = values
    if kind == "PREFIX_TUNING" and config.get("prefix_projection") is True:  # peft's PrefixEncoder
        return n * d + d * h + h + (h + 1) * 2 * layers * d
    if kind != "P_TUNING":
        return saved
    table = n * subs * d  # peft's PromptEncoder: its embedding holds total_virtual_tokens rows
    if reparam == "MLP":  # Linear(d, h), Linear(h, h), Linear(h, d) (encoder_num_layers unread, as in peft)
        return table + (d + 1) * h + (h + 1) * h + (h + 1) * d
    depth = config.get("encoder_num_layers", 2)
    if reparam != "LSTM" or type(depth) is not int or depth <= 0:
        return saved
    # a bidirectional LSTM of ``depth`` layers (4h x input, 4h x h, two 4h biases each way), then Linear(2h, 2h), Linear(2h, d)
    lstm = sum(2 * (4 * h * (d if i == 0 else 2 * h) + 4 * h * h + 8 * h) for i in range(depth))
    return table + lstm + (2 * h + 1) * 2 * h + (2 * h + 1) * d


def _lock_alive(folder: str) -> bool | None:
    """Whether the training process holding the run's lock (``<parent>/.<name>.lock``, written by ``train``:
    {"pid", "host"}) is alive; None when there is no readable lock or it belongs to another host."""
    parent, name = os.path.split(folder.rstrip(os.sep))
    lock = _read_json(os.path.join(parent, f".{name}.lock"))
    pid = lock.get("pid") if isinstance(lock, dict) else None
    if type(pid) is not int or pid <= 0 or lock.get("host") != socket.gethostname():  # (0, -1, true: os.kill
        return None  # signals a process group or init, "alive" for ever; runfolder refuses such a lock alike)
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


def _ended(folder: str, updated: float) -> dict[str, Any] | None:
    """The run's ``STOPPED_FILE`` when it is there and no older than its recipe and log, else None."""
    path = _in(folder, STOPPED_FILE)
    try:
        fresh = os.path.getmtime(path) >= updated
    except OSError:
        return None
    data = _read_json(path) if fresh else None
    return data if isinstance(data, dict) else None


def summary(root: str, name: str) -> dict[str, Any] | None:
    """One row of the run list, or None when ``name`` is no run folder inside ``root``: a name as the list gives it
    (one or two parts, none empty, ``.`` or ``..``, or ``.`` alone for a runs folder that is itself a run; "" and
    "a/.." named the runs folder, "a/." a run again under another name)."""
    parts = name.split("/")
    if name != "." and (len(parts) > 2 or any(part in ("", ".", "..") or os.sep in part for part in parts)):
        return None
    folder = inside(root, name)
    if folder is None or not os.path.isfile(_in(folder, RUN_FILE)):
        return None
    recipe = _read_yaml(_in(folder, RUN_FILE)) or {}  # (both read sanitised: not walked again on each poll)
    metrics = _read_json(_in(folder, "metrics.json"))
    metrics = metrics if isinstance(metrics, dict) else None
    updated = _mtime(folder)
    live = _lock_alive(folder)
    ended = _ended(folder, updated) if metrics is None and not live else None
    reason = None
    if metrics is not None:
        status = "finished"
    elif ended is not None:
        status = "stopped" if ended.get("interrupted") is True else "failed"
        reason = ended.get("reason") if isinstance(ended.get("reason"), str) else None
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
        "reason": reason,
        "metrics": headline,
        "trainable_params": trainable_parameters(folder),
        "steps": _last_step(folder),
        "updated": updated,
    }


def list_runs(root: str) -> list[dict[str, Any]]:
    """Every run folder under ``root`` (a folder holding run.yaml, at most two levels down; ``root`` itself, named
    ".", when it is one, as TensorBoard names a logdir that holds events itself), newest first."""
    real_root = os.path.realpath(root)
    names = ["."] if os.path.isfile(os.path.join(real_root, RUN_FILE)) else []  # --runs runs/a: TensorBoard's "."
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


def detail(root: str, name: str, points: int = MAX_POINTS) -> dict[str, Any] | None:
    """A run's summary plus its recipe, every final metric, its log history (at most ``points`` rows of each kind,
    see ``downsample``; ``history_rows`` counts them all) and its report (markdown)."""
    row = summary(root, name)
    if row is None:
        return None
    folder = inside(root, name)
    assert folder is not None
    metrics = _read_json(_in(folder, "metrics.json"))
    rows = _purged_history(folder)
    return {
        **row,
        "recipe": _read_yaml(_in(folder, RUN_FILE)) or {},  # (the cached recipe itself: sent, never changed)
        "all_metrics": metrics if isinstance(metrics, dict) else {},
        "history": downsample(rows, points),
        "history_rows": len(rows),
        "report": _report(_in(folder, "report.md")),
    }


def _purged_history(folder: str) -> list[dict[str, Any]]:
    """``purged(history(folder))``, kept while the log's rows are the very rows purged before (a page polls every
    second; a 200,000-row log that went back took 0.56 s to purge each time)."""
    rows = history(folder)
    with _LOGS_LOCK:
        kept = _PURGED.get(folder)
    if kept is not None and len(kept[0]) == len(rows) and all(map(operator.is_, kept[0], rows)):
        return kept[1]
    out = purged(rows)
    with _LOGS_LOCK:
        if folder not in _PURGED and len(_PURGED) >= 16:
            _PURGED.pop(next(iter(_PURGED)))
        _PURGED[folder] = (rows, out)
    return out


def _report(path: str) -> str | None:
    """A run's ``report.md``, read again only when the file changes (a page polls every second; it was read whole
    each time), at most its first ``REPORT_MAX`` bytes (then a last line says how long it is); None when missing."""
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
            with _LOGS_LOCK:
                cached = _REPORTS.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
            data = fh.read(REPORT_MAX + 1)
    except OSError:
        return None
    # a stray byte: shown as U+FFFD, as in the log; a cut report ends at its last whole character (not final)
    report = codecs.getincrementaldecoder("utf-8")("replace").decode(data[:REPORT_MAX], len(data) <= REPORT_MAX)
    if len(data) > REPORT_MAX:
        report += f"\n\n*(report.md holds {info.st_size:,} bytes; the board shows its first {REPORT_MAX:,})*\n"
    with _LOGS_LOCK:
        if path not in _REPORTS and len(_REPORTS) >= 64:
            _REPORTS.pop(next(iter(_REPORTS)))
        _REPORTS[path] = (key, report)
    return report
