"""Probe 17 of the cls / tag / image_cls / caption stages against transformers 5.25's example scripts (run_glue /
run_classification, run_ner, run_image_classification), seqeval and scikit-learn.

Probed and found equal (nothing to fix): entity precision / recall / F1 are seqeval's default mode on random IOB1,
IOB2 and IOBES sequences (stray I- and E- tags included) and per type its ``classification_report``; single-label
F1 is sklearn's binary F1 (two classes) or macro F1; multi-label micro / macro F1 and subset accuracy are sklearn's
on indicator matrices; Pearson and Spearman (ties) are scipy's. Bad cls / tag rows (a label column missing or null,
an unknown eval label or tag, a regression label that is no number, tokens and tags of unequal length) are one line
naming file:line.
"""

from __future__ import annotations

import json

import pytest
from tiny import tokenizer

from deltatune.data.load import DataError
from deltatune.train.config import build


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("labels", [["O", "B-per", "I-per"], None])
def test_a_boolean_tag_is_one_line_naming_the_row(tmp_path, labels):
    """A tag ``true`` among tag ids: Python's True == 1 made it tag 1 (B-per) silently with data.labels (and "integer
    tag ids" without); datasets cannot read such a column at all (arrow: "changed from number to boolean")."""
    from deltatune.train.tag import prepare_tag

    ok = {"tokens": ["a", "b"], "ner_tags": [0, 1] if labels else ["O", "B-per"]}
    bad = {"tokens": ["a", "b"], "ner_tags": [0, True] if labels else ["O", True]}
    data = {"train": _jsonl(tmp_path / "t.jsonl", [ok]), "eval": _jsonl(tmp_path / "e.jsonl", [ok, bad])}
    cfg = build({"stage": "tag", "data": {**data, **({"labels": labels} if labels else {})}})
    with pytest.raises(DataError) as err:
        prepare_tag(cfg, tokenizer())
    assert str(err.value) == (
        f"{tmp_path / 'e.jsonl'}:2: tag true in column 'ner_tags' is a boolean; write the tag's name (B-per, O, ...) "
        "or, with data.labels, its id"
    )
    if labels:  # the same ids as numbers train as given
        cfg = build({"stage": "tag", "data": {"train": data["train"], "labels": labels}})
        assert [ex["labels"] for ex in prepare_tag(cfg, tokenizer()).train][0][1:-1] == [0, 1]


def _image_rows(tmp_path, n: int = 2) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    return _jsonl(tmp_path / "d.jsonl", [{"image": f"{i}.png", "label": "ab"[i % 2]} for i in range(n)])


def _grey_processor(mean):
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": 8, "width": 8}, image_mean=mean, image_std=[0.25] * len(mean))


def test_a_grey_models_processor_of_one_mean_reads_the_grey_image_itself(tmp_path):
    """A grey ViT (num_channels 1) whose processor was saved for grey images (image_mean [0.5]): the stage fed it the
    grey image as RGB, which it refuses ("mean must have 3 elements") from the Trainer's first batch; now its pixels
    are the processor's own for the grey image, ((v / 255) - 0.5) / 0.25 of the resized grey."""
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig

    from deltatune.train.image_cls import prepare_image_cls

    data = _image_rows(tmp_path)
    ViTConfig(num_channels=1, image_size=8, patch_size=4).save_pretrained(tmp_path / "grey-vit")
    cfg = build({"stage": "image_cls", "model": {"name_or_path": str(tmp_path / "grey-vit")}, "data": {"train": data}})
    proc = _grey_processor([0.5])
    p = prepare_image_cls(cfg, proc)
    grey = Image.open(tmp_path / "0.png").convert("L")
    want = proc(images=[grey], return_tensors="pt")["pixel_values"][0]
    got = p.train[0]["pixel_values"]
    assert got.shape == (1, 8, 8) and np.allclose(got.numpy(), want.numpy())
    hand = (np.asarray(grey.resize((8, 8), Image.BILINEAR), dtype=np.float64) / 255 - 0.5) / 0.25
    assert np.allclose(got[0].numpy(), hand, atol=1e-5)
    # a processor of three means reads the grey as RGB, its first channel (as before)
    rgb = prepare_image_cls(cfg, _grey_processor([0.5, 0.4, 0.3])).train[0]["pixel_values"]
    assert rgb.shape == (1, 8, 8) and np.allclose(rgb.numpy(), want.numpy(), atol=1e-5)


def test_an_image_processor_that_refuses_the_images_is_one_line_before_training(tmp_path):
    """An RGB model (num_channels 3) with a processor of one mean: the ValueError came from inside transformers at
    the Trainer's first batch; it is one line at prepare, naming the row, and the dataset's random draws (augment)
    are untouched by the check."""
    import torch

    from deltatune.train.image_cls import prepare_image_cls

    data = _image_rows(tmp_path)
    cfg = build({"stage": "image_cls", "data": {"train": data, "augment": ["hflip"]}})
    with pytest.raises(DataError) as err:
        prepare_image_cls(cfg, _grey_processor([0.5]))
    assert str(err.value) == (
        f"{tmp_path / 'd.jsonl'}:1: the image processor (ViTImageProcessorPil) refuses image "
        f"'{tmp_path / '0.png'}' for a 3-channel model: mean must have 3 elements if it is an iterable, got 1"
    )
    assert "modules_to_save" not in cfg.method  # a refused call leaves the recipe as it was (it was set before)
    from transformers import ViTConfig

    from deltatune.config import ConfigError

    ViTConfig(num_channels=4).save_pretrained(tmp_path / "rgba-vit")
    four = build(
        {"stage": "image_cls", "model": {"name_or_path": str(tmp_path / "rgba-vit")}, "data": {"train": data}}
    )
    with pytest.raises(ConfigError, match=r"reads 4-channel images"):
        prepare_image_cls(four, _grey_processor([0.5, 0.5, 0.5]))
    assert "modules_to_save" not in four.method
    torch.manual_seed(3)
    p = prepare_image_cls(cfg, _grey_processor([0.5, 0.5, 0.5]))
    drawn = torch.rand(1).item()
    torch.manual_seed(3)
    assert drawn == torch.rand(1).item() and p.train[0]["pixel_values"].shape == (3, 8, 8)


def test_a_tower_named_twice_adapts_its_modules_once_each():
    """method.towers [language, language]: target_modules listed every language module twice (8 names for 4), written
    so into adapter_config.json, where PEFT's own config (a set) holds each once."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))
    from tiny_vlm import tiny_vlm

    import deltatune as dt
    from deltatune import towers as T

    model = tiny_vlm("llava")
    once = T.restrict(model, dt.LoraConfig(r=2), ["language"]).target_modules
    twice = T.restrict(model, dt.LoraConfig(r=2), ["language", "language"]).target_modules
    assert twice == once and len(once) == len(set(once)) == 4
    both = T.restrict(model, dt.LoraConfig(r=2), ["vision", "language", "vision"]).target_modules
    assert both == T.restrict(model, dt.LoraConfig(r=2), ["vision", "language"]).target_modules


def test_integer_tag_ids_without_their_names_name_the_row(tmp_path):
    """conll2003's ner_tags as datasets exports them (ClassLabel ids): the refusal named the column only, not the
    file and line, as the stage's other refusals do."""
    from deltatune.train.tag import prepare_tag

    rows = [{"tokens": ["a"], "ner_tags": ["O"]}, {"tokens": ["a", "b"], "ner_tags": ["O", "B-x"]}]
    data = {"train": _jsonl(tmp_path / "t.jsonl", rows), "eval": _jsonl(tmp_path / "e.jsonl", [rows[0], {
        "tokens": ["a", "b"], "ner_tags": [0, 3]}])}  # fmt: skip
    with pytest.raises(DataError) as err:
        prepare_tag(build({"stage": "tag", "data": data}), tokenizer())
    assert str(err.value) == (
        f"{tmp_path / 'e.jsonl'}:2: 'ner_tags' holds integer tag ids; set data.labels to their BIO names in id order "
        "(e.g. [O, B-person, I-person, ...]) so entities can be scored"
    )


def test_an_encoder_decoder_captioners_processor_that_refuses_the_images_is_one_line(tmp_path):
    """A ViT + GPT-2 captioner whose image processor holds one mean: the refusal came from inside transformers at the
    Trainer's first batch; now one line at prepare, naming the row. Its processor of three means prepares as before."""
    import numpy as np
    from PIL import Image

    from deltatune.data import digits
    from deltatune.train.caption import CaptionProcessor, prepare_caption

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(tmp_path / "0.png")
    data = _jsonl(tmp_path / "c.jsonl", [{"image": "0.png", "text": "a handwritten zero"}])
    cfg = build({"stage": "caption", "data": {"train": data}})
    tok = digits.caption_tokenizer()
    with pytest.raises(DataError) as err:
        prepare_caption(cfg, CaptionProcessor(_grey_processor([0.5]), tok))
    assert str(err.value) == (
        f"{tmp_path / 'c.jsonl'}:1: the image processor (ViTImageProcessorPil) refuses image "
        f"'{tmp_path / '0.png'}' for a 3-channel model: mean must have 3 elements if it is an iterable, got 1"
    )
    p = prepare_caption(cfg, CaptionProcessor(_grey_processor([0.5, 0.5, 0.5]), tok))
    assert p.train[0]["pixel_values"].shape == (3, 8, 8)


@pytest.mark.parametrize(("flag", "value"), [("--shots", "-1"), ("--shots", "0"), ("--seed", "-3")])
def test_digits_refuses_a_bad_shots_or_seed_in_one_line_writing_nothing(tmp_path, capsys, flag, value):
    """--shots -1 wrote all but one adaptation image per class (train[:-1]), --shots 0 empty class folders, and
    --seed -3 a numpy traceback after the folder was made."""
    from deltatune.data import digits

    with pytest.raises(SystemExit) as done:
        digits.main([str(tmp_path / "d"), flag, value])
    assert done.value.code == 2 and not (tmp_path / "d").exists()
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(f"error: {flag} must be >= {1 if flag == '--shots' else 0}, got {value}")
    )


def test_a_class_folder_outside_the_classes_is_named_as_a_folder(tmp_path):
    """An image folder's sub-folder that data.labels leaves out (or an eval folder's new class) was "label 'c'
    (column 'label')": a folder has no label column."""
    import numpy as np
    from PIL import Image

    from deltatune.train.image_cls import prepare_image_cls

    for split, names in (("train", "ab"), ("test", "abc")):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / split / name / "1.png")
    train, test = str(tmp_path / "train"), str(tmp_path / "test")
    with pytest.raises(DataError) as err:
        prepare_image_cls(build({"stage": "image_cls", "data": {"train": train, "eval": test}}), None)
    assert (
        str(err.value)
        == f"{tmp_path / 'test' / 'c' / '1.png'}: its class folder 'c' is not one of the training classes (a, b)"
    )
    (tmp_path / "train" / "c").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "train" / "c" / "1.png")
    with pytest.raises(DataError) as err:
        prepare_image_cls(build({"stage": "image_cls", "data": {"train": train, "labels": ["b", "a"]}}), None)
    assert (
        str(err.value)
        == f"{tmp_path / 'train' / 'c' / '1.png'}: its class folder 'c' is not one of the training classes (b, a)"
    )


def test_digits_refuses_to_add_a_new_split_to_an_old_one(tmp_path, capsys):
    """--shots 3 after --shots 5 into the same folder kept the two extra images per class of the first split in
    adapt/train (5 trained, not 3); the same settings again rewrite the same files."""
    from deltatune.data import digits

    out = tmp_path / "d"
    digits.write(str(out), shots=5)
    before = sorted(p.name for p in (out / "adapt" / "train" / "7").iterdir())
    digits.write(str(out), shots=5)  # the same split: the same files
    assert sorted(p.name for p in (out / "adapt" / "train" / "7").iterdir()) == before and len(before) == 5
    with pytest.raises(SystemExit):
        digits.main([str(out), "--shots", "3"])
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(
            f"error: {out} holds digits written with seed 0, test_fraction 0.2, shots 5; their images would stay "
            "beside the new ones: remove the folder or write to another"
        )
    )
    assert sorted(p.name for p in (out / "adapt" / "train" / "7").iterdir()) == before
    (out / "split.json").write_text('{"seed": 0, ')  # a damaged record: a traceback from json
    with pytest.raises(FileExistsError, match=r"split\.json is not the digits' record \(damaged\?\)"):
        digits.write(str(out), shots=5)
    (out / "split.json").unlink()  # a write that stopped before its record
    with pytest.raises(FileExistsError, match=r"holds pretrain/ or adapt/ but no split\.json"):
        digits.write(str(out), shots=5)


def test_an_empty_towers_list_is_refused_as_a_run_starts_and_an_old_runs_start_is_its_language_tower(tmp_path):
    """method.towers: [] adapted the language tower (the default) without a word: a run starting is refused
    (``check_new_run``, in checks.check_run: before the data and the model, not in towers.restrict after a 7B model
    loaded); a run.yaml from before still builds, and its start (eval --compare) is the language tower it trained."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))
    from tiny_vlm import save_vlm

    from deltatune import towers as T
    from deltatune.config import ConfigError
    from deltatune.train.run import start_model

    with pytest.raises(ConfigError) as err:
        T.check_new_run({"name": "lora", "towers": []})
    assert str(err.value) == (
        "method.towers is empty: name the towers to adapt (language, vision, projector), or leave it unset for "
        "[language]"
    )
    T.check_new_run({"name": "lora"}), T.check_new_run({"name": "lora", "towers": ["vision"]})  # (no refusal)
    model = save_vlm(tmp_path / "llava", "llava")

    def start(towers):
        method = {"name": "lora", "r": 2, **({} if towers is None else {"towers": towers})}
        cfg = build({"stage": "caption", "model": {"name_or_path": model, "dtype": "float32"}, "method": method})
        delta, notes = start_model(cfg, None)
        return sorted(n for n, p in delta.named_parameters() if p.requires_grad), notes

    old, notes = start([])
    assert notes == ["adapted layers per tower: language: 4"]  # LoRA's LLaMA defaults: q_proj, v_proj of 2 blocks
    assert len(old) == 8 and all(".language_model." in n for n in old)
    assert old == start(None)[0] == start(["language"])[0]


def test_an_unknown_tower_is_refused_with_the_recipe_before_any_data_or_model():
    """method.towers: [visoin] was refused by towers.restrict, after the data was read and the model loaded; it is
    refused as the recipe builds (no finished run named one: restrict refused it before training)."""
    from deltatune.config import ConfigError

    with pytest.raises(ConfigError) as err:
        build({"stage": "caption", "method": {"name": "lora", "towers": ["language", "visoin"]}})
    assert str(err.value) == "method.towers: unknown tower 'visoin'; choose from language, vision, projector"
    cfg = build({"stage": "caption", "method": {"name": "lora", "towers": ["vision", "projector"]}})
    assert cfg.method["towers"] == ["vision", "projector"]


def test_an_image_folders_refused_image_is_named_once(tmp_path):
    """For an image folder's row the source is the image path itself: the processor's refusal named it twice
    ("/x/a/0.png: ... refuses image '/x/a/0.png' ..."); a data file's row names its line and the image."""
    import numpy as np
    from PIL import Image

    from deltatune.train.image_cls import prepare_image_cls

    for name in "ab":
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(tmp_path / "train" / name / "0.png")
    cfg = build({"stage": "image_cls", "data": {"train": str(tmp_path / "train")}})
    with pytest.raises(DataError) as err:
        prepare_image_cls(cfg, _grey_processor([0.5]))
    assert str(err.value) == (
        f"{tmp_path / 'train' / 'a' / '0.png'}: the image processor (ViTImageProcessorPil) refuses it for a 3-channel "
        "model: mean must have 3 elements if it is an iterable, got 1"
    )


def test_a_refused_multi_label_cls_call_leaves_data_multi_label_unset(tmp_path):
    """A label column of lists set data.multi_label: true before the stage's refusals (a row naming a boolean, one
    class): the refused call left it set, and the same config, its data fixed, then trained single labels as
    multi-label."""
    from deltatune.train.cls import prepare_cls

    rows = [{"text": "a", "label": ["x"]}, {"text": "b", "label": ["x", True]}]
    cfg = build({"stage": "cls", "data": {"train": _jsonl(tmp_path / "t.jsonl", rows), "max_length": 16}})
    with pytest.raises(DataError, match=r"t\.jsonl:2: label true in column 'label' is a boolean"):
        prepare_cls(cfg, tokenizer())
    assert cfg.data.multi_label is None
    ok = [{"text": "a", "label": ["x"]}, {"text": "b", "label": ["x", "y"]}]
    cfg = build({"stage": "cls", "data": {"train": _jsonl(tmp_path / "ok.jsonl", ok), "max_length": 16}})
    p = prepare_cls(cfg, tokenizer())
    assert cfg.data.multi_label is True and [ex["labels"] for ex in p.train] == [[1.0, 0.0], [1.0, 1.0]]


def test_a_run_with_an_empty_towers_list_is_refused_before_its_data_and_model(tmp_path):
    """checks.check_run refuses method.towers: [] as a run starts: before the data is read and the model's config
    checked (without it: "model type 'bert' is not an image-to-text model"); the output folder is left unmade."""
    from deltatune.config import ConfigError
    from deltatune.train.run import train

    out = tmp_path / "run"
    recipe = {"stage": "caption", "method": {"name": "lora", "towers": []}, "output": {"dir": str(out)}}
    with pytest.raises(ConfigError, match=r"^method\.towers is empty: name the towers to adapt"):
        train(build({**recipe, "data": {"train": str(tmp_path / "missing.jsonl")}}))
    assert not out.exists()
