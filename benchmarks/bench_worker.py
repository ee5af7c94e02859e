"""One benchmark process: one model configuration, one method, one side (deltatune, peft, or plain torch).

    .venv/bin/python benchmarks/bench_worker.py '{"config": "llama-fp32", "method": "lora", "side": "peft"}'

Run by ``python benchmarks/bench.py`` in a fresh process per measurement, so that neither the
allocator's caches nor the imports of one run colour the next. The single JSON argument holds the run's
settings (keys and defaults in ``Spec``); the last stdout line is ``BENCH_RESULT {json}``.

In order, on the same seeded base model and the same random batch:

1. forward latency of the bare base model (no grad, eval mode);
2. injection: ``get_delta_model`` or ``get_peft_model`` (wall time; for ``lora-4bit`` (QLoRA) the base is quantised
   first, untimed); the method's config is benchmarks/common.py's, with the model kind's target modules;
3. training: ``warmup`` then ``steps`` timed steps of forward + backward + AdamW step; peak memory of the
   training alone (CPU: the peak resident set size, reset before training through /proc/self/clear_refs;
   CUDA: max allocated); the bytes the model's weights hold (``deltatune.memory_footprint``: 4-bit weights at
   their packed size, constants included);
4. the adapter's files (``save_pretrained``) and their size;
5. forward latency with the adapter unmerged, then ``merge_and_unload`` (timed) and the merged forward,
   for the methods that merge.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULT_PREFIX = "BENCH_RESULT "
MERGEABLE = ("lora", "ia3")
"""Methods whose adapter merges into the base (``merge_and_unload``, timed); not ``lora-4bit``."""


@dataclass
class Spec:
    """What one process measures (the JSON argument)."""

    config: str
    method: str
    side: str
    """One of deltatune, peft, or torch (the full fine-tuning reference: the plain transformers model)."""
    warmup: int = 3
    steps: int = 10
    infer_steps: int = 5
    quick: bool = False
    device: str = "cpu"
    threads: int | None = None
    """torch's intra-op threads; None keeps torch's default (one per core)."""
    seed: int = 0
    fused_loss: bool = False
    """deltatune's side computes a causal LM's loss with ``deltatune.loss``, as ``deltatune train`` runs it."""


@dataclass
class Shape:
    """A model configuration: how to build it and the batch it trains on."""

    kind: str
    """minilm (the real pre-trained MiniLM-L6 encoder, SEQ_CLS), smollm2 (the real SmolLM2-135M-Instruct, embedded,
    CAUSAL_LM) or llama (random weights, CAUSAL_LM)."""
    batch: int
    seq: int
    dtype: str = "float32"
    model: dict[str, Any] = field(default_factory=dict)
    """LlamaConfig fields."""
    compile: bool = False
    gpu_only: bool = False


LLAMA_60M = dict(
    hidden_size=512,
    num_hidden_layers=8,
    intermediate_size=1408,
    vocab_size=32000,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=2048,
)
LLAMA_1B = dict(  # Llama-3.2-1B's shape
    hidden_size=2048,
    num_hidden_layers=16,
    intermediate_size=8192,
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
LLAMA_TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=192,  # a multiple of 64: bitsandbytes' CPU kernels need it for QLoRA
    vocab_size=1024,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)

SHAPES: dict[str, Shape] = {
    "minilm": Shape("minilm", batch=32, seq=128),
    "llama-fp32": Shape("llama", batch=4, seq=512, model=LLAMA_60M),
    "llama-bf16": Shape("llama", batch=4, seq=512, dtype="bfloat16", model=LLAMA_60M),
    "llama1b": Shape("llama", batch=8, seq=1024, dtype="bfloat16", model=LLAMA_1B, gpu_only=True),
    "llama1b-compile": Shape(
        "llama", batch=8, seq=1024, dtype="bfloat16", model=LLAMA_1B, compile=True, gpu_only=True
    ),
    "smollm2-fp32": Shape("smollm2", batch=4, seq=512),
    "smollm2-bf16": Shape("smollm2", batch=4, seq=512, dtype="bfloat16"),
}
"""The configurations ``python benchmarks/bench.py --configs`` names."""

QUICK: dict[str, Shape] = {
    "minilm": Shape("minilm", batch=4, seq=32),
    "llama-fp32": Shape("llama", batch=2, seq=32, model=LLAMA_TINY),
    "llama-bf16": Shape("llama", batch=2, seq=32, dtype="bfloat16", model=LLAMA_TINY),
    "llama1b": Shape("llama", batch=2, seq=64, dtype="bfloat16", model=LLAMA_TINY, gpu_only=True),
    "llama1b-compile": Shape(
        "llama", batch=2, seq=64, dtype="bfloat16", model=LLAMA_TINY, compile=True, gpu_only=True
    ),
    "smollm2-fp32": Shape("smollm2", batch=1, seq=16),
    "smollm2-bf16": Shape("smollm2", batch=1, seq=16, dtype="bfloat16"),
}
"""``--quick``: the same configurations at smoke-test size (the real MiniLM, a tiny Llama)."""


def build(shape: Shape, device: torch.device, seed: int) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    """The seeded base model, one random batch with labels, and the PEFT task type."""
    torch.manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    if shape.kind == "minilm":
        from transformers import AutoModelForSequenceClassification

        from deltatune.train.models import resolve_path

        model = AutoModelForSequenceClassification.from_pretrained(resolve_path("minilm"), num_labels=2, dtype=dtype)
        vocab, task_type = model.config.vocab_size, "SEQ_CLS"
        labels = torch.randint(0, 2, (shape.batch,))
    elif shape.kind == "smollm2":
        from deltatune.train.models import load_model

        model = load_model("smollm2", "CAUSAL_LM", shape.dtype)
        vocab, task_type, labels = model.config.vocab_size, "CAUSAL_LM", None
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(**shape.model, attn_implementation="sdpa")
        with device:  # initialised where it runs: a 1B model's random init on the GPU takes a moment, not minutes
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        vocab, task_type = config.vocab_size, "CAUSAL_LM"
        labels = None
    ids = torch.randint(0, vocab, (shape.batch, shape.seq))  # (batch, seq)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids if labels is None else labels}
    return model.to(device), {k: v.to(device) for k, v in batch.items()}, task_type


def quantize_base(base: nn.Module, side: str, shape: Shape, device: torch.device) -> nn.Module:
    """The base with its linear layers in 4-bit NF4 with double quantisation, as each side's users get it.

    deltatune: ``deltatune.quantize`` in place (its default backend for the device). peft: the model goes through
    transformers' bitsandbytes integration (``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
    from a saved copy), which is how peft's QLoRA users load a base; the LM head stays in full precision on both.
    """
    dtype = getattr(torch, shape.dtype)
    if side == "deltatune":
        from deltatune import quantize

        return quantize(base, bits=4, quant_type="nf4", double_quant=True, compute_dtype=dtype)[0]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # deltatune keeps task heads (and BERT's pooler) in full precision; so does this side
    bnb = common.bnb_config(dtype, skip=["classifier", "pooler.dense"] if shape.kind == "minilm" else None)
    auto = AutoModelForSequenceClassification if shape.kind == "minilm" else AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        return auto.from_pretrained(folder, quantization_config=bnb, dtype=dtype, device_map={"": device})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> bool:
    """Start a new peak-memory window; False when only the whole process's peak is available."""
    gc.collect()  # on both devices: tensors held only by reference cycles (a replaced base) must not count
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    # Hand freed heap pages back first (e.g. the fp32 weights QLoRA replaced), so that RSS counts live memory.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux 4.0+)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def forward_ms(model: nn.Module, batch: dict[str, torch.Tensor], spec: Spec, device: torch.device) -> float:
    """Median forward latency (ms) without labels, in eval mode and without grad, after one warm-up call."""
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    times = []
    with torch.no_grad():
        for i in range(1 + spec.infer_steps):
            _sync(device)
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            if i >= 1:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def train_steps(model: nn.Module, batch: dict[str, torch.Tensor], spec: Spec, device: torch.device) -> list[float]:
    """Times (ms) of the timed training steps: forward + backward + AdamW step, after ``spec.warmup`` untimed ones."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(spec.warmup + spec.steps):
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        _sync(device)
        if i >= spec.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    return times


def _trainable(model: nn.Module) -> int:
    seen: dict[int, int] = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
    return sum(seen.values())


def _folder_mib(folder: str) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20


def _maybe_compile(model: nn.Module, shape: Shape) -> nn.Module:
    return torch.compile(model) if shape.compile else model


def measure(spec: Spec) -> dict[str, Any]:
    """Run the measurements of one process (module docstring) and return them as a dict."""
    shape = (QUICK if spec.quick else SHAPES)[spec.config]
    device = torch.device(spec.device)
    base, batch, task_type = build(shape, device, spec.seed)
    result: dict[str, Any] = {"spec": asdict(spec), "shape": asdict(shape), "tokens_per_step": shape.batch * shape.seq}
    result["total_params"] = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    result["base_forward_ms"] = forward_ms(_maybe_compile(base, shape), batch, spec, device)

    if spec.side == "torch":  # full fine-tuning of the plain transformers model, the reference for "full"
        model = base.requires_grad_(True)
        result["inject_ms"] = None
    else:
        # The library and the config come first, so that only the injection itself is timed.
        lib = importlib.import_module(spec.side)
        config = common.method_config(spec.method, spec.side, task_type, **common.MODULES[shape.kind])
        if spec.method in common.QUANTIZED:
            base = quantize_base(base, spec.side, shape, device)
        _sync(device)
        start = time.perf_counter()
        if spec.side == "deltatune":
            model = lib.get_delta_model(base, config, fused_loss=spec.fused_loss)
        else:
            # autocast_adapter_dtype=False keeps PEFT's adapter weights in the base dtype, as deltatune's are;
            # PEFT's default would train a bf16 model's adapters in float32.
            model = lib.get_peft_model(base, config, autocast_adapter_dtype=False)
        _sync(device)  # the adapters' initialisation kernels run asynchronously on CUDA
        result["inject_ms"] = (time.perf_counter() - start) * 1e3
    result["trainable_params"] = _trainable(model)

    runner = _maybe_compile(model, shape)
    exact_peak = _reset_peak(device)
    times = train_steps(runner, batch, spec, device)
    result["peak_mem_mib"] = _peak_mib(device)
    result["peak_mem_kind"] = "cuda max allocated" if device.type == "cuda" else "RSS" if exact_peak else "process RSS"
    result["step_ms"] = statistics.median(times)
    result["step_ms_all"] = times
    from deltatune import memory_footprint  # counts bitsandbytes' and torchao's 4-bit weights at their packed size

    result["weights"] = asdict(memory_footprint(model))

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        result["adapter_mib"] = _folder_mib(folder)

    result["forward_ms"] = forward_ms(runner, batch, spec, device)
    result["merge_ms"] = result["merged_forward_ms"] = None
    if spec.side != "torch" and spec.method in MERGEABLE:
        _sync(device)
        start = time.perf_counter()
        merged = model.merge_and_unload()
        _sync(device)
        result["merge_ms"] = (time.perf_counter() - start) * 1e3
        result["merged_forward_ms"] = forward_ms(_maybe_compile(merged, shape), batch, spec, device)
    return result


def main(argv: list[str]) -> int:
    spec = Spec(**json.loads(argv[0]))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_worker: CUDA asked for but not available")
    result = measure(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    # Quieter output: the orchestrator keeps stderr for the error message of a failed run.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
