"""Probe 23 of the cls / tag / seq2seq / image_cls stages' metrics against their references (seqeval, scikit-learn)
and of the digits writer's command line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score

from deltatune.train import metrics as M

LOWER = [["b-per", "i-per", "O", "b-per", "b-per", "i-loc"], ["B-per", "i-per", "O", "b-loc"]]
PRED = [["b-per", "i-per", "O", "b-per", "i-per", "i-loc"], ["B-per", "I-per", "O", "b-loc"]]


def test_lowercase_bio_tags_score_as_seqeval_reads_them():
    """seqeval's default (conlleval) scheme knows B / I / E / S / O only in upper case: a tag set written b-per /
    i-per is read by its types alone (a chunk runs while the type stays: b-per b-per is one entity), as run_ner's
    evaluate-seqeval scores it; deltatune's entity F1 is the same figure."""
    with pytest.warns(UserWarning, match="seems not to be NE tag"):
        want = {
            "precision": precision_score(LOWER, PRED),
            "recall": recall_score(LOWER, PRED),
            "f1": f1_score(LOWER, PRED),
        }
    got = M.entity_prf([M.one_sequence(PRED)], [M.one_sequence(LOWER)])
    assert got == pytest.approx(want, abs=1e-12)
    assert M.entities(["b-per", "b-per", "O"]) == {("per", 0, 2)}  # one entity, as seqeval's get_entities


@pytest.mark.parametrize("sub", ["", "sub"])
def test_digits_into_a_file_is_refused_in_one_line(tmp_path, capsys, sub):
    """An output path that is a file (or under one) failed with os.makedirs' NotADirectoryError traceback."""
    from deltatune.data import digits

    target = tmp_path / "a-file"
    target.write_text("kept")
    out = target / sub if sub else target
    with pytest.raises(SystemExit) as done:
        digits.main([str(out)])
    assert done.value.code == 2 and target.read_text() == "kept"
    last = capsys.readouterr().err.splitlines()[-1]
    want = (
        f"error: {out} is a file, not a folder: name a folder to write the digits into"
        if not sub
        else f"error: {out}: cannot write the digits: [Errno 20] Not a directory: '{out}'"
    )
    assert last.endswith(want)


def _confusion_trainer(out, matrix):
    import numpy as np

    from deltatune.train.image_cls import ConfusionTrainer

    trainer = object.__new__(ConfusionTrainer)  # (its evaluate's writing only: the Trainer's part patched out)
    trainer.confusion = {"names": ["a", "b"], "matrix": np.array(matrix)}
    trainer.args = SimpleNamespace(output_dir=str(out))
    trainer.is_world_process_zero = lambda: True
    return trainer


@pytest.mark.parametrize("part", ["json", "png"])
def test_the_confusion_matrix_files_are_whole_or_as_they_were(tmp_path, monkeypatch, part):
    """A write that failed half-way (a full disk, a stopped run) left a cut confusion_matrix.json (or .png) in the
    run folder, beside the other file of the last evaluation; now each is the last whole one, no temporary left."""
    import json

    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from deltatune.train import image_cls
    from deltatune.train.trainer import TokenLossTrainer

    monkeypatch.setattr(TokenLossTrainer, "evaluate", lambda self, *a, **k: {"eval_accuracy": 0.5})
    _confusion_trainer(tmp_path, [[1, 0], [1, 2]]).evaluate()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert json.loads(before["confusion_matrix.json"]) == {"labels": ["a", "b"], "matrix": [[1, 0], [1, 2]]}
    assert before["confusion_matrix.png"].startswith(b"\x89PNG")

    def cut(original):
        def write(self_or_record, fh_or_path, *args, **kwargs):  # half the file, then the disk is full
            if hasattr(fh_or_path, "write"):
                fh_or_path.write('{"labels": ["a"')
            else:
                with open(fh_or_path, "wb") as fh:
                    fh.write(b"\x89PNG\r\n")
            raise OSError(28, "No space left on device")

        return write

    if part == "json":
        monkeypatch.setattr(image_cls.json, "dump", cut(json.dump))
    else:
        monkeypatch.setattr(Figure, "savefig", cut(Figure.savefig))
    with pytest.raises(OSError) as failed:
        _confusion_trainer(tmp_path, [[0, 1], [2, 1]]).evaluate()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after["confusion_matrix." + part] == before["confusion_matrix." + part]
    assert sorted(after) == sorted(before)  # (no temporary file left)
    assert str(failed.value) == f"could not write {tmp_path / ('confusion_matrix.' + part)}: No space left on device"


@pytest.mark.parametrize("data", ["folder", "file"])
def test_eval_of_a_plain_image_classification_adapter_is_image_cls_and_equals_peft(tmp_path, data):
    """peft's image-classification adapter (and image_cls's own) saves task_type None; ``deltatune eval --adapter``
    on an image folder (or a file of image and label columns) read it as an sft run: "model ... holds no tokenizer".
    Now stage image_cls, its loss peft's PeftModel's cross-entropy on the processor's pixels."""
    import json

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from deltatune.data.digits import init_vit
    from deltatune.train.evaluation import evaluate

    base = init_vit(str(tmp_path / "vit"), hidden=32, layers=1)
    names = {"cat": [(200, 30, 30), (90, 90, 20)], "dog": [(10, 10, 240), (0, 200, 0), (255, 255, 255)]}
    rows = []
    for name, colours in names.items():
        (tmp_path / "img" / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            path = tmp_path / "img" / name / f"{i}.png"
            Image.new("RGB", (16, 16), colour).save(path)
            rows.append({"image": str(path), "label": name})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    kw = dict(num_labels=2, ignore_mismatched_sizes=True, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    model = AutoModelForImageClassification.from_pretrained(base, **kw)
    lora = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], init_lora_weights=False
    )
    get_peft_model(model, lora).save_pretrained(str(tmp_path / "adapter"))

    got = evaluate(str(tmp_path / "adapter"), str(tmp_path / ("img" if data == "folder" else "rows.jsonl")))
    ref = PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base, **kw), tmp_path / "adapter")
    pixels = AutoImageProcessor.from_pretrained(base)([Image.open(r["image"]) for r in rows], return_tensors="pt")
    labels = torch.tensor([0, 0, 1, 1, 1])
    with torch.no_grad():
        out = ref.eval()(**pixels, labels=labels)
    assert got["eval_loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert got["eval_accuracy"] == pytest.approx((out.logits.argmax(-1) == labels).float().mean().item())


def test_the_generation_cap_note_counts_targets_whose_text_the_cap_cuts(tmp_path):
    """A target of train.generation_max_new_tokens tokens and its EOS generates whole within the cap (the EOS is
    not needed for its text: the decoded generation equals the target): the note counted it as cut. Targets of 3,
    4 and 5 words (4, 5, 6 labels with the EOS) under a cap of 4: one cut, not two."""
    import json

    from tokenizers.processors import TemplateProcessing

    from deltatune.train.config import build
    from deltatune.train.seq2seq import prepare_seq2seq
    from tests.tiny import word_tokenizer

    tok = word_tokenizer()
    eos = tok.eos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", eos)])
    path = tmp_path / "rows.jsonl"
    words = tok.convert_ids_to_tokens(list(range(4, 9)))
    path.write_text("".join(json.dumps({"source": "x", "target": " ".join(words[:n])}) + "\n" for n in (3, 4, 5)))
    data = {"train": str(path), "eval": str(path), "source_column": "source", "target_column": "target"}
    cfg = build({"stage": "seq2seq", "data": data, "train": {"generation_max_new_tokens": 4}})
    prepared = prepare_seq2seq(cfg, tok)
    assert [len(ex["labels"]) for ex in prepared.eval] == [4, 5, 6] and prepared.eval[0]["labels"][-1] == eos
    assert prepared.notes == [
        "1 of the 3 eval targets are longer than train.generation_max_new_tokens=4 tokens: their generations stop "
        "there, which lowers ROUGE-L and BLEU"
    ]


def test_a_refused_cls_run_leaves_the_recipes_classes_as_given(tmp_path):
    """train(cfg) refused after the stage read the classes (here: data.max_length past the model's positions) left
    cfg.data.labels set to them: a retry on other data trained those classes (a phantom class, or refused a new
    one). (run.py diff of probe 23.)"""
    import json

    from deltatune.config import ConfigError
    from deltatune.train import build
    from deltatune.train.run import train
    from tests.tiny import save_tiny

    base = save_tiny(tmp_path / "bert", "bert", "seq_cls", max_position_embeddings=8)
    rows = [{"text": "a b c d e f g h i j k", "label": label} for label in ("neg", "pos", "mid")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": "cls", "model": {"name_or_path": base}, "method": {"name": "lora", "target_modules": ["query"]},
                 "data": {"train": str(tmp_path / "rows.jsonl"), "max_length": 32}, "train": {"max_steps": 1},
                 "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    with pytest.raises(ConfigError, match="more than the model's 8 positions"):
        train(cfg)
    assert (
        cfg.data.labels is None
        and cfg.data.multi_label is None
        and cfg.method == {"name": "lora", "target_modules": ["query"]}
    )


def test_eval_of_a_plain_causal_adapter_on_a_folder_of_data_files_beside_a_figure_stays_sft(tmp_path):
    """A folder of data files (LLaMA-Factory's shape) with an image somewhere under it (a figure in assets/) was read
    as an image folder by eebe455: a causal LM's plain adapter was refused as "only one class ('assets')"; it is
    read by its rows, as before (review)."""
    import json

    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import AutoModelForCausalLM

    from deltatune.train.evaluation import _images
    from tests.tiny import save_tiny

    data = tmp_path / "data"
    (data / "assets").mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(2)]  # fmt: skip
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.new("RGB", (8, 8)).save(data / "assets" / "figure.png")
    assert not _images(str(data)) and not _images(str(data / "train.jsonl"))
    assert _images(str(data / "assets"))  # (a folder of images alone still is one)
    base = save_tiny(tmp_path / "base", "llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "adapter"))
    from deltatune.train.evaluation import evaluate

    assert evaluate(str(tmp_path / "adapter"), str(data))["eval_loss"] > 0


def test_the_generation_cap_counts_no_closing_special_tokens_of_a_target():
    """mBART's targets end ``X </s> lang_code`` (transformers' set_tgt_lang_special_tokens) and its generation starts
    from the language code: a target of exactly the cap's text was counted as cut (f113a61 discounted one closing
    special token; review)."""
    from deltatune.train.seq2seq import _needed

    eos, lang, x = 2, 250004, 17
    assert _needed([x, x, x, eos, lang], {eos, lang}) == 3
    assert _needed([x, x, eos], {eos}) == 2 and _needed([0, x, eos], {0, eos}) == 2  # (T5; BART's leading <s> counts)
    assert _needed([eos], {eos}) == 0 and _needed([], {eos}) == 0
