"""The fused causal-LM cross-entropy (deltatune.loss) against transformers' own, in one process, interleaved.

    .venv/bin/python benchmarks/fused_loss.py --dtype float32 --threads 1
    .venv/bin/python benchmarks/fused_loss.py --dtype bfloat16 --threads 1
    .venv/bin/python benchmarks/fused_loss.py --quick                      # smoke test: tiny shapes, seconds

The harness's ~60M Llama (batch 4 x seq 512, vocab 32000) with LoRA r 8 on q+v: training steps (forward,
backward, AdamW) alternate between the fused loss installed and transformers' ``ForCausalLMLoss``, the order
swapped every round, one warm-up round. Reports the median step of each and the median of the per-round ratios
fused / transformers, and checks that both give the same loss.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_worker as bw  # noqa: E402
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=common.at_least(1), default=None, help="timed rounds (default 6; --quick: 1)")
    parser.add_argument(
        "--threads", type=common.at_least(1), default=None, help="torch threads (default: torch's own)"
    )
    parser.add_argument("--quick", action="store_true", help="a 2-layer hidden-64 Llama: checks the script")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import deltatune as dt
    from deltatune import loss

    rounds = args.rounds or (1 if args.quick else 6)
    dims = bw.LLAMA_TINY if args.quick else bw.LLAMA_60M
    shape = bw.Shape(
        "llama", batch=2 if args.quick else 4, seq=32 if args.quick else 512, dtype=args.dtype, model=dims
    )
    base, batch, task_type = bw.build(shape, torch.device("cpu"), 0)
    config = common.method_config("lora", "deltatune", task_type, **common.MODULES["llama"])
    model = dt.get_delta_model(base, config, fused_loss=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(fused: bool) -> tuple[float, float]:
        (loss.install if fused else loss.uninstall)(base)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        value = model(**batch).loss
        value.backward()
        opt.step()
        return time.perf_counter() - start, value.item()

    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(rounds + 1):
        order = (True, False) if i % 2 else (False, True)
        got = {fused: step(fused) for fused in order}
        if i:
            for fused, (seconds, _) in got.items():
                times[fused].append(seconds)
    # the same loss from both on one batch (no update in between)
    with torch.no_grad():
        model.eval()
        losses = []
        for fused in (True, False):
            (loss.install if fused else loss.uninstall)(base)
            losses.append(model(**batch).loss.item())
    ratio = statistics.median(a / b for a, b in zip(times[True], times[False]))
    print(
        f"Llama {'tiny' if args.quick else '~60M'}, batch {shape.batch} x seq {shape.seq}, {args.dtype}, LoRA r 8 q+v, "
        f"torch threads {torch.get_num_threads()}, {rounds} rounds\n"
        f"| loss | step s (median) |\n| --- | ---: |\n"
        f"| transformers ForCausalLMLoss | {statistics.median(times[False]):.3f} |\n"
        f"| deltatune fused | {statistics.median(times[True]):.3f} |\n"
        f"fused / transformers (median of per-round ratios): {ratio:.3f}; "
        f"loss {losses[0]:.6f} vs {losses[1]:.6f}"
    )
    return 0 if abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[1])) else 1


if __name__ == "__main__":
    sys.exit(main())
