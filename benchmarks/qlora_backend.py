"""Which 4-bit backend is faster here: forward + backward of one 512x512 NF4 layer, torchao against bitsandbytes.

    .venv/bin/python benchmarks/qlora_backend.py [--tokens 64 512] [--repeats 50] [--device cpu]

Times deltatune's Linear4bit with each backend (and a plain frozen nn.Linear for scale) on the same weight and
input: out = layer(x); out.sum().backward(), x requiring grad as in LoRA training. The runs of the backends are
interleaved so a busy machine slows all of them alike; the fastest and the median of the repeats are printed (ms):
on a shared machine the fastest run is the steadier figure of what the code itself costs.
Results and the choice they support: docs/BENCHMARKS.md, "QLoRA backend".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from deltatune.methods.quant import Linear4bit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    layer(x).sum().backward()
    x.grad = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=common.at_least(1), nargs="+", default=[64, 512])
    parser.add_argument("--repeats", type=common.at_least(1), default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=common.at_least(1), default=512)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.dim}x{args.dim} layer"
    )
    print(f"{'dtype':>9} {'tokens':>6} {'torchao':>15} {'bnb':>15} {'dense':>15}   (ms fwd+bwd: fastest / median)")
    for dtype in (torch.float32, torch.bfloat16):
        base = nn.Linear(args.dim, args.dim, device=device).requires_grad_(False)
        layers = {
            "torchao": Linear4bit.from_linear(base, dtype, "torchao"),
            "bitsandbytes": Linear4bit.from_linear(base, dtype, "bitsandbytes"),
            "dense": nn.Linear(args.dim, args.dim, device=device, dtype=dtype).requires_grad_(False),
        }
        for tokens in args.tokens:
            x = torch.randn(tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
            times: dict[str, list[float]] = {k: [] for k in layers}
            for _ in range(3):  # warm-up
                for layer in layers.values():
                    _step(layer, x)
            for _ in range(args.repeats):
                for name, layer in layers.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    _step(layer, x)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - start) * 1e3)
            cells = " ".join(f"{min(v):7.2f}/{statistics.median(v):7.2f}" for v in times.values())
            print(f"{str(dtype).removeprefix('torch.'):>9} {tokens:>6} {cells}")


if __name__ == "__main__":
    main()
