"""Probe 18 of the seq2seq and caption stages, their generation-based evaluation and metrics, against transformers'
captioning / summarization examples, sacrebleu and rouge-score."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from deltatune.config import ConfigError
from deltatune.data.images import ImageRow
from deltatune.data.load import DataError, Row
from deltatune.data.tasks import encode_seq2seq
from deltatune.train import caption as C
from deltatune.train.config import build
from deltatune.train.seq2seq import check_positions, generation_metrics
from tests.tiny import tiny_model, word_tokenizer


def _no_eos_tokenizer():
    tok = word_tokenizer()
    tok.eos_token = None
    assert tok.eos_token_id is None
    return tok


def test_caption_of_max_length_tokens_without_eos_is_kept_whole():
    # transformers' captioning examples: tokenizer(captions, max_length=N, truncation=True); no EOS is appended
    # where the tokenizer has none, so a caption of N tokens is whole (it was cut to N - 1 and counted as cut)
    tok = _no_eos_tokenizer()
    texts = ["w1 w2 w3 w4", "w1 w2 w3 w4 w5", "w1 w2"]
    rows = [ImageRow("x.png", None, f"c.jsonl:{i + 1}", t) for i, t in enumerate(texts)]
    ids, cut = C.encode_captions(rows, tok, max_length=4)
    assert ids == [tok(t, add_special_tokens=False, truncation=True, max_length=4)["input_ids"] for t in texts]
    assert [len(i) for i in ids] == [4, 4, 2] and cut == 1


def test_caption_with_eos_keeps_it_within_max_length():
    tok = word_tokenizer()
    rows = [ImageRow("x.png", None, "c.jsonl:1", "w1 w2 w3"), ImageRow("y.png", None, "c.jsonl:2", "w1 w2 w3 w4")]
    ids, cut = C.encode_captions(rows, tok, max_length=4)
    eos = tok.eos_token_id
    assert ids == [[*tok("w1 w2 w3", add_special_tokens=False)["input_ids"], eos]] * 2 and cut == 1


class _Echo(torch.nn.Module):
    """A stand-in seq2seq model whose generate returns fixed ids per call (the texts to score), pad-filled."""

    def __init__(self, outputs: list[list[int]], pad: int) -> None:
        super().__init__()
        self.w, self.outputs, self.pad = torch.nn.Parameter(torch.zeros(1)), list(outputs), pad

    def generate(self, input_ids, **kwargs):
        rows = [self.outputs.pop(0) for _ in range(len(input_ids))]
        width = max(map(len, rows))
        return torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])


def _cfg():
    return build({"stage": "seq2seq", "data": {"train": "rows.jsonl", "source_column": "source",
                                               "target_column": "target", "max_length": 16}})  # fmt: skip


@pytest.mark.parametrize("refs", ["w1 w2", [1, 2], ["w1", ""]])
def test_eval_refuses_the_references_training_refuses(refs):
    """deltatune eval --data reads its file as a train split, whose references column is not checked: a text there
    was scored against the target instead (a list of numbers as their reprs); now the same line as training's."""
    tok = word_tokenizer()
    row = Row({"source": "w1 w2", "target": "w3", "references": refs}, "e.jsonl:3")
    with pytest.raises(DataError) as trained:
        encode_seq2seq([row], tok, "source", "target", 16, 16)
    model = _Echo([[0, 5, 6, 3]], tok.pad_token_id)
    with pytest.raises(DataError) as evaluated:
        generation_metrics(model.train(), tok, [row], _cfg())
    assert str(evaluated.value) == str(trained.value) and str(trained.value).startswith("e.jsonl:3: column 'refer")
    assert model.training and len(model.outputs) == 1  # nothing generated, the mode as it was


def test_generation_metrics_equal_rouge_score_and_sacrebleu_on_references():
    tok = word_tokenizer()
    rows = [
        Row({"source": "w1", "target": "w1 w2 w3", "references": ["w1 w2 w3", "w4 w5"]}, "e:1"),
        Row({"source": "w2", "target": "w7 w8"}, "e:2"),
        Row({"source": "w3 w4", "target": "w9", "references": []}, "e:3"),
    ]
    texts = ["w4 w5 w1", "w7 w8", ""]
    out = [[0, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id] for t in texts]
    got = generation_metrics(_Echo(out, tok.pad_token_id), tok, rows, _cfg(), batch_size=2)
    refs = [["w1 w2 w3", "w4 w5"], ["w7 w8"], ["w9"]]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        want = sum(scorer.score_multi(r, t)[key].fmeasure for t, r in zip(texts, refs)) / 3
        assert got[f"eval_{key}"] == pytest.approx(want, abs=1e-12)
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    assert got["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(texts, streams).score / 100, abs=1e-12)
    # run_summarization's gen_len: the ids other than the pad (the decoder start is the pad here, as T5's)
    assert got["eval_gen_len"] == sum(len(o) - 1 for o in out) / 3


def _bart(tok):
    model = tiny_model("bart", vocab_size=len(tok), max_position_embeddings=8, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=2)  # fmt: skip
    model.generation_config.eos_token_id = None  # (never stops: the generations run to max_new_tokens)
    return model


def test_generations_past_barts_decoder_positions_are_refused_in_one_line_before_generating():
    """BART's decoder has max_position_embeddings learned positions: train.generation_max_new_tokens past them failed
    with torch's "IndexError: index out of range in self", after the whole training (the eval's generations)."""
    tok = word_tokenizer()
    model, rows = _bart(tok), [Row({"source": "w1 w2", "target": "w3"}, "e.jsonl:1")]
    cfg = _cfg()
    cfg.train.generation_max_new_tokens = 9
    with pytest.raises(IndexError):  # transformers' own limit: 8 new tokens read 8 positions (start + 7), 9 do not
        model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=9, do_sample=False)
    assert model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=8, do_sample=False).shape == (1, 9)
    with pytest.raises(ConfigError, match=r"^train.generation_max_new_tokens=9: .* decoder's 8 \(.*\); set train"):
        generation_metrics(model.train(), tok, rows, cfg)
    assert model.training
    cfg.train.generation_max_new_tokens = 8
    assert generation_metrics(model, tok, rows, cfg)["eval_gen_len"] == 9  # the start and 8 new tokens (no pad)


def test_sources_and_targets_past_barts_positions_are_refused_naming_the_key():
    tok = word_tokenizer()
    model, cfg = _bart(tok), _cfg()
    cfg.train.generation_max_new_tokens = 8
    with pytest.raises(IndexError):  # what the first step did
        model(input_ids=torch.full((1, 9), 5), labels=torch.full((1, 2), 5))
    fits = SimpleNamespace(train=[{"input_ids": [5] * 8, "labels": [5] * 8}], eval=None)
    check_positions(cfg, model, fits)
    model(input_ids=torch.full((1, 8), 5), labels=torch.full((1, 8), 5))  # (transformers' limit: 8 fit)
    long_source = SimpleNamespace(train=fits.train, eval=[{"input_ids": [5] * 9, "labels": [5]}])
    with pytest.raises(ConfigError, match=r"^data.max_length=16: the longest eval source is 9 tokens, more than the "
                                          r"model's encoder's 8 positions; set data.max_length to 8 or less"):  # fmt: skip
        check_positions(cfg, model, long_source)
    long_target = SimpleNamespace(train=[{"input_ids": [5], "labels": [5] * 10}], eval=None)
    with pytest.raises(ConfigError, match=r"^data.max_target_length=128: the longest train target is 10 tokens"):
        check_positions(cfg, model, long_target)
    check_positions(cfg, tiny_model("t5", vocab_size=len(tok)), long_target)  # T5's relative positions: no limit
    cfg.train.generation_max_new_tokens = 9
    check_positions(cfg, model, fits)  # no eval rows: nothing generated
    with pytest.raises(ConfigError, match=r"^train.generation_max_new_tokens=9: "):
        check_positions(cfg, model, SimpleNamespace(train=fits.train, eval=fits.train))


def test_a_seq2seq_run_checks_barts_positions_before_training():
    """check_context skipped every encoder-decoder (for T5's relative positions): a BART run with sources past its
    positions failed in the first step, with generation_max_new_tokens past them after the whole training."""
    from deltatune.train.checks import check_context

    tok = word_tokenizer()
    rows = SimpleNamespace(train=[{"input_ids": [5], "labels": [5]}], eval=[{"input_ids": [5], "labels": [5]}])
    with pytest.raises(ConfigError, match=r"^train.generation_max_new_tokens=64: .* decoder's 8 "):
        check_context(_cfg(), rows, _bart(tok))


def test_the_generation_check_names_the_positions_a_generation_can_read_a_worst_case():
    """transformers fails only where a generation reaches the decoder's positions: a model that says EOS first
    generates with max_new_tokens=64 on 8 positions. The check still refuses up front (one row that does not stop
    would fail after the whole training), saying the generations *can* read up to 64 positions (it said they read
    them, as a fact)."""
    tok = word_tokenizer()
    model = _bart(tok)
    with torch.no_grad():
        model.final_logits_bias[0, tok.eos_token_id] = 100.0  # EOS first: the generation stops at once
    model.generation_config.eos_token_id = tok.eos_token_id
    out = model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=64, do_sample=False)
    assert out.tolist() == [[2, tok.eos_token_id]]  # (the start, then EOS)
    with pytest.raises(ConfigError) as refused:
        check_positions(_cfg(), model)
    assert str(refused.value) == (
        "train.generation_max_new_tokens=64: the eval's generations can read up to 64 positions, more than the "
        "model's decoder's 8 (one that has not stopped by then fails, after the whole training); set "
        "train.generation_max_new_tokens to 8 or less"
    )


def _fsmt():
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    torch.manual_seed(0)
    config = FSMTConfig(langs=["en", "de"], src_vocab_size=50, tgt_vocab_size=50, d_model=16, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                        decoder_ffn_dim=16, max_position_embeddings=8, pad_token_id=1, decoder_start_token_id=2,
                        eos_token_id=2, bos_token_id=0)  # fmt: skip
    return FSMTForConditionalGeneration(config).eval()


def test_fsmts_sinusoidal_positions_grow_and_are_not_refused():
    """FSMT's SinusoidalPositionalEmbedding is an nn.Embedding whose forward grows its table (``make_weight``) to a
    longer input: 20 tokens on 8 positions run; positions() named it a limit of 8 and refused them."""
    from deltatune.train.seq2seq import positions

    model = _fsmt()
    out = model(input_ids=torch.full((1, 20), 5), labels=torch.full((1, 20), 5))
    assert out.logits.shape == (1, 20, 50)
    cfg = _cfg()
    cfg.data.max_length, cfg.train.generation_max_new_tokens = 32, 24
    long = SimpleNamespace(
        train=[{"input_ids": [5] * 20, "labels": [5] * 20}], eval=[{"input_ids": [5] * 20, "labels": [5] * 20}]
    )
    assert (positions(model, "encoder"), positions(model, "decoder")) == (None, None)
    check_positions(cfg, model, long)


def _adapted(method: str, library: str):
    """A tiny BART (8 positions) with 2 virtual tokens of ``method`` (prompt_tuning, p_tuning, prefix_tuning), by
    deltatune or peft."""
    import peft

    import deltatune as dt

    tok = word_tokenizer()
    torch.manual_seed(0)
    configs = {
        "deltatune": {"prompt_tuning": dt.PromptTuningConfig, "p_tuning": dt.PromptEncoderConfig,
                      "prefix_tuning": dt.PrefixTuningConfig},
        "peft": {"prompt_tuning": peft.PromptTuningConfig, "p_tuning": peft.PromptEncoderConfig,
                 "prefix_tuning": peft.PrefixTuningConfig},
    }  # fmt: skip
    config = configs[library][method](task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2)
    wrap = dt.get_delta_model if library == "deltatune" else peft.get_peft_model
    return wrap(_bart(tok), config).eval()


@pytest.mark.parametrize("library", ["deltatune", "peft"])
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_a_token_adapters_virtual_tokens_are_counted_where_they_land(method, library):
    """Prompt tuning's and P-tuning's virtual tokens go in front of the encoder's input, prefix tuning's into the
    decoder's cache (which moves its positions): a source of 7 tokens (prompt) or a target of 7 (prefix) passed the
    check on 8 positions, then failed in the first step (peft: torch's IndexError; deltatune: its token adapters'
    ValueError); 6 run."""
    model = _adapted(method, library)
    part = "decoder" if method == "prefix_tuning" else "encoder"
    cfg = _cfg()
    cfg.data.max_length = cfg.data.max_target_length = 16
    cfg.train.generation_max_new_tokens = 6

    def rows(length: int):
        source, target = (1, length) if part == "decoder" else (length, 1)
        return SimpleNamespace(train=[{"input_ids": [5] * source, "labels": [5] * target}], eval=None), (
            source,
            target,
        )

    def forward(source: int, target: int):
        mask = torch.ones(1, source, dtype=torch.long)
        return model(input_ids=torch.full((1, source), 5), attention_mask=mask, labels=torch.full((1, target), 5))

    over, (source, target) = rows(7)
    with pytest.raises(IndexError if library == "peft" else ValueError):
        forward(source, target)
    key, what = ("data.max_target_length", "target") if part == "decoder" else ("data.max_length", "source")
    with pytest.raises(ConfigError) as refused:
        check_positions(cfg, model, over)
    assert str(refused.value) == (
        f"{key}=16: the longest train {what} is 7 tokens and the adapter's 2 virtual tokens, more than the model's "
        f"{part}'s 8 positions; set {key} to 6 or less"
    )
    fits, (source, target) = rows(6)
    check_positions(cfg, model, fits)
    assert forward(source, target).logits.shape == (1, target, model.config.vocab_size)


def test_prefix_tunings_virtual_tokens_count_in_the_eval_generations():
    """deltatune's prefix is in the decoder's cache while it generates too: 7 new tokens read the start, 6 of them
    and the 2 virtual tokens (deltatune's 'positions needed' ValueError); prompt tuning's are in the encoder."""
    cfg, ids = _cfg(), torch.tensor([[5, 6]])
    model = _adapted("prefix_tuning", "deltatune")
    with pytest.raises(ValueError, match="^9 positions needed"):
        model.generate(input_ids=ids, max_new_tokens=7, do_sample=False)
    cfg.train.generation_max_new_tokens = 7
    with pytest.raises(ConfigError) as refused:
        check_positions(cfg, model)
    assert str(refused.value).startswith(
        "train.generation_max_new_tokens=7: the eval's generations can read up to 7 positions and the adapter's 2 "
        "virtual tokens, more than the model's decoder's 8 (one that"
    ) and str(refused.value).endswith("; set train.generation_max_new_tokens to 6 or less")
    assert model.generate(input_ids=ids, max_new_tokens=6, do_sample=False).shape == (1, 7)
    cfg.train.generation_max_new_tokens = 6
    check_positions(cfg, model)
    prompt = _adapted("prompt_tuning", "deltatune")
    assert prompt.generate(input_ids=ids, max_new_tokens=8, do_sample=False).shape == (1, 9)
    cfg.train.generation_max_new_tokens = 8
    check_positions(cfg, prompt)


def test_eval_data_with_sources_past_barts_positions_is_refused_before_the_loss_pass(tmp_path):
    """``deltatune eval --data``: the loss pass (the Trainer's evaluate) ran before generation_metrics' check, and
    failed inside torch (IndexError) on a source past BART's 8 positions; now the eval's check names data.max_length,
    and the override it asks for evaluates."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    from deltatune.train.evaluation import evaluate
    from tests.tiny import save_tiny

    base = save_tiny(tmp_path / "bart", "bart", max_position_embeddings=8)
    torch.manual_seed(0)
    config = LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, target_modules=["q_proj", "v_proj"])
    get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(base), config).save_pretrained(tmp_path / "adapter")
    data = tmp_path / "eval.jsonl"
    rows = [{"source": "a b c d e f g h i", "target": "a b"}, {"source": "a b", "target": "c d"}]  # 11 and 4 tokens
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(IndexError):  # what the loss pass met
        AutoModelForSeq2SeqLM.from_pretrained(base)(input_ids=torch.full((1, 11), 1000), labels=torch.full((1, 2), 5))
    with pytest.raises(ConfigError, match=r"^data.max_length=512: the longest eval source is 11 tokens, more than the "
                                          r"model's encoder's 8 positions; set data.max_length to 8 or less$"):  # fmt: skip
        evaluate(str(tmp_path / "adapter"), str(data))
    got = evaluate(str(tmp_path / "adapter"), str(data), ["data.max_length=8", "train.generation_max_new_tokens=8"])
    assert got["eval_loss"] > 0 and "eval_rougeL" in got


@pytest.mark.parametrize(
    ("value", "want"),
    [(None, None), ([], None), (["w1 w2", "w3"], ["w1 w2", "w3"]), ("w1 w2", DataError), ([1, 2], DataError),
     (["w1", " "], DataError), ({"a": "w1"}, DataError)],
)  # fmt: skip
def test_one_references_helper_reads_the_column_for_training_and_eval(value, want):
    """data/tasks.py's ``references`` holds the condition and the line that encode_seq2seq and seq2seq's
    _references each held word for word; both read the column through it."""
    from deltatune.data.tasks import references
    from deltatune.train.seq2seq import _references

    row = Row({"source": "w1", "target": "w4", **({} if value is None else {"references": value})}, "e.jsonl:2")
    if want is DataError:
        line = "e.jsonl:2: column 'references' must be a non-empty list of texts (the eval scores each generation "
        line += f"against its best one), got {repr(value)[:60]}"
        for read in (
            references,
            lambda r: _references(r, "target"),
            lambda r: encode_seq2seq([r], word_tokenizer(), "source", "target", 16, 16),
        ):
            with pytest.raises(DataError) as refused:
                read(row)
            assert str(refused.value) == line
        return
    assert references(row) == want
    assert _references(row, "target") == (want or ["w4"])


def test_generate_counts_an_encoder_decoders_prompt_answer_and_virtual_tokens_where_they_land():
    """``deltatune generate`` (chat.overflow) checked an encoder-decoder's prompt alone, with any adapter's virtual
    tokens: a prefix-tuned BART's 8-token prompt was refused (its prefix is in the decoder: it answers), and
    --max-new-tokens past BART's decoder's positions failed inside torch (IndexError)."""
    from deltatune.train import chat

    tok, ids = word_tokenizer(), torch.full((1, 8), 5)
    prefix = _adapted("prefix_tuning", "deltatune")
    assert prefix.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape == (1, 5)
    assert chat.overflow(prefix, 8, 4) is None
    assert chat.overflow(prefix, 8, 7) == (
        "--max-new-tokens 7 can read up to 7 positions and the adapter's 2 virtual tokens: 9 positions, over the "
        "model's decoder's 8"
    )
    model = _bart(tok)
    with pytest.raises(IndexError):
        model.generate(input_ids=ids[:, :3], max_new_tokens=9, do_sample=False)
    assert (
        chat.overflow(model, 3, 9)
        == "--max-new-tokens 9 can read up to 9 positions: 9 positions, over the model's decoder's 8"
    )
    assert chat.overflow(model, 9, 2) == "the prompt is 9 tokens: 9 positions, over the model's encoder's 8"
    assert chat.overflow(tiny_model("t5", vocab_size=len(tok)), 900, 900) is None  # relative positions


def test_prophetnets_decoder_positions_are_checked_and_its_clamped_encoders_are_not():
    """ProphetNet's position table is ``position_embeddings`` (not ``embed_positions``): nothing was checked, and a
    target or a generation past its decoder's positions failed inside torch. Its positions start after the pad id,
    and its predicting streams read one more: 8 positions with pad id 0 take 6 target tokens, 6 new ones. Its
    encoder clamps the positions: 20 source tokens run."""
    from transformers import ProphetNetConfig, ProphetNetForConditionalGeneration

    torch.manual_seed(0)
    config = ProphetNetConfig(hidden_size=16, encoder_ffn_dim=16, decoder_ffn_dim=16, num_encoder_layers=1,
                              num_decoder_layers=1, num_encoder_attention_heads=2, num_decoder_attention_heads=2,
                              ngram=2, max_position_embeddings=8, vocab_size=50, pad_token_id=0,
                              decoder_start_token_id=2, eos_token_id=3)  # fmt: skip
    model = ProphetNetForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    cfg, ids = _cfg(), torch.full((1, 3), 5)
    cfg.data.max_length, cfg.data.max_target_length, cfg.train.generation_max_new_tokens = 32, 16, 6
    with pytest.raises(IndexError):
        model(input_ids=ids, labels=torch.full((1, 7), 5))
    with pytest.raises(ConfigError, match=r"^data.max_target_length=16: the longest train target is 7 tokens, more "
                                          r"than the model's decoder's 6 positions; set data.max_target_length to 6"):  # fmt: skip
        check_positions(cfg, model, SimpleNamespace(train=[{"input_ids": [5], "labels": [5] * 7}], eval=None))
    fits = SimpleNamespace(
        train=[{"input_ids": [5] * 20, "labels": [5] * 6}], eval=[{"input_ids": [5], "labels": [5]}]
    )
    check_positions(cfg, model, fits)
    model(input_ids=torch.full((1, 20), 5), labels=torch.full((1, 6), 5))
    assert model.generate(input_ids=ids, max_new_tokens=6, do_sample=False).shape == (1, 7)
    with pytest.raises(IndexError):
        model.generate(input_ids=ids, max_new_tokens=7, do_sample=False)
    cfg.train.generation_max_new_tokens = 7
    with pytest.raises(ConfigError, match=r"^train.generation_max_new_tokens=7: .* decoder's 6 "):
        check_positions(cfg, model, fits)


def test_a_warm_started_encoder_decoders_halves_positions_are_checked():
    """An EncoderDecoderModel (BERT2BERT) keeps its positions in its halves' embeddings, which positions() did not
    find: `deltatune generate` with a prompt past the encoder's 16 positions failed inside torch (it was one line
    before 1aa53ec, against the config's context). Its halves' configs now give both limits; at them it runs."""
    import torch
    import transformers as T

    from deltatune.train.chat import overflow
    from deltatune.train.seq2seq import positions

    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=100,
                 max_position_embeddings=16)  # fmt: skip
    cfg = T.EncoderDecoderConfig.from_encoder_decoder_configs(
        T.BertConfig(**small), T.BertConfig(**small, is_decoder=True, add_cross_attention=True)
    )
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    torch.manual_seed(0)
    model = T.AutoModelForSeq2SeqLM.from_config(cfg).eval()
    assert (positions(model, "encoder"), positions(model, "decoder")) == (16, 16)
    assert overflow(model, 20, 4) == "the prompt is 20 tokens: 20 positions, over the model's encoder's 16"
    assert overflow(model, 16, 4) is None
    with pytest.raises(RuntimeError):  # (what the check stands in front of)
        model.generate(input_ids=torch.full((1, 20), 5), max_new_tokens=4, do_sample=False)
    model.generate(input_ids=torch.full((1, 16), 5), max_new_tokens=4, do_sample=False)
