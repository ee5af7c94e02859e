"""How cost grows with the work, on the real SmolLM2-135M-Instruct: a training step's time and peak memory against
sequence length, and mixed-adapter batches against the number of adapters in them.

    .venv/bin/python benchmarks/scaling.py --out docs/scaling.md          # both parts; PNGs next to --out
    .venv/bin/python benchmarks/scaling.py --part length --lengths 128,512,2048
    .venv/bin/python benchmarks/scaling.py --quick                        # smoke test: a tiny Llama, seconds

**Length.** For each sequence length (batch 1) and each variant: LoRA (r 8, q+v) with deltatune and with peft, full
fine-tuning of the plain transformers model, and both LoRAs with gradient checkpointing (non-reentrant). Each
(variant, length) runs in a fresh process (the variants in turn reversed from one length to the next), so its peak
RSS is its own: the median of ``--steps`` timed training steps (forward, backward, AdamW) after one warm-up, and the
peak RSS of the steps above the RSS before them (the activations, gradients and optimizer state; the weights are
counted out). The report fits time and memory to a + b*L + c*L^2 (least squares) and states the growth: the share
of the quadratic term at the longest length.

**Adapters.** One DeltaModel holding 64 LoRA adapters (random B, so each changes the output); the same batch runs
with every row on one adapter and with the rows spread over k = 1, 4, 16, 64 adapters (``adapter_names``), the
orders balanced over the rounds (``common.balanced_orders``), in one process: throughput relative to the single
adapter, for inference forwards and training steps, and the peak RSS of each pass over the model's resting RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_worker as bw  # noqa: E402
import common  # noqa: E402
import mixed_batch  # noqa: E402

VARIANTS = {  # name: (side, method, gradient checkpointing)
    "lora deltatune": ("deltatune", "lora", False),
    "lora peft": ("peft", "lora", False),
    "full": ("torch", "full", False),
    "lora deltatune + ckpt": ("deltatune", "lora", True),
    "lora peft + ckpt": ("peft", "lora", True),
}
LENGTHS = (128, 256, 512, 1024, 2048)
COUNTS = (1, 4, 16, 64)


def _shape(quick: bool, dtype: str, batch: int, seq: int) -> bw.Shape:
    if quick:
        return bw.Shape("llama", batch=batch, seq=seq, dtype=dtype, model=bw.LLAMA_TINY)
    return bw.Shape("smollm2", batch=batch, seq=seq, dtype=dtype)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- length: one process per (variant, length) -----------------------------------------------------------------
def length_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and memory of training steps for one variant at one length (runs in its own process)."""
    side, method, ckpt = VARIANTS[spec["variant"]]
    shape = _shape(spec["quick"], spec["dtype"], 1, spec["seq"])
    device = torch.device("cpu")
    base, batch, task_type = bw.build(shape, device, 0)
    base.config.use_cache = False
    if ckpt:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if side == "torch":
        model = base.requires_grad_(True)
    else:
        config = common.method_config(method, side, task_type, **common.MODULES[shape.kind])
        if side == "deltatune":
            import deltatune as dt

            model = dt.get_delta_model(base, config)
        else:
            import peft

            model = peft.get_peft_model(base, config, autocast_adapter_dtype=False)
    run = bw.Spec(config="scaling", method=method, side=side, warmup=1, steps=spec["steps"])
    bw._reset_peak(device)
    resting = _rss_mib()
    times = bw.train_steps(model, batch, run, device)
    return {**spec, "step_ms": statistics.median(times), "peak_mib": bw._peak_mib(device) - resting}


def run_lengths(a: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for i, seq in enumerate(a.lengths):
        # every other length in the reverse order: "lora deltatune" always ran one process before "lora peft"
        for variant in a.variants if i % 2 == 0 else a.variants[::-1]:
            spec = {"variant": variant, "seq": seq, "steps": a.steps, "dtype": a.dtype, "quick": a.quick}
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)} if a.threads else None
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, env=env)  # fmt: skip
            if done.returncode != 0:
                said = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]  # killed: no stderr
                raise SystemExit(f"scaling.py: {variant} at {seq}: {said[-1]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{variant:24s} L={seq:5d} step {r['step_ms']:9.1f} ms  peak +{r['peak_mib']:8.1f} MiB", flush=True)
    return results


def fit(lengths: list[int], values: list[float]) -> tuple[float, float, float]:
    """Least-squares a + b*L + c*L^2 (fewer than 3 points: a line through them)."""
    x = torch.tensor(lengths, dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)
    cols = [torch.ones_like(x), x, x * x] if len(lengths) >= 3 else [torch.ones_like(x), x]
    coef = torch.linalg.lstsq(torch.stack(cols, 1), y.unsqueeze(1)).solution.squeeze(1).tolist()
    return (coef + [0.0])[:3] if len(coef) == 2 else tuple(coef)  # type: ignore[return-value]


def growth(lengths: list[int], values: list[float], unit: str) -> str:
    if len(set(lengths)) < 2:  # a line through one point is any line: lstsq's minimum-norm pick read as "linear"
        return "one length: no fit"
    a, b, c = fit(lengths, values)
    top = max(lengths)
    share = c * top * top / max(a + b * top + c * top * top, 1e-12)
    kind = "quadratic" if share > 0.25 else "linear"
    return (f"{kind} ({share:.0%} quadratic at L={top}): {a:,.1f} + {b * 1e3:,.2f} x + {c * 1e6:,.3f} x^2 {unit}, "
            "x = L / 1000")  # fmt: skip


def length_report(results: list[dict[str, Any]], png: str | None) -> str:
    lengths = sorted({r["seq"] for r in results})
    variants = list(dict.fromkeys(r["variant"] for r in results))
    by = {(r["variant"], r["seq"]): r for r in results}
    head = "| variant | " + " | ".join(f"L={n}" for n in lengths) + " | fitted growth |"
    lines = ["### Step time (ms, median) against sequence length", "", head, "|---|" + "---:|" * len(lengths) + "---|"]
    for v in variants:
        vals = [by[v, n]["step_ms"] for n in lengths]
        lines.append(f"| {v} | " + " | ".join(f"{x:,.0f}" for x in vals) + f" | {growth(lengths, vals, 'ms')} |")
    lines += ["", "### Peak memory above the resting RSS (MiB) against sequence length", "", head,
              "|---|" + "---:|" * len(lengths) + "---|"]  # fmt: skip
    for v in variants:
        vals = [by[v, n]["peak_mib"] for n in lengths]
        lines.append(f"| {v} | " + " | ".join(f"{x:,.0f}" for x in vals) + f" | {growth(lengths, vals, 'MiB')} |")
    if "lora peft" in variants and "lora deltatune" in variants:
        ratios = [by["lora deltatune", n]["step_ms"] / by["lora peft", n]["step_ms"] for n in lengths]
        mem = [by["lora deltatune", n]["peak_mib"] / max(by["lora peft", n]["peak_mib"], 1e-9) for n in lengths]
        lines += ["", "deltatune / peft LoRA, step time: " + ", ".join(f"{x:.2f}" for x in ratios)
                  + "; peak memory: " + ", ".join(f"{x:.2f}" for x in mem) + " (by length)."]  # fmt: skip
    if png:
        _plot(png, lengths, variants, by)
        lines += ["", f"![step time and memory against length]({os.path.basename(png)})"]
    return "\n".join(lines)


def _plot(png: str, lengths: list[int], variants: list[str], by: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for v in variants:
        axes[0].plot(lengths, [by[v, n]["step_ms"] / 1000 for n in lengths], "o-", label=v)
        axes[1].plot(lengths, [by[v, n]["peak_mib"] for n in lengths], "o-", label=v)
    for ax, label in zip(axes, ("training step (s)", "peak memory above resting (MiB)")):
        ax.set_xlabel("sequence length (batch 1)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: cost against sequence length")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# -- adapters: one process, the counts' orders balanced over the rounds -------------------------------------------
def run_adapters(a: argparse.Namespace) -> dict[str, Any]:
    shape = _shape(a.quick, a.dtype, a.rows, a.adapter_seq)
    base, batch, task_type = bw.build(shape, torch.device("cpu"), 0)
    base.config.use_cache = False
    names = [f"a{i}" for i in range(max(a.counts))]
    model = mixed_batch.with_loras(base, task_type, shape.kind, names)
    rows = shape.batch
    routes = {k: [names[i % k] for i in range(rows)] for k in a.counts}
    times: dict[tuple[str, int], list[float]] = {}
    peaks: dict[tuple[str, int], float] = {}

    forward, train = mixed_batch.passes(model, batch)
    orders = common.balanced_orders(len(a.counts))  # a rotation kept k = 4 right after k = 1 every round
    for i in range(a.rounds + 1):
        order = [a.counts[j] for j in orders[max(i - 1, 0) % len(orders)]]
        if i:  # untimed: the round's first count follows its own passes, not the last count of the round before
            train(routes[order[0]])
        for k in order:
            for what, fn in (("forward", forward), ("train", train)):
                bw._reset_peak(torch.device("cpu"))
                resting = _rss_mib()
                start = time.perf_counter()
                fn(routes[k])
                ms = (time.perf_counter() - start) * 1e3
                if i:  # round 0 warms up
                    times.setdefault((what, k), []).append(ms)
                    peaks[what, k] = max(peaks.get((what, k), 0.0), bw._peak_mib(torch.device("cpu")) - resting)
    adapter_mib = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n) / 2**20
    return {"shape": shape, "times": times, "peaks": peaks, "adapter_mib": adapter_mib, "adapters": len(names)}


def adapter_report(r: dict[str, Any], counts: list[int], png: str | None) -> str:
    shape, times, peaks = r["shape"], r["times"], r["peaks"]
    med = {key: statistics.median(v) for key, v in times.items()}
    lines = [f"### Mixed-adapter batches: {shape.batch} rows x {shape.seq} tokens, rows spread over k adapters",
             "", f"The model holds {r['adapters']} LoRA adapters (r 8, q+v; {r['adapter_mib']:.1f} MiB of adapter "
             "weights in all); k = 1 is the single-adapter batch.", "",
             "| pass | k | median ms | throughput / single | peak above resting MiB |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for what, label in (("forward", "inference forward"), ("train", "training forward + backward")):
        for k in counts:
            rel = med[what, counts[0]] / med[what, k]
            lines.append(f"| {label} | {k} | {med[what, k]:,.1f} | {rel:.2f} | {peaks[what, k]:,.0f} |")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        for what, label in (("forward", "inference forward"), ("train", "training step")):
            ax.plot(counts, [med[what, counts[0]] / med[what, k] for k in counts], "o-", label=label)
        ax.axhline(0.7, color="grey", ls="--", lw=1, label="target 0.7")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters in the batch (k)")
        ax.set_ylabel("throughput / single adapter")
        ax.set_ylim(0, 1.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)
        lines += ["", f"![throughput against adapters]({os.path.basename(png)})"]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["both", "length", "adapters"], default="both")
    p.add_argument("--lengths", type=_ints, default=list(LENGTHS))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=common.at_least(1), default=3, help="timed training steps per (variant, length)")
    p.add_argument("--counts", type=_ints, default=list(COUNTS), help="adapters per mixed batch (the first: single)")
    p.add_argument("--rows", type=common.at_least(1), default=64, help="rows of the mixed batch")
    p.add_argument("--adapter-seq", type=common.at_least(1), default=32, help="tokens per row of the mixed batch")
    p.add_argument(
        "--rounds",
        type=common.at_least(1),
        help="timed rounds of the adapter part, after one warm-up (default: one whole cycle of the balanced orders, "
        "as many rounds as --counts has counts, twice that for an odd number above 1; the orders balance over whole cycles)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=common.at_least(1), help="torch threads")
    p.add_argument("--quick", action="store_true", help="a tiny random Llama and small sizes: checks the script")
    p.add_argument("--out", help="also write the report here (PNGs next to it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    common.check_out(p, "--out", a.out)
    if a.worker:
        if a.threads:
            torch.set_num_threads(a.threads)
        print(json.dumps(length_worker(json.loads(a.worker))))
        return 0
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if a.quick:
        a.lengths, a.steps, a.rows, a.adapter_seq, a.rounds = [16, 32], 1, 8, 8, 1
        a.counts = [k for k in a.counts if k <= 8] or [1]
    a.rounds = a.rounds or len(common.balanced_orders(len(a.counts)))
    if a.part != "length" and a.counts[0] != 1:  # the report's "throughput / single" divides by the first count's
        p.error(
            f"--counts: the first is the single-adapter batch the others are measured against; 1, not {a.counts[0]}"
        )
    if a.part != "length" and max(a.counts) > a.rows:
        p.error(f"--counts: {max(a.counts)} adapters in a batch of --rows {a.rows}; at most one adapter per row")
    if a.threads:
        torch.set_num_threads(a.threads)
    stem = os.path.splitext(os.path.realpath(a.out))[0] if a.out else None  # (the folder check_out checked)
    command = " ".join(["python", "benchmarks/scaling.py", *(sys.argv[1:] if argv is None else argv)])
    parts = [
        "## How cost grows: sequence length and mixed adapters (`benchmarks/scaling.py`)", "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; command: `{command}`",
        f"- {'a tiny random Llama (--quick)' if a.quick else 'SmolLM2-135M-Instruct (real weights)'}, {a.dtype}, "
        f"CPU, torch threads {a.threads or torch.get_num_threads()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}; load average at start {os.getloadavg()[0]:.1f}", "",
    ]  # fmt: skip
    if a.part in ("both", "length"):
        parts.append(length_report(run_lengths(a), f"{stem}-length.png" if stem else None))
        parts.append("")
    if a.part in ("both", "adapters"):
        parts.append(adapter_report(run_adapters(a), a.counts, f"{stem}-adapters.png" if stem else None))
    common.emit("\n".join(parts) + "\n", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
