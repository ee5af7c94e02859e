"""Probe 14 of the cls / tag / seq2seq / image_cls / caption stages against transformers' example scripts
(run_glue / run_classification, run_ner, run_image_classification), datasets' train_test_split and Image feature,
LLaMA-Factory's val_size and TRL's vision collator."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import tokenizer

from deltatune.config import ConfigError
from deltatune.data.load import DataError, Row
from deltatune.data.tasks import class_names, class_of, encode_cls, encode_tag, label_map
from deltatune.train.config import build

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))


def _rows(*data: dict) -> list[Row]:
    return [Row(d, f"d.jsonl:{i + 1}") for i, d in enumerate(data)]


def _run_glue_label_to_id(values: list) -> dict:
    """run_glue's non-GLUE path: ``label_list = raw_datasets["train"].unique("label"); label_list.sort()``, then
    ``label_to_id = {v: i for i, v in enumerate(label_list)}``."""
    label_list = sorted(set(values))
    return {v: i for i, v in enumerate(label_list)}


@pytest.mark.parametrize("values", [[1, 2, 2, 1], [5, 1, 3, 5, 4], [0, 2, 10, 2], [3, 0, 1, 2]])
def test_whole_number_labels_are_run_glues_sorted_classes(values):
    """{1, 2} was three classes (ids as given, an empty class 0; the F1 then macro over three, not class 1's);
    run_glue / run_classification number the sorted distinct values. Ids 0..k-1 stay themselves."""
    ref = _run_glue_label_to_id(values)
    tok = tokenizer()
    for cast in (int, float, str):  # JSON ints, pandas' whole floats, CSV text: the same classes
        rows = _rows(*[{"t": f"w{i}", "y": cast(v)} for i, v in enumerate(values)])
        mapping = label_map(rows, "y", None)
        ids = [ex["labels"] for ex in encode_cls(rows, tok, "t", "y", mapping, 16).examples]
        assert ids == [ref[v] for v in values]
        assert class_names(mapping, None) == [str(v) for v in sorted(ref)]
    # a run re-read with the names it saved maps the values alike (run.yaml records data.labels)
    rows = _rows(*[{"y": v} for v in values])
    reread = label_map(rows, "y", class_names(label_map(rows, "y", None), None))
    assert [class_of(v, reread) for v in values] == [ref[v] for v in values]


def test_image_cls_file_labels_are_the_sorted_classes_and_an_unknown_eval_label_is_one_line():
    from deltatune.data.images import ImageRow
    from deltatune.train.image_cls import _ids
    from deltatune.train.image_cls import class_names as image_class_names

    rows = [ImageRow(f"{i}.png", v, f"d.jsonl:{i + 1}") for i, v in enumerate([2, 1, 2])]
    names, mapping = image_class_names(rows, None, False)
    assert names == ["1", "2"] and _ids(rows, mapping, "label") == [1, 0, 1]
    with pytest.raises(DataError) as err:
        _ids([ImageRow("e.png", 3, "e.jsonl:4")], mapping, "label")
    assert str(err.value) == "e.jsonl:4: label 3 (column 'label') is not one of the training classes"


def test_class_names_with_spaces_and_an_eval_label_not_in_train_is_one_line():
    tok = tokenizer()
    rows = _rows({"t": "a", "y": "very good"}, {"t": "b", "y": "bad"})
    mapping = label_map(rows, "y", None)
    assert class_names(mapping, None) == ["bad", "very good"]
    with pytest.raises(DataError) as err:
        encode_cls(_rows({"t": "c", "y": "good"}), tok, "t", "y", mapping, 16)
    assert str(err.value) == "d.jsonl:1: label 'good' in column 'y' is not in the label set ['bad', 'very good']"


@pytest.mark.parametrize(("val_size", "n"), [(0.15, 20), (0.15, 7), (0.5, 9), (3, 10), (0.9, 11)])
def test_val_size_holds_out_datasets_train_test_split(val_size, n):
    """LLaMA-Factory's ``dataset.train_test_split(test_size=val_size, seed=seed)`` (run_image_classification's
    train_val_split): the same rows on each side, in the same order."""
    datasets = pytest.importorskip("datasets")
    from deltatune.data.tasks import split_off

    ref = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=val_size, seed=1234)
    train, held = split_off(list(range(n)), val_size, 1234)
    assert train == ref["train"]["i"] and held == ref["test"]["i"]
    assert split_off([1, 2], 0.0, 1) == ([1, 2], None)


def test_val_size_refusals_are_one_line():
    from deltatune.data.tasks import split_off

    with pytest.raises(ConfigError, match=r"^data.val_size=0.2 splits a validation set off data.train, but data.eval"):
        split_off([1, 2, 3], 0.2, 0, has_eval=True)
    for bad in (1.5, -0.1, True):
        with pytest.raises(ConfigError, match=r"^data.val_size must be a fraction in \(0, 1\) or a count"):
            split_off([1, 2, 3], bad, 0)
    with pytest.raises(DataError, match=r"^data.val_size=0.9 holds out 2 of the 2 training rows"):
        split_off([1, 2], 0.9, 0)
    with pytest.raises(DataError, match=r"^data.val_size=1 holds out 1 of the 1 training rows"):
        split_off([1], 1, 0)


def test_cls_val_size_evaluates_on_the_held_out_rows(tmp_path):
    """data.val_size: the classes from the whole train file, the
    held-out rows as the eval set, the seed the recipe's train.seed."""
    from deltatune.data.tasks import split_off
    from deltatune.train.cls import prepare_cls

    labels = ["neg", "pos", "pos", "neg", "pos", "neg", "pos", "mid"]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": y}) + "\n" for i, y in enumerate(labels)))
    cfg = build(
        {"stage": "cls", "data": {"train": str(path), "max_length": 16, "val_size": 0.25}, "train": {"seed": 7}}
    )
    tok = tokenizer()
    p = prepare_cls(cfg, tok)
    train_idx, eval_idx = split_off(list(range(8)), 0.25, 7)
    names = ["mid", "neg", "pos"]
    assert p.labels == names
    assert [ex["labels"] for ex in p.train] == [names.index(labels[i]) for i in train_idx]
    assert [ex["labels"] for ex in p.eval] == [names.index(labels[i]) for i in eval_idx]
    assert [ex["input_ids"] for ex in p.eval] == [tok(f"row {i}")["input_ids"] for i in eval_idx]


def _png(seed: int, mode: str = "RGB", size: tuple[int, int] = (6, 5)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def test_an_image_column_of_datasets_image_dicts_is_read_as_datasets_decodes_it(tmp_path):
    """Parquet written by datasets from an ``Image`` column holds {"bytes", "path"}; it was refused ("must be an image
    path, got dict"). Bytes first, else the path; JSON's base64 text of the bytes too."""
    datasets = pytest.importorskip("datasets")
    from deltatune.data.images import open_rgb, read_image_rows

    pngs = [_png(0), _png(1, "L"), _png(2)]
    (tmp_path / "on_disk.png").write_bytes(pngs[2])
    ds = datasets.Dataset.from_dict({"image": [{"bytes": pngs[0], "path": None}, {"bytes": pngs[1], "path": "g.png"},
                                               {"bytes": None, "path": str(tmp_path / "on_disk.png")}],
                                     "label": ["a", "b", "a"]}).cast_column("image", datasets.Image())  # fmt: skip
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ref = datasets.Dataset.from_parquet(str(tmp_path / "d.parquet"))
    rows = read_image_rows(str(tmp_path / "d.parquet"))
    assert [r.label for r in rows] == ["a", "b", "a"]
    for row, want in zip(rows, ref):
        got, _ = open_rgb(row)
        assert np.array_equal(np.asarray(got), np.asarray(want["image"].convert("RGB")))
    # JSON: base64 text of the bytes; a relative path read from the data file's folder
    lines = [{"image": {"bytes": base64.b64encode(pngs[0]).decode(), "path": None}, "label": 0},
             {"image": {"bytes": None, "path": "on_disk.png"}, "label": 1}]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = read_image_rows(str(tmp_path / "d.jsonl"))
    assert np.array_equal(np.asarray(open_rgb(rows[0])[0]), np.asarray(Image.open(io.BytesIO(pngs[0]))))
    assert rows[1].path == str(tmp_path / "on_disk.png")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": {"bytes": "not base64!", "path": None}}) + "\n")
    with pytest.raises(DataError) as err:
        read_image_rows(str(tmp_path / "bad.jsonl"))
    assert str(err.value) == f"{tmp_path / 'bad.jsonl'}:1: column 'image': its 'bytes' text is not base64"


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    from tiny_vlm import save_vlm

    out = tmp_path_factory.mktemp("llava14")
    save_vlm(out / "llava", "llava")
    (out / "0.png").write_bytes(_png(3))
    return out


def test_a_conversation_with_a_text_column_is_the_conversation_as_trls_collator_reads_it(llava):
    """TRL's vision collator reads ``messages`` before a text column; a messages row with an image and a ``text``
    metadata column trained the caption prompt with the text as the answer."""
    from deltatune.train import caption as C

    messages = [{"role": "user", "content": "<image>what digit is it ?"}, {"role": "assistant", "content": "five"}]
    path = llava / "m.jsonl"
    path.write_text(json.dumps({"image": "0.png", "text": "metadata, not a caption", "messages": messages}) + "\n")
    cfg = build({"stage": "caption", "model": {"name_or_path": str(llava / "llava")}, "data": {"train": str(path)}})
    (example,) = C.vlm_examples(str(path), cfg)
    assert [m["content"] for m in example.messages] == [m["content"] for m in messages]
    assert [r.path for r in example.images] == [str(llava / "0.png")]


@pytest.mark.parametrize(
    ("value", "said"), [(["0.png", "0.png"], "a list of 2"), (None, "None"), ("", "''")], ids=["two", "none", "blank"]
)
def test_a_conversations_image_column_holds_one_image_named_as_data_image_column(llava, value, said):
    """The image column beside a conversation took a list of two (the docs say one image), and its errors called it
    the images column."""
    from deltatune.train import caption as C

    messages = [{"role": "user", "content": "what digit is it ?"}, {"role": "assistant", "content": "five"}]
    path = llava / "two.jsonl"
    path.write_text("".join(json.dumps({"image": v, "messages": messages}) + "\n" for v in ("0.png", value)))
    cfg = build({"stage": "caption", "model": {"name_or_path": str(llava / "llava")}, "data": {"train": str(path)}})
    with pytest.raises(DataError) as err:
        C.vlm_examples(str(path), cfg)
    assert str(err.value) == (f"{path}:2: column 'image' (data.image_column) holds one image path per conversation, "
                              f"got {said}; several images go in an 'images' column")  # fmt: skip


def test_iobes_label_all_tokens_is_run_ners_b_to_i_label():
    """Kept equal to run_ner: with label_all_tokens a later piece of a word takes b_to_i_label of its tag, which
    turns B-X into I-X only; S-/E- repeat per piece (an entity scorer counts more of them), as run_ner's do."""
    tok = tokenizer()
    label_list = ["B-LOC", "E-LOC", "I-LOC", "O", "S-PER"]
    label_to_id = {v: i for i, v in enumerate(label_list)}
    b_to_i_label = [label_list.index(x.replace("B-", "I-")) if x.startswith("B-") and x.replace("B-", "I-")
                    in label_list else i for i, x in enumerate(label_list)]  # fmt: skip
    words = ["Zwischenahner", "Meer", "Ottokar", "liest"]
    tags = ["B-LOC", "E-LOC", "S-PER", "O"]
    enc = tok(words, is_split_into_words=True)
    ref, previous = [], None
    for w in enc.word_ids():  # run_ner's tokenize_and_align_labels, label_all_tokens=True
        if w is None:
            ref.append(-100)
        elif w != previous:
            ref.append(label_to_id[tags[w]])
        else:
            ref.append(b_to_i_label[label_to_id[tags[w]]])
        previous = w
    assert len(ref) > len(words) + 2  # some word is cut into pieces
    ours = encode_tag(_rows({"w": words, "t": tags}), tok, "w", "t", label_to_id, 64, label_all_tokens=True)
    assert ours.examples[0]["labels"] == ref


def test_image_cls_val_size_holds_out_train_images_and_keeps_every_class(tmp_path):
    """run_image_classification's train_val_split (LLaMA-Factory's val_size): no eval file, a seeded share of the
    train images evaluates; the classes come from all of them (a class whose images all land in the held-out part is
    still a class)."""
    from deltatune.data.tasks import split_off
    from deltatune.train.image_cls import prepare_image_cls

    labels = ["cat", "dog", "cat", "dog", "cat", "dog", "cat", "emu"]
    for i in range(len(labels)):
        (tmp_path / f"{i}.png").write_bytes(_png(i, "L" if i % 2 else "RGB", (5 + i, 4)))
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}.png", "label": y}) + "\n" for i, y in enumerate(labels)))
    cfg = build({"stage": "image_cls", "method": {"name": "lora"}, "data": {"train": str(path), "val_size": 2},
                 "train": {"seed": 3}, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    p = prepare_image_cls(cfg, None)
    train_idx, eval_idx = split_off(list(range(8)), 2, 3)
    assert p.labels == ["cat", "dog", "emu"]
    assert [r.path for r in p.eval.rows] == [str(tmp_path / f"{i}.png") for i in eval_idx]
    assert p.train.labels == [p.labels.index(labels[i]) for i in train_idx]
    assert p.eval.labels == [p.labels.index(labels[i]) for i in eval_idx]
    assert "data.val_size: 2 of the train file's images held out for evaluation" in p.notes


def test_seq2seq_val_size_generates_on_the_held_out_rows(tmp_path):
    """The seq2seq stage's eval (loss, and ROUGE-L / BLEU of generations from ``eval_rows``) reads the held-out rows."""
    from deltatune.data.tasks import split_off
    from deltatune.train.seq2seq import prepare_seq2seq

    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"source": f"src {i}", "target": f"tgt {i}"}) + "\n" for i in range(6)))
    cfg = build({"stage": "seq2seq", "data": {"train": str(path), "val_size": 0.3}, "train": {"seed": 11}})
    tok = tokenizer()
    p = prepare_seq2seq(cfg, tok)
    train_idx, eval_idx = split_off(list(range(6)), 0.3, 11)
    assert len(eval_idx) == 2  # ceil(0.3 * 6), as datasets counts the test rows
    assert [r.get("target") for r in p.eval_rows] == [f"tgt {i}" for i in eval_idx]
    assert [ex["labels"] for ex in p.eval] == [tok(text_target=f"tgt {i}")["input_ids"] for i in eval_idx]
    assert [ex["input_ids"] for ex in p.train] == [tok(f"src {i}")["input_ids"] for i in train_idx]


def test_val_size_is_a_recipe_key_that_stands_for_data_eval_and_that_other_stages_ignore():
    """A recipe's data.val_size schedules evaluations as data.eval does (train.eval_steps without either is refused);
    a stage that does not hold rows out names the key as ignored."""
    from deltatune.train.config import ignored_keys

    data = {"train": "t.jsonl", "val_size": 3}
    cfg = build({"stage": "tag", "data": data, "train": {"eval_steps": 2}})
    assert cfg.data.val_size == 3 and ignored_keys(cfg) == []
    with pytest.raises(ConfigError, match=r"^train.eval_steps schedules an evaluation, but data.eval is not set"):
        build({"stage": "tag", "data": {"train": "t.jsonl"}, "train": {"eval_steps": 2}})
    assert any(key == "data.val_size" for key, _ in ignored_keys(build({"stage": "sft", "data": data})))


def test_tag_val_size_holds_out_rows_after_the_tags_are_read_from_all(tmp_path):
    """A tag seen only in a held-out row is still a class (the tags are read before the split), and the held-out rows
    are datasets' train_test_split's under train.seed."""
    from deltatune.data.tasks import split_off
    from deltatune.train.tag import prepare_tag

    train_idx, eval_idx = split_off(list(range(6)), 2, 5)
    loc = eval_idx[0]  # the one row with a loc entity is held out
    rows = [{"tokens": ["a", f"w{i}"], "ner_tags": ["O", "B-loc" if i == loc else "B-per"]} for i in range(6)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": "tag", "data": {"train": str(path), "val_size": 2}, "train": {"seed": 5}})
    p = prepare_tag(cfg, tokenizer())
    assert p.labels == ["O", "B-loc", "I-loc", "B-per", "I-per"]
    assert len(p.train) == len(train_idx) and len(p.eval) == len(eval_idx) == 2
    first = [next(lab for lab in ex["labels"][1:] if lab != -100) for ex in p.eval]
    assert first == [0] * 2  # each held-out row's first word is "a", tagged O
