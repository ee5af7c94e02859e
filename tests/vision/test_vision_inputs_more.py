"""Vision inputs and captioners at their edges: the text decoder's positions (ViT + GPT-2, BLIP, BLIP-2) checked in one
line before a run or a caption, a VisionEncoderDecoder without a start token, a captioner without a processor file,
32-bit and float grey images, EXIF orientation, nested class folders, one-channel ViTs, and `deltatune eval` leaving a
run's confusion matrix alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.data import digits
from deltatune.data.images import ImageDataset, ImageRow, open_rgb, read_image_rows
from deltatune.train import checks
from deltatune.train.models import load_image_processor, load_model, load_processor

ROOT = Path(__file__).resolve().parent.parent.parent
FAST = ["train.max_steps=2", "train.report_to=[none]", "train.batch_size=2", "train.logging_steps=1"]
POSITIONS = 32  # digits.init_captioner's GPT-2 decoder: n_positions=32


def _one_line_error(capsys, fragment: str) -> str:
    """The one error line (after any weight-loading progress bar), no traceback."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("deltatune "), err
    assert fragment in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("captions")
    digits.init_captioner(str(out / "model"), hidden=32, layers=1)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(out / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": f"a handwritten {digits.WORDS[5 + i]}, thin strokes"})
    (out / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    long = [{**rows[0], "text": " ".join(["a handwritten seven, thin strokes"] * 10)}, *rows[1:]]
    (out / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    return out


def _caption_args(data: Path, run: Path, *extra: str, model: str | None = None) -> list[str]:
    return ["train", str(ROOT / "recipes" / "digits-caption.yaml"), f"model.name_or_path={model or data / 'model'}",
            f"data.train={data / 'c.jsonl'}", f"output.dir={run}", "data.eval=null", *FAST, *extra]  # fmt: skip


def _greedy_to(model, n: int, **inputs) -> int:
    """How long the model's own generate runs when made to give exactly ``n`` new tokens (IndexError past the end);
    BLIP sets its own end and pad tokens."""
    stop = (
        {} if "input_ids" in inputs and "attention_mask" not in inputs else {"eos_token_id": None, "pad_token_id": 0}
    )
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **stop).shape[1]


# -- 1. the text decoder's positions --------------------------------------------------------------------------------


def test_the_limit_is_where_gpt2s_own_generate_fails(captions):
    """ViT + GPT-2 (32 positions) generates from its start token: 32 new tokens read positions 0..31, 33 fail."""
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(captions / "model").eval()
    assert checks.decoder_positions(model) == model.config.decoder.n_positions == POSITIONS
    pixels = torch.randn(1, 3, 16, 16)
    assert _greedy_to(model, POSITIONS, pixel_values=pixels) == POSITIONS + 1  # the start token and 32 new ones
    checks.check_generation(model, 1, POSITIONS, "--max-new-tokens")
    with pytest.raises(IndexError):
        _greedy_to(model, POSITIONS + 1, pixel_values=pixels)
    with pytest.raises(ConfigError, match=r"^--max-new-tokens 33: .* reads 33 positions .* which has 32; set "
                       r"--max-new-tokens to 32 or less$"):  # fmt: skip
        checks.check_generation(model, 1, POSITIONS + 1, "--max-new-tokens")


def test_eval_captions_past_the_positions_are_refused_before_the_run_folder(captions, tmp_path, capsys):
    run = tmp_path / "run"
    args = [f"data.eval={captions / 'c.jsonl'}"]
    assert main(_caption_args(captions, run, *args, "data.max_target_length=33")) == 2
    _one_line_error(capsys, "data.max_target_length=33: a caption of 33 new tokens after a prompt of 1 reads 33 "
                    "positions of the text decoder, which has 32; set data.max_target_length to 32 or less")  # fmt: skip
    assert not run.exists()
    assert main(_caption_args(captions, run, *args, f"data.max_target_length={POSITIONS}")) == 0  # the limit itself
    assert "eval_bleu" in json.loads((run / "metrics.json").read_text())


def test_a_training_caption_past_the_positions_is_refused(captions, tmp_path, capsys):
    """The 60-token caption cut to data.max_target_length=64 stays 60 tokens + EOS: 61 positions of 32."""
    run = tmp_path / "run"
    assert (
        main(_caption_args(captions, run, f"data.train={captions / 'long.jsonl'}", "data.max_target_length=64")) == 2
    )
    _one_line_error(capsys, "data.max_target_length=64: the longest train row reads 61 positions of the text "
                    "decoder, which has 32; set data.max_target_length to 32 or less")  # fmt: skip
    assert not run.exists()
    # cut to the limit, it trains (the caption cut to 31 tokens + EOS)
    assert (
        main(_caption_args(captions, run, f"data.train={captions / 'long.jsonl'}", "data.max_target_length=32")) == 0
    )


def test_generate_image_past_the_positions_is_one_line(captions, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_caption_args(captions, run)) == 0
    image = str(captions / "0.png")
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run), "--image", image, "--max-new-tokens", str(POSITIONS)]) == 0
    assert "error" not in capsys.readouterr().err
    assert main(["generate", "--adapter", str(run), "--image", image, "--max-new-tokens", "40"]) == 2
    _one_line_error(capsys, "--max-new-tokens 40: a caption of 40 new tokens after a prompt of 1 reads 40 positions "
                    "of the text decoder, which has 32; set --max-new-tokens to 32 or less")  # fmt: skip


def test_blip_positions_match_its_own_generate_and_its_run_is_refused(captions, tmp_path, capsys):
    """BLIP's text decoder (64 positions) reads its BOS (and a prompt's tokens) before the new ones."""
    from tiny_vlm import save_blip
    from transformers import AutoModelForImageTextToText

    from deltatune.train.caption import caption

    path = save_blip(tmp_path / "blip")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path, "caption")
    positions = checks.decoder_positions(model)
    assert positions == model.config.text_config.max_position_embeddings == 64
    pixels = torch.randn(1, 3, 16, 16)
    prompt = [{"role": "user", "content": "a photo of"}]
    start = checks.prompt_length(processor, [], prompt)
    assert start == 1 + len(processor.tokenizer("a photo of", add_special_tokens=False)["input_ids"]) == 4
    ids = torch.tensor([[processor.bos, *processor.tokenizer("a photo of", add_special_tokens=False)["input_ids"],
                         processor.eos]])  # fmt: skip
    assert _greedy_to(model, positions - start + 1, pixel_values=pixels, input_ids=ids) == positions + 1
    with pytest.raises(IndexError):
        _greedy_to(model, positions - start + 2, pixel_values=pixels, input_ids=ids)
    with pytest.raises(ConfigError, match="^--max-new-tokens 62: .* after a prompt of 4 reads 65 positions .* which "
                       "has 64; set --max-new-tokens to 61 or less$"):  # fmt: skip
        caption(model, processor, str(captions / "0.png"), max_new_tokens=62, prompt="a photo of")
    assert caption(model, processor, str(captions / "0.png"), max_new_tokens=61, prompt="a photo of") is not None

    rows = [{"image": str(captions / f"{i}.png"), "text": f"a handwritten {digits.WORDS[5 + i]} thin strokes"}
            for i in range(4)]  # fmt: skip
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = [f"data.train={tmp_path / 'b.jsonl'}", f"data.eval={tmp_path / 'b.jsonl'}", "method.name=lora"]
    assert main(_caption_args(captions, tmp_path / "run", *data, "data.max_target_length=128", model=path)) == 2
    _one_line_error(capsys, "data.max_target_length=128: a caption of 128 new tokens after a prompt of 1 reads 128 "
                    "positions of the text decoder, which has 64; set data.max_target_length to 64 or less")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_blip2_eval_prompt_and_positions(captions, tmp_path, capsys):
    """BLIP-2 (OPT, 64 positions): the eval's prompt is its 4 query tokens and the rendered question; the limit is
    where OPT's own generate fails, and a run asking past it is refused before its folder is made."""
    from tiny_vlm import save_vlm
    from transformers import AutoModelForImageTextToText

    from deltatune.train.caption import CAPTION_PROMPT

    path = save_vlm(tmp_path / "blip2", "blip-2")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path, "caption")
    positions = checks.decoder_positions(model)
    assert positions == model.config.text_config.max_position_embeddings == 64
    image = open_rgb(ImageRow(str(captions / "0.png"), None, "0.png"))[0]
    messages = [{"role": "user", "content": f"<image>\n{CAPTION_PROMPT}"}]
    prompt = checks.prompt_length(processor, [image], messages)
    from deltatune.train.caption import render_vlm

    text, _, special = render_vlm(processor, messages, add_generation_prompt=True)
    enc = processor.processor(text=[text], images=[image], add_special_tokens=special, return_tensors="pt")
    assert prompt == enc["input_ids"].shape[1] and prompt > 4
    assert _greedy_to(model, positions - prompt + 1, **enc) == positions + 1
    with pytest.raises(IndexError):
        _greedy_to(model, positions - prompt + 2, **enc)

    rows = [{"image": str(captions / f"{i}.png"), "text": f"a handwritten {digits.WORDS[5 + i]} thin strokes"}
            for i in range(4)]  # fmt: skip
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = [f"data.train={tmp_path / 'b.jsonl'}", f"data.eval={tmp_path / 'b.jsonl'}", "method.name=lora"]
    too_many = positions - prompt + 2
    assert (
        main(_caption_args(captions, tmp_path / "run", *data, f"data.max_target_length={too_many}", model=path)) == 2
    )
    _one_line_error(capsys, f"data.max_target_length={too_many}: a caption of {too_many} new tokens after a prompt of "
                    f"{prompt} reads {positions + 1} positions of the text decoder, which has 64; set "
                    f"data.max_target_length to {positions - prompt + 1} or less")  # fmt: skip
    assert not (tmp_path / "run").exists()


# -- 2, 3. VisionEncoderDecoder folders as transformers' docs make them ---------------------------------------------


def _ved_from_configs(path: Path, captions: Path) -> None:
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    tok = AutoTokenizer.from_pretrained(captions / "model")
    enc = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=16,
                    patch_size=4)  # fmt: skip
    dec = GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, is_decoder=True, add_cross_attention=True)  # fmt: skip
    model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    assert getattr(model.config, "decoder_start_token_id", None) is None
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_a_start_token_is_filled_from_the_tokenizer(captions, tmp_path, capsys):
    path = tmp_path / "ved"
    _ved_from_configs(path, captions)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = load_model(str(path), "IMAGE_TO_TEXT")
    assert model.config.decoder_start_token_id == tok.bos_token_id == model.generation_config.decoder_start_token_id
    assert model.config.pad_token_id == tok.pad_token_id == 0  # the digits tokenizer's <pad>
    run = tmp_path / "run"
    assert main(_caption_args(captions, run, model=str(path))) == 0
    assert json.loads((run / "metrics.json").read_text())["train_steps"] == 2
    capsys.readouterr()
    assert main(["generate", "--adapter", str(run), "--image", str(captions / "0.png"), "--max-new-tokens", "4"]) == 0


def test_a_captioner_without_a_processor_file_gets_its_encoders_image_size(captions, tmp_path):
    path = tmp_path / "ved"
    _ved_from_configs(path, captions)  # saved without preprocessor_config.json
    assert not (path / "preprocessor_config.json").exists()
    size = load_image_processor(str(path)).size
    assert (size["height"], size["width"]) == (16, 16)
    assert main(_caption_args(captions, tmp_path / "run", model=str(path))) == 0


# -- 4, 5. image modes and orientation ------------------------------------------------------------------------------


def _grey(path: Path) -> np.ndarray:
    rgb = np.asarray(open_rgb(ImageRow(str(path), None, path.name))[0])
    assert (rgb == rgb[..., :1]).all()  # grey: R = G = B
    return rgb[..., 0].astype(int)


def test_32_bit_and_float_grey_images_keep_their_values(tmp_path):
    ramp = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    as_16_bit = np.round(ramp / 257).astype(int)  # the I;16 rule
    (tmp_path / "g16.pgm").write_bytes(b"P5\n8 8\n65535\n" + ramp.astype(">u2").tobytes())  # opens as mode I
    Image.fromarray(ramp.astype(np.int32), mode="I").save(tmp_path / "g32.tif")
    Image.fromarray((ramp / 65535.0).astype(np.float32), mode="F").save(tmp_path / "f01.tif")
    wide = np.linspace(-2.0, 6.0, 64, dtype=np.float32).reshape(8, 8)  # outside 0..1: its own range
    Image.fromarray(wide, mode="F").save(tmp_path / "fwide.tif")
    big = (np.arange(64).reshape(8, 8) * 100_000).astype(np.int32)  # past 16 bits: its own range
    Image.fromarray(big, mode="I").save(tmp_path / "g32big.tif")
    for name in ("g16.pgm", "g32.tif", "f01.tif"):
        with Image.open(tmp_path / name) as im:
            assert im.mode in ("I", "F")
        assert np.array_equal(_grey(tmp_path / name), as_16_bit), name
    assert np.array_equal(_grey(tmp_path / "fwide.tif"), np.round((wide.astype(np.float64) + 2) * 255 / 8))
    assert np.array_equal(_grey(tmp_path / "g32big.tif"), np.round(big / big.max() * 255))
    narrow = (np.arange(64).reshape(8, 8) * 4).astype(np.int32)  # 8-bit values stored wide: as they are (not / 257)
    Image.fromarray(narrow, mode="I").save(tmp_path / "g32narrow.tif")
    assert np.array_equal(_grey(tmp_path / "g32narrow.tif"), narrow)


def test_exif_orientation_is_applied_as_transformers_load_image_does(tmp_path):
    from transformers.image_utils import load_image

    stored = np.zeros((24, 16, 3), dtype=np.uint8)
    stored[:, :8] = 255  # stored 16 wide, 24 tall; left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    ours = open_rgb(ImageRow(str(tmp_path / "photo.jpg"), None, "photo.jpg"))[0]
    theirs = load_image(str(tmp_path / "photo.jpg")).convert("RGB")
    assert ours.size == theirs.size == (24, 16)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert np.asarray(ours)[:8].mean() > 200 and np.asarray(ours)[8:].mean() < 50  # the white half is on top


# -- 7. folders and channels ----------------------------------------------------------------------------------------


def _classes(root: Path, nested: dict[str, tuple[int, int]]) -> None:
    rng = np.random.default_rng(1)
    for cls, (flat, deep) in nested.items():
        (root / cls / "batch1").mkdir(parents=True)
        (root / cls / ".hidden").mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / cls / ".hidden" / "skip.png")
        for i in range(flat):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / cls / f"{i}.png")
        for i in range(deep):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / cls / "batch1" / f"{i}.png")


def test_images_in_nested_class_folders_are_read_as_torchvision_reads_them(tmp_path):
    _classes(tmp_path / "train", {"cat": (2, 5), "dog": (3, 4)})
    rows = read_image_rows(str(tmp_path / "train"))
    assert [(r.label, os.path.relpath(r.path, tmp_path / "train")) for r in rows] == [
        *[("cat", f"cat/{i}.png") for i in range(2)], *[("cat", f"cat/batch1/{i}.png") for i in range(5)],
        *[("dog", f"dog/{i}.png") for i in range(3)], *[("dog", f"dog/batch1/{i}.png") for i in range(4)],
    ]  # fmt: skip


@pytest.fixture()
def folders(tmp_path) -> Path:
    _classes(tmp_path / "train", {"cat": (3, 0), "dog": (3, 0)})
    _classes(tmp_path / "other", {"cat": (2, 0), "dog": (0, 1)})
    return tmp_path


def _cls_args(folders: Path, model: Path, *extra: str) -> list[str]:
    return ["train", str(ROOT / "recipes" / "digits-adapt-lora.yaml"), f"model.name_or_path={model}",
            f"data.train={folders / 'train'}", f"output.dir={folders / 'run'}", "data.eval=null", *FAST, *extra]  # fmt: skip


def test_a_one_channel_vit_reads_grey_images(folders, capsys):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=8,
                       patch_size=4, num_channels=1, num_labels=2)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folders / "vit1")
    assert main(_cls_args(folders, folders / "vit1")) == 0
    assert json.loads((folders / "run" / "metrics.json").read_text())["train_steps"] == 2
    # the grey value v goes in as ViT's processor normalises it: (v / 255 - 0.5) / 0.5, one channel
    row = read_image_rows(str(folders / "train"))[0]
    grey = np.asarray(Image.open(row.path).convert("L"), dtype=np.float64)
    item = ImageDataset([row], [0], load_image_processor(str(folders / "vit1")), channels=1)[0]["pixel_values"]
    assert item.shape == (1, 8, 8)
    assert np.allclose(item[0].numpy(), (grey / 255 - 0.5) / 0.5, atol=1e-6)


def test_a_four_channel_model_is_refused_in_one_line(folders, capsys):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=8,
                       patch_size=4, num_channels=4, num_labels=2)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folders / "vit4")
    assert main(_cls_args(folders, folders / "vit4")) == 2
    _one_line_error(capsys, "reads 4-channel images (its config's num_channels); stage image_cls feeds RGB")


# -- 6. deltatune eval leaves the run's confusion matrix ------------------------------------------------------------


def test_eval_on_other_data_leaves_the_runs_confusion_matrix(folders, capsys):
    digits.init_vit(str(folders / "vit"), hidden=32, layers=1, image_size=8)
    assert main(_cls_args(folders, folders / "vit", f"data.eval={folders / 'train'}")) == 0
    run = folders / "run"
    matrix = json.loads((run / "confusion_matrix.json").read_text())
    assert sum(map(sum, matrix["matrix"])) == 6 and matrix["labels"] == ["cat", "dog"]  # the run's 6 eval images
    before = {name: (run / name).read_bytes() for name in ("confusion_matrix.json", "confusion_matrix.png")}
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--data", str(folders / "other")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_accuracy"] in (0, 1 / 3, 2 / 3, 1)
    assert {name: (run / name).read_bytes() for name in before} == before
