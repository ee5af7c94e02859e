"""Mixed-adapter batches: throughput of a batch whose rows use 4 different LoRA adapters, against the same batch
with one adapter for every row, in one process, the two interleaved.

    .venv/bin/python benchmarks/mixed_batch.py                      # MiniLM (real weights), batch 32 x 128
    .venv/bin/python benchmarks/mixed_batch.py --config llama-fp32  # the ~60M Llama of the harness, 4 x 512
    .venv/bin/python benchmarks/mixed_batch.py --quick              # smoke test: tiny shapes, seconds

Four LoRA adapters (r 8, alpha 16, q+v as in ``python benchmarks/bench.py``, each with its own random B so that none is
zero) sit in one DeltaModel. Per round, in alternating order: a forward (inference, no grad, eval mode) and a
training step (forward + backward, the gradients of the adapters in use) on the whole batch, once with
``adapter_names`` cycling through the four adapters row by row and once with the single active adapter. The
report gives the median time of each and the ratio single / mixed (the mixed batch's relative throughput; the
target is >= 0.8).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_worker as bw  # noqa: E402
import common  # noqa: E402

ADAPTERS = ["a", "b", "c", "d"]


def with_loras(base, task_type: str, kind: str, names: list[str]):
    """A DeltaModel over ``base`` with a LoRA per name (r 8, q+v, random B so that each changes the output), all
    active and trainable."""
    import deltatune as dt

    model = None
    for name in names:
        cfg = common.method_config("lora", "deltatune", task_type, **common.MODULES[kind])
        cfg.init_lora_weights = False
        if model is None:
            model = dt.get_delta_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    model.set_adapter(names)
    return model


def build(config: str, quick: bool, seed: int = 0):
    """A DeltaModel with the four adapters (all trainable), the batch, and the per-row names of the mixed batch."""
    shape = (bw.QUICK if quick else bw.SHAPES)[config]
    base, batch, task_type = bw.build(shape, torch.device("cpu"), seed)
    model = with_loras(base, task_type, shape.kind, ADAPTERS)  # the single-adapter runs route every row to "a"
    rows = batch["input_ids"].shape[0]
    mixed = [ADAPTERS[i % len(ADAPTERS)] for i in range(rows)]
    return model, batch, mixed, shape


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def passes(model, batch: dict):
    """(forward, train): an inference forward (eval mode, no grad) and a training forward + backward of ``batch``,
    each taking the rows' adapter names."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward(names: list[str]) -> None:
        model.eval()
        with torch.no_grad():
            model(**inputs, adapter_names=names)

    def train(names: list[str]) -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        model(**batch, adapter_names=names).loss.backward()

    return forward, train


def measure(model, batch: dict, mixed: list[str], rounds: int) -> dict[str, dict[str, list[float]]]:
    """{"forward"|"train": {"single"|"mixed": [ms, ...]}}, one warm-up round first, the order alternating."""
    single = [ADAPTERS[0]] * len(mixed)
    out: dict[str, dict[str, list[float]]] = {
        "forward": {"single": [], "mixed": []},
        "train": {"single": [], "mixed": []},
    }
    forward, train = passes(model, batch)
    for i in range(rounds + 1):
        order = [("single", single), ("mixed", mixed)]
        for kind, names in order if i % 2 else order[::-1]:
            for what, fn in (("forward", forward), ("train", train)):
                ms = _time(lambda fn=fn, names=names: fn(names))
                if i:
                    out[what][kind].append(ms)
    return out


def report(times: dict[str, dict[str, list[float]]], config: str, shape, rounds: int, command: str) -> str:
    lines = [
        "## Mixed-adapter batches",
        "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        f"- Configuration: {config}, batch {shape.batch} x seq {shape.seq}, {shape.dtype}; 4 LoRA adapters "
        f"(r 8, q+v); {rounds} rounds after 1 warm-up, single and mixed alternating; torch threads "
        f"{torch.get_num_threads()}; Python {platform.python_version()}, torch {torch.__version__}",
        "",
        "| pass | single adapter ms | 4 adapters mixed ms | mixed throughput / single |",
        "| --- | ---: | ---: | ---: |",
    ]
    for what, label in (("forward", "inference forward"), ("train", "training forward + backward")):
        s, m = statistics.median(times[what]["single"]), statistics.median(times[what]["mixed"])
        lines.append(f"| {label} | {s:,.1f} | {m:,.1f} | {s / m:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = common.in_process_options("mixed_batch.py", __doc__, argv, default="minilm", rounds=8)
    model, batch, mixed, shape = build(args.config, args.quick)
    times = measure(model, batch, mixed, args.rounds)
    text = report(times, args.config, shape, args.rounds, args.command)
    common.emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
