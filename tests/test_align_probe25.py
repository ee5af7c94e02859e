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
