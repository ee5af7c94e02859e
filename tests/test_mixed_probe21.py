"""Probe 21 of mixed-adapter batches (``adapter_names=``): each test failed before its fix."""

from __future__ import annotations

import torch
from test_mixed_probe18 import _pair as _pair18
from tiny import tiny_inputs
from transformers import GenerationConfig

CONFIGS = [
    ("x", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("y", dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj"], use_rslora=True)),
]
NAMES = ["x", "__base__", "y"]
CONFIGS_AB = [("x", 3), ("y", 5)]  # one rank, scales 0.75 and 1.25 (not powers of two)


def _pair(configs=CONFIGS):
    """The same LoRAs (B drawn non-zero) in peft and in deltatune on a tiny llama, eval mode (probe 18's)."""
    return _pair18(configs)


def test_generate_with_a_positional_generation_config_expands_the_rows():
    """``generate(input_ids, GenerationConfig(num_beams=2), adapter_names=...)`` (transformers' second parameter) was
    refused: the beams' expanded batch (6 rows) was not among the call's sizes, as only a keyword generation_config
    was read ("a layer computes on 6 that are not the call's rows"). Now it generates what the keyword form and peft
    (given num_beams=2) do, with sampling's returned sequences too."""
    reference, ours = _pair()
    inputs = tiny_inputs("llama", batch=3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    beams = GenerationConfig(num_beams=2, max_new_tokens=4, pad_token_id=0)
    with torch.no_grad():
        got = ours.generate(ids, beams, attention_mask=mask, adapter_names=NAMES)
        keyword = ours.generate(ids, generation_config=beams, attention_mask=mask, adapter_names=NAMES)
        expected = reference.generate(**inputs, adapter_names=NAMES, num_beams=2, max_new_tokens=4, pad_token_id=0)
        assert torch.equal(got, keyword) and torch.equal(got, expected)
        sample = GenerationConfig(do_sample=True, num_return_sequences=2, max_new_tokens=4, pad_token_id=0)
        torch.manual_seed(3)
        got = ours.generate(ids, sample, attention_mask=mask, adapter_names=NAMES)
        torch.manual_seed(3)
        keyword = ours.generate(ids, generation_config=sample, attention_mask=mask, adapter_names=NAMES)
        assert got.shape[0] == 6 and torch.equal(got, keyword)


def test_beams_the_model_s_generation_config_sets_under_a_call_s_config_expand_the_rows():
    """transformers 5 resolves each generation setting from the keyword, else the call's generation config where it
    sets one (``GenerationConfig()`` leaves num_beams None), else the model's: with ``model.generation_config
    .num_beams = 2`` and ``generation_config=GenerationConfig(max_new_tokens=4)`` generate runs 2 beams, but only the
    call's config was read (its None taken as 1) and the beams' 6 rows were refused. Now the rows are peft's with
    num_beams=2."""
    reference, ours = _pair()
    inputs = tiny_inputs("llama", batch=3)
    ours.generation_config.num_beams = 2
    call = GenerationConfig(max_new_tokens=4, pad_token_id=0)
    with torch.no_grad():
        got = ours.generate(**inputs, generation_config=call, adapter_names=NAMES)
        expected = reference.generate(**inputs, adapter_names=NAMES, num_beams=2, max_new_tokens=4, pad_token_id=0)
        assert torch.equal(got, expected)
        assert torch.equal(ours.generate(inputs["input_ids"], call, attention_mask=inputs["attention_mask"],
                                         adapter_names=NAMES), expected)  # fmt: skip


def test_gathered_rows_under_autocast_round_as_the_loop_and_peft(monkeypatch):
    """A bf16 base with fp32 LoRAs of one rank (mixed-precision training's layout, and a 4-bit base's) under bf16
    autocast: the gathered path (methods/_lora_gather.py) kept s * B A x in fp32 where the row loop and peft's mixed
    batch scale autocast's bf16 product in bf16, 0.0024 off their logits for scales that are not powers of two. Now
    the rows are peft's to the bit."""
    import deltatune.methods.lora as lora_module

    configs = [(name, dict(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])) for name, alpha in CONFIGS_AB]
    reference, ours = _pair(configs)
    reference.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    for model in (reference, ours):
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    calls = []
    gathered = lora_module.gathered
    monkeypatch.setattr(lora_module, "gathered", lambda *a: calls.append(1) or gathered(*a))
    inputs = tiny_inputs("llama", batch=4)
    names = ["x", "y", "__base__", "x"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(**inputs, adapter_names=names).logits
        expected = reference(**inputs, adapter_names=names).logits
    assert calls  # the gathered path ran
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_llava_ids_and_images_given_by_position_route_as_keyword_ones():
    """``model(input_ids, pixel_values=...)`` and ``generate(input_ids, pixel_values=...)`` with 2 images a row: the
    batch was read from pixel_values' 6 images before the positional ids' 3 rows ("3 names but the batch has 6
    rows"); and ``model(input_ids, pixel_values, attention_mask)`` with [2, 0] images was not refused (positional
    images were not counted by row), row 0's second image going through row 1's vision-tower LoRA. Now the positional
    calls give the keyword call's logits and tokens, and the uneven images are refused in one line."""
    import pytest
    from matrix import tiny_vlm
    from test_mixed_batch_more import _llava_rows, _two

    from deltatune.layer import DeltaLayer

    model = _two(tiny_vlm("llava"), {"target_modules": ["q_proj", "v_proj"]})
    inputs, names = _llava_rows([2, 2, 2]), ["a", "b", "__base__"]
    ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    with torch.no_grad():
        expected = model(**inputs, adapter_names=names).logits
        assert torch.equal(model(ids, pixel_values=pixels, attention_mask=mask, adapter_names=names).logits, expected)
        assert torch.equal(model(ids, pixels, mask, adapter_names=names).logits, expected)
        tokens = model.generate(**inputs, adapter_names=names, max_new_tokens=3, pad_token_id=0)
        got = model.generate(ids, pixel_values=pixels, attention_mask=mask, adapter_names=names, max_new_tokens=3,
                             pad_token_id=0)  # fmt: skip
        assert torch.equal(got, tokens)
        uneven = _llava_rows([2, 0])
        with pytest.raises(ValueError, match=r"pixel_values holds 2 images .*\[2, 0\] images"):
            model(uneven["input_ids"], uneven["pixel_values"], uneven["attention_mask"], adapter_names=["a", "b"])
    assert all(m.row_adapters is None for m in model.modules() if isinstance(m, DeltaLayer))
