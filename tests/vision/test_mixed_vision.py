"""Mixed-adapter batches on a ViT image classifier: each row computes with its own LoRA (and its own head copy)."""

from __future__ import annotations

import torch
from tiny import tiny_inputs, tiny_model
from tolerances import ATOL

import deltatune as dt

ATOL32 = ATOL[torch.float32]
NAMES = ["a", "b", "__base__", "a"]


def test_rows_equal_their_adapter_alone():
    head = {"modules_to_save": ["classifier"], "init_lora_weights": False}
    model = dt.get_delta_model(tiny_model("vit"), dt.LoraConfig(r=4, **head), "a")
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj", "fc1"], **head))
    with torch.no_grad():  # b's head copy differs from a's and the base's
        for name, p in model.named_parameters():
            if ".classifier.modules_to_save.b." in name:
                p.add_(0.5)
    model.eval()
    x = tiny_inputs("vit", batch=4)["pixel_values"]
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=NAMES).logits
        alone = []
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(model(pixel_values=x[i : i + 1]).logits[0])
            else:
                model.set_adapter(name)
                alone.append(model(pixel_values=x[i : i + 1]).logits[0])
        base = tiny_model("vit")(pixel_values=x).logits
    for i in (0, 1, 3):
        assert (alone[i] - base[i]).abs().max() > ATOL32, "the adapter must change its row"
    torch.testing.assert_close(mixed, torch.stack(alone), atol=ATOL32, rtol=0)


def test_llava_rows_equal_their_adapter_alone():
    """A tiny LLaVA: each row's image and text go through its own language-tower LoRA (or none, "__base__")."""
    from tiny_vlm import tiny_vlm, vlm_inputs

    from deltatune import towers

    def lora(r: int) -> dt.LoraConfig:
        return towers.restrict(tiny_vlm("llava"), dt.LoraConfig(r=r, init_lora_weights=False))

    model = dt.get_delta_model(tiny_vlm("llava"), lora(4), "a")
    model.add_adapter("b", lora(2))
    x = vlm_inputs("llava", batch=4)
    with torch.no_grad():
        mixed = model(**x, adapter_names=NAMES).logits
        alone = []
        for i, name in enumerate(NAMES):
            row = {k: v[i : i + 1] for k, v in x.items()}
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(model(**row).logits[0])
            else:
                model.set_adapter(name)
                alone.append(model(**row).logits[0])
        base = tiny_vlm("llava")(**x).logits
    for i in (0, 1, 3):
        assert (alone[i] - base[i]).abs().max() > ATOL32, "the adapter must change its row"
    torch.testing.assert_close(mixed, torch.stack(alone), atol=ATOL32, rtol=0)
