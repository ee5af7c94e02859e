"""Text-to-image on real digits: how well each method teaches a digits-0-4 UNet to draw 5-9, scored by a classifier.

    python -m deltatune.data.digits data/digits --init-unet
    deltatune train recipes/digits-t2i-pretrain.yaml
    deltatune merge --adapter runs/digits-t2i-pretrain --out data/digits/unet-digits04
    python benchmarks/t2i_digits.py          # every method; --quick: a smoke run

For each method, recipes/digits-t2i-lora.yaml runs in a fresh process with the method swapped in (the same data,
epochs, batch and seed; the lr per method is in LR), which reports its train time, trainable parameters and peak
memory (max RSS). Then ``--samples`` images per digit 0-9 are drawn ("a handwritten digit seven", DDIM, fixed seeds)
and scored by a logistic-regression classifier trained on the real 8x8 digits' train split (its accuracy on the real
held-out digits is reported, so the scorer's own error is known): a generated 16x16 image is averaged down to 8x8
and read as the classifier reads the real ones. The score of a digit is the share of its samples classified as that
digit; 5-9 is what adaptation teaches, 0-4 what it must keep. The base row is the pre-trained UNet unadapted. A PNG
grid shows samples per digit (rows) for the base and each method.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits-t2i-lora.yaml"
METHODS = ["lora", "ia3", "bottleneck-houlsby", "full"]
FIELDS = {  # the whole method section, replacing the recipe's
    "lora": "{name: lora, r: 8, lora_alpha: 16, target_modules: [to_q, to_k, to_v, to_out.0]}",
    "lora-dora": "{name: lora, r: 8, lora_alpha: 16, target_modules: [to_q, to_k, to_v, to_out.0], use_dora: true}",
    "ia3": "{name: ia3, target_modules: [to_k, to_v, ff.net.2], feedforward_modules: [ff.net.2]}",
    # Houlsby's two sites per transformer block: after the self-attention's output projection and after the MLP
    "bottleneck-houlsby": "{name: bottleneck, reduction_factor: 4, target_modules: [attn1.to_out.0, ff.net.2]}",
    "full": "{name: full}",
}
LR = {"lora": 2e-3, "lora-dora": 2e-3, "ia3": 1e-2, "bottleneck-houlsby": 1e-3, "full": 3e-4}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def classifier(data: str):
    """Logistic regression on the real 8x8 digits (the digits script's train split), and its held-out accuracy."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    split = json.loads(Path(data, "split.json").read_text())
    digits = load_digits()
    idx = {name: [i for part, per in split["indices"].items() if part.endswith(name) for v in per.values() for i in v]
           for name in ("train", "test")}  # fmt: skip
    clf = LogisticRegression(max_iter=5000).fit(digits.data[idx["train"]], digits.target[idx["train"]])
    accuracy = float(np.mean(clf.predict(digits.data[idx["test"]]) == digits.target[idx["test"]]))
    return clf, accuracy


def score(model, processor, clf, samples: int, steps: int) -> tuple[list[float], object]:
    """Per digit 0-9, the share of ``samples`` drawn images classified as that digit; and the images."""
    import torch

    from deltatune.train.t2i import sample

    shares, images = [], []
    for digit in range(10):
        drawn = sample(model, processor, [f"a handwritten digit {WORDS[digit]}"] * samples, steps=steps, seed=digit)
        small = torch.nn.functional.avg_pool2d(drawn, 2)[:, 0].reshape(samples, 64) * 16  # as load_digits: 0..16
        shares.append(float((clf.predict(small.numpy()) == digit).mean()))
        images.append(drawn)
    return shares, torch.stack(images)  # (10, samples, 1, 16, 16)


def worker(method: str, args) -> dict:
    """Train the adaptation recipe with ``method`` in this process; its figures as a dict."""
    from deltatune.cli import main

    out = os.path.join(args.runs, method)
    argv = ["train", str(RECIPE), f"model.name_or_path={args.base}", f"output.dir={out}", f"train.lr={LR[method]}",
            f"method={FIELDS[method]}", "train.report_to=[none]", f"data.train={args.data}/t2i-adapt-train.jsonl",
            f"data.eval={args.data}/t2i-adapt-test.jsonl"]  # fmt: skip
    if args.quick:
        argv += ["train.max_steps=3", "data.limit=20"]
    argv.append("--overwrite")
    start = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"t2i_digits.py: training {method} failed")
    metrics = json.loads(Path(out, "metrics.json").read_text())
    return {
        "method": method,
        "train_s": round(time.perf_counter() - start, 1),
        "steps": metrics["train_steps"],
        "eval_loss": metrics.get("eval_loss"),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run(args) -> int:
    import torch

    from deltatune.train.run import load_adapter_model
    from deltatune.train.t2i import T2IProcessor, load_denoiser, save_png

    torch.set_num_threads(args.threads)
    clf, clf_accuracy = classifier(args.data)
    processor = T2IProcessor(args.base)
    rows, grids = [], []
    base_shares, base_images = score(load_denoiser(args.base).eval(), processor, clf, args.samples, args.steps)
    rows.append({"method": "base (digits 0-4 UNet, no adaptation)", "shares": base_shares})
    grids.append(base_images)
    for method in args.methods:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", method, *args.pass_on], capture_output=True, text=True
        )
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        delta, _ = load_adapter_model(os.path.join(args.runs, method))
        delta.eval()
        figures["trainable"] = sum(int(v.numel()) for v in delta.adapter_state_dict().values())  # what trained
        shares, images = score(delta, processor, clf, args.samples, args.steps)
        rows.append({**figures, "shares": shares})
        grids.append(images)
    grid = torch.cat([g[:, : min(8, args.samples)] for g in grids], dim=1)  # (10 digits, methods x 8, 1, 16, 16)
    png = save_png(torch.cat([torch.cat(list(row), dim=-1) for row in grid], dim=-2)[None], args.png)
    text = _table(rows, clf_accuracy, args, png)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


def _table(rows: list[dict], clf_accuracy: float, args, png: str) -> str:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = [
        f"Scorer: logistic regression on the real 8x8 digits, {clf_accuracy:.1%} on the real held-out digits.",
        f"lr: {', '.join(f'{m} {LR[m]:g}' for m in args.methods)}.",
        f"{args.samples} samples per digit, DDIM {args.steps} steps, seeds 0-9; grid: {png} (rows: digits 0-9; "
        f"columns: 8 samples of {', '.join(r['method'].split(' ')[0] for r in rows)}).",
        "",
        "| method | 5-9 drawn right | 0-4 drawn right | trainable | train s | steps | eval loss | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["shares"]
        lines.append(
            f"| {r['method']} | {mean(s[5:]):.1%} | {mean(s[:5]):.1%} | {r.get('trainable', '—')} | "
            f"{r.get('train_s', '—')} | {r.get('steps', '—')} | "
            f"{r['eval_loss']:.4f} | {r.get('peak_rss_mib', '—')} |" if "eval_loss" in r else
            f"| {r['method']} | {mean(s[5:]):.1%} | {mean(s[:5]):.1%} | — | — | — | — | — |"
        )  # fmt: skip
    lines += ["", "Per digit (share of samples classified as the digit asked for):", "",
              "| method | " + " | ".join(str(d) for d in range(10)) + " |", "|---|" + "---:|" * 10]  # fmt: skip
    lines += [f"| {r['method'].split(' ')[0]} | " + " | ".join(f"{x:.0%}" for x in r["shares"]) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/digits")
    p.add_argument("--base", default="data/digits/unet-digits04", help="the merged digits-0-4 UNet")
    p.add_argument("--runs", default="runs/t2i-bench", help="where each method's run goes")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--samples", type=int, default=20, help="images drawn per digit")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 training steps per method (a smoke run)")
    p.add_argument("--png", default="runs/t2i-bench/grid.png")
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--lr", default="", help="lr per method, e.g. lora=1e-2,full=1e-3 (default: LR)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    lrs = dict(item.partition("=")[::2] for item in args.lr.split(",") if item)
    unknown = [name for name in lrs if name not in LR]
    if unknown:
        print(f"t2i_digits.py: error: --lr names unknown method {unknown[0]!r}", file=sys.stderr)
        return 2
    LR.update({name: float(value) for name, value in lrs.items()})
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in FIELDS]
    if unknown:
        print(f"t2i_digits.py: error: unknown method {', '.join(unknown)}; choose from {', '.join(FIELDS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if not os.path.isdir(args.base):
        print(f"t2i_digits.py: error: no base UNet at {args.base}; run the commands in this script's docstring",
              file=sys.stderr)  # fmt: skip
        return 2
    args.pass_on = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--worker")]
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
