"""LoRA and IA3 on a ViT image classifier: same weights -> same logits as PEFT, files both ways, head included.

PEFT's default-target table has no ViT and its image-classification guide names transformers 4's ``query``/``value``;
both sides here name transformers 5's ``q_proj``/``v_proj`` and train the head through ``modules_to_save``, as the
image_cls stage does. Adapters are non-zero from the start, so a key, scaling or layout mismatch shows in the logits.
"""

from __future__ import annotations

import pytest
import torch
from tiny import output_of, tiny_inputs, tiny_model
from tolerances import ATOL

import deltatune as dt

peft = pytest.importorskip("peft")

ATOL32 = ATOL[torch.float32]
HEAD = {"modules_to_save": ["classifier"]}
CASES = [
    pytest.param(
        "lora", {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["q_proj", "v_proj"]}
    ),
    pytest.param(
        "lora-all-linear", {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": "all-linear"}
    ),
    pytest.param(
        "ia3",
        {"init_ia3_weights": False, "target_modules": ["k_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]},
    ),
]


def _configs(kind: str, fields: dict):
    if kind.startswith("lora"):
        return dt.LoraConfig(**fields, **HEAD), peft.LoraConfig(**fields, **HEAD)
    return dt.IA3Config(**fields, **HEAD), peft.IA3Config(**fields, **HEAD)


def _perturb_head(model) -> None:
    """Make the adapter's copy of the head differ from the base's, so that loading the wrong one shows."""
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "classifier" in name and p.requires_grad:
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("kind, fields", CASES)
def test_deltatune_file_loads_in_peft(kind, fields, tmp_path):
    ours_cfg, _ = _configs(kind, fields)
    inputs = tiny_inputs("vit")
    ours = dt.get_delta_model(tiny_model("vit"), ours_cfg).eval()
    _perturb_head(ours)
    expected = output_of(ours, inputs)
    assert (expected - output_of(tiny_model("vit"), inputs)).abs().max() > ATOL32
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model("vit"), tmp_path).eval()
    assert set(peft.get_peft_model_state_dict(theirs)) == set(ours.adapter_state_dict())
    torch.testing.assert_close(output_of(theirs, inputs), expected, atol=ATOL32, rtol=0)


# PEFT's "all-linear" on a model without output embeddings writes the head ("classifier") into target_modules
# although modules_to_save wins and PEFT never wraps it with LoRA; deltatune refused that file (a LoRA target that
# is a modules_to_save copy) until LoRA skipped such a target as PEFT does.
@pytest.mark.parametrize("kind, fields", CASES)
def test_peft_file_loads_in_deltatune(kind, fields, tmp_path):
    _, theirs_cfg = _configs(kind, fields)
    inputs = tiny_inputs("vit")
    theirs = peft.get_peft_model(tiny_model("vit"), theirs_cfg).eval()
    _perturb_head(theirs)
    expected = output_of(theirs, inputs)
    assert (expected - output_of(tiny_model("vit"), inputs)).abs().max() > ATOL32
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model("vit"), tmp_path).eval()
    torch.testing.assert_close(output_of(ours, inputs), expected, atol=ATOL32, rtol=0)
    # merged into plain weights, the outputs stay
    torch.testing.assert_close(output_of(ours.merge_and_unload(), inputs), expected, atol=ATOL32, rtol=0)
