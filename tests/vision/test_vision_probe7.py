"""Vision probe 7.

Processors that mark each token's modality (``return_mm_token_type_ids``: Qwen2-VL's ``mm_token_type_ids``, which its
M-RoPE reads; Gemma 3's ``token_type_ids``, which let its image tokens attend both ways): the caption stage dropped
them, and took each row's images from an images-only processor call, which on Gemma 3 also writes text ids of its own
over the row's. Gemma 3 stopped in the collator (a tensor size error), Qwen2-VL in the model ("mm_token_type_ids is
missing"). Gemma 3's marker is its <start_of_image>, its image tokens others: they were counted as text tokens for
data.max_length, and a cut through them was not refused."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vlm import _LLAMA, word_tokenizer

from deltatune.data.images import ImageRow
from deltatune.data.load import DataError
from deltatune.train import caption as C

GEMMA = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# Gemma 3's chat template, shortened to what a caption row uses (no system turn): images as <start_of_image>
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-7B-Instruct's chat template without its default system turn and video branch
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CAPTIONS = ["a handwritten seven", "a thin two strokes"]


def _tokenizer(specials: list[str], **named: str):
    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *specials]})
    tok._set_model_specific_special_tokens(
        special_tokens=named
    )  # Gemma 3's boi_token, ... (as its tokenizer has them)
    return tok


def gemma3():
    """A tiny Gemma 3 (SigLIP 16 px in 4 px patches pooled to 4 image tokens) and its processor."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    tok = _tokenizer(GEMMA, boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA}
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16,
                  patch_size=4)  # fmt: skip
    text = dict(**_LLAMA, head_dim=8, vocab_size=len(tok), sliding_window=16, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    config = Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=4, image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    images = Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
    return model, Gemma3Processor(images, tok, chat_template=GEMMA_TEMPLATE, image_seq_length=4)


def qwen2_vl():
    """A tiny Qwen2-VL (14 px patches merged 2x2: a 56 x 56 image is 4 image tokens) and its processor, without the
    video processor (it needs torchvision, not installed here; images never reach it)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImagesOnly(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    tok = _tokenizer(QWEN)
    tok.eos_token = "<|im_end|>"  # as Qwen2-VL-Instruct's tokenizer has it
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN}
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2),
        text_config=dict(**_LLAMA, vocab_size=len(tok), rope_parameters=rope, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 84)
    return model, ImagesOnly(images, tok, None, chat_template=QWEN_TEMPLATE)


def _rows(tmp_path, sizes) -> list[C.VLMExample]:
    rng = np.random.default_rng(0)
    out = []
    for i, (size, caption) in enumerate(zip(sizes, CAPTIONS)):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        user = {"role": "user", "content": f"<image>\n{C.CAPTION_PROMPT}"}
        out.append(C.VLMExample(f"c.jsonl:{i + 1}", [ImageRow(str(path), None, f"c.jsonl:{i + 1}")],
                                [user, {"role": "assistant", "content": caption}]))  # fmt: skip
    return out


def _batch_and_reference(processor, examples):
    """The stage's collated batch, and the processor's own padded call on the same text and images."""
    vlm = C.VLMProcessor(processor)
    encoded = [C.encode_vlm(vlm, e, 512)[:2] for e in examples]
    dataset = C.VLMDataset(examples, encoded, vlm)
    batch = C.collate_vlm([dataset[0], dataset[1]], vlm.pad_token_id)
    (text, _, special), (other, _, _) = (C.render_vlm(vlm, e.messages) for e in examples)
    images = [[Image.open(e.images[0].path).convert("RGB")] for e in examples]
    reference = processor(text=[text, other], images=images, padding=True, padding_side="right",
                          add_special_tokens=special, return_tensors="pt")  # fmt: skip
    return vlm, batch, reference


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl"])
def test_the_processors_modality_ids_reach_the_model_as_its_own_call_gives_them(family, tmp_path):
    model, processor = gemma3() if family == "gemma3" else qwen2_vl()
    sizes = [(16, 16), (16, 16)] if family == "gemma3" else [(56, 56), (56, 84)]  # Qwen2-VL: 4 and 6 image tokens
    vlm, batch, reference = _batch_and_reference(processor, _rows(tmp_path, sizes))
    key = "token_type_ids" if family == "gemma3" else "mm_token_type_ids"
    assert set(batch) == {"labels", *reference}
    for name in ("input_ids", "attention_mask", key, "pixel_values"):
        assert torch.equal(batch[name], reference[name]), name
    tok = vlm.tokenizer
    end = "<end_of_turn>" if family == "gemma3" else "<|im_end|>"  # the template's end of the answer: trained
    for row, caption in zip(batch["labels"], CAPTIONS):
        assert tok.convert_ids_to_tokens([t for t in row.tolist() if t != -100]) == [*caption.split(), end]
    with torch.no_grad():
        ours = model(**batch)
        theirs = model(**reference, labels=batch["labels"])
    assert torch.equal(ours.logits, theirs.logits)
    assert ours.loss.item() == theirs.loss.item()


def test_gemma3s_image_tokens_are_not_text_tokens_and_a_cut_through_them_is_refused(tmp_path):
    _, processor = gemma3()
    vlm, example = C.VLMProcessor(processor), _rows(tmp_path, [(16, 16)])[0]
    ids = C.encode_vlm(vlm, example, 512)[0]
    soft = processor.tokenizer.image_token_id
    assert ids.count(soft) == 4
    text = len(ids) - 4  # the <start_of_image> and <end_of_image> around them are text, as the marker was
    assert C.encode_vlm(vlm, example, text)[:3] == (ids, C.encode_vlm(vlm, example, 512)[1], False)
    start = ids.index(soft)  # a cut at the marker would leave the row the image but none of its tokens
    with pytest.raises(DataError, match=r"^c\.jsonl:1: cutting the row .* would cut an image"):
        C.encode_vlm(vlm, example, start - 1)


def test_captions_stop_where_the_models_generation_config_stops(tmp_path):
    """Gemma 3's answers end with <end_of_turn>, one of its generation config's stops ([<eos>, <end_of_turn>]) but
    not its tokenizer's EOS: captions (generate --image, the eval's BLEU) stopped at the tokenizer's EOS alone and ran
    on past the answer. Here the stops are Qwen2-VL's EOS and ',' (a token the random model says): the caption is
    transformers' own generate on the processor's inputs, which stops where the generation config says."""
    model, processor = qwen2_vl()
    vlm, example = C.VLMProcessor(processor), _rows(tmp_path, [(56, 56)])[0]
    tok, image = processor.tokenizer, example.images[0].path
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids(",")]
    text, _, special = C.render_vlm(vlm, example.messages[:1], add_generation_prompt=True)
    enc = processor(text=[text], images=[Image.open(image).convert("RGB")], add_special_tokens=special,
                    return_tensors="pt")  # fmt: skip
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)[0][enc["input_ids"].shape[1] :]
    assert tok.convert_ids_to_tokens(out) == ["digit", "zero", ","]  # stopped at the generation config's ','
    assert C.caption(model, vlm, image, max_new_tokens=6) == "digit zero ,"


@pytest.mark.parametrize("text_column", [None, "text"], ids=["image_cls", "caption"])
def test_an_image_url_is_named_as_a_url_in_one_line(text_column, tmp_path):
    """It was joined to the data folder and reported missing there: "image '.../https:/x.org/a.png' does not exist"."""
    from deltatune.data.images import read_image_rows

    (tmp_path / "d.jsonl").write_text('{"image": "https://x.org/a.png", "label": 1, "text": "a seven"}\n')
    with pytest.raises(DataError, match=r"/d\.jsonl:1: image 'https://x\.org/a\.png' is a URL; .*local image files$"):
        read_image_rows(str(tmp_path / "d.jsonl"), text_column=text_column)


@pytest.mark.parametrize("family, marker", [("llava", "<image>"), ("qwen2_vl", "<|image_pad|>")])
def test_a_caption_holding_the_image_marker_is_one_line(family, marker, tmp_path):
    """The processor counted one marker more than images and stopped with its own ValueError (a traceback)."""
    from tiny_vlm import save_vlm
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(save_vlm(tmp_path / "llava")) if family == "llava" else qwen2_vl()[1]
    example = _rows(tmp_path, [(56, 56)])[0]
    example.messages[1]["content"] = f"a {marker} seven"
    with pytest.raises(DataError, match=rf"^c\.jsonl:1: 2 image markers \('{re.escape(marker)}'\) for 1 image\(s\)"):
        C.encode_vlm(C.VLMProcessor(processor), example, 512)


def test_a_levit_with_teacher_trains_both_heads(tmp_path):
    """AutoModelForImageClassification loads a LeViT checkpoint saved as LevitForImageClassificationWithTeacher
    (facebook/levit-*) as that class, whose logits are the mean of ``classifier`` and ``classifier_distill``. The stage
    trained ``classifier`` only: the distillation head, re-initialised for the new classes, stayed random."""
    from transformers import AutoModelForImageClassification, LevitConfig, LevitForImageClassificationWithTeacher

    import deltatune as dt
    from deltatune.train.config import build
    from deltatune.train.image_cls import prepare_image_cls

    config = LevitConfig(image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                         key_dim=[8, 8, 8], num_labels=3)  # fmt: skip
    LevitForImageClassificationWithTeacher(config).save_pretrained(tmp_path / "levit")
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / c / "0.png")
    cfg = build({"stage": "image_cls", "model": {"name_or_path": str(tmp_path / "levit")},
                 "method": {"name": "lora", "target_modules": ["linear"]}, "data": {"train": str(tmp_path / "data")}})  # fmt: skip
    prepare_image_cls(cfg, processor=None)
    assert cfg.method["modules_to_save"] == ["classifier", "classifier_distill"]
    model = AutoModelForImageClassification.from_pretrained(
        tmp_path / "levit", num_labels=2, ignore_mismatched_sizes=True
    )
    assert type(model).__name__ == "LevitForImageClassificationWithTeacher"
    model = dt.get_delta_model(
        model, dt.LoraConfig(target_modules=["linear"], modules_to_save=cfg.method["modules_to_save"])
    )
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and "lora" not in n} == {
        "classifier",
        "classifier_distill",
    }


def test_a_vlm_answers_first_word_trains_when_its_token_takes_the_prompts_last_space():
    """Was: only tokens wholly inside an answer trained, so ' seven' after 'Assistant: ' (LLaVA's 'ASSISTANT: ',
    SmolVLM's 'Assistant: ') never did; transformers' assistant mask, which processors share, marks every token
    overlapping the answer, as the text stages label them."""
    import types

    from transformers import AutoTokenizer

    from deltatune.config import ConfigError
    from deltatune.data.templates import IGNORE_INDEX
    from deltatune.train.caption import vlm_labels
    from deltatune.train.models import resolve_path

    try:
        tok = AutoTokenizer.from_pretrained(resolve_path("smollm2"))  # byte-level BPE: a word takes its space
    except ConfigError as exc:
        pytest.skip(str(exc))
    text = "User: <image>\nWhat digit?\nAssistant: seven<|im_end|>\n"
    spans = [(text.index("seven"), len(text))]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    batch = {
        "input_ids": [enc["input_ids"]],
        "offset_mapping": [enc["offset_mapping"]],
        "text_replacement_offsets": [[]],
    }
    labels = vlm_labels(
        batch, text, spans, types.SimpleNamespace(image_token_id=-1, tokenizer=tok), False, "c.jsonl:1"
    )
    assert [tok.decode([t]) for t in labels if t != IGNORE_INDEX] == [" seven", "<|im_end|>", "\n"]
