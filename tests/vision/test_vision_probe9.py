"""Vision probe 9.

PaliGemma reads its prompt (the images, BOS, the prompt and a newline) as a prefix attended both ways and the answer
after it causally; its processor takes the answer as ``suffix`` and gives ``token_type_ids`` (0 prefix, 1 suffix),
which the model's prefix-LM mask reads, and labels (-100 on the prefix). The caption stage refused every PaliGemma
row ("the processor's tokens of the answers differ from its tokenizer's"). The batch, loss and logits are checked
against the processor's own batch through the model, LoRA against peft's, captions against transformers' documented
generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vlm import _LLAMA, WORDS
from tolerances import ATOL

import deltatune as dt
from deltatune import towers as T
from deltatune.data.images import ImageRow
from deltatune.data.load import DataError
from deltatune.train import caption as C

CAPTIONS = ["a handwritten five thin strokes", "a handwritten six"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]


def gemma_tokenizer():
    """A word-level tokenizer over ``WORDS`` with Gemma's special tokens (``<bos>``, ``<eos>``, ``<pad>``), its
    ``<image>`` token, and the newline as a token of its own (Gemma's ``\\n``, which PaliGemma's prompt ends with)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*GEMMA_SPECIALS, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_tokens([AddedToken("\n", normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        add_bos_token=True, extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip


def paligemma(path=None):
    """A tiny PaliGemma (SigLIP at 16 px in 4 px patches: 16 image tokens; a 2-layer Gemma) and its processor; saved
    together to ``path`` when given."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    images = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    images.image_seq_length = 16
    processor = PaliGemmaProcessor(images, gemma_tokenizer())  # adds its <loc....> and <seg...> tokens
    tok = processor.tokenizer
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16,
                  patch_size=4)  # fmt: skip
    text = dict(**_LLAMA, head_dim=8, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(
        "<image>"), projection_dim=32, hidden_size=32)  # fmt: skip
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config).eval()
    if path is not None:
        model.save_pretrained(str(path))
        processor.save_pretrained(str(path))
    return model, processor


def _images(tmp_path, n: int = 2) -> list:
    rng = np.random.default_rng(0)
    paths = [tmp_path / f"{i}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(p)
    return paths


def _rows(tmp_path, prompt: str = f"<image>\n{C.CAPTION_PROMPT}") -> list[C.VLMExample]:
    """Image + caption rows as the stage reads them: the user turn the image and the prompt, the caption the answer."""
    return [
        C.VLMExample(f"c.jsonl:{i + 1}", [ImageRow(str(p), None, f"c.jsonl:{i + 1}")],
                     [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}])
        for i, (p, caption) in enumerate(zip(_images(tmp_path), CAPTIONS))
    ]  # fmt: skip


def _batch_and_reference(processor, examples):
    """The stage's collated batch, and the processor's own call (``suffix=``, padded on the right) on the same rows:
    transformers' PaliGemma fine-tuning recipe."""
    vlm = C.VLMProcessor(processor)
    encoded = [C.encode_vlm(vlm, e, 512)[:2] for e in examples]
    dataset = C.VLMDataset(examples, encoded, vlm)
    batch = C.collate_vlm([dataset[i] for i in range(len(examples))], vlm.pad_token_id)
    images = [Image.open(e.images[0].path).convert("RGB") for e in examples]
    reference = processor(text=[C.CAPTION_PROMPT] * len(examples), images=images, suffix=CAPTIONS[: len(examples)],
                          padding="longest", padding_side="right", return_tensors="pt")  # fmt: skip
    return vlm, batch, reference


def test_a_paligemma_row_is_its_processors_prefix_and_suffix(tmp_path):
    """One row spelled out: the 16 image tokens, BOS, the prompt and the newline are the prefix (token type 0, no
    loss); the caption and EOS the suffix (type 1, trained). Before: refused."""
    _, processor = paligemma()
    vlm, row = C.VLMProcessor(processor), _rows(tmp_path)[1]
    assert vlm.prefix_lm and vlm.types == "token_type_ids"
    ids, labels, cut, _ = C.encode_vlm(vlm, row, 512)
    tok = processor.tokenizer
    prefix = ["<image>"] * 16 + ["<bos>", "describe", "the", "image", ".", "\n"]
    assert tok.convert_ids_to_tokens(ids) == [*prefix, "a", "handwritten", "six", "<eos>"] and not cut
    assert labels == [-100] * len(prefix) + ids[len(prefix) :]
    example = C.VLMDataset([row], [(ids, labels)], vlm)[0]
    assert example["token_type_ids"] == [0] * len(prefix) + [1] * 4
    text, spans = C.shown(vlm, row)
    assert text == "<image><bos>Describe the image.\na handwritten six<eos>"
    assert [text[a:b] for a, b in spans] == ["a handwritten six<eos>"]
    # data.max_length counts text tokens (10; the images come first, so no cut splits one); the labels stay the suffix
    short, short_labels, cut, _ = C.encode_vlm(vlm, row, 8)
    assert cut and short == ids[:24] and short_labels == [-100] * 22 + ids[22:24]


def test_the_batch_loss_and_logits_are_the_processors_own_through_the_model(tmp_path):
    """input_ids, token_type_ids, attention mask, labels and pixel values equal the processor's ``suffix=`` batch;
    the model's logits and loss on it are equal. The token types matter: without them PaliGemma's Gemma (its config's
    ``use_bidirectional_attention``) reads the answer both ways too."""
    model, processor = paligemma()
    _, batch, reference = _batch_and_reference(processor, _rows(tmp_path))
    assert set(batch) == set(reference)
    for name in reference:
        assert torch.equal(batch[name], reference[name]), name
    assert batch["token_type_ids"][1].tolist() == [0] * 22 + [1] * 4 + [0] * 2  # the padding: type 0, no attention
    with torch.no_grad():
        ours, theirs = model(**batch), model(**reference)
        untyped = model(**{k: v for k, v in batch.items() if k != "token_type_ids"})
    assert torch.equal(ours.logits, theirs.logits) and ours.loss.item() == theirs.loss.item()
    assert (untyped.logits - ours.logits).abs().max() > 1e-3


def test_lora_on_paligemma_equals_peft_on_the_processors_batch(tmp_path):
    """LoRA in the language tower (the default targets, resolved by ``towers.restrict``), non-zero from the start:
    deltatune on its batch and peft (the same file loaded) on the processor's give the same loss and logits."""
    peft = pytest.importorskip("peft")
    _, processor = paligemma()
    _, batch, reference = _batch_and_reference(processor, _rows(tmp_path))
    base = paligemma()[0]
    config = T.restrict(base, dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    assert len(config.target_modules) == 4 and all(
        n.startswith("model.language_model.") for n in config.target_modules
    )
    ours = dt.get_delta_model(base, config).eval()
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(paligemma()[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        a, b = ours(**batch), theirs(**reference)
        plain = paligemma()[0](**reference)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL[torch.float32], rtol=0)
    assert (a.logits - plain.logits).abs().max() > 1e-3  # the adapter does something


def _peaked(model):
    """The tiny model with its language model's weights drawn wider, so that greedy answers depend on the input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def test_captions_are_transformers_generate_from_the_prefix(tmp_path):
    """``caption`` (``generate --image``) answers from the processor's prefix, with its token types: the new tokens of
    transformers' documented PaliGemma generation (the prompt without a marker; the processor puts the image first).
    A prompt placing ``<image>`` elsewhere reads the image first as well."""
    model, processor = paligemma()
    model = _peaked(model)
    vlm, path = C.VLMProcessor(processor), _images(tmp_path, 1)[0]
    for prompt in ("what digit is it ?", "what digit is <image> ?"):
        enc = processor(text="what digit is it ?" if "<image>" in prompt else prompt,
                        images=Image.open(path).convert("RGB"), return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=5, do_sample=False)[0, enc["input_ids"].shape[1] :]
        expected = processor.tokenizer.decode(out, skip_special_tokens=True).strip()
        assert C.caption(model, vlm, str(path), max_new_tokens=5, prompt=prompt) == expected != ""
    inputs = vlm.inputs([Image.open(path).convert("RGB")], [{"role": "user", "content": "<image>\nwhat ?"}])
    assert "labels" not in inputs and inputs["token_type_ids"].sum() == 0


def test_conversation_rows_are_one_prompt_and_one_answer(tmp_path):
    """A PaliGemma row is one prompt and one answer: a longer conversation is refused in one line; the image placed
    after the prompt text reads first, as the processor places images."""
    _, processor = paligemma()
    vlm, path = C.VLMProcessor(processor), _images(tmp_path, 1)[0]
    image = [ImageRow(str(path), None, "m.jsonl:1")]
    turns = [{"role": "user", "content": "what digit is <image> ?"}, {"role": "assistant", "content": "five"},
             {"role": "user", "content": "thick ?"}, {"role": "assistant", "content": "no"}]  # fmt: skip
    with pytest.raises(DataError, match=r"^m\.jsonl:1: PaliGemma reads one prompt and its answer .* turns are "
                       r"\['user', 'assistant', 'user', 'assistant'\]$"):  # fmt: skip
        C.encode_vlm(vlm, C.VLMExample("m.jsonl:1", image, turns), 512)
    ids, labels, _, _ = C.encode_vlm(vlm, C.VLMExample("m.jsonl:1", image, turns[:2]), 512)
    reference = processor(text="<image>what digit is ?", images=Image.open(path).convert("RGB"), suffix="five")
    assert ids == reference["input_ids"][0] and labels == reference["labels"][0].tolist()
    bad = [{"role": "user", "content": "<image> what ?"}, {"role": "assistant", "content": "a <image> five"}]
    with pytest.raises(DataError, match=r"^m\.jsonl:1: 2 image markers \('<image>'\) for 1 image\(s\)"):
        C.encode_vlm(vlm, C.VLMExample("m.jsonl:1", image, bad), 512)


def test_paligemma_trains_two_steps_through_the_cli(tmp_path, capsys):
    """The recipe on a tiny PaliGemma folder: the first logged loss (both rows, a learning rate too small to matter)
    is the model's own on the processor's batch, so the token types reach it through the trainer; the report shows
    the row as PaliGemma reads it; LoRA in the language tower only; eval's BLEU and ROUGE-L come back."""
    from deltatune.cli import main

    model, processor = paligemma()
    _peaked(model).save_pretrained(tmp_path / "pali")  # (the token types change its loss by 0.03)
    processor.save_pretrained(tmp_path / "pali")
    rows = [{"image": p.name, "text": c} for p, c in zip(_images(tmp_path), CAPTIONS)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "recipes/llava-caption-lora.yaml", f"model.name_or_path={tmp_path / 'pali'}",
            f"data.train={tmp_path / 'c.jsonl'}", f"data.eval={tmp_path / 'c.jsonl'}", f"output.dir={tmp_path / 'run'}",
            "model.dtype=float32", "train.max_steps=2", "train.report_to=[none]", "train.batch_size=2",
            "train.save_steps=1000", "train.eval_steps=1000", "train.logging_steps=1", "train.lr=1e-12"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2 and {"eval_loss", "eval_bleu", "eval_rougeL"} <= metrics.keys()
    lines = (tmp_path / "run" / "log_history.jsonl").read_text().splitlines()
    logged = [h["loss"] for h in map(json.loads, lines) if "loss" in h]
    _, _, reference = _batch_and_reference(processor, _rows(tmp_path))
    with torch.no_grad():
        assert logged[0] == pytest.approx(model(**reference).loss.item(), abs=1e-5)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "'<image><bos>Describe the image.\\n[[a handwritten five thin strokes<eos>]]'" in report
    assert "adapted layers per tower: language: 4" in report


def test_images_of_different_sizes_batch_as_pixtrals_image_processor_pads_them():
    """Mistral 3's Pixtral image processor keeps each image's aspect (a 16 x 32 and a 32 x 16 image) and pads a batch
    with zeros below and to the right (``image_sizes`` says where each ends). The collator padded only the second
    dimension (LLaVA-NeXT's patches) and stopped in ``torch.cat`` ("Sizes of tensors must match"); its batch now
    equals the image processor's own. (Pixtral's processor needs torchvision, not installed here: the rows carry what
    its image processor gives each row, as the dataset's images-only processor call does.)"""
    from transformers import PixtralImageProcessorPil

    images = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size={"height": 4, "width": 4})
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(16, 32), (32, 16)]]
    rows = [{"input_ids": [1] * n, "labels": [-100] * n, **images(images=[p], return_tensors="pt")}
            for p, n in zip(pictures, (3, 5))]  # fmt: skip
    reference = images(images=pictures, return_tensors="pt")
    batch = C.collate_vlm(rows, 0)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["image_sizes"].tolist() == [[16, 32], [32, 16]]
    for name in reference:
        assert torch.equal(batch[name], reference[name]), name


def test_a_chat_template_for_paligemma_is_refused_in_one_line(tmp_path):
    """``data.template`` has nothing to render on PaliGemma (its processor lays out the prompt and the answer): it
    was ignored without a word; now named."""
    from deltatune.config import ConfigError
    from deltatune.train.config import build

    _, processor = paligemma()
    rows = [{"image": p.name, "text": c} for p, c in zip(_images(tmp_path), CAPTIONS)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"stage": "caption", "model": {"name_or_path": "unused"}, "data": {"train": str(tmp_path / "c.jsonl")}}
    cfg = build({**recipe, "data": {**recipe["data"], "template": "chatml"}})
    with pytest.raises(
        ConfigError, match=r"^data.template='chatml': PaliGemma reads its processor's prompt and answer"
    ):
        C.prepare_caption(cfg, C.VLMProcessor(processor))
    assert len(C.prepare_caption(build(recipe), C.VLMProcessor(processor)).train) == 2


def onevision():
    """A tiny LLaVA-OneVision (SigLIP at 16 px: 16 image tokens per view; any-resolution grids up to 32 x 32) and its
    processor, without the video processor (it needs torchvision, not installed here; images never reach it)."""
    from tiny_vlm import LLAVA_TEMPLATE, word_tokenizer
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    class ImagesOnly(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    grids = [[16, 16], [16, 32], [32, 16], [32, 32]]
    vision = dict(model_type="siglip_vision_model", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=37, image_size=16, patch_size=4)  # fmt: skip
    text = dict(model_type="qwen2", **_LLAMA, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=grids,
        vision_feature_select_strategy="full",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    images = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=grids)
    processor = ImagesOnly(images, tok, None, num_image_tokens=16, vision_feature_select_strategy="full",
                           chat_template=LLAVA_TEMPLATE)  # fmt: skip
    return model, processor


def test_a_multi_image_row_reads_its_images_as_one_samples(tmp_path):
    """LLaVA-OneVision cuts a lone image into any-resolution views but reads a multi-image sample's images whole
    (``batch_num_images``). The stage handed the processor a row's two images as a flat list, which it reads as two
    single-image samples: 105 text and image tokens where the processor's chat template and TRL's collator (a list of
    images per sample) give 47, the images cut into views the model reads as separate single images. Now the batch
    (a one-image row beside a two-image row), logits and loss equal the processor's own call on images per sample."""
    model, processor = onevision()
    rng, paths = np.random.default_rng(0), []
    for i, size in enumerate([(16, 32), (32, 16), (16, 16)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(paths[-1])
    answer = {"role": "assistant", "content": "a thin two"}
    examples = [
        C.VLMExample("c:1", [ImageRow(str(paths[0]), None, "c:1")],
                     [{"role": "user", "content": "<image>\nDescribe the image."}, answer]),
        C.VLMExample("c:2", [ImageRow(str(p), None, "c:2") for p in paths[1:]],
                     [{"role": "user", "content": "<image> <image>\nDescribe the image."}, answer]),
    ]  # fmt: skip
    vlm = C.VLMProcessor(processor)
    encoded = [C.encode_vlm(vlm, e, 512)[:2] for e in examples]
    batch = C.collate_vlm([C.VLMDataset(examples, encoded, vlm)[i] for i in (0, 1)], vlm.pad_token_id)
    images = [[Image.open(r.path).convert("RGB") for r in e.images] for e in examples]
    texts = [C.render_vlm(vlm, e.messages)[0] for e in examples]
    reference = processor(text=texts, images=images, padding=True, padding_side="right", return_tensors="pt")
    assert reference["batch_num_images"].tolist() == [1, 2] and len(encoded[1][0]) == 47
    for name in reference:
        assert torch.equal(batch[name], reference[name]), name
    with torch.no_grad():
        ours, theirs = model(**batch), model(**reference, labels=batch["labels"])
    assert torch.equal(ours.logits, theirs.logits) and ours.loss.item() == theirs.loss.item()
    # the eval's captions and generate --image read a two-image prompt the same way
    prompt = C.render_vlm(vlm, examples[1].messages[:1], add_generation_prompt=True)[0]
    inputs = vlm.inputs(images[1], examples[1].messages[:1])
    own = processor(text=[prompt], images=[images[1]], return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [2] and torch.equal(inputs["input_ids"], own["input_ids"])


def test_a_prompt_with_more_markers_than_the_image_is_one_line(tmp_path):
    """``generate --image x.png --prompt '<image> <image> what ?'``: the processor's ValueError ("Found total 2
    <image> tokens and 1 images") came out as a traceback; now one line naming --prompt."""
    from deltatune.config import ConfigError

    model, processor = paligemma()
    path = str(_images(tmp_path, 1)[0])
    with pytest.raises(ConfigError, match=r"^--prompt: 2 <image> markers for the one image of --image"):
        C.caption(model, C.VLMProcessor(processor), path, max_new_tokens=2, prompt="<image> <image> what ?")
