"""Fixes to probe 21's mixed-adapter batch commits (``adapter_names=``), after review."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from test_mixed_batch_more import _llava_rows, _two
from test_mixed_probe21 import CONFIGS_AB, _pair
from tiny import tiny_inputs, tiny_model

import deltatune.calls as calls_module
from deltatune.layer import DeltaLayer


class _StarArgs(torch.nn.Module):
    """A base whose forward is ``forward(*args, **kwargs)``: its signature names no positional argument."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def test_unnamed_positional_images_of_a_star_args_base_are_refused_not_routed_by_row():
    """A base with ``forward(*args, **kwargs)`` called ``model(ids, pixels, mask)`` with [2, 0] images: positional
    tensors got no names, so the 2 images were taken for the 2 rows and row 0's second image went through row 1's
    vision-tower LoRA, silently (the keyword call is refused). Now an unnamed positional tensor that may hold
    images is refused in one line telling to pass it by keyword; even images (k per row), ids with a mask, and a
    text model's positional calls give the keyword call's logits."""
    from matrix import tiny_vlm

    model = _two(_StarArgs(tiny_vlm("llava")), {"target_modules": ["q_proj", "v_proj"]})
    assert any("vision_tower" in n for n, m in model.named_modules() if isinstance(m, DeltaLayer))
    with torch.no_grad():
        for images in ([2, 0], [0, 2], [2, 1], [3, 1]):
            rows = _llava_rows(images)
            ids, pixels, mask = rows["input_ids"], rows["pixel_values"], rows["attention_mask"]
            with pytest.raises(ValueError, match=r"^adapter_names routes 2 rows but positional argument 1 .*keyword"):
                model(ids, pixels, mask, adapter_names=["a", "b"])
            with pytest.raises(ValueError, match="images"):  # (the keyword call, refused before)
                model(**rows, adapter_names=["a", "b"])
        assert all(m.row_adapters is None for m in model.modules() if isinstance(m, DeltaLayer))
        rows, names = _llava_rows([2, 2, 2]), ["a", "b", "__base__"]
        expected = model(**rows, adapter_names=names).logits
        got = model(rows["input_ids"], rows["pixel_values"], rows["attention_mask"], adapter_names=names).logits
        assert torch.equal(got, expected)
        got = model(
            rows["input_ids"],
            pixel_values=rows["pixel_values"],
            attention_mask=rows["attention_mask"],
            adapter_names=names,
        )
        assert torch.equal(got.logits, expected)

        text = _two(_StarArgs(tiny_model("llama")), {"target_modules": ["q_proj", "v_proj"]})
        inputs, names = tiny_inputs("llama", batch=3), ["a", "__base__", "b"]
        expected = text(**inputs, adapter_names=names).logits
        assert torch.equal(text(inputs["input_ids"], inputs["attention_mask"], adapter_names=names).logits, expected)


def test_a_hooked_forward_still_names_its_positional_images():
    """accelerate's hooks wrap forward with functools.wraps: the signature (``__wrapped__``'s) names the positional
    images, so [2, 0] images are refused with the keyword call's reason and even ones route (no keyword advice)."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from matrix import tiny_vlm

    base = tiny_vlm("llava")
    add_hook_to_module(base, ModelHook())
    model = _two(base, {"target_modules": ["q_proj", "v_proj"]})
    assert calls_module._parameter_names(model, 3) == ["input_ids", "pixel_values", "attention_mask"]
    uneven = _llava_rows([2, 0])
    with torch.no_grad(), pytest.raises(ValueError, match=r"pixel_values holds 2 images .*\[2, 0\] images"):
        model(uneven["input_ids"], uneven["pixel_values"], uneven["attention_mask"], adapter_names=["a", "b"])
    rows = _llava_rows([1, 1])
    with torch.no_grad():
        expected = model(**rows, adapter_names=["a", "b"]).logits
        got = model(rows["input_ids"], rows["pixel_values"], rows["attention_mask"], adapter_names=["a", "b"])
    assert torch.equal(got.logits, expected)


def test_a_keyword_call_reads_no_forward_signature(monkeypatch):
    """The server calls by keyword on every request: a keyword forward or generate reads no signature (the base's
    forward was inspected on every mixed forward); a positional forward reads it once."""
    reads = []
    fake = types.SimpleNamespace(
        signature=lambda f: reads.append(f) or inspect.signature(f), Parameter=inspect.Parameter
    )
    monkeypatch.setattr(calls_module, "inspect", fake)
    model = _two(tiny_model("llama"), {"target_modules": ["q_proj"]})
    inputs, names = tiny_inputs("llama", batch=2), ["a", "b"]
    with torch.no_grad():
        expected = model(**inputs, adapter_names=names).logits
        assert reads == []
        model.generate(**inputs, adapter_names=names, max_new_tokens=2, pad_token_id=0)
        assert reads == []
        got = model(inputs["input_ids"], inputs["attention_mask"], adapter_names=names).logits
    assert len(reads) == 1 and torch.equal(got, expected)


def test_gathered_rows_without_autocast_are_each_adapter_alone_not_peft_s_mixed_batch():
    """A bf16 base with fp32 LoRAs of one rank, no autocast: each gathered row adds its fp32 update to the base
    output and rounds once, as the row loop and as peft with that adapter alone; peft's mixed batch rounds each
    update to bf16 before adding (``lora_output.to(torch_result_dtype)``), a few bf16 steps off. Kept, and
    documented (docs/methods.md, Mixed-adapter batches; methods/_lora_gather.py)."""
    configs = [(name, dict(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])) for name, alpha in CONFIGS_AB]
    reference, ours = _pair(configs)
    for model in (reference, ours):
        model.to(torch.bfloat16)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    inputs, names = tiny_inputs("llama", batch=4), ["x", "y", "__base__", "x"]
    with torch.no_grad():
        got = ours(**inputs, adapter_names=names).logits
        mixed = reference(**inputs, adapter_names=names).logits
        alone = []
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            if name == "__base__":
                with reference.disable_adapter():
                    alone.append(reference(**row).logits)
            else:
                reference.set_adapter(name)
                alone.append(reference(**row).logits)
        alone = torch.cat(alone)
    assert torch.equal(got, alone)  # peft's each adapter alone, to the bit
    assert not torch.equal(got, mixed)  # peft's mixed batch rounds the updates first
    assert (got.float() - mixed.float()).abs().max() < 0.01
