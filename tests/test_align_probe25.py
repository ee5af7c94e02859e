"""Probe 25 of the preference stages without a second model (kto.py) against TRL 1.16: KTO training data with one
label only (every row desirable), which TRL's KTOTrainer trains on (its balance check counts max(n, 1) of each), was
refused; its balance note said nothing of the missing label (and divided by the zero count). Such data whose own
weight is 0 trains nothing (refused, as both weights 0 are); KTOTrainer.compute_loss on a batch of it. ORPO, SimPO
and CPO (TRL's ORPOTrainer, CPOTrainer) add a MoE's load-balancing loss where output_router_logits is on, and warn
where its coefficient is then 0."""

import json
import warnings

import pytest
from tiny import word_tokenizer

import deltatune.train.kto as kto
from deltatune.config import ConfigError
from deltatune.data.load import DataError
from deltatune.train.config import AlignArgs, build

ROWS = [{"prompt": "w1 w2", "completion": " w3 w4", "label": True}, {"prompt": "w5", "completion": " w6", "label": True},
        {"prompt": "w7 w8", "completion": " w9", "label": True}, {"prompt": "w2", "completion": " w1 w3", "label": True}]  # fmt: skip


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_trains_on_desirable_rows_only_as_trl_does(tmp_path, loss_type):
    """TRL 1.16's KTOTrainer prepares and trains such data (num_undesirable = max(0, 1): only its weights note);
    HEAD raised DataError "KTO needs both desirable and undesirable rows". Now the rows are prepared, each
    desirable, with a warning that names the missing label; the loss of a batch of them is TRL's desirable loss."""
    import torch

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = build({"stage": "kto", "model": {"name_or_path": "x"}, "train": {"batch_size": 2},
                 "align": {"loss_type": loss_type}, "data": {"train": str(path), "max_length": 16}})  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = kto.prepare_kto(cfg, word_tokenizer())
    assert [e["desirable"] for e in p.train] == [True] * 4
    said = [str(w.message) for w in caught if "undesirable" in str(w.message)]
    assert len(said) == 1 and "0 undesirable" in said[0], said
    batch = p.collator(p.train[:2])
    assert batch["desirable"].tolist() == [True, True]
    # TRL's desirable loss of such rows (kto: 1 - sigmoid(beta (r - z0)); apo_zero_unpaired: 1 - sigmoid(beta r))
    policy, ref, z0 = torch.tensor([-3.0, -5.0]), torch.tensor([-3.5, -4.0]), torch.tensor(0.2)
    losses, _ = kto.kto_loss(policy, ref, batch["desirable"], z0, 0.1, 1.0, 1.0, loss_type)
    kl = z0 if loss_type == "kto" else 0.0
    assert torch.allclose(losses, 1 - torch.sigmoid(0.1 * ((policy - ref) - kl)))


@pytest.fixture(scope="module")
def mixtral():
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.05)  # fmt: skip
    model = MixtralForCausalLM(config).eval()
    ids = torch.randint(1, 32, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = mask[3, 6:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :3] = -100
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _moe_trainers(model, tmp_path):
    from transformers import TrainingArguments

    from deltatune.train.orpo import ORPOTrainer
    from deltatune.train.simpo import SimPOTrainer

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    return (lambda: ORPOTrainer(model=model, args=args, align=AlignArgs(beta=0.2, disable_dropout=False)),
            lambda: SimPOTrainer(model=model, args=args, align=AlignArgs(beta=2.0, disable_dropout=False)))  # fmt: skip


def test_orpo_and_cpo_add_a_moe_models_load_balancing_loss_as_trl(tmp_path, mixtral):
    """TRL 1.16's ORPOTrainer and CPOTrainer (SimPO: loss_type simpo) add router_aux_loss_coef times the forward's
    aux_loss where the model's config has output_router_logits true; HEAD left it out (a Mixtral with coef 0.05:
    the loss short by 0.05 x aux_loss, about 0.1). Each loss is now the same loss of the model without the term, plus
    coef times transformers' own aux_loss of the (chosen + rejected) batch."""
    import torch

    model, batch = mixtral
    with torch.no_grad():
        aux = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    for make in _moe_trainers(model, tmp_path):
        losses = []
        for on in (True, False):  # (the trainer built with the config's output_router_logits so)
            model.config.output_router_logits = on
            with torch.no_grad():
                losses.append(make().compute_loss(model, batch).item())
        model.config.output_router_logits = True
        assert abs(losses[0] - (losses[1] + 0.05 * aux.aux_loss.item())) < 1e-6 and aux.aux_loss.item() > 1.0


def test_orpo_and_cpo_warn_of_a_zero_router_coefficient_as_trl(tmp_path, mixtral):
    """TRL 1.16's ORPOTrainer and CPOTrainer warn in __init__ where the config's output_router_logits is true and its
    router_aux_loss_coef 0.0 (the load-balancing loss then adds nothing); HEAD said nothing. Now one warning names
    both; none where output_router_logits is false (TRL's condition); the loss is the one without the term."""
    import torch

    model, batch = mixtral
    try:
        model.config.router_aux_loss_coef = 0.0
        for make in _moe_trainers(model, tmp_path):
            losses = []
            for on in (True, False):
                model.config.output_router_logits = on
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    trainer = make()
                said = [str(w.message) for w in caught if "router_aux_loss_coef" in str(w.message)]
                assert len(said) == (1 if on else 0) and all("output_router_logits" in m for m in said), said
                with torch.no_grad():
                    losses.append(trainer.compute_loss(model, batch).item())
            assert abs(losses[0] - losses[1]) < 1e-6
    finally:
        model.config.router_aux_loss_coef, model.config.output_router_logits = 0.05, True


def test_kto_one_label_whose_weight_is_0_is_refused_and_notes_say_what_trains(tmp_path):
    """Review of 51ab086: all-desirable data with align.desirable_weight 0 trained nothing with only a warning
    (both weights 0 is refused); with undesirable_weight 0 the note said 'the undesirable rows ... teach nothing' of
    rows there are none of. Now the first is refused in one line naming the weight, the second notes that only the
    desirable loss trains; an eval file of one label is refused without calling its margin the best-model metric
    (it is not, under deltatune eval or another metric_for_best_model)."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def prepare(align, data=None):
        cfg = build({"stage": "kto", "model": {"name_or_path": "x"}, "train": {"batch_size": 2}, "align": align,
                     "data": {"train": str(path), "max_length": 16, **(data or {})}})  # fmt: skip
        return kto.prepare_kto(cfg, word_tokenizer())

    with pytest.raises(ConfigError, match=r"align.desirable_weight is 0 and .* only desirable rows \(4\)"):
        prepare({"desirable_weight": 0.0})
    with pytest.warns(UserWarning, match="0 undesirable rows: only the desirable loss trains"):
        prepare({"undesirable_weight": 0.0})
    assert kto.balance_note(10, 2, AlignArgs(undesirable_weight=0.0), "t.jsonl").endswith("teach nothing")
    with pytest.raises(DataError, match="both desirable and undesirable rows to evaluate") as e:
        prepare({}, {"eval": str(path)})
    assert "best-model" not in str(e.value)


def test_kto_trainer_loss_on_an_all_desirable_batch_is_trls(tmp_path):
    """KTOTrainer.compute_loss (deltatune's) on a batch of desirable rows only: TRL's KTO loss
    mean(lambda_D (1 - sigmoid(beta (r - z0)))), z0 = max(0, mean of the mismatched pairs' log-ratios), computed here
    from the model's own log-softmax; the log holds the desirable side's rewards/chosen and no rewards/rejected,
    rewards/margins or NaN."""
    import math

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = build({"stage": "kto", "model": {"name_or_path": "x"}, "train": {"batch_size": 2},
                 "align": {"beta": 0.5, "desirable_weight": 1.5}, "data": {"train": str(path), "max_length": 16}})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = kto.prepare_kto(cfg, word_tokenizer())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()  # fmt: skip
    batch = p.collator(p.train[:2])
    ref, ref_kl = torch.tensor([-9.0, -4.0]), torch.tensor([-40.0, -30.0])  # (a precomputed reference, z0 > 0)
    batch["ref_logp"], batch["ref_kl_logp"] = ref, ref_kl
    trainer = kto.KTOTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                             align=cfg.align)  # fmt: skip
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    logps = (picked * (labels != -100)).sum(-1)
    z0 = (logps[2:] - ref_kl).mean().clamp(min=0)
    assert z0 > 0
    want = (1.5 * (1 - torch.sigmoid(0.5 * ((logps[:2] - ref) - z0)))).mean().item()
    assert abs(loss - want) < 1e-5, (loss, want)
    logged = {k: sum(v) / len(v) for k, v in trainer._stats.items()}
    assert "rewards/chosen" in logged and not {"rewards/rejected", "rewards/margins", "logps/rejected"} & set(logged)
    assert all(math.isfinite(v) for v in logged.values()), logged
    assert abs(logged["rewards/chosen"] - (0.5 * (logps[:2] - ref)).mean().item()) < 1e-5
