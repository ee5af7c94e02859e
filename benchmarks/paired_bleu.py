"""Is one row of benchmarks/llm_quality.py's table better than another, beyond what its eval rows can resolve?

``llm_quality.py --out X.md`` writes every row's greedy answers to ``X.answers.json``; this compares two of them
on the same eval rows with sacrebleu's own paired tests (the ones ``sacrebleu --paired-bs`` / ``--paired-ar`` run):
paired bootstrap resampling (each row's BLEU as a mean and 95% interval over resamples of the eval rows, and the
p-value of the difference) and approximate randomization (the p-value of swapping the two rows' answers at random).

    python benchmarks/paired_bleu.py qlora80.answers.json lora-all-linear/deltatune lora-4bit/deltatune

``--system-from`` takes the second row from another run's answers file on the same eval rows (refused when their
references differ), to compare a row across budgets or ranks:

    python benchmarks/paired_bleu.py qlora80.answers.json lora-4bit/deltatune lora-4bit/deltatune \\
        --system-from full150.answers.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def paired(
    baseline: list[str], system: list[str], references: list[list[str]], resamples: int = 1000
) -> dict[str, Any]:
    """BLEU of both, the bootstrap mean and 95% half-width of each, and the two tests' p-values for the difference
    (sacrebleu's fixed seed, SACREBLEU_SEED, makes them repeatable)."""
    from llm_quality import streams
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    if not (len(baseline) == len(system) == len(references)):
        raise ValueError(f"the two rows and the references differ in length: {len(baseline)}, {len(system)}, "
                         f"{len(references)}")  # fmt: skip
    named = [("baseline", baseline), ("system", system)]
    out: dict[str, Any] = {"rows": len(system)}
    _, bs = PairedTest(named, {"BLEU": BLEU()}, streams(references), test_type="bs", n_samples=resamples)()
    _, ar = PairedTest(named, {"BLEU": BLEU()}, streams(references), test_type="ar", n_samples=resamples * 10)()
    base, other = bs["BLEU"]
    out.update(baseline=base.score, system=other.score, diff=other.score - base.score)
    out.update(baseline_mean=base.mean, baseline_ci=base.ci, system_mean=other.mean, system_ci=other.ci)
    out.update(p_bootstrap=other.p_value, p_randomization=ar["BLEU"][1].p_value)
    return out


def _load(path: str, names: list[str]) -> tuple[dict[str, Any], list[list[str]]]:
    """An answers file and the named rows of it; ValueError with the one line to print when it is not usable."""
    try:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        saved["references"]  # noqa: B018 (a file without it is not an answers file)
        return saved, [saved["answers"][name] for name in names]
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path}: not an answers file ({exc})") from None
    except KeyError as exc:
        if exc.args[0] in ("references", "answers"):
            raise ValueError(f"{path}: not an answers file (no {exc})") from None
        have = ", ".join(saved.get("answers", {})) if isinstance(saved, dict) else "none"
        raise ValueError(f"{path} has no row {exc}; it has {have}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("answers", help="the .answers.json that llm_quality.py --out wrote")
    p.add_argument("baseline", help="a row as method/side, e.g. lora-all-linear/deltatune")
    p.add_argument("system", help="the row compared with it")
    p.add_argument("--system-from", metavar="ANSWERS", help="read the system row from another run's answers file "
                   "(the same eval rows, e.g. a longer run): compares rows across runs")  # fmt: skip
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (x10 randomization trials)")
    a = p.parse_args(argv)
    if a.resamples < 1:
        print(f"paired_bleu.py: error: --resamples must be at least 1, got {a.resamples}", file=sys.stderr)
        return 2
    other = a.system_from or a.answers
    try:
        saved, (baseline,) = _load(a.answers, [a.baseline])
        saved_other, (system,) = _load(other, [a.system])
        if saved_other["references"] != saved["references"]:
            raise ValueError(f"{a.answers} and {other} scored different eval rows (their references differ)")
    except ValueError as exc:
        print(f"paired_bleu.py: error: {exc}", file=sys.stderr)
        return 2
    commands = " and ".join(dict.fromkeys(str(f.get("command", "?")) for f in (saved, saved_other)))
    references = saved["references"]
    if baseline == system:  # sacrebleu's tests would print their floor, 1 / (trials + 1)
        print(f"{a.baseline} and {a.system} gave the same answers on all {len(references)} rows: nothing to test")
        return 0
    try:
        r = paired(baseline, system, references, a.resamples)
    except ValueError as exc:
        files = a.answers if other == a.answers else f"{a.answers} and {other}"
        print(f"paired_bleu.py: error: {files}: {exc}", file=sys.stderr)
        return 2
    print(f"{r['rows']} eval rows, from: {commands}")
    print(f"- {a.baseline}: BLEU {r['baseline']:.2f} (bootstrap {r['baseline_mean']:.2f} +- {r['baseline_ci']:.2f})")
    print(f"- {a.system}: BLEU {r['system']:.2f} (bootstrap {r['system_mean']:.2f} +- {r['system_ci']:.2f})")
    print(f"- difference {r['diff']:+.2f}; p = {r['p_bootstrap']:.4f} (paired bootstrap, {a.resamples} resamples), "
          f"{r['p_randomization']:.4f} (approximate randomization, {a.resamples * 10} trials)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
