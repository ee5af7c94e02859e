"""Conv2d LoRA on a CNN image classifier (a tiny ResNet built from a config): files both ways with peft and identical
logits, merge exact and reloaded as a plain transformers model, and stage image_cls training it on the digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tolerances import ATOL

import deltatune as dt
from deltatune.cli import main

ROOT = Path(__file__).resolve().parent.parent.parent
ATOL32 = ATOL[torch.float32]
TARGETS = ["convolution"]  # every Conv2d of a transformers ResNet (stem and blocks)


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config).eval()


PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=PIXELS).logits


def ours() -> dt.DeltaModel:
    torch.manual_seed(2)
    config = dt.LoraConfig(
        r=2, lora_alpha=4, target_modules=TARGETS, modules_to_save=["classifier"], init_lora_weights=False
    )
    return dt.get_delta_model(resnet(), config).eval()


def test_conv2d_lora_files_move_both_ways_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = ours()
    assert (logits(model) - logits(resnet())).abs().max() > ATOL32
    model.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(resnet(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-6, rtol=0)
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=TARGETS, modules_to_save=["classifier"], init_lora_weights=False
    )
    made = peft.get_peft_model(resnet(), config).eval()
    made.save_pretrained(tmp_path / "peft")
    loaded = dt.DeltaModel.from_pretrained(resnet(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded), logits(made), atol=1e-6, rtol=0)


def test_conv2d_merge_is_exact_and_reloads_as_a_plain_resnet(tmp_path):
    from transformers import ResNetForImageClassification

    model = ours()
    adapted = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), adapted, atol=ATOL32, rtol=0)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(resnet()), atol=ATOL32, rtol=0)
    plain = model.merge_and_unload()
    plain.save_pretrained(tmp_path)
    torch.testing.assert_close(
        logits(ResNetForImageClassification.from_pretrained(tmp_path).eval()), adapted, atol=ATOL32, rtol=0
    )


def test_image_cls_trains_conv2d_lora_on_a_resnet(tmp_path, capsys):
    from transformers import ViTImageProcessorPil

    from deltatune.data import digits

    digits.write(str(tmp_path / "digits"), shots=4)
    base = tmp_path / "resnet"
    resnet().save_pretrained(base)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(base)
    out = tmp_path / "run"
    argv = ["train", str(ROOT / "recipes" / "digits-adapt-lora.yaml"), f"model.name_or_path={base}", f"output.dir={out}",
            f"data.train={tmp_path / 'digits' / 'adapt' / 'train'}", f"data.eval={tmp_path / 'digits' / 'adapt' / 'test'}",
            "method={name: lora, r: 2, lora_alpha: 4, target_modules: [convolution]}", "train.max_steps=2",
            "train.report_to=[none]", "train.batch_size=4", "data.limit=12"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    import json

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["convolution"] and "classifier" in config["modules_to_save"]
