"""Probe 20 of the image_cls and caption stages against transformers 5.25 (ViT's image processor and classifier, the
run_image_classification example), sacrebleu and rouge-score on multi-reference captions (as the COCO caption
evaluators pool an image's five captions), and the VLM processors' tokenizers beside the model's embeddings.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from deltatune.data.images import ImageRow
from deltatune.train import caption as C


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _images(tmp_path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8 + i, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    return [str(tmp_path / f"{i}.png") for i in range(n)]


COCO = [  # (image, caption): COCO's layout, an image's captions as rows of their own
    (0, "a cat sits on a red mat"),
    (1, "a dog runs in the park"),
    (0, "a small cat on the mat"),
    (0, "the cat is sitting on a mat"),
    (1, "a brown dog running on grass"),
    (2, "two birds on a wire"),
]
SAID = {0: "a cat sitting on a mat", 1: "a dog running in a park", 2: "birds on a wire"}


def test_caption_eval_scores_each_image_once_against_all_its_captions(tmp_path, monkeypatch):
    """Rows of one image (COCO's five captions an image) were each captioned and scored against their own caption
    alone: the same caption scored against "a small cat on the mat", then against "a cat sits on a red mat", ...
    BLEU-4 0.2545 where sacrebleu on the pooled references (the COCO evaluators' layout) says 0.4903. Now one caption
    an image, multi-reference BLEU (sacrebleu's) and ROUGE-L against the best reference (rouge-score's
    ``score_multi``)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    paths = _images(tmp_path, 3)
    rows = [ImageRow(paths[i], None, f"e.jsonl:{n + 1}", text) for n, (i, text) in enumerate(COCO)]
    dataset = C.CaptionDataset(rows, [[1]] * len(rows), C.CaptionProcessor(None, SimpleNamespace(eos_token_id=1)))
    assert [(r[0][0].path, r[2]) for r in dataset.references()] == [
        (paths[0], [COCO[0][1], COCO[2][1], COCO[3][1]]),
        (paths[1], [COCO[1][1], COCO[4][1]]),
        (paths[2], [COCO[5][1]]),
    ]
    assert len(dataset.references(2)) == 2  # the first n distinct images, each with all its captions
    asked = []

    def generate(model, processor, images, messages, **kwargs):  # the images' widths tell them apart
        asked.append(images[0].size[0] - 8)
        return SAID[asked[-1]]

    monkeypatch.setattr(C, "_generate", generate)
    monkeypatch.setattr(C, "check_new_tokens", lambda *a, **k: None)
    got = C.caption_metrics(torch.nn.Linear(1, 1), None, dataset, 8)
    assert asked == [0, 1, 2]  # one caption an image, not one a row
    preds = [SAID[i] for i in range(3)]
    refs = [[t for i, t in COCO if i == k] for k in range(3)]
    width = max(map(len, refs))
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
    assert got["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score / 100, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = np.mean([scorer.score_multi(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)])
    assert got["eval_rougeL"] == pytest.approx(rouge, abs=1e-9)
    assert got["eval_bleu"] == pytest.approx(0.4903, abs=1e-4)


def test_vlm_eval_pools_the_answers_of_one_image_and_prompt(tmp_path):
    """A decoder-only model's image + caption rows (and conversations) of one image and one prompt are one generation
    scored against every row's answer; another prompt on the same image is a generation of its own."""
    paths = _images(tmp_path, 2)
    user = {"role": "user", "content": "<image>\nDescribe the image."}
    other = {"role": "user", "content": "<image>\nWhat colour is it?"}

    def ex(i, turn, answer):
        return C.VLMExample(f"e:{i}", [ImageRow(paths[i], None, f"e:{i}")], [turn, {"role": "assistant",
                                                                                  "content": answer}])  # fmt: skip

    examples = [ex(0, user, "a cat"), ex(1, user, "a dog"), ex(0, other, "red"), ex(0, user, "one cat")]
    dataset = C.VLMDataset(examples, [([1], [1])] * 4, None)
    assert [(r[0][0].path, r[1][0]["content"], r[2]) for r in dataset.references()] == [
        (paths[0], user["content"], ["a cat", "one cat"]),
        (paths[1], user["content"], ["a dog"]),
        (paths[0], other["content"], ["red"]),
    ]


@pytest.mark.parametrize("wrap", ["caption", "vlm"])
def test_a_processors_tokenizer_past_the_embeddings_is_one_line_as_a_tokenizers(wrap):
    """A stage caption run checks the tokenizer against the model's embeddings as every text stage does, but its
    processor (``CaptionProcessor``, ``VLMProcessor``) is no tokenizer, so the check passed it by: ids past the
    embeddings were an IndexError inside torch's embedding at the first step. The refusal is now the tokenizer's own
    line; a tokenizer that fits passes."""
    from tiny import tiny_model, tokenizer

    from deltatune.config import ConfigError
    from deltatune.train.models import check_vocab

    tok = tokenizer()
    small = tiny_model("llama", "causal_lm", vocab_size=len(tok) - 2)
    with pytest.raises(IndexError):  # what the first step met
        small(input_ids=torch.tensor([[len(tok) - 1]]))
    with pytest.raises(ConfigError) as theirs:
        check_vocab("m", small, tok)
    processor = C.CaptionProcessor(None, tok) if wrap == "caption" else SimpleNamespace(tokenizer=tok)
    check_vocab("m", tiny_model("llama", "causal_lm", vocab_size=len(tok)), processor)  # fits: passes
    with pytest.raises(ConfigError) as ours:
        check_vocab("m", small, processor)
    assert str(ours.value) == str(theirs.value)


def test_the_report_note_counts_the_images_captioned_and_their_captions(tmp_path):
    """The run's note named "the first 6 eval images" for 3 images in 6 rows; it counts what the eval scores."""
    from tiny import tokenizer
    from transformers import ViTImageProcessorPil

    from deltatune.train.config import build

    _images(tmp_path, 3)
    rows = [{"image": f"{i}.png", "text": text} for i, text in COCO]
    data = {"train": _jsonl(tmp_path / "t.jsonl", rows), "eval": _jsonl(tmp_path / "e.jsonl", rows)}
    cfg = build({"stage": "caption", "data": data})
    processor = C.CaptionProcessor(ViTImageProcessorPil(size={"height": 8, "width": 8}), tokenizer())
    notes = C.prepare_caption(cfg, processor).notes
    assert "eval: BLEU-4 and ROUGE-L of greedy captions of the first 3 eval images against the 6 captions of their " \
           "rows" in notes  # fmt: skip


def _listed(tmp_path) -> list[dict]:
    """COCO's layout as Flickr30k's and COCO-Karpathy's datasets hold it: one row an image, its captions a list."""
    _images(tmp_path, 3)
    return [{"image": f"{k}.png", "text": [t for i, t in COCO if i == k]} for k in range(3)]


def test_a_list_of_captions_is_one_example_each_and_the_eval_scores_against_them_all(tmp_path):
    """A caption column holding a list of captions (COCO's five an image) was refused ("must be a non-empty caption,
    got [...]"); now each caption is an example of its image, as BLIP trains on COCO's pairs, and the eval scores one
    caption an image against all of them: the same examples, and references, as the file of one row a caption."""
    from tiny import tokenizer
    from transformers import ViTImageProcessorPil

    from deltatune.train.config import build

    listed = _jsonl(tmp_path / "l.jsonl", _listed(tmp_path))
    pairs = _jsonl(
        tmp_path / "p.jsonl", [{"image": f"{i}.png", "text": t} for i, t in sorted(COCO, key=lambda c: c[0])]
    )
    processor = C.CaptionProcessor(ViTImageProcessorPil(size={"height": 8, "width": 8}), tokenizer())
    got = {}
    for name, path in (("listed", listed), ("pairs", pairs)):
        prepared = C.prepare_caption(build({"stage": "caption", "data": {"train": path, "eval": path}}), processor)
        got[name] = (prepared.train.labels, [(r[0][0].path, r[2]) for r in prepared.eval.references()])
    assert got["listed"] == got["pairs"]
    assert [len(r[1]) for r in got["listed"][1]] == [3, 2, 1] and len(got["listed"][0]) == 6
    user = {"role": "user", "content": "<image>\nDescribe the image."}
    examples = C.vlm_examples(listed, build({"stage": "caption", "data": {"train": listed}}))
    assert [(e.source, e.messages) for e in examples] == [
        (f"{listed}:{i + 1}", [user, {"role": "assistant", "content": t}]) for i, t in sorted(COCO, key=lambda c: c[0])
    ]


def test_data_val_size_holds_a_rows_captions_out_together(tmp_path):
    """data.val_size splits the file's rows (as datasets' train_test_split): a row of several captions is held out
    whole, never some of an image's captions trained on and the rest scored."""
    from tiny import tokenizer
    from transformers import ViTImageProcessorPil

    from deltatune.data.tasks import split_off
    from deltatune.train.config import build

    rows = _listed(tmp_path)
    path = _jsonl(tmp_path / "l.jsonl", rows)
    processor = C.CaptionProcessor(ViTImageProcessorPil(size={"height": 8, "width": 8}), tokenizer())
    cfg = build({"stage": "caption", "data": {"train": path, "val_size": 1}, "train": {"seed": 1}})
    prepared = C.prepare_caption(cfg, processor)
    train, held = split_off(rows, 1, 1)  # the rows the split holds out: the row of 3 captions (seed 3 held 1 out)
    assert len(held[0]["text"]) == 3
    assert [r.text for r in prepared.eval.rows] == held[0]["text"]
    assert [r.text for r in prepared.train.rows] == [t for r in train for t in r["text"]]


def test_a_vlms_data_val_size_holds_a_rows_captions_out_together(tmp_path):
    """The same on a decoder-only model (a tiny LLaVA): one row's captions are one image's examples, held out whole;
    every example of the row trains, else none does."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "vision"))
    from tiny_vlm import save_vlm

    from deltatune.data.tasks import split_off
    from deltatune.train.config import build
    from deltatune.train.models import load_processor

    rows = _listed(tmp_path)
    path = _jsonl(tmp_path / "l.jsonl", rows)
    model = save_vlm(tmp_path / "llava", "llava")
    data = {"train": path, "val_size": 1}
    cfg = build({"stage": "caption", "model": {"name_or_path": model}, "data": data, "train": {"seed": 1}})
    prepared = C.prepare_caption(cfg, load_processor(model, "caption"))
    train, held = split_off(rows, 1, 1)
    assert len(held[0]["text"]) == 3  # the row of 3 captions held out whole (seed 3 held the row of 1 out)
    assert [e.messages[-1]["content"] for e in prepared.eval.examples] == held[0]["text"]
    assert [e.messages[-1]["content"] for e in prepared.train.examples] == [t for r in train for t in r["text"]]
    assert [r[2] for r in prepared.eval.references()] == [held[0]["text"]]


def _five_each(tmp_path) -> str:
    """4 rows of 5 captions (Flickr30k's layout), row 1's image grey ("L")."""
    _images(tmp_path, 4)
    Image.fromarray(np.zeros((8, 9), np.uint8), "L").save(tmp_path / "1.png")
    rows = [{"image": f"{i}.png", "text": [f"picture {i} caption {j}" for j in range(5)]} for i in range(4)]
    return _jsonl(tmp_path / "five.jsonl", rows)


def test_the_notes_count_images_not_captions_and_each_image_is_opened_once(tmp_path, monkeypatch):
    """After a row's captions became examples of their own, the notes counted them as images: 4 rows of 5 captions
    with data.val_size 1 said "15 training images with captions (3 distinct images ...)", "data.val_size: 5 of the
    train file's images held out" (1 was), and the one grey image "5 train images were stored in mode 'L'", opened
    5 times by the check. Now 3 images (15 captions), 1 held out, 1 grey, each image opened once."""
    from tiny import tokenizer
    from transformers import ViTImageProcessorPil

    import deltatune.data.images as I
    from deltatune.train.config import build

    path = _five_each(tmp_path)
    opened, real = [], I.open_rgb
    monkeypatch.setattr(I, "open_rgb", lambda row, *a, **k: opened.append(row.path) or real(row, *a, **k))
    processor = C.CaptionProcessor(ViTImageProcessorPil(size={"height": 8, "width": 8}), tokenizer())
    cfg = build({"stage": "caption", "data": {"train": path, "val_size": 1}, "train": {"seed": 1}})
    prepared = C.prepare_caption(cfg, processor)
    assert len(prepared.train.rows) == 15 and len(prepared.eval.rows) == 5  # row 0 held out (seed 1)
    assert prepared.notes[:3] == [
        "3 training images with captions (15 captions: each an example of its own)",
        "data.val_size: 1 of the train file's images held out for evaluation",
        "1 train images were stored in mode 'L' and were converted to RGB",
    ]
    # each image once (the check), and the first training image once more (the processor's check of it)
    assert sorted(opened) == sorted(str(tmp_path / f"{i}.png") for i in (0, 1, 1, 2, 3))


def test_a_vlms_notes_count_rows_and_images_not_captions(tmp_path):
    """The VLM path said "15 training rows with 15 images", "data.val_size: 5 of the train file's rows held out",
    "5 train images were stored in mode 'L'" for 4 rows of 5 captions (one grey), val_size 1; now 3 rows with 3 images
    (15 examples), 1 row held out, 1 grey image, and the eval note names distinct images and prompts, not rows."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "vision"))
    from tiny_vlm import save_vlm

    from deltatune.train.config import build
    from deltatune.train.models import load_processor

    path = _five_each(tmp_path)
    model = save_vlm(tmp_path / "llava", "llava")
    data = {"train": path, "val_size": 1}
    cfg = build({"stage": "caption", "model": {"name_or_path": model}, "data": data, "train": {"seed": 1}})
    prepared = C.prepare_caption(cfg, load_processor(model, "caption"))
    notes = prepared.notes
    assert notes[0].startswith("3 training rows with 3 images (15 examples: each caption of a row's list one of its")
    assert notes[1] == "data.val_size: 1 of the train file's rows held out for evaluation"
    assert "1 train images were stored in mode 'L' and were converted to RGB" in notes
    assert not any("eval images were stored" in n for n in notes)  # the held-out row 0 is RGB
    assert notes[-1] == ("eval: BLEU-4 and ROUGE-L of greedy answers for the first 1 distinct images and prompts (the "
                         "answers of every eval row that shares them are the references)")  # fmt: skip


@pytest.mark.parametrize("cell", ["\"['a cat', 'the cat']\"", '"[""a cat"", ""the cat""]"', "\" ['a cat'] \""])
def test_a_csv_cell_holding_a_list_of_captions_is_refused_naming_jsonl(tmp_path, cell):
    """A CSV cell holding a list (pandas writes "['a cat', 'the cat']", json.dumps '["a cat", "the cat"]') trained as
    one caption with its brackets and quotes; it is refused, naming the row and .jsonl (which holds a list). A caption
    that merely starts with a bracket, or a list held by a .jsonl, still reads."""
    from deltatune.data.images import read_image_rows
    from deltatune.data.load import DataError

    _images(tmp_path, 2)
    (tmp_path / "l.csv").write_text(f"image,text\n0.png,[sic] a cat\n1.png,{cell}\n")
    with pytest.raises(DataError) as err:
        read_image_rows(str(tmp_path / "l.csv"), "image", None, text_column="text", caption_lists=True)
    assert str(err.value).startswith(f"{tmp_path / 'l.csv'}:3: column 'text' holds a list as text (")
    assert str(err.value).endswith("give the rows as .jsonl")
    (tmp_path / "l.csv").write_text("image,text\n0.png,[sic] a cat\n1.png,[a dog] runs\n")
    rows = read_image_rows(str(tmp_path / "l.csv"), "image", None, text_column="text", caption_lists=True)
    assert [r.text for r in rows] == ["[sic] a cat", "[a dog] runs"]
    path = _jsonl(tmp_path / "l.jsonl", [{"image": "0.png", "text": ["a cat", "the cat"]}])
    assert read_image_rows(path, "image", None, text_column="text", caption_lists=True)[0].text == ["a cat", "the cat"]


@pytest.mark.parametrize(("captions", "said"), [
    (["a cat", ""], "column 'text'[1] must be a non-empty caption, got ''"),
    (["a cat", "the cat", 3], "column 'text'[2] must be a non-empty caption, got 3"),
    ([], "column 'text' must be a non-empty caption (a caption, or a list of non-empty captions), got []"),
])  # fmt: skip
def test_a_bad_caption_in_a_list_is_named_by_its_index(tmp_path, captions, said):
    """The refusal of a list of captions showed the whole list ("must be a non-empty caption, got ['a cat', '']"),
    as if a list were refused; it names the element at fault and says a list of non-empty captions is accepted."""
    from deltatune.data.images import read_image_rows
    from deltatune.data.load import DataError

    _images(tmp_path, 1)
    path = _jsonl(tmp_path / "l.jsonl", [{"image": "0.png", "text": captions}])
    with pytest.raises(DataError) as err:
        read_image_rows(path, "image", None, text_column="text", caption_lists=True)
    assert str(err.value).startswith(f"{path}:1: {said}")
    assert "a list of non-empty captions" in str(err.value)


def test_an_absolute_path_with_a_dot_is_the_same_image(tmp_path):
    """'/d/./0.png' and '/d/0.png' (and '0.png' relative to /d) name one image, but an absolute path was kept as
    written: the eval captioned it twice, each against part of its captions. Now one image, three references."""
    from tiny import tokenizer
    from transformers import ViTImageProcessorPil

    from deltatune.train.config import build

    _images(tmp_path, 1)
    (tmp_path / "x").mkdir()
    rows = [{"image": "0.png", "text": "a"}, {"image": f"{tmp_path}/./0.png", "text": "b"},
            {"image": f"{tmp_path}/x/../0.png", "text": "c"}]  # fmt: skip
    path = _jsonl(tmp_path / "e.jsonl", rows)
    processor = C.CaptionProcessor(ViTImageProcessorPil(size={"height": 8, "width": 8}), tokenizer())
    prepared = C.prepare_caption(build({"stage": "caption", "data": {"train": path, "eval": path}}), processor)
    assert [(r[0][0].path, r[2]) for r in prepared.eval.references()] == [(str(tmp_path / "0.png"), ["a", "b", "c"])]
    assert prepared.notes[0] == "1 training images with captions (3 captions: each an example of its own)"


@pytest.mark.parametrize("relative", [False, True])
def test_a_path_with_dot_dot_after_a_symlink_opens_the_file_the_os_opens(tmp_path, relative):
    """d/link -> real/sub: 'd/link/../0.png' is real/0.png to the OS (and to PIL), but the path was normalised to
    d/0.png: another image (or a missing one, refused). Now '..' is dropped only where it names the same file."""
    import os

    from deltatune.data.images import open_rgb, read_image_rows

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "real" / "sub", tmp_path / "d" / "link")
    Image.new("RGB", (5, 7), (200, 10, 10)).save(tmp_path / "real" / "0.png")
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "d" / "0.png")
    written = "link/../0.png" if relative else f"{tmp_path}/d/link/.//../0.png"
    path = _jsonl(tmp_path / "d" / "x.jsonl", [{"image": written, "text": "a"}])
    row = read_image_rows(path, "image", None, text_column="text", caption_lists=True, allow_outside=True)[0]
    with Image.open(str(tmp_path / "d" / "link" / ".." / "0.png")) as want:
        assert want.size == (5, 7)  # (the OS's reading of the path as written)
    assert row.path == f"{tmp_path}/d/link/../0.png"
    assert open_rgb(row)[0].size == (5, 7)


@pytest.mark.parametrize(
    "cell",
    ["\"['quoted'] text\"", "\"[1girl, solo]\"", "\"[\"\"a\"\"] and [\"\"b\"\"]\"", "\"[1, 2]\"", "[0.5]", "[None]",
     "\"[{'a': 1}]\"", "[tag0] a photo of a cat on a [table]"],
)  # fmt: skip
def test_a_csv_cell_in_brackets_that_holds_no_list_of_captions_is_a_caption(tmp_path, cell):
    """Every CSV cell starting with '[' and ending with ']' was parsed (ast.literal_eval, ~35 us a cell: 200k tagged
    captions read in 17.6 s, were 8.1 s) and any list was refused as "a list as text": '[1, 2]', '[0.5]', '[None]'
    are captions as the datasets library reads them. Only a list of strings is refused now, and only a cell whose
    '[' a quote follows is parsed."""
    import csv
    import io

    from deltatune.data.images import read_image_rows

    _images(tmp_path, 1)
    (tmp_path / "l.csv").write_text(f"image,text\n0.png,{cell}\n")
    want = next(csv.reader(io.StringIO(cell)))[0]  # (the cell as a CSV reader reads it, as datasets' text)
    rows = read_image_rows(str(tmp_path / "l.csv"), "image", None, text_column="text", caption_lists=True)
    assert [r.text for r in rows] == [want]
    path = _jsonl(tmp_path / "l.jsonl", [{"image": "0.png", "text": '["a", "b"]'}])
    assert read_image_rows(path, "image", None, text_column="text", caption_lists=True)[0].text == '["a", "b"]'


@pytest.mark.parametrize(
    "cell", ["[]", "\"[ 'a' ]\"", '"[""a"", ""b""]"', "\"['a photo', None]\"", '"[""a photo"", 1]"']
)
def test_a_csv_cell_holding_an_empty_or_spaced_list_of_captions_is_refused(tmp_path, cell):
    """pandas' and json.dumps' lists of captions, an empty one, one with spaces inside the brackets and one with a bad
    element included (that trained as one caption, brackets and quotes: review of cef666b)."""
    from deltatune.data.images import read_image_rows
    from deltatune.data.load import DataError

    _images(tmp_path, 1)
    (tmp_path / "l.csv").write_text(f"image,text\n0.png,{cell}\n")
    with pytest.raises(DataError, match=r"l\.csv:2: column 'text' holds a list as text \("):
        read_image_rows(str(tmp_path / "l.csv"), "image", None, text_column="text", caption_lists=True)
