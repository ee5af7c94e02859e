"""GRPO on the embedded SmolLM2-135M-Instruct: does recipes/grpo-arithmetic.yaml learn within a CPU budget?

    # the measurement published in docs/BENCHMARKS.md (about 15 minutes on a shared 2-core CPU):
    .venv/bin/python benchmarks/grpo_smollm2.py --out grpo.md --json grpo.json
    # fewer steps or held-out problems, other settings (any recipe key as a dotted override):
    .venv/bin/python benchmarks/grpo_smollm2.py --steps 10 --eval 30 train.lr=1e-4 align.num_generations=4

What it does:

1. Greedy answers of the base model (the adapter starts as the identity, so this is SmolLM2 itself) to the first
   ``--eval`` held-out problems of recipes/data/arithmetic-test.jsonl (never trained on): exact-answer accuracy
   (the last ``Answer: N`` equals the answer) and mean reward (exact answer + 0.5 x format, as the recipe weighs them).
2. ``deltatune train recipes/grpo-arithmetic.yaml`` for ``--steps`` steps (its own eval switched off), in this
   process, into ``--run`` (default runs/bench-grpo-smollm2); per step (from the run's log_history.jsonl): the mean
   reward of the sampled completions, each reward's mean, the completion length and the time.
3. The same greedy evaluation with the trained adapter.

The report: accuracy and mean reward before and after, the reward curve per step (a table and a PNG next to
``--out``), seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "grpo-arithmetic.yaml"


def _rewards():
    sys.path.insert(0, str(ROOT / "recipes" / "rewards"))
    import arithmetic

    return arithmetic


def greedy_eval(model, tok, rows: list[dict], max_new_tokens: int, batch_size: int = 25) -> dict:
    """Exact-answer accuracy and mean reward (exact + 0.5 format) of greedy answers to ``rows``."""
    import torch

    A = _rewards()
    model.eval()
    device = next(model.parameters()).device
    completions = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in chunk]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        P = max(len(x) for x in ids)
        input_ids = torch.tensor([[tok.pad_token_id] * (P - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        completions += tok.batch_decode(out[:, P:], skip_special_tokens=True)
    answers = [r["answer"] for r in rows]
    exact = A.exact_answer(None, completions, answers)
    fmt = A.answer_format(None, completions)
    return {
        "accuracy": sum(exact) / len(exact),
        "format": sum(fmt) / len(fmt),
        "reward": sum(e + 0.5 * f for e, f in zip(exact, fmt)) / len(exact),
        "examples": [{"answer": a, "completion": c} for a, c in zip(answers[:3], completions[:3])],
    }


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot(history: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["reward"] for h in history], "o-", label="mean reward (exact + 0.5 format)")
    for key, label in (("rewards/exact_answer/mean", "exact answer"), ("rewards/answer_format/mean", "format")):
        if key in history[0]:
            ax.plot(steps, [h[key] for h in history], "--", label=label)
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("GRPO on SmolLM2-135M-Instruct, arithmetic word problems")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="GRPO steps (default 30)")
    p.add_argument("--eval", type=int, default=50, help="held-out problems scored before and after (default 50)")
    p.add_argument("--run", default="runs/bench-grpo-smollm2", help="the run folder (replaced)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", help="write the markdown report here (and the reward curve PNG next to it)")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = p.parse_args(argv)
    os.chdir(ROOT)  # the recipe names its data and rewards relative to the repository
    import torch

    from deltatune.model import get_delta_model
    from deltatune.train import load_recipe, train
    from deltatune.train.models import load_model, load_tokenizer
    from deltatune.train.run import load_adapter_model

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"train.max_steps={args.steps}", "train.eval_on_start=false", "data.eval=null",
                 "train.save_steps=1000000", "train.report_to=[none]", f"output.dir={args.run}", *args.overrides]  # fmt: skip
    cfg = load_recipe(str(RECIPE), overrides)
    rows = _jsonl(ROOT / "recipes" / "data" / "arithmetic-test.jsonl")[: args.eval]
    new_tokens = cfg.align.max_new_tokens
    tok = load_tokenizer(cfg.model.name_or_path)

    t0 = time.perf_counter()
    base = get_delta_model(load_model(cfg.model.name_or_path, "CAUSAL_LM"), cfg.method_config("CAUSAL_LM"))
    before = greedy_eval(base, tok, rows, new_tokens)
    eval_s = time.perf_counter() - t0
    print(f"before: accuracy {before['accuracy']:.3f}, reward {before['reward']:.3f} ({eval_s:.0f} s)", flush=True)
    del base

    t0 = time.perf_counter()
    metrics = train(cfg, overwrite=True)
    train_s = time.perf_counter() - t0
    trained, tok2 = load_adapter_model(args.run)
    after = greedy_eval(trained, tok2, rows, new_tokens)
    print(f"after: accuracy {after['accuracy']:.3f}, reward {after['reward']:.3f}", flush=True)

    result = {"command": " ".join(["benchmarks/grpo_smollm2.py", *(argv if argv is not None else sys.argv[1:])]),
              "steps": args.steps, "held_out": len(rows), "before": before, "after": after, "metrics": metrics,
              "train_s": train_s, "eval_s": eval_s, "torch_threads": torch.get_num_threads(),
              "recipe_overrides": overrides}  # fmt: skip
    steps = _jsonl(Path(args.run) / "log_history.jsonl")
    result["per_step"] = steps
    lines = [
        "## GRPO on SmolLM2-135M-Instruct: arithmetic word problems",
        "",
        f"`{result['command']}`; {args.steps} steps of {cfg.train.batch_size} problems x "
        f"{cfg.align.num_generations} samples, LoRA r={cfg.method.get('r')} on every linear layer, "
        f"{torch.get_num_threads()} torch threads.",
        "",
        f"| held-out problems ({len(rows)}, greedy) | before | after |",
        "|---|---|---|",
        f"| exact-answer accuracy | {before['accuracy']:.3f} | {after['accuracy']:.3f} |",
        f"| 'Answer: N' last line (format) | {before['format']:.3f} | {after['format']:.3f} |",
        f"| mean reward (exact + 0.5 format) | {before['reward']:.3f} | {after['reward']:.3f} |",
        "",
        f"Training: {train_s:.0f} s, {sum(s['step_time_s'] for s in steps) / max(len(steps), 1):.1f} s per step "
        "(sampling, scoring and the update).",
        "",
        "| step | mean reward | exact | format | length | s |",
        "|---|---|---|---|---|---|",
        *[f"| {s['step']} | {s['reward']:.3f} | {s.get('rewards/exact_answer/mean', 0):.3f} | "
          f"{s.get('rewards/answer_format/mean', 0):.3f} | {s['completion_length']:.1f} | {s['step_time_s']:.1f} |"
          for s in steps],
    ]  # fmt: skip
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")
        plot(steps, str(Path(args.out).with_suffix(".png")))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
