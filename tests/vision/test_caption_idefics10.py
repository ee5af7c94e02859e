"""Caption probe 10: Idefics2, Idefics3 and SmolVLM (what a SmolLM user reaches for) train and caption as transformers
runs them. Idefics2's processor expands each ``<image>`` by string replacement and reports no
``text_replacement_offsets``, so every Idefics2 row was refused ("the processor's tokens of the answers differ from its
tokenizer's"); its expansion is now replayed with offsets. Checked on tiny models built from configs (SigLIP-style
towers at 16 px, a word-level tokenizer): the batch is the processor's (ids with the image tokens, pixel values and
pixel attention mask, labels -100 on the prompt), logits and loss are the model's on the processor's batch, LoRA on the
language tower equals peft's, and ``caption`` equals ``model.generate`` on transformers' documented prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_caption_probe5 import EXTRA, save_idefics3
from tiny_vlm import _LLAMA, word_tokenizer
from tolerances import ATOL

import deltatune as dt
from deltatune import towers as T
from deltatune.data.images import ImageRow
from deltatune.data.load import DataError
from deltatune.train import caption as C

IDEFICS2_TEMPLATE = (  # HuggingFaceM4/idefics2-8b's chat template
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CAPTIONS = ["a handwritten seven", "a thin two"]


def save_idefics2(path: Path, split: bool = False) -> Path:
    """A tiny Idefics2 (a 1-layer vision tower at 16 px in 4 px patches, a perceiver resampler to 4 latents: 4 image
    tokens per image, 5 x 4 with image splitting) and its Idefics2Processor with idefics2-8b's chat template."""
    from transformers import AutoModelForImageTextToText, Idefics2Config, Idefics2ImageProcessorPil, Idefics2Processor

    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *EXTRA]})
    images = Idefics2ImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 16}, do_image_splitting=split)
    processor = Idefics2Processor(images, tok, image_seq_len=4, chat_template=IDEFICS2_TEMPLATE)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16,
                  patch_size=4)  # fmt: skip
    text = dict(model_type="mistral", **_LLAMA, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.convert_tokens_to_ids("<end_of_utterance>"))  # fmt: skip
    perceiver = dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=8, num_key_value_heads=1)  # fmt: skip
    config = Idefics2Config(vision_config=vision, text_config=text, perceiver_config=perceiver,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))  # fmt: skip
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("idefics")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(32, 24), (16, 16)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return {
        "root": root,
        "idefics2": save_idefics2(root / "idefics2"),
        "idefics2-split": save_idefics2(root / "idefics2-split", split=True),
        "idefics3": save_idefics3(root / "idefics3"),
        "smolvlm": save_idefics3(root / "smolvlm", "smolvlm"),
    }


def _load(folder: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def _examples(root: Path) -> list[C.VLMExample]:
    user = {"role": "user", "content": f"<image>\n{C.CAPTION_PROMPT}"}
    return [
        C.VLMExample(
            f"d:{i + 1}",
            [ImageRow(str(root / f"{i}.png"), None, f"d:{i + 1}")],
            [user, {"role": "assistant", "content": caption}],
        )  # fmt: skip
        for i, caption in enumerate(CAPTIONS)
    ]


def _chat(caption: str | None) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": C.CAPTION_PROMPT}]}
    return [user] if caption is None else [user, {"role": "assistant", "content": [{"type": "text", "text": caption}]}]


def _reference(processor, root: Path) -> tuple[dict, torch.Tensor]:
    """The processor's own batch of the two rows (its chat template, its padded call) and labels masking the prompt:
    -100 on the tokens of the conversation up to the generation prompt ('Assistant:'), and on the padding."""
    images = [[Image.open(root / f"{i}.png").convert("RGB")] for i in range(2)]
    full = [processor.apply_chat_template(_chat(c)) for c in CAPTIONS]
    special = _special(processor, full[0])
    batch = processor(text=full, images=images, padding="longest", padding_side="right", return_tensors="pt",
                      add_special_tokens=special)  # fmt: skip
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for i in range(2):
        prompt = processor(text=processor.apply_chat_template(_chat(None), add_generation_prompt=True),
                           images=images[i], add_special_tokens=special)["input_ids"][0]  # fmt: skip
        assert batch["input_ids"][i, : len(prompt)].tolist() == list(prompt)
        labels[i, : len(prompt)] = -100
    return batch, labels


def _special(processor, text: str) -> bool:
    """Whether the tokenizer adds its BOS: not when the template wrote it (Idefics3's and SmolVLM's do; this tiny
    tokenizer would add its <s> before it, which no real checkpoint's does)."""
    return not text.startswith(processor.tokenizer.bos_token)


def _batch(processor, root: Path) -> dict:
    vlm = C.VLMProcessor(processor)
    examples = _examples(root)
    encoded = [C.encode_vlm(vlm, e, 128)[:2] for e in examples]
    dataset = C.VLMDataset(examples, encoded, vlm)
    return C.collate_vlm([dataset[0], dataset[1]], vlm.pad_token_id)


@pytest.mark.parametrize("family", ["idefics2", "idefics2-split", "idefics3", "smolvlm"])
def test_the_batch_logits_and_loss_are_the_processors_own_through_the_model(folders, family):
    """ids, attention mask, pixel values, pixel attention mask equal the processor's padded batch, the labels are the
    answers' tokens (the prompt masked, as the other families), and the model's logits and loss on both are equal.
    Idefics2 (with and without image splitting) was refused on every row."""
    model, processor = _load(folders[family])
    batch = _batch(processor, folders["root"])
    reference, labels = _reference(processor, folders["root"])
    assert set(batch) == {*reference, "labels"}
    for name in reference:
        assert torch.equal(batch[name], reference[name]), name
    assert torch.equal(batch["labels"], labels)
    trained = processor.tokenizer.convert_ids_to_tokens([t for t in batch["labels"][0].tolist() if t != -100])
    assert trained == ["a", "handwritten", "seven", "<end_of_utterance>"]
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    if family.startswith("idefics2"):  # 4 latents per image; image splitting: 4 crops and the whole image
        assert (batch["input_ids"][0] == image).sum() == (20 if family == "idefics2-split" else 4)
    with torch.no_grad():
        ours, theirs = model(**batch), model(**reference, labels=labels)
    assert torch.equal(ours.logits, theirs.logits) and ours.loss.item() == theirs.loss.item()


def test_an_idefics2_conversation_with_two_images_trains_both_answers(folders):
    """Two markers in one row: the second answer sits after two expansions (and the fake tokens of two adjacent
    images merge into one, as the processor writes them)."""
    _, processor = _load(folders["idefics2"])
    vlm = C.VLMProcessor(processor)
    messages = [
        {"role": "user", "content": "what digit is <image> ?"},
        {"role": "assistant", "content": "five"},
        {"role": "user", "content": "and <image><image> ?"},
        {"role": "assistant", "content": "six thin strokes"},
    ]
    rows = [ImageRow(str(folders["root"] / f"{i}.png"), None, "d:1") for i in (0, 1, 0)]
    ids, labels, _, _ = C.encode_vlm(vlm, C.VLMExample("d:1", rows, messages), max_length=512)
    text = C.render_vlm(vlm, messages)[0]
    pictures = [Image.open(r.path).convert("RGB") for r in rows]
    assert ids == processor(text=[text], images=[pictures])["input_ids"][0]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    assert "<fake_token_around_image><fake_token_around_image>" not in "".join(tokens)
    assert processor.tokenizer.convert_ids_to_tokens([t for t in labels if t != -100]) == [
        "five", "<end_of_utterance>", "six", "thin", "strokes", "<end_of_utterance>"
    ]  # fmt: skip


@pytest.mark.parametrize("family", ["idefics2", "idefics3", "smolvlm"])
def test_lora_on_the_language_tower_equals_peft_on_the_processors_batch(folders, family, tmp_path):
    """LoRA on the language tower (the default targets, resolved by ``towers.restrict``), non-zero from the start:
    deltatune on its batch and peft (the same file loaded) on the processor's give the same logits and loss."""
    peft = pytest.importorskip("peft")
    base, processor = _load(folders[family])
    batch = _batch(processor, folders["root"])
    reference, labels = _reference(processor, folders["root"])
    config = T.restrict(base, dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    assert config.target_modules and all(".text_model." in n for n in config.target_modules), config.target_modules
    torch.manual_seed(0)
    ours = dt.get_delta_model(base, config).eval()
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_load(folders[family])[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        a, b = ours(**batch), theirs(**reference, labels=labels)
        plain = _load(folders[family])[0](**reference, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL[torch.float32], rtol=0)
    assert (a.logits - plain.logits).abs().max() > 1e-3  # the adapter does something


def _peaked(model):
    """The tiny model with its language model's weights drawn wider, so that greedy answers depend on the input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "text_model" in name and p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("family", ["idefics2", "idefics3", "smolvlm"])
def test_captions_are_model_generate_on_transformers_documented_prompt(folders, family):
    """``caption`` (``generate --image``): the new tokens of ``model.generate`` on the processor's chat-template
    prompt (transformers' Idefics2 / Idefics3 example), decoded without special tokens."""
    model, processor = _load(folders[family])
    model = _peaked(model)
    # caption also stops at the tokenizer's EOS: the tiny tokenizer's </s> is no stop of these models', their
    # tokenizers' is <end_of_utterance> (SmolVLM's) or a token the model does not answer with
    processor.tokenizer.eos_token = "<end_of_utterance>"
    path = folders["root"] / "0.png"
    prompt = processor.apply_chat_template(_chat(None), add_generation_prompt=True)
    enc = processor(text=prompt, images=[Image.open(path).convert("RGB")], return_tensors="pt",
                    add_special_tokens=_special(processor, prompt))  # fmt: skip
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)[0, enc["input_ids"].shape[1] :]
    expected = processor.tokenizer.decode(out, skip_special_tokens=True).strip()
    assert C.caption(model, C.VLMProcessor(processor), str(path), max_new_tokens=5) == expected != ""


def test_a_row_the_replayed_expansion_does_not_match_is_still_refused(folders):
    """The replay is Idefics2's own: a processor that expands otherwise (here: a different image_seq_len than the
    replay reads) is refused naming the row, never trained on shifted labels."""
    _, processor = _load(folders["idefics2"])
    vlm = C.VLMProcessor(processor)
    seq = processor.image_seq_len
    example = _examples(folders["root"])[0]
    C.encode_vlm(vlm, example, 128)
    call = type(processor).__call__

    def longer(self, *args, **kwargs):  # the processor expands with one more image token than it says
        self.image_seq_len = seq + 1
        try:
            return call(self, *args, **kwargs)
        finally:
            self.image_seq_len = seq

    processor.__class__ = type("Longer", (type(processor),), {"__call__": longer})
    with pytest.raises(DataError, match=r"^d:1: the processor's tokens of the answers differ from its tokenizer's"):
        C.encode_vlm(vlm, example, 128)


def aya_vision_processor():
    """Aya Vision's processor at toy size: GotOCR2's image processor cuts an image into up to 4 tiles of 16 px (and a
    global view), 4 image tokens per tile after the 2x downsampling; each tile is announced by ``TILE_<n>``, which
    the tokenizer splits (here TILE and an unknown ``_1``: text tokens inside the image's span)."""
    from transformers import AyaVisionProcessor, GotOcr2ImageProcessorPil

    tok = word_tokenizer()
    specials = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"]
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *specials]})
    images = GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1,
                                      max_patches=4)  # fmt: skip
    return AyaVisionProcessor(images, tok, patch_size=4, img_size=16, downsample_factor=2)


def test_the_suggested_max_length_fits_every_row_when_images_take_different_token_counts(tmp_path):
    """Aya Vision's (and Pixtral's) image tokens vary with the image: a 32 x 32 image is 4 tiles and a global view, a
    16 x 16 one the global view alone. check_caption suggested data.max_length from the longest row's image tokens;
    a row over the positions with more image tokens (a larger image, a shorter caption) still did not fit after
    following it. Now the bound is the most image tokens of any row over the positions, worked by hand: positions P,
    the big-image row's i_A image tokens, data.max_length = P - i_A; both rows then fit."""
    from types import SimpleNamespace

    from transformers import AyaVisionConfig

    from deltatune.config import ConfigError
    from deltatune.train.checks import check_caption

    vlm = C.VLMProcessor(aya_vision_processor())
    rng = np.random.default_rng(0)
    rows = []
    for i, (size, caption) in enumerate([(32, "a thin two"), (16, " ".join(["a thin two strokes"] * 9))]):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        user = {"role": "user", "content": f"<image>\n{C.CAPTION_PROMPT}"}
        rows.append(C.VLMExample(f"c:{i + 1}", [ImageRow(str(tmp_path / f"{i}.png"), None, f"c:{i + 1}")],
                                 [user, {"role": "assistant", "content": caption}]))  # fmt: skip
    encoded = [C.encode_vlm(vlm, r, 512)[:2] for r in rows]
    (big, _), (small, _) = encoded
    i_big, i_small = (sum(t in vlm.image_ids for t in ids) for ids in (big, small))
    assert i_big > i_small and len(small) > len(big)  # the longest row is not the one with the most image tokens
    positions = len(big) - 1  # both rows over
    config = AyaVisionConfig()
    config.text_config.max_position_embeddings = positions
    model = SimpleNamespace(config=config)
    cfg = SimpleNamespace(data=SimpleNamespace(max_length=512, max_target_length=8))
    data = SimpleNamespace(train=C.VLMDataset(rows, encoded, vlm), eval=None)
    with pytest.raises(ConfigError, match=rf"reads {len(small)} positions .* to {positions - i_big} or less$"):
        check_caption(cfg, data, model)
    cfg.data.max_length = positions - i_big
    cut = [C.encode_vlm(vlm, r, cfg.data.max_length)[:2] for r in rows]
    assert max(len(ids) for ids, _ in cut) <= positions
    check_caption(cfg, SimpleNamespace(train=C.VLMDataset(rows, cut, vlm), eval=None), model)


def test_a_row_whose_image_tokens_alone_fill_the_positions_asks_for_smaller_images(tmp_path):
    """No data.max_length can help then (it cuts text only): one line saying so, not a suggestion of 0 or less."""
    from types import SimpleNamespace

    from transformers import AyaVisionConfig

    from deltatune.config import ConfigError
    from deltatune.train.checks import check_caption

    vlm = C.VLMProcessor(aya_vision_processor())
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "0.png")
    user = {"role": "user", "content": f"<image>\n{C.CAPTION_PROMPT}"}
    row = C.VLMExample("c:1", [ImageRow(str(tmp_path / "0.png"), None, "c:1")],
                       [user, {"role": "assistant", "content": "a two"}])  # fmt: skip
    ids, labels = C.encode_vlm(vlm, row, 512)[:2]
    images = sum(t in vlm.image_ids for t in ids)
    config = AyaVisionConfig()
    config.text_config.max_position_embeddings = images
    cfg = SimpleNamespace(data=SimpleNamespace(max_length=512, max_target_length=8))
    with pytest.raises(ConfigError, match=rf"which has {images}; a row's {images} image tokens alone fill them: give "
                       "smaller images$") as err:  # fmt: skip
        check_caption(cfg, SimpleNamespace(train=C.VLMDataset([row], [(ids, labels)], vlm), eval=None),
                      SimpleNamespace(config=config))  # fmt: skip
    assert "\n" not in str(err.value)


def test_idefics2_trains_two_steps_and_captions_through_the_cli(folders, tmp_path, capsys):
    """The stage end to end on Idefics2 (every row was refused): the report shows the row with the answer trained,
    LoRA on the language tower, and ``generate --image`` captions with the run."""
    import json

    from deltatune.cli import main

    root = folders["root"]
    rows = [{"image": str(root / f"{i}.png"), "text": c} for i, c in enumerate(CAPTIONS)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Path(__file__).resolve().parent.parent.parent / "recipes" / "llava-caption-lora.yaml"
    args = ["train", str(recipe), f"model.name_or_path={folders['idefics2']}", f"data.train={tmp_path / 'c.jsonl'}",
            f"output.dir={tmp_path / 'run'}", "model.dtype=float32", "train.max_steps=2", "train.report_to=[none]",
            "train.batch_size=2", "train.logging_steps=1", "train.save_steps=1000", "method.towers=[language]",
            "data.eval=", "train.eval_steps=null"]  # fmt: skip
    assert main(args) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Assistant:[[ a handwritten seven<end_of_utterance>\\n]]" in report
    assert "adapted layers per tower: language: 4" in report
    capsys.readouterr()
    argv = ["generate", "--adapter", str(tmp_path / "run"), "--image", str(root / "0.png"), "--max-new-tokens", "3"]
    assert main(argv) == 0 and capsys.readouterr().out.strip()
