"""Vision benchmark: adapt the digits-0-4 ViT to digits 5-9 with each method; accuracy, trainable parameters,
step time and peak memory, deltatune beside PEFT for LoRA and IA3.

    python -m deltatune.data.digits data/digits --init-vit
    deltatune train recipes/digits-vit-pretrain.yaml
    deltatune merge --adapter runs/digits-vit-pretrain --out data/digits/vit-digits04
    python benchmarks/vision.py --base data/digits/vit-digits04 --data data/digits --out runs/bench-vision.md

Every method runs in a process of its own (so that peak memory is its own: max RSS on CPU, the allocator's peak
on CUDA), with the same seeded data order, batch size, epochs and AdamW; only the learning rate is per method
(each method's usual range; the table shows it). The images are decoded once by the model's image processor before
training, so the step time is the model's (forward, backward, optimizer step): the median after 5 warm-up steps.
"head only" trains the classifier alone in plain PyTorch (every other parameter frozen): the linear-probe floor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

# method id -> (library, config fields, learning rate)
METHODS: dict[str, tuple[str, dict, float]] = {
    "head only": ("torch", {}, 5e-3),
    "lora r8 q,v": ("deltatune", {"name": "lora", "r": 8, "lora_alpha": 16}, 5e-3),
    "lora r8 q,v (peft)": ("peft", {"name": "lora", "r": 8, "lora_alpha": 16}, 5e-3),
    "ia3": ("deltatune", {"name": "ia3"}, 1e-2),
    "ia3 (peft)": ("peft", {"name": "ia3"}, 1e-2),
    "vpt shallow n8": ("deltatune", {"name": "vpt", "num_virtual_tokens": 8}, 5e-3),
    "vpt deep n8": ("deltatune", {"name": "vpt", "num_virtual_tokens": 8, "deep": True}, 5e-3),
    "bottleneck houlsby": ("deltatune", {"name": "bottleneck", "reduction_factor": 8}, 5e-3),
    "bitfit": ("deltatune", {"name": "bitfit"}, 5e-3),
    "full": ("deltatune", {"name": "full"}, 5e-4),
}


def _tensors(folder: str, processor, names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    from deltatune.data.images import open_rgb, pixel_values, read_image_rows
    from deltatune.train.image_cls import class_names

    rows = read_image_rows(folder)
    names, mapping = (names, {n: i for i, n in enumerate(names)}) if names else class_names(rows, None, True)
    x = pixel_values(processor, [open_rgb(r)[0] for r in rows])
    y = torch.tensor([mapping[str(r.label)] for r in rows])
    return x, y, names


def _model(base: str, method: str, names: list[str]):
    from transformers import AutoModelForImageClassification

    lib, fields, _ = METHODS[method]
    id2label = dict(enumerate(names))
    model = AutoModelForImageClassification.from_pretrained(
        base, num_labels=len(names), id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    fields = dict(fields)
    name = fields.pop("name", None)
    if lib == "torch":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier."))
        return model
    if lib == "peft":
        import peft

        targets = {"lora": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "fc2"]}[name]
        extra = {"feedforward_modules": ["fc2"]} if name == "ia3" else {}
        cls = {"lora": peft.LoraConfig, "ia3": peft.IA3Config}[name]
        return peft.get_peft_model(
            model, cls(target_modules=targets, modules_to_save=["classifier"], **fields, **extra)
        )
    from deltatune import get_delta_model
    from deltatune.registry import get

    config = get(name).config_class(modules_to_save=["classifier"], **fields)
    return get_delta_model(model, config)


def run_one(args: argparse.Namespace) -> dict:
    """Train and evaluate one method (in this process); returns its row."""
    from transformers import set_seed

    from deltatune.train.models import load_image_processor

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = load_image_processor(args.base)
    x, y, names = _tensors(os.path.join(args.data, "adapt", "train"), processor)
    xt, yt, _ = _tensors(os.path.join(args.data, "adapt", "test"), processor, names)
    set_seed(args.seed)
    model = _model(args.base, args.method, names).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lr = args.lr or METHODS[args.method][2]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    times, step = [], 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), args.batch_size):
            idx = order[i : i + args.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(pixel_values=xb, labels=yb).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            step += 1
    model.eval()
    with torch.no_grad():
        preds = torch.cat(
            [model(pixel_values=xt[i : i + 64].to(device)).logits.argmax(-1).cpu() for i in range(0, len(yt), 64)]
        )
    from deltatune.train.image_cls import confusion, macro_f1

    m = confusion(preds.numpy(), yt.numpy(), len(names))
    if device == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "method": args.method,
        "accuracy": float((preds == yt).float().mean()),
        "macro_f1": macro_f1(m),
        "trainable": trainable,
        "trainable_pct": 100 * trainable / total,
        "lr": lr,
        "step_ms": 1000 * statistics.median(times[5:] or times),  # after 5 warm-up steps where there are more
        "memory_mib": memory,
        "memory_kind": "CUDA peak allocated" if device == "cuda" else "max RSS",
        "steps": step,
    }


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Digits 5-9 from the digits-0-4 ViT ({args.base}): {args.epochs} epochs, batch {args.batch_size}, seed "
        f"{args.seed}, {rows[0]['steps']} steps, {args.threads} CPU thread(s) or one GPU; step time = median "
        f"forward + backward + AdamW step; memory = {rows[0]['memory_kind']} of the method's own process.",
        "",
        "| method | test accuracy | macro-F1 | trainable params | % of model | lr | step ms | memory MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['trainable']:,} | "
            f"{r['trainable_pct']:.2f} | {r['lr']:g} | {r['step_ms']:.1f} | {r['memory_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="data/digits/vit-digits04", help="the merged digits-0-4 ViT")
    p.add_argument("--data", default="data/digits", help="the folder python -m deltatune.data.digits wrote")
    p.add_argument("--methods", nargs="*", default=list(METHODS), help="method ids (default: all)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: per method)")
    p.add_argument("--out", default=None, help="write the markdown table (and a .json beside it) here")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)  # the child process: one method
    args = p.parse_args(argv)
    if args.method:
        print(json.dumps(run_one(args)))
        return 0
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; choose from: {', '.join(METHODS)}")
    rows = []
    for method in args.methods:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--method", method]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{method}: accuracy {rows[-1]['accuracy']:.3f}, {rows[-1]['step_ms']:.1f} ms/step", file=sys.stderr)
    text = table(rows, args)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
