"""Fixes to probe 21's seq2seq commits (review s2sfix21): old runs that set train.label_smoothing_factor (ignored by
stage seq2seq before 6874e32) evaluate and resume as they trained; a T5 config without decoder_start_token_id at
all refused before training; data.source_prefix counted in check_room; a tokenizer without text_target; the
smoothed token loss shared with loss.py, equal to transformers' LabelSmoother."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from deltatune.config import ConfigError
from deltatune.train.config import build
from tests.tiny import tokenizer

OLD_NOTE = (
    "stage seq2seq ignored train.label_smoothing_factor=0.1 before 6874e32: this run trained and evaluated the "
    "plain cross-entropy"
)
IGNORED_LINE = "- train.label_smoothing_factor is read by stage pt, sft only; stage seq2seq ignored it\n"


def _rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"source": f"a b c {i}", "target": f"c d {i} e"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(tmp_path, base: str, out: str) -> dict:
    return {"stage": "seq2seq", "model": {"name_or_path": base}, "method": {"name": "lora", "r": 2,
            "target_modules": ["q", "v"]}, "data": {"train": _rows(tmp_path), "eval": _rows(tmp_path),
            "source_column": "source", "target_column": "target", "max_length": 16, "max_target_length": 16},
            "train": {"max_steps": 1, "batch_size": 4, "eval_batch_size": 4, "generation_max_new_tokens": 2,
                      "label_smoothing_factor": 0.1, "lr": 0.01, "report_to": ["none"]},
            "output": {"dir": out}}  # fmt: skip


def _run_folder(tmp_path, marks: dict | None, report: str | None, smoothing=0.1, stage="seq2seq"):
    """A run folder as old_run_data reads it: run.yaml, the marks, report.md (None: absent)."""
    folder = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    raw = {"stage": stage, "train": {"label_smoothing_factor": smoothing, "batch_size": 2}}
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    if marks is not None:
        (folder / "deltatune_marks.json").write_text(json.dumps(marks))
    if report is not None:
        (folder / "report.md").write_text(report)
    return raw, str(folder)


def test_an_unmarked_seq2seq_runs_label_smoothing_is_read_as_the_plain_loss_it_trained(tmp_path):
    """Before 6874e32 stage seq2seq ignored train.label_smoothing_factor (its report.md said so) and trained and
    evaluated the plain cross-entropy; runs.old_run_data returned its recipe as written, so ``deltatune eval``
    scored it smoothed and a --resume went on smoothed. Now a run without the mark (runfolder.MARKS), finished with
    the report's "ignored it" line or interrupted (no report.md), has the key null, with a note."""
    from deltatune.train.runs import old_run_data

    tmp = tmp_path
    old_marks = {"quant_skip_rule": 2}  # (a run begun 2026-12-07 before 6874e32)
    for marks, report in ((old_marks, "# run\n\n## Notes\n\n" + IGNORED_LINE), (None, None), (old_marks, None)):
        raw, folder = _run_folder(tmp, marks, report)
        got, note = old_run_data(raw, folder)
        assert got["train"] == {"label_smoothing_factor": None, "batch_size": 2} and note == OLD_NOTE
        assert raw["train"]["label_smoothing_factor"] == 0.1  # (a new dict)
        assert old_run_data(raw, folder + "/checkpoint-1")[1] == OLD_NOTE  # (its checkpoint's eval)
    new_marks = {"quant_skip_rule": 2, "seq2seq_label_smoothing": 1}
    for marks, report in ((new_marks, None), (new_marks, IGNORED_LINE), (old_marks, "# run\n")):
        raw, folder = _run_folder(tmp, marks, report)  # (the last: finished after 6874e32, before the mark)
        assert old_run_data(raw, folder) == (raw, "")
    for smoothing, stage in ((None, "seq2seq"), (0.0, "seq2seq"), (0.1, "sft")):
        raw, folder = _run_folder(tmp, None, None, smoothing, stage)
        assert old_run_data(raw, folder) == (raw, "")


def _resume_check(tmp_path):
    """An old interrupted run's folder (run.yaml as a run writes it, the marks of a run begun before 6874e32, no
    report.md), and the recipe it is resumed with: the same."""
    from deltatune.train import run as run_mod

    recipe = run_mod._recipe_dict(_s2s_cfg(tmp_path, label_smoothing_factor=0.1))
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (folder / "deltatune_marks.json").write_text(json.dumps({"quant_skip_rule": 2}))
    return run_mod._check_resume_recipe, str(folder), recipe


def test_an_old_interrupted_runs_resume_is_refused_naming_the_key(tmp_path):
    """Its --resume with the recipe it was started with went on smoothed from the checkpoint, the first steps
    having trained the plain loss; now the old run's key is null, so the resume is refused naming it (and goes on
    smoothed with --resume-changed); a run begun with the mark resumes as it is."""
    check, folder, recipe = _resume_check(tmp_path)
    with pytest.raises(ConfigError, match=r"in train\.label_smoothing_factor: None -> 0\.1"):
        check(folder, recipe, False)
    assert check(folder, recipe, True) is True
    (tmp_path / "run" / "deltatune_marks.json").write_text(json.dumps({"seq2seq_label_smoothing": 1}))
    assert check(folder, recipe, False) is False


def test_an_old_interrupted_runs_resume_refusal_gives_the_note(tmp_path):
    """The refusal says why the recorded value is null (run.py's _check_resume_recipe adds old_run_data's note to
    data.val_size's change only)."""
    check, folder, recipe = _resume_check(tmp_path)
    with pytest.raises(ConfigError) as refused:
        check(folder, recipe, False)
    assert f"train.label_smoothing_factor: None -> 0.1 ({OLD_NOTE})" in str(refused.value)


def test_a_new_run_is_marked_and_an_old_ones_eval_scores_the_plain_loss(tmp_path, capsys):
    """A run begins with the mark, and ``deltatune eval`` scores it smoothed (Seq2SeqTrainer's LabelSmoother:
    tests/test_s2s_probe21.py). The same run made old (no mark, the report's "ignored it" line) was scored smoothed
    too (11.6 against the 10.x it trained on, as the review measured); now its eval loss is T5's own loss on the
    eval batch, and the note is printed."""
    from transformers import AutoTokenizer

    from deltatune.train.evaluation import evaluate
    from deltatune.train.run import train
    from deltatune.train.run_load import load_adapter_model
    from deltatune.train.runfolder import MARKS
    from deltatune.train.runs import MARKS_FILE, SMOOTHING_MARK
    from tests.tiny import save_tiny

    base = save_tiny(tmp_path / "t5", "t5")
    out = tmp_path / "run"
    train(build(_recipe(tmp_path, base, str(out))))
    assert json.loads((out / MARKS).read_text()) == {"quant_skip_rule": 2, "seq2seq_label_smoothing": 1,
                                                     "alpaca_system": 1, "tag_prefix_space": 1,
                                                     "image_cls_class_label": 1}  # fmt: skip
    assert MARKS == MARKS_FILE and SMOOTHING_MARK == "seq2seq_label_smoothing"  # (runs' names of them)
    smoothed = evaluate(str(out))["eval_loss"]

    delta, _ = load_adapter_model(str(out))
    tok = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    batch = tok([r["source"] for r in rows], text_target=[r["target"] for r in rows], padding=True)
    labels = torch.tensor(batch["labels"])
    labels[labels == tok.pad_token_id] = -100
    with torch.no_grad():  # (one eval batch of all 4 rows: T5's own mean over the labelled tokens)
        own = delta.eval()(input_ids=torch.tensor(batch["input_ids"]),
                           attention_mask=torch.tensor(batch["attention_mask"]), labels=labels).loss.item()  # fmt: skip
    assert abs(smoothed - own) > 0.05

    (out / MARKS).write_text(json.dumps({"quant_skip_rule": 2}))  # a run begun before 6874e32
    with open(out / "report.md", "a", encoding="utf-8") as fh:
        fh.write(IGNORED_LINE)
    capsys.readouterr()
    assert evaluate(str(out))["eval_loss"] == pytest.approx(own, rel=1e-5)
    assert f"deltatune eval: note: {OLD_NOTE}" in capsys.readouterr().err.splitlines()


def _t5_without_the_key(tmp_path, keep_in_generation_config: bool):
    """A tiny T5 whose config.json has no decoder_start_token_id key (T5Config declares no such field)."""
    from transformers import T5Config, T5ForConditionalGeneration

    ids = {"decoder_start_token_id": 0} if keep_in_generation_config else {}
    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=16, num_layers=1,
                                                num_heads=2, **ids))  # fmt: skip
    model.save_pretrained(tmp_path / "t5")
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    config.pop("decoder_start_token_id", None)
    (tmp_path / "t5" / "config.json").write_text(json.dumps(config))
    return T5ForConditionalGeneration.from_pretrained(tmp_path / "t5")


@pytest.mark.parametrize("kept", [True, False])
def test_a_t5_config_without_the_decoder_start_key_is_refused_before_training(tmp_path, kept):
    """T5's _shift_right reads config.decoder_start_token_id, an AttributeError where config.json has no such key
    (T5Config declares none in transformers 5.25; generation_config.json may keep it): the check's catch-all let
    it pass, and the run failed in its first step. Now refused naming the model, and the generation config's id
    where it has one."""
    from deltatune.train.seq2seq import check_decoder_start

    model = _t5_without_the_key(tmp_path, kept)
    assert not hasattr(model.config, "decoder_start_token_id")
    with pytest.raises(AttributeError, match="decoder_start_token_id"):  # what the first step met
        model(input_ids=torch.tensor([[5, 6]]), labels=torch.tensor([[7, 3]]))
    with pytest.raises(ConfigError) as refused:
        check_decoder_start(SimpleNamespace(model=SimpleNamespace(name_or_path="t5")), model)
    kept_note = " (its generation_config.json has decoder_start_token_id=0: copy it there)" if kept else ""
    assert str(refused.value) == (
        "model t5: its config has no decoder_start_token_id, the id its decoder's input starts from (the labels "
        "shifted right after it; T5 uses the pad id, BART the EOS id): set it in the model's config.json"
        f"{kept_note} (run_summarization refuses such a model too)"
    )
    assert (model.generation_config.decoder_start_token_id == 0) is kept


def _s2s_cfg(tmp_path, label_smoothing_factor=None, **data):
    return build({"stage": "seq2seq", "data": {"train": _rows(tmp_path), "source_column": "source",
                                               "target_column": "target", **data},
                  "train": {"label_smoothing_factor": label_smoothing_factor}})  # fmt: skip


def test_check_room_counts_the_source_prefix(tmp_path):
    """data.source_prefix is encoded before each source: MiniLM's "summarize: " is 4 tokens, so at
    data.max_length=3 every source was cut to '[CLS] sum [SEP]', no token of its text, and went through. Now
    refused naming the key; 7 keeps one token of text."""
    from deltatune.train.seq2seq import prepare_seq2seq

    tok = tokenizer()
    cut = tok("summarize: a b c 0", truncation=True, max_length=3)["input_ids"]
    assert tok.convert_ids_to_tokens(cut) == ["[CLS]", "sum", "[SEP]"]
    with pytest.raises(ConfigError) as refused:
        prepare_seq2seq(_s2s_cfg(tmp_path, max_length=3, source_prefix="summarize: "), tok)
    assert str(refused.value) == (
        "data.max_length=3: the tokenizer adds 2 special tokens and data.source_prefix 'summarize: ' 4 more to each "
        "source, which leaves no room for its text (cut to 6 or fewer tokens, a source keeps no token of its "
        "text); set data.max_length to 7 or more"
    )
    train = prepare_seq2seq(_s2s_cfg(tmp_path, max_length=7, source_prefix="summarize: "), tok).train
    assert {tuple(tok.convert_ids_to_tokens(ex["input_ids"])[5:]) for ex in train} == {("a", "[SEP]")}


class _NoTarget:
    """A tokenizer (stand-in) that cannot encode a target: no ``text_target``."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def __call__(self, text, **kwargs):
        return self.tok(text, **kwargs)


def test_check_room_of_a_tokenizer_without_text_target_checks_the_source_only():
    """seq2seq's check_room called ``tok(text_target="")`` bare: a tokenizer without it raised TypeError from the
    check (cls's and tag's check_room skip a tokenizer that cannot count). Now that side is not checked, the other
    is."""
    from deltatune.train.seq2seq import check_room

    tok = _NoTarget(tokenizer())
    with pytest.raises(TypeError):
        tok(text_target="")
    check_room(tok, 16, 2)  # (target side not counted; was: TypeError)
    with pytest.raises(ConfigError, match=r"^data\.max_length=2: the tokenizer adds 2 special tokens to each source"):
        check_room(tok, 2, 16)


def test_token_loss_smoothing_is_label_smoothers_and_seq2seq_uses_it(tmp_path):
    """seq2seq's own smoothed_token_loss copied shifted_token_loss's smoothing branch; now both are
    loss.smoothed_cross_entropy, through token_loss's label_smoothing: equal to transformers' LabelSmoother
    (shift_labels False for aligned labels, True for shifted ones), and seq2seq's trainer uses token_loss."""
    from transformers.trainer_pt_utils import LabelSmoother

    from deltatune.loss import shifted_token_loss, token_loss
    from deltatune.train.seq2seq import prepare_seq2seq
    from tests.tiny import word_tokenizer

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:] = -100
    labels[2, :2] = -100
    out = {"logits": logits}
    for e in (0.1, 0.3):
        want = LabelSmoother(epsilon=e)(out, labels)
        assert float(token_loss(out, labels, label_smoothing=e)) == pytest.approx(float(want), abs=1e-6)
        want = LabelSmoother(epsilon=e)(out, labels, shift_labels=True)
        assert float(shifted_token_loss(out, labels, label_smoothing=e)) == pytest.approx(float(want), abs=1e-6)
    n = int((labels != -100).sum())  # (the accumulated step's count: the same sum over it)
    assert float(token_loss(out, labels, n, label_smoothing=0.1)) == pytest.approx(
        float(LabelSmoother(epsilon=0.1)(out, labels)), abs=1e-6
    )
    assert token_loss(out, labels, label_smoothing=0.0) == token_loss(out, labels)
    loss = prepare_seq2seq(_s2s_cfg(tmp_path, 0.1), word_tokenizer()).trainer_class.keywords["loss"]
    assert loss.func is token_loss and loss.keywords == {"label_smoothing": 0.1}


def _old_interrupted_run(tmp_path, base: str, name: str) -> tuple[dict, str]:
    """A seq2seq run (train.label_smoothing_factor 0.1, two steps, a checkpoint each) made old and interrupted: the
    marks of a run begun before 6874e32, stopped after checkpoint-1 (no report.md, metrics.json, checkpoint-2)."""
    import shutil

    from deltatune.train.run import train

    out = tmp_path / name
    recipe = _recipe(tmp_path, base, str(out))
    recipe["train"].update(max_steps=2, save_steps=1, eval_steps=None)
    train(build(recipe))
    (out / "deltatune_marks.json").write_text(json.dumps({"quant_skip_rule": 2}))
    for name in ("report.md", "metrics.json"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoint-2")
    return recipe, str(out)


def _plain_loss(base: str, out: str, tmp_path) -> float:
    """T5's own loss (no smoothing) of the run's adapter on its one eval batch of the 4 rows."""
    from transformers import AutoTokenizer

    from deltatune.train.run_load import load_adapter_model

    delta, _ = load_adapter_model(out)
    tok = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    batch = tok([r["source"] for r in rows], text_target=[r["target"] for r in rows], padding=True)
    labels = torch.tensor(batch["labels"])
    labels[labels == tok.pad_token_id] = -100
    with torch.no_grad():
        return delta.eval()(input_ids=torch.tensor(batch["input_ids"]),
                            attention_mask=torch.tensor(batch["attention_mask"]), labels=labels).loss.item()  # fmt: skip


def test_an_old_runs_resume_rewrites_its_recipe_and_marks_it(tmp_path, capsys):
    """An old unmarked seq2seq run resumed with train.label_smoothing_factor dropped (null: what it trained) was no
    change: run.yaml kept 0.1, report.md was rewritten without the "ignored it" line and no mark was written, so
    ``deltatune eval`` then scored it smoothed, with no note. Now the resume writes run.yaml as it trains from now
    on (null) and adds the mark (the marks it had kept): eval scores T5's own loss. And a run resumed with
    --resume-changed (0.1 kept: smoothed from now on) is marked too, so a plain --resume after an interruption
    compares with its run.yaml as written (it was refused: 'None -> 0.1', a false note)."""
    import shutil

    from deltatune.train.evaluation import evaluate
    from deltatune.train.run import _check_resume_recipe, _recipe_dict, train
    from tests.tiny import save_tiny

    base = save_tiny(tmp_path / "t5", "t5")
    recipe, out = _old_interrupted_run(tmp_path, base, "run")
    shutil.copytree(out, tmp_path / "run2")

    dropped = {**recipe, "train": {**recipe["train"], "label_smoothing_factor": None}}
    train(build(dropped), resume=True)
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["train"]["label_smoothing_factor"] is None
    marks = json.loads((tmp_path / "run" / "deltatune_marks.json").read_text())
    assert marks == {"quant_skip_rule": 2, "seq2seq_label_smoothing": 1}  # (the old quantize rule kept)
    capsys.readouterr()
    assert evaluate(out)["eval_loss"] == pytest.approx(_plain_loss(base, out, tmp_path), rel=1e-5)
    assert "note" not in capsys.readouterr().err

    out2 = str(tmp_path / "run2")
    changed = {**recipe, "output": {"dir": out2}, "train": {**recipe["train"], "max_steps": 3}}
    train(build(changed), resume=True, resume_changed=True)
    assert yaml.safe_load((tmp_path / "run2" / "run.yaml").read_text())["train"]["label_smoothing_factor"] == 0.1
    assert json.loads((tmp_path / "run2" / "deltatune_marks.json").read_text())["seq2seq_label_smoothing"] == 1
    for name in ("report.md", "metrics.json"):  # interrupted after checkpoint-2, then resumed plainly
        (tmp_path / "run2" / name).unlink()
    shutil.rmtree(tmp_path / "run2" / "checkpoint-3")
    assert _check_resume_recipe(out2, _recipe_dict(build(changed)), False) is False  # (was refused)


def test_an_old_runs_resume_refused_leaves_its_recipe_and_marks(tmp_path):
    """The rewrite is the resume's: a refused one (another key changed) writes nothing; a caption run read with
    its note (data.val_size ignored) resumes as before, its run.yaml kept."""
    from deltatune.train.runs import resume_rewrites

    check, folder, recipe = _resume_check(tmp_path)
    before = {n: (tmp_path / "run" / n).read_text() for n in ("run.yaml", "deltatune_marks.json")}
    changed = {**recipe, "train": {**recipe["train"], "label_smoothing_factor": None, "lr": 1.0}}
    with pytest.raises(ConfigError, match=r"train\.lr"):
        check(folder, changed, False)
    assert {n: (tmp_path / "run" / n).read_text() for n in before} == before
    dropped = {**recipe, "train": {**recipe["train"], "label_smoothing_factor": None}}
    assert check(folder, dropped, False) is True  # (no change; run.yaml written anew as the run begins again)
    assert resume_rewrites("caption", "stage caption ignored data.val_size=0.2 ...") is False
    assert resume_rewrites("seq2seq", "") is False


def test_no_eval_data_of_an_old_seq2seq_run_is_refused_as_no_evaluation_data(tmp_path):
    """An old seq2seq run without eval data: the refusal gave the smoothing note (caption's reason why none is held
    out) in place of "no evaluation data"; now the plain message, caption's note kept for caption."""
    from deltatune.train import run as run_mod
    from deltatune.train.evaluation import evaluate

    folder = tmp_path / "run"
    folder.mkdir()
    recipe = run_mod._recipe_dict(_s2s_cfg(tmp_path, label_smoothing_factor=0.1))
    (folder / "run.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(ConfigError) as refused:
        evaluate(str(folder))
    assert str(refused.value) == "no evaluation data: pass --data FILE"


def _metaspace_tokenizer():
    """A T5-like tokenizer: Metaspace ('▁' before each word, a trailing space its own '▁'), </s> after the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁summarize", -1.0), (":", -1.0),
             ("▁hello", -1.0), ("▁world", -1.0)]  # fmt: skip
    t = Tokenizer(models.Unigram(vocab, unk_id=2))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def test_check_room_does_not_count_the_prefixs_trailing_space():
    """ "summarize: " alone encodes its trailing space as '▁' (T5; BART's 'Ġ'), which in a row merges into the
    first word: at data.max_length 4 a row keeps '▁hello', yet 4 was refused. Now the prefix is counted stripped:
    4 passes, 3 (a row keeps no word) is refused."""
    from deltatune.train.seq2seq import check_room

    tok = _metaspace_tokenizer()
    ids = tok.convert_ids_to_tokens
    assert ids(tok("summarize: ")["input_ids"]) == ["▁summarize", ":", "▁", "</s>"]
    assert ids(tok("summarize: hello world", truncation=True, max_length=4)["input_ids"])[2] == "▁hello"
    assert ids(tok("summarize: hello world", truncation=True, max_length=3)["input_ids"]) == [
        "▁summarize",
        ":",
        "</s>",
    ]
    check_room(tok, 4, 16, "summarize: ")  # (was refused)
    with pytest.raises(ConfigError) as refused:
        check_room(tok, 3, 16, "summarize: ")
    assert str(refused.value) == (
        "data.max_length=3: the tokenizer adds 1 special token and data.source_prefix 'summarize: ' 2 more to each "
        "source, which leaves no room for its text (cut to 3 or fewer tokens, a source keeps no token of its text); "
        "set data.max_length to 4 or more"
    )


def test_an_interrupt_after_a_run_finished_does_not_mark_it_stopped(tmp_path, monkeypatch):
    """t2i draws validation/final.png after the save (run.py's ``finish``): a KeyboardInterrupt there wrote
    stopped.json into the finished run (metrics.json written), so the board showed it stopped. Now a folder
    holding the finished file is not marked; one stopped before it still is."""
    from deltatune.train.run import _mark_stopped, train
    from deltatune.train.trainer import DeltaTrainer
    from tests.tiny import save_tiny

    def draw_after_save(self):
        def finish():
            raise KeyboardInterrupt

        return finish

    monkeypatch.setattr(DeltaTrainer, "draw_after_save", draw_after_save, raising=False)
    base = save_tiny(tmp_path / "t5", "t5")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(build(_recipe(tmp_path, base, str(out))))
    assert (out / "metrics.json").is_file() and not (out / "stopped.json").exists()
    (out / "metrics.json").unlink()
    _mark_stopped(str(out), KeyboardInterrupt())
    assert json.loads((out / "stopped.json").read_text()) == {"reason": "KeyboardInterrupt: ", "interrupted": True}
