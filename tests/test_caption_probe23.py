"""Probe 23 of the caption stage's decoder-only path against transformers 5.25: the model's config names the image
token it looks for (``image_token_id`` / ``image_token_index``), the processor the one it writes; where they differ
the model finds no image tokens in the processor's text and transformers fails at the first step."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))
from tiny_vlm import save_vlm  # noqa: E402

from deltatune.config import ConfigError  # noqa: E402
from deltatune.train import caption as C  # noqa: E402
from deltatune.train.config import build  # noqa: E402
from deltatune.train.models import load_processor  # noqa: E402


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava23")
    save_vlm(out / "llava", "llava")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(out / "a.png")
    (out / "c.jsonl").write_text(json.dumps({"image": "a.png", "text": "a handwritten five"}) + "\n")
    return out


def test_a_config_image_token_the_processor_never_writes_is_one_line_at_load(llava, tmp_path):
    """LLaVA reads its image features into the positions of ``config.image_token_id`` (image_token_index); a config
    naming another id than the processor's image token got as far as the first training step, where transformers
    said "Image features and image tokens do not match, tokens: 0, features: 16"; now the load names both."""
    import shutil

    from transformers import AutoModelForImageTextToText

    folder = tmp_path / "llava"
    shutil.copytree(llava / "llava", folder)
    config = json.loads((folder / "config.json").read_text())
    image = config["image_token_index"]
    config["image_token_index"] = 3  # <unk>
    (folder / "config.json").write_text(json.dumps(config))
    # the reference: the processor's batch on that model is transformers' error, deep in the first step
    good = load_processor(str(llava / "llava"), "caption")
    cfg = build(
        {"stage": "caption", "model": {"name_or_path": str(folder)}, "data": {"train": str(llava / "c.jsonl")}}
    )
    prepared = C.prepare_caption(cfg, good)
    batch = prepared.collator([prepared.train[0]])
    assert batch["input_ids"].eq(image).sum() == 16
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**batch)
    with pytest.raises(ConfigError) as err:
        load_processor(str(folder), "caption")
    assert str(err.value) == (
        f"stage caption: model {str(folder)!r}: its config's image_token_id is 3, but its processor writes "
        f"'<image>' (id {image}) for an image; the model would find no image tokens in the text (give the model "
        "its own processor, or correct config.json's image_token_id / image_token_index)"
    )
    # the model's own id loads, and its batch is the model's input
    model = AutoModelForImageTextToText.from_pretrained(str(llava / "llava"))
    assert model(**batch).loss.isfinite()


def _tiny_internvl():
    from transformers import AutoModelForImageTextToText, InternVLConfig

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=[16, 16],
                  patch_size=[4, 4])  # fmt: skip
    text = dict(model_type="qwen2", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=64)  # fmt: skip
    return AutoModelForImageTextToText.from_config(
        InternVLConfig(vision_config=vision, text_config=text, image_token_id=5)
    )


def test_internvl_has_llavas_towers_as_llamafactory_freezes_its_vision_tower():
    """InternVL (LLaVA's layout: vision_tower, multi_modal_projector, language_model) had no towers: target_modules
    [q_proj, v_proj] silently adapted its vision tower's q_proj / v_proj too, where LLaMA-Factory (freeze_vision_tower,
    its default) keeps them to the language model; the default LoRA targets were "no default target_modules for model
    type 'internvl'". Now as on LLaVA: the language model's by default, a list reaching the vision tower refused."""
    import deltatune as dt
    from deltatune import towers as T

    model = _tiny_internvl()
    language = [
        n for n, _ in model.named_modules() if n.startswith("model.language_model.") and n[-6:] in ("q_proj", "v_proj")
    ]
    assert language == [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.0.self_attn.v_proj",
    ]
    assert T.restrict(model, dt.LoraConfig(r=2, lora_alpha=4)).target_modules == language
    with pytest.raises(ConfigError, match=r"^method.target_modules=\['q_proj', 'v_proj'\] reaches the vision tower"):
        T.restrict(model, dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    both = T.restrict(
        model, dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), ["language", "vision"]
    )
    assert both.target_modules == [n for n, _ in model.named_modules() if n[-6:] in ("q_proj", "v_proj")]
    assert {T.tower_of(model, n) for n, _ in model.named_modules() if "multi_modal_projector." in n} == {"projector"}


def test_glm4v_all_linear_keeps_to_the_language_model_as_llamafactorys_lora_target_all():
    """GLM-4V (Qwen-VL's layout: visual, visual.merger, language_model) had no towers: target_modules all-linear
    adapted every linear layer of its vision tower and merger too (9 of 15 here), where LLaMA-Factory's
    ``lora_target: all`` leaves its frozen vision tower and projector (visual.merger) out."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    import deltatune as dt
    from deltatune import towers as T

    vision = dict(depth=1, hidden_size=32, num_heads=4, intermediate_size=37, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                vocab_size=64)  # fmt: skip
    model = AutoModelForImageTextToText.from_config(
        AutoConfig.for_model("glm4v", vision_config=vision, text_config=text)
    )
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    language = [n for n in linear if n.startswith("model.language_model.")]
    assert (len(language), len(linear)) == (6, 15)
    config = T.restrict(model, dt.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    assert config.target_modules == language
    assert T.tower_of(model, "model.visual.merger.proj") == "projector"
    assert T.tower_of(model, "model.visual.blocks.0.attn.qkv") == "vision"


def test_blip2s_query_tokens_are_image_tokens_to_data_max_length(tmp_path):
    """BLIP-2's processor has no ``image_token_id`` (transformers' ``image_token_ids`` is [None]): its 4 query tokens
    counted as text tokens toward data.max_length, so a row of 11 text tokens was cut to 7 at max_length 11 (and
    refused under data.truncation=refuse), and the config check read no image token at all."""
    from deltatune.data.load import DataError

    save_vlm(tmp_path / "blip2", "blip-2")
    Image.fromarray(np.zeros((8, 10, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "text": "a handwritten five thin strokes"}) + "\n")
    proc = load_processor(str(tmp_path / "blip2"), "caption")
    image = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert proc.image_ids == {image}
    cfg = build({"stage": "caption", "model": {"name_or_path": str(tmp_path / "blip2")},
                 "data": {"train": str(tmp_path / "c.jsonl")}})  # fmt: skip
    (row,) = C.vlm_examples(str(tmp_path / "c.jsonl"), cfg)
    ids, labels, cut, _ = C.encode_vlm(proc, row, max_length=64)
    assert ids[:4] == [image] * 4 and len(ids) == 4 + 11 and not cut
    assert C.encode_vlm(proc, row, max_length=11)[:3] == (ids, labels, False)
    assert C.encode_vlm(proc, row, max_length=11, truncation="refuse")[:2] == (ids, labels)
    short, short_labels, cut, _ = C.encode_vlm(proc, row, max_length=10)
    assert cut and (short, short_labels) == (ids[:14], labels[:14])
    with pytest.raises(DataError) as err:
        C.encode_vlm(proc, row, max_length=10, truncation="refuse")
    assert (
        str(err.value)
        == f"{tmp_path / 'c.jsonl'}:1: 11 text tokens, more than data.max_length=10 (data.truncation=refuse)"
    )


def test_llama4s_default_lora_targets_keep_to_its_language_model():
    """Llama 4's default LoRA targets (q_proj, v_proj) matched its vision model's attention too: it had no towers. Now
    its language model's alone (method.towers' default, LLaMA-Factory's frozen vision tower), as on Llama 3.2 Vision."""
    from transformers import AutoModelForImageTextToText, Llama4Config

    import deltatune as dt
    from deltatune import towers as T

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16,
                  patch_size=4, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)  # fmt: skip
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                intermediate_size_mlp=48, num_local_experts=2, vocab_size=64, head_dim=8)  # fmt: skip
    model = AutoModelForImageTextToText.from_config(Llama4Config(vision_config=vision, text_config=text))
    qv = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert qv == [
        "vision_model.model.layers.0.self_attn.q_proj",
        "vision_model.model.layers.0.self_attn.v_proj",
        "language_model.model.layers.0.self_attn.q_proj",
        "language_model.model.layers.0.self_attn.v_proj",
    ]
    assert T.restrict(model, dt.LoraConfig(r=2, lora_alpha=4)).target_modules == qv[2:]
    assert T.tower_of(model, "vision_model.vision_adapter.mlp.fc1") == "vision"
    assert T.tower_of(model, "language_model.lm_head") == "language"
