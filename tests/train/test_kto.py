"""KTO: the loss and its reference point by hand, 1 - sigmoid(0) = 0.5 per row at initialisation, mismatched pairs
in the collator, bad rows and labels, label imbalance, and the recipe through the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import WORDS, save_tiny
from transformers import set_seed

from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row
from deltatune.data.sample import unpaired_examples
from deltatune.model import get_delta_model
from deltatune.train import build
from deltatune.train.config import AlignArgs
from deltatune.train.kto import KTOCollator, balance_note, kl_reference_point, kto_loss
from deltatune.train.models import load_tokenizer
from deltatune.train.run import _training_args, build_model
from deltatune.train.table import prepare as _prepare


def test_kto_loss_by_hand():
    """log pi - log ref = [-1 + 1.5, -2 + 2, -3 + 2] = [0.5, 0, -1]; labels [desirable, undesirable, desirable];
    z0 = 0.2, beta = 1, lambda_D = 1, lambda_U = 2:

        row 0: 1 - sigmoid(0.5 - 0.2)          = 1 - 0.574443 = 0.425557
        row 1: 2 * (1 - sigmoid(0.2 - 0))      = 2 * (1 - 0.549834) = 0.900332
        row 2: 1 - sigmoid(-1 - 0.2)           = 1 - 0.231475 = 0.768525
    rewards beta (log pi - log ref) = [0.5, 0, -1].
    """
    losses, rewards = kto_loss(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -2.0, -2.0]),
                               torch.tensor([True, False, True]), 0.2, beta=1.0, undesirable_weight=2.0)  # fmt: skip
    torch.testing.assert_close(losses, torch.tensor([0.425557, 0.900332, 0.768525]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards, torch.tensor([0.5, 0.0, -1.0]))


def test_reference_point_by_hand():
    """z0 = max(0, mean(log pi - log ref)) over the mismatched pairs: [1, 1, -1] -> 1/3; [-1, -1, -1] -> 0."""
    ref = torch.full((3,), -2.0)
    assert kl_reference_point(torch.tensor([-1.0, -1.0, -3.0]), ref).item() == pytest.approx(1 / 3)
    assert kl_reference_point(torch.tensor([-3.0, -3.0, -3.0]), ref).item() == 0.0


def test_collator_builds_mismatched_pairs():
    """Sequence B + i is prompt i followed by completion i - 1, labelled on the completion only."""
    ex = [{"input_ids": [1, 10, 11, 20, 21], "attention_mask": [1] * 5, "labels": [-100, -100, -100, 20, 21],
           "n_prompt": 3, "desirable": True},
          {"input_ids": [1, 12, 30], "attention_mask": [1] * 3, "labels": [-100, -100, 30], "n_prompt": 2,
           "desirable": False}]  # fmt: skip
    batch = KTOCollator(pad_token_id=0, max_length=5)(ex)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 20, 21], [1, 12, 30, 0, 0], [1, 10, 11, 30, 0],
                                           [1, 12, 20, 21, 0]]  # fmt: skip
    assert batch["labels"][2].tolist() == [-100, -100, -100, 30, -100]
    assert batch["labels"][3].tolist() == [-100, -100, 20, 21, -100]
    assert batch["desirable"].tolist() == [True, False]


def test_rows_labels_and_unpaired_preference_rows():
    """KTO reads unpaired rows and preference rows (unpaired as TRL does) through data/formats.py."""
    unpaired = [Row({"prompt": "p", "completion": "c", "label": "true"}, "f.jsonl:1"),
                Row({"prompt": "p", "completion": "d", "label": 0}, "f.jsonl:2")]  # fmt: skip
    out = unpaired_examples(read_samples(unpaired, stage="kto"))
    assert [(c[0]["content"], good) for _, c, good in out] == [("c", True), ("d", False)]
    pairs = [Row({"prompt": "q", "chosen": "good", "rejected": "bad"}, "f.jsonl:3")]
    out = unpaired_examples(read_samples(pairs, stage="kto"))
    assert [(c[0]["content"], good) for _, c, good in out] == [("good", True), ("bad", False)]
    with pytest.raises(DataError, match=r"f.jsonl:9: column 'label' must be true or false .*got 'maybe'"):
        read_samples([Row({"prompt": "p", "completion": "c", "label": "maybe"}, "f.jsonl:9")], stage="kto")
    with pytest.raises(DataError, match=r"f.jsonl:4: .*prompt_completion format.*stage kto does not read"):
        read_samples([Row({"prompt": "p", "completion": "c"}, "f.jsonl:4")], stage="kto")


def test_imbalance_note():
    """lambda_D n_D / (lambda_U n_U) = 10 / 2 = 5: outside [1, 4/3]; desirable_weight in [0.2, 0.267] brings it in."""
    note = balance_note(10, 2, AlignArgs(), "t.jsonl")
    assert "= 5.00" in note and "align.desirable_weight in [0.2, 0.267]" in note
    assert balance_note(6, 5, AlignArgs(), "t.jsonl") is None
    # A weight of 0 (allowed: that side teaches nothing) divided by zero, a traceback; both 0 trains nothing.
    note = balance_note(10, 2, AlignArgs(undesirable_weight=0.0), "t.jsonl")
    assert note == "align.undesirable_weight is 0: the undesirable rows of t.jsonl teach nothing"
    with pytest.raises(ConfigError, match="align.desirable_weight and align.undesirable_weight are both 0"):
        build({"stage": "kto", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
               "align": {"desirable_weight": 0, "undesirable_weight": 0}})  # fmt: skip


def rows(n: int, seed: int, good_share: float = 0.5) -> list[dict]:
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    out = []
    for i in range(n):
        good = i < round(n * good_share)
        out.append({"prompt": words(4), "completion": words(3) + (" excellent" if good else " terrible"),
                    "label": good})  # fmt: skip
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kto")
    out = {"llama": save_tiny(tmp / "llama", "llama", "causal_lm")}
    for name, data in (("train", rows(16, 1)), ("eval", rows(8, 2)), ("good", rows(6, 3, 1.0)),
                       ("skewed", rows(20, 4, 0.8))):  # fmt: skip
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        out[name] = str(path)
    return out


def recipe(files, out, train="train", **train_args) -> dict:
    return {
        "stage": "kto", "model": {"name_or_path": files["llama"]},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": files[train], "eval": files["eval"], "max_length": 24},
        "train": {"batch_size": 4, "report_to": ["none"], **train_args}, "output": {"dir": out},
    }  # fmt: skip


def test_loss_is_one_half_at_init(files, tmp_path):
    """The adapter starts as the identity: policy = reference, so every reward and z0 are 0 and each row costs
    1 - sigmoid(0) = 0.5 (lambda 1)."""
    cfg = build(recipe(files, str(tmp_path / "run")))
    set_seed(0)
    tok = load_tokenizer(cfg.model.name_or_path)
    prepared = _prepare(cfg, tok)
    delta = get_delta_model(build_model(cfg, tok), cfg.method_config("CAUSAL_LM"))
    trainer = prepared.trainer_class(model=delta, args=_training_args(cfg, prepared, cfg.output.dir),
                                     train_dataset=prepared.train, eval_dataset=prepared.eval,
                                     data_collator=prepared.collator, compute_metrics=prepared.compute_metrics)  # fmt: skip
    before = trainer.evaluate()
    assert before["eval_loss"] == pytest.approx(0.5, abs=1e-6)
    assert before["eval_margin"] == 0.0


def test_bad_input_is_one_line(files, tmp_path):
    # A training file of one label trains, as TRL's KTOTrainer trains it, with a warning.
    with pytest.warns(UserWarning, match="0 undesirable rows: only the desirable loss trains"):
        one_label = _prepare(build(recipe(files, str(tmp_path / "a"), train="good")), load_tokenizer(files["llama"]))
    assert all(e["desirable"] for e in one_label.train)
    # An eval file of one label reported a made-up 0.0 for the other side's reward, and a margin (the run's best-model
    # metric) that was the one side's reward.
    one_sided = recipe(files, str(tmp_path / "e"))
    one_sided["data"]["eval"] = files["good"]
    with pytest.raises(DataError, match=r"good.jsonl: KTO needs both .* found 6 desirable and 0 undesirable"):
        _prepare(build(one_sided), load_tokenizer(files["llama"]))
    with pytest.raises(ConfigError, match="stage kto needs train.batch_size >= 2"):
        _prepare(build(recipe(files, str(tmp_path / "b"), batch_size=1)), load_tokenizer(files["llama"]))
    with pytest.warns(UserWarning, match="outside the recommended"):
        prepared = _prepare(build(recipe(files, str(tmp_path / "c"), train="skewed")), load_tokenizer(files["llama"]))
    assert any("16 desirable and 4 undesirable" in n for n in prepared.notes)


def test_recipe_two_steps_through_cli(files, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "recipes/kto.yaml", f"model.name_or_path={files['llama']}", "model.dtype=float32",
                 "model.gradient_checkpointing=false", f"data.train={files['train']}", f"data.eval={files['eval']}",
                 "data.max_length=24", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
                 "train.report_to=[none]", f"output.dir={out}"])  # fmt: skip
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2 and {"eval_margin", "eval_reward_desirable"} <= metrics.keys()
    assert "KTO" in (out / "report.md").read_text()
    # deltatune eval scores the saved adapter on the same rows alike.
    assert main(["eval", "--adapter", str(out)]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)
    assert scored["eval_margin"] == pytest.approx(metrics["eval_margin"], abs=1e-5)
