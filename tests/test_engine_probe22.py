"""Probe 22 of the serving engine (``deltatune/serve/engine.py``) against vLLM: the text of an answer that ends
inside a character (its max_tokens or a stop token reached between a character's byte-level tokens), checked against
tokenizers' ``DecodeStream``, the incremental decoder vLLM's FastIncrementalDetokenizer steps; no model runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deltatune.serve.engine import Engine, Request


@pytest.fixture(scope="module")
def bpe():
    from transformers import AutoTokenizer

    from deltatune.train.models import resolve_path

    return AutoTokenizer.from_pretrained(resolve_path("smollm2"))


def _served(tok, prompt: list[int], ids: list[int], max_tokens: int, eos: set[int] = frozenset()):
    """(the pieces a row that generates ``ids`` sends, its finish reason)."""
    engine = SimpleNamespace(tokenizer=tok, eos_ids=set(eos), cancelled=0)
    sent: list[tuple[str, str | None]] = []
    r = Request(prompt_ids=prompt, adapter="base", max_tokens=max_tokens, emit=lambda t, f: sent.append((t, f)))
    for token in ids:
        if Engine._advance(engine, r, token):
            break
    return [t for t, _ in sent], sent[-1][1]


def _vllm(tok, ids: list[int]) -> list[str]:
    """The chunks vLLM's FastIncrementalDetokenizer adds for ``ids``: DecodeStream's steps that give text."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=True)
    return [c for c in (stream.step(tok._tokenizer, t) for t in ids) if c is not None]


def test_an_answer_cut_inside_a_character_ends_before_it_as_vllms_decode_stream(bpe):
    """An answer whose max_tokens ended between a character's tokens ended with U+FFFD ("ok \\ufffd" for "ok 😀"
    cut after its first piece); vLLM's DecodeStream gives nothing for a token after which the text ends inside a
    character, so its answer is "ok" (the space in the same token held too). Streamed, the held space came alone
    (" ", then "😀"); vLLM sends " 😀" at once. Every cut of a text with 4-byte, 3-byte and 2-byte characters:
    the pieces sent (and so the whole text) are vLLM's chunks."""
    ids = bpe.encode("ok 😀 bye 你好吗 café!")
    assert sum(bpe.decode([t]).endswith("\ufffd") for t in ids) >= 3  # characters split across tokens
    prompt = bpe.encode("Say:")
    for n in range(1, len(ids) + 1):
        pieces, finish = _served(bpe, prompt, ids, max_tokens=n)
        assert finish == "length"
        assert [p for p in pieces if p] == _vllm(bpe, ids[:n]), n
        assert "\ufffd" not in "".join(pieces)


def test_a_stop_token_after_half_a_character_ends_the_answer_before_it(bpe):
    """EOS right after a character's first bytes: the answer was "ok \\ufffd" with finish "stop"; vLLM does not
    decode the stop token (no include_stop_str_in_output) and its DecodeStream held the half character: "ok"."""
    ids = bpe.encode("ok 😀")
    eos = bpe.eos_token_id
    pieces, finish = _served(bpe, [1], [*ids[:2], eos], max_tokens=8, eos={eos})
    assert finish == "stop" and "".join(pieces) == "".join(_vllm(bpe, ids[:2])) == "ok"
