"""Probe 15 of the caption / cls / tag / seq2seq / image_cls stages against datasets and transformers' example
scripts (run_glue, run_ner, run_summarization): caption's data.val_size held out as datasets'
``train_test_split(seed=train.seed)`` holds it out (and ``deltatune eval`` scoring the same rows), a bool label among
classes named by numbers refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deltatune.data.load import DataError
from deltatune.train.config import build

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vision"))
sys.path.insert(0, str(ROOT / "tests"))

CAPTIONS = [f"a handwritten {w} thin strokes" for w in ("zero", "one", "two", "three", "four", "five")]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """A tiny ViT + GPT-2 captioner, a tiny LLaVA, six grayscale images and their caption rows."""
    from tiny_vlm import save_vlm

    from deltatune.data import digits

    out = tmp_path_factory.mktemp("captions15")
    digits.init_captioner(str(out / "model"), hidden=32, layers=1, image_size=8)
    save_vlm(out / "llava", "llava")
    rng = np.random.default_rng(0)
    for i in range(len(CAPTIONS)):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(out / f"{i}.png")
    _jsonl(out / "train.jsonl", [{"image": f"{i}.png", "text": c} for i, c in enumerate(CAPTIONS)])
    return out


def _held_out_by_datasets(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """The (train, test) row numbers of datasets' train_test_split, the reference of data.val_size."""
    import datasets

    split = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=val_size, seed=seed)
    return split["train"]["i"], split["test"]["i"]


@pytest.mark.parametrize("model", ["model", "llava"])
def test_caption_holds_out_val_size_as_datasets_train_test_split(captions, model):
    """HEAD read no data.val_size on stage caption: no eval set, every row trained. Now the rows held out are
    datasets' train_test_split's test rows, in its order, for the encoder-decoder and the VLM path alike."""
    from deltatune.train.caption import prepare_caption
    from deltatune.train.models import load_processor

    seed = 3
    cfg = build({"stage": "caption", "model": {"name_or_path": str(captions / model)},
                 "data": {"train": str(captions / "train.jsonl"), "val_size": 0.5}, "train": {"seed": seed}})  # fmt: skip
    prepared = prepare_caption(cfg, load_processor(str(captions / model), "caption"))
    train, test = _held_out_by_datasets(len(CAPTIONS), 0.5, seed)

    def lines(dataset) -> list[int]:
        rows = dataset.rows if hasattr(dataset, "rows") else dataset.examples
        return [int(r.source.rsplit(":", 1)[1]) - 1 for r in rows]

    assert prepared.eval is not None and lines(prepared.eval) == test and lines(prepared.train) == train
    assert any("data.val_size: 3 of the train file's" in n for n in prepared.notes), prepared.notes


def test_caption_eval_of_a_val_size_run_scores_the_held_out_rows(captions, tmp_path, capsys):
    """``deltatune eval`` of a caption run trained with data.val_size (no --data) holds the same rows out again:
    its eval loss is the run's final eval loss (HEAD: 'no evaluation data: pass --data FILE')."""
    from deltatune.cli import main
    from deltatune.train.evaluation import evaluate

    run = tmp_path / "run"
    args = ["train", str(ROOT / "recipes" / "digits-caption.yaml"), f"model.name_or_path={captions / 'model'}",
            f"data.train={captions / 'train.jsonl'}", "data.eval=null", "data.val_size=2", f"output.dir={run}",
            "train.max_steps=2", "train.report_to=[none]", "train.batch_size=2", "train.seed=5"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    trained = json.loads((run / "metrics.json").read_text())
    again = evaluate(str(run))
    assert abs(again["eval_loss"] - trained["eval_loss"]) < 1e-6, (again, trained)
    assert again["eval_bleu"] == trained["eval_bleu"] and again["eval_rougeL"] == trained["eval_rougeL"]


def _train_caption(captions: Path, run: Path, *extra: str) -> None:
    from deltatune.cli import main

    args = ["train", str(ROOT / "recipes" / "digits-caption.yaml"), f"model.name_or_path={captions / 'model'}",
            f"data.train={captions / 'train.jsonl'}", "data.eval=null", f"output.dir={run}", "train.max_steps=2",
            "train.report_to=[none]", "train.batch_size=2", "train.seed=5", *extra]  # fmt: skip
    assert main(args) == 0


def _as_before_4f6e087(run: Path, **data) -> None:
    """The run.yaml of a caption run trained before 4f6e087 (which read no data.val_size: every row trained, as the
    run here trained with val_size 0): no data.return_entity_level_metrics (9b38fa0's key), ``data`` set."""
    import yaml

    recipe = yaml.safe_load((run / "run.yaml").read_text())
    recipe["data"].pop("return_entity_level_metrics", None)
    recipe["data"].update(data)
    (run / "run.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


@pytest.fixture(scope="module")
def old_caption_run(captions, tmp_path_factory) -> Path:
    """A caption run as the code before 4f6e087 left it with data.val_size=2: every row trained, a checkpoint."""
    run = tmp_path_factory.mktemp("old_caption") / "run"
    _train_caption(captions, run, "train.save_steps=1")
    _as_before_4f6e087(run, val_size=2.0)
    return run


def test_eval_of_a_caption_run_that_ignored_val_size_holds_no_rows_out(old_caption_run):
    """The run trained on every row (the code before 4f6e087 named data.val_size as ignored): HEAD's deltatune eval
    held two of its training rows out and reported them as held out; now one line asks for --data."""
    from deltatune.config import ConfigError
    from deltatune.train.evaluation import evaluate

    with pytest.raises(ConfigError) as err:
        evaluate(str(old_caption_run))
    message = str(err.value)
    assert "ignored data.val_size=2.0 before 4f6e087" in message and message.endswith("pass --data FILE")
    assert "\n" not in message and message.startswith(str(old_caption_run / "run.yaml"))
    with pytest.raises(ConfigError, match="ignored data.val_size"):  # a checkpoint of the run: its run.yaml too
        evaluate(str(old_caption_run / "checkpoint-1"))


def test_a_caption_run_that_held_rows_out_before_9b38fa0_is_known_by_its_report(old_caption_run, tmp_path):
    """A run.yaml without the marker key whose report.md says rows were held out (4f6e087 to 9b38fa0) held them."""
    import shutil

    from deltatune.train.runs import old_run_data, read_recipe

    run = tmp_path / "run"
    shutil.copytree(old_caption_run, run)
    raw = read_recipe(str(run))
    assert old_run_data(raw, str(run))[0]["data"]["val_size"] == 0.0
    report = (run / "report.md").read_text()
    (run / "report.md").write_text(report.replace("## Notes\n", "## Notes\n\n- data.val_size: 2 of the train file's "
                                                  "images held out for evaluation\n"))  # fmt: skip
    assert old_run_data(raw, str(run)) == (raw, "")
    raw["data"]["return_entity_level_metrics"] = False  # a run.yaml written since: as it is
    assert old_run_data(raw) == (raw, "")


def test_resume_of_a_caption_run_that_ignored_val_size_names_the_change(old_caption_run, tmp_path):
    """Resumed with the same recipe, HEAD continued on four of the six rows it had trained on, silently. The rule
    (runs.old_run_data) makes the run's data.val_size 0.0, so the resume names it as a change."""
    from deltatune.train.runfolder import recipe_changes
    from deltatune.train.runs import old_run_data, read_recipe

    raw = read_recipe(str(old_caption_run))
    assert recipe_changes(raw, raw) == []  # HEAD's comparison: the same recipe, no change
    old, note = old_run_data(raw, str(old_caption_run))
    assert recipe_changes(old, raw) == ["data.val_size: 0.0 -> 2.0"] and "trained on every row" in note


def test_resume_cli_of_a_caption_run_that_ignored_val_size_needs_resume_changed(captions, old_caption_run, tmp_path):
    import shutil

    from deltatune.cli import main

    run = tmp_path / "run"
    shutil.copytree(old_caption_run, run)
    shutil.rmtree(run / "checkpoint-2")
    (run / "metrics.json").unlink()  # (a run cut after checkpoint-1)
    args = ["train", "--resume", str(ROOT / "recipes" / "digits-caption.yaml"),
            f"model.name_or_path={captions / 'model'}", f"data.train={captions / 'train.jsonl'}", "data.eval=null",
            "data.val_size=2", f"output.dir={run}", "train.max_steps=2", "train.report_to=[none]",
            "train.batch_size=2", "train.seed=5", "train.save_steps=1"]  # fmt: skip
    assert main(args) != 0


@pytest.mark.parametrize("marker", [False, True])
def test_eval_of_a_run_with_an_eval_file_and_val_size_scores_the_eval_file(
    captions, old_caption_run, tmp_path, marker
):
    """The code before 4f6e087 named data.val_size as ignored beside data.eval and scored the eval file; HEAD's eval
    refused the run.yaml ('give one or the other'). Now the eval file is scored as --data scores it (the eval config
    holds no rows out of it, whatever the recipe says: marker=True, a run.yaml with today's keys)."""
    import shutil

    import yaml

    from deltatune.train.evaluation import evaluate

    run = tmp_path / "run"
    shutil.copytree(old_caption_run, run)
    ev = _jsonl(tmp_path / "eval.jsonl", [{"image": str(captions / f"{i}.png"), "text": CAPTIONS[i]} for i in (1, 4)])
    _as_before_4f6e087(run, eval=str(ev))
    if marker:
        recipe = yaml.safe_load((run / "run.yaml").read_text())
        recipe["data"]["return_entity_level_metrics"] = False
        (run / "run.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    got, want = evaluate(str(run)), evaluate(str(run), data=str(ev))
    assert got == want and "eval_loss" in got


def _cls_cfg(tmp_path: Path, values: list, eval_labels: list | None = None, **data):
    train = _jsonl(tmp_path / "train.jsonl", [{"text": f"row {i}", "label": v} for i, v in enumerate(values)])
    ev = {}
    if eval_labels is not None:
        ev = {"eval": str(_jsonl(tmp_path / "eval.jsonl", [{"text": "e", "label": v} for v in eval_labels]))}
    return build({"stage": "cls", "model": {"name_or_path": "unused"}, "data": {"train": str(train), **ev, **data}})


@pytest.mark.parametrize(
    "labels, eval_labels, given, line",
    [
        ([0, 1, True], None, None, "train.jsonl:3"),  # HEAD: three classes '0', '1', 'True'
        ([0, 1, 2], [1, False], None, "eval.jsonl:2"),  # HEAD: scored as class 0
        ([1, 2, 1], [True], ["1", "2"], "eval.jsonl:1"),  # HEAD: True == 1, the class "1" (id 0)
        ([[0], [1, True]], None, None, "train.jsonl:2"),  # multi-label: HEAD made 'True' a class
        (["neg", "pos", True], None, None, "train.jsonl:3"),  # 4f6e087: a class 'True' of its own
        (["neg", True, "neg"], None, ["neg", "pos"], "train.jsonl:2"),  # 4f6e087: True == 1, the class pos
        (["neg", "pos"], [False], ["neg", "pos"], "eval.jsonl:1"),  # 4f6e087: False == 0, the class neg
        (["pos", True], None, ["pos", "True", "neg"], "train.jsonl:2"),  # 4f6e087: the class named 'True'
    ],
)
def test_a_boolean_among_other_classes_is_refused_naming_the_row(tmp_path, labels, eval_labels, given, line):
    """No reference number to match (the next test): the row is refused in one line."""
    from deltatune.train.cls import prepare_cls

    cfg = _cls_cfg(tmp_path, labels, eval_labels, labels=given)
    with pytest.raises(DataError) as err:
        prepare_cls(cfg, _Tok())
    assert str(err.value).startswith(f"{tmp_path / line}: label ") and "is a boolean" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("other", [0, "neg"])
def test_datasets_reads_no_json_column_mixing_numbers_and_booleans(tmp_path, other):
    """run_glue reads its classes through datasets (``raw_datasets["train"].unique("label")``), whose JSON loader
    keeps a column mixing booleans with numbers or with names as arrow's json type, which ``unique`` cannot sort:
    run_glue stops there. A column of booleans only loads as bool, the classes [False, True]."""
    import datasets

    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": other}, {"text": "b", "label": True}])
    ds = datasets.load_dataset("json", data_files=str(mixed), split="train", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(Exception, match="unique"):  # noqa: B017 (arrow's ArrowNotImplementedError)
        ds.unique("label")
    bools = _jsonl(tmp_path / "bools.jsonl", [{"text": "a", "label": False}, {"text": "b", "label": True}])
    ds = datasets.load_dataset("json", data_files=str(bools), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(ds.unique("label")) == [False, True]


def test_booleans_alone_stay_the_classes_false_and_true(tmp_path):
    """Only booleans: the classes False and True (run_glue's sorted [False, True]), data.labels naming them or not."""
    from deltatune.train.cls import prepare_cls

    prepared = prepare_cls(_cls_cfg(tmp_path, [True, False, True]), _Tok())
    assert prepared.labels == ["False", "True"] and [e["labels"] for e in prepared.train] == [1, 0, 1]
    prepared = prepare_cls(_cls_cfg(tmp_path, [True, False, True], labels=["True", "False"]), _Tok())
    assert prepared.labels == ["True", "False"] and [e["labels"] for e in prepared.train] == [0, 1, 0]


@pytest.mark.parametrize("first", [0, "cat"])  # "cat": 4f6e087 made False a class 'False' beside cat and dog
def test_image_cls_refuses_a_boolean_among_other_classes(tmp_path, first):
    from deltatune.train.image_cls import prepare_image_cls

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    second = 1 if first == 0 else "dog"
    train = _jsonl(tmp_path / "t.jsonl", [{"image": "a.png", "label": v} for v in (first, second, False)])
    cfg = build({"stage": "image_cls", "model": {"name_or_path": "unused"}, "data": {"train": str(train)}})
    with pytest.raises(DataError, match=r"t\.jsonl:3: label false in column 'label' is a boolean"):
        prepare_image_cls(cfg, None)


class _Tok:
    """A whitespace tokenizer: enough for prepare_cls's encoding."""

    pad_token_id = 0

    def __call__(self, text, pair=None, **kwargs):
        ids = [len(w) for w in f"{text} {pair or ''}".split()]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def test_porter_stem_is_nltks_porter_stemmer_which_rouge_score_runs():
    """metrics.porter_stem against nltk's PorterStemmer() (rouge-score's use_stemmer) on the paper's examples and
    nltk's extensions (irregular forms, -ied, -logi, -fulli), every word the same."""
    porter = pytest.importorskip("nltk.stem.porter")
    from deltatune.train.metrics import porter_stem

    text = ("caresses ponies ties feed agreed plastered bled motoring sing conflated troubled sized hopping tanned "
             "falling hissing fizzed failing filing happy sky skies relational conditional rational valenci digitizer "
             "conformabli radicalli differentli vileli analogousli vietnamization predication operator feudalism "
             "decisiveness hopefulness callousness formaliti sensitiviti sensibiliti triplicate formative formalize "
             "electriciti electrical hopeful goodness revival allowance inference airliner gyroscopic adjustable "
             "defensible irritant replacement adjustment dependent adoption homologou communism activate angulariti "
             "homologous effective bowdlerize probate rate cease controll roll yyyy syzygy toy enjoy spied died dies "
             "generously geology theology hopefulli spy fly dying lying innings proceed exceed succeed news cats "
             "strokes running runs written handwritten summaries summarization generated generation")  # fmt: skip
    words = text.split()
    stemmer = porter.PorterStemmer()
    assert [porter_stem(w) for w in words] == [stemmer.stem(w) for w in words]


PORTER_SUFFIXES = ("ies sses ss s eed ed ing at bl iz y ational tional enci anci izer bli alli entli eli ousli ization "
                   "ation ator alism iveness fulness ousness aliti iviti biliti fulli logi icate ative alize iciti ical "
                   "ful ness al ance ence er ic able ible ant ement ment ent ion sion tion ou ism ate iti ous ive ize e "
                   "ll ied yed ying ly li")  # fmt: skip
"""Each Porter rule's suffix (steps 1a to 5) and nltk's extensions: stacked, they reach every rule's conditions."""


def test_porter_stem_is_nltks_on_generated_suffix_combinations():
    """Every 2- and 3-letter word (nltk's short-word rules) and 12,000 random stems with up to three stacked rule
    suffixes (``ationalizationness``...): metrics.porter_stem equals nltk's PorterStemmer on each (on the reviewer's
    744k words, real and generated, too: no mismatch)."""
    import random

    porter = pytest.importorskip("nltk.stem.porter")
    from deltatune.train.metrics import porter_stem

    letters = "abcdefghijklmnopqrstuvwxyz0"
    words = {a + b for a in letters for b in letters} | {
        a + b + c for a in letters for b in letters for c in "aeiouyslzdgnt0"
    }
    rng, alpha, suffixes = (
        random.Random(0),
        "abcdefghijklmnopqrstuvwxyz" + "aeiouy" * 3 + "012",
        PORTER_SUFFIXES.split(),
    )
    while len(words) < 12_000 + 27 * 27 * 15:
        stem = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 7)))
        words.add(stem + "".join(rng.choice(suffixes) for _ in range(rng.randint(0, 3))) or "a")
    stemmer = porter.PorterStemmer()
    bad = [(w, porter_stem(w), stemmer.stem(w)) for w in sorted(words) if porter_stem(w) != stemmer.stem(w)]
    assert len(words) > 22_000 and bad == [], bad[:10]


def test_seq2seq_rouge_l_stems_as_run_summarization_does():
    """run_summarization scores ``rouge.compute(..., use_stemmer=True)``; HEAD's seq2seq ROUGE-L did not stem:
    "the cats were running home" against "the cat runs home" scored 4/9, rouge-score's stemmed F is 8/9. The
    generations here echo their sources, so the figure is the metric's alone; reference: rouge-score's rougeL
    fmeasure with use_stemmer=True, averaged over rows (what run_summarization's bootstrap aggregator centres on)."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    from deltatune.data.load import Row
    from deltatune.train.seq2seq import generation_metrics

    pairs = [("the cats were running home", "the cat runs home"), ("Summaries generated quickly", "a summary generation"),
             ("plain words", "plain words")]  # fmt: skip
    rows = [Row({"source": s, "target": t}, f"rows.jsonl:{i}") for i, (s, t) in enumerate(pairs, 1)]
    cfg = build({"stage": "seq2seq", "model": {"name_or_path": "unused"},
                 "data": {"train": "rows.jsonl", "source_column": "source", "target_column": "target"}})  # fmt: skip
    got = generation_metrics(_Echo(), _EchoTok(), rows, cfg, batch_size=2)["eval_rougeL"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = sum(scorer.score(t, s)["rougeL"].fmeasure for s, t in pairs) / len(pairs)
    assert abs(got - want) < 1e-12 and abs(scorer.score(pairs[0][1], pairs[0][0])["rougeL"].fmeasure - 8 / 9) < 1e-12


class _EchoTok:
    """Each text becomes one id, and decodes back to itself: a 'generation' that echoes its source."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts=None, text_target=None, **kwargs):
        import torch

        texts = [text_target] if texts is None else texts  # (a target: the metrics decode the references too)
        ids = torch.arange(len(self.texts), len(self.texts) + len(texts))[:, None]
        self.texts += list(texts)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batch_decode(self, out, skip_special_tokens: bool = True) -> list[str]:
        return [self.texts[int(row[0])] for row in out]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.batch_decode(ids, skip_special_tokens)[0]


class _Echo:
    """A model whose generate returns its input ids."""

    training = False

    def parameters(self):
        import torch

        yield torch.zeros(1)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, input_ids, **kwargs):
        return input_ids


@pytest.mark.parametrize("seed", range(3))
def test_entity_level_metrics_are_seqevals_per_type(seed):
    """run_ner's --return_entity_level_metrics: per type precision, recall, f1 and number as evaluate's seqeval
    (seqeval's classification_report) gives them; random IOB2 / IOBES sequences, every figure equal to 1e-12."""
    import random

    from seqeval.metrics import classification_report

    from deltatune.train.metrics import entity_prf_by_type

    rng = random.Random(seed)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-PER", "S-LOC", "I-MISC", "B-MISC", "O", "O"]
    true = [[rng.choice(tags) for _ in range(rng.randint(1, 9))] for _ in range(40)]
    pred = [[rng.choice(tags) if rng.random() < 0.4 else t for t in s] for s in true]
    ref = classification_report(true, pred, output_dict=True, zero_division=0)
    got = entity_prf_by_type(pred, true)
    assert sorted(got) == sorted(k for k in ref if not k.endswith(" avg"))
    for kind, vals in got.items():
        want = ref[kind]
        assert vals["number"] == want["support"]
        for ours, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert abs(vals[ours] - want[theirs]) < 1e-12, (kind, ours)


def test_tag_reports_run_ners_entity_level_keys_when_asked(tmp_path):
    """With data.return_entity_level_metrics (run_ner's flag) the tag stage's metrics carry <type>_precision,
    _recall, _f1, _number beside the overall ones; without it, the overall ones only (run_ner's default)."""
    from types import SimpleNamespace

    from tiny import tokenizer

    from deltatune.train.tag import prepare_tag

    rows = [{"tokens": ["a", "b", "c"], "ner_tags": ["B-per", "O", "B-loc"]}, {"tokens": ["d"], "ner_tags": ["O"]}]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    cfg = build({"stage": "tag", "data": {"train": str(path)}})
    p = prepare_tag(cfg, tokenizer())
    names = p.labels  # O, B-loc, I-loc, B-per, I-per
    true = [[names.index(t) for t in ("B-per", "O", "B-loc")]]
    guess = [[names.index(t) for t in ("B-per", "O", "O")]]
    logits = np.eye(len(names))[guess]  # (1, 3, classes): argmax is the guess
    pred = SimpleNamespace(predictions=logits, label_ids=np.array(true))
    assert set(p.compute_metrics(pred)) == {"f1", "precision", "recall", "accuracy"}
    cfg = build({"stage": "tag", "data": {"train": str(path), "return_entity_level_metrics": True}})
    got = prepare_tag(cfg, tokenizer()).compute_metrics(pred)
    assert got["per_f1"] == 1.0 and got["loc_recall"] == 0.0 and got["loc_number"] == 1 and got["per_number"] == 1
    assert got["f1"] == pytest.approx(2 / 3)


def test_seq2seq_generation_num_beams_is_run_summarizations_num_beams(tmp_path):
    """run_summarization's --num_beams: the eval's generations by beam search. HEAD always ran greedy. The targets
    here are transformers' generate(num_beams=3) answers of a random tiny BART, which differ from its greedy ones:
    with train.generation_num_beams=3 the eval's generations are exactly those (ROUGE-L and BLEU 1)."""
    import torch
    from tiny import save_tiny
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from deltatune.data.load import Row
    from deltatune.train.seq2seq import generation_metrics

    path = save_tiny(tmp_path / "bart", "bart", init_std=0.5)
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    sources = ["the big red dog sat on the old mat", "blue house by the sea", "a quiet green tree", "cat"]

    def answers(beams: int) -> list[str]:
        enc = tok(sources, return_tensors="pt", padding=True, padding_side="right", return_token_type_ids=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, num_beams=beams)
        return tok.batch_decode(out, skip_special_tokens=True)

    beam, greedy = answers(3), answers(1)
    assert beam != greedy and all(b.strip() for b in beam)
    rows = [Row({"source": s, "target": t}, f"rows.jsonl:{i}") for i, (s, t) in enumerate(zip(sources, beam), 1)]
    cfg = build({"stage": "seq2seq", "model": {"name_or_path": path},
                 "data": {"train": "rows.jsonl", "source_column": "source", "target_column": "target"},
                 "train": {"generation_max_new_tokens": 6, "generation_num_beams": 3}})  # fmt: skip
    got = generation_metrics(model, tok, rows, cfg, batch_size=4)
    perfect = {k: 1.0 for k in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_bleu")}
    # gen_len: 6 new ids a row, no EOS; the decoder start is the pad (save_tiny's), not counted
    assert got == {**perfect, "eval_gen_len": 6.0}


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_seq2seq_batches_are_run_summarizations(tmp_path, family):
    """run_summarization's preprocess_function (source_prefix, max_source_length and max_target_length cuts) and its
    DataCollatorForSeq2Seq(label_pad_token_id=-100): ids, mask and labels torch.equal, the loss of a tiny model equal
    (difference 0.0 on this machine; 1e-6 allowed). The reference adds decoder_input_ids, which the models build from
    the labels alike."""
    import torch
    from tiny import save_tiny
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq

    from deltatune.data.load import Row
    from deltatune.data.tasks import Collator, encode_seq2seq

    path = save_tiny(tmp_path / family, family)
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    src = ["the big red dog sat on the old mat", "blue house", "a quiet green tree by the sea and more words here"]
    tgt = ["red dog", "a blue house by the water", "tree"]
    rows = [Row({"s": s, "t": t}, f"r:{i}") for i, (s, t) in enumerate(zip(src, tgt))]
    ours = Collator(tok.pad_token_id)(encode_seq2seq(rows, tok, "s", "t", 8, 5, "truncate", "summarize: ").examples)
    inputs = tok(["summarize: " + s for s in src], max_length=8, truncation=True)
    labels = tok(text_target=tgt, max_length=5, truncation=True)["input_ids"]
    feats = [{"input_ids": a, "attention_mask": m, "labels": lab} for a, m, lab in
             zip(inputs["input_ids"], inputs["attention_mask"], labels)]  # fmt: skip
    ref = DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100)(feats)
    assert all(torch.equal(ours[k], ref[k]) for k in ("input_ids", "attention_mask", "labels"))
    assert (ours["labels"] == -100).any()  # (the padding the test is about is there)
    with torch.no_grad():
        ours_loss = model(**{k: ours[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        ref_loss = model(**{k: v for k, v in ref.items() if k != "token_type_ids"}).loss
    assert abs(float(ours_loss - ref_loss)) < 1e-6


def test_caption_refuses_data_template_raw_in_one_line(captions):
    """data.template=raw (3f15795) renders texts as they are; a VLM caption conversation went through it joined
    silently (review T). Refused before any row is read."""
    from deltatune.config import ConfigError
    from deltatune.train.caption import prepare_caption
    from deltatune.train.models import load_processor

    cfg = build({"stage": "caption", "model": {"name_or_path": str(captions / "llava")},
                 "data": {"train": str(captions / "train.jsonl"), "template": "raw"}})  # fmt: skip
    with pytest.raises(ConfigError, match="data.template='raw': stage caption reads conversations"):
        prepare_caption(cfg, load_processor(str(captions / "llava"), "caption"))
