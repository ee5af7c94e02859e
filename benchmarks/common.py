"""What the benchmark scripts share: the method names, each method's config on either side (deltatune or peft),
the plain training loop, and the option helpers.

The scripts run as ``python benchmarks/x.py`` and the tests import some of them by path; each one puts its own
folder first on ``sys.path`` and then does ``import common``. Nothing here imports torch, transformers, peft or
deltatune at module level (benchmarks/bench.py, the planner, stays light): they are imported where used.

Method names are the test matrix's (tests/matrix.py): a registry name (``deltatune.registry.names()``),
optionally ``-variant``:

- ``full``, ``bitfit``, ``freeze`` (the last 2 blocks trainable), ``ia3``;
- ``lora`` (r 8, alpha 16, dropout 0, on the model's query and value projections), ``lora-all-linear`` (every
  linear layer but the output and task heads), ``lora-rslora``, ``lora-dora``, and ``lora-4bit``: LoRA on the
  base quantised to NF4 with double quantisation (QLoRA; the script quantises the base, see ``QUANTIZED``);
- ``bottleneck-houlsby`` and ``bottleneck-pfeiffer`` (reduction factor 16);
- ``prompt_tuning`` (20 virtual tokens), ``p_tuning`` (20 tokens through an MLP prompt encoder of width 128),
  ``prefix_tuning`` (20 tokens per layer through the MLP reparametrisation of width 128, as Li & Liang train it)
  and ``prefix_tuning-v2`` (P-tuning v2: the per-layer prefixes train directly, no MLP; peft's default).

A script may set other fields per method (``method_config``'s ``fields``) and may add LoRA variants of its own
(``lora-<variant>``: LoRA's fields plus the script's).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterable
from typing import Any

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
VIRTUAL_TOKENS = 20
ENCODER_HIDDEN = 128
FIELDS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": LORA,
    "lora-4bit": LORA,
    "lora-all-linear": {**LORA, "target_modules": "all-linear"},
    "lora-rslora": {**LORA, "use_rslora": True},
    "lora-dora": {**LORA, "use_dora": True},
    "ia3": {},
    "prompt_tuning": {"num_virtual_tokens": VIRTUAL_TOKENS},
    "p_tuning": {"num_virtual_tokens": VIRTUAL_TOKENS, "encoder_hidden_size": ENCODER_HIDDEN},
    "prefix_tuning": {
        "num_virtual_tokens": VIRTUAL_TOKENS,
        "prefix_projection": True,
        "encoder_hidden_size": ENCODER_HIDDEN,
    },
    "prefix_tuning-v2": {"num_virtual_tokens": VIRTUAL_TOKENS, "prefix_projection": False},
    "bottleneck-houlsby": {"config": "houlsby", "reduction_factor": 16},
    "bottleneck-pfeiffer": {"config": "pfeiffer", "reduction_factor": 16},
    "bitfit": {},
    "freeze": {"freeze_trainable_layers": 2},
}
"""Every method's config fields (besides the task type and the model-dependent target modules)."""
METHODS = tuple(FIELDS)
"""Every method name a script may offer (a script offers a subset, in its own order, and may add LoRA variants)."""
PEFT_CONFIGS = {
    "lora": "LoraConfig",
    "ia3": "IA3Config",
    "prompt_tuning": "PromptTuningConfig",
    "p_tuning": "PromptEncoderConfig",
    "prefix_tuning": "PrefixTuningConfig",
}
"""The registry methods peft has, and the name of peft's config class for each (every variant of them too)."""
QUANTIZED = ("lora-4bit",)
"""Methods whose base linear layers are 4-bit NF4 (double quantisation) before the adapter goes on."""

MODULES: dict[str, dict[str, list[str]]] = {
    "minilm": {"targets": ["query", "value"], "ia3_targets": ["key", "value", "output.dense"],
               "ia3_feedforward": ["output.dense"]},
    "llama": {"targets": ["q_proj", "v_proj"], "ia3_targets": ["k_proj", "v_proj", "down_proj"],
              "ia3_feedforward": ["down_proj"]},
    "smollm2": {"targets": ["q_proj", "v_proj"], "ia3_targets": ["k_proj", "v_proj", "down_proj"],
                "ia3_feedforward": ["down_proj"]},
}  # fmt: skip
"""Module names per model kind, the same on both sides (peft's defaults for BERT and Llama, written out): LoRA's
targets (query and value) and IA3's targets and feed-forward modules; ``method_config(..., **MODULES[kind])``."""
LORA_TARGETS = {kind: modules["targets"] for kind, modules in MODULES.items()}


def method(name: str) -> str:
    """The registry method of a method name: ``lora-4bit`` -> ``lora`` (registry names have no '-')."""
    return name.split("-", 1)[0]


def peft_has(name: str) -> bool:
    """Whether peft has the method (its full fine-tuning reference, the plain model, is the scripts' own)."""
    return method(name) in PEFT_CONFIGS


def method_config(
    name: str,
    side: str,
    task_type: str | None,
    *,
    targets: list[str] | str | None = None,
    ia3_targets: list[str] | None = None,
    ia3_feedforward: list[str] | None = None,
    fields: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The config of method ``name`` for ``side`` ("deltatune" or "peft"), with the same hyper-parameters on both.

    Args:
        name: a name of ``FIELDS`` (module docstring), or a script's own LoRA variant ``lora-<variant>``.
        side: "deltatune" (the registry's config class) or "peft" (peft's twin, ``PEFT_CONFIGS``).
        task_type: the PEFT task type ("SEQ_CLS", "CAUSAL_LM", ...).
        targets: LoRA's target modules (the model's query and value projections; ``MODULES``); None: the library's
            default. A variant's own targets (``lora-all-linear``) or ``fields``' come first.
        ia3_targets, ia3_feedforward: IA3's target and feed-forward modules (``MODULES``).
        fields: the script's own fields per method name, over ``FIELDS``' (e.g. fewer virtual tokens).

    Raises:
        ValueError: an unknown method, or one peft does not have (bottleneck adapters, BitFit, freeze, full).
    """
    base = method(name)
    if name in FIELDS:
        known = FIELDS[name]
    elif base == "lora" and fields and name in fields:
        known = LORA
    else:
        raise ValueError(f"unknown method {name!r}")
    if side == "deltatune":
        from deltatune import registry

        cls = registry.get(base).config_class
    elif side == "peft":
        if base not in PEFT_CONFIGS:
            raise ValueError(f"peft has no method {name!r}")
        import peft

        cls = getattr(peft, PEFT_CONFIGS[base])
    else:
        raise ValueError(f"unknown side {side!r}")
    kwargs: dict[str, Any] = {"task_type": task_type}
    if base == "lora":
        kwargs["target_modules"] = targets
    elif base == "ia3":
        kwargs.update(target_modules=ia3_targets, feedforward_modules=ia3_feedforward)
    kwargs.update(known)
    kwargs.update((fields or {}).get(name, {}))
    return cls(**{k: v for k, v in kwargs.items() if v is not None or k == "task_type"})


def bnb_config(compute_dtype: Any, skip: list[str] | None = None) -> Any:
    """transformers' ``BitsAndBytesConfig`` for the peft side of ``lora-4bit``: NF4, double quantisation, the
    ``compute_dtype``; ``skip``: modules kept in full precision (deltatune.quantize keeps the task heads and BERT's
    pooler; transformers matches these names as a prefix or a suffix of a module's, so write ``pooler.dense``)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


# -- the training loop ----------------------------------------------------------------------------------------
def train_loop(model: Any, batches: Iterable[dict[str, Any]], opt: Any, *, sched: Any = None,
               max_grad_norm: float | None = None, autocast: Any = None) -> list[float]:  # fmt: skip
    """The plain loop the quality scripts share; the losses of its steps.

    Per batch: forward (the batch holds the labels), backward, the gradients' global norm clipped to
    ``max_grad_norm`` (None: no clipping), the optimizer's step, the schedule's step (if any), the gradients set to
    None. The caller builds the optimizer (learning rates, weight decay, parameter groups) and the schedule, seeds
    and sets train mode; ``batches`` may be a generator, drawn one batch per step. ``autocast`` (a dtype): each
    forward runs under CPU autocast to it. One autocast region per forward, never one around the loop: autocast
    caches its low-precision copies of the trainable weights until its region ends, so a region spanning several
    optimizer steps would keep computing with the first step's weights.
    """
    import torch

    params = [p for group in opt.param_groups for p in group["params"]]
    losses: list[float] = []
    for batch in batches:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(**batch).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def balanced_orders(n: int) -> list[list[int]]:
    """The orders of a Williams design for ``n`` items: over its rows (``n``, or ``2n`` for odd ``n``) each item runs
    in every position, and right after every other item, equally often. A rotation (0 1 2, 1 2 0, 2 0 1) keeps the
    cyclic order, so that each item always follows the same one: what that one leaves behind (freed memory the
    kernel zeroes again, evicted caches) would weigh on it every round."""
    first, low, high = [0], 1, n - 1
    while low <= high:
        first.append(low)
        low += 1
        if low <= high:
            first.append(high)
            high -= 1
    rows = [[(x + i) % n for x in first[:n]] for i in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 and n > 1 else rows


# -- options --------------------------------------------------------------------------------------------------
def pick(value: str | None, known: Iterable[str], what: str = "method", default: Iterable[str] = ()) -> list[str]:
    """Comma-separated names from ``known`` ("all": every one; empty: ``default``).

    Raises:
        ValueError: one line naming the unknown ones and every valid name.
    """
    known = list(known)
    if not value:
        return list(default)
    names = known if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)} (or 'all')")
    return names


def at_least(low: int):
    """An argparse ``type``: an integer >= ``low``, else argparse's one-line error naming the option (``--steps 0``
    ran every worker into a ZeroDivisionError, ``--eval-rows 0`` into a ValueError after loading the model)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid integer value: 'x'"
    return parse


def in_process_options(
    script: str,
    doc: str,
    argv: list[str] | None,
    default: str,
    rounds: int,
    fused_loss: bool = False,
    dora: bool = False,
) -> argparse.Namespace:
    """The options of the one-process scripts (``script``: interleaved.py, mixed_batch.py), parsed, with torch's
    threads set, ``rounds`` filled in (``--quick``: 2) and ``command`` the line that reproduces the run.
    ``fused_loss``: the script takes ``--fused-loss`` (deltatune's causal-LM loss on, as ``deltatune train`` runs);
    ``dora``: ``--dora`` (both sides' LoRA with DoRA)."""
    import torch

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--config", default=default, choices=["minilm", "llama-fp32", "llama-bf16", "smollm2-fp32", "smollm2-bf16"]
    )
    parser.add_argument(
        "--rounds", type=at_least(1), default=None, help=f"timed rounds (default {rounds}; --quick: 2)"
    )
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, not speed")
    parser.add_argument("--out", help="also write the report to this file")
    if fused_loss:
        parser.add_argument(
            "--fused-loss",
            action="store_true",
            help="deltatune's models with the fused causal-LM loss, as `deltatune train`",
        )
    if dora:
        parser.add_argument("--dora", action="store_true", help="DoRA (use_dora) on both sides' LoRA")
    args = parser.parse_args(argv)
    check_out(parser, "--out", args.out)  # before the measurement, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (2 if args.quick else rounds)
    args.command = " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
    return args


def check_out(parser, flag: str, path: str | None) -> None:
    """``parser.error`` before any measurement when ``path`` cannot be written: a folder, or in no writable folder
    (found after an hour's run, the report and the files written after it were lost). A symlink is checked where
    it points, where ``write_atomic`` writes."""
    folder = os.path.dirname(os.path.realpath(path)) if path else None
    if path and os.path.isdir(path):
        parser.error(f"{flag} {path!r} is a folder; give a file name")
    if folder and (not os.path.isdir(folder) or not os.access(folder, os.W_OK)):
        parser.error(f"{flag} {path!r}: {folder!r} is not a folder this process can write to")


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: into a temporary file in the same folder, then renamed over
    ``path``. A write that fails part-way (a full disk, an interrupt, text that does not encode) leaves the file
    that was there, where ``Path.write_text`` had already emptied it. A symlink stays one (its target is
    replaced), an existing file keeps its mode, and a new one gets the mode ``open`` would give it."""
    import stat
    import tempfile

    path = os.path.realpath(os.fspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask, read once at import (``write_atomic`` setting it to 0 and back for a moment on every
    call gave a thread creating a file meanwhile the mode 0666): from /proc where it is there, which leaves it
    untouched, else by setting it and back."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status", encoding="ascii") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def emit(text: str, out: str | None) -> None:
    """Print a report, and write it to ``out`` as well when one is given (whole or not at all: ``write_atomic``)."""
    print(text)
    if out:
        write_atomic(out, text)
