"""Quality table: the real pre-trained MiniLM-L6 encoder fine-tuned on real data, deltatune beside peft.

    # SST-2 dev accuracy and TREC test accuracy, every method, both sides (33 min on one shared CPU thread):
    .venv/bin/python benchmarks/quality.py --out /work/notes/quality.md --json /work/notes/quality.json
    # WNUT-17 test entity F1, full fine-tuning and LoRA (16 min):
    .venv/bin/python benchmarks/quality.py --tasks wnut17 --methods full,lora --epochs 3 --out wnut.md
    # another seed, or other learning rates (method=lr pairs; the defaults are in LR):
    .venv/bin/python benchmarks/quality.py --tasks sst2 --methods lora,lora-4bit --sides deltatune --seed 1 --lr lora=1e-3
    # smoke run (seconds; tests/test_quality_bench.py): 16 SST-2 rows, 32 dev rows, LoRA on both sides
    .venv/bin/python benchmarks/quality.py --quick --out /tmp/quality.md

The defaults (2,400 training rows, one epoch: 75 steps of 32) fit the whole SST-2 + TREC table into about 33 minutes
on one thread of a shared 2-core machine; that is short for the slow learners (prompt tuning, P-tuning), and the
learning rates of ``LR`` are set high for such a short schedule. Method names: benchmarks/common.py.

Data: ``--data`` (default ../shared/data next to the checkout) holds sst2/{train,dev}.jsonl (``text``, ``label``),
trec/{train,test}.jsonl (``text``, coarse ``label``) and wnut17/{train,test}.jsonl (``tokens``, BIO ``ner_tags``);
their SOURCE.md files say where they come from. Nothing is copied into the repository.

Every (task, method, side) cell, in the same process one after another:

1. ``torch.manual_seed(seed)``, then the MiniLM encoder with a new head (AutoModelForSequenceClassification for
   sst2 and trec, AutoModelForTokenClassification for wnut17), so the head starts the same on both sides;
2. the method's config, with the same hyper-parameters on both sides (benchmarks/common.py's ``method_config``
   for MiniLM, the table ``python benchmarks/bench.py`` uses); full fine-tuning's peft side is the plain
   transformers model; ``lora-4bit`` (QLoRA) is ``deltatune.quantize(model, bits=4)`` + LoRA on one side and
   transformers' ``BitsAndBytesConfig`` (NF4, double quantisation, fp32 compute) + ``get_peft_model`` on the other;
3. one plain PyTorch loop shared by all (benchmarks/common.py's ``train_loop``): AdamW (weight decay 0.01 on every trainable tensor), linear schedule with
   6% warm-up, batch 32, the per-method learning rate of ``LR`` (the same on both sides), the same seeded data order
   and dropout seed on both sides; batches hold rows of similar length (``length_grouped``) padded to the longest;
   no gradient clipping unless ``--max-grad-norm`` asks for it;
4. evaluation on the whole held-out split: SST-2 dev accuracy (872 rows), TREC test accuracy (500), WNUT-17 test
   entity-level micro F1 (exact spans, conlleval/seqeval reading of BIO; words cut by ``max_length`` count as "O").

Word labels of WNUT-17 go to the first sub-token of each word, -100 elsewhere (deltatune's own ``encode_tag``).
On CPU, bitsandbytes evaluates the peft side's 4-bit layers with its own packed-weight kernel (``Linear4bit`` in eval
mode, no grad) while deltatune dequantises to fp32, so the two ``lora-4bit`` sides differ slightly at evaluation even
though their training steps agree to float rounding.
The report gives, per task, the metric of each side in points, the difference, each deltatune method against
deltatune's full fine-tuning, the trainable parameters, and the time of each cell.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
SIDES = ("deltatune", "peft")
LR = {
    "full": 1e-4,
    "lora": 2e-3,
    "lora-attn": 2e-3,
    "lora-all-linear": 2e-3,
    "lora-4bit": 2e-3,
    "ia3": 1e-2,
    "prompt_tuning": 3e-2,
    "p_tuning": 1e-2,
    "prefix_tuning-v2": 1e-2,
    "prefix_tuning": 2e-3,
    "bottleneck-houlsby": 2e-3,
    "bottleneck-pfeiffer": 2e-3,
    "bitfit": 3e-3,
    "freeze": 2e-4,
}
"""Learning rate per method, the same on both sides; its keys are the methods, in the report's order."""
METHODS = tuple(LR)
FIELDS = {
    "lora-attn": {"target_modules": ["query", "key", "value", "attention.output.dense"]},
    # r 4, alpha 8 (LoRA's scale 2); "dense": the attention output, intermediate and output layers (and the pooler's)
    "lora-all-linear": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value", "dense"]},
}
"""This table's own fields over common.FIELDS: ``lora-attn``, LoRA on all four attention projections (query, key,
value and the attention's output), 0.65% of MiniLM's parameters; ``lora-all-linear``, LoRA r 4 on every linear
layer of the encoder, attention and feed-forward (0.76%), for the tagging task where q+v is too little."""
BATCH = 32
EVAL_BATCH = 64
GROUP = 50
"""Batches per mega-batch of ``length_grouped`` (transformers' default)."""
WARMUP = 0.06
WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    """cls (one label per row) or tag (BIO tags per word)."""
    train: str
    eval: str
    max_length: int
    num_labels: int
    metric: str


TASKS = {
    "sst2": Task("sst2", "cls", "train.jsonl", "dev.jsonl", 64, 2, "dev accuracy"),
    "trec": Task("trec", "cls", "train.jsonl", "test.jsonl", 48, 6, "test accuracy"),
    "wnut17": Task("wnut17", "tag", "train.jsonl", "test.jsonl", 64, 13, "test entity F1"),
}
WNUT_TYPES = ("corporation", "creative-work", "group", "location", "person", "product")
WNUT_TAGS = ["O", *(f"{p}-{t}" for t in WNUT_TYPES for p in ("B", "I"))]
WNUT_IDS = {t: i for i, t in enumerate(WNUT_TAGS)}


@dataclass
class Cell:
    """One measured (task, method, side)."""

    task: str
    method: str
    side: str
    score: float | None = None
    """Accuracy or entity F1, in points (0-100)."""
    trainable: int | None = None
    total: int | None = None
    """Parameters of the plain full-precision model with its head (the denominator of the trainable share)."""
    seconds: float | None = None
    lr: float | None = None
    train_rows: int | None = None
    steps: int | None = None
    final_loss: float | None = None
    """Mean training loss over the last 10% of steps."""
    head_checksum: float | None = None
    """Sum of the new head's initial weights: equal on both sides when the seeding holds."""
    error: str | None = None


# -- data ---------------------------------------------------------------------------------------------------
def load_task(
    task: Task, data: Path, tokenizer, train_rows: int | None, eval_rows: int | None, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[list[str]] | None]:
    """Encoded train examples (a seeded random subset of ``train_rows``), encoded eval examples, and for tagging the
    eval rows' full gold tag sequences."""
    from deltatune.data.load import Row, read_rows
    from deltatune.data.tasks import encode_cls, encode_tag

    folder = data / task.name
    train, test = read_rows(str(folder / task.train)), read_rows(str(folder / task.eval))
    if train_rows is not None and train_rows < len(train):
        train = random.Random(seed).sample(train, train_rows)
    if eval_rows is not None:
        test = test[:eval_rows]

    def encode(rows: list[Row]) -> list[dict[str, Any]]:
        if task.kind == "cls":
            labels = {i: i for i in range(task.num_labels)}
            return encode_cls(rows, tokenizer, "text", "label", labels, task.max_length).examples
        return encode_tag(rows, tokenizer, "tokens", "ner_tags", WNUT_IDS, task.max_length).examples

    gold = [r.get("ner_tags") for r in test] if task.kind == "tag" else None
    return encode(train), encode(test), gold


# -- models and configs ---------------------------------------------------------------------------------------
def method_config(method: str, side: str, task_type: str) -> Any:
    """The config of ``method`` for ``side``: common.method_config for MiniLM (the same hyper-parameters on both
    sides, the bench's), with ``FIELDS`` over it; ``lora-4bit`` is LoRA's config, the 4-bit base is built by
    ``build``."""
    return common.method_config(method, side, task_type, **common.MODULES["minilm"], fields=FIELDS)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def _head(model: nn.Module) -> nn.Module:
    return model.get_submodule("classifier")


def build(task: Task, method: str, side: str, seed: int) -> tuple[nn.Module, int, float]:
    """The model ready to train, the plain model's parameter count, and the checksum of the head's initial weight."""
    from deltatune.train.models import auto_class, resolve_path
    from deltatune.train.table import TASK_OF_STAGE

    task_type = TASK_OF_STAGE[task.kind]  # cls: SEQ_CLS, tag: TOKEN_CLS
    auto = auto_class(task_type)
    kwargs: dict[str, Any] = {"num_labels": task.num_labels}
    if task.kind == "tag":
        kwargs["id2label"] = dict(enumerate(WNUT_TAGS))
        kwargs["label2id"] = WNUT_IDS
    if method in common.QUANTIZED and side == "peft":
        # deltatune.quantize keeps the task head and the pooler in full precision; so does this side
        kwargs["quantization_config"] = common.bnb_config(torch.float32, skip=["classifier", "pooler.dense"])
        kwargs["device_map"] = "cpu"
    torch.manual_seed(seed)
    base = auto.from_pretrained(resolve_path("minilm"), **kwargs)
    checksum = float(_head(base).weight.detach().float().sum())
    total = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    if method in common.QUANTIZED:  # the 4-bit model counts packed bytes; the share is of the plain model's parameters
        total = sum(p.numel() for p in auto.from_pretrained(resolve_path("minilm"), **_plain(kwargs)).parameters())
    torch.manual_seed(seed)  # the adapters' init draws from the same state on both sides
    if side == "peft" and method == "full":
        return base.requires_grad_(True), total, checksum
    config = method_config(method, side, task_type)
    if side == "deltatune":
        import deltatune as dt

        if method in common.QUANTIZED:
            dt.quantize(base, bits=4)
            dt.prepare_for_kbit_training(base, use_gradient_checkpointing=False)
        return dt.get_delta_model(base, config), total, checksum
    import peft

    if method in common.QUANTIZED:
        peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return peft.get_peft_model(base, config), total, checksum


def _plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}


# -- training and evaluation ----------------------------------------------------------------------------------
def _batches(examples: list[dict[str, Any]], order: list[int], size: int, collate) -> Any:
    for start in range(0, len(order), size):
        yield collate([examples[i] for i in order[start : start + size]])


def length_grouped(examples: list[dict[str, Any]], rng: torch.Generator) -> list[int]:
    """A seeded random order in which each run of ``BATCH`` rows has similar lengths, so little of a batch is padding
    (transformers' ``group_by_length``): shuffle, sort each mega-batch of ``GROUP`` batches by length (longest
    first), cut it into batches, shuffle the batches."""
    order = torch.randperm(len(examples), generator=rng).tolist()
    batches: list[list[int]] = []
    for start in range(0, len(order), GROUP * BATCH):
        group = sorted(order[start : start + GROUP * BATCH], key=lambda i: -len(examples[i]["input_ids"]))
        batches += [group[i : i + BATCH] for i in range(0, len(group), BATCH)]
    return [i for b in torch.randperm(len(batches), generator=rng).tolist() for i in batches[b]]


def train(
    model: nn.Module,
    examples: list[dict[str, Any]],
    lr: float,
    epochs: int,
    seed: int,
    pad_id: int,
    max_grad_norm: float | None = None,
) -> tuple[int, float]:
    """The shared loop (module docstring); returns the number of steps and the mean loss of the last 10% of them.
    ``max_grad_norm`` clips the gradients' global norm before each step (the transformers Trainer's default is 1.0)."""
    from transformers import get_linear_schedule_with_warmup

    from deltatune.data.tasks import Collator

    collate = Collator(pad_id)
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    steps = epochs * math.ceil(len(examples) / BATCH)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(WARMUP * steps), steps)
    order_rng = torch.Generator().manual_seed(seed)  # the data order, apart from the global RNG: equal on both sides
    torch.manual_seed(seed)  # dropout
    model.train()
    batches = (
        batch
        for _ in range(epochs)
        for batch in _batches(examples, length_grouped(examples, order_rng), BATCH, collate)
    )
    losses = common.train_loop(model, batches, opt, sched=sched, max_grad_norm=max_grad_norm)
    if not math.isfinite(losses[-1]):
        raise RuntimeError(f"non-finite training loss {losses[-1]}")
    tail = losses[-max(1, len(losses) // 10) :]
    return steps, sum(tail) / len(tail)


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, examples: list[dict[str, Any]], gold: list[list[str]] | None, pad_id: int
) -> float:
    """Accuracy, or entity-level F1, in points."""
    from deltatune.data.tasks import Collator
    from deltatune.train.metrics import accuracy, entity_prf

    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # little padding
    found: list[Any] = []
    for batch in _batches(examples, order, EVAL_BATCH, Collator(pad_id)):
        labels = batch.pop("labels")
        logits = model(**batch).logits
        if task.kind == "cls":
            found += logits.argmax(-1).tolist()
            continue
        logits = logits[:, -labels.shape[1] :]  # a method that prepends virtual tokens may return their logits too
        for row_pred, row_labels in zip(logits.argmax(-1), labels):
            found.append([WNUT_TAGS[p] for p, t in zip(row_pred.tolist(), row_labels.tolist()) if t != -100])
    preds: list[Any] = [None] * len(examples)
    for position, i in enumerate(order):
        preds[i] = found[position]
    if task.kind == "cls":
        return 100 * accuracy(preds, [ex["labels"] for ex in examples])
    assert gold is not None
    padded = [p + ["O"] * (len(g) - len(p)) for p, g in zip(preds, gold)]  # words cut by max_length: "O"
    return 100 * entity_prf(padded, gold)["f1"]


def run_cell(task: Task, method: str, side: str, data: tuple, args: argparse.Namespace, pad_id: int) -> Cell:
    cell = Cell(task.name, method, side, lr=args.lr[method], train_rows=len(data[0]))
    start = time.perf_counter()
    try:
        model, cell.total, cell.head_checksum = build(task, method, side, args.seed)
        cell.trainable = _trainable(model)
        cell.steps, cell.final_loss = train(
            model, data[0], args.lr[method], args.epochs, args.seed, pad_id, args.max_grad_norm
        )
        cell.score = evaluate(model, task, data[1], data[2], pad_id)
    except Exception as exc:  # one failing cell (e.g. a missing kernel) leaves the others standing
        cell.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    cell.seconds = time.perf_counter() - start
    return cell


# -- report ---------------------------------------------------------------------------------------------------
def _fmt(x: float | None, sign: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.1f}" if sign else f"{x:.1f}"


def _versions() -> str:
    names = ("deltatune", "peft", "torch", "transformers", "bitsandbytes")
    found = []
    for n in names:
        try:
            found.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            found.append(f"{n} (not installed)")
    return ", ".join(found)


def report(cells: list[Cell], args: argparse.Namespace, command: str, wall: float) -> str:
    lines = [
        "# Quality: deltatune beside peft on the real MiniLM-L6 encoder",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {_versions()}; python {platform.python_version()}; "
        f"{torch.get_num_threads()} torch thread(s), CPU; total wall time {wall / 60:.1f} min.",
        "",
        "## Protocol",
        "",
        f"Seed {args.seed}; at most {args.train_rows or 'all'} training rows per task (seeded random subset), "
        f"{args.epochs} epoch(s), batch {BATCH}, AdamW (weight decay {WEIGHT_DECAY}), linear schedule with "
        f"{WARMUP:.0%} warm-up, "
        f"{'no gradient clipping' if args.max_grad_norm is None else f'gradients clipped to norm {args.max_grad_norm:g}'}"
        "; the learning rate per method is in the tables (the same on both sides). Both sides "
        "start from the same seeded head and see the same batches in the same order. Evaluation on the whole "
        f"held-out split{'' if args.eval_rows is None else f' (first {args.eval_rows} rows only)'}. Method "
        "definitions and the rest of the protocol: the docstring of benchmarks/quality.py.",
        "",
        "Columns: trainable parameters (share of the plain model's, head included); the metric of each side in "
        "points; d - p = deltatune minus peft; vs full = the deltatune method minus deltatune's full fine-tuning; "
        "final loss = mean training loss over the last 10% of steps (deltatune / peft); time = seconds per cell "
        "(deltatune / peft), build + train + evaluate.",
    ]
    by_key = {(c.task, c.method, c.side): c for c in cells}
    for task_name in dict.fromkeys(c.task for c in cells):
        task = TASKS[task_name]
        full = by_key.get((task_name, "full", "deltatune"))
        first = next(c for c in cells if c.task == task_name)
        lines += ["", f"## {task_name}: {task.metric}", ""]
        if first.train_rows is not None and first.steps is not None:
            lines += [f"{first.train_rows} training rows, {first.steps} steps per cell.", ""]
        lines += [
            "| method | lr | trainable params | deltatune | peft | d - p | vs full | final loss | time (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for method in dict.fromkeys(c.method for c in cells if c.task == task_name):
            d, p = by_key.get((task_name, method, "deltatune")), by_key.get((task_name, method, "peft"))
            ref = d or p
            assert ref is not None
            trainable = ""
            if ref.trainable is not None and ref.total:
                trainable = f"{ref.trainable:,} ({100 * ref.trainable / ref.total:.2f}%)"
                if d and p and p.trainable is not None and p.trainable != d.trainable:
                    trainable += f"; peft {p.trainable:,}"
            diff = d.score - p.score if d and p and d.score is not None and p.score is not None else None
            vs_full = None
            if d and full and d.score is not None and full.score is not None and method != "full":
                vs_full = d.score - full.score
            times = " / ".join(f"{c.seconds:.0f}" if c and c.seconds is not None else "-" for c in (d, p))
            losses = " / ".join(f"{c.final_loss:.3f}" if c and c.final_loss is not None else "-" for c in (d, p))
            lines.append(
                f"| {method} | {args.lr[method]:g} | {trainable} | {_fmt(d.score if d else None)} | "
                f"{_fmt(p.score if p else None)} | {_fmt(diff, True)} | {_fmt(vs_full, True)} | {losses} | {times} |"
            )
    errors = [c for c in cells if c.error]
    if errors:
        lines += ["", "## Failed cells", ""]
        lines += [f"- {c.task} / {c.method} / {c.side}: {c.error}" for c in errors]
    return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", help=f"comma-separated, from {', '.join(TASKS)} (default sst2,trec)")
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default all)")
    parser.add_argument("--sides", default=",".join(SIDES), help="deltatune, peft or both")
    parser.add_argument("--train-rows", type=int, default=2400, help="training rows per task (seeded subset)")
    parser.add_argument("--eval-rows", type=int, default=None, help="first N evaluation rows (default: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-grad-norm", type=float, default=None, help="clip the gradient norm to this (default: no clipping)"
    )
    parser.add_argument("--lr", default="", help="learning rates other than LR's, e.g. lora=1e-3,full=1e-4")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None, help="markdown report (default: stdout only)")
    parser.add_argument("--json", type=Path, default=None, help="every cell's figures as JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: sst2, LoRA, 16 train and 32 eval rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.methods = args.tasks or "sst2", args.methods or "lora"
        args.train_rows, args.eval_rows, args.epochs = 16, args.eval_rows or 32, 1
    args.tasks, args.methods = args.tasks or "sst2,trec", args.methods or ",".join(METHODS)
    try:
        args.tasks = common.pick(args.tasks, TASKS, "task")
        args.methods = common.pick(args.methods, METHODS)
        args.sides = common.pick(args.sides, SIDES, "side")
        pairs = [item.split("=", 1) for item in args.lr.split(",") if item.strip()]
        args.lr = {**LR, **{common.pick(k, METHODS)[0]: float(v) for k, v in pairs}}
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> list[Cell]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    from deltatune.train.models import load_tokenizer

    transformers.logging.set_verbosity_error()  # the new head's "newly initialised" load report, once per cell
    transformers.utils.logging.disable_progress_bar()

    tokenizer = load_tokenizer("minilm")
    command = " ".join([".venv/bin/python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    start, cells = time.perf_counter(), []
    for name in args.tasks:
        task = TASKS[name]
        data = load_task(task, args.data, tokenizer, args.train_rows, args.eval_rows, args.seed)
        for method in args.methods:
            for side in args.sides:
                if side == "peft" and method != "full" and not common.peft_has(method):
                    continue
                cell = run_cell(task, method, side, data, args, tokenizer.pad_token_id)
                cells.append(cell)
                print(
                    f"{name:7} {method:19} {side:9} score {_fmt(cell.score):>5} loss "
                    f"{cell.final_loss if cell.final_loss is None else round(cell.final_loss, 3)} "
                    f"{cell.seconds:.0f}s {cell.error or ''}",
                    flush=True,
                )
                if args.json:  # written as it goes, so a long run that stops keeps its cells
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps([asdict(c) for c in cells], indent=1))
    text = report(cells, args, command, time.perf_counter() - start)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return cells


if __name__ == "__main__":
    main()
