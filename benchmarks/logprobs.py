"""The chunked label log-probs of the preference trainers (deltatune.train.logprobs) against a whole log_softmax.

    .venv/bin/python benchmarks/logprobs.py --threads 2
    .venv/bin/python benchmarks/logprobs.py --quick          # smoke test: tiny shapes, seconds

DPO, KTO, ORPO and SimPO score each sequence by the summed log-probs of its label tokens. The plain way (deltatune's
until 2026-12-02, kept here as the reference) takes one fp32 ``log_softmax`` over the whole (batch, tokens, vocab)
logits. On the logits alone, without a model (SmolLM2's shape: a DPO batch of 8 pairs = 16 sequences x 256 tokens,
vocabulary 49,152), each way runs forward + backward with a per-position upstream gradient:

- peak memory: each way in a fresh process, the peak RSS (``VmHWM``, reset once the logits exist) above the RSS then;
- time: in one process, the two alternating, the order swapped each round; medians.

Checks that both give the same log-probs and gradients.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPE = {"full": (16, 256, 49152), "quick": (2, 16, 64)}


def whole(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: one fp32 log_softmax over every position, then each label's entry."""
    labels = labels[:, 1:]
    mask = labels != -100
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask


def _ways() -> dict[str, object]:
    from deltatune.train.logprobs import token_logprobs

    return {"whole log_softmax": whole, "deltatune chunked": token_logprobs}


def _inputs(shape: tuple[int, int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, v = shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, t, v, generator=g, dtype=dtype).mul_(3)  # made in its dtype: no larger high-water mark
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, : t // 4] = -100  # the prompt
    return logits, labels, torch.randn(b, t - 1, generator=g)


def _run(way, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().requires_grad_()
    out = way(x, labels)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(way: str, dtype: str, quick: bool) -> None:
    """One way, once, in this fresh process: print its peak RSS above the RSS with the inputs made (MiB)."""
    from bench_worker import _peak_mib, _reset_peak

    fn = _ways()[way]  # imported before the baseline: the peak is the way's own work
    inputs = _inputs(SHAPE["quick" if quick else "full"], getattr(torch, dtype))
    cpu = torch.device("cpu")
    _reset_peak(cpu)  # the peak so far (imports, making the inputs) no longer counts
    base = _rss_mib()
    _run(fn, *inputs)
    print(json.dumps({"peak_mib": _peak_mib(cpu) - base}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=common.at_least(1), default=None, help="timed rounds (default 5; --quick: 1)")
    parser.add_argument(
        "--threads", type=common.at_least(1), default=None, help="torch threads (default: torch's own)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script")
    parser.add_argument("--worker", nargs=2, metavar=("WAY", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(*args.worker, args.quick)
        return 0
    shape = SHAPE["quick" if args.quick else "full"]
    rounds = args.rounds or (1 if args.quick else 5)
    ways = _ways()
    lines = [
        f"Logits {shape[0]} x {shape[1]} x {shape[2]}, torch threads {torch.get_num_threads()}, {rounds} rounds",
        "",
        "| dtype | way | forward + backward ms (median) | peak RSS above the inputs, MiB | chunked / whole, time |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    agree = True
    for dtype in ("float32", "bfloat16"):
        inputs = _inputs(shape, getattr(torch, dtype))
        results = {name: _run(way, *inputs) for name, way in ways.items()}
        (out_w, grad_w), (out_c, grad_c) = results.values()
        agree &= bool(
            torch.allclose(out_c, out_w, atol=1e-5) and torch.allclose(grad_c.float(), grad_w.float(), atol=1e-2)
        )
        times: dict[str, list[float]] = {name: [] for name in ways}
        for i in range(rounds):
            for name in list(ways)[:: 1 if i % 2 == 0 else -1]:
                start = time.perf_counter()
                _run(ways[name], *inputs)
                times[name].append(time.perf_counter() - start)
        ratio = statistics.median(c / w for c, w in zip(times["deltatune chunked"], times["whole log_softmax"]))
        del inputs, results, out_w, grad_w, out_c, grad_c
        for name in ways:
            argv_w = [sys.executable, __file__, "--worker", name, dtype] + ["--quick"] * args.quick
            if args.threads:
                argv_w += ["--threads", str(args.threads)]
            peak = json.loads(subprocess.run(argv_w, capture_output=True, text=True, check=True).stdout)["peak_mib"]
            last = f"{ratio:.2f}" if name == "deltatune chunked" else ""
            lines.append(f"| {dtype} | {name} | {1e3 * statistics.median(times[name]):,.2f} | {peak:,.0f} | {last} |")
    lines += ["", f"Same log-probs and gradients: {'yes' if agree else 'NO'}"]
    print("\n".join(lines))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
