"""Every method on a real LLM: SmolLM2-135M-Instruct SFT on E2E (data-to-text), deltatune beside peft.

One budget for every row (the same steps, batch, max length, seed, batch order and eval rows); each row runs in a
fresh process so its peak memory is its own. For each method: trainable parameters, train time, peak RSS, BLEU-4
and ROUGE-L on a fixed slice of the test set decoded greedily (multi-reference, scored with sacrebleu and
rouge-score; the project's own metric code beside them), and forgetting: the model's loss on a fixed slice of Tiny
Shakespeare before and after (general text the task never shows).

    python benchmarks/llm_quality.py --out llm_quality.md                 # every row, deltatune and peft
    python benchmarks/llm_quality.py --methods lora,lora-all-linear --sides deltatune --lr 1e-3
    python benchmarks/llm_quality.py --quick                              # smoke test: 2 steps, 2 eval rows
    python benchmarks/llm_quality.py --sweep --jobs 2 --out sweep.md      # the lr sweep: dev loss at LR x 1/3, 1, 3
    python benchmarks/llm_quality.py --lr-from sweep.json --jobs 2        # the table at the sweep's best rates

``--out X.md`` also writes every row's greedy answers (and the references) to ``X.answers.json``;
``benchmarks/paired_bleu.py`` tests whether two rows differ beyond what the eval rows can resolve.

The prompt is a chat turn ("Describe this restaurant in one sentence: <meaning representation>") and the loss covers
the reference sentence and the end-of-turn token. Learning rates per method are the LR table below (the centres of
the sweep); ``--sweep`` trains each method (deltatune side) ``--sweep-steps`` steps at each rate of ``SWEEP`` x its
centre and keeps the one with the lowest loss on a dev slice (``--dev-rows`` rows of the train file drawn by the seed,
never trained on), written beside ``--out`` as JSON that ``--lr-from`` reads (a ``--sweep`` with ``--lr-from`` centres
on those rates: the next grid around a best at its edge); ``--lr`` overrides them all. ``--autocast``
trains under bf16 autocast over fp32 weights (both sides alike; decoding and the losses stay fp32). Method names and the configs:
benchmarks/common.py, with the fields of ``configs`` over them (``lora-4bit`` and ``lora-rslora`` on every linear layer here,
``prefix_tuning`` with 10 tokens and an MLP of width 256, ``prompt_tuning`` initialised from a text; ``lora-4bit-loftq``:
``lora-4bit`` with its adapter started by LoftQ, deltatune only, see ``LOFTQ``). peft's token
rows generate through ``peft_generate_compat`` (peft 0.21.2 and transformers 5.24 name the KV cache differently);
``--peft-prefix-mlp-once`` runs peft's prefix-tuning MLP once per step, as deltatune does (``peft_prefix_mlp_once``).
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
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

DATA = os.path.join(HERE, "..", "..", "shared", "data")
PROMPT = "Describe this restaurant in one sentence: {source}"

LR = {
    "full": 1.5e-4, "lora": 6e-3, "lora-all-linear": 3e-3, "lora-rslora": 1.5e-3, "lora-dora": 6e-3, "lora-4bit": 3e-3,
    "lora-4bit-loftq": 3e-3,
    "ia3": 3e-2, "bottleneck-houlsby": 3e-3, "bottleneck-pfeiffer": 3e-3, "prefix_tuning": 1e-3,
    "prefix_tuning-v2": 3e-2, "prompt_tuning": 3e-2, "p_tuning": 3e-2, "freeze": 1.5e-4, "bitfit": 1e-3,
}  # fmt: skip
"""Learning rate per method (the best of the 2026-12-02 sweep, docs/BENCHMARKS.md: the next sweep's centres); its keys
are the methods, in the report's order."""
METHODS = list(LR)
SWEEP = (1 / 3, 1.0, 3.0)
"""The sweep's rates, as multiples of each method's centre in ``LR``."""
LOFTQ = {"lora-4bit-loftq": "lora-4bit"}
"""Rows that are another row with its adapter started by LoftQ (``replace_lora_weights_loftq``: A, B from the top-r
SVD of W - Q, Q the layer's own NF4 weight, so the model starts at Q + s B A ~= W); deltatune only."""
NO_PEFT = {m for m in METHODS if not common.peft_has(m)} | set(LOFTQ)
PROMPT_INIT = "Describe the restaurant from its name, food, price, area and rating."


def configs(method: str, side: str, path: str, rank: int | None = None) -> Any:
    """The config of ``method`` for ``side``: the same hyper-parameters on both (``path``: the tokenizer of
    ``prompt_tuning``'s text initialisation; ``rank``: a LoRA row's r, with alpha 2r, the table's alpha / r)."""
    every = "all-linear"
    fields = {
        "lora-4bit": {"target_modules": every},
        "lora-rslora": {"target_modules": every},
        "prefix_tuning": {"num_virtual_tokens": 10, "encoder_hidden_size": 256},
        "prefix_tuning-v2": {"num_virtual_tokens": 10},
        "prompt_tuning": {
            "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": path, "prompt_tuning_init_text": PROMPT_INIT,
        },
    }  # fmt: skip
    method = LOFTQ.get(method, method)
    if rank is not None and common.method(method) == "lora":
        fields[method] = {**fields.get(method, {}), "r": rank, "lora_alpha": 2 * rank}
    return common.method_config(method, side, "CAUSAL_LM", **common.MODULES["smollm2"], fields=fields)


def _rows(name: str, limit: int) -> list[dict]:
    with open(os.path.join(DATA, "e2e_nlg", name), encoding="utf-8") as fh:
        return [json.loads(line) for line, _ in zip(fh, range(limit))]


def encode(tok, row: dict, max_length: int) -> dict[str, list[int]]:
    from deltatune.train.chat import prompt_ids

    prompt = prompt_ids(tok, PROMPT.format(source=row["source"]))
    answer = tok(row["target"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = (prompt + answer)[:max_length]
    labels = ([-100] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict], pad: int):
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [pad] * (n - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [-100] * (n - len(e["labels"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"])) for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def dev_loss(model, tok, rows: list[dict], max_length: int) -> float:
    """Mean loss over the answer tokens of ``rows`` (the sweep's dev slice), in batches of 16."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            batch = collate([encode(tok, r, max_length) for r in rows[i : i + 16]], tok.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + float(model(**batch).loss) * n, count + n
    return total / count


def general_loss(model, tok, blocks: int, length: int) -> float:
    """Mean LM loss on the first ``blocks`` x ``length`` tokens of Tiny Shakespeare (general text)."""
    import torch

    with open(os.path.join(DATA, "tiny_shakespeare", "input.txt"), encoding="utf-8") as fh:
        ids = tok(fh.read(200_000))["input_ids"][: blocks * length]
    x = torch.tensor(ids).view(blocks, length)
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


def references(rows: list[dict]) -> list[list[str]]:
    """Each test row's references (E2E has several per MR; a file with one ``target`` per row has that one)."""
    return [r.get("references") or [r["target"]] for r in rows]


def streams(references: list[list[str]]) -> list[list[str]]:
    """Per-row reference lists as sacrebleu's reference streams (a row with fewer references repeats its first)."""
    width = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]


def score(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-4 (sacrebleu, multi-reference) and ROUGE-L F (rouge-score, best reference), x100, and the project's own."""
    import sacrebleu
    from rouge_score import rouge_scorer

    from deltatune.train import metrics

    bleu = sacrebleu.corpus_bleu(predictions, streams(references)).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = statistics.fmean(
        max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs) for pred, refs in zip(predictions, references)
    )
    own_bleu = metrics.bleu(predictions, references) * 100
    own_rouge = statistics.fmean(max(metrics.rouge_l(p, r) for r in refs) for p, refs in zip(predictions, references))
    return {"bleu": bleu, "rougeL": rouge * 100, "own_bleu": own_bleu, "own_rougeL": own_rouge * 100}


def peft_generate_compat(model) -> None:
    """Let peft's token methods generate on transformers 5.24 (the version here), whose ``generate`` hands the model
    its KV cache as ``cache``.

    peft 0.21.2's ``prepare_inputs_for_generation`` for prompt learning reads and writes ``past_key_values``: with
    the cache under the new name it never sees it, so prefix tuning's prefix is set aside (the model answers as the
    plain base) and prompt tuning / P-tuning prepend their virtual tokens again at every step. Renaming the key in
    what the base model prepares (the deprecated name is accepted until transformers 5.40) lets peft's own logic run as written: its
    greedy answers then equal a loop of full forward passes through peft's model
    (tests/test_llm_quality_bench.py). A no-op for peft's other methods and where the key is already the old one."""
    if not model.active_peft_config.is_prompt_learning:
        return
    try:  # peft 0.22 passes the cache under transformers' current name itself: nothing to rename
        from peft.import_utils import get_transformers_cache_name
    except ImportError:
        get_transformers_cache_name = None
    if get_transformers_cache_name is not None and get_transformers_cache_name() == "cache":
        return
    prepare = model.base_model_prepare_inputs_for_generation

    def renamed(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        if "cache" in inputs and "past_key_values" not in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    model.base_model_prepare_inputs_for_generation = renamed


def peft_prefix_mlp_once(model) -> None:
    """Make peft's prefix tuning run its MLP once per step and expand the prefixes over the batch, as deltatune's does
    (peft runs it on every batch row: the same function, its gradient summed in another order). With it, peft's
    training equals deltatune's to the bit (tests/test_llm_quality_bench.py): the probe of whether the two libraries'
    prefix rows differ only by that order. A no-op for every other method."""
    config = model.active_peft_config
    if config.peft_type != "PREFIX_TUNING" or not config.prefix_projection:
        return
    encoder = model.prompt_encoder[model.active_adapter]
    forward = encoder.forward
    encoder.forward = lambda tokens: forward(tokens[:1]).expand(tokens.shape[0], -1, -1)


def decode(model, tok, rows: list[dict], max_new_tokens: int) -> list[str]:
    from deltatune.train.chat import generate, prompt_ids

    model.eval()
    # Training ran with use_cache off; generate with the cache, as a user would.
    config = getattr(model, "config", None) or model.get_base_model().config
    config.use_cache = True
    return [generate(model, tok, prompt_ids(tok, PROMPT.format(source=r["source"])), max_new_tokens) for r in rows]


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One row: build, measure before, train, measure after."""
    import torch

    import deltatune as dt
    from deltatune.train.models import load_model, load_tokenizer, resolve_path

    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    path = resolve_path("smollm2")
    tok = load_tokenizer("smollm2")
    base = load_model("smollm2", "CAUSAL_LM", a.dtype)
    base.config.use_cache = False
    config = configs(a.method, a.side, path, a.rank) if a.method != "base" else None
    if LOFTQ.get(a.method, a.method) in common.QUANTIZED:
        if a.side == "deltatune":
            base = dt.quantize(base, bits=4, quant_type="nf4", double_quant=True)[0]
        else:
            import bench_worker as bw

            shape = bw.Shape("smollm2", batch=a.batch, seq=a.max_length, dtype=a.dtype)
            base = bw.quantize_base(base, "peft", shape, torch.device("cpu"))
    if config is None:  # the base row: no adapter, no training
        model = base
    elif a.side == "peft":
        import peft

        model = peft.get_peft_model(base, config)
        peft_generate_compat(model)
        if a.peft_prefix_mlp_once:
            peft_prefix_mlp_once(model)
    else:
        model = dt.get_delta_model(base, config)
        if a.method in LOFTQ:
            from deltatune.methods._loftq import replace_lora_weights_loftq

            replace_lora_weights_loftq(model, path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if config is not None else 0
    test = _rows("test.jsonl", a.eval_rows)
    refs = references(test)
    out: dict[str, Any] = {"method": a.method, "side": a.side, "trainable": trainable, "lr": a.lr}
    if not a.sweep:  # the base's own loss (adapter off: a token method's initial prompt is not the base)
        from deltatune.train.chat import adapter_off

        with adapter_off(model):
            out["forget_before"] = general_loss(model, tok, a.general_blocks, 128)
    # Train and dev rows drawn by one seeded permutation of the whole file (it is in source order, grouped by
    # restaurant): the dev rows first, then the training rows in the order they are trained on.
    every = _rows("train.jsonl", 10**9)
    perm = torch.randperm(len(every), generator=torch.Generator().manual_seed(a.seed)).tolist()
    dev = [every[i] for i in perm[: a.dev_rows]]
    train = [encode(tok, every[i], a.max_length) for i in perm[a.dev_rows : a.dev_rows + a.steps * a.batch]]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    warm = max(1, a.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (a.steps - s) / (a.steps - warm + 1)))
    )
    model.train()
    batches = (
        collate(train[step * a.batch : (step + 1) * a.batch], tok.pad_token_id)
        for step in range(a.steps if config is not None else 0)
    )
    start = time.perf_counter()
    amp = torch.bfloat16 if a.autocast else None
    losses = [float("nan"), *common.train_loop(model, batches, opt, sched=sched, max_grad_norm=1.0, autocast=amp)]
    out["train_s"] = time.perf_counter() - start
    out["final_loss"] = statistics.fmean(losses[-max(1, a.steps // 10) :])
    if a.sweep:
        out["dev_loss"] = dev_loss(model, tok, dev, a.max_length)
        return out
    out["answers"] = decode(model, tok, test, a.max_new_tokens)
    out.update(score(out["answers"], refs))
    out["forget_after"] = general_loss(model, tok, a.general_blocks, 128)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _table(results: list[dict]) -> str:
    cols = ["method", "side", "lr", "trainable", "BLEU", "ROUGE-L", "own BLEU", "train s", "peak MiB", "forget Δ"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['side']} | — | — | {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['side']} | {r['lr']:g} | {r['trainable']:,d} | {r['bleu']:.2f} | {r['rougeL']:.2f} | "
            f"{r['own_bleu']:.2f} | {r['train_s']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['forget_after'] - r['forget_before']:+.3f} |"
        )
    return "\n".join(lines)


def _sweep_table(results: list[dict]) -> tuple[str, dict[str, float]]:
    """The sweep's table (dev loss per method and rate) and the best rate of each method."""
    best: dict[str, float] = {}
    lines = [
        "| method | " + " | ".join(f"LR x {f:.3g}" for f in SWEEP) + " | best lr |",
        "|---|" + "---:|" * (len(SWEEP) + 1),
    ]
    for method in dict.fromkeys(r["method"] for r in results):
        mine = [r for r in results if r["method"] == method]
        ok = [r for r in mine if "dev_loss" in r]
        if ok:
            best[method] = min(ok, key=lambda r: r["dev_loss"])["lr"]
        cells = [f"{r['dev_loss']:.4f} ({r['lr']:.2g})" if "dev_loss" in r else r.get("error", "?") for r in mine]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {best.get(method, float('nan')):.2g} |")
    return "\n".join(lines), best


def _lr_from(path: str) -> dict[str, float]:
    """The best rates of a ``--sweep`` run (its JSON: method -> lr), checked against the LR table."""
    with open(path, encoding="utf-8") as fh:
        try:
            best = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(best, dict):
        raise ValueError("not an object of method: lr")
    for method, lr in best.items():
        if method not in LR:
            raise ValueError(f"unknown method {method!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"{method}: the lr must be a positive number, got {lr!r}")
    return {m: float(lr) for m, lr in best.items()}


def _run(jobs: list[tuple[str, str, list[str]]], parallel: int) -> list[dict]:
    """Each job (method, side, extra flags) in a fresh worker process, ``parallel`` at a time; results in job order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job: tuple[str, str, list[str]]) -> dict:
        method, side, flags = job
        done = subprocess.run([sys.executable, __file__, "--worker", method, side, *flags],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            lines = (done.stderr.strip() or "worker failed").splitlines()
            return {"method": method, "side": side, "error": lines[-1]}
        return json.loads(done.stdout.strip().splitlines()[-1])

    results: list[dict] = []
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        for result in pool.map(one, jobs):
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sides", default="deltatune,peft")
    p.add_argument("--steps", type=common.at_least(1), default=150)
    p.add_argument("--batch", type=common.at_least(1), default=8)
    p.add_argument("--max-length", type=common.at_least(1), default=96)
    p.add_argument("--max-new-tokens", type=common.at_least(1), default=48)
    p.add_argument("--eval-rows", type=common.at_least(1), default=100)
    p.add_argument("--general-blocks", type=common.at_least(1), default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--autocast", action="store_true", help="train under bf16 autocast (fp32 weights)")
    p.add_argument(
        "--rank", type=common.at_least(1), help="r of every LoRA row, alpha 2r (default: the table's r 8, alpha 16)"
    )
    p.add_argument("--lr", type=float, help="one learning rate for every method (default: the LR table)")
    p.add_argument("--lr-from", help="the best rates of a --sweep run (its JSON); with --sweep, its centres")
    p.add_argument(
        "--peft-prefix-mlp-once",
        action="store_true",
        help="peft's prefix tuning runs its MLP once per step, as deltatune's (the summation-order probe)",
    )
    p.add_argument("--sweep", action="store_true", help="the lr sweep: dev loss at each rate of SWEEP x LR")
    p.add_argument("--sweep-steps", type=common.at_least(1), default=20)
    p.add_argument("--dev-rows", type=common.at_least(1), default=64)
    p.add_argument(
        "--jobs", type=common.at_least(1), default=1, help="worker processes at a time (give each --threads 1)"
    )
    p.add_argument("--seed", type=common.at_least(0), default=0)
    p.add_argument("--threads", type=common.at_least(1))
    p.add_argument("--quick", action="store_true", help="smoke test: 2 steps of 2, 2 eval rows, 8 new tokens")
    p.add_argument("--out", help="also write the markdown report here")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "SIDE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    common.check_out(p, "--out", a.out)
    unknown = [s for s in a.sides.split(",") if s and s not in ("deltatune", "peft")]
    if unknown:
        p.error(f"--sides: unknown side {unknown[0]!r}; sides: deltatune, peft")
    if a.quick:
        a.steps, a.batch, a.eval_rows, a.max_new_tokens, a.general_blocks = 2, 2, 2, 8, 1
    if a.worker:
        a.method, a.side = a.worker
        a.lr = a.lr or LR.get(a.method, 0.0)
        print(json.dumps(worker(a)))
        return 0
    try:
        methods = ["base", *common.pick(a.methods, METHODS)]
    except ValueError as exc:
        print(f"llm_quality.py: error: {exc}", file=sys.stderr)
        return 2
    rates = dict(LR)
    if a.lr_from:
        try:
            rates.update(_lr_from(a.lr_from))
        except (OSError, ValueError) as exc:
            print(f"llm_quality.py: error: --lr-from {a.lr_from}: {exc}", file=sys.stderr)
            return 2
    with open(os.path.join(DATA, "e2e_nlg", "train.jsonl"), encoding="utf-8") as fh:
        have, want = sum(1 for _ in fh), a.dev_rows + (a.sweep_steps if a.sweep else a.steps) * a.batch
    if want > have:
        print(f"llm_quality.py: error: {a.dev_rows} dev rows + the steps x {a.batch} rows asked for are {want}, "
              f"e2e_nlg/train.jsonl has {have}", file=sys.stderr)  # fmt: skip
        return 2
    shared = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
              ("batch", "max_length", "max_new_tokens", "eval_rows", "general_blocks", "dtype", "seed", "dev_rows")]  # fmt: skip
    shared += [f"--threads={a.threads}"] if a.threads else []
    shared += [f"--rank={a.rank}"] if a.rank else []
    shared += ["--autocast"] if a.autocast else []
    shared += ["--peft-prefix-mlp-once"] if a.peft_prefix_mlp_once else []
    command = f"`python benchmarks/llm_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    if a.sweep:
        jobs = [(m, "deltatune", [*shared, f"--steps={a.sweep_steps}", f"--lr={rates[m] * f!r}", "--sweep"])
                for m in methods[1:] if m != "bitfit" for f in SWEEP]  # fmt: skip
        table, best = _sweep_table(_run(jobs, a.jobs))
        report = "\n".join([
            "## The lr sweep: SmolLM2-135M-Instruct on E2E, deltatune side", "", f"- Command: {command}",
            f"- {a.sweep_steps} steps x batch {a.batch} at each rate; dev loss: the answer tokens of "
            f"{a.dev_rows} train rows drawn by the seed (never trained on); the rate is "
            f"{'the best of ' + a.lr_from if a.lr_from else 'LR'} x 1/3, 1, 3.", "", table, "",
        ])  # fmt: skip
        common.emit(report, a.out)
        if a.out:
            with open(os.path.splitext(a.out)[0] + ".json", "w", encoding="utf-8") as fh:
                json.dump(best, fh, indent=1)
        return 0 if len(best) == len(jobs) // len(SWEEP) else 1
    jobs = []
    for method in methods:
        for side in ["deltatune"] if method == "base" else [s for s in a.sides.split(",") if s]:
            if side == "peft" and method in NO_PEFT:
                continue
            lr = a.lr or rates.get(method, 0.0)
            jobs.append((method, side, [*shared, f"--steps={a.steps}", f"--lr={lr!r}"]))
    bitfit = {"method": "bitfit", "side": "deltatune", "error": "SmolLM2 has no biases: nothing to train"}
    done = iter(_run([j for j in jobs if j[0] != "bitfit"], a.jobs))
    results = [bitfit if j[0] == "bitfit" else next(done) for j in jobs]
    report = "\n".join([
        "## Every method on SmolLM2-135M-Instruct: E2E data-to-text SFT", "",
        f"- Command: {command}",
        f"- Budget: {a.steps} steps x batch {a.batch}, max length {a.max_length}, {a.dtype}"
        f"{' under bf16 autocast' if a.autocast else ''}, seed {a.seed}"
        f"{f', every LoRA row at r {a.rank}, alpha {2 * a.rank}' if a.rank else ''}; greedy "
        f"decoding of the first {a.eval_rows} test MRs (up to {a.max_new_tokens} tokens), multi-reference.",
        "- BLEU: sacrebleu corpus BLEU-4; ROUGE-L: rouge-score F, best reference; own BLEU: deltatune.train.metrics "
        f"(sacrebleu's definition, tested equal). forget Δ: loss on {a.general_blocks} x 128 tokens of Tiny Shakespeare, after - "
        "before.", "",
        _table(results), "",
    ])  # fmt: skip
    common.emit(report, a.out)
    if a.out:  # every row's greedy answers, for benchmarks/paired_bleu.py
        test = _rows("test.jsonl", a.eval_rows)
        answers = {f"{r['method']}/{r['side']}": r["answers"] for r in results if "answers" in r}
        refs = references(test)
        with open(os.path.splitext(a.out)[0] + ".answers.json", "w", encoding="utf-8") as fh:
            json.dump({"command": command, "references": refs, "answers": answers}, fh, indent=1)
    return 0 if all("error" not in r or r["method"] == "bitfit" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
