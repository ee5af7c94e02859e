"""Probe 5 of the CLI: ``deltatune eval`` of a finished causal-LM run gives back the run's own final metrics."""

from __future__ import annotations

import json
import os

import pytest
from tiny import save_tiny

from deltatune.cli import main

TRAIN_ARGS = ["train.max_steps=2", "train.report_to=[none]", "train.lr=1e-2"]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sft_recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    model = save_tiny(tmp / "m", "llama")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"what is {i} plus {i}"},
                {"role": "assistant", "content": f"{2 * i}"},
            ]
        }
        for i in range(12)
    ]
    data = _jsonl(tmp / "chat.jsonl", rows)
    recipe = tmp / "sft.yaml"
    recipe.write_text(
        f"stage: sft\nmodel: {{name_or_path: {model}}}\nmethod: {{name: lora, r: 4, target_modules: all-linear}}\n"
        f"data: {{train: {data}, eval: {data}, max_length: 64}}\ntrain: {{batch_size: 4}}\n"
    )
    return tmp, str(recipe)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_of_a_finished_sft_run_gives_its_own_final_metrics(capsys, sft_recipe, precision):
    """The run evaluated with the fused causal-LM loss; eval loaded the adapter without it, so under bf16 autocast
    its eval_loss moved by float32 ulps (in a probe 10.2832575 against the run's 10.2832556)."""
    tmp, recipe = sft_recipe
    out = str(tmp / f"run-{precision}")
    assert main(["train", recipe, *TRAIN_ARGS, f"output.dir={out}", f"train.precision={precision}"]) == 0
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
        trained = json.load(fh)
    capsys.readouterr()
    assert main(["eval", "--adapter", out]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["eval_loss"] == trained["eval_loss"]
    assert again["eval_perplexity"] == trained["eval_perplexity"]
