"""Reward model (stage rm): the pairwise loss by hand, learning a synthetic preference, the recipe through the CLI
(train then eval), and bad preference rows."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from tiny import WORDS, save_tiny

from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.data.load import DataError, read_rows
from deltatune.data.preference import read_pairs
from deltatune.train import build, evaluate, train
from deltatune.train.pairs import pair_metrics, paired_change, sign_test
from deltatune.train.reward import pairwise_loss
from deltatune.train.scorers import RewardScorer

MARKER = "excellent"


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Random word prompts and responses; the chosen response holds the marker word somewhere, the rejected not."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(5)]
        chosen = words[:]
        chosen.insert(rng.randrange(6), MARKER)
        rows.append(
            {
                "prompt": " ".join(rng.choice(WORDS) for _ in range(4)),
                "chosen": " ".join(chosen),
                "rejected": " ".join(rng.choice(WORDS) for _ in range(6)),
            }
        )
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def rm_recipe(model: str, train_file: str, eval_file: str, out: str, **train_args) -> dict:
    return {
        "stage": "rm",
        "model": {"name_or_path": model},
        "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
        "data": {"train": train_file, "eval": eval_file, "max_length": 32},
        "train": {"batch_size": 16, "lr": 5e-3, "seed": 0, "report_to": ["none"], "logging_steps": 50, **train_args},
        "output": {"dir": out},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    bert = save_tiny(tmp / "bert", "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {
        "tmp": tmp,
        "bert": bert,
        "train": write_jsonl(tmp / "train.jsonl", synthetic_pairs(256, seed=1)),
        "eval": write_jsonl(tmp / "eval.jsonl", synthetic_pairs(64, seed=2)),
    }


def test_pairwise_loss_by_hand():
    """chosen = [1, 0, 2], rejected = [0, 0, -1]: margins m = [1, 0, 3].

    -log sigmoid(m) = log(1 + exp(-m)):
        m = 1: log(1 + 0.367879) = 0.313262
        m = 0: log 2              = 0.693147
        m = 3: log(1 + 0.049787) = 0.048587
    mean = (0.313262 + 0.693147 + 0.048587) / 3 = 1.054996 / 3 = 0.351665
    """
    loss = pairwise_loss(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, -1.0]))
    torch.testing.assert_close(loss, torch.tensor(0.351665), atol=1e-6, rtol=0)
    # Swapping chosen and rejected must cost more: the loss is not symmetric.
    assert pairwise_loss(torch.tensor([0.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 2.0])) > loss + 1
    assert math.isclose(pairwise_loss(torch.zeros(3), torch.zeros(3)).item(), math.log(2), abs_tol=1e-7)


def test_pair_metrics_by_hand():
    """Scores [chosen, rejected] = [1, 0], [0, 0], [2, -1]: margins 1, 0, 3. A tie is not a win, so accuracy is 2/3;
    the mean margin is 4/3."""
    m = pair_metrics(np.array([[1.0, 0.0], [0.0, 0.0], [2.0, -1.0]]))
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["margin"] == pytest.approx(4 / 3)
    # Margins 1, 0, 3: mean 4/3, sample variance ((1/3)^2 + (4/3)^2 + (5/3)^2) / 2 = 7/3, SE sqrt(7/3 / 3).
    assert m["margin_se"] == pytest.approx(math.sqrt(7 / 9))
    # Two wins, no loss, one tie left out: 2 * P(X <= 0 | n 2) = 2 * 1/4.
    assert m["sign_p"] == pytest.approx(0.5)


def test_sign_test_by_hand():
    """The exact two-sided sign test: 9 wins of 10 gives 2 * (1 + 10) / 1024; a 5:5 split, and no non-tied pair,
    give 1; the side does not matter."""
    assert sign_test(9, 1) == pytest.approx(22 / 1024)
    assert sign_test(1, 9) == sign_test(9, 1)
    assert sign_test(5, 5) == 1.0
    assert sign_test(0, 0) == 1.0
    # 141 wins of 256 (DPO's accuracy 0.551 with no ties): not past a coin at 5%.
    assert 0.05 < sign_test(141, 115) < 0.2
    scipy_stats = pytest.importorskip("scipy.stats")
    for wins, losses in ((141, 115), (30, 12), (0, 7), (200, 200), (5100, 4900)):
        assert sign_test(wins, losses) == pytest.approx(scipy_stats.binomtest(wins, wins + losses).pvalue, rel=1e-12)
    # All ties (an adapter that is still the identity): no evidence either way.
    assert pair_metrics(np.zeros((4, 2)))["sign_p"] == 1.0


def test_paired_change_by_hand():
    """Three pairs scored twice. Start: won, lost, tie (not a win). Now: lost, won, won. Pair 1 was lost and pairs
    2 and 3 gained, so the accuracy went from 1/3 to 2/3 = (2 - 1) / 3 more; McNemar's exact test is the sign test
    on the 2:1 split of the changed pairs, 2 * (1 + 3) / 8 = 1."""
    start = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    now = np.array([[0.0, 2.0], [3.0, 1.0], [0.6, 0.5]])
    assert paired_change(start, now) == {"gained": 2, "lost": 1, "paired_p": 1.0}
    assert paired_change(start, start) == {"gained": 0, "lost": 0, "paired_p": 1.0}
    # 20 pairs gained, 4 lost, 76 the same: 2 * P(X <= 4 | n 24, 1/2) = 2 * (1 + 24 + 276 + 2024 + 10626) / 2^24.
    rng = np.random.default_rng(0)
    won = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 20 + [[1.0, 0.0]] * 40 + [[0.0, 1.0]] * 36)
    flipped = won.copy()
    flipped[:24] = flipped[:24, ::-1]
    order = rng.permutation(100)
    change = paired_change(won[order], flipped[order])
    assert (change["gained"], change["lost"]) == (20, 4)
    assert change["paired_p"] == pytest.approx(2 * 12951 / 2**24, rel=1e-12)


@pytest.mark.slow
def test_reward_model_learns_marker_preference(files, tmp_path):
    """A tiny BERT scores a held-out pair at chance before training and ranks > 90% right after 200 steps."""
    cfg = build(rm_recipe(files["bert"], files["train"], files["eval"], str(tmp_path / "rm"), max_steps=200,
                          eval_on_start=True))  # fmt: skip
    metrics = train(cfg)
    assert 0.3 <= metrics["eval_accuracy_before"] <= 0.7, metrics
    assert metrics["eval_accuracy"] > 0.9, metrics
    assert metrics["eval_margin"] > 1.0, metrics
    # paired with the evaluation before training: the gain is training's, pair by pair
    gained, lost = metrics["eval_gained"], metrics["eval_lost"]
    assert gained - lost == round((metrics["eval_accuracy"] - metrics["eval_accuracy_before"]) * 64), metrics
    assert gained > lost and metrics["eval_paired_p"] < 1e-3, metrics
    # deltatune eval, through run.evaluate, scores the saved adapter the same way.
    again = evaluate(str(tmp_path / "rm"))
    assert again["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    # and the scorer PPO uses ranks the same pairs from text.
    scorer = RewardScorer(str(tmp_path / "rm"))
    rows = synthetic_pairs(64, seed=2)
    c = scorer([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    r = scorer([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert (c > r).float().mean().item() == pytest.approx(metrics["eval_accuracy"])


def test_recipe_two_steps_through_cli_then_eval(files, tmp_path, capsys):
    """recipes/hh-rlhf-rm.yaml, with a tiny model and the synthetic pairs in place of MiniLM and hh_rlhf."""
    out = str(tmp_path / "run")
    code = main(["train", "recipes/hh-rlhf-rm.yaml", f"model.name_or_path={files['bert']}",
                 f"data.train={files['train']}", f"data.eval={files['eval']}", "data.max_length=32",
                 "train.max_steps=2", "train.report_to=[none]", f"output.dir={out}"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    trained = json.loads(printed[-1])
    assert {"eval_accuracy", "eval_margin", "eval_loss"} <= trained.keys()
    # The recipe evaluates before the first step, so the final evaluation is paired with it, pair by pair: the
    # accuracy moved by exactly (gained - lost) of the 64 pairs.
    gained, lost = trained["eval_gained"], trained["eval_lost"]
    assert gained - lost == round((trained["eval_accuracy"] - trained["eval_accuracy_before"]) * 64)
    assert trained["eval_paired_p"] == sign_test(gained, lost)
    assert f"pairs won: {gained} gained, {lost} lost" in "\n".join(printed)
    assert main(["eval", "--adapter", out, "--data", files["eval"]]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "eval_paired_p" not in scored  # one evaluation: nothing to pair it with
    assert scored["eval_accuracy"] == pytest.approx(trained["eval_accuracy"])
    assert scored["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)
    # The adapter alone (a plain adapter folder, as peft saves one) on preference pairs is evaluated as a reward
    # model: a SEQ_CLS adapter on pairs is stage rm; the same figures.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / name).write_bytes((tmp_path / "run" / name).read_bytes())
    assert main(["eval", "--adapter", str(plain), "--data", files["eval"], "data.max_length=32"]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone["eval_accuracy"] == scored["eval_accuracy"]
    assert alone["eval_loss"] == pytest.approx(scored["eval_loss"], abs=1e-6)
    # --compare rebuilds the run's start from the recipe's seed: the run's own "before", and its paired figures.
    assert main(["eval", "--adapter", out, "--data", files["eval"], "--compare"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    compared = json.loads(printed[-1])
    for key in ("eval_accuracy_before", "eval_gained", "eval_lost", "eval_paired_p"):
        assert compared[key] == trained[key], key
    assert compared["eval_accuracy"] == scored["eval_accuracy"]
    with open(f"{out}/log_history.jsonl", encoding="utf-8") as fh:
        start = json.loads(fh.readline())  # the run's evaluation before the first step
    assert start["step"] == 0
    for key in ("eval_loss", "eval_margin", "eval_sign_p"):
        assert compared[f"{key}_before"] == pytest.approx(start[key], rel=1e-6), key
    assert f"pairs won: {gained} gained, {lost} lost" in printed[-2]
    # A row range of the eval file reads as a file holding just those rows would.
    with open(files["eval"], encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh][8:40]
    part = write_jsonl(tmp_path / "part.jsonl", rows)
    ranged = evaluate(out, f"{files['eval']}[8:40]", compare=True)
    assert ranged == evaluate(out, part, compare=True)
    assert ranged["eval_gained"] - ranged["eval_lost"] == round(
        (ranged["eval_accuracy"] - ranged["eval_accuracy_before"]) * 32
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"chosen": "   "}, "column 'chosen' is empty"),
        ({"rejected": ""}, "column 'rejected' is empty"),
        ({"rejected": "same answer"}, "identical"),
        ({"chosen": 3}, "must be text"),
    ],
)
def test_bad_preference_rows_name_file_and_line(tmp_path, bad, message):
    rows = [{"prompt": "q", "chosen": "same answer", "rejected": "other answer"} for _ in range(3)]
    rows[1] |= bad
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=f"pairs.jsonl:2: .*{message}"):
        read_pairs(read_rows(path), "prompt", "chosen", "rejected")


def test_bad_rows_stop_the_cli_before_any_output_or_are_skipped_when_asked(files, tmp_path, capsys):
    rows = synthetic_pairs(4, seed=3)
    rows[2]["rejected"] = rows[2]["chosen"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "recipes/hh-rlhf-rm.yaml", f"model.name_or_path={files['bert']}", f"data.train={path}",
            f"data.eval={path}", "data.max_length=32", "train.max_steps=1", "train.report_to=[none]",
            f"output.dir={out}"]  # fmt: skip
    assert main([*args, "data.bad_pairs=refuse"]) == 2
    assert "bad.jsonl:3: 'chosen' and 'rejected' are identical" in capsys.readouterr().err
    assert not out.exists()
    # The recipe's own choice for hh_rlhf (4 rows with an empty response): skip them, and say which.
    assert main(args) == 0
    report = (out / "report.md").read_text()
    note = ("1 train rows skipped (bad pairs: an empty or non-assistant response, chosen == rejected, or a ranking "
            "conversation LLaMA-Factory drops): ")  # fmt: skip
    assert note in report and "bad.jsonl:3" in report


def test_no_paired_figures_without_an_evaluation_before_training(files, tmp_path):
    """With train.eval_on_start off there is no start to pair with: the final metrics have no paired keys."""
    cfg = build(rm_recipe(files["bert"], files["train"], files["eval"], str(tmp_path / "run"), max_steps=1,
                          eval_on_start=False))  # fmt: skip
    metrics = train(cfg)
    assert "eval_accuracy" in metrics and not {"eval_gained", "eval_lost", "eval_paired_p"} & metrics.keys()


def test_reward_head_must_be_scalar(files, tmp_path):
    cfg = build(rm_recipe(files["bert"], files["train"], files["eval"], str(tmp_path / "x")) | {"model": {
        "name_or_path": files["bert"], "num_labels": 2}})  # fmt: skip
    with pytest.raises(ConfigError, match="num_labels must be 1"):
        train(cfg)
