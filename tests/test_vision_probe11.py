"""Vision probe 11.

Llama 3.2 Vision (mllama) reads the images through cross-attention layers, each text token attending to the tiles of
the image before it, as the ``cross_attention_mask`` of its processor's call with text says. The caption stage took
each row's image tensors from an images-only call, which has no such mask: the model then let every token (the BOS
and the user header before the image too) attend to every image, and the loss was not the processor's batch's. Nor
had the model type towers: LoRA had no default targets on it, and ``[q_proj, v_proj]`` reached its vision tower too.

The rest holds what was probed and found equal: Qwen2.5-VL's batch (``image_grid_thw``, the M-RoPE's
``mm_token_type_ids``), LoRA against peft and captions against ``generate``; ConvNeXt and Swin classifiers with LoRA
and the classifier in ``modules_to_save`` against peft, their pixels the image processor's own.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))
from test_vision_probe7 import CAPTIONS, _rows  # noqa: E402  (the caption rows of probe 7's families)
from tiny_vlm import _LLAMA, word_tokenizer  # noqa: E402
from tolerances import ATOL  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune import towers as T  # noqa: E402
from deltatune.data.images import ImageDataset, ImageRow  # noqa: E402
from deltatune.data.images import collate as collate_images  # noqa: E402
from deltatune.train import caption as C  # noqa: E402
from deltatune.train.image_cls import heads  # noqa: E402

MLLAMA = ["<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3.2 Vision Instruct's chat template, shortened to what a caption row uses (no system turn, no dates)
MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image|>{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ c['text'] }}<|eot_id|>{% endgeneration %}{% else %}{{ c['text'] }}<|eot_id|>{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(specials: list[str]):
    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def mllama(gates: float = 1.0):
    """A tiny Llama 3.2 Vision (16 px tiles, up to 2 per image; cross-attention in layer 1) and its processor. Its
    cross-attention gates start at 0 (the images read nothing): set to ``gates`` so that they count."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor

    tok = _tokenizer(MLLAMA)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4, intermediate_size=37,
                  image_size=16, patch_size=4, max_num_tiles=2, intermediate_layers_indices=[0], vision_output_dim=64,
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])  # fmt: skip
    text = dict(**_LLAMA, vocab_size=len(tok), cross_attention_layers=[1], pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"))  # fmt: skip
    config = MllamaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(MLLAMA[0])
    )
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(gates)
    images = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=2)
    return model, MllamaProcessor(images, tok, chat_template=MLLAMA_TEMPLATE)


def qwen2_5_vl():
    """A tiny Qwen2.5-VL (14 px patches merged 2x2) and its processor without the video processor (torchvision)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
    )

    class ImagesOnly(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    tok = _tokenizer(["<image>", *QWEN])
    tok.eos_token = "<|im_end|>"
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN}
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32,
                           fullatt_block_indexes=[0], window_size=56),
        text_config=dict(**_LLAMA, vocab_size=len(tok), rope_parameters=rope, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return model, ImagesOnly(Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 84), tok, None,
                             chat_template=QWEN_TEMPLATE)  # fmt: skip


AYA_TEMPLATE = (  # Aya Vision's turns, shortened: an image is <image>, which its processor expands into tiles
    "{{ bos_token }}{% for message in messages %}<|START_OF_TURN_TOKEN|>{{ message['role'] }}: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ c['text'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "\n{% endfor %}{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|>assistant: {% endif %}"
)


def aya_vision():
    """A tiny Aya Vision (SigLIP over 16 px tiles, up to 4 and a global view, 4 tokens each; a Cohere 2 language
    model): its image tokens vary with the image (here 27 for a 32 x 32 image, 17 for a 16 x 32 one)."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
    from transformers import GotOcr2ImageProcessorPil as Tiles

    specials = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"]
    tok = _tokenizer(["<image>", "<|START_OF_TURN_TOKEN|>", *specials])
    images = Tiles(size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1, max_patches=4)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=37, image_size=16, patch_size=4)  # fmt: skip
    text = dict(model_type="cohere2", **_LLAMA, head_dim=8, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    config = AyaVisionConfig(vision_config=vision, text_config=text, downsample_factor=2, vision_feature_layer=-1,
                             image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"))  # fmt: skip
    torch.manual_seed(0)
    model = AyaVisionForConditionalGeneration(config).eval()
    return model, AyaVisionProcessor(images, tok, patch_size=4, img_size=16, downsample_factor=2,
                                     chat_template=AYA_TEMPLATE)  # fmt: skip


FAMILIES = {
    "mllama": (mllama, [(16, 32), (16, 16)]),
    "qwen2_5_vl": (qwen2_5_vl, [(56, 56), (56, 84)]),
    "aya_vision": (aya_vision, [(32, 32), (16, 32)]),
}
ENDS = {"mllama": "<|eot_id|>", "qwen2_5_vl": "<|im_end|>", "aya_vision": "</s>"}


def _batch_and_reference(processor, examples):
    """The stage's collated batch, and the processor's own padded call on the same text and images."""
    vlm = C.VLMProcessor(processor)
    dataset = C.VLMDataset(examples, [C.encode_vlm(vlm, e, 512)[:2] for e in examples], vlm)
    batch = C.collate_vlm([dataset[0], dataset[1]], vlm.pad_token_id)
    (text, _, special), (other, _, _) = (C.render_vlm(vlm, e.messages) for e in examples)
    images = [[Image.open(e.images[0].path).convert("RGB")] for e in examples]
    reference = processor(text=[text, other], images=images, padding=True, padding_side="right",
                          add_special_tokens=special, return_tensors="pt")  # fmt: skip
    return vlm, batch, reference


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_batch_loss_and_logits_are_the_processors_own_through_the_model(family, tmp_path):
    """mllama: the batch's ``cross_attention_mask`` is the processor's (a 16 x 32 image is 2 tiles, a 16 x 16 one 1;
    the padding attends as the row's last token), and the logits are equal everywhere; without it (HEAD) the loss was
    3.93735 where the processor's batch gives 3.93680."""
    build, sizes = FAMILIES[family]
    model, processor = build()
    vlm, batch, reference = _batch_and_reference(processor, _rows(tmp_path, sizes))
    assert set(batch) == {"labels", *reference}
    for name in reference:
        assert torch.equal(batch[name], reference[name]), name
    tok = vlm.tokenizer
    end = ENDS[family]
    for row, caption in zip(batch["labels"], CAPTIONS):
        assert tok.convert_ids_to_tokens([t for t in row.tolist() if t != -100]) == [*caption.split(), end]
    with torch.no_grad():
        ours, theirs = model(**batch), model(**reference, labels=batch["labels"])
    assert torch.equal(ours.logits, theirs.logits)
    assert ours.loss.item() == theirs.loss.item()


def test_an_mllama_row_cut_short_keeps_its_mask_and_tokens_before_the_image_attend_to_none(tmp_path):
    model, processor = mllama()
    vlm, example = C.VLMProcessor(processor), _rows(tmp_path, [(16, 32)])[0]
    ids, labels, cut, _ = C.encode_vlm(vlm, example, 14)  # 14 text tokens and the image's
    assert cut and len(ids) == 15
    item = C.VLMDataset([example], [(ids, labels)], vlm)[0]
    mask = item["cross_attention_mask"]
    at = ids.index(processor.image_token_id)
    assert mask.shape == (1, 15, 1, 2) and mask[0, :at].sum() == 0 and mask[0, at:].eq(1).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_lora_goes_into_the_language_tower_equals_peft_and_captions_are_generate(family, tmp_path):
    """The default LoRA targets the language tower's q_proj / v_proj (mllama's cross-attention layers' among them; on
    HEAD: "no default target_modules for model type 'mllama'"); deltatune on its batch equals peft on the processor's,
    and ``caption`` is peft's ``generate`` on the processor's prompt."""
    peft = pytest.importorskip("peft")
    build, sizes = FAMILIES[family]
    examples = _rows(tmp_path, sizes)
    vlm, batch, reference = _batch_and_reference(build()[1], examples)
    base = build()[0]
    config = T.restrict(base, dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    assert len(config.target_modules) == 4 and all(
        n.startswith("model.language_model.") and n.endswith(("q_proj", "v_proj")) for n in config.target_modules
    )
    if family == "mllama":  # its vision tower has q_proj / v_proj too (Qwen2.5-VL's a fused qkv)
        with pytest.raises(dt.ConfigError, match="reaches the vision tower"):
            T.restrict(base, dt.LoraConfig(target_modules=["q_proj", "v_proj"]))
    ours = dt.get_delta_model(base, config).eval()
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(build()[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        a, b = ours(**batch), theirs(**reference, labels=batch["labels"])
        plain = build()[0](**reference)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL[torch.float32], rtol=0)
    assert (a.logits - plain.logits).abs().max() > 1e-3
    processor, tok = vlm.processor, vlm.tokenizer
    text, _, special = C.render_vlm(vlm, examples[0].messages[:1], add_generation_prompt=True)
    stops = [
        tok.eos_token_id,
        base.generation_config.eos_token_id,
    ]  # the tokenizer's and the model's, as captions stop
    for e in examples:
        enc = processor(text=[text], images=[Image.open(e.images[0].path).convert("RGB")],
                        add_special_tokens=special, return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            out = theirs.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=stops)
        expected = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert C.caption(ours, vlm, e.images[0].path, max_new_tokens=5) == expected != ""


def _classifier(kind: str):
    """A tiny 3-class ConvNeXt (its layer scale at 1, not 1e-6, so that an update shows) or Swin, and its processor
    (ConvNeXt's: resize to 32 / crop_pct then centre-crop; Swin's: ViT's, resized to 32); ImageNet's mean and std."""
    from transformers import (
        AutoModelForImageClassification,
        ConvNextConfig,
        ConvNextImageProcessorPil,
        SwinConfig,
        ViTImageProcessorPil,
    )

    if kind == "convnext":
        config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, num_labels=3,
                                layer_scale_init_value=1.0)  # fmt: skip
        processor = ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875)
    else:
        config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                            num_labels=3)  # fmt: skip
        processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    torch.manual_seed(0)
    return AutoModelForImageClassification.from_config(config).eval(), processor


@pytest.mark.parametrize("kind, targets", [("convnext", ["pwconv1", "pwconv2"]), ("swin", None)])
def test_lora_and_the_trained_head_on_a_cnn_and_swin_equal_peft_on_the_processors_pixels(kind, targets, tmp_path):
    """The stage's pixels (a grey and an RGBA image among them, converted as the processor converts) are the image
    processor's own batch; LoRA (Swin: the default q_proj / v_proj; ConvNeXt, which has no default: its pointwise
    layers) with the stage's head in ``modules_to_save`` gives peft's logits and loss on them."""
    peft = pytest.importorskip("peft")
    from transformers.image_transforms import convert_to_rgb

    rng = np.random.default_rng(0)
    shapes, modes = [(40, 48, 3), (40, 40), (48, 40, 4)], ["RGB", "L", "RGBA"]
    images = [Image.fromarray(rng.integers(0, 255, s, dtype=np.uint8), mode=m) for s, m in zip(shapes, modes)]
    rows = []
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
        rows.append(ImageRow(str(tmp_path / f"{i}.png"), i, f"d:{i + 1}"))
    model, processor = _classifier(kind)
    batch = collate_images([ImageDataset(rows, [0, 2, 1], processor)[i] for i in range(3)])
    # the processor's own pixels, on the images as transformers converts them (CLIP's processors call this)
    reference = processor(images=[convert_to_rgb(i) for i in images], return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], reference)
    config = dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets,
                           modules_to_save=heads(model.config))  # fmt: skip
    ours = dt.get_delta_model(model, config).eval()
    with torch.no_grad():  # the head as trained
        for name, p in ours.named_parameters():
            if "classifier" in name and p.requires_grad:
                p.add_(0.5)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_classifier(kind)[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        a, b = ours(**batch), theirs(pixel_values=reference, labels=batch["labels"])
        plain = _classifier(kind)[0](pixel_values=reference)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL[torch.float32], rtol=0)
    assert (a.logits - plain.logits).abs().max() > 1e-2


def test_an_image_the_processor_refuses_is_one_line_naming_the_row(tmp_path):
    """Qwen2.5-VL's image processor refuses an image wider than 200 times its height: its ValueError was a traceback
    from inside transformers, in training and in ``generate --image``."""
    from deltatune.data.load import DataError

    model, processor = qwen2_5_vl()
    vlm, example = C.VLMProcessor(processor), _rows(tmp_path, [(2, 600)])[0]
    with pytest.raises(DataError, match=r"^c\.jsonl:1: \w+ refuses the row's images: absolute aspect ratio must be"):
        C.encode_vlm(vlm, example, 512)
    with pytest.raises(DataError, match=r"^--image: \w+ refuses the row's images: absolute aspect ratio must be"):
        C.caption(model, vlm, example.images[0].path, max_new_tokens=2)


def test_swiftformers_two_heads_train_in_full_and_equal_peft(tmp_path):
    """SwiftFormer's heads are ``head`` and ``dist_head`` (its logits their mean): the stage put ``classifier`` into
    modules_to_save, which matched no module, and every run was refused ("'classifier' matches no module")."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForImageClassification, SwiftFormerConfig

    from deltatune.train.config import build
    from deltatune.train.image_cls import prepare_image_cls

    config = SwiftFormerConfig(depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], num_labels=2)
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path / "swift")
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (40, 90, 200) if c == "a" else (200, 9, 9)).save(tmp_path / "data" / c / "0.png")
    targets = ["to_query", "to_key"]
    cfg = build({"stage": "image_cls", "model": {"name_or_path": str(tmp_path / "swift")},
                 "method": {"name": "lora", "target_modules": targets}, "data": {"train": str(tmp_path / "data")}})  # fmt: skip
    prepare_image_cls(cfg, processor=None)
    assert cfg.method["modules_to_save"] == ["head", "dist_head"]
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    load = lambda: AutoModelForImageClassification.from_pretrained(tmp_path / "swift").eval()  # noqa: E731
    ours = dt.get_delta_model(load(), dt.LoraConfig(**lora, modules_to_save=cfg.method["modules_to_save"])).eval()
    trained = {n.split(".")[0] for n, p in ours.base_model.named_parameters() if p.requires_grad and "lora" not in n}
    assert trained == {"head", "dist_head"}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "head" in name and p.requires_grad:
                p.add_(0.5)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter").eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with torch.no_grad():
        a, b, plain = ours(pixel_values=x, labels=y), theirs(pixel_values=x, labels=y), load()(pixel_values=x)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL[torch.float32], rtol=0)
    assert (a.logits - plain.logits).abs().max() > 0.1


@pytest.mark.parametrize("kind", ["pp_lcnet", "perceiver"])
def test_heads_named_otherwise_are_what_trains_in_full(kind):
    """The stage's head for models whose head is not ``classifier`` (was refused: "'classifier' matches no module");
    the module it names is the one ``ignore_mismatched_sizes`` re-initialises for new classes (out_features = 3)."""
    from transformers import AutoModelForImageClassification, PerceiverConfig, PPLCNetConfig

    config = {
        "pp_lcnet": lambda: PPLCNetConfig(num_labels=3),
        "perceiver": lambda: PerceiverConfig(num_latents=4, d_latents=32, d_model=16, num_blocks=1, image_size=8,
                                             num_self_attends_per_block=1, num_self_attention_heads=2,
                                             num_cross_attention_heads=1, num_labels=3),
    }[kind]()  # fmt: skip
    if kind == "perceiver":  # (its auto class is one of three, which from_config does not pick)
        from transformers import PerceiverForImageClassificationLearned as Perceiver

        model = Perceiver(config)
    else:
        model = AutoModelForImageClassification.from_config(config)
    names = heads(model.config)
    assert [model.get_submodule(n).out_features for n, _ in model.named_modules() if n.endswith(tuple(names))] == [3]
    from transformers.pytorch_utils import Conv1D

    layers = (torch.nn.Linear, torch.nn.Conv2d, Conv1D)  # LoRA somewhere outside the head
    some = next(n for n, m in model.named_modules() if isinstance(m, layers) and not n.endswith(tuple(names)))
    delta = dt.get_delta_model(model, dt.LoraConfig(target_modules=[some], modules_to_save=names))
    full = {n for n, p in delta.base_model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert full and all(any(f".{h}." in f".{n}" for h in names) for n in full)


def test_imagegpt_is_refused_in_one_line_before_any_example(tmp_path):
    """fd87f18 let ImageGPT's ``score`` head through, and the run then failed at the first example with a KeyError
    from deep inside: its image processor gives colour-cluster input_ids, which its classifier reads, not the
    pixel_values the stage feeds (review E)."""
    import numpy as np
    from PIL import Image
    from transformers import ImageGPTConfig, ImageGPTForImageClassification, ImageGPTImageProcessorPil

    from deltatune.config import ConfigError
    from deltatune.train.config import build
    from deltatune.train.image_cls import prepare_image_cls

    config = ImageGPTConfig(n_embd=32, n_layer=1, n_head=4, vocab_size=17, n_positions=16, num_labels=2)
    ImageGPTForImageClassification(config).save_pretrained(tmp_path / "igpt")
    clusters = np.random.default_rng(0).uniform(-1, 1, (16, 3))
    processor = ImageGPTImageProcessorPil(clusters=clusters, size={"height": 4, "width": 4})
    for c, colour in (("a", (40, 90, 200)), ("b", (200, 9, 9))):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(tmp_path / "data" / c / "0.png")
    cfg = build({"stage": "image_cls", "model": {"name_or_path": str(tmp_path / "igpt")},
                 "method": {"name": "lora", "target_modules": ["c_attn"]}, "data": {"train": str(tmp_path / "data")}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"ImageGPT reads its image processor's colour-cluster input_ids") as info:
        prepare_image_cls(cfg, processor=processor)
    assert "\n" not in str(info.value) and "modules_to_save" not in cfg.method
