"""DPO: the losses by hand, log 2 at initialisation, learning a synthetic preference, precomputed reference log-probs
equal to per-step ones, and the recipe through the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tiny import WORDS, save_tiny
from transformers import set_seed

from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.model import get_delta_model
from deltatune.train import build
from deltatune.train.dpo import dpo_loss
from deltatune.train.models import load_tokenizer
from deltatune.train.run import _training_args, build_model
from deltatune.train.table import prepare as _prepare

# policy chosen / rejected and reference chosen / rejected summed log-probs of three pairs.
PC, PR = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0])
RC, RR = torch.tensor([-1.5, -2.0, -2.0]), torch.tensor([-1.5, -2.0, -2.0])


def test_dpo_sigmoid_loss_by_hand():
    """pi_c - ref_c = [0.5, 0, -1]; pi_r - ref_r = [-0.5, 0, 1]; h = [1, 0, -2]; beta = 0.5, so beta h = [0.5, 0, -1].

    -log sigmoid(x) = log(1 + exp(-x)):
        x = 0.5: log(1 + 0.606531) = 0.474077
        x = 0:   log 2             = 0.693147
        x = -1:  log(1 + 2.718282) = 1.313262
    Rewards beta (pi - ref): chosen [0.25, 0, -0.5], rejected [-0.25, 0, 0.5].
    """
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.474077, 0.693147, 1.313262]), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, torch.tensor([0.25, 0.0, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.25, 0.0, 0.5]))


def test_dpo_label_smoothed_loss_by_hand():
    """cDPO with eps = 0.1: 0.9 * (-log sigmoid(x)) + 0.1 * (-log sigmoid(-x)), x = beta h = [0.5, 0, -1].

    x = 0.5: 0.9 * 0.474077 + 0.1 * log(1 + e^0.5)=0.974077  -> 0.426669 + 0.097408 = 0.524077
    x = 0:   0.9 * 0.693147 + 0.1 * 0.693147                 -> 0.693147
    x = -1:  0.9 * 1.313262 + 0.1 * log(1 + e^-1)=0.313262   -> 1.181936 + 0.031326 = 1.213262
    """
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.524077, 0.693147, 1.213262]), atol=1e-6, rtol=0)


def test_ipo_loss_by_hand():
    """IPO over per-token averages: chosen responses of [2, 1, 4] tokens, rejected of [1, 2, 2].

    pi_c - ref_c = [0.5, 0, -1] -> per token [0.25, 0, -0.25]; pi_r - ref_r = [-0.5, 0, 1] -> [-0.5, 0, 0.5];
    h_avg = [0.75, 0, -0.75]; beta = 0.5, so (h_avg - 1)^2 = [0.0625, 1, 3.0625]. The rewards stay sums.
    """
    nc, nr = torch.tensor([2, 1, 4]), torch.tensor([1, 2, 2])
    losses, chosen, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo", chosen_tokens=nc, rejected_tokens=nr)
    torch.testing.assert_close(losses, torch.tensor([0.0625, 1.0, 3.0625]))
    torch.testing.assert_close(chosen, torch.tensor([0.25, 0.0, -0.5]))
    with pytest.raises(ValueError, match="token"):
        dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")


def test_unknown_loss_type_refused():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto_pair")


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Chosen responses end with 'excellent', rejected ones with 'terrible'; the rest is random words."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [
        {"prompt": words(4), "chosen": words(3) + " excellent", "rejected": words(3) + " terrible"} for _ in range(n)
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    out = {"llama": save_tiny(tmp / "llama", "llama", "causal_lm")}
    for name, n, seed in (("train", 64, 1), ("eval", 16, 2)):
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(n, seed)))
        out[name] = str(path)
    return out


def dpo_recipe(files, out: str, **align) -> dict:
    return {
        "stage": "dpo",
        "model": {"name_or_path": files["llama"]},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": files["train"], "eval": files["eval"], "max_length": 24},
        "train": {"batch_size": 8, "lr": 1e-2, "seed": 0, "report_to": ["none"], "logging_steps": 1, "max_steps": 3},
        "align": {"beta": 0.1, **align},
        "output": {"dir": out},
    }


def make_trainer(cfg):
    """The run's own pieces (tokenizer, stage, model, trainer), so the test can evaluate before training."""
    set_seed(cfg.train.seed)  # as train() does: the same LoRA init in every run
    tok = load_tokenizer(cfg.model.name_or_path)
    prepared = _prepare(cfg, tok)
    delta = get_delta_model(build_model(cfg, tok), cfg.method_config("CAUSAL_LM"))
    return prepared.trainer_class(
        model=delta,
        args=_training_args(cfg, prepared, cfg.output.dir),
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=prepared.collator,
        compute_metrics=prepared.compute_metrics,
    )


def test_loss_is_log2_at_init_then_preference_is_learned(files, tmp_path):
    trainer = make_trainer(build(dpo_recipe(files, str(tmp_path / "run"), label_smoothing=0.1)))
    before = trainer.evaluate()
    # The adapter starts as the identity (LoRA B = 0): policy = reference, h = 0, so every pair costs log 2 (also
    # with label smoothing: 0.9 log 2 + 0.1 log 2), and the implicit rewards are exactly 0.
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["eval_margin"] == 0.0 and before["eval_accuracy"] == 0.0
    trainer.args.max_steps = 30
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_accuracy"] > 0.9, after
    assert after["eval_margin"] > 0.05, after
    assert after["eval_loss"] < math.log(2) - 0.01
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= logged[-1].keys()
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]


def test_precomputed_reference_equals_per_step_reference(files, tmp_path):
    """The same 3 steps with reference log-probs computed once up front and at every step: equal adapters. The tiny
    llama has no dropout, so both see the same reference numbers."""
    adapters = []
    for pre in (False, True):
        trainer = make_trainer(build(dpo_recipe(files, str(tmp_path / f"run{pre}"), precompute_ref=pre)))
        if pre:
            assert "ref_chosen_logp" in trainer.train_dataset[0]
        trainer.train()
        state = trainer.model.adapter_state_dict()
        adapters.append({k: v.detach().clone() for k, v in state.items()})
    assert any(v.abs().sum() > 0 for k, v in adapters[0].items() if "lora_B" in k)  # training moved the adapter
    for k in adapters[0]:
        torch.testing.assert_close(adapters[0][k], adapters[1][k], atol=1e-5, rtol=0)


def test_precomputed_reference_matches_the_policy_under_bf16(files, tmp_path):
    """Under train.precision bf16 the policy's forwards run in autocast. The reference log-probs computed up front must
    come from the same arithmetic: an fp32 reference would start every implicit reward off zero by bf16's rounding,
    summed over the response."""
    recipe = dpo_recipe(files, str(tmp_path / "run"), precompute_ref=True)
    recipe["train"]["precision"] = "bf16"
    trainer = make_trainer(build(recipe))
    assert "ref_chosen_logp" in trainer.eval_dataset[0]
    before = trainer.evaluate()
    assert before["eval_reward_chosen"] == 0.0 and before["eval_reward_rejected"] == 0.0, before
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "freeze"}])
def test_a_method_training_the_base_in_place_has_no_reference(files, tmp_path, capsys, method):
    """The reference is the base with the adapter switched off; full and freeze tuning train the base's own weights,
    so it was the trained policy itself: the loss stayed log 2, every reward 0, while the weights moved. Refused
    before the folder changes; with the reference scored before the first step (precompute_ref) the run learns, and
    evaluating it later against its base (gone) is refused."""
    out = tmp_path / "run"
    recipe = dpo_recipe(files, str(out)) | {"method": method}
    recipe["train"]["lr"] = 1e-3
    with pytest.raises(ConfigError, match=rf"^method.name={method['name']}: stage dpo scores the policy against "):
        main_train(recipe)
    assert not out.exists()
    recipe["align"]["precompute_ref"] = True
    metrics = main_train(recipe)
    assert metrics["eval_margin"] != 0.0 and metrics["eval_loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert main(["eval", "--adapter", str(out)]) == 2
    assert "this run cannot be evaluated against its base" in capsys.readouterr().err


def main_train(recipe: dict) -> dict:
    from deltatune.train import train

    return train(build(recipe))


def test_recipe_two_steps_through_cli(files, tmp_path, capsys):
    out = str(tmp_path / "run")
    code = main(["train", "recipes/hh-rlhf-dpo.yaml", f"model.name_or_path={files['llama']}", "model.dtype=float32", "train.precision=fp32",
                 "model.gradient_checkpointing=false", f"data.train={files['train']}", f"data.eval={files['eval']}",
                 "data.max_length=24", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
                 "train.report_to=[none]", f"output.dir={out}"])  # fmt: skip
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2 and "eval_accuracy" in metrics and "eval_reward_chosen" in metrics
    assert 0.0 <= metrics["eval_sign_p"] <= 1.0 and metrics["eval_margin_se"] >= 0.0
    # the run evaluated before training (eval_on_start) and at its end, once each: the final metrics are the last
    # step's evaluation, not a second pass over the same weights
    lines = (tmp_path / "run" / "log_history.jsonl").read_text(encoding="utf-8").splitlines()
    history = [json.loads(line) for line in lines]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 2]
    assert metrics["eval_loss"] == evals[-1]["eval_loss"] and metrics["eval_accuracy"] == evals[-1]["eval_accuracy"]
    # Before the first step every implicit reward is 0, so every pair starts as a tie (not a win): each pair won at
    # the end was gained, none lost, and the step-0 evaluation has nothing to be paired with.
    n = len(Path(files["eval"]).read_text(encoding="utf-8").splitlines())
    assert (metrics["eval_gained"], metrics["eval_lost"]) == (round(metrics["eval_accuracy"] * n), 0)
    assert "eval_gained" not in evals[0]
    # deltatune eval scores the saved adapter on the same pairs alike (the recipe precomputes reference log-probs in
    # training; eval computes them per batch).
    assert main(["eval", "--adapter", out]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)
    assert scored["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    # --compare: the run's start is the reference itself (the adapter is the identity), so its loss is log 2 and
    # its accuracy 0, and the paired figures are the run's.
    assert main(["eval", "--adapter", out, "--compare"]) == 0
    compared = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert compared["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert compared["eval_accuracy_before"] == 0.0 and compared["eval_margin_before"] == 0.0
    assert (compared["eval_gained"], compared["eval_lost"]) == (metrics["eval_gained"], 0)


@pytest.mark.parametrize(
    "align, message",
    [
        (
            {"loss_type": "kto_pair"},
            "align.loss_type must be one of sigmoid, ipo, .*, got 'kto_pair'",
        ),
        (
            {"loss_type": "ipo", "label_smoothing": 0.1},
            "align.label_smoothing is for the sigmoid and robust losses; align.loss_type is ipo",
        ),
        ({"label_smoothing": 0.5}, r"align.label_smoothing must be in \[0, 0.5\)"),
        ({"beta": 0}, "align.beta must be > 0"),
        ({"betta": 0.1}, "did you mean 'beta'"),
        ({"gamma": 1.5}, r"align.gamma must be in \[0, 1\], got 1.5"),
        ({"lam": -0.1}, r"align.lam must be in \[0, 1\], got -0.1"),
        ({"vf_coef": -1.0}, "align.vf_coef must be >= 0, got -1.0"),
        ({"desirable_weight": -0.5}, "align.desirable_weight must be >= 0, got -0.5"),
    ],
)
def test_align_section_is_validated(align, message):
    with pytest.raises(ConfigError, match=message):
        build({"stage": "dpo", "align": align})
