"""Probe 12 of the preference stages against TRL 1.16: dropout off in the policy (TRL's disable_dropout, its default),
CPO's own losses (stage cpo: TRL's CPOTrainer with loss_type sigmoid, hinge, ipo, simpo) and KTO's precomputed
reference (TRL's precompute_ref_log_probs: the rows' and their mismatched pairs' reference log-probs).

TRL runs on the same tiny Llama, LoRA (not zero) and batch as deltatune: loss and the gradient of every LoRA weight
compared by max abs diff; the helpers and rows are test_align_probe11's."""

import copy
import dataclasses
import inspect
import json
import warnings

import pytest
import torch
import trl
import yaml
from datasets import Dataset
from test_align_probe11 import ATOL, PAIRS, ROWS, _grads, _lm_batch, _pad
from tiny import save_tiny, tokenizer
from transformers import AutoModelForCausalLM, TrainingArguments

import deltatune as dt
from deltatune.train import run as run_module
from deltatune.train.config import AlignArgs
from deltatune.train.dpo import DPOTrainer
from deltatune.train.kto import KTOTrainer
from deltatune.train.simpo import SimPOTrainer

with warnings.catch_warnings():  # TRL keeps CPO in trl.experimental, which warns on import
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def _lora(base: str, dropout: float = 0.0) -> dt.DeltaModel:
    """test_align_probe11's trained-looking LoRA, with ``lora_dropout``."""
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=dropout, task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def _args(path) -> TrainingArguments:
    return TrainingArguments(str(path), report_to=[], use_cpu=True)


def _same(want: dict, got: dict, tol: float = 1e-5) -> float:
    """The max abs diff of two gradient dicts over the same 8 LoRA weights (and that there is a gradient)."""
    assert want.keys() == got.keys() and len(want) == 8
    scale = max(1.0, max(v.abs().max().item() for v in want.values()))
    assert max(v.abs().max().item() for v in want.values()) > 1e-3
    diff = max((want[k] - got[k]).abs().max().item() for k in want)
    assert diff < tol * scale, diff
    return diff


def _dropouts(model) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def test_dpo_policy_runs_without_dropout_as_trls_default(base, tmp_path):
    """lora_dropout 0.5: TRL's DPOTrainer (disable_dropout=True, its default) sets every nn.Dropout to 0, so its loss
    and gradients are the dropout-free ones; deltatune's DPO (align.disable_dropout, default true) equals them. HEAD
    trained the policy with the LoRA's dropout on (its reference ran without): another loss, other gradients."""
    theirs, ours = _lora(base, 0.5), _lora(base, 0.5)
    assert set(_dropouts(ours)) == {0.5}
    args = trl.DPOConfig(str(tmp_path / "trl"), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                         beta=0.3)  # fmt: skip
    trainer = dt.trl_trainer(trl.DPOTrainer)(model=theirs, args=args, train_dataset=Dataset.from_list(PAIRS),
                                             ref_model=AutoModelForCausalLM.from_pretrained(base),
                                             processing_class=tokenizer())  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    theirs.train()
    expected = trainer.compute_loss(theirs, batch)
    expected.backward()
    labels = torch.where(batch["completion_mask"].bool(), batch["input_ids"], -100)
    lm = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    t = DPOTrainer(model=ours, args=_args(tmp_path / "dt"), align=AlignArgs(beta=0.3))
    assert set(_dropouts(ours)) == {0.0}
    ours.train()
    got = t.compute_loss(ours, lm)
    got.backward()
    assert abs(got.item() - expected.item()) < ATOL
    _same(_grads(theirs), _grads(ours))
    # align.disable_dropout: false keeps the model's dropout (two training forwards then differ)
    kept = _lora(base, 0.5)
    t = DPOTrainer(model=kept, args=_args(tmp_path / "kept"), align=AlignArgs(beta=0.3, disable_dropout=False))
    assert set(_dropouts(kept)) == {0.5}
    kept.train()
    with torch.no_grad():
        a, b = t.compute_loss(kept, lm).item(), t.compute_loss(kept, lm).item()
    assert a != b and abs(a - expected.item()) > 1e-4


def test_simpo_and_kto_run_without_dropout_as_trl(base, tmp_path):
    """The same for SimPO (TRL's CPOTrainer, loss_type simpo) and KTO (TRL's KTOTrainer): lora_dropout 0.5, TRL's
    default disable_dropout, equal losses and gradients."""
    theirs, ours = _lora(base, 0.5), _lora(base, 0.5)
    args = CPOConfig(str(tmp_path / "cpo"), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                     loss_type="simpo", beta=2.0, cpo_alpha=0.5)  # fmt: skip
    trainer = dt.trl_trainer(CPOTrainer)(model=theirs, args=args, train_dataset=Dataset.from_list(PAIRS),
                                         processing_class=tokenizer())  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    theirs.train()
    expected, _ = trainer.get_batch_loss_metrics(theirs, batch)
    expected.backward()
    t = SimPOTrainer(model=ours, args=_args(tmp_path / "dt"), align=AlignArgs(beta=2.0, cpo_alpha=0.5))
    ours.train()
    got = t.compute_loss(ours, _lm_batch(batch))
    got.backward()
    assert abs(got.item() - expected.item()) < ATOL
    _same(_grads(theirs), _grads(ours))

    theirs, ours = _lora(base, 0.5), _lora(base, 0.5)
    args = trl.KTOConfig(str(tmp_path / "kto"), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                         beta=0.3)  # fmt: skip
    trainer = dt.trl_trainer(trl.KTOTrainer)(model=theirs, args=args, train_dataset=Dataset.from_list(ROWS),
                                             ref_model=AutoModelForCausalLM.from_pretrained(base),
                                             processing_class=tokenizer())  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    theirs.train()
    expected = trainer.compute_loss(theirs, batch)
    expected.backward()
    t = KTOTrainer(model=ours, args=_args(tmp_path / "dtk"), align=AlignArgs(beta=0.3))
    ours.train()
    got = t.compute_loss(ours, _kto_batch(batch))
    got.backward()
    assert abs(got.item() - expected.item()) < ATOL
    _same(_grads(theirs), _grads(ours))


def _kto_batch(batch) -> dict[str, torch.Tensor]:
    """TRL KTO's rows and KL rows as deltatune's KTOCollator batch: the rows, then their mismatched pairs."""
    seqs = [(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])]
    seqs.append((batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]))
    width = max(ids.shape[1] for ids, _, _ in seqs)
    return {"input_ids": torch.cat([_pad(ids, width, 0) for ids, _, _ in seqs]),
            "attention_mask": torch.cat([_pad(m, width, 0) for _, m, _ in seqs]),
            "labels": torch.cat([_pad(torch.where(c.bool(), ids, -100), width, -100) for ids, _, c in seqs]),
            "desirable": batch["label"].bool()}  # fmt: skip


CPO_CASES = [("sigmoid", 0.5, 0.2, 0.0), ("sigmoid", 0.0, 0.0, 0.02), ("hinge", 1.0, 0.0, 0.0), ("ipo", 1.0, 0.0, 0.0),
             ("ipo", 0.3, 0.0, 0.25)]  # fmt: skip


@pytest.mark.parametrize("loss_type, cpo_alpha, eps, alpha", CPO_CASES)
def test_cpo_losses_equal_trls_cpo_trainer_with_gradients_and_metrics(
    base, tmp_path, loss_type, cpo_alpha, eps, alpha
):
    """Stage cpo: TRL's CPOTrainer with loss_type sigmoid, hinge and ipo (summed log-probs for the first two, per-token
    means for ipo), its cpo_alpha NLL term, label_smoothing and AlphaPO alpha, against SimPOTrainer with the loss
    type: the loss, every LoRA gradient and TRL's metrics (HEAD refused these losses: no stage cpo, and stage simpo's
    align.loss_type takes simpo alone)."""
    model = _lora(base)
    args = CPOConfig(str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                     loss_type=loss_type, beta=0.3, cpo_alpha=cpo_alpha, label_smoothing=eps, alpha=alpha)  # fmt: skip
    trainer = dt.trl_trainer(CPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                         processing_class=tokenizer())  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    expected, metrics = trainer.get_batch_loss_metrics(model, batch)
    expected.backward()
    want = _grads(model)
    align = AlignArgs(beta=0.3, loss_type=loss_type, cpo_alpha=cpo_alpha, label_smoothing=eps, alpha=alpha)
    ours = SimPOTrainer(model=model, args=_args(tmp_path / "dt"), align=align, loss_type=loss_type)
    got = ours.compute_loss(model, _lm_batch(batch))
    got.backward()
    assert abs(got.item() - expected.item()) < ATOL * max(1.0, abs(expected.item())), (got.item(), expected.item())
    _same(want, _grads(model), 5e-5 if alpha else 1e-5)  # (AlphaPO: see test_align_probe11's simpo test)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        assert ours._stats[key][0] == pytest.approx(metrics[key], abs=1e-4, rel=1e-5), key
    if cpo_alpha:
        assert ours._stats["nll_loss"][0] == pytest.approx(metrics["nll_loss"], abs=ATOL)


def test_cpo_losses_by_hand():
    """beta = 0.5, chosen and rejected log-probs -2 and -6 (u = 4): sigmoid with eps 0.25:
    0.75 * -log sigmoid(2) + 0.25 * -log sigmoid(-2) = 0.75 * 0.126928 + 0.25 * 2.126928 = 0.626928; hinge
    max(0, 1 - 2) = 0; ipo (4 - 1)^2 = 9; rewards 0.5 * -2 = -1 and -3."""
    from deltatune.train.cpo import cpo_loss

    c, r = torch.tensor([-2.0]), torch.tensor([-6.0])
    losses, chosen, rejected = cpo_loss(c, r, 0.5, "sigmoid", 0.25)
    assert losses.item() == pytest.approx(0.626928, abs=1e-6) and (chosen.item(), rejected.item()) == (-1.0, -3.0)
    assert cpo_loss(c, r, 0.5, "hinge")[0].item() == 0.0 and cpo_loss(c, r, 0.5, "ipo")[0].item() == 9.0
    with pytest.raises(ValueError, match="loss_type must be sigmoid, hinge or ipo"):
        cpo_loss(c, r, 0.5, "simpo")


RAW = {"model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}}


def test_stage_cpo_recipe_keys_and_refusals():
    """Stage cpo takes TRL's CPO keys; align.cpo_alpha left out is TRL's default 1 (stage simpo's stays 0); a bad
    loss_type, or label_smoothing with a loss that does not read it, is refused in one line naming the key."""
    from deltatune.config import ConfigError
    from deltatune.train import build

    a = build({**RAW, "stage": "cpo"}).align
    assert (a.loss_type, a.cpo_alpha, a.beta) == ("sigmoid", 1.0, 0.1)  # (TRL's CPOConfig defaults)
    a = build({**RAW, "stage": "cpo", "align": {"loss_type": "ipo", "cpo_alpha": 0.0, "alpha": 0.2}}).align
    assert (a.loss_type, a.cpo_alpha, a.alpha) == ("ipo", 0.0, 0.2)
    assert build({**RAW, "stage": "simpo"}).align.cpo_alpha == 0.0
    for align, message in [({"loss_type": "robust"}, "align.loss_type for stage cpo must be sigmoid, hinge, ipo or "
                             "simpo (TRL's CPO loss_type), got 'robust'"),
                           ({"loss_type": "hinge", "label_smoothing": 0.1}, "align.label_smoothing is for CPO's "
                            "sigmoid and simpo losses; align.loss_type is hinge")]:  # fmt: skip
        with pytest.raises(ConfigError) as info:
            build({**RAW, "stage": "cpo", "align": align})
        assert message in str(info.value) and "\n" not in str(info.value)


def test_stage_cpo_trains_two_steps_through_the_cli(base, tmp_path, capsys):
    """Stage cpo end to end (recipes/simpo.yaml with stage=cpo): two steps, the eval's pair metrics, its note."""
    import json

    from deltatune.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 3))
    out = tmp_path / "run"
    code = main(["train", "recipes/simpo.yaml", "stage=cpo", "align.loss_type=hinge", "align.simpo_gamma=0.5",
                 f"model.name_or_path={base}", "model.dtype=float32", "model.gradient_checkpointing=false",
                 f"data.train={data}", f"data.eval={data}", "data.max_length=24", "train.max_steps=2",
                 "train.batch_size=2", "train.grad_accum=1", "train.report_to=[none]", f"output.dir={out}"])  # fmt: skip
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2 and {"eval_accuracy", "eval_rewards/margins"} <= metrics.keys()
    assert "CPO loss hinge with beta=2.0" in (out / "report.md").read_text()


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_precomputed_reference_equals_trls_with_gradients(base, tmp_path, loss_type):
    """align.precompute_ref_log_probs on stage kto, as TRL's KTOTrainer: each row's reference log-prob and (kto) its
    mismatched pair's, the pairs fixed within blocks of the train batch size (TRL's ref_logps, ref_KL_logps), then the
    loss and every LoRA gradient of a step that reads them and runs no reference forward (HEAD refused the key)."""
    from deltatune.train.kto import KTOCollator

    model = _lora(base)
    args = trl.KTOConfig(str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                         beta=0.3, loss_type=loss_type, precompute_ref_log_probs=True)  # fmt: skip
    trainer = dt.trl_trainer(trl.KTOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                                             ref_model=AutoModelForCausalLM.from_pretrained(base),
                                             processing_class=tokenizer())  # fmt: skip
    theirs = trainer.train_dataset
    kl = loss_type == "kto"
    rows = [{"input_ids": e["prompt_ids"] + e["completion_ids"], "attention_mask": [1] * len(e["prompt_ids"] +
             e["completion_ids"]), "labels": [-100] * len(e["prompt_ids"]) + e["completion_ids"],
             "n_prompt": len(e["prompt_ids"]), "completion_ids": e["completion_ids"], "desirable": e["label"]}
            for e in theirs]  # fmt: skip
    collate = KTOCollator(tokenizer().pad_token_id, 1024, kl)
    align = AlignArgs(beta=0.3, loss_type=loss_type, precompute_ref_log_probs=True)
    targs = TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True, per_device_train_batch_size=4)
    calls = []
    ours = KTOTrainer(model=model, args=targs, train_dataset=rows, data_collator=collate, align=align)
    assert [e["ref_logp"] for e in ours.train_dataset] == pytest.approx(theirs["ref_logps"], abs=2e-5)
    if kl:
        assert [e["ref_kl_logp"] for e in ours.train_dataset] == pytest.approx(theirs["ref_KL_logps"], abs=2e-5)
        assert [e["kl_completion"] for e in ours.train_dataset] == theirs["KL_completion_ids"]
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    model.zero_grad(set_to_none=True)
    expected = trainer.compute_loss(model, batch)
    expected.backward()
    want = _grads(model)
    mine = collate(ours.train_dataset)
    assert "ref_logp" in mine and ("ref_kl_logp" in mine) == kl
    original = model.disable_adapter
    model.disable_adapter = lambda: calls.append(1) or original()  # (a reference forward would show here)
    try:
        got = ours.compute_loss(model, mine)
    finally:
        del model.disable_adapter
    got.backward()
    assert not calls and abs(got.item() - expected.item()) < ATOL
    _same(want, _grads(model))


def test_orpo_policy_runs_without_dropout(base, tmp_path):
    """ORPO (TRL's ORPOConfig disable_dropout, default true): every nn.Dropout at 0, so two training forwards of the
    same batch give the same loss; align.disable_dropout false keeps lora_dropout (they differ)."""
    from deltatune.train.orpo import ORPOTrainer

    batch = _lm_batch(_cpo_batch(base, tmp_path))
    losses = {}
    for off in (True, False):
        model = _lora(base, 0.5)
        t = ORPOTrainer(model=model, args=_args(tmp_path / str(off)), align=AlignArgs(beta=0.3, disable_dropout=off))
        assert set(_dropouts(model)) == ({0.0} if off else {0.5})
        model.train()
        with torch.no_grad():
            losses[off] = [t.compute_loss(model, batch).item() for _ in range(2)]
    assert losses[True][0] == losses[True][1] and losses[False][0] != losses[False][1]


def _cpo_batch(base, tmp_path) -> dict[str, torch.Tensor]:
    """TRL CPOTrainer's batch of PAIRS (for _lm_batch)."""
    args = CPOConfig(str(tmp_path / "batch"), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False)
    trainer = dt.trl_trainer(CPOTrainer)(model=_lora(base), args=args, train_dataset=Dataset.from_list(PAIRS),
                                         processing_class=tokenizer())  # fmt: skip
    return next(iter(trainer.get_train_dataloader()))


LONG = [("what do people call you", "people call me delta and i am glad to help you with anything today", "no"),
        ("good morning friend how is everything going on this lovely sunny day", "hi", "leave me alone please"),
        ("tell me", "a short story", "nothing")]  # fmt: skip
CUT_CONVERSATIONAL = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                       "rejected": [{"role": "assistant", "content": r}]} for p, c, r in LONG]  # fmt: skip


@pytest.mark.parametrize("max_length", [36, 32])
def test_simpo_orpo_cpo_cut_pairs_keep_the_start_as_trls_cpo(base, tmp_path, max_length):
    """Long rows (prompts of 28, 35 and 25 tokens) on stage simpo (orpo and cpo read the same):
    TRL's CPOTrainer keeps each side's prompt whole and cuts its answer (its ORPOTrainer the same), so a cut side's
    tokens are deltatune's; uncut too (both append an EOS after the chat template's end since bac51df). HEAD cut
    the prompt's start to keep the whole answer. At 32 the second prompt alone fills max_length: TRL keeps it with no
    answer token, deltatune keeps the prompt's end and the answers' start (as its dpo stage), and says so."""
    import json

    from deltatune.train import build
    from deltatune.train.models import load_tokenizer
    from deltatune.train.table import prepare

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CUT_CONVERSATIONAL))
    tok = load_tokenizer(base)
    cfg = build({"stage": "simpo", "model": {"name_or_path": base}, "train": {"report_to": ["none"]},
                 "data": {"train": str(path), "max_length": max_length}, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    ours = prepare(cfg, tok)
    args = CPOConfig(str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(CPOTrainer)(model=_lora(base), args=args, processing_class=tok,
                                            train_dataset=Dataset.from_list(CUT_CONVERSATIONAL)).train_dataset  # fmt: skip
    cut = 0
    for i, (ex, mine) in enumerate(zip(theirs, ours.train, strict=True)):
        if max_length == 32 and i == 1:  # (TRL: the prompt alone, 35 tokens, no answer token)
            assert len(ex["chosen_input_ids"]) == 35 and all(lab == -100 for lab in ex["chosen_labels"])
            assert len(mine["chosen"]["input_ids"]) == 32 and mine["chosen"]["labels"][-1] != -100
            continue
        for side in ("chosen", "rejected"):
            ids, labels = ex[f"{side}_input_ids"], ex[f"{side}_labels"]
            cut += len(ids) == max_length
            assert ids == mine[side]["input_ids"] and labels == mine[side]["labels"], (i, side)
    assert cut >= 3
    note = f"1 train pairs have a prompt that alone fills data.max_length={max_length}"
    assert any(n.startswith(note) for n in ours.notes) == (max_length == 32)


def _rm_lora(base: str, dropout: float) -> dt.DeltaModel:
    """A one-output sequence classifier of the tiny Llama with a trained-looking LoRA (``lora_dropout``)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = 0
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=dropout, task_type="SEQ_CLS")
    model = dt.get_delta_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_rm_runs_without_dropout_as_trls_reward_trainer(base, tmp_path):
    """lora_dropout 0.5: TRL's RewardTrainer (RewardConfig.disable_dropout, default true) sets every nn.Dropout to 0;
    deltatune's rm (align.disable_dropout, default true) equals its loss and the gradient of every trained weight.
    HEAD kept the LoRA's dropout on in rm: another loss, other gradients; align.disable_dropout: false keeps it."""
    from deltatune.train.config import build
    from deltatune.train.reward import RewardTrainer, prepare_rm

    theirs, ours = _rm_lora(base, 0.5), _rm_lora(base, 0.5)
    args = trl.RewardConfig(str(tmp_path / "trl"), per_device_train_batch_size=2, report_to=[], use_cpu=True,
                            bf16=False)  # fmt: skip
    pairs = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in PAIRS]
    trainer = dt.trl_trainer(trl.RewardTrainer)(model=theirs, args=args, train_dataset=Dataset.from_list(pairs),
                                                processing_class=tokenizer())  # fmt: skip
    assert set(_dropouts(theirs)) == {0.0}
    batch = next(iter(trainer.get_train_dataloader()))
    theirs.train()
    expected = trainer.compute_loss(theirs, dict(batch))
    expected.backward()
    t = RewardTrainer(model=ours, args=_args(tmp_path / "dt"))
    assert set(_dropouts(ours)) == {0.0}
    ours.train()
    got = t.compute_loss(ours, {k: batch[k] for k in ("input_ids", "attention_mask")})
    got.backward()
    assert abs(got.item() - expected.item()) < ATOL
    want, have = _grads(theirs), _grads(ours)
    assert want.keys() == have.keys() and len(want) == 9  # 8 LoRA weights and the score head
    assert max(v.abs().max().item() for v in want.values()) > 1e-3
    assert max((want[k] - have[k]).abs().max().item() for k in want) < 1e-5
    # the stage passes align.disable_dropout: false keeps the model's dropout (two training forwards then differ)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    for off, want_p in ((True, 0.0), (False, 0.5)):
        cfg = build({"stage": "rm", "model": {"name_or_path": base}, "data": {"train": str(data)},
                     "align": {"disable_dropout": off}})  # fmt: skip
        kept = _rm_lora(base, 0.5)
        t = prepare_rm(cfg, tokenizer()).trainer_class(model=kept, args=_args(tmp_path / "kept"))
        assert set(_dropouts(kept)) == {want_p}
    kept.train()
    with torch.no_grad():
        lm = {k: batch[k] for k in ("input_ids", "attention_mask")}
        a, b = t.compute_loss(kept, lm).item(), t.compute_loss(kept, lm).item()
    assert a != b and abs(a - expected.item()) > 1e-4


def test_kto_report_says_how_its_pairs_are_made(tmp_path):
    """The report's KTO line: without a precomputed reference the mismatched pairs are made within each (shuffled)
    batch; with one they are fixed once in blocks of train.batch_size rows of the data, as TRL pairs them (HEAD said
    'within each batch' either way)."""
    from deltatune.train.config import build
    from deltatune.train.kto import prepare_kto

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    lines = {}
    for pre in (False, True):
        cfg = build({"stage": "kto", "model": {"name_or_path": "x"}, "data": {"train": str(data)},
                     "train": {"batch_size": 2}, "align": {"precompute_ref_log_probs": pre}})  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            notes = prepare_kto(cfg, tokenizer()).notes
        (lines[pre],) = [n for n in notes if n.startswith("KTO (")]
    assert lines[False].endswith("reference point from mismatched pairs within each batch (eval: within blocks of "
                                 "train.batch_size=2 rows, as TRL pairs them)")  # fmt: skip
    assert lines[True].endswith("log-probs precomputed once; reference point from mismatched pairs fixed in blocks of "
                                "train.batch_size=2 rows of the data, train and eval, as TRL pairs them")  # fmt: skip


PPO_RAW = {"stage": "ppo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}, "train": {"batch_size": 8},
           "align": {"kl_coef": 0.1, "num_mini_batches": 4, "num_ppo_epochs": 2}}  # fmt: skip


def _old_ppo_align() -> tuple[dict, dict]:
    """(today's run.yaml align section of PPO_RAW, the one a deltatune before 805dd7e wrote: TRL's names kept beside
    the deltatune names they were copied to, num_mini_batches beside the mini_batch_size it set)."""
    from deltatune.train.config import build

    new = dataclasses.asdict(build(copy.deepcopy(PPO_RAW)).align)
    assert (new["init_kl_coef"], new["ppo_epochs"], new["mini_batch_size"]) == (0.1, 2, 2)
    assert new["kl_coef"] is new["num_ppo_epochs"] is new["num_mini_batches"] is None
    return new, {**new, "kl_coef": 0.1, "num_mini_batches": 4, "num_ppo_epochs": 2}


def test_an_old_run_yaml_align_reads_as_today_writes_it():
    """old_run_align (what a --resume compares): a pre-805dd7e PPO run.yaml equals today's for the same recipe
    (HEAD compared it as written: align.kl_coef: 0.1 -> None; align.num_mini_batches: 4 -> None, refused); a key an
    old run.yaml lacks is what that run trained with (dpo..rm: dropout kept; ppo: init_kl_coef 0.2), on the stages
    that read it; a refusal where an old default meets today's says the default changed."""
    from deltatune.train.config_align import default_changed, old_run_align

    new, old = _old_ppo_align()
    assert old_run_align(old, "ppo", 8) == new and old != new
    assert old_run_align(new, "ppo", 8) == new  # (today's run.yaml as it is)
    bare = {k: v for k, v in new.items() if k not in ("disable_dropout", "init_kl_coef")}
    for stage in ("dpo", "kto", "orpo", "simpo", "cpo", "rm"):
        assert old_run_align(bare, stage)["disable_dropout"] is False
    assert old_run_align(bare, "ppo")["init_kl_coef"] == 0.2
    assert "disable_dropout" not in old_run_align(bare, "sft") and "init_kl_coef" not in old_run_align(bare, "dpo")
    assert old_run_align(bare, "dpo") is not bare and "disable_dropout" not in bare
    assert old_run_align(["x"], "ppo") == ["x"]  # (not a mapping: the comparison names it)
    assert default_changed("align.init_kl_coef", 0.2, 0.05) == (
        " (its default was 0.2, 0.05 since 805dd7e (TRL's PPOConfig kl_coef); set align.init_kl_coef: 0.2 to "
        "continue as the run began)"
    )
    assert default_changed("align.disable_dropout", False, True).startswith(" (its default was false, true since ")
    assert default_changed("align.init_kl_coef", 0.3, 0.05) == default_changed("align.init_kl_coef", 0.2, 0.1) == ""
    assert default_changed("train.lr", 0.2, 0.05) == ""


_RESUME_PATCHED = "old_run_align" in inspect.getsource(run_module._check_resume_recipe)


@pytest.mark.skipif(not _RESUME_PATCHED, reason="needs run.py's call of old_run_align (fix12a report's diff)")
def test_resume_of_a_run_started_before_the_align_keys(tmp_path):
    """--resume with the same recipe: a pre-805dd7e PPO run continues (was refused for TRL's names); a pre-a388979
    dpo run with lora_dropout trained with dropout, so today's default (off) is a change, refused with why (HEAD
    accepted it silently); an old PPO run's init_kl_coef 0.2 against today's 0.05 is refused, saying the default
    changed."""
    from deltatune.config import ConfigError
    from deltatune.train.config import build
    from deltatune.train.run import _check_resume_recipe, _recipe_dict

    def resume(old: dict, raw: dict) -> bool:
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
        return _check_resume_recipe(str(tmp_path), _recipe_dict(build(copy.deepcopy(raw))), False)

    recipe = _recipe_dict(build(copy.deepcopy(PPO_RAW)))
    assert resume({**recipe, "align": _old_ppo_align()[1]}, PPO_RAW) is False
    raw = {"stage": "dpo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"},
           "method": {"name": "lora", "lora_dropout": 0.1}}  # fmt: skip
    old = _recipe_dict(build(copy.deepcopy(raw)))
    del old["align"]["disable_dropout"]
    with pytest.raises(ConfigError, match=r"align\.disable_dropout: False -> True \(its default was false, true "):
        resume(old, raw)
    assert resume(old, {**raw, "align": {"disable_dropout": False}}) is False
    raw = {k: v for k, v in PPO_RAW.items() if k != "align"}
    old = _recipe_dict(build(copy.deepcopy(raw)))
    old["align"]["init_kl_coef"] = 0.2
    with pytest.raises(ConfigError, match=r"align\.init_kl_coef: 0\.2 -> 0\.05 \(its default was 0\.2, 0\.05 since"):
        resume(old, raw)
    del old["align"]["init_kl_coef"]  # (a run.yaml without the key: 0.2 too)
    with pytest.raises(ConfigError, match=r"align\.init_kl_coef: 0\.2 -> 0\.05"):
        resume(old, raw)
    assert resume(old, {**raw, "align": {"init_kl_coef": 0.2}}) is False
