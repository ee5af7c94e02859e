"""Fixes to the whole-number labels as run_glue's sorted classes and datasets' image dicts (review of 718ab0b /
db2c3b6): an old run's recorded classes on --resume, whole-number class names read back from run.yaml, negative
labels, a conversation's {bytes, path} image."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import save_tiny, tokenizer

from deltatune.data.load import DataError, Row
from deltatune.data.tasks import class_names, class_of, encode_cls, label_map
from deltatune.train.config import build

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))

GOOD = ["a fine film", "great acting and a warm story", "I loved it", "wonderful, funny and kind", "nice", "so good"]
BAD = ["a dull film", "boring and far too long", "I hated it", "flat, grim and cold", "bad", "awful"]


def _rows(values: list) -> list[Row]:
    return [Row({"t": f"w{i}", "y": v}, f"d.jsonl:{i + 1}") for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("bert14") / "m"), "bert", "seq_cls")


def _cls_recipe(bert: str, tmp_path, out: str, label: list, labels: list[str] | None = None, **train) -> dict:
    rows = [{"text": t, "label": label[1]} for t in GOOD] + [{"text": t, "label": label[0]} for t in BAD]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": str(tmp_path / "t.jsonl"), "eval": str(tmp_path / "t.jsonl"), "max_length": 16}
    return {"stage": "cls", "model": {"name_or_path": bert},
            "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
            "data": data if labels is None else {**data, "labels": labels},
            "train": {"batch_size": 4, "max_steps": 4, "save_steps": 2, "report_to": ["none"], "lr": 1e-2,
                      "seed": 0, **train},
            "output": {"dir": str(tmp_path / out)}}  # fmt: skip


def test_resume_of_a_run_with_labels_1_2_recorded_as_three_classes_keeps_its_classes(bert, tmp_path):
    """A run on labels {1, 2} trained before 718ab0b had three classes (an empty class 0) and its run.yaml records
    data.labels ['0', '1', '2']; --resume with the same recipe (no data.labels) derived two classes and refused
    the checkpoint as 'made for a different base model'. The recorded classes are taken: the resumed run ends as
    the uninterrupted one did."""
    from deltatune.train.run import train
    from deltatune.train.runfolder import take_derived

    old = ["0", "1", "2"]  # what the old code derived from {1, 2}, recorded in run.yaml
    whole = train(build(_cls_recipe(bert, tmp_path, "whole", [1, 2], old)))
    train(build(_cls_recipe(bert, tmp_path, "cut", [1, 2], old)))
    cut = tmp_path / "cut"
    os.remove(cut / "metrics.json")  # stopped after checkpoint-2, as an interrupted run is
    shutil.rmtree(cut / "checkpoint-4")
    os.remove(cut / "adapter_model.safetensors")
    # the new code, the recipe as it was (no data.labels): --resume takes the three recorded classes
    cfg = build(_cls_recipe(bert, tmp_path, "cut", [1, 2]))
    assert take_derived(cfg, str(cut)) == ["data.labels"] and cfg.data.labels == old  # (what run.py's --resume does)
    resumed = train(build(_cls_recipe(bert, tmp_path, "cut", [1, 2])), resume=True)
    assert resumed["train_steps"] == 4
    a, b = (
        load_file(str(tmp_path / "whole" / "adapter_model.safetensors")),
        load_file(str(cut / "adapter_model.safetensors")),
    )
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert next(v for k, v in b.items() if k.endswith("classifier.weight")).shape[0] == 3
    assert resumed["eval_accuracy"] == pytest.approx(whole["eval_accuracy"])
    # the checkpoint's three-row head in a two-class model: the class count is named, not the base model
    from transformers import AutoModelForSequenceClassification

    import deltatune as dt

    two = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    with pytest.raises(Exception) as err:
        dt.DeltaModel.from_pretrained(two, str(cut / "checkpoint-2"))
    assert "classifier.weight has 3 rows (one per class) in the file but 2 in this model: the class count " in str(
        err.value
    )
    assert "different base model" not in str(err.value) and "data.labels" in str(err.value)
    # a recipe that names its labels keeps them; a DERIVED key not recorded is left unset
    cfg = build(_cls_recipe(bert, tmp_path, "cut", [1, 2], ["1", "2", "3"]))
    assert take_derived(cfg, str(cut)) == [] and cfg.data.labels == ["1", "2", "3"]


def test_a_run_on_float_labels_evaluates_with_the_names_it_recorded(bert, tmp_path):
    """A run trained on labels 1.0 / 2.0 records data.labels ['1', '2']; `deltatune eval` of it read 2.0 as 'not in
    the label set ['1', '2']'. Classes named by whole numbers take 1, 1.0, "1" and "1.0" alike."""
    from deltatune.train.evaluation import evaluate
    from deltatune.train.run import train

    trained = train(build(_cls_recipe(bert, tmp_path, "fl", [1.0, 2.0], max_steps=2)))
    with open(tmp_path / "fl" / "run.yaml", encoding="utf-8") as fh:
        assert "- '1'\n  - '2'\n" in fh.read()
    again = evaluate(str(tmp_path / "fl"))
    assert again["eval_accuracy"] == pytest.approx(trained["eval_accuracy"])
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-5)
    # the same through label_map: every spelling of a whole number names its class
    rows = _rows([1.0, 2.0, "1", "2.0", 1, 2])
    names = class_names(label_map(rows, "y", None), None)
    assert names == ["1", "2"]
    reread = label_map(rows, "y", names)
    assert [class_of(r.get("y"), reread) for r in rows] == [0, 1, 0, 1, 0, 1]
    ids = [e["labels"] for e in encode_cls(rows, tokenizer(), "t", "y", reread, 16).examples]
    assert ids == [0, 1, 0, 1, 0, 1]
    # a bool is a name, not the number 1 (True == 1 in a dict): {0, 1, True} stays three classes when re-read
    rows = _rows([0, 1, True])
    names = class_names(label_map(rows, "y", None), None)
    assert [class_of(r.get("y"), label_map(rows, "y", names)) for r in rows] == [0, 1, 2]


def test_negative_whole_number_labels_are_sorted_classes_as_run_glue_sorts_them():
    """-1 / 1 was refused ('class ids start at 0'); run_glue sorts [-1, 1] into the classes 0 and 1."""
    values = [-1, 1, 1, -1, 1]
    ref = {v: i for i, v in enumerate(sorted(set(values)))}  # run_glue's label_list.sort(); label_to_id
    tok = tokenizer()
    for cast in (int, float, str):
        rows = _rows([cast(v) for v in values])
        mapping = label_map(rows, "y", None)
        assert class_names(mapping, None) == ["-1", "1"]
        assert [e["labels"] for e in encode_cls(rows, tok, "t", "y", mapping, 16).examples] == [ref[v] for v in values]
        reread = label_map(rows, "y", ["-1", "1"])
        assert [class_of(r.get("y"), reread) for r in rows] == [ref[v] for v in values]
    # data.labels that do not name -1: one line
    rows = _rows([0, 1, -1])
    with pytest.raises(DataError) as err:
        encode_cls(rows, tok, "t", "y", label_map(rows, "y", ["neg", "pos"]), 16)
    assert str(err.value).startswith("d.jsonl:3: label -1 in column 'y' is not in the label set")


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from tiny_vlm import save_vlm

    out = tmp_path_factory.mktemp("llava_fix14")
    save_vlm(out / "llava", "llava")
    (out / "0.png").write_bytes(_png(3))
    return out


def test_a_conversations_image_column_reads_datasets_bytes_path_dicts(llava):
    """Beside a conversation, data.image_column refused datasets' {bytes, path} dicts (caption rows and image_cls read
    them), printing the whole base64 blob and suggesting an 'images' column."""
    from deltatune.data.images import open_rgb
    from deltatune.train import caption as C

    png = _png(5)
    messages = [{"role": "user", "content": "<image>what digit?"}, {"role": "assistant", "content": "five"}]
    values = [{"bytes": base64.b64encode(png).decode(), "path": None}, {"bytes": None, "path": "0.png"}, "0.png",
              {"bytes": base64.b64encode(png).decode(), "path": "https://example.org/5.png"}]  # fmt: skip
    path = llava / "dicts.jsonl"
    path.write_text("".join(json.dumps({"image": v, "messages": messages}) + "\n" for v in values))
    cfg = build({"stage": "caption", "model": {"name_or_path": str(llava / "llava")}, "data": {"train": str(path)}})
    examples = C.vlm_examples(str(path), cfg)
    assert [len(ex.images) for ex in examples] == [1, 1, 1, 1]
    assert examples[3].images[0].data == png  # (its bytes read: the URL it came from is not fetched, review N)
    examples = examples[:3]
    assert examples[0].images[0].data == png
    assert np.array_equal(np.asarray(open_rgb(examples[0].images[0])[0]), np.asarray(Image.open(io.BytesIO(png))))
    assert [ex.images[0].path for ex in examples[1:]] == [str(llava / "0.png")] * 2
    assert torch.equal(
        torch.as_tensor(np.asarray(open_rgb(examples[1].images[0])[0])),
        torch.as_tensor(np.asarray(open_rgb(examples[2].images[0])[0])),
    )
    # a bad value: one line naming its type, no blob
    path.write_text(json.dumps({"image": {"bytes": 12345 * "A", "path": None, "x": 1}, "messages": messages}) + "\n")
    with pytest.raises(DataError) as err:
        C.vlm_examples(str(path), cfg)
    assert str(err.value) == (f"{path}:1: column 'image' must be an image path or datasets' {{'bytes', 'path'}} "
                              "image, got dict")  # fmt: skip
