"""Probe 21 of the seq2seq stage against transformers' Seq2SeqTrainer, DataCollatorForSeq2Seq and LabelSmoother
(run_summarization's --label_smoothing_factor), on tiny T5 / BART models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_s2s_probe18 import _Echo

from deltatune.train.config import build
from deltatune.train.seq2seq import prepare_seq2seq
from tests.tiny import tiny_model, word_tokenizer

SOURCES = ["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w10 w11 w12", "w13"]
TARGETS = ["w20 w21", "w22 w23 w24 w25 w26", "w27", "w28 w29 w30"]


def _cfg(tmp_path, **train):
    import json

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in zip(SOURCES, TARGETS)))
    return build({"stage": "seq2seq", "data": {"train": str(path), "eval": str(path), "source_column": "source",
                                               "target_column": "target", "max_length": 16},
                  "train": {"generation_max_new_tokens": 8, **train}})  # fmt: skip


def _model(family: str, tok):
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.bos_token_id)
    wide = {"t5": {"initializer_factor": 2.0}, "bart": {"init_std": 0.5}}[family]  # (logits far from uniform)
    return tiny_model(family, vocab_size=len(tok), **ids, **wide).eval()


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_label_smoothing_is_seq2seq_trainers(tmp_path, family):
    """train.label_smoothing_factor was read by pt and sft only: a seq2seq run named it ignored and trained on the
    plain cross-entropy, where run_summarization's --label_smoothing_factor 0.1 (Seq2SeqTrainer's LabelSmoother, the
    decoder inputs from the labels by DataCollatorForSeq2Seq) smooths the training and the eval loss. Now the
    stage's loss is the smoother's on the same batch, with and without the accumulated step's item count, and the
    eval loss equal to Seq2SeqTrainer.evaluate's (one batch of all rows)."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainingArguments

    import deltatune as dt

    tok = word_tokenizer()
    cfg = _cfg(tmp_path, label_smoothing_factor=0.1)
    prepared = prepare_seq2seq(cfg, tok)
    base = _model(family, tok)
    targets = ["q", "v"] if family == "t5" else ["q_proj", "v_proj"]
    delta = dt.get_delta_model(
        _model(family, tok), dt.LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, target_modules=targets)
    )
    plain = dict(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, per_device_eval_batch_size=4)
    ours = prepared.trainer_class(model=delta, args=TrainingArguments(**plain, remove_unused_columns=False,
                                                                      label_names=["labels"], prediction_loss_only=True),
                                  data_collator=prepared.collator, eval_dataset=prepared.eval)  # fmt: skip
    ref = Seq2SeqTrainer(model=base, args=Seq2SeqTrainingArguments(**plain, label_smoothing_factor=0.1),
                         data_collator=DataCollatorForSeq2Seq(tok, model=base, label_pad_token_id=-100),
                         eval_dataset=prepared.eval)  # fmt: skip
    batch, ref_batch = prepared.collator(prepared.train), ref.data_collator(prepared.train)
    assert "decoder_input_ids" in ref_batch and "decoder_input_ids" not in batch  # (ours builds them in compute_loss)
    delta.eval()
    with torch.no_grad():
        plain_loss = base(**{k: v for k, v in ref_batch.items()}).loss
        for items in (None, 23):
            got = ours.compute_loss(delta, dict(batch), num_items_in_batch=items)
            want = ref.compute_loss(base, dict(ref_batch), num_items_in_batch=items)
            assert abs(float(got - want)) < 1e-5, (items, float(got), float(want))
    got_eval, want_eval = ours.evaluate()["eval_loss"], ref.evaluate()["eval_loss"]
    assert got_eval == pytest.approx(want_eval, abs=1e-5) and abs(got_eval - float(plain_loss)) > 0.05


def test_no_label_smoothing_keeps_the_plain_token_loss(tmp_path):
    from deltatune.train.trainer import TokenLossTrainer

    for value in (None, 0.0):
        assert prepare_seq2seq(_cfg(tmp_path, label_smoothing_factor=value), word_tokenizer()).trainer_class is (
            TokenLossTrainer
        )


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_a_model_without_a_decoder_start_is_refused_before_training_naming_its_config(tmp_path, family):
    """run_summarization refuses a model whose config has no decoder_start_token_id ("Make sure that
    `config.decoder_start_token_id` is correctly defined"); a seq2seq run on one passed the checks and failed in its
    first step inside transformers (T5's _shift_right ValueError, BART's "TypeError: can't assign a NoneType").
    Now the run's checks (check_context, before training) refuse it in one line naming the model."""
    from types import SimpleNamespace

    from deltatune.config import ConfigError
    from deltatune.train.checks import check_context

    tok = word_tokenizer()
    model = _model(family, tok)
    model.config.decoder_start_token_id = None
    model.generation_config.decoder_start_token_id = None  # (one kept there is named: tests/test_s2s_fix21.py)
    with pytest.raises((ValueError, TypeError)):  # what the first step met
        model(input_ids=torch.tensor([[5, 6]]), labels=torch.tensor([[7, 3]]))
    cfg = _cfg(tmp_path)
    cfg.model.name_or_path = "some/model"
    rows = SimpleNamespace(train=[{"input_ids": [5], "labels": [5]}], eval=None)
    with pytest.raises(ConfigError) as refused:
        check_context(cfg, rows, model)
    assert str(refused.value) == (
        "model some/model: its config has no decoder_start_token_id, the id its decoder's input starts from (the "
        "labels shifted right after it; T5 uses the pad id, BART the EOS id): set it in the model's config.json "
        "(run_summarization refuses such a model too)"
    )
    model.config.decoder_start_token_id = tok.bos_token_id
    check_context(cfg, rows, model)


def test_mbart_without_a_decoder_start_is_not_refused():
    """mBART's decoder input starts from the target's last token (its language code), not from the config's
    decoder_start_token_id: without one it trains, and the check lets it."""
    from transformers import MBartConfig, MBartForConditionalGeneration

    from deltatune.train.seq2seq import check_decoder_start

    config = MBartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32,
                         pad_token_id=1, eos_token_id=2, decoder_start_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = MBartForConditionalGeneration(config).eval()
    assert model.config.decoder_start_token_id is None
    assert model(input_ids=torch.tensor([[5, 6, 2]]), labels=torch.tensor([[7, 2, 9]])).loss > 0
    check_decoder_start(SimpleNamespace(model=SimpleNamespace(name_or_path="m")), model)


E2E_TARGETS = [
    "A coffee shop in the city centre area called Blue Spice.",
    "Alimentum is not a family-friendly place, located in city centre.",
    "The Vaults is an Indian restaurant by the riverside, near Rainbow Vegetarian Café. It's kid friendly.",
]


def test_generations_are_scored_against_the_targets_as_the_tokenizer_decodes_them(tmp_path):
    """run_summarization / run_translation score the generations against the labels decoded (skip_special_tokens):
    with an uncased tokenizer (a BERT2BERT's) a generation equal to the target's ids is lower case, and so are the
    references. deltatune scored it against the raw target: E2E's "A coffee shop ... called Blue Spice." against the
    model's own "a coffee shop ... called blue spice." gave BLEU 0.49 for a perfect generation (the reference: 1.0).
    Now BLEU and the ROUGEs equal the reference's (sacrebleu and rouge-score on the decoded labels)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    from deltatune.data.load import Row
    from deltatune.train.seq2seq import generation_metrics
    from tests.tiny import tokenizer

    tok = tokenizer()  # MiniLM's uncased WordPiece
    data = [{"source": f"row {i}", "target": t} for i, t in enumerate(E2E_TARGETS)]  # (E2E NLG test targets)
    rows = [Row(r, f"e2e:{i}") for i, r in enumerate(data, 1)]
    labels = tok(text_target=[r["target"] for r in data])["input_ids"]
    model = _Echo([[tok.pad_token_id, *ids] for ids in labels], tok.pad_token_id)  # (the decoder start first)
    cfg = _cfg(tmp_path, generation_max_new_tokens=64)
    cfg.data.max_length = 128
    got = generation_metrics(model, tok, rows, cfg, batch_size=4)
    decoded = tok.batch_decode(labels, skip_special_tokens=True)  # run_summarization's decoded_labels (and preds)
    assert decoded != [r["target"] for r in data]  # (lower case: what the test is about)
    assert got["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(decoded, [decoded]).score / 100, abs=1e-12)
    assert got["eval_bleu"] == pytest.approx(1.0)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = sum(scorer.score(t, p)[key].fmeasure for p, t in zip(decoded, decoded)) / len(decoded)
        assert got[f"eval_{key}"] == pytest.approx(want, abs=1e-12) and want == 1.0


@pytest.mark.parametrize("limit", [1, 2])
@pytest.mark.parametrize(("key", "what"), [("max_length", "source"), ("max_target_length", "target")])
def test_a_limit_with_no_room_past_the_special_tokens_is_refused_naming_the_key(tmp_path, key, what, limit):
    """A tokenizer cannot cut a text to fewer tokens than the special tokens it adds (MiniLM's [CLS] and [SEP]): cut
    to 2 it keeps them alone, to 1 it logs an error and returns the whole text. data.max_length (or
    data.max_target_length) 2 trained on empty sources (targets), 1 let every one through whole, past the limit; now
    the key is refused in one line, and 3 cuts to one token of text."""
    from deltatune.config import ConfigError
    from tests.tiny import tokenizer

    tok = tokenizer()
    cut = tok("w1 w2 w3 w4", truncation=True, max_length=limit)["input_ids"]
    whole, alone = tok("w1 w2 w3 w4")["input_ids"], [tok.cls_token_id, tok.sep_token_id]
    assert cut == (whole if limit == 1 else alone)  # (the tokenizer's own cut)
    with pytest.raises(ConfigError) as refused:
        prepare_seq2seq(_limited(tmp_path, key, limit), tok)
    assert str(refused.value) == (
        f"data.{key}={limit}: the tokenizer adds 2 special tokens to each {what}, which leaves no room for its text "
        f"(cut to 2 it keeps them alone; below, it cuts nothing); set data.{key} to 3 or more"
    )
    column = "input_ids" if what == "source" else "labels"
    assert {len(ex[column]) for ex in prepare_seq2seq(_limited(tmp_path, key, 3), tok).train} == {3}
    assert prepare_seq2seq(_limited(tmp_path, key, 1), word_tokenizer()).train  # (no special tokens: 1 is room)


def _limited(tmp_path, key: str, limit: int):
    cfg = _cfg(tmp_path)
    setattr(cfg.data, key, limit)
    return cfg
