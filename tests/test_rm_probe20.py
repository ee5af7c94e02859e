"""Probe 20 of stage rm and the reward scorers on a SmolLM2-style tokenizer (no pad token: the pad is the EOS):
against TRL 1.16's RewardTrainer, transformers' classifier, peft's AutoPeftModelForSequenceClassification."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from datasets import Dataset
from tiny import save_tiny

import deltatune as dt
from deltatune.train import build
from deltatune.train.models import load_tokenizer
from deltatune.train.run import train
from deltatune.train.scorers import AdapterReward, RewardScorer
from deltatune.train.table import prepare

ROWS = [("what is your name", " my name is delta", " i will not say", 0.5), ("hello there", " hi", " go away", -0.3),
        ("tell me", " a story", " no", 1.2)]  # fmt: skip
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                   "rejected": [{"role": "assistant", "content": r}], "margin": m} for p, c, r, m in ROWS]  # fmt: skip


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The tiny Llama with its tokenizer's pad token removed and config pad_token_id None (SmolLM2's base), the rows,
    and a reward run trained two steps on them."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("rm20")
    base = save_tiny(tmp / "llama")
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = None
    tok.save_pretrained(base)
    config = json.loads((tmp / "llama" / "config.json").read_text())
    (tmp / "llama" / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    rows = tmp / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONAL))
    recipe = {"stage": "rm", "model": {"name_or_path": base}, "data": {"train": str(rows), "max_length": 64},
              "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
              "train": {"report_to": ["none"], "max_steps": 2, "batch_size": 3, "lr": 5e-2},
              "output": {"dir": str(tmp / "rm")}}  # fmt: skip
    train(build(recipe))
    return {"base": base, "rows": rows, "run": str(tmp / "rm"), "recipe": recipe}


def test_pad_is_eos_ids_loss_and_metrics_equal_trls_reward_trainer(smol, tmp_path):
    """TRL's RewardTrainer takes the EOS as the pad where the tokenizer has none and writes it into the model's config;
    deltatune's load_tokenizer does too: the same ids, loss and logged metrics (the margin column read) on the pairs,
    the reward read at the last token that is not the EOS."""
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    cfg = build({**smol["recipe"], "output": {"dir": str(tmp_path / "run")}})
    tok = load_tokenizer(smol["base"])
    assert tok.pad_token_id == tok.eos_token_id
    ours = prepare(cfg, tok)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(smol["base"], num_labels=1)
    args = trl.RewardConfig(str(tmp_path / "trl"), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                            bf16=False, center_rewards_coefficient=0.1)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trl.RewardTrainer)(model=model, args=args, train_dataset=Dataset.from_list(CONVERSATIONAL),
                                                   processing_class=AutoTokenizer.from_pretrained(smol["base"]))  # fmt: skip
    assert model.config.pad_token_id == tok.eos_token_id
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(3)])
    mine = ours.collator(ours.train)
    assert torch.equal(mine["input_ids"], batch["input_ids"]) and torch.equal(mine["margin"], batch["margin"])
    model.train()
    expected = theirs.compute_loss(model, dict(batch))
    trainer = ours.trainer_class(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True))
    trainer.center_rewards_coefficient = 0.1
    got = trainer.compute_loss(model, mine)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    for key, values in theirs._metrics["train"].items():
        assert trainer._stats[key][-1] == pytest.approx(values[-1], abs=1e-6), key


def test_scorer_adapter_reward_and_peft_score_as_the_trained_forward(smol):
    """The saved run (LoRA plus the score head as modules_to_save, task type SEQ_CLS) loads in peft's
    AutoPeftModelForSequenceClassification; it, RewardScorer (text, re-tokenised) and AdapterReward (the run as a
    second adapter in a causal-LM policy, the head applied by hand) give the rewards of the trained model's forward
    on the prepared pairs, to float precision."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForCausalLM

    with open(f"{smol['run']}/adapter_config.json") as fh:
        saved = json.load(fh)
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]
    tok = load_tokenizer(smol["base"])
    prepared = prepare(build(smol["recipe"]), tok)
    batch = prepared.collator(prepared.train)
    scorer = RewardScorer(smol["run"])
    with torch.no_grad():
        forward = scorer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        peft_model = AutoPeftModelForSequenceClassification.from_pretrained(smol["run"], num_labels=1).eval()
        peft_model.config.pad_token_id = tok.pad_token_id  # (the base's config has none, as SmolLM2's)
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    prompts = [p for p, *_ in ROWS]
    texts = scorer(prompts, [c for _, c, _, _ in ROWS]), scorer(prompts, [r for _, _, r, _ in ROWS])
    policy = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(smol["base"]),
                                dt.LoraConfig(r=2, target_modules=["q_proj"]))  # fmt: skip
    adapter = AdapterReward(policy, smol["run"], tok)
    shared = adapter(prompts, [c for _, c, _, _ in ROWS]), adapter(prompts, [r for _, _, r, _ in ROWS])
    assert forward.abs().max() > 0.05 and forward[:3].ne(forward[3:]).all()
    for scores in (theirs, torch.cat(texts), torch.cat(shared)):
        assert torch.allclose(scores, forward, atol=1e-5), (scores, forward)


def test_reward_calls_refuse_unequal_lists_and_score_an_empty_batch(smol):
    """Two prompts and one response: one line naming both counts (zip scored one pair and dropped the other, a
    (1,) reward for two rollouts); no pair at all: a (0,) reward (the Collator failed with an IndexError)."""
    from transformers import AutoModelForCausalLM

    scorer = RewardScorer(smol["run"])
    policy = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(smol["base"]),
                                dt.LoraConfig(r=2, target_modules=["q_proj"]))  # fmt: skip
    adapter = AdapterReward(policy, smol["run"], load_tokenizer(smol["base"]))
    for fn in (scorer, adapter):
        with pytest.raises(ValueError, match="^reward model: 2 prompts but 1 responses; one response per prompt$"):
            fn(["a", "b"], ["x"])
        assert fn([], []).shape == (0,)
        assert fn(["a"], ["x"]).shape == (1,)


def test_pairs_cut_to_the_same_ids_are_refused_naming_the_row_or_skipped(smol, tmp_path):
    """Two responses that differ only in what data.max_length cuts off (the rm cut keeps a side's end, here the
    shared tail): HEAD trained the identical inputs as a pair (loss log 2, no gradient, a lost pair in the accuracy) with only
    the truncation note. Now one line naming the row; data.bad_pairs=skip leaves it out with a note, as TRL's
    RewardTrainer drops pairs over its max_length; the other pairs keep their margins."""
    from deltatune.data.load import DataError

    tail = " ".join(["word"] * 30)
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 0.5},
            {"prompt": "q", "chosen": "good " + tail, "rejected": "bad " + tail, "margin": 1.0}]  # fmt: skip
    path = tmp_path / "cut.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(smol["base"])

    def recipe(**data):
        return build({"stage": "rm", "model": {"name_or_path": smol["base"]}, "train": {"report_to": ["none"]},
                      "data": {"train": str(path), "max_length": 20, **data}, "output": {"dir": str(tmp_path / "r")}})  # fmt: skip

    with pytest.raises(DataError, match=r"^\S*cut.jsonl:2: 'chosen' and 'rejected' are identical once cut to "
                                        r"data.max_length=20 tokens .*data.bad_pairs=skip"):  # fmt: skip
        prepare(recipe(), tok)
    skipped = prepare(recipe(bad_pairs="skip"), tok)
    assert len(skipped.train) == 1 and any("1 train pairs were left out" in n and "cut.jsonl:2" in n
                                           for n in skipped.notes)  # fmt: skip
    batch = skipped.collator(skipped.train)
    assert "_source" not in batch and batch["margin"].tolist() == [0.5]
    assert set(prepare(recipe(max_length=64), tok).train[1]) == {"chosen", "rejected", "margin"}


def _tie_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


TAIL = " ".join(["word"] * 30)
CUT_TIE = {"prompt": "q", "chosen": "good " + TAIL, "rejected": "bad " + TAIL}  # (max_length 20 keeps the tail)


def _rm(base, tmp_path, **data):
    return build({"stage": "rm", "model": {"name_or_path": base}, "train": {"report_to": ["none"]},
                  "data": {"max_length": 20, **data}, "output": {"dir": str(tmp_path / "r")}})  # fmt: skip


def test_an_evaluation_scores_ties_as_lost_pairs_as_before(smol, tmp_path):
    """deltatune eval of a run trained before 8df0ee9 (its data holds a pair cut to the same ids): 8df0ee9 refused it
    (and data.bad_pairs=skip changed its figures); now the tie is kept, noted, and counts as a lost pair, as the run's
    metrics.json scored it. A training run's eval split keeps it the same way (its figures match deltatune eval's);
    its train split still refuses it."""
    from deltatune.data.load import DataError
    from deltatune.train.reward import rm_metrics

    path = _tie_rows(tmp_path / "cut.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, CUT_TIE])
    tok = load_tokenizer(smol["base"])
    for bad_pairs in ("refuse", "skip"):
        cfg = _rm(smol["base"], tmp_path, train=path, bad_pairs=bad_pairs)
        cfg.evaluating = True  # (as evaluation.py marks the recipe it prepares: reward.EVALUATING)
        scored = prepare(cfg, tok)
        assert len(scored.train) == 2 and scored.train[1]["chosen"] == scored.train[1]["rejected"]
        assert any(n.startswith("1 train pairs tie: chosen and rejected are identical once cut to data.max_length=20")
                   and "cut.jsonl:2" in n for n in scored.notes)  # fmt: skip
        during = prepare(_rm(smol["base"], tmp_path, train=path, eval=path, bad_pairs="skip"), tok)
        assert len(during.eval) == 2 and len(during.train) == 1
    # a tie scores equal rewards: a lost pair (accuracy 1/2 here, the chosen one of the other pair higher)
    metrics = rm_metrics(type("P", (), {"predictions": [[1.0, 0.0], [0.3, 0.3]]})())
    assert metrics["accuracy"] == 0.5
    with pytest.raises(DataError, match=r"cut.jsonl:2: 'chosen' and 'rejected' are identical once cut"):
        prepare(_rm(smol["base"], tmp_path, train=path, eval=path), tok)


def test_a_tie_nothing_cut_is_named_so_and_a_split_of_ties_under_skip(smol, tmp_path):
    """MiniLM (uncased) encodes "Yes indeed" and "yes indeed" the same, nothing cut: 8df0ee9's message said they
    differ past data.max_length and to raise it. Now "encode to the same ids", no max_length advice. Every train
    pair a tie under data.bad_pairs=skip: 8df0ee9 still ended "(data.bad_pairs=skip leaves such rows out)"; now it
    says every pair is such a tie. A skipped cut tie is no longer counted in the truncation note."""
    from tiny import minilm_path

    from deltatune.data.load import DataError

    base, tok = minilm_path(), load_tokenizer(minilm_path())
    assert tok("Yes indeed")["input_ids"] == tok("yes indeed")["input_ids"]
    uncased = _tie_rows(tmp_path / "u.jsonl", [{"prompt": "q", "chosen": "Yes indeed", "rejected": "yes indeed"},
                                               {"prompt": "q", "chosen": "good", "rejected": "bad"}])  # fmt: skip
    with pytest.raises(DataError) as e:
        prepare(_rm(base, tmp_path, train=uncased, max_length=512), tok)
    assert str(e.value).endswith("u.jsonl:1: 'chosen' and 'rejected' encode to the same ids (the tokenizer does not "
                                 "tell them apart), a tie the pairwise loss learns nothing from "
                                 "(data.bad_pairs=skip leaves such rows out)")  # fmt: skip
    skipped = prepare(_rm(base, tmp_path, train=uncased, max_length=512, bad_pairs="skip"), tok)
    assert len(skipped.train) == 1 and any(n.startswith("1 train pairs were left out (data.bad_pairs=skip): chosen "
                                           "and rejected encode to the same ids") for n in skipped.notes)  # fmt: skip
    tok = load_tokenizer(smol["base"])  # (a causal LM's rm cut keeps each side's end: the shared tail)
    ties = _tie_rows(tmp_path / "t.jsonl", [CUT_TIE, {**CUT_TIE, "prompt": "r"}])
    with pytest.raises(DataError, match=r"^every train pair \(2\) is such a tie, nothing left to train on under "
                                        r"data.bad_pairs=skip \(first: \S*t.jsonl:1: 'chosen' and 'rejected' are "
                                        r"identical once cut to data.max_length=20 tokens"):  # fmt: skip
        prepare(_rm(smol["base"], tmp_path, train=ties, bad_pairs="skip"), tok)
    long = {"prompt": "q", "chosen": "fine " + TAIL, "rejected": "no"}  # (cut, kept: the one truncated pair left)
    mixed = _tie_rows(tmp_path / "m.jsonl", [CUT_TIE, long])
    notes = prepare(_rm(smol["base"], tmp_path, train=mixed, bad_pairs="skip"), tok).notes
    assert [n for n in notes if "were truncated" in n] == [
        "1 train rows were longer than data.max_length=20 tokens and were truncated"
    ]


def test_a_transformers_reward_model_refuses_unequal_lists_and_scores_an_empty_batch(tmp_path):
    """align.reward_funcs naming a transformers classifier folder: an empty batch failed on prompts[0] (IndexError)
    and two prompts with one completion scored one pair, silently (zip). Now as scorers.py's (cb49493): one line
    naming both counts, [] for no pair (a reward function's list); one pair is the classifier's logit."""
    from tiny import tiny_config
    from tiny import tokenizer as tiny_tokenizer
    from transformers import AutoModelForSequenceClassification

    from deltatune.train.grpo_reward_model import SequenceClassifierReward

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    reward = SequenceClassifierReward(str(tmp_path), "cpu")
    with pytest.raises(ValueError, match="^reward model: 2 prompts but 1 responses; one response per prompt$"):
        reward(["a", "b"], ["x"])
    assert reward([], []) == []
    ids = tok("a x", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logit = reward.model(**ids).logits[0, 0].item()
    assert reward(["a"], [" x"]) == pytest.approx([logit], abs=1e-6)


def test_deltatune_eval_scores_a_tie_as_a_lost_pair(smol, tmp_path):
    """deltatune eval of rows holding a pair cut to the same ids (a run trained before 8df0ee9): 8df0ee9 refused
    the evaluation (DataError naming the row); now the tie is scored, a lost pair, as the run's metrics.json: the
    accuracy of the three clean pairs times 3/4."""
    from deltatune.train.evaluation import evaluate

    clean = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r, _ in ROWS]
    both = _tie_rows(tmp_path / "both.jsonl", [*clean, CUT_TIE])
    only = _tie_rows(tmp_path / "clean.jsonl", clean)
    short = ["data.max_length=20"]
    before, after = evaluate(smol["run"], only, short), evaluate(smol["run"], both, short)
    assert before["eval_accuracy"] > 0 and after["eval_accuracy"] == pytest.approx(before["eval_accuracy"] * 3 / 4)
