"""Vision probe 13: the image classification and image-to-text stages against transformers' example script
``run_image_classification.py`` and TRL's ``DataCollatorForVisionLanguageModeling``.

Probed and found equal (nothing to fix): the eval pixels are the script's Resize + CenterCrop + Normalize on a ViT
processor's size, mean and std; with ``data.augment: [random_resized_crop, hflip]`` the train pixels are the
script's RandomResizedCrop + RandomHorizontalFlip on the same seed (torchvision's draws, written out here as its
``get_params`` and ``RandomHorizontalFlip.forward`` draw them: torchvision is not installed), at deltatune's
documented crop area 0.5-1 (the script's default is 0.08-1); the classes of an image folder are datasets'
``imagefolder`` labels; grey, palette, RGBA and CMYK images (from files) are the processor's ``convert_to_rgb``;
a LLaVA caption batch is TRL's vision collator's (prompt-completion, ``completion_only_loss``): the same pixels,
the image tokens and the prompt -100, the caption trained; deltatune adds the BOS the processor adds by default and
trains an EOS after the caption, which TRL's collator leaves out (``add_special_tokens=False``, and llava-1.5's
template closes no answer), so a model tuned there never learns to stop. Missing or unreadable images of a caption
row are one line naming file:line.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))
from tiny_vlm import save_vlm  # noqa: E402

from deltatune.data import images as I  # noqa: E402
from deltatune.data.load import DataError  # noqa: E402
from deltatune.train import caption as C  # noqa: E402
from deltatune.train.config import build  # noqa: E402
from deltatune.train.image_cls import _ids, class_names  # noqa: E402
from deltatune.train.models import load_processor  # noqa: E402

MODES = ["L", "P", "RGBA", "CMYK"]


def _save(path: Path, mode: str, size: tuple[int, int] = (12, 9), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    img = img if mode == "RGBA" else img.convert("RGB").convert(mode)
    img.save(path)
    return path


def _script_normalise(img, proc) -> torch.Tensor:
    """torchvision's ToTensor + Normalize(image_mean, image_std)."""
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(proc.image_mean).view(3, 1, 1), torch.tensor(proc.image_std).view(3, 1, 1)
    return (t - mean) / std


def _script_train(img, size: int, scale: tuple[float, float]) -> Image.Image:
    """torchvision's RandomResizedCrop(size, scale) (get_params, then crop and a bilinear resize) and
    RandomHorizontalFlip(), as run_image_classification.py's train transforms draw them."""
    width, height = img.size
    area, log_ratio = height * width, torch.log(torch.tensor((3 / 4, 4 / 3)))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w, h = int(round(math.sqrt(target_area * aspect_ratio))), int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            break
    else:
        raise AssertionError("the test image is drawn to fit in ten tries")
    img = img.crop((j, i, j + w, i + h)).resize((size, size), Image.BILINEAR)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else img


def test_eval_and_seeded_train_pixels_are_the_scripts_transforms(tmp_path):
    from transformers import ViTImageProcessorPil

    proc = ViTImageProcessorPil(size={"height": 16, "width": 16})
    rows = [I.ImageRow(str(_save(tmp_path / f"{k}.png", "RGB", (40, 30), k)), 0, f"{k}.png") for k in range(3)]
    # eval: Resize((16, 16)) + CenterCrop((16, 16)) (a no-op at that size) + Normalize
    plain = I.ImageDataset(rows, [0, 0, 0], proc)
    for k, row in enumerate(rows):
        with Image.open(row.path) as img:
            ref = _script_normalise(img.convert("RGB").resize((16, 16), Image.BILINEAR), proc)
        assert (plain[k]["pixel_values"] - ref).abs().max() < 1e-6
    # train, same seed: the script's crop and flip at deltatune's crop area (0.5, 1)
    aug = I.ImageDataset(rows, [0, 0, 0], proc, ["random_resized_crop", "hflip"])
    torch.manual_seed(7)
    ours = [aug[k]["pixel_values"] for k in range(3) for _ in range(4)]
    torch.manual_seed(7)
    refs = []
    for row in rows:
        with Image.open(row.path) as img:
            refs += [_script_normalise(_script_train(img.convert("RGB"), 16, (0.5, 1.0)), proc) for _ in range(4)]
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, refs))
    assert diff < 1e-6, diff
    assert len({tuple(a.flatten()[:8].tolist()) for a in ours}) > 1  # the draws differ from call to call


def test_folder_classes_are_datasets_imagefolder_labels(tmp_path):
    datasets = pytest.importorskip("datasets")
    for c, n in [("zebra", 2), ("ant", 3), ("cat", 2)]:
        (tmp_path / "data" / c).mkdir(parents=True)
        for k in range(n):
            _save(tmp_path / "data" / c / f"{k}.png", "RGB", (8, 8), k)
    root = str(tmp_path / "data")
    ds = datasets.load_dataset("imagefolder", data_dir=root, split="train")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    ref = sorted((os.path.relpath(e["image"]["path"], root), e["label"]) for e in ds)
    rows = I.read_image_rows(root)
    names, mapping = class_names(rows, None, True)
    assert names == ds.features["label"].names == ["ant", "cat", "zebra"]
    assert sorted(zip([os.path.relpath(r.path, root) for r in rows], _ids(rows, mapping, "label"))) == ref


@pytest.mark.parametrize("mode", MODES)
def test_image_modes_from_files_are_the_processors_conversion(mode, tmp_path):
    from transformers import CLIPImageProcessorPil
    from transformers.image_transforms import convert_to_rgb

    proc = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    path = _save(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"), mode)
    rgb, stored = I.open_rgb(I.ImageRow(str(path), 0, "x"))
    with Image.open(path) as img:
        assert stored == img.mode == mode
        assert np.array_equal(np.asarray(rgb), np.asarray(convert_to_rgb(img)))
        ref = proc(img, return_tensors="pt")["pixel_values"][0]  # the processor converts itself (do_convert_rgb)
    assert torch.equal(I.ImageDataset([I.ImageRow(str(path), 0, "x")], [0], proc)[0]["pixel_values"], ref)


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llava13")
    save_vlm(out / "llava", "llava")
    rows = []
    for k, (mode, caption) in enumerate(
        zip(MODES, ["a handwritten five", "six thick strokes", "seven", "a handwritten eight"])
    ):
        name = f"{k}.jpg" if mode == "CMYK" else f"{k}.png"
        _save(out / name, mode, (10, 8), k)
        rows.append({"image": name, "text": caption})
    (out / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_a_llava_caption_batch_is_trls_vision_collator_plus_bos_and_a_trained_eos(llava):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    proc = load_processor(str(llava / "llava"), "caption")
    cfg = build({"stage": "caption", "model": {"name_or_path": str(llava / "llava")},
                 "data": {"train": str(llava / "c.jsonl")}})  # fmt: skip
    prepared = C.prepare_caption(cfg, proc)
    ours = prepared.collator([prepared.train[k] for k in range(len(MODES))])
    rows = [json.loads(line) for line in (llava / "c.jsonl").read_text().splitlines()]
    examples = []
    for r in rows:
        with Image.open(llava / r["image"]) as img:
            img.load()
            prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": C.CAPTION_PROMPT}]}]
            completion = [{"role": "assistant", "content": [{"type": "text", "text": r["text"]}]}]
            examples.append({"images": [img.copy()], "prompt": prompt, "completion": completion})
    ref = DataCollatorForVisionLanguageModeling(proc.processor, completion_only_loss=True)(examples)
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    tok = proc.tokenizer
    image = tok.convert_tokens_to_ids("<image>")
    for b in range(len(rows)):
        ids = ours["input_ids"][b][ours["attention_mask"][b] == 1].tolist()
        labels = ours["labels"][b][ours["attention_mask"][b] == 1].tolist()
        ref_ids = ref["input_ids"][b][ref["attention_mask"][b] == 1].tolist()
        ref_labels = ref["labels"][b][ref["attention_mask"][b] == 1].tolist()
        assert ids == [tok.bos_token_id, *ref_ids, tok.eos_token_id]
        assert labels == [-100, *ref_labels, tok.eos_token_id]
        assert ids.count(image) == 16 and all(lab == -100 for t, lab in zip(ids, labels) if t == image)
        assert tok.decode([t for t in labels if t != -100]).replace("</s>", "").strip() == rows[b]["text"]
    # the padding (right, -100) is TRL's too: flush_left leaves the prompt's left padding at the right
    assert not ours["attention_mask"][:, 0].eq(0).any() and ours["labels"][ours["attention_mask"] == 0].eq(-100).all()


def test_a_missing_or_unreadable_caption_image_is_one_line_naming_file_and_line(llava, tmp_path):
    proc = load_processor(str(llava / "llava"), "caption")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "ok.png").write_bytes((llava / "0.png").read_bytes())
    cases = {
        "m.jsonl": ([{"image": "ok.png", "text": "x"}, {"image": "nope.png", "text": "y"}], "m.jsonl:2: image", "does not exist"),
        "b.jsonl": ([{"messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "yo"}],
                      "images": ["bad.png"]}], "b.jsonl:1: cannot read image", "not an image format"),
    }  # fmt: skip
    for name, (rows, where, why) in cases.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = build({"stage": "caption", "model": {"name_or_path": str(llava / "llava")},
                     "data": {"train": str(tmp_path / name)}})  # fmt: skip
        with pytest.raises(DataError) as err:
            C.prepare_caption(cfg, proc)
        assert where in str(err.value) and why in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("shape", ["prompt_completion", "messages"])
def test_one_image_in_an_image_column_beside_a_conversation_is_trls_batch(shape, llava, tmp_path):
    """TRL's vision collator reads a row's ``image`` (one image) as its ``images``; such a row (messages or
    prompt + completion, no caption column) was read as an image + caption row and refused: "column 'text' is
    missing"."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    proc = load_processor(str(llava / "llava"), "caption")
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit is it ?"}]}]
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "five"}]}]
    turns = (
        {"prompt": prompt, "completion": completion}
        if shape == "prompt_completion"
        else {"messages": prompt + completion}
    )
    (tmp_path / "0.png").write_bytes((llava / "1.png").read_bytes())
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": "0.png", **turns}) + "\n")
    cfg = build({"stage": "caption", "model": {"name_or_path": str(llava / "llava")},
                 "data": {"train": str(tmp_path / "r.jsonl")}})  # fmt: skip
    prepared = C.prepare_caption(cfg, proc)
    ours = prepared.collator([prepared.train[0]])
    with Image.open(tmp_path / "0.png") as img:
        img.load()
        example = {"image": img.copy(), "prompt": prompt, "completion": completion}
    ref = DataCollatorForVisionLanguageModeling(proc.processor, completion_only_loss=True)([example])
    tok = proc.tokenizer
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    assert ours["input_ids"][0].tolist() == [tok.bos_token_id, *ref["input_ids"][0].tolist(), tok.eos_token_id]
    assert ours["labels"][0].tolist() == [-100, *ref["labels"][0].tolist(), tok.eos_token_id]
    assert tok.convert_ids_to_tokens([t for t in ours["labels"][0].tolist() if t != -100]) == ["five", "</s>"]


def test_a_conversation_with_both_an_image_column_and_images_is_one_line(llava, tmp_path):
    """A conversation row holding both ``image`` (data.image_column) and ``images`` was refused as a caption row
    missing its 'text' column; now one line names both columns (review 13H)."""
    messages = [{"role": "user", "content": "<image>what digit is it ?"}, {"role": "assistant", "content": "five"}]
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": "0.png", "images": ["0.png"], "messages": messages}) + "\n")
    cfg = build({"stage": "caption", "model": {"name_or_path": str(llava / "llava")},
                 "data": {"train": str(tmp_path / "r.jsonl")}})  # fmt: skip
    with pytest.raises(DataError) as info:
        C.vlm_examples(str(tmp_path / "r.jsonl"), cfg)
    assert str(info.value) == (f"{tmp_path / 'r.jsonl'}:1: both 'image' (data.image_column) and 'images' hold the "
                               "images of a conversation; give one")  # fmt: skip
