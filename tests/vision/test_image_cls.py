"""Stage image_cls: the digits writer, every vision recipe for two steps, metrics, augmentation and bad input.

The digits are written once per session (scikit-learn's bundled set, small shots); the models are tiny ViTs
(hidden 32, 2 layers, 16x16 images) built from configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.data import images as I
from deltatune.data.load import DataError
from deltatune.train import image_cls as C

ROOT = Path(__file__).resolve().parent.parent.parent
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if yaml.safe_load(p.read_text())["stage"] == "image_cls")
FAST = ["train.max_steps=2", "train.report_to=[none]", "train.batch_size=4", "data.limit=20", "train.logging_steps=1"]

sklearn = pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from deltatune.data import digits

    out = tmp_path_factory.mktemp("digits")
    digits.write(str(out), seed=0, shots=6)
    digits.init_vit(str(out / "vit-init"), hidden=32, layers=2)
    return out


def test_digits_split_is_recorded_and_disjoint(digits):
    split = json.loads((digits / "split.json").read_text())
    idx = split["indices"]
    assert split["seed"] == 0 and set(idx) == {"pretrain/train", "pretrain/test", "adapt/train", "adapt/test"}
    assert sorted(idx["pretrain/train"]) == ["0", "1", "2", "3", "4"]
    assert sorted(idx["adapt/test"]) == ["5", "6", "7", "8", "9"]
    assert all(len(v) == 6 for v in idx["adapt/train"].values())
    every = [i for part in idx.values() for ids in part.values() for i in ids]
    assert len(every) == len(set(every)), "a digit is in two splits"
    # 1,797 digits: all of 0-4 and the test share of 5-9 are written; each file is the digit it says
    from sklearn.datasets import load_digits

    d = load_digits()
    i = idx["adapt/train"]["7"][0]
    img = np.asarray(Image.open(digits / "adapt" / "train" / "7" / f"{i:04d}.png"))
    assert d.target[i] == 7 and np.array_equal(img, np.round(d.images[i] * 255 / 16).astype(np.uint8))
    caption = json.loads((digits / "captions.jsonl").read_text().splitlines()[0])
    assert caption["text"].startswith("a handwritten five, ")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_vision_recipe_runs_two_steps(path, digits, tmp_path, capsys):
    """Each image_cls recipe as is, with the data and model paths pointed at the session's digits."""
    recipe = yaml.safe_load(path.read_text())
    data = {k: str(digits / Path(v).relative_to("data/digits")) for k, v in recipe["data"].items()}
    overrides = [f"model.name_or_path={digits / 'vit-init'}", f"output.dir={tmp_path / 'run'}", *FAST]
    overrides += [f"data.{k}={v}" for k, v in data.items()]
    assert main(["train", str(path), *overrides]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2 and 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_macro_f1" in metrics
    run = tmp_path / "run"
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] is None
    from safetensors.torch import load_file

    keys = load_file(run / "adapter_model.safetensors")
    assert any(".classifier." in k for k in keys), "the head was not saved with the adapter"
    report = (run / "report.md").read_text()
    assert "converted to RGB" in report and "![confusion matrix](confusion_matrix.png)" in report
    matrix = json.loads((run / "confusion_matrix.json").read_text())
    assert np.asarray(matrix["matrix"]).sum() == 20  # data.limit=20 eval images, each counted once
    assert (run / "confusion_matrix.png").stat().st_size > 0


def test_merge_then_reload_as_plain_model(digits, tmp_path, capsys):
    """The pre-training story: a full run evaluates again to the same figures and, merged, is a plain transformers
    image classifier with the run's labels."""
    from transformers import AutoModelForImageClassification

    run = tmp_path / "run"
    args = [f"model.name_or_path={digits / 'vit-init'}", f"output.dir={run}", *FAST]
    args += [f"data.train={digits / 'pretrain' / 'train'}", f"data.eval={digits / 'pretrain' / 'test'}"]
    assert main(["train", str(ROOT / "recipes" / "digits-vit-pretrain.yaml"), *args]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # deltatune eval reloads the run (base + saved weights + head + processor) to the same figures
    assert main(["eval", "--adapter", str(run)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("eval_accuracy", "eval_macro_f1", "eval_loss"):
        assert again[key] == pytest.approx(trained[key], abs=1e-6)
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    merged = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {i: str(i) for i in range(5)}
    assert (tmp_path / "merged" / "preprocessor_config.json").is_file()
    assert main(["generate", "--adapter", str(run), "--prompt", "hi"]) == 2  # refused before a model loads
    assert f"'{run}' is an image classifier (stage image_cls), which does not generate text" in capsys.readouterr().err


def test_eval_compare_rebuilds_an_image_runs_start(digits, tmp_path, capsys):
    """--compare on an image run: its start (the base, a 3-class head drawn from the recipe's seed in place of the
    base's 5-class one, LoRA at identity) scores what the run's own evaluation before its first step scored."""
    import shutil

    for split in ("train", "test"):  # digits 5, 6 and 7 only: the base's head does not fit, a new one is drawn
        for label in ("5", "6", "7"):
            shutil.copytree(digits / "adapt" / split / label, tmp_path / split / label)
    run = tmp_path / "run"
    args = [f"model.name_or_path={digits / 'vit-init'}", f"output.dir={run}", *FAST, "train.eval_on_start=true"]
    args += [f"data.train={tmp_path / 'train'}", f"data.eval={tmp_path / 'test'}"]
    assert main(["train", str(ROOT / "recipes" / "digits-adapt-lora.yaml"), *args]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    start = json.loads((run / "log_history.jsonl").read_text().splitlines()[0])
    assert start["step"] == 0
    assert main(["eval", "--adapter", str(run), "--compare"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads(printed[-1])
    for key in ("eval_loss", "eval_accuracy", "eval_macro_f1"):
        assert metrics[f"{key}_before"] == pytest.approx(start[key], abs=1e-6), key
        assert metrics[key] == pytest.approx(trained[key], abs=1e-6), key
    assert printed[-2].startswith(f"eval_accuracy: {start['eval_accuracy']:.4f} before training -> ")


# -- metrics ---------------------------------------------------------------------------------------------------------
def test_macro_f1_and_confusion_against_sklearn():
    from sklearn.metrics import confusion_matrix, f1_score

    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 50), rng.integers(0, 5, 50)  # class 4 only ever predicted
    m = C.confusion(preds, labels, 5)
    assert np.array_equal(m, confusion_matrix(labels, preds, labels=range(5)))
    assert C.macro_f1(m) == pytest.approx(f1_score(labels, preds, average="macro"), abs=1e-12)
    # hand-worked: 2 classes, [[3, 1], [0, 2]]: F1_0 = 6 / 7, F1_1 = 4 / 5
    assert C.macro_f1(np.array([[3, 1], [0, 2]])) == pytest.approx((6 / 7 + 4 / 5) / 2)


# -- augmentation ----------------------------------------------------------------------------------------------------
def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 8)) -> Path:
    arr = np.arange(size[0] * size[1] * 3, dtype=np.uint8).reshape(size[1], size[0], 3)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def test_images_convert_to_rgb_as_the_models_own_processor_does(tmp_path):
    """Transparency went on the hidden colour (black here) where transformers' processors put it on white, and a
    16-bit grey PNG was clipped to white (98% of the pixels)."""
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[2:6, 2:6] = (255, 0, 0, 255)  # a red square on transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    row = I.ImageRow(str(tmp_path / "rgba.png"), 0, "rgba.png")
    rgb, mode = I.open_rgb(row)
    assert mode == "RGBA" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((3, 3)) == (255, 0, 0)
    with Image.open(tmp_path / "rgba.png") as img:
        torch.testing.assert_close(I.pixel_values(proc, [rgb])[0], proc(img, return_tensors="pt")["pixel_values"][0])
    assert I.open_rgb(row, on_white=False)[0].getpixel((0, 0)) == (0, 0, 0)  # t2i: as diffusers' scripts read it
    ramp = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # mode I;16
    grey, mode = I.open_rgb(I.ImageRow(str(tmp_path / "deep.png"), 0, "deep.png"))
    assert mode.startswith("I;16")
    assert [grey.getpixel((x, 0))[0] for x in range(4)] == [round(v / 257) for v in ramp[0, :4]] == [0, 1, 2, 3]


def test_augmentation_off_by_default_and_seeded(tmp_path):
    from transformers import ViTImageProcessorPil

    proc = ViTImageProcessorPil(size={"height": 16, "width": 16})
    row = I.ImageRow(str(_image(tmp_path / "a.png")), 0, "a.png")
    plain = I.ImageDataset([row], [0], proc)[0]["pixel_values"]
    rgb, mode = I.open_rgb(row)
    assert mode == "RGB" and torch.equal(plain, I.pixel_values(proc, [rgb])[0])
    aug = I.ImageDataset([row], [0], proc, ["random_resized_crop", "hflip"])
    torch.manual_seed(3)
    first = aug[0]["pixel_values"]
    torch.manual_seed(3)
    assert torch.equal(aug[0]["pixel_values"], first)
    torch.manual_seed(0)
    crops = [I.random_resized_crop(rgb).size for _ in range(20)]
    assert all(0 < w <= 12 and 0 < h <= 8 for w, h in crops) and len(set(crops)) > 1
    assert all(w * h >= 0.5 * 96 * 0.8 for w, h in crops)  # area in [0.5, 1] of the image, up to rounding


# -- bad input -------------------------------------------------------------------------------------------------------
def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_corrupt_image_names_file_line_and_path(tmp_path):
    _image(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "ok.png", "label": "a"}, {"image": "bad.png", "label": "b"}])
    rows = I.read_image_rows(str(data))
    with pytest.raises(DataError) as err:
        I.check(rows)
    msg = str(err.value)
    assert msg.startswith(f"{data}:2: cannot read image ") and "bad.png" in msg and "\n" not in msg


def test_an_image_too_large_for_pil_is_one_line(tmp_path, monkeypatch):
    """PIL refuses images over twice its MAX_IMAGE_PIXELS (about 179 megapixels) as possible decompression bombs with
    an error that is no OSError: it was a traceback. The limit is lowered here so a small image crosses it."""
    from PIL import Image

    _image(tmp_path / "big.png", size=(12, 8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 96 pixels > 2 x 40
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "big.png", "label": "a"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: cannot read image .*big\.png' \(.*96 pixels.*\)$"):
        I.check(I.read_image_rows(str(data)))


def test_missing_image_and_row_without_image(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "nowhere.png", "label": "a"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: image .*nowhere\.png' does not exist"):
        I.check(I.read_image_rows(str(data)))
    data = _jsonl(tmp_path / "c.jsonl", [{"text": "a handwritten one", "image": ""}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: caption row has no image \(column 'image'"):
        I.read_image_rows(str(data), label_column=None, text_column="text")


def test_path_outside_the_data_folder(tmp_path):
    (tmp_path / "data").mkdir()
    _image(tmp_path / "secret.png")
    data = _jsonl(tmp_path / "data" / "d.jsonl", [{"image": "../secret.png", "label": 0}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: image path '\.\./secret\.png' leads outside the data folder"):
        I.read_image_rows(str(data))
    rows = I.read_image_rows(str(data), allow_outside=True)
    assert Path(rows[0].path).resolve() == (tmp_path / "secret.png").resolve()


def test_grayscale_is_converted_and_counted(tmp_path):
    rows = [I.ImageRow(str(_image(tmp_path / f"{m}.png", m)), 0, f"{m}.png") for m in ("L", "RGB", "P", "L")]
    assert I.check(rows) == {"L": 2, "P": 1}
    assert I.open_rgb(rows[0])[0].mode == "RGB"


def _cfg(tmp_path, **data):
    from deltatune.train.config import build

    return build({"stage": "image_cls", "method": {"name": "lora"}, "data": data, "output": {"dir": str(tmp_path)}})


def test_one_class_folder_and_unknown_augmentation(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    _image(tmp_path / "imgs" / "cat" / "1.png")
    with pytest.raises(
        DataError, match=r"imgs: only one class \('cat'\); .* at least two \(one sub-folder per class\)"
    ):
        C.prepare_image_cls(_cfg(tmp_path, train=str(tmp_path / "imgs")), None)
    (tmp_path / "imgs" / "dog").mkdir()
    _image(tmp_path / "imgs" / "dog" / "1.png")
    with pytest.raises(ConfigError, match="data.augment: unknown augmentation 'blur'"):
        C.prepare_image_cls(_cfg(tmp_path, train=str(tmp_path / "imgs"), augment=["blur"]), None)


def test_a_class_folder_without_images_is_refused(tmp_path):
    """imgs/c held only a text file: the head silently had 2 classes, not 3 (torchvision's ImageFolder refuses)."""
    for name in ("a", "b", "c"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
    _image(tmp_path / "imgs" / "a" / "1.png")
    _image(tmp_path / "imgs" / "b" / "1.png")
    (tmp_path / "imgs" / "c" / "notes.txt").write_text("no image here")
    with pytest.raises(DataError, match=r"imgs': class folder\(s\) 'c' hold no images \(.*\); add images or remove"):
        C.prepare_image_cls(_cfg(tmp_path, train=str(tmp_path / "imgs")), None)
    _image(tmp_path / "imgs" / "c" / "1.png")
    assert C.prepare_image_cls(_cfg(tmp_path, train=str(tmp_path / "imgs")), None).labels == ["a", "b", "c"]

    # macOS's AppleDouble files ("._1.png" beside each image, made when copying to some disks) are hidden files,
    # skipped as hidden class folders are; they were opened as images and refused ("not an image format")
    (tmp_path / "imgs" / "b" / "._1.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00")
    prepared = C.prepare_image_cls(_cfg(tmp_path, train=str(tmp_path / "imgs")), None)
    assert [Path(r.path).name for r in prepared.train.rows] == ["1.png"] * 3


def test_eval_label_outside_training_classes(tmp_path):
    _image(tmp_path / "x.png")
    train = _jsonl(tmp_path / "t.jsonl", [{"image": "x.png", "label": "a"}, {"image": "x.png", "label": "b"}])
    ev = _jsonl(tmp_path / "e.jsonl", [{"image": "x.png", "label": "c"}])
    with pytest.raises(
        DataError, match=r"e\.jsonl:1: label 'c' \(column 'label'\) is not one of the training classes"
    ):
        C.prepare_image_cls(_cfg(tmp_path, train=str(train), eval=str(ev)), None)


def test_image_labels_are_read_as_text_classification_reads_them(tmp_path):
    """Whole floats (pandas' 2.0) are numbers, sorted into classes, and agree with an eval file in ints and text; a NaN
    label is refused by its row."""
    _image(tmp_path / "x.png")
    train = _jsonl(tmp_path / "t.jsonl", [{"image": "x.png", "label": 0.0}, {"image": "x.png", "label": 2.0}])
    ev = _jsonl(tmp_path / "e.jsonl", [{"image": "x.png", "label": 0}, {"image": "x.png", "label": "2"}])
    prepared = C.prepare_image_cls(_cfg(tmp_path, train=str(train), eval=str(ev)), None)
    assert prepared.labels == ["0", "2"]
    assert prepared.train.labels == [0, 1] and prepared.eval.labels == [0, 1]
    bad = _jsonl(tmp_path / "n.jsonl", [{"image": "x.png", "label": 1}, {"image": "x.png", "label": float("nan")}])
    with pytest.raises(DataError, match=r"n\.jsonl:2: label in column 'label' is NaN"):
        C.prepare_image_cls(_cfg(tmp_path, train=str(bad)), None)


def test_num_labels_other_than_the_classes_is_refused(digits, tmp_path, capsys):
    """model.num_labels is the data's classes: 3 for 5 digit folders is refused in one line before a model loads
    (it was ignored: the head had 5 outputs)."""
    run = tmp_path / "run"
    args = [f"model.name_or_path={digits / 'vit-init'}", f"output.dir={run}", *FAST, "model.num_labels=3"]
    args += [f"data.train={digits / 'adapt' / 'train'}", f"data.eval={digits / 'adapt' / 'test'}"]
    assert main(["train", str(ROOT / "recipes" / "digits-adapt-lora.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.num_labels is 3 but the data has 5 classes (5, 6, 7, 8, 9)" in err and "\n" not in err
    assert not run.exists()


def test_bad_image_fails_the_cli_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    _image(tmp_path / "ok.png")
    data = _jsonl(tmp_path / "d.jsonl", [{"image": "ok.png", "label": 0}, {"image": "bad.png", "label": 1}])
    from tiny import tiny_model

    tiny_model("vit").save_pretrained(tmp_path / "vit")
    capsys.readouterr()
    code = main(["train", str(ROOT / "recipes" / "digits-adapt-lora.yaml"), f"model.name_or_path={tmp_path / 'vit'}",
                 f"data.train={data}", "data.eval=null", f"output.dir={tmp_path / 'run'}", *FAST])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "d.jsonl:2: cannot read image" in err[0] and "Traceback" not in err[0]


def test_the_step_loss_is_the_models_own_loss(digits, tmp_path):
    """The first logged loss of a run that sees its 10 images in one step (a learning rate too small to matter) is
    the ViT's own loss on them: the cross-entropy over the step's rows (TokenLossTrainer), which makes an epoch's
    uneven last step weigh every row alike, is the model's loss for one batch."""
    from deltatune.train.config import build
    from deltatune.train.run import load_adapter_model

    recipe = yaml.safe_load((ROOT / "recipes" / "digits-adapt-lora.yaml").read_text())
    recipe["model"]["name_or_path"] = str(digits / "vit-init")
    recipe["data"] = {"train": str(digits / "adapt" / "train"), "limit": 10, "augment": []}
    recipe["train"] = {"batch_size": 10, "max_steps": 1, "lr": 1e-12, "logging_steps": 1, "report_to": ["none"]}
    recipe["output"] = {"dir": str(tmp_path / "run")}
    assert main(["train", str(_write(tmp_path / "r.yaml", recipe))]) == 0
    lines = (tmp_path / "run" / "log_history.jsonl").read_text().splitlines()
    logged = [h["loss"] for h in map(json.loads, lines) if "loss" in h]
    delta, processor = load_adapter_model(str(tmp_path / "run"))
    prepared = C.prepare_image_cls(build({**recipe, "output": {"dir": str(tmp_path / "other")}}), processor)
    batch = prepared.collator([prepared.train[i] for i in range(len(prepared.train))])
    with torch.no_grad():
        own = delta.eval()(**batch).loss.item()
    assert len(prepared.train) == 10 and logged[0] == pytest.approx(own, rel=1e-5)


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path
