"""``deltatune serve`` throughput: the same chat requests, mixing four models (the base, a LoRA, an IA3 and a
prompt-tuning adapter on one base), sent by many concurrent clients against sent one at a time.

    .venv/bin/python benchmarks/serve.py                        # SmolLM2-135M-Instruct, 32 requests x 16 tokens
    .venv/bin/python benchmarks/serve.py --requests 64 --concurrency 32 --max-tokens 32
    .venv/bin/python benchmarks/serve.py --quick                # smoke test: a tiny random llama, seconds

The adapters are made here with random, non-zero weights (what is timed is serving, not their quality) and saved,
then loaded by ``deltatune.serve.build_engine`` as ``deltatune serve`` does. The server runs in this process on
127.0.0.1 (uvicorn in a thread); clients are the official ``openai`` client, one per thread. Every request asks
greedy decoding of exactly ``--max-tokens`` tokens (``ignore_eos``), so both modes do the same work; the answers of
the two modes are compared and any difference is reported. The report is markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

import torch

PROMPTS = [
    "What is a low-rank adapter?",
    "Name three colours.",
    "Write one sentence about the sea.",
    "How many legs does a cat have?",
    "Say hello in French.",
    "What is two plus two?",
]
MODELS = ["base", "lora", "ia3", "prompt_tuning"]


def make_adapters(model_name: str, root: str) -> dict[str, str]:
    """Save a LoRA, an IA3 and a prompt-tuning adapter (random, non-zero) for ``model_name`` under ``root``."""
    import deltatune as dt
    from deltatune.train.models import load_model

    configs = {
        "lora": dt.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
        "ia3": dt.IA3Config(init_ia3_weights=False, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "prompt_tuning": dt.PromptTuningConfig(num_virtual_tokens=8),
    }  # fmt: skip
    folders = {}
    for seed, (name, config) in enumerate(configs.items(), start=1):
        torch.manual_seed(seed)
        model = dt.get_delta_model(load_model(model_name, "CAUSAL_LM"), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and "ia3" in n:
                    p.add_(torch.randn_like(p) * 0.1)
        folders[name] = os.path.join(root, name)
        model.save_pretrained(folders[name])
    return folders


def tiny_base(root: str) -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from tiny import save_tiny

    return save_tiny(os.path.join(root, "base"), "llama")


class Server:
    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run(url: str, work: list[tuple[str, str]], clients: int, max_tokens: int) -> tuple[float, list[str], int]:
    """Send ``work`` ((model, prompt) pairs) with ``clients`` threads; (seconds, answers, completion tokens)."""
    import openai

    answers: list[str | None] = [None] * len(work)
    tokens = [0] * len(work)

    def worker(k: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        for i in range(k, len(work), clients):
            model, prompt = work[i]
            out = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            answers[i], tokens[i] = out.choices[0].message.content, out.usage.completion_tokens

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, [a or "" for a in answers], sum(tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="base model (default smollm2: SmolLM2-135M-Instruct)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"the models requests cycle through (default {','.join(MODELS)})"
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--quick", action="store_true", help="a tiny random llama, 16 requests x 4 tokens")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from deltatune.serve import build_engine
    from deltatune.serve.app import create_app

    root = tempfile.mkdtemp(prefix="deltatune-serve-bench-")
    model = tiny_base(root) if args.quick else args.model
    if args.quick:
        args.requests, args.max_tokens = 16, 4
    folders = make_adapters(model, os.path.join(root, "adapters"))
    engine = build_engine(model, folders, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms)
    server = Server(create_app(engine, max_tokens=max(args.max_tokens, 16)))
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown[0]!r}; choose from {', '.join(MODELS)}")
    work = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    try:
        run(server.url, work[:4], 1, 2)  # warm-up: first calls pay for lazy initialisation
        rows = []
        results = {}
        for mode, clients in (("one at a time", 1), (f"{args.concurrency} concurrent clients", args.concurrency)):
            batches, joined = engine.batches, engine.joined
            seconds, answers, tokens = run(server.url, work, clients, args.max_tokens)
            results[mode] = answers
            rows.append((mode, seconds, tokens, engine.batches - batches, engine.joined - joined))
    finally:
        server.stop()
        engine.close()
    first, second = results.values()
    mismatches = sum(a != b for a, b in zip(first, second))
    base_rate = rows[0][2] / rows[0][1]
    print(f"# deltatune serve throughput ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n")
    print(f"- command: `{' '.join(['.venv/bin/python', 'benchmarks/serve.py', *(argv or sys.argv[1:])])}`")
    print(
        f"- base: {model if not args.quick else 'tiny random llama'}; adapters: LoRA r8 q+v, IA3 k+down, prompt tuning 8"
    )
    print(f"- {args.requests} chat requests cycling {', '.join(models)}; greedy, {args.max_tokens} tokens each")
    print(f"- engine: max batch {args.max_batch_size}, max wait {args.max_wait_ms} ms; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"- answers equal in both modes: {len(work) - mismatches}/{len(work)}\n")
    print("| mode | wall s | requests/s | completion tokens/s | speed-up | batches | joined |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, seconds, tokens, batches, joined in rows:
        rate = tokens / seconds
        print(
            f"| {mode} | {seconds:.2f} | {len(work) / seconds:.2f} | {rate:.1f} | {rate / base_rate:.2f}x | {batches} | {joined} |"
        )
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
