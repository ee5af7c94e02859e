"""Run folders that lose nothing: one run per folder at a time, replaced only once the new run has started,
resumed only when that is what the user meant, and folders published whole (staging + rename).

- ``RunLock``: ``<parent>/.<name>.lock``, created with ``O_CREAT | O_EXCL`` (atomic: of two runs started on one
  folder at the same instant exactly one gets it), holding the pid and host. A lock whose process is gone (same
  host) is stale and taken over; one from another host is never guessed about.
- ``Replacement``: ``--overwrite`` moves the old run aside (a rename) only after everything was validated, and
  deletes it once the new run has made its first step; if the new run fails before that, the old one is put back.
- ``resume_checkpoint`` / ``recipe_changes``: the ``--resume`` rules (a finished run is not resumed; a changed
  recipe is refused with its differences; an unreadable newest checkpoint falls back to the newest readable one).
- ``staging_folder`` / ``publish_folder`` (staging.py): write a folder next to its destination and rename it in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
import zipfile
from typing import Any

from ..config import ConfigError
from ..files import process_alive as _alive
from .runs import ALPACA_MARK, OLD_ALPACA, add_mark, mark_run, trained_template  # noqa: F401  (run)
from .runs import MARKS_FILE as MARKS  # noqa: F401  (run_load; the marks are runs.py's)
from .staging import _sibling, check_apart, check_link, publish_folder, staging_folder  # noqa: F401  (run, cli)

FINISHED_FILE = "metrics.json"  # written last by a run that completed
STOPPED_FILE = "stopped.json"  # why a run ended early (train's); the board's STOPPED_FILE


class RunLock:
    """An exclusive claim on an output folder for one run (a context manager).

    Args:
        folder: the run's output folder (it need not exist yet).

    Raises:
        ConfigError: another live run holds the folder (its pid and host named), or the lock cannot be created.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = _sibling(folder, "lock")
        self.held = False
        self.created: list[str] = []  # folders made to hold the lock, deepest first: removed with it when empty

    def acquire(self) -> RunLock:
        parent = os.path.dirname(self.path)
        at = os.path.abspath(parent)
        while not os.path.exists(at):
            self.created.append(at)
            at = os.path.dirname(at)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output.dir {self.folder!r}: cannot create {parent!r} ({exc.strerror})") from None
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        for _ in range(50):  # a stale lock is removed (or another process is removing it), then tried again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._break_if_stale()
                continue
            except OSError as exc:
                raise ConfigError(
                    f"output.dir {self.folder!r}: cannot create {self.path!r} ({exc.strerror})"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(me)
            self.held = True
            try:
                _put_back(self.folder)
            except BaseException:  # (the lock is not left held by a command that failed to take the folder)
                self.release()
                raise
            return self
        raise ConfigError(f"output.dir {self.folder!r} is locked by {self.path} and the lock could not be taken")

    def _owner(self) -> dict[str, Any] | None:
        """The lock's contents (None: the file is gone; {} when it is not a run's record)."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                owner = json.loads(fh.read() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _break_if_stale(self) -> None:
        owner = self._owner()
        if owner is None:
            return  # released meanwhile
        pid, host = owner.get("pid"), owner.get("host")
        if type(pid) is not int or pid <= 0:  # (0, -1, true: os.kill reaches a process group or init: never dead)
            # Half-written by a run that is creating it this very moment, or garbage: give it a moment.
            time.sleep(0.2)
            owner = self._owner() or {}
            pid, host = owner.get("pid"), owner.get("host")
            if type(pid) is not int or pid <= 0:
                raise ConfigError(
                    f"output.dir {self.folder!r} is locked by {self.path}, which does not name its run; "
                    "delete that file if no run is writing there"
                )
        if host == socket.gethostname() and not _alive(pid):
            # One process breaks it, and only while it still holds what was read: else two processes that both
            # read the dead run's lock could each remove it, the second removing the first's fresh lock.
            breaker = self.path + ".break"
            try:
                os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                with contextlib.suppress(OSError):
                    if time.time() - os.path.getmtime(breaker) > 10:  # left by a process killed while breaking
                        os.remove(breaker)
                time.sleep(0.05)
                return
            try:
                if self._owner() == owner:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(breaker)
            return
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise ConfigError(
            f"output.dir {self.folder!r} is in use by another run (pid {pid} on {where}); wait for it, choose "
            f"another output.dir, or delete {self.path} if that run is gone"
        )

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False
        for folder in self.created:  # a run refused before it wrote anything leaves no empty folders behind
            try:
                os.rmdir(folder)
            except OSError:  # not empty: the run is there
                break
        self.created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _put_back(folder: str) -> None:
    """Under ``folder``'s lock: the old run an ``--overwrite`` killed before its first step (kill -9, the OOM killer:
    no ``Replacement.failed()`` ran) left aside (``.<name>.replaced-<pid>``, the one there) put back in place of
    the new run's start, as ``failed()`` would have; a note says so. Only over what a run writes before its first
    step (``_START``): PPO and GRPO keep the old run aside until they end, and one killed at step 400 of 500 holds its
    log; the old run is then named, not put back."""
    parent, name = os.path.split(_sibling(folder, "replaced-"))
    aside = [n for n in os.listdir(parent) if n.startswith(name) and n[len(name) :].isdecimal()]
    marks = set(os.listdir(folder)) if not aside and os.path.isdir(folder) else set()
    if marks and marks <= {MARKS, MARKS + ".tmp"}:  # a new run killed between its marks and its run.yaml: an
        for n in marks:  # empty folder again, as before it began (else train and --overwrite refused the folder)
            os.remove(os.path.join(folder, n))
        return
    if len(aside) != 1 or _has_checkpoint(folder) or os.path.isfile(os.path.join(folder, FINISHED_FILE)):
        return
    kept = [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if not _start_file(folder, n)]
    if kept:
        print(f"deltatune: note: {folder!r} holds a run an --overwrite began ({', '.join(sorted(kept)[:3])}); the run "
              f"it replaced is still beside it, in {os.path.join(parent, aside[0])!r}", file=sys.stderr)  # fmt: skip
        return
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.rename(os.path.join(parent, aside[0]), folder)
    print(f"deltatune: note: {folder!r} holds again the run an --overwrite killed before its first step had "
          f"moved aside ({aside[0]})", file=sys.stderr)  # fmt: skip


_START = {"run.yaml", MARKS, MARKS + ".tmp", STOPPED_FILE, "runs"}
"""What a run writes in its folder before its first step: run.yaml, its marks, a stop's note, TensorBoard's ``runs``
(the Trainer's logger opens it as training begins), and a log_history.jsonl without a step's row: empty (PPO's and
GRPO's, at their start) or only train.eval_on_start's step-0 evaluation."""


def _start_file(folder: str, name: str) -> bool:
    path = os.path.join(folder, name)
    return name in _START or name == "log_history.jsonl" and os.path.isfile(path) and _no_step(path)


def _no_step(log: str) -> bool:
    """Whether ``log`` (a log_history.jsonl) holds no row of a step: every row at step 0, or none."""
    try:
        with open(log, encoding="utf-8") as fh:
            return all(json.loads(line).get("step") == 0 for line in fh if line.strip())
    except (OSError, ValueError, AttributeError):  # (AttributeError: a row that is not a mapping)
        return False


def check_output_path(folder: str) -> None:
    """``output.dir`` must be a folder (or not exist yet); a file there is named instead of a traceback later."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"output.dir {folder!r} is a file, not a folder; choose another output.dir")
    check_link(folder, "output.dir")  # (the run made no folder there: after every load)
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"output.dir {folder!r}: {parent!r} is a file, not a folder")


class Replacement:
    """The life of a run folder while a new run takes it over.

    ``begin()`` (after every check passed): the old run, if any, is renamed aside; the folder is created. A run
    resumed in its folder drops the ``STOPPED_FILE`` of its last stop: it runs again (and is marked anew if it stops
    again), so finished it holds no stale word of a stop.
    ``started()`` (the new run made its first step): the old run is deleted.
    ``failed()``: before ``started``, the new run's partial folder is deleted and the old run put back, so the
    folder is as it was; after ``started``, the new run's checkpoints stay.
    """

    def __init__(self, folder: str, replace: bool) -> None:
        self.folder = folder
        # Under torchrun / accelerate only rank 0 moves or deletes folders; the other ranks leave them alone.
        lead = int(os.environ.get("RANK", "0")) == 0
        self.replace = replace and lead and os.path.isdir(folder)
        self.existed = os.path.isdir(folder) or not lead
        self.aside = _sibling(folder, f"replaced-{os.getpid()}")
        self.is_started = self.begun = False

    def begin(self) -> None:
        self.begun = True
        if self.replace:
            os.rename(self.folder, self.aside)
        os.makedirs(self.folder, exist_ok=True)
        if int(os.environ.get("RANK", "0")) == 0:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.folder, STOPPED_FILE))

    def started(self) -> None:
        if not self.is_started:
            self.is_started = True
            if self.replace:
                shutil.rmtree(self.aside, ignore_errors=True)

    def failed(self) -> None:
        if _has_checkpoint(self.folder):  # a checkpoint written means the new run had started: keep it
            self.started()
        if self.is_started:
            return
        if self.replace:
            shutil.rmtree(self.folder, ignore_errors=True)
            os.rename(self.aside, self.folder)
        elif not self.existed:
            shutil.rmtree(self.folder, ignore_errors=True)


def _has_checkpoint(folder: str) -> bool:
    return os.path.isdir(folder) and any(n.startswith("checkpoint-") for n in os.listdir(folder))


def started_callback(replacement: Replacement):
    """A TrainerCallback telling ``replacement`` when the first optimizer step is done."""
    from transformers import TrainerCallback

    class _Started(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            replacement.started()

    return _Started()


# -- resume ----------------------------------------------------------------------------------------------------


def readable(checkpoint: str) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None when every file in it reads.

    Checks without unpickling anything: JSON parses, safetensors headers and sizes agree, and torch's zip
    files (optimizer.pt, scheduler.pt, rng_state.pth) pass their CRC check.
    """
    from safetensors import safe_open

    if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        return "no trainer_state.json"
    missing = _missing_state(checkpoint)
    if missing:
        return f"no {missing}"
    for root, _, files in os.walk(checkpoint):
        for name in files:
            path = os.path.join(root, name)
            try:
                if name.endswith(".json"):
                    with open(path, encoding="utf-8") as fh:
                        json.load(fh)
                elif name.endswith(".safetensors"):
                    with safe_open(path, "pt") as fh:
                        for key in fh.keys():  # noqa: SIM118  (safe_open is not a dict)
                            fh.get_slice(key)
                    _check_safetensors_size(path)
                elif name.endswith((".pt", ".pth", ".bin")):
                    with zipfile.ZipFile(path) as zf:
                        bad = zf.testzip()
                    if bad is not None:
                        return f"{os.path.relpath(path, checkpoint)} is corrupt (member {bad})"
            except Exception as exc:  # any failure to read is "unreadable", named
                return f"{os.path.relpath(path, checkpoint)} does not read ({type(exc).__name__})"
    return None


def _missing_state(checkpoint: str) -> str | None:
    """The file a Trainer checkpoint lacks of the state its run continues from, which the Trainer would quietly go
    on without (no optimizer.pt or scheduler.pt: a fresh AdamW and the schedule from its start, 0.019 off the
    uninterrupted run's adapter after 2 more steps; no rng_state.pth: other dropout and order draws; an adapter's
    weights, which the resume refused without going back to the checkpoint before), or None.
    Only the Trainer's checkpoints (their trainer_state.json has ``stateful_callbacks``): PPO's and GRPO's load their
    own files and name what they lack."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        return None  # (named by the walk of ``readable``)
    if not isinstance(state, dict) or "stateful_callbacks" not in state:
        return None
    names = os.listdir(checkpoint)
    # optimizer.pt; optimizer.bin or optimizer_0/ under FSDP; rankN-of-M-optimizer.pt (SageMaker); DeepSpeed's
    if not any(n.startswith(("optimizer", "global_step")) or n.endswith("-optimizer.pt") for n in names):
        return "optimizer.pt"
    if "scheduler.pt" not in names and not any(n.startswith("global_step") for n in names):  # (DeepSpeed's own)
        return "scheduler.pt"
    if not any(n.startswith("rng_state") and n.endswith(".pth") for n in names):
        return "rng_state.pth"
    world = _recorded_world_size(checkpoint)  # each process's own rng_state_{i}.pth (the Trainer's _save_rng_state)
    missing = [f"rng_state_{i}.pth" for i in range(world) if world > 1 and f"rng_state_{i}.pth" not in names]
    if missing:
        return missing[0]
    for root, _, files in os.walk(checkpoint):  # each adapter's weights beside its config (named ones in subfolders)
        if "adapter_config.json" in files and not {"adapter_model.safetensors", "adapter_model.bin"} & set(files):
            return os.path.relpath(os.path.join(root, "adapter_model.safetensors"), checkpoint)
    return None


def _recorded_world_size(checkpoint: str) -> int:
    from .trainer_callbacks import SUMS

    try:
        with open(os.path.join(checkpoint, SUMS), encoding="utf-8") as fh:
            world = (json.load(fh).get("facts") or {}).get("world_size", 1)
    except (OSError, ValueError, AttributeError):
        return 1
    return world if isinstance(world, int) else 1


def _check_safetensors_size(path: str) -> None:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if os.path.getsize(path) != 8 + n + end:
        raise ValueError("size does not match its header (truncated?)")


def run_facts(cfg: Any) -> dict[str, Any]:
    """What a resumed run must share with its start beyond the recipe: the number of processes (train.batch_size is
    per process, so the global batch and the data position follow it), the bytes of its data files, and the dtype a
    ``model.dtype: auto`` resolved to (bfloat16 on a GPU, float32 on a CPU without fast bf16)."""
    import hashlib

    from ..data.load import data_path, folder_files

    facts: dict[str, Any] = {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if cfg.model.dtype == "auto":  # what it resolved to here (run.yaml records 'auto'; another machine resolves anew)
        from .models import resolved_dtype

        facts["model.dtype"] = resolved_dtype("auto")
    for key in ("train", "eval"):
        path = getattr(cfg.data, key)
        path = data_path(path) if isinstance(path, str) else path  # the file of a row range (``train.jsonl[:640]``)
        if not isinstance(path, str):
            continue
        files = [path] if os.path.isfile(path) else folder_files(path) if os.path.isdir(path) else []
        if not files:
            continue
        digest = hashlib.sha256()
        for file in files:
            if file != path:  # a folder of data files: their names (the row order) and bytes
                digest.update(os.path.basename(file).encode() + b"\0")
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        facts[f"data.{key}"] = digest.hexdigest()
    return facts


def facts_changes(checkpoint: str, facts: dict[str, Any]) -> list[str]:
    """How ``facts`` (``run_facts`` now) differ from those the checkpoint recorded; none for a checkpoint that
    recorded none (written before they were: GRPO's before d35f075, PPO's before 28b430c)."""
    from .trainer import SUMS

    try:
        with open(os.path.join(checkpoint, SUMS), encoding="utf-8") as fh:
            old = json.load(fh).get("facts") or {}
    except (OSError, ValueError, AttributeError):
        return []
    out = []
    for key, value in facts.items():
        if key in old and old[key] != value:
            if key == "model.dtype":
                out.append(f"model.dtype auto resolved to {old[key]} when the run began, to {value} on this machine")
            else:
                out.append(
                    f"{key} was {old[key]}, now {value}" if key == "world_size" else f"the file of {key} changed"
                )
    return out


def resume_checkpoint(folder: str) -> tuple[str, list[str]]:
    """The checkpoint to resume ``folder`` from, and notes for the user (a skipped unreadable checkpoint).

    Raises:
        ConfigError: no run there, the run is finished, or no checkpoint reads.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not os.path.isdir(folder):
        raise ConfigError(f"--resume: {folder!r} does not exist; there is no run to continue")
    if os.path.isfile(os.path.join(folder, FINISHED_FILE)):
        raise ConfigError(
            f"--resume: the run in {folder!r} is finished ({FINISHED_FILE} written); nothing to resume. "
            "Raise train.max_steps in a new output.dir, or --overwrite to train again"
        )
    found = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        step = name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdecimal() and os.path.isdir(path):
            found.append((int(step), path))
    if not found:
        raise ConfigError(f"--resume: {folder!r} holds no checkpoint to resume from")
    notes = []
    for _, path in sorted(found, reverse=True):
        why = readable(path)
        if why is None:
            return path, notes
        notes.append(f"{os.path.basename(path)} is unreadable ({why}); skipped")
    raise ConfigError(f"--resume: no checkpoint in {folder!r} reads: {'; '.join(notes)}")


# Keys whose change does not change what a resumed run computes (when to log, evaluate, save; how far to go).
HARMLESS = {
    "train.max_steps",
    "train.epochs",
    "train.logging_steps",
    "train.logging_first_step",
    "train.eval_accumulation_steps",
    "train.eval_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.report_to",
    "train.num_workers",
    "train.eval_batch_size",
    "train.eval_on_start",
    "train.torch_empty_cache_steps",  # (when the CUDA cache is emptied: peak memory, no result)
    "data.eval",
    "output.dir",
}


def _with_defaults(method: Any) -> Any:
    """A recipe's method section with the method's default for every key it leaves out."""
    import dataclasses

    from .. import registry

    try:
        fields = dataclasses.fields(registry.get(method["name"]).config_class)
    except (KeyError, TypeError):  # no method or an unknown one: compared as written
        return method
    given = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING and f.init}
    return given | {k: v for k, v in method.items() if k not in ("task_type",)} | {"name": method["name"]}


def _flat(recipe: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (one level: a dict value such as model.quantization is
    compared whole)."""
    out: dict[str, Any] = {}
    for section, value in recipe.items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


DERIVED = {"data.labels", "model.num_labels", "data.multi_label"}
"""Keys a run records as its stage derived them (the ``data.labels`` it found, the ``model.num_labels: 1`` of a
reward model, cls's ``data.multi_label`` of a label column of lists), which a recipe need not name: left unset (None) by the new recipe, they are no change."""


def take_derived(cfg: Any, folder: str) -> list[str]:
    """On ``--resume``: each ``DERIVED`` key the recipe leaves unset (None) set to the value the run's run.yaml
    recorded, so the resumed run has what it began with (the classes of a run trained on labels {1, 2} before
    they were sorted into two classes: its head has three rows, and its recorded ``data.labels`` say which).
    Returns the keys set; data.template alpaca is set to the alpaca the run trained with (``runs.trained_template``:
    alpaca_v0 in a folder begun before the ``alpaca_system`` mark) where run.yaml records alpaca (or alpaca_v0); a
    run that trained another template, resumed into alpaca (``--resume-changed``), trains LLaMA-Factory's, and its
    folder gains the mark when run.yaml is written with it (``runs.write_run_file``: after every check, not here).
    A run.yaml that does not read is left to the recipe comparison to refuse."""
    import yaml

    from .runs import RUN_FILE

    try:
        with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as fh:
            old = yaml.safe_load(fh)
    except (OSError, ValueError, yaml.YAMLError):
        return []
    if not isinstance(old, dict):
        return []
    taken, recorded = [], old.get("data").get("template") if isinstance(old.get("data"), dict) else None
    old_alpaca = recorded == OLD_ALPACA or trained_template("alpaca", folder) != "alpaca"
    if cfg.data.template == "alpaca" and old_alpaca and recorded in ("alpaca", OLD_ALPACA):  # (as it trained)
        cfg.data.template, taken = OLD_ALPACA, ["data.template"]
    for key in sorted(DERIVED):
        section, name = key.split(".")
        recorded = old.get(section).get(name) if isinstance(old.get(section), dict) else None
        if recorded is not None and getattr(getattr(cfg, section), name, None) is None:
            setattr(getattr(cfg, section), name, recorded)
            taken.append(key)
    return taken


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.key: old -> new`` for every key that differs and matters (not in ``HARMLESS``). A method key one
    recipe leaves out is its default (``method.lora_dropout`` left out of the new recipe trained with 0.0). An old
    run's data.template alpaca_v0 (``runs.old_run_data``) is the alpaca a recipe names.

    Raises:
        ConfigError: ``old`` (the run's run.yaml, edited by hand) is empty or not a YAML mapping.
    """
    if not old or not isinstance(old, dict):
        what = "is empty" if not old else f"holds a {type(old).__name__}, not a recipe (a YAML mapping)"
        raise ConfigError(f"--resume: the run's run.yaml {what}, so the recipe cannot be compared with it")
    from .config_align import default_changed

    a, b = (_flat({**r, "method": _with_defaults(r.get("method"))}) for r in (old or {}, new or {}))
    stage, batch_size = b.get("stage"), b.get("train.batch_size")  # (the note: the resumed recipe's defaults)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in HARMLESS:
            continue
        x, y = a.get(key), b.get(key)
        if y is None and key in DERIVED:
            continue
        if x != y and not _same_path(key, x, y) and (key, x, y) != ("data.template", OLD_ALPACA, "alpaca"):
            out.append(f"{key}: {x!r} -> {y!r}{default_changed(key, x, y, stage, batch_size, a)}")
    return out


LOCAL_PATHS = ("model.name_or_path", "data.train", "data.eval")
"""The recipe keys that may name a local folder or file: run.yaml keeps them absolute (``absolute_paths``)."""


def absolute_paths(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` (nested dicts) with each LOCAL_PATHS value that names an existing local path made absolute (a data
    spec's row range kept), so eval, generate, chat and merge started from another folder read what the run read."""
    from ..data.load import data_path

    for section, key in (p.split(".") for p in LOCAL_PATHS):
        value = recipe[section][key]
        if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(data_path(value)):
            recipe[section][key] = os.path.abspath(value)
    return recipe


def _same_path(key: str, old: Any, new: Any) -> bool:
    """A run.yaml written before local paths were kept absolute has them as typed (relative to the folder the run
    was started in, which a resume is started in too)."""
    return key in LOCAL_PATHS and isinstance(old, str) and isinstance(new, str) and os.path.abspath(old) == new
