"""Probe 18 of the seq2seq and caption stages, their generation-based evaluation and metrics, against transformers'
captioning / summarization examples, sacrebleu and rouge-score."""

from __future__ import annotations

from deltatune.data.images import ImageRow
from deltatune.train import caption as C
from tests.tiny import word_tokenizer


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
