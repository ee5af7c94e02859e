"""The text a served row sends, token by token (``Engine._advance``): a stop string never leaks, not even when it
ends inside a character whose bytes come in separate tokens, and every piece extends the text sent before (a
tokenizer's space clean-up rewrote earlier text, so characters were lost). On SmolLM2's byte-level BPE tokenizer
and the tests' WordPiece one; no model runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tiny import tokenizer

from deltatune.serve.app import _prompt_ids
from deltatune.serve.engine import Engine, Request, RequestError


@pytest.fixture(scope="module")
def bpe():
    from transformers import AutoTokenizer

    from deltatune.train.models import resolve_path

    return AutoTokenizer.from_pretrained(resolve_path("smollm2"))


def served_text(tok, ids: list[int], stop: list[str]) -> tuple[str, list[str], str | None]:
    """(the pieces sent, joined; the pieces; the finish reason) for a row that generates ``ids``."""
    engine = SimpleNamespace(tokenizer=tok, eos_ids=set(), cancelled=0)
    pieces: list[str] = []
    finish: list[str | None] = []
    r = Request(prompt_ids=[1], adapter="base", max_tokens=len(ids) + 1, emit=lambda t, f: (pieces.append(t), finish.append(f)), stop=stop)  # fmt: skip
    for token in ids:
        if Engine._advance(engine, r, token):
            break
    return "".join(pieces), pieces, r.finish_reason


@pytest.mark.parametrize(
    "text, stop, want",
    [
        ("ok 😀 bye", "ok 😀", ""),
        ("说你好吗", "你好吗", "说"),
        ("Hi\n用户: more", "\n用户", "Hi"),
        ("x本 y本z", "y本", "x本 "),
    ],
)
def test_no_part_of_a_stop_string_is_sent(bpe, text, stop, want):
    ids = bpe.encode(text)
    assert len(ids) > len(text.encode()) // 4  # characters split across tokens (the case that leaked)
    sent, pieces, finish = served_text(bpe, ids, [stop])
    assert sent == want and finish == "stop" and "\ufffd" not in "".join(pieces)


def test_every_piece_extends_what_was_sent_when_the_tokenizer_cleans_up_spaces():
    tok = tokenizer()
    tok.clean_up_tokenization_spaces = True
    ids = tok.convert_tokens_to_ids(["do", "n", "'", "t", "go", "a", "'", "b"])
    assert tok.decode(ids) != tok.decode(ids, clean_up_tokenization_spaces=False)  # the clean-up rewrites
    sent, _, _ = served_text(tok, ids, [])
    assert sent == tok.decode(ids, clean_up_tokenization_spaces=False) == "do n ' t go a ' b"


def test_an_empty_prompt_is_a_400(bpe):
    """With a tokenizer that adds no BOS, "" became no tokens: a 500 alone, and it failed a running batch it
    joined."""
    with pytest.raises(RequestError, match="prompt is empty") as exc:
        _prompt_ids(bpe, "")
    assert exc.value.status == 400 and exc.value.param == "prompt"
    assert _prompt_ids(bpe, "hi") == bpe("hi")["input_ids"]
    with pytest.raises(RequestError, match="prompt is empty"):  # a tokenizer adding special tokens gave 200
        _prompt_ids(tokenizer(), "")
