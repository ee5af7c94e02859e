"""Probe 4 of the vision room: faults found and fixed, each checked against transformers or worked by hand."""

from __future__ import annotations

import functools

import pytest
import torch

import deltatune as dt
from deltatune import towers as T
from deltatune.config import ConfigError

_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
_TEXT |= {"intermediate_size": 48, "vocab_size": 128}
_SIGLIP = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
_SIGLIP |= {"image_size": 32, "patch_size": 8}
_QWEN_VISION = {"depth": 2, "hidden_size": 32, "out_hidden_size": 32, "num_heads": 4, "intermediate_size": 48}
_QWEN_VISION |= {"patch_size": 4, "spatial_merge_size": 2, "fullatt_block_indexes": [1]}
_MROPE = {"type": "mrope", "mrope_section": [1, 1, 2]}
VLMS = {  # model type: (its config's sub-configs, the module paths of its language and vision towers)
    "smolvlm": (
        {"text_config": {"model_type": "llama", **_TEXT}, "vision_config": _SIGLIP},
        "model.text_model",
        "model.vision_model",
    ),
    "gemma3": (
        {"text_config": {"model_type": "gemma3_text", "head_dim": 8, **_TEXT}, "vision_config": _SIGLIP},
        "model.language_model",
        "model.vision_tower",
    ),
    "paligemma": (
        {"text_config": {"model_type": "gemma", "head_dim": 8, **_TEXT}, "vision_config": _SIGLIP},
        "model.language_model",
        "model.vision_tower",
    ),
    "qwen2_5_vl": (
        {"text_config": {"rope_scaling": _MROPE, **_TEXT}, "vision_config": _QWEN_VISION},
        "model.language_model",
        "model.visual",
    ),
}


def _vlm(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type, **VLMS[model_type][0]))


@pytest.mark.parametrize("model_type", list(VLMS))
def test_vlms_whose_towers_share_leaf_names_keep_adapters_in_the_named_tower(model_type):
    """SmolVLM's, Gemma 3's and PaliGemma's SigLIP vision towers have q_proj / v_proj as their language models do
    (Qwen2.5-VL's vision blocks gate / up / down_proj): leaf names reaching the vision tower are refused, as on LLaVA,
    instead of adapting both towers; the default targets are the named tower's family's."""
    model = _vlm(model_type)
    language, vision = VLMS[model_type][1:]
    leaves = ["q_proj", "v_proj", "down_proj"]
    reached = [n for n, _ in model.named_modules() if n.startswith(vision + ".") and n.split(".")[-1] in leaves]
    assert reached  # the leaf names do match modules in the vision tower
    with pytest.raises(ConfigError, match=r"reaches the vision tower\(s\), which method.towers=\['language'\]"):
        T.restrict(model, dt.LoraConfig(target_modules=leaves))
    # the default: the language model's q_proj, v_proj in 2 layers, nothing in the vision tower
    config = T.restrict(model, dt.LoraConfig(r=2))
    assert len(config.target_modules) == 4 and all(n.startswith(language + ".") for n in config.target_modules)
    assert T.counts(dt.get_delta_model(model, config)) == {"language": 4}
    # naming both towers is the explicit way to adapt both (before: "has one tower; leave method.towers unset")
    both = T.restrict(_vlm(model_type), dt.LoraConfig(r=2, target_modules=leaves), ["language", "vision"])
    assert {T.tower_of(model, n) for n in both.target_modules} == {"language", "vision"}


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_vpt_backbone_tuple_outputs_drop_the_prompts_as_its_dict_outputs_do(deep):
    """``return_dict=False`` (a tuple) gets the prompt positions dropped as the ModelOutput does: before, the ViT
    backbone's tuple held 17 + 3 tokens, the prompts' outputs mixed in with the patches'."""
    from tiny import tiny_inputs, tiny_model

    pixels = tiny_inputs("vit")["pixel_values"]
    model = dt.get_delta_model(tiny_model("vit"), dt.VisualPromptConfig(num_virtual_tokens=3, deep=deep)).eval()
    vit = model.base_model.vit
    with torch.no_grad():
        as_dict = vit(pixels, output_hidden_states=True)
        as_tuple = vit(pixels, output_hidden_states=True, return_dict=False)
    assert as_dict.last_hidden_state.shape == (2, 17, 32)
    torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state, atol=0, rtol=0)
    states = next(t for t in as_tuple[1:] if isinstance(t, tuple))
    assert len(states) == len(as_dict.hidden_states) == 3
    for mine, theirs in zip(states, as_dict.hidden_states):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def _torchvision_get_params(width: int, height: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's ``RandomResizedCrop.get_params`` (torchvision 0.2x), copied: (top, left, height, width)."""
    import math

    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("size", [(40, 30), (17, 64), (30, 10), (10, 30), (9, 8)])
def test_random_resized_crop_is_torchvisions_under_the_same_seed(size):
    """The same draws as torchvision's RandomResizedCrop (row before column), and its fallback: a 30x10 image, which
    no draw fits, gets the 13x10 centre crop (aspect clamped to 4/3), not a 10x10 square."""
    import numpy as np
    from PIL import Image

    from deltatune.data.images import random_resized_crop

    pixels = np.arange(size[0] * size[1], dtype=np.int32).reshape(size[1], size[0])  # each pixel its own value
    img = Image.fromarray(pixels, mode="I")
    for seed in range(40):
        torch.manual_seed(seed)
        top, left, h, w = _torchvision_get_params(*size)
        torch.manual_seed(seed)
        crop = np.asarray(random_resized_crop(img))
        assert np.array_equal(crop, pixels[top : top + h, left : left + w]), (seed, size)


def test_llava_next_rows_with_different_patch_counts_batch_as_its_processor_batches_them(tmp_path):
    """LLaVA-NeXT's any-resolution images give a 16x32 image 3 patches and a 32x32 one 5: the batch pads the patches
    with zeros, as the processor's own batched call does, and the model reads the same logits (before: torch.cat's
    "Sizes of tensors must match" in the collator)."""
    import numpy as np
    from PIL import Image
    from tiny_vlm import _CLIP, _LLAMA, LLAVA_TEMPLATE, word_tokenizer
    from transformers import (
        AutoModelForImageTextToText,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from deltatune.data.images import ImageRow
    from deltatune.train.caption import (
        CAPTION_PROMPT,
        VLMDataset,
        VLMExample,
        collate_vlm,
        encode_vlm,
        load_vlm_processor,
    )

    tok, grid = word_tokenizer(), [[16, 32], [32, 16], [32, 32]]
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=grid
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    specials = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_CLIP),
        text_config=LlamaConfig(**_LLAMA, vocab_size=len(tok), **specials),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=grid,
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    processor.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)  # the processor loader reads the model type
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in [(16, 32, 3), (32, 32, 3)]]
    captions = ["a handwritten seven", "a thin one"]
    examples = []
    for i, (picture, text) in enumerate(zip(pictures, captions)):
        picture.save(tmp_path / f"{i}.png")
        user = {"role": "user", "content": f"<image>\n{CAPTION_PROMPT}"}
        turns = [user, {"role": "assistant", "content": text}]
        examples.append(VLMExample(f"rows:{i + 1}", [ImageRow(str(tmp_path / f"{i}.png"), None, "x")], turns))
    vlm = load_vlm_processor(str(tmp_path))
    encoded = [encode_vlm(vlm, e, 512)[:2] for e in examples]
    dataset = VLMDataset(examples, encoded, vlm)
    assert [dataset[i]["pixel_values"].shape[1] for i in range(2)] == [3, 5]
    batch = collate_vlm([dataset[0], dataset[1]], vlm.pad_token_id)
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]},
              {"role": "assistant", "content": [{"type": "text", "text": t}]}] for t in captions]  # fmt: skip
    texts = [processor.apply_chat_template(c) for c in chats]
    theirs = processor(text=texts, images=pictures, padding=True, return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], theirs["pixel_values"], atol=0, rtol=0)
    with torch.no_grad():
        mine = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        reference = model(**theirs).logits
    for i in range(2):  # the processor's text has no EOS after the answer: its rows are one token shorter
        n = int(theirs["attention_mask"][i].sum())
        assert int(batch["attention_mask"][i].sum()) == n + 1
        torch.testing.assert_close(mine[i, :n], reference[i, :n], atol=1e-5, rtol=0)


def test_a_bert_decoders_layers_are_the_language_tower_of_a_vision_encoder_decoder():
    """ViT + BERT (transformers' VisionEncoderDecoder example): BERT's blocks sit at ``decoder.bert.encoder.layer.N``,
    which the vision tower's ``encoder`` pattern matched too, so the default LoRA found no module in the language
    tower and ``[query, value]`` was refused as reaching the vision tower. The outermost match decides."""
    from transformers import BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16)
    bert = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    bert.is_decoder = bert.add_cross_attention = True
    model = VisionEncoderDecoderModel(config=VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, bert))
    layer = "decoder.bert.encoder.layer.0"
    expected = [f"{layer}.{part}.self.{p}" for part in ("attention", "crossattention") for p in ("query", "value")]
    assert T.tower_of(model, f"{layer}.attention.self.query") == "language"
    assert T.tower_of(model, "encoder.layers.0.attention.q_proj") == "vision"
    assert sorted(T.restrict(model, dt.LoraConfig(r=2)).target_modules) == sorted(expected)
    assert sorted(T.restrict(model, dt.LoraConfig(target_modules=["query", "value"])).target_modules) == sorted(
        expected
    )
    vision = T.restrict(model, dt.LoraConfig(r=2), ["vision"]).target_modules
    assert sorted(vision) == ["encoder.layers.0.attention.q_proj", "encoder.layers.0.attention.v_proj"]
    delta = dt.get_delta_model(model, T.restrict(model, dt.LoraConfig(r=2), ["language", "vision"]))
    assert T.counts(delta) == {"language": 4, "vision": 2}


def test_a_bfloat16_cnn_evaluates_on_pixels_cast_as_transformers_pipelines_cast_them(tmp_path):
    """``model.dtype: bfloat16`` on a ResNet (as on ConvNeXt, Swin, BEiT, whose stems do not cast their input): the
    float32 pixel values went into the bfloat16 convolution and the run died with a torch traceback ("Input type
    (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same"). The stage's trainer casts them to
    the model's dtype, as transformers' ImageClassificationPipeline does: its eval loss and predictions are the
    model's own on the cast pixels."""
    import numpy as np
    from PIL import Image
    from test_cnn import resnet
    from transformers import TrainingArguments, ViTImageProcessorPil

    from deltatune.data.images import ImageDataset, ImageRow, collate
    from deltatune.train.image_cls import ConfusionTrainer

    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(ImageRow(str(tmp_path / f"{i}.png"), i % 3, f"{i}.png"))
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    model = resnet().to(torch.bfloat16)
    model = dt.get_delta_model(model, dt.LoraConfig(r=2, target_modules=["convolution"], init_lora_weights=False))
    model.eval()
    labels = [r.label for r in rows]
    found: dict = {}

    def metrics(p) -> dict:
        found["preds"] = np.asarray(p.predictions).argmax(-1).tolist()
        return {}

    args = TrainingArguments(str(tmp_path / "out"), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                             remove_unused_columns=False, label_names=["labels"])  # fmt: skip
    trainer = ConfusionTrainer(model=model, args=args, data_collator=collate, compute_metrics=metrics, confusion={})
    got = trainer.evaluate(ImageDataset(rows, labels, processor))
    pixels = processor(images=[Image.open(r.path) for r in rows], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = torch.cat([model(pixel_values=pixels[i : i + 4].to(torch.bfloat16)).logits for i in (0, 4)])
    expected = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(labels))
    assert got["eval_loss"] == pytest.approx(expected.item(), abs=1e-4)
    assert found["preds"] == logits.float().argmax(-1).tolist()


def test_a_bfloat16_swin_captioner_evaluates_on_pixels_in_its_dtype(tmp_path):
    """A Donut-style captioner (Swin encoder, GPT-2 decoder) loaded in bfloat16: Swin's patch embedding does not cast
    its input, so the caption stage's float32 pixel values stopped its training and eval with a torch traceback. The
    stage's trainer casts them; the eval loss is the cross-entropy of the model's own logits on the cast pixels."""
    import numpy as np
    from PIL import Image
    from tiny_vlm import word_tokenizer
    from transformers import (
        GPT2Config,
        SwinConfig,
        TrainingArguments,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTImageProcessorPil,
    )

    from deltatune.data.images import ImageRow
    from deltatune.train import caption as C

    tok = word_tokenizer()
    swin = SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=16, patch_size=4, window_size=2)
    gpt2 = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=32, add_cross_attention=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(swin, gpt2)
    config.decoder_start_token_id, config.pad_token_id = tok.bos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config=config).to(torch.bfloat16)
    model = dt.get_delta_model(model, dt.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)).eval()
    processor = C.CaptionProcessor(ViTImageProcessorPil(size={"height": 16, "width": 16}), tok)
    rng, rows = np.random.default_rng(0), []
    for i, text in enumerate(["a handwritten seven", "a thin one", "yes"]):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(ImageRow(str(tmp_path / f"{i}.png"), None, f"c.jsonl:{i + 1}", text))
    ids, _ = C.encode_captions(rows, tok, 16)
    args = TrainingArguments(str(tmp_path / "out"), per_device_eval_batch_size=3, report_to=[], use_cpu=True,
                             remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True)  # fmt: skip
    collator = functools.partial(C.collate, pad_token_id=tok.pad_token_id)
    trainer = C._trainer(processor)(model=model, args=args, data_collator=collator)
    got = trainer.evaluate(C.CaptionDataset(rows, ids, processor))["eval_loss"]
    batch = collator([C.CaptionDataset(rows, ids, processor)[i] for i in range(3)])
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"].to(torch.bfloat16), labels=batch["labels"]).logits
    expected = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
    assert got == pytest.approx(expected.item(), abs=1e-4)
