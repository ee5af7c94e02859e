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


def test_a_sampled_rows_distribution_is_transformers_processors_with_tied_logits(monkeypatch):
    """The distribution a sampled row draws from equals transformers' processors' (repetition penalty, temperature,
    top-k, top-p, min-p, in generate's order), also where logits tie, as a bf16 model's often do. Top-p sorted the
    probabilities descending and dropped tokens whose mass before them reached top_p, where TopPLogitsWarper (and
    vLLM) sort ascending and drop those whose cumulative mass is <= 1 - top_p: among tied tokens at the cut other
    ones stayed (a row's probabilities up to 0.5 apart; 23 of 400 random rows with ties differed)."""
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from deltatune.serve import sampling

    drawn: list[torch.Tensor] = []
    real = torch.multinomial
    monkeypatch.setattr(sampling.torch, "multinomial", lambda p, n, generator: drawn.append(p) or real(p, n, generator=generator))  # fmt: skip
    torch.manual_seed(0)
    prompt, out = [1, 2, 3], [4, 4, 7]
    checked = 0
    for trial in range(60):
        logits = (torch.randn(40) * 3).to(torch.bfloat16).float().round()  # ties, as bf16 logits
        t, k, p = (0.3, 0.7, 1.0, 1.5)[trial % 4], (0, 5, 50)[trial % 3], (0.9, 0.5, 0.2)[trial % 5 % 3]
        mp, rp = (0.0, 0.05)[trial % 2], (1.0, 1.3)[trial % 7 % 2]
        r = SimpleNamespace(
            temperature=t, top_k=k, top_p=p, min_p=mp, repetition_penalty=rp, prompt_ids=prompt, output_ids=out
        )
        sampling._pick(logits.clone(), r, torch.Generator().manual_seed(trial))
        procs = [RepetitionPenaltyLogitsProcessor(rp), TemperatureLogitsWarper(t)]
        procs += ([TopKLogitsWarper(k)] if k else []) + [TopPLogitsWarper(p)] + ([MinPLogitsWarper(mp)] if mp else [])
        want = torch.softmax(LogitsProcessorList(procs)(torch.tensor([prompt + out]), logits[None].clone())[0], -1)
        got = drawn[-1] / drawn[-1].sum()
        assert torch.equal(got > 0, want > 0), trial
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        checked += 1
    assert checked == 60
    # a mass exactly at the cut, {0.5, 0.25, 0.25} at top_p 0.75: transformers keeps the first 0.25-token's tie-mate
    r = SimpleNamespace(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0, prompt_ids=[0], output_ids=[])
    three = torch.tensor([0.5, 0.25, 0.25]).log()
    sampling._pick(torch.cat([three, torch.full((5,), float("-inf"))]), r, torch.Generator().manual_seed(0))
    want = torch.softmax(TopPLogitsWarper(0.75)(None, three[None])[0], -1)
    assert torch.equal(drawn[-1][:3] > 0, want > 0) and want.tolist() == pytest.approx([2 / 3, 0.0, 1 / 3])


def test_a_priority_other_than_0_is_a_400_as_vllms_first_come_first_served_scheduler():
    """vLLM's requests take ``priority``; under its default scheduler (first come, first served) any priority but 0 is
    refused ("Got priority 5 but Priority scheduling is not enabled."). Here it was accepted and ignored: a client
    asking for its request first got the order of arrival without a word."""
    from deltatune.serve.engine import RequestError
    from deltatune.serve.fields import Limits, to_request

    for chat, body in ((False, {"prompt": "x"}), (True, {"messages": []})):
        assert to_request({**body, "priority": 0}, [1, 2], Limits(64, 128), "base", chat=chat).max_tokens
        with pytest.raises(RequestError, match="priority") as exc:
            to_request({**body, "priority": 5}, [1, 2], Limits(64, 128), "base", chat=chat)
        assert exc.value.status == 400 and exc.value.param == "priority"


def test_a_newcomer_whose_prefill_fails_fails_alone_and_the_running_batch_goes_on():
    """A request joining a running mixed batch is prefilled on its own; when that prefill raised (out of memory for
    a long prompt; here a GPT-2 prompt past its 64 positions, given to the engine directly) the error went up to
    the batch's handler and every running row ended with it, their answers cut. vLLM never fails one request for
    another's. Now the newcomer alone fails; the running row ends as it does alone (transformers' greedy
    ``generate``)."""
    import threading

    import torch
    from tiny import tiny_model, tokenizer

    from deltatune import DeltaModel

    tok = tokenizer()
    model = tiny_model("gpt2", vocab_size=len(tok), eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    prompt = tok("the cat sat on")["input_ids"]
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None  # ignore_eos
    want = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
    model.generation_config.eos_token_id = eos
    engine = Engine(DeltaModel(model, fused_loss=False), tok, max_batch_size=4, max_wait_s=0.0)
    done = {k: threading.Event() for k in "ab"}
    finish: dict[str, str] = {}
    late = Request(prompt_ids=[5] * 70, adapter="base", max_tokens=2, emit=lambda t, f: f and (finish.setdefault("b", f), done["b"].set()))  # fmt: skip

    def emit(_text, f):
        if f is None and not getattr(emit, "sent", False):
            emit.sent = True
            engine.submit(late)  # joins at the row's next step
        if f:
            finish["a"] = f
            done["a"].set()

    first = Request(
        prompt_ids=prompt, adapter="base", max_tokens=12, emit=emit, ignore_eos=True, skip_special_tokens=False
    )
    try:
        engine.submit(first)
        assert done["a"].wait(20) and done["b"].wait(20), finish
    finally:
        engine.close()
    assert getattr(emit, "sent", False)  # the newcomer came while the row ran
    assert finish["b"].startswith("error: IndexError")
    assert finish["a"] == "length" and first.output_ids == want[len(prompt) :].tolist()


def test_a_batch_whose_prefill_fails_for_one_prompt_answers_the_others():
    """Requests gathered into one batch share its prefill; one prompt that made it raise (out of memory for a long
    prompt; here a GPT-2 prompt past its 64 positions, given to the engine directly) failed every request of the
    batch with its error. vLLM schedules each request on its own. Now each row is tried alone: the long one fails
    with the error, the other answers as transformers' greedy ``generate`` (its prompt scored once, not twice)."""
    import threading

    import torch
    from tiny import tiny_model, tokenizer

    from deltatune import DeltaModel

    tok = tokenizer()
    model = tiny_model("gpt2", vocab_size=len(tok), eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    prompt = tok("the cat sat on")["input_ids"]
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None  # ignore_eos
    want = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0]
    model.generation_config.eos_token_id = eos
    engine = Engine(DeltaModel(model, fused_loss=False), tok, max_batch_size=4, max_wait_s=1.0)
    finish: dict[str, str] = {}
    done = {k: threading.Event() for k in "ab"}

    def emit(key):
        return lambda _t, f: f and (finish.setdefault(key, f), done[key].set())

    good = Request(prompt_ids=prompt, adapter="base", max_tokens=6, emit=emit("a"), ignore_eos=True)
    good.prompt_logprobs, good.logprobs = True, 0
    long = Request(prompt_ids=[5] * 70, adapter="base", max_tokens=2, emit=emit("b"))
    try:
        engine.submit(good)
        engine.submit(long)
        assert done["a"].wait(20) and done["b"].wait(20), finish
    finally:
        engine.close()
    assert engine.batches >= 2 and finish["b"].startswith("error: IndexError"), finish
    assert finish["a"] == "length" and good.output_ids == want[len(prompt) :].tolist()
    assert [row[0] for row in good.logprob_rows] == prompt + good.output_ids  # the prompt's rows once
