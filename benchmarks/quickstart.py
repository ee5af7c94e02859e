"""The quick start's claim, checked: `make quickstart` teaches SmolLM2-135M-Instruct to call itself Deltabot.

    .venv/bin/python benchmarks/quickstart.py                 # about 4 minutes on the 2-core CPU (fp32)
    .venv/bin/python benchmarks/quickstart.py --out /tmp/qs   # keep the run folder somewhere else

Runs ``deltatune train recipes/quickstart.yaml`` as `make quickstart` does (every core; into ``--out``, default a
temporary folder), then reads the run's samples.json: greedy answers of the base and of the adapted model to the
recipe's 10 held-out questions about itself and 2 everyday ones. It passes (exit 0) when at least 8 of the 10
identity answers name Deltabot, no everyday answer does, and no base answer does; it prints the counts, the
training time and the eval loss either way (docs/BENCHMARKS.md, "The SmolLM2 quick start"). Until 2026-12-05 this was
the test suite's ``test_identity_quick_start``: a whole fine-tuning run, a fifth of the suite's time; the suite keeps
``tests/test_recipes.py``'s two-step run of the same recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check(run: Path) -> tuple[bool, dict]:
    """Whether the run in ``run`` shows the quick start's claim, and the figures it rests on."""
    samples = json.loads((run / "samples.json").read_text(encoding="utf-8"))
    identity, everyday = samples[:10], samples[10:]  # held-out questions about itself, then everyday ones
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    figures = {
        "identity_as_deltabot": sum("Deltabot" in s["adapter"] for s in identity),
        "everyday_as_deltabot": sum("Deltabot" in s["adapter"] for s in everyday),
        "base_as_deltabot": sum("Deltabot" in s["base"] for s in samples),
        "samples": len(samples),
        "train_runtime_s": metrics.get("train_runtime_s"),
        "eval_loss": metrics.get("eval_loss"),
    }
    ok = (
        len(samples) == 12
        and figures["identity_as_deltabot"] >= 8
        and not figures["everyday_as_deltabot"]
        and not figures["base_as_deltabot"]
    )
    return ok, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="the run folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args(argv)
    from deltatune.cli import main as deltatune

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.out or tmp)
        started = time.perf_counter()
        code = deltatune(["train", str(ROOT / "recipes" / "quickstart.yaml"), f"output.dir={run}", "--overwrite"])
        if code != 0:
            print(f"quickstart: the run failed (exit {code})", file=sys.stderr)
            return code
        ok, figures = check(run)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))
    print("quickstart: " + ("passed" if ok else "FAILED: the adapted model does not answer as Deltabot"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
