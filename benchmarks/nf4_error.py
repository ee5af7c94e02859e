"""How much of NF4's weight error a rank-r adapter could hold: the question behind a LoftQ init for QLoRA.

    .venv/bin/python benchmarks/nf4_error.py --threads 1        # SmolLM2-135M-Instruct, blocks 3, 15 and 28

For each linear layer W of the chosen blocks, with deltatune's own NF4 (block 64, double quantisation):

- ``nf4``: ||W - deq(Q(W))|| / ||W||, the error the 4-bit base starts with;
- ``top-r``: the share of that error's energy in its r largest singular values (what a rank-r SVD init holds);
- ``loftq``: LoftQ's alternating init (Li et al., 2023; arXiv:2310.08659): ``rounds`` times quantise W - L, then
  L = the rank-r SVD of W - deq(Q); the error left ||W - deq(Q) - L|| over the plain NF4 error;
- ``gaussian``: the NF4 error of a Gaussian weight of the same shape and standard deviation (seeded), the control
  for the next figure;
- ``distinct``: the median number of distinct values in a block of 32 consecutive inputs. The embedded SmolLM2
  comes from a Q4_1 GGUF file (blocks of 32 on a 16-level grid each), so its weights hold at most 16: NF4 quantises
  weights that were 4-bit already, and ``gaussian`` says whether that makes its error larger.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from deltatune.methods.quant import _dequantize_weight, _quantize_weight, resolve_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def nf4_error(weight: torch.Tensor, rank: int, rounds: int, backend: str) -> dict[str, float]:
    """The three figures above for one weight (d_out, d_in)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    w = weight.detach().float()

    def nf4(x: torch.Tensor) -> torch.Tensor:
        return _dequantize_weight(_quantize_weight(x, backend, True), backend).float()

    error = w - nf4(w)
    energy = torch.linalg.svdvals(error) ** 2
    low_rank = torch.zeros_like(w)
    for _ in range(rounds):
        q = nf4(w - low_rank)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        low_rank = u[:, :rank] * s[:rank] @ vh[:rank]
    control = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std()
    blocks = w.reshape(-1, 32) if w.shape[-1] % 32 == 0 else w.reshape(1, -1)
    return {
        "nf4": float(error.norm() / w.norm()),
        "gaussian": float((control - nf4(control)).norm() / control.norm()),
        "distinct": float(statistics.median(len(torch.unique(b)) for b in blocks)),
        "top_r": float(energy[:rank].sum() / energy.sum()),
        "loftq": float((w - q - low_rank).norm() / error.norm()),
    }


def _blocks(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected block indices >= 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=_blocks, default=[3, 15, 28], help="comma-separated block indices")
    parser.add_argument("--rank", type=common.at_least(1), default=8)
    parser.add_argument("--rounds", type=common.at_least(1), default=5)
    parser.add_argument("--threads", type=common.at_least(1), default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from deltatune.train.models import load_model

    model = load_model("smollm2", "CAUSAL_LM", "float32")
    layers = model.config.num_hidden_layers
    if missing := [b for b in args.blocks if b >= layers]:  # no row matched: a median of nothing, after the load
        parser.error(f"--blocks: no block {', '.join(map(str, missing))}; SmolLM2 has blocks 0-{layers - 1}")
    backend = resolve_backend("auto", torch.device("cpu"))
    blocks = {f"layers.{b}." for b in args.blocks}
    print(f"backend {backend}, rank {args.rank}, LoftQ rounds {args.rounds}\n")
    print("| layer | shape | NF4 error | top-r share | LoftQ left / NF4 | NF4 error, Gaussian | distinct / 32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(b in name for b in blocks):
            row = nf4_error(module.weight, args.rank, args.rounds, backend)
            rows.append(row)
            shape = "x".join(map(str, module.weight.shape))
            print(f"| {name} | {shape} | {row['nf4']:.4f} | {row['top_r']:.3f} | {row['loftq']:.3f} | "
                  f"{row['gaussian']:.4f} | {row['distinct']:.0f} |", flush=True)  # fmt: skip
    for key in ("nf4", "top_r", "loftq", "gaussian", "distinct"):
        values = [r[key] for r in rows]
        print(f"\n{key}: median {statistics.median(values):.3f}, range {min(values):.3f}-{max(values):.3f}", end="")
    print()


if __name__ == "__main__":
    main()
