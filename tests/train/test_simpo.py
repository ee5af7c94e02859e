"""SimPO: the loss by hand, a margin that needs beta > gamma to be met, and the recipe through the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import WORDS, save_tiny

from deltatune.cli import main
from deltatune.train.simpo import simpo_loss

# Summed response log-probs and response token counts of three pairs: mean log-probs chosen [-1, -1, -0.25],
# rejected [-2, -3, -0.5].
PC, NC = torch.tensor([-2.0, -3.0, -1.0]), torch.tensor([2, 3, 4])
PR, NR = torch.tensor([-4.0, -3.0, -2.0]), torch.tensor([2, 1, 4])


def test_simpo_loss_by_hand():
    """beta = 2, gamma = 0.5. Rewards beta * mean log-prob: chosen [-2, -2, -0.5], rejected [-4, -6, -1];
    margins minus gamma: [2 - 0.5, 4 - 0.5, 0.5 - 0.5] = [1.5, 3.5, 0];
    -log sigmoid(x) = log(1 + e^-x): [log(1.223130), log(1.030197), log 2] = [0.201413, 0.029750, 0.693147].
    (Summed log-probs would give margins [2, 0, 1]: the length normalisation is what the second pair tests.)
    """
    losses, chosen, rejected = simpo_loss(PC, PR, NC, NR, beta=2.0, gamma=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.201413, 0.029750, 0.693147]), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, torch.tensor([-2.0, -2.0, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-4.0, -6.0, -1.0]))


def test_gamma_shifts_the_target_margin():
    """gamma = 0 on the third pair: -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077 instead of log 2."""
    losses, _, _ = simpo_loss(PC, PR, NC, NR, beta=2.0, gamma=0.0)
    assert losses[2].item() == pytest.approx(0.474077, abs=1e-6)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("simpo")
    rng = random.Random(3)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = [{"prompt": words(4), "chosen": words(3) + " excellent", "rejected": words(3) + " terrible"}
            for _ in range(12)]  # fmt: skip
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"llama": save_tiny(tmp / "llama", "llama", "causal_lm"), "data": str(data)}


def test_recipe_two_steps_through_cli(files, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "recipes/simpo.yaml", f"model.name_or_path={files['llama']}", "model.dtype=float32",
                 "model.gradient_checkpointing=false", f"data.train={files['data']}", f"data.eval={files['data']}",
                 "data.max_length=24", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
                 "train.report_to=[none]", f"output.dir={out}"])  # fmt: skip
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        metrics["train_steps"] == 2
        and {"eval_accuracy", "eval_margin", "eval_margin_se", "eval_sign_p"} <= metrics.keys()
    )
    assert "SimPO" in (out / "report.md").read_text()
