"""Probe 25 of the preference stages without a second model (kto.py) against TRL 1.16: KTO training data with one
label only (every row desirable), which TRL's KTOTrainer trains on (its balance check counts max(n, 1) of each), was
refused; its balance note said nothing of the missing label (and divided by the zero count)."""

import json
import warnings

import pytest
from tiny import word_tokenizer

import deltatune.train.kto as kto
from deltatune.train.config import build

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


def test_orpo_and_cpo_add_a_moe_models_load_balancing_loss_as_trl(tmp_path):
    """TRL 1.16's ORPOTrainer and CPOTrainer (SimPO: loss_type simpo) add router_aux_loss_coef times the forward's
    aux_loss where the model's config has output_router_logits true; HEAD left it out (a Mixtral with coef 0.05:
    the loss short by 0.05 x aux_loss, about 0.1). Each loss is now the same loss of the model without the term, plus
    coef times transformers' own aux_loss of the (chosen + rejected) batch."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, TrainingArguments

    from deltatune.train.config import AlignArgs
    from deltatune.train.orpo import ORPOTrainer
    from deltatune.train.simpo import SimPOTrainer

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
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        aux = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    for make in (lambda: ORPOTrainer(model=model, args=args, align=AlignArgs(beta=0.2, disable_dropout=False)),
                 lambda: SimPOTrainer(model=model, args=args, align=AlignArgs(beta=2.0, disable_dropout=False))):  # fmt: skip
        losses = []
        for on in (True, False):  # (the trainer built with the config's output_router_logits so)
            model.config.output_router_logits = on
            with torch.no_grad():
                losses.append(make().compute_loss(model, batch).item())
        model.config.output_router_logits = True
        assert abs(losses[0] - (losses[1] + 0.05 * aux.item())) < 1e-6 and aux.item() > 1.0
