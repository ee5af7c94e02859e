"""ORPO: the loss by hand, the trainer's loss against the formula on a real forward pass, and the recipe through
the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import WORDS, save_tiny
from transformers import set_seed

from deltatune.cli import main
from deltatune.model import get_delta_model
from deltatune.train import build
from deltatune.train.models import load_tokenizer
from deltatune.train.orpo import orpo_loss
from deltatune.train.run import _training_args, build_model
from deltatune.train.table import prepare as _prepare

# Summed response log-probs and response token counts of three pairs: mean log-probs chosen [-1, -1, -0.25],
# rejected [-2, -3, -0.5].
PC, NC = torch.tensor([-2.0, -3.0, -1.0]), torch.tensor([2, 3, 4])
PR, NR = torch.tensor([-4.0, -3.0, -2.0]), torch.tensor([2, 1, 4])


def test_orpo_loss_by_hand():
    """log odds(a) = a - log(1 - e^a) for a mean log-prob a:

        a = -1: -1 - log(0.632121) = -1 + 0.458675 = -0.541325
        a = -2: -2 + 0.145413 = -1.854587;   a = -3: -3 + 0.051069 = -2.948931
        a = -0.25: -0.25 - log(0.221199) = -0.25 + 1.508692 = 1.258692;   a = -0.5: -0.5 + 0.932752 = 0.432752
    log OR = [-0.541325 + 1.854587, -0.541325 + 2.948931, 1.258692 - 0.432752] = [1.313262, 2.407606, 0.825939]
    -log sigmoid(x) = log(1 + e^-x) = [0.238183, 0.086206, 0.363131], mean 0.229173
    NLL of the chosen responses = (2 + 3 + 1) / (2 + 3 + 4) tokens = 0.666667
    loss (lambda = beta = 0.5) = 0.666667 + 0.5 * 0.229173 = 0.781253; rewards beta * mean log-prob.
    """
    loss, log_or, chosen, rejected = orpo_loss(PC, PR, NC, NR, beta=0.5)
    torch.testing.assert_close(log_or, torch.tensor([1.313262, 2.407606, 0.825939]), atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, torch.tensor(0.781253), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, torch.tensor([-0.5, -0.5, -0.125]))
    torch.testing.assert_close(rejected, torch.tensor([-1.0, -1.5, -0.25]))


def test_orpo_loss_is_finite_for_a_certain_response():
    """A response of probability 1 (mean log-prob 0) would make log(1 - P) infinite; the cap keeps it finite."""
    loss, log_or, _, _ = orpo_loss(torch.tensor([0.0]), torch.tensor([-5.0]), torch.tensor([3]), torch.tensor([3]))
    assert torch.isfinite(loss) and log_or.item() > 10


def pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"prompt": words(4), "chosen": words(3) + " excellent", "rejected": words(2) + " terrible"}
            for _ in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("orpo")
    out = {"llama": save_tiny(tmp / "llama", "llama", "causal_lm")}
    for name, n, seed in (("train", 16, 1), ("eval", 8, 2)):
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in pairs(n, seed)))
        out[name] = str(path)
    return out


def test_trainer_loss_is_the_formula_on_a_forward_pass(files, tmp_path):
    """The trainer's loss on a batch equals orpo_loss of log-probs summed position by position from the logits."""
    cfg = build({
        "stage": "orpo", "model": {"name_or_path": files["llama"]},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False},
        "data": {"train": files["train"], "max_length": 24}, "align": {"beta": 0.3, "disable_prompt_loss": True},
        "train": {"batch_size": 4, "report_to": ["none"]}, "output": {"dir": str(tmp_path / "run")},
    })  # fmt: skip
    set_seed(0)
    tok = load_tokenizer(cfg.model.name_or_path)
    prepared = _prepare(cfg, tok)
    delta = get_delta_model(build_model(cfg, tok), cfg.method_config("CAUSAL_LM"))
    trainer = prepared.trainer_class(model=delta, args=_training_args(cfg, prepared, cfg.output.dir),
                                     train_dataset=prepared.train, data_collator=prepared.collator)  # fmt: skip
    batch = prepared.collator(prepared.train[:4])
    delta.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(delta, batch)
        logp = torch.log_softmax(
            delta(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1
        )
    sums, counts = [], []
    for row in range(8):  # 4 chosen, then 4 rejected
        picked = [logp[row, t - 1, lab] for t, lab in enumerate(batch["labels"][row].tolist()) if lab != -100]
        sums.append(sum(picked))
        counts.append(len(picked))
    sums, counts = torch.stack(sums), torch.tensor(counts)
    expected, *_ = orpo_loss(sums[:4], sums[4:], counts[:4], counts[4:], beta=0.3)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    assert counts[4:].tolist() != counts[:4].tolist()  # the guard: lengths differ, so means and sums disagree


def test_recipe_two_steps_through_cli(files, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "recipes/orpo.yaml", f"model.name_or_path={files['llama']}", "model.dtype=float32",
                 "model.gradient_checkpointing=false", f"data.train={files['train']}", f"data.eval={files['eval']}",
                 "data.max_length=24", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
                 "train.report_to=[none]", f"output.dir={out}"])  # fmt: skip
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        metrics["train_steps"] == 2
        and {"eval_accuracy", "eval_margin", "eval_margin_se", "eval_sign_p", "eval_loss"} <= metrics.keys()
    )
    assert "ORPO" in (out / "report.md").read_text() and (out / "adapter_model.safetensors").is_file()
