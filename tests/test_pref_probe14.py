"""Probe 14 of the preference stages against TRL 1.16: the tokens of orpo, simpo and cpo (TRL's CPO and ORPO trainers
end each answer with EOS, after a chat template's own end), then the loss, the gradient of every LoRA weight and the
metrics of a whole prepared batch against TRL's trainers; dropout left off after training, as TRL leaves it.

TRL runs on the same tiny Llama, LoRA (not zero) and rows as deltatune; the helpers are test_dpo_probe12's."""

import json
import warnings

import pytest
import torch
from datasets import Dataset
from test_align_probe11 import ATOL, _grads
from test_dpo_probe12 import CUT_CONVERSATIONAL, _args, _dropouts, _lora, _same
from tiny import save_tiny

import deltatune as dt
from deltatune.train import build
from deltatune.train.models import load_tokenizer
from deltatune.train.table import prepare

with warnings.catch_warnings():  # TRL keeps CPO and ORPO in trl.experimental, which warns on import
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def _prepared(base, tmp_path, stage: str, max_length: int, align: dict | None = None):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CUT_CONVERSATIONAL))
    cfg = build({"stage": stage, "model": {"name_or_path": base}, "train": {"report_to": ["none"]},
                 "data": {"train": str(path), "max_length": max_length}, "align": align or {},
                 "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    return cfg, prepare(cfg, load_tokenizer(base))


def _trl(base, tmp_path, stage: str, max_length: int, **kwargs):
    config, trainer = (ORPOConfig, ORPOTrainer) if stage == "orpo" else (CPOConfig, CPOTrainer)
    args = config(str(tmp_path / "trl"), per_device_train_batch_size=3, report_to=[], use_cpu=True, bf16=False,
                  max_length=max_length, **kwargs)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dt.trl_trainer(trainer)(model=_lora(base), args=args, processing_class=load_tokenizer(base),
                                       train_dataset=Dataset.from_list(CUT_CONVERSATIONAL))  # fmt: skip


@pytest.mark.parametrize("trainer", ["orpo", "cpo"])
def test_answers_end_with_eos_as_trls_cpo_and_orpo(base, tmp_path, trainer):
    """The tiny template ends a turn with ``<|im_end|>`` and a newline, and its EOS is [SEP]: TRL's CPO and ORPO
    trainers append a trained [SEP] to every answer (``add_eos_token_if_needed``), then cut the answer to max_length.
    deltatune's ids and labels (orpo's against ORPOTrainer's, simpo's and cpo's against CPOTrainer's) now equal theirs
    token for token, cut (36) or not (64); HEAD's lacked that last token on every uncut side."""
    eos = load_tokenizer(base).eos_token_id
    for max_length, uncut in ((64, 6), (36, 2)):  # (at 36 four sides are cut before their end)
        theirs = _trl(base, tmp_path, trainer, max_length).train_dataset
        for stage in ["orpo"] if trainer == "orpo" else ["simpo", "cpo"]:
            _, ours = _prepared(base, tmp_path, stage, max_length)
            ended = 0
            for ex, mine in zip(theirs, ours.train, strict=True):
                for side in ("chosen", "rejected"):
                    assert ex[f"{side}_input_ids"] == mine[side]["input_ids"], (stage, max_length, side)
                    assert ex[f"{side}_labels"] == mine[side]["labels"], (stage, max_length, side)
                    ended += mine[side]["input_ids"][-1] == eos == mine[side]["labels"][-1]
            assert ended == uncut, (stage, max_length)


def test_dpo_answers_get_no_eos_after_the_template_as_trls_dpo(base, tmp_path):
    """TRL 1.16's DPOTrainer appends EOS to plain-text rows only: a conversational answer ends where the template
    ends it (a newline here), and deltatune's dpo stage still does the same."""
    _, ours = _prepared(base, tmp_path, "dpo", 64)
    eos = load_tokenizer(base).eos_token_id
    assert all(ex[s]["input_ids"][-1] != eos for ex in ours.train for s in ("chosen", "rejected"))


@pytest.mark.parametrize("stage, kwargs", [("orpo", {"beta": 0.2}), ("cpo", {"beta": 0.3, "loss_type": "sigmoid"}),
                                           ("simpo", {"beta": 2.0, "loss_type": "simpo", "cpo_alpha": 0.0})])  # fmt: skip
def test_prepared_batch_loss_gradients_and_metrics_equal_trls(base, tmp_path, stage, kwargs):
    """The whole path: deltatune's prepared rows through its collator and trainer against TRL's dataset, collator and
    get_batch_loss_metrics on three conversational pairs cut at 36 tokens: the loss, every LoRA gradient and TRL's
    metrics (orpo: the loss but the NLL, which is TRL's over the prompt too, and the odds-ratio metrics). HEAD's rows lacked TRL's last EOS on the uncut sides: another loss and other gradients."""
    trl_trainer = _trl(base, tmp_path, stage, 36, **kwargs)
    batch = next(iter(trl_trainer.get_train_dataloader()))
    model = trl_trainer.model
    model.train()
    expected, metrics = trl_trainer.get_batch_loss_metrics(model, batch)
    expected.backward()
    want = _grads(model)
    align = {k: v for k, v in kwargs.items() if stage != "orpo" or k != "loss_type"}
    _, ours = _prepared(base, tmp_path, stage, 36, align)
    trainer = ours.trainer_class(model=model, args=_args(tmp_path / "dt"))
    got = trainer.compute_loss(model, ours.collator(ours.train))
    got.backward()
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected"]  # fmt: skip
    if stage == "orpo":  # (TRL's ORPO NLL takes the prompt tokens too, deltatune's the answers': the rest is equal)
        got, expected = got - trainer._stats["nll"][0], expected - metrics["nll_loss"]
        names += ["log_odds_ratio", "log_odds_chosen"]
    else:
        _same(want, _grads(model))
        names += ["logits/chosen", "logits/rejected"] + ["nll_loss"] * (stage == "cpo")
    assert abs(got.item() - expected.item()) < ATOL * max(1.0, abs(expected.item())), (got.item(), expected.item())
    for key in names:
        assert trainer._stats[key][0] == pytest.approx(metrics[key], abs=1e-4, rel=1e-5), key


def test_dropout_stays_off_after_training_as_trl_leaves_it(base, tmp_path):
    """TRL's trainers set every nn.Dropout to 0 in __init__ (disable_dropout_in_model) and never restore it; so does
    deltatune (align.disable_dropout): the model handed back after training has p = 0, as TRL's."""
    cfg, ours = _prepared(base, tmp_path, "cpo", 64)
    model = _lora(base, 0.5)
    ours.trainer_class(model=model, args=_args(tmp_path / "dt"))
    theirs = _lora(base, 0.5)
    _trl_dropout = pytest.importorskip("trl.trainer.utils").disable_dropout_in_model
    _trl_dropout(theirs)
    assert _dropouts(model) == _dropouts(theirs) and set(_dropouts(model)) == {0.0}


RM_ROWS = [("what is your name", " my name is delta", " i will not say", 0.5), ("hello there", " hi", " go away", -0.3),
           ("tell me", " a story", " no", 1.2)]  # fmt: skip
RM_FORMATS = {
    "conversational": [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                        "rejected": [{"role": "assistant", "content": r}], "margin": m} for p, c, r, m in RM_ROWS],
    "conversational_implicit": [{"chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                 "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                 "margin": m} for p, c, r, m in RM_ROWS],
    "plain": [{"prompt": p, "chosen": c, "rejected": r, "margin": m} for p, c, r, m in RM_ROWS],
    "plain_implicit": [{"chosen": p + c, "rejected": p + r} for p, c, r, _ in RM_ROWS],
}  # fmt: skip


@pytest.mark.parametrize("form, center", [("conversational", None), ("conversational_implicit", 0.1),
                                          ("plain", 0.1), ("plain_implicit", None)])  # fmt: skip
def test_rm_formats_margin_and_centring_equal_trls_reward_trainer(base, tmp_path, form, center):
    """Stage rm against TRL 1.16's RewardTrainer on three pairs in each format it takes (explicit or implicit prompt,
    conversational or plain text: plain with data.template plain, as TRL tokenizes text; the margin column where
    given) and center_rewards_coefficient: the same ids, the loss and every gradient within 1e-6 (0 without the
    centring term), and TRL's metrics (accuracy, margin, min/mean/max_reward, num_tokens). HEAD logged no
    num_tokens."""
    import trl
    from test_dpo_probe12 import _rm_lora

    rows = RM_FORMATS[form]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": str(path), **({"template": "plain"} if form.startswith("plain") else {})}
    cfg = build({"stage": "rm", "model": {"name_or_path": base}, "train": {"report_to": ["none"]}, "data": data,
                 "align": {"center_rewards_coefficient": center or 0.0}, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    ours = prepare(cfg, load_tokenizer(base))
    model = _rm_lora(base, 0.0)
    args = trl.RewardConfig(str(tmp_path / "trl"), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                            bf16=False, center_rewards_coefficient=center)  # fmt: skip
    theirs = dt.trl_trainer(trl.RewardTrainer)(model=model, args=args, processing_class=load_tokenizer(base),
                                               train_dataset=Dataset.from_list(rows))  # fmt: skip
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(3)])  # (in order)
    model.train()
    expected = theirs.compute_loss(model, dict(batch))
    expected.backward()
    want = _grads(model)
    trainer = ours.trainer_class(model=model, args=_args(tmp_path / "dt"))
    mine = ours.collator(ours.train)
    assert torch.equal(mine["input_ids"], batch["input_ids"]) and ("margin" in mine) == ("margin" in batch)
    got = trainer.compute_loss(model, mine)
    got.backward()
    have = _grads(model)
    assert abs(got.item() - expected.item()) < 1e-6 and len(want) == 9  # (centring: per pair, TRL's on the means)
    assert max((want[k] - have[k]).abs().max().item() for k in want) < 1e-6
    assert max(v.abs().max().item() for v in want.values()) > 1e-3
    metrics = {k: v[-1] for k, v in theirs._metrics["train"].items()}
    assert set(metrics) <= set(trainer._stats)
    for key, value in metrics.items():
        assert trainer._stats[key][-1] == pytest.approx(value, abs=1e-6), key


KTO_ROWS = [("what is your name", " my name is delta", True), ("hello there friend", " go away now please you", False),
            ("how are you", " fine thanks", True), ("tell me", " no", False)]  # fmt: skip


def test_kto_prepared_unpaired_rows_with_weights_and_kl_equal_trls(base, tmp_path):
    """Stage kto on four conversational unpaired rows (two desirable, two not) with desirable_weight 1.3 and
    undesirable_weight 0.6, against TRL 1.16's KTOTrainer in its own order: deltatune's prepared batch (the rows,
    then their mismatched pairs for the KL reference point) holds TRL's ids and labels, and the loss, every LoRA
    gradient and TRL's metrics (kl, rewards/*, logps/*, logits/*, entropy, num_tokens) are equal."""
    import trl
    from test_dpo_probe12 import _kto_batch
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
             "label": good} for p, c, good in KTO_ROWS]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    weights = {"desirable_weight": 1.3, "undesirable_weight": 0.6}
    cfg = build({"stage": "kto", "model": {"name_or_path": base}, "train": {"report_to": ["none"], "batch_size": 4},
                 "data": {"train": str(path)}, "align": weights, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    ours = prepare(cfg, load_tokenizer(base))
    model = _lora(base)
    args = trl.KTOConfig(str(tmp_path / "trl"), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                         **weights)  # fmt: skip
    theirs = dt.trl_trainer(trl.KTOTrainer)(model=model, args=args, processing_class=load_tokenizer(base),
                                            train_dataset=Dataset.from_list(rows),
                                            ref_model=AutoModelForCausalLM.from_pretrained(base))  # fmt: skip
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])  # (in order)
    model.train()
    expected = theirs.compute_loss(model, batch)
    expected.backward()
    want = _grads(model)
    trainer = ours.trainer_class(model=model, args=_args(tmp_path / "dt"), data_collator=ours.collator)
    mine = ours.collator(ours.train[:4])
    for key, value in _kto_batch(batch).items():
        assert torch.equal(mine[key], value), key
    got = trainer.compute_loss(model, mine)
    got.backward()
    assert abs(got.item() - expected.item()) < ATOL, (got.item(), expected.item())
    _same(want, _grads(model))
    metrics = {k: v[-1] for k, v in theirs._metrics["train"].items()}
    assert {"kl", "rewards/chosen", "num_tokens"} <= set(metrics) <= set(trainer._stats)
    for key, value in metrics.items():
        assert trainer._stats[key][-1] == pytest.approx(value, abs=1e-4, rel=1e-5), key


@pytest.mark.parametrize("key", ["padding_free"])  # (TR-DPO's keys are built since probe 15)
def test_trls_unbuilt_dpo_keys_are_one_line_saying_why(key):
    """TR-DPO's sync_ref_model (and its pacing keys), padding_free: TRL DPOConfig keys not built here. They read
    "did you mean 'reward_model'?"; now one line naming the key and why."""
    from deltatune.config import ConfigError
    from deltatune.train.config import build

    with pytest.raises(ConfigError, match=rf"^unknown key 'align.{key}' in r.yaml: align.{key} \(TRL's DPOConfig\) is "
                       "not built: .*; drop it \\(or set TRL's default, .+\\)$"):  # fmt: skip
        build({"stage": "dpo", "data": {"train": "p.jsonl"}, "align": {key: True}}, where="r.yaml")
