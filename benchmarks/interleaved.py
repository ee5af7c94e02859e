"""deltatune's and peft's LoRA in one process, step by step interleaved: the steady form of the harness's ratios.

    .venv/bin/python benchmarks/interleaved.py --config llama-fp32     # the harness's ~60M Llama, 4 x 512
    .venv/bin/python benchmarks/interleaved.py --config minilm         # the real MiniLM-L6, 32 x 128
    .venv/bin/python benchmarks/interleaved.py --config smollm2-fp32 --dora  # DoRA on both sides
    .venv/bin/python benchmarks/interleaved.py --quick                 # smoke test: tiny shapes, seconds

``python benchmarks/bench.py`` runs each side in fresh processes, one after the other, which is the right way to measure
memory and start-up but lets the load of a shared machine drift between the two sides' processes. Here three
copies of the same seeded base model live in one process, and every round runs each of them once, the orders
those of a Williams design (each in every position, and after every other, equally often over its rows; each
round's first after an untimed call of itself), so that a busy moment slows all three alike and none always runs
after the same other:

- training steps (forward + backward + AdamW) of full fine-tuning (deltatune's ``FullConfig``), deltatune's LoRA
  and peft's LoRA (r 8, alpha 16, dropout 0, q+v, as in the harness; peft's adapters in the base dtype), and the
  *floor*: the frozen base with a trainable zero vector added in place to each q and v output (and the task head
  trainable, as LoRA's is). Its forward and backward run through the same base layers as LoRA's and gradients
  reach the same layers, while its own arithmetic is one in-place pass over each target's output and one column
  sum of its gradient: about what any update that a gradient must reach costs, so floor / peft bounds how far
  below peft's step a LoRA implementation can go on this model (the floor is the plain transformers model: on a
  causal LM it computes transformers' loss, as peft's model does, and deltatune's fused loss can take its LoRA
  below the floor). A first design, a trainable scalar multiplying each output, cost more than deltatune's LoRA
  itself (three passes over the output and two fresh tensors of its size);
- inference forwards (eval mode, no grad) of the bare base, deltatune's and peft's models with the adapter
  unmerged, then merged (``merge_adapter``);
- merge + unmerge of the adapter into the base weights (``merge_adapter`` then ``unmerge_adapter``), per library.

The report gives the median of each and the median of the per-round ratios (deltatune / peft, LoRA / full
fine-tuning, adapter model / base), and per training step the minor page faults and the system CPU time (on a
VM where the kernel's page zeroing is slow, the memory a step allocates afresh costs time of its own). Memory is not measured here (one process holds all three models): see the
harness.
"""

from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_worker as bw  # noqa: E402
import common  # noqa: E402

ROUNDS = 12
"""The default timed rounds: whole cycles of every part's design (lcm of 4 trainings, 6 rows for the 3 forwards, 2
merges), over which each model runs after every one (itself included, as a round's first) equally often."""

Times = dict[str, list[float]]


def build(
    config: str, quick: bool, seed: int = 0, fused_loss: bool = False, dora: bool = False
) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor], bw.Shape]:
    """The base model (full fine-tuning), deltatune's and peft's LoRA models, each on its own copy of the same base.

    ``fused_loss``: deltatune's two models (full and LoRA) compute a causal LM's loss with ``deltatune.loss``, as
    ``deltatune train`` runs them; off, they run transformers' loss, as peft's model and the floor do. ``dora``: both
    LoRA models with DoRA (the magnitude from the base weights, as at injection)."""
    import peft

    import deltatune as dt

    shape = (bw.QUICK if quick else bw.SHAPES)[config]
    cpu = torch.device("cpu")
    base, batch, task_type = bw.build(shape, cpu, seed)
    modules = common.MODULES[shape.kind]
    full = common.method_config("full", "deltatune", task_type, **modules)
    models = {"full": dt.get_delta_model(base, full, fused_loss=fused_loss)}
    base, _, _ = bw.build(shape, cpu, seed)
    method = "lora-dora" if dora else "lora"
    lora = common.method_config(method, "deltatune", task_type, **modules)
    models["deltatune"] = dt.get_delta_model(base, lora, fused_loss=fused_loss)
    base, _, _ = bw.build(shape, cpu, seed)
    config_p = common.method_config(method, "peft", task_type, **modules)
    models["peft"] = peft.get_peft_model(base, config_p, autocast_adapter_dtype=False)
    base, _, _ = bw.build(shape, cpu, seed)
    models["floor"] = floor_model(base, common.LORA_TARGETS[shape.kind], task_type)
    for name, p in models["deltatune"].named_parameters():  # a non-zero B, as after training
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    # peft's model gets deltatune's adapter (through PEFT's file layout): both compute the same function
    result = peft.set_peft_model_state_dict(models["peft"], models["deltatune"].adapter_state_dict())
    if result.unexpected_keys:
        raise RuntimeError(f"peft did not take the keys {result.unexpected_keys}")
    return models, batch, shape


class _Shift(torch.nn.Module):
    """A trainable zero vector added in place to a module's output: about the cheapest update a gradient must reach
    (forward: one in-place pass; backward: the gradient passes through unchanged, plus one column sum)."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(width, dtype=dtype))

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # In place is safe: a linear layer's backward keeps its input and weight, not its output.
        return output.add_(self.shift)


def floor_model(base: torch.nn.Module, targets: list[str], task_type: str) -> torch.nn.Module:
    """The floor (module docstring): ``base`` frozen, a ``_Shift`` on the output of each linear layer named by
    ``targets`` (the LoRA targets), the task head trainable as LoRA's ``modules_to_save`` makes it."""
    base.requires_grad_(False)
    shifts = torch.nn.ModuleList()
    for name, module in list(base.named_modules()):
        if name.rsplit(".", 1)[-1] in targets:
            shift = _Shift(module.weight.shape[0], module.weight.dtype)
            module.register_forward_hook(shift)
            shifts.append(shift)
    if not shifts:
        raise ValueError(f"no module named {targets} to shift")
    base.add_module("floor_shifts", shifts)
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):
        for name in ("classifier", "score"):
            head = getattr(base, name, None)
            if isinstance(head, torch.nn.Module):
                head.requires_grad_(True)
    return base


def max_difference(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor]) -> float:
    """The largest difference between deltatune's and peft's outputs (eval mode, no grad), relative to the
    largest output: the two sides must compute the same model for their times to compare."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        d, p = (models[s].eval()(**inputs).logits.float() for s in ("deltatune", "peft"))
    return ((d - p).abs().max() / p.abs().max().clamp_min(1e-12)).item()


def _rounds(fns: dict[str, Callable[[], object]], rounds: int, usage: dict[str, Times] | None = None) -> Times:
    """Each function once per round, the orders those of ``common.balanced_orders``; one untimed warm-up round first,
    and before every timed round an untimed call of its first function, so that the round's first timed call follows
    itself, not the last call of the round before (the rows' boundaries are outside the design: with 8 rounds of 4,
    "floor" ran right after "full" in 4 rounds, each LoRA in 2). Balanced over whole cycles of the design: ``rounds``
    a multiple of ``len(fns)`` (of ``2 * len(fns)`` for an odd count). ``usage``, when given, gets each timed call's
    minor page faults ("faults") and system CPU seconds ("sys") per name."""
    names = list(fns)
    out: Times = {name: [] for name in names}
    if usage is not None:
        usage.update(faults={name: [] for name in names}, sys={name: [] for name in names})
    orders = common.balanced_orders(len(names))
    for i in range(rounds + 1):
        order = [names[j] for j in orders[max(i - 1, 0) % len(orders)]]
        if i:
            fns[order[0]]()  # untimed
        for name in order:
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fns[name]()
            ms, after = (time.perf_counter() - start) * 1e3, resource.getrusage(resource.RUSAGE_SELF)
            if i:
                out[name].append(ms)
                if usage is not None:
                    usage["faults"][name].append(after.ru_minflt - before.ru_minflt)
                    usage["sys"][name].append(after.ru_stime - before.ru_stime)
    return out


def measure(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], rounds: int) -> dict[str, Times]:
    """{"train"|"forward"|"merged"|"merge": {model: [ms per round]}, "faults"|"sys": {model: [minor page faults |
    system CPU seconds per training step]}}."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    opts = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for name, m in models.items()
    }

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            opts[name].zero_grad(set_to_none=True)
            models[name](**batch).loss.backward()
            opts[name].step()

        return run

    def forward(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(**inputs)

        return run

    def merge_cycle(name: str) -> Callable[[], None]:
        def run() -> None:
            models[name].merge_adapter()
            models[name].unmerge_adapter()

        return run

    for m in models.values():
        m.train()
    usage: dict[str, Times] = {}
    out = {"train": _rounds({name: step(name) for name in models}, rounds, usage)}
    for m in models.values():
        m.eval()
    lora = ("deltatune", "peft")
    # the bare base: deltatune's model with its adapter disabled runs exactly the base model's modules
    plain = models["full"].base_model
    out["forward"] = _rounds({"base": forward(plain), **{s: forward(models[s]) for s in lora}}, rounds)
    out["merge"] = _rounds({s: merge_cycle(s) for s in lora}, rounds)
    for s in lora:
        models[s].merge_adapter()
    out["merged"] = _rounds({"base": forward(plain), **{s: forward(models[s]) for s in lora}}, rounds)
    return {**out, **usage}


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def report(
    times: dict[str, Times],
    config: str,
    shape: bw.Shape,
    rounds: int,
    command: str,
    fused_loss: bool = False,
    dora: bool = False,
) -> str:
    med = {what: {k: statistics.median(v) for k, v in t.items()} for what, t in times.items()}
    t = times
    lines = [
        "## deltatune and peft interleaved in one process",
        "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        f"- Configuration: {config}, batch {shape.batch} x seq {shape.seq}, {shape.dtype}; LoRA r 8, alpha 16, q+v{', DoRA' if dora else ''}; "
        f"{rounds} rounds after 1 warm-up, order balanced{'' if rounds % ROUNDS == 0 else ' in part'} (over whole "
        f"cycles of 4 rounds for training, 6 for the forwards, 2 for merge); torch threads {torch.get_num_threads()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        "- deltatune's loss: "
        + (
            "the fused causal-LM loss (`fused_loss=True`, as `deltatune train` runs it)"
            if fused_loss
            else "transformers' (the library default, `fused_loss=False`), as peft's and the floor's"
        ),
        "",
        "| measure | deltatune ms | peft ms | d/p | other ms | ratio to other |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]

    def row(label: str, what: str, other: str, other_label: str) -> None:
        d, p = med[what]["deltatune"], med[what]["peft"]
        ratio = _median_ratio(t[what]["deltatune"], t[what]["peft"])
        o = f"{other_label} {med[what][other]:,.1f}" if other else ""
        to = f"{_median_ratio(t[what]['deltatune'], t[what][other]):.2f}" if other else ""
        lines.append(f"| {label} | {d:,.1f} | {p:,.1f} | {ratio:.2f} | {o} | {to} |")

    step = "DoRA training step" if dora else "LoRA training step"
    row(step, "train", "full", "full fine-tuning")
    row(step, "train", "floor", "floor")
    row("unmerged forward", "forward", "base", "base")
    row("merged forward", "merged", "base", "base")
    row("merge + unmerge", "merge", "", "")
    faults = {k: statistics.median(v) for k, v in t["faults"].items()}
    sys_s = {k: statistics.median(v) for k, v in t["sys"].items()}
    lines += [
        "",
        "Per training step (median): minor page faults (fresh 4 KiB pages the kernel zeroes) deltatune "
        f"{faults['deltatune']:,.0f}, peft {faults['peft']:,.0f}, full fine-tuning {faults['full']:,.0f}; system "
        f"CPU seconds deltatune {sys_s['deltatune']:.2f}, peft {sys_s['peft']:.2f}, full fine-tuning "
        f"{sys_s['full']:.2f}.",
    ]
    floor_peft = _median_ratio(t["train"]["floor"], t["train"]["peft"])
    peft_floor = _median_ratio(t["train"]["peft"], t["train"]["floor"])
    lines += [
        "",
        f"The floor, a LoRA whose own arithmetic costs next to nothing (the frozen base with a trainable zero vector "
        f"added to each q and v output, the head trainable): {med['train']['floor']:,.1f} ms per step, "
        f"{floor_peft:.2f} of peft's step (peft's step is {peft_floor:.2f} of the floor). The floor runs the base "
        "model's own code, loss included: a LoRA goes below it only by cutting work of the base's (as deltatune's "
        "fused causal-LM loss does); the second LoRA row gives deltatune's step against the floor.",
    ]
    peft_full = _median_ratio(t["train"]["peft"], t["train"]["full"])
    peft_base = _median_ratio(t["forward"]["peft"], t["forward"]["base"])
    lines += [
        "",
        "Ratios are medians of the per-round ratios; the last column is deltatune's model against full fine-tuning "
        f"(training) or the bare base (forwards). peft's: LoRA / full fine-tuning {peft_full:.2f}, unmerged / base "
        f"{peft_base:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = common.in_process_options(
        "interleaved.py", __doc__, argv, default="llama-fp32", rounds=ROUNDS, fused_loss=True, dora=True
    )
    models, batch, shape = build(args.config, args.quick, fused_loss=args.fused_loss, dora=args.dora)
    difference = max_difference(models, batch)
    tolerance = 1e-5 if shape.dtype == "float32" else 2e-2
    times = measure(models, batch, args.rounds)
    text = report(times, args.config, shape, args.rounds, args.command, args.fused_loss, args.dora)
    text += f"\nThe two LoRA models hold the same adapter: outputs differ by {difference:.1e} of the largest logit.\n"
    common.emit(text, args.out)
    return 0 if difference <= tolerance else 1  # 1: the two sides do not compute the same model


if __name__ == "__main__":
    sys.exit(main())
