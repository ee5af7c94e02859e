"""Mixed-adapter batches where a layer's first dimension is not the call's rows by coincidence of sizes.

Every row of a mixed batch must equal that row run alone with its adapter active, or the call is refused in one line.
Each case checks that the adapters change their rows, so the equalities can fail.
"""

from __future__ import annotations

import pytest
import torch
from test_mixed_batch import run_alone  # (its helper: each row alone with its adapter)
from tiny import tiny_inputs, tiny_model
from tolerances import ATOL

import deltatune as dt
from deltatune.layer import DeltaLayer

ATOL32 = ATOL[torch.float32]


def _lora(**fields) -> dt.LoraConfig:
    return dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **fields)


def _two(model: torch.nn.Module, a: dict, b: dict | None = None) -> dt.DeltaModel:
    torch.manual_seed(1)
    delta = dt.get_delta_model(model, _lora(**a), "a")
    torch.manual_seed(2)
    delta.add_adapter("b", _lora(**(a if b is None else b)))
    return delta.eval()


def _llava_rows(images: list[int], seed: int = 1) -> dict:
    """LLaVA inputs whose row i holds ``images[i]`` images (16 image tokens each), all rows of one length."""
    import matrix  # noqa: F401  (puts tests/vision on the path)
    from tiny_vlm import IMAGE_TOKEN

    g = torch.Generator().manual_seed(seed)
    length = 1 + 16 * max(images) + 5
    ids = torch.randint(3, IMAGE_TOKEN, (len(images), length), generator=g)
    ids[:, 0] = 1
    for i, k in enumerate(images):
        ids[i, 1 : 1 + 16 * k] = IMAGE_TOKEN
    pixels = torch.randn(sum(images), 3, 16, 16, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def test_llava_images_route_to_their_rows_or_the_call_is_refused():
    """Row 0 with two images and row 1 with none: pixel_values' 2 images were taken for the 2 rows, so row 0's
    second image went through row 1's vision-tower LoRA (0.103 off). Rows holding different numbers of images are
    now refused in one line; k images in every row route exactly."""
    from matrix import tiny_vlm

    model = _two(tiny_vlm("llava"), {"target_modules": ["q_proj", "v_proj"]})  # both towers
    assert any("vision_tower" in n for n, m in model.named_modules() if isinstance(m, DeltaLayer))
    for images, held in (([2, 0], r"\[2, 0\] images"), ([2, 1], r"\[2, 1\] images")):
        inputs = _llava_rows(images)
        n = sum(images)
        with pytest.raises(ValueError, match=rf"routes 2 rows but pixel_values holds {n} images .*{held}"):
            model(**inputs, adapter_names=["a", "b"])
        assert all(m.row_adapters is None for m in model.modules() if isinstance(m, DeltaLayer))
        with torch.no_grad():  # one adapter for every row: nothing to tell apart
            same = model(**inputs, adapter_names=["b", "b"]).logits
            alone = run_alone(model, "b", lambda inputs=inputs: model(**inputs).logits)
            torch.testing.assert_close(same, alone, atol=ATOL32, rtol=0)

    inputs, names = _llava_rows([2, 2, 2]), ["a", "b", "__base__"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items() if k != "pixel_values"}
            row["pixel_values"] = inputs["pixel_values"][2 * i : 2 * i + 2]
            alone = run_alone(model, name, lambda row=row: model(**row).logits)
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL32, rtol=0, msg=f"row {i} ({name})")
            if name != "__base__":
                other = run_alone(model, "b" if name == "a" else "a", lambda row=row: model(**row).logits)
                assert (alone - other).abs().max() > 1e-3, f"adapter {name} must change row {i}"


def test_t5_relative_attention_bias_is_refused_whatever_the_lengths():
    """With the query length equal to the batch size (4), a LoRA on T5's relative_attention_bias, one table for every
    row, was routed by query position (2.065 off); other lengths were refused. Now every length is refused, naming
    the module; one adapter for every row still computes as it does alone."""
    model = _two(tiny_model("t5"), {"target_modules": ["q", "v", "relative_attention_bias"]})
    inputs = tiny_inputs("t5", batch=4, seq=4)
    inputs["decoder_input_ids"] = inputs["decoder_input_ids"][:, :4]
    for names in (["a", "b", "a", "b"], ["a", "__base__", "a", "a"]):
        with pytest.raises(ValueError, match=r"adapter 'a' adapts encoder\.block\.0\..*relative_attention_bias"):
            model(**inputs, adapter_names=names)
    with torch.no_grad():
        alone = run_alone(model, "b", lambda: model(**inputs).logits)
        base = run_alone(model, "__base__", lambda: model(**inputs).logits)
        assert (alone - base).abs().max() > 1e-3
        torch.testing.assert_close(model(**inputs, adapter_names=["b"] * 4).logits, alone, atol=ATOL32, rtol=0)


def test_modules_to_save_block_gets_its_rows_of_every_argument():
    """modules_to_save=["layers.1"] (a decoder block, called with the batch's attention mask and positions): a mixed
    batch cut only the hidden states to each adapter's rows and crashed inside transformers. Now every batch-shaped
    argument is cut too, each row computing as it does alone; the key-value cache, which every row shares and the
    block writes into, is refused in one line."""
    model = _two(
        tiny_model("llama"),
        {"target_modules": ["q_proj"], "modules_to_save": ["layers.1"]},
        {"target_modules": ["q_proj"]},
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save.a." in name:
                p.add_(0.5 * torch.randn_like(p))
    inputs = tiny_inputs("llama", batch=3)
    inputs["attention_mask"][2, :3] = 0  # left padding in row 2
    names = ["a", "b", "__base__"]
    with pytest.raises(ValueError, match=r"cannot split argument 'cache' of LlamaDecoderLayer .*use_cache=False"):
        model(**inputs, adapter_names=names, use_cache=True)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names, use_cache=False).logits
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            alone = run_alone(model, name, lambda row=row: model(**row, use_cache=False).logits)
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL32, rtol=0, msg=f"row {i} ({name})")
        with model.disable_adapter():
            base = model(**{k: v[:1] for k, v in inputs.items()}, use_cache=False).logits
        assert (mixed[:1] - base).abs().max() > 1e-3, "adapter a (its block copy and LoRA) must change row 0"


def test_one_image_per_row_routes_where_the_config_names_no_image_token():
    """BLIP (no image token to count) with one image per row: the image check above refused every such mixed call."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=32)  # fmt: skip
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    blip = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    model = _two(blip, {"target_modules": ["query", "value"]})
    g = torch.Generator().manual_seed(3)
    inputs = {
        "pixel_values": torch.randn(2, 3, 16, 16, generator=g),
        "input_ids": torch.randint(3, 100, (2, 5), generator=g),
    }
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["a", "b"]).logits
        for i, name in enumerate(["a", "b"]):
            alone = run_alone(model, name, lambda i=i: model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits)
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL32, rtol=0)
        assert not torch.allclose(
            mixed[0], run_alone(model, "b", lambda: model(**{k: v[:1] for k, v in inputs.items()}).logits)[0]
        )
