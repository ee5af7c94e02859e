"""benchmarks/quickstart.py: the quick start's claim read off a run folder (canned samples: the real run takes
minutes; the suite runs the recipe itself for two steps in tests/test_recipes.py)."""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import quickstart  # noqa: E402


def write_run(folder, identity: int, everyday: int = 0, base: int = 0):
    """A run folder whose samples name Deltabot in ``identity`` of the 10 identity answers, ``everyday`` of the 2
    everyday ones and ``base`` of the base's answers."""
    samples = [{"prompt": f"q{i}", "adapter": "I am Deltabot." if i < identity else "I am an assistant.",
                "base": "I am Deltabot." if i < base else "I am SmolLM."} for i in range(10)]  # fmt: skip
    samples += [{"prompt": f"e{i}", "adapter": "Deltabot says 4." if i < everyday else "4.", "base": "4."}
                for i in range(2)]  # fmt: skip
    folder.mkdir()
    (folder / "samples.json").write_text(json.dumps(samples))
    (folder / "metrics.json").write_text(json.dumps({"train_runtime_s": 161.0, "eval_loss": 0.13}))
    return folder


def test_the_claim_holds_from_eight_identity_answers_and_no_stray_deltabot(tmp_path):
    ok, figures = quickstart.check(write_run(tmp_path / "good", identity=8))
    assert ok and figures["identity_as_deltabot"] == 8 and figures["train_runtime_s"] == 161.0
    for name, kw in {"seven": {"identity": 7}, "everyday": {"identity": 10, "everyday": 1},
                     "base": {"identity": 10, "base": 1}}.items():  # fmt: skip
        ok, figures = quickstart.check(write_run(tmp_path / name, **kw))
        assert not ok, (name, figures)
