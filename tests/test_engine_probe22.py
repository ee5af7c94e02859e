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

    engine, model = _tiny_engine()
    prompt = engine.tokenizer("the cat sat on")["input_ids"]
    want = _greedy(model, prompt, 12)
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
    assert finish["a"] == "length" and first.output_ids == want


def test_a_batch_whose_prefill_fails_for_one_prompt_answers_the_others():
    """Requests gathered into one batch share its prefill; one prompt that made it raise (out of memory for a long
    prompt; here a GPT-2 prompt past its 64 positions, given to the engine directly) failed every request of the
    batch with its error. vLLM schedules each request on its own. Now each row is tried alone: the long one fails
    with the error, the other answers as transformers' greedy ``generate`` (its prompt scored once, not twice)."""
    import threading

    engine, model = _tiny_engine(max_wait_s=1.0)
    prompt = engine.tokenizer("the cat sat on")["input_ids"]
    want = _greedy(model, prompt, 6)
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
    assert finish["a"] == "length" and good.output_ids == want
    assert [row[0] for row in good.logprob_rows] == prompt + good.output_ids  # the prompt's rows once


def _vllm_run(tok, prompt, ids, max_tokens, stop, incl, eos):
    """(chunks sent, finish reason, tokens taken) of vLLM for a row generating ``ids``: DecodeStream primed with the
    prompt, stop strings searched in the text it gave (check_stop_strings), held back by the longest stop less one."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=True)
    for t in prompt:
        stream.step(tok._tokenizer, t)
    out, chunks, last = "", [], 0
    hold = max(len(s) for s in stop) - 1 if stop and not incl else 0
    for n, t in enumerate(ids, 1):
        reason = "stop" if t in eos else "length" if n >= max_tokens else None
        before = len(out)
        if not (t in eos and not incl):
            out += stream.step(tok._tokenizer, t) or ""
        for s in stop if len(out) > before else ():
            i = out.find(s, 1 - (len(out) - before) - len(s))
            if i >= 0:
                out, reason = out[: i + len(s) * incl], "stop"
                break
        end = len(out) - (0 if reason else hold)
        if end > last:
            chunks.append(out[last:end])
            last = end
        if reason:
            return chunks, reason, n
    return chunks, None, len(ids)


def _ours(tok, prompt, ids, max_tokens, stop, incl, eos):
    engine = SimpleNamespace(tokenizer=tok, eos_ids=set(eos), cancelled=0)
    sent: list[tuple[str, str | None]] = []
    r = Request(prompt_ids=prompt, adapter="base", max_tokens=max_tokens, emit=lambda t, f: sent.append((t, f)))
    r.stop, r.include_stop_str_in_output = list(stop), incl
    n = 0
    for n, token in enumerate(ids, 1):  # noqa: B007 (n: the tokens taken)
        if Engine._advance(engine, r, token):
            break
    return [t for t, _ in sent if t], (sent[-1][1] if sent and sent[-1][1] else None), n


def test_stop_strings_are_searched_in_the_text_vllms_decode_stream_gave(bpe):
    """vLLM checks stop strings in the text its DecodeStream gave, which holds a token after which the text ends
    inside a character. Here they were searched in the text with the held token's too: a lone invalid byte then a
    stop string ended "ab" (its U+FFFD lost; vLLM's "ab\\ufffd"), and a stop string in the held token (" " before a
    split emoji) ended the answer a token early. Every cut of a few texts, each stop and include_stop_str_in_output:
    the chunks, finish reason and tokens taken are the simulation's (0 differences)."""
    lead = bpe.convert_tokens_to_ids("ð")  # the lone byte 0xF0
    ab, eos = bpe.encode("ab"), {bpe.eos_token_id}
    cases = [
        ([*ab, lead, *bpe.encode("\n"), *ab], (["\n"], ["b"], [])),
        ([*ab, lead, *bpe.encode(" X"), *ab], (["X"], ["b"])),
        (bpe.encode("a 😀 b 你好"), ([" "], ["😀"], [" b"], ["好"])),
    ]
    differ = []
    for ids, stops in cases:
        for stop in stops:
            for incl in (False, True):
                for n in range(1, len(ids) + 1):
                    for seq in (ids[:n], [*ids[:n], bpe.eos_token_id]):
                        args = ([1], seq, len(seq), stop, incl, eos)
                        if _ours(bpe, *args) != _vllm_run(bpe, *args):
                            differ.append((bpe.decode(seq), stop, incl, _ours(bpe, *args), _vllm_run(bpe, *args)))
    assert not differ, (len(differ), differ[:3])
    args = ([1], [*ab, lead, *bpe.encode("\n"), *ab], 8, ["\n"], False, eos)
    assert _ours(bpe, *args) == (["ab", "\ufffd"], "stop", 3)  # "ab", the lone byte, "\n"


def test_a_priority_is_read_as_vllms_pydantic_int():
    """vLLM's priority is a pydantic int: false, "0" and 0.0 are 0 (accepted); 0.5 is "not a valid integer"; null,
    [] and "" are refused. "0" and false were refused as an unsupported priority, and 0.5 was called unsupported."""
    from deltatune.serve.engine import RequestError
    from deltatune.serve.fields import Limits, lax_numbers, to_request

    def read(value):
        return to_request(lax_numbers({"prompt": "x", "priority": value}, False), [1], Limits(64, 128), "base", False)

    for value in (False, "0", 0.0, " 0 "):
        assert read(value).max_tokens, value
    for value, why in ((0.5, "priority must be an integer"), (None, "priority"), ([], "priority"), ("", "priority")):
        with pytest.raises(RequestError, match=why) as exc:
            read(value)
        assert exc.value.status == 400 and exc.value.param == "priority"
    with pytest.raises(RequestError, match="priority"):
        read(True)  # 1: refused as vLLM's first come, first served scheduler refuses it


def _tiny_engine(max_batch_size=4, max_wait_s=0.0):
    from tiny import tiny_model, tokenizer

    from deltatune import DeltaModel

    tok = tokenizer()
    model = tiny_model("gpt2", vocab_size=len(tok), eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    return Engine(
        DeltaModel(model, fused_loss=False), tok, max_batch_size=max_batch_size, max_wait_s=max_wait_s
    ), model


def _greedy(model, prompt, n):
    import torch

    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None  # ignore_eos
    try:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0]
    finally:
        model.generation_config.eos_token_id = eos
    return out[len(prompt) :].tolist()


def _finished(store: dict, key: str):
    return lambda _t, f: f and store.setdefault(key, f)


def test_a_failed_batch_is_retried_after_its_tensors_are_freed():
    """A batch whose prefill failed (out of memory for one long prompt) was retried inside the exception handler: the
    traceback's frames held the failed batch's tensors (its activations) while each row ran again, the memory an
    out-of-memory retry needs. Now the handler is left first: a tensor the failed prefill allocated is gone when the
    retry's prefill runs."""
    import weakref

    import torch

    engine, model = _tiny_engine()
    engine.close()  # the batch is run here, on this thread
    prompt = engine.tokenizer("the cat sat on")["input_ids"]
    forward, made, seen = engine._forward, [], []

    def fwd(ids, mask, cache, names):
        if ids.shape[1] > 1 and len(ids) > 1:
            activations = torch.empty(1024)
            made.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("simulated")
        if ids.shape[1] > 1:
            seen.append(made[-1]() is not None)
        return forward(ids, mask, cache, names)

    engine._forward = fwd
    finish: dict[str, str] = {}
    group = [
        Request(prompt_ids=prompt, adapter="base", max_tokens=2, emit=_finished(finish, k), ignore_eos=True)
        for k in "ab"
    ]
    engine._answered(group)
    assert finish == {"a": "length", "b": "length"} and seen == [False, False]


def test_a_failed_batch_is_split_in_halves_not_run_row_by_row():
    """A batch whose prefill failed for one row ran each row alone: 16 good rows and one bad one took 16 batches of
    one row (2 decoding steps each: 32 forward passes, 18 prefills). Now each half is tried, down to the row at fault:
    5 batches (8, 4, 2, 1, 1 rows), 10 decoding steps, 11 prefills (6 failed). The answers are transformers' greedy
    ``generate``'s."""
    engine, model = _tiny_engine(max_batch_size=32)
    engine.close()
    prompt = engine.tokenizer("the cat sat on")["input_ids"]
    forward, calls = engine._forward, {"prefill": 0, "step": 0}

    def fwd(ids, mask, cache, names):
        calls["prefill" if ids.shape[1] > 1 else "step"] += 1
        return forward(ids, mask, cache, names)

    engine._forward = fwd
    finish: dict[str, str] = {}
    good = [
        Request(prompt_ids=prompt, adapter="base", max_tokens=3, emit=_finished(finish, str(i)), ignore_eos=True)
        for i in range(16)
    ]
    bad = Request(prompt_ids=[5] * 70, adapter="base", max_tokens=2, emit=_finished(finish, "bad"))
    engine._answered([*good, bad])
    assert finish.pop("bad").startswith("error: IndexError") and set(finish.values()) == {"length"}
    want = _greedy(model, prompt, 3)
    assert all(r.output_ids == want for r in good)
    assert calls == {"prefill": 11, "step": 10}, calls


def test_newcomers_whose_joint_prefill_fails_are_tried_apart():
    """Two requests joining a running row together are prefilled as one batch; when one prompt made it raise (a GPT-2
    prompt past its 64 positions), both failed with its error. Now several newcomers are set aside and run next as a
    batch of their own (split if it fails): the short one answers as transformers' greedy ``generate``, its prompt's
    log-probabilities once; the long one fails alone; the running row goes on."""
    import threading

    engine, model = _tiny_engine()
    prompt = engine.tokenizer("the cat sat on")["input_ids"]
    finish: dict[str, str] = {}
    done = threading.Event()
    short = Request(prompt_ids=prompt, adapter="base", max_tokens=3, emit=_finished(finish, "b"), ignore_eos=True)
    short.prompt_logprobs, short.logprobs = True, 0
    long = Request(prompt_ids=[5] * 70, adapter="base", max_tokens=2, emit=_finished(finish, "c"))

    def emit(_t, f):
        if f is None and not getattr(emit, "sent", False):
            emit.sent = True
            engine.submit(short)  # both join at the row's next step
            engine.submit(long)
        if f:
            finish["a"] = f
            done.set()

    first = Request(
        prompt_ids=prompt, adapter="base", max_tokens=12, emit=emit, ignore_eos=True, skip_special_tokens=False
    )
    try:
        engine.submit(first)
        assert done.wait(20)
        for _ in range(200):
            if len(finish) == 3:
                break
            threading.Event().wait(0.05)
    finally:
        engine.close()
    assert finish.get("a") == "length" and first.output_ids == _greedy(model, prompt, 12), finish
    assert finish.get("c", "").startswith("error: IndexError"), finish
    assert finish.get("b") == "length" and short.output_ids == _greedy(model, prompt, 3), finish
    assert [row[0] for row in short.logprob_rows] == prompt + short.output_ids


def _hold_a_row(engine, finish: dict[str, str]) -> list[int]:
    """Row "a" (40 tokens) holds the worker at its first token until ``close`` is called, so the requests submitted
    next still wait; returns the prompt's ids."""
    import threading

    prompt = engine.tokenizer("the cat sat on")["input_ids"]
    started = threading.Event()

    def emit_a(_t, f):
        if not started.is_set():
            started.set()
            engine._stop.wait(20)
        if f:
            finish["a"] = f

    engine.submit(Request(prompt_ids=prompt, adapter="base", max_tokens=40, emit=emit_a, ignore_eos=True))
    assert started.wait(20)
    return prompt


def test_close_answers_waiting_requests_and_later_ones():
    """``close`` let the running batch finish and left the queued requests unanswered (their clients waiting for
    ever), and a request submitted after it was queued for a worker that had gone. Now both end with "error: the
    server is shutting down"; the running row finishes."""
    engine, _ = _tiny_engine(max_batch_size=1)
    finish: dict[str, str] = {}
    prompt = _hold_a_row(engine, finish)
    engine.submit(Request(prompt_ids=prompt, adapter="base", max_tokens=4, emit=_finished(finish, "b")))
    engine.close()
    engine.submit(Request(prompt_ids=prompt, adapter="base", max_tokens=4, emit=_finished(finish, "c")))
    shut = "error: the server is shutting down"
    assert finish == {"a": "length", "b": shut, "c": shut} and not engine._thread.is_alive()


def test_close_stops_a_batch_under_steady_load():
    """Under steady load a mixed batch never ends (newcomers join it); ``close`` waited for it its 30 s and left the
    worker running. Now close answers what waits, so nothing joins: the batch ends, the worker stops, and every
    request submitted is answered."""
    import threading
    import time

    engine, _ = _tiny_engine(max_batch_size=2)
    prompt = engine.tokenizer("the cat sat on")["input_ids"]
    stop, sent, finish = threading.Event(), [], {}

    def feed():
        while not stop.is_set():
            key = str(len(sent))
            sent.append(key)
            r = Request(prompt_ids=prompt, adapter="base", max_tokens=8, emit=_finished(finish, key), ignore_eos=True)
            engine.submit(r)
            time.sleep(0.005)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        time.sleep(0.5)
        start = time.monotonic()
        engine.close()
        took = time.monotonic() - start
    finally:
        stop.set()
        feeder.join()
    assert took < 10 and not engine._thread.is_alive(), took
    assert len(finish) == len(sent) and engine.joined > 0


def test_a_failed_batchs_halves_take_no_newcomers():
    """A batch whose prefill failed is retried half by half; each half was a mixed batch that newcomers joined, so
    under steady load the first half never ended and the second (requests that came first) waited as long as the load
    lasted (the review's reproducer: answered after 38 s, behind 279 later requests). Now nothing joins a half: a
    request waiting meanwhile stays queued for the next batch; the halves answer as transformers' greedy ``generate``."""
    engine, model = _tiny_engine()
    engine.close()  # the batch is run here, on this thread
    prompt = engine.tokenizer("the cat sat on")["input_ids"]
    forward = engine._forward

    def fwd(ids, mask, cache, names):
        if ids.shape[1] > 1 and len(ids) > 1:  # the joint prefill of the first batch
            raise RuntimeError("simulated out of memory")
        return forward(ids, mask, cache, names)

    engine._forward = fwd
    finish: dict[str, str] = {}
    group = [
        Request(prompt_ids=prompt, adapter="base", max_tokens=3, emit=_finished(finish, k), ignore_eos=True)
        for k in "ab"
    ]
    later = Request(prompt_ids=prompt, adapter="base", max_tokens=3, emit=_finished(finish, "c"), ignore_eos=True)
    engine.pending.put(later)  # waiting while the halves run
    engine._answered(group)
    assert finish == {"a": "length", "b": "length"} and engine.joined == 0, (finish, engine.joined)
    assert engine.pending.get_nowait() is later and all(r.output_ids == _greedy(model, prompt, 3) for r in group)
    assert engine._retrying == 0


def test_the_worker_answers_the_requests_it_set_aside_when_it_stops():
    """``close`` answered the requests the worker set aside (for the next batch) only once the worker had stopped;
    when its 30 s join timed out (a batch running longer), they were never answered, their clients waiting for ever.
    Now the worker answers them itself as its loop ends ("error: the server is shutting down")."""
    engine, _ = _tiny_engine()
    engine.close()
    finish: dict[str, str] = {}
    aside = [Request(prompt_ids=[5, 6], adapter="base", max_tokens=2, emit=_finished(finish, k)) for k in "ab"]
    engine._aside = list(aside)  # set aside by the batch that ran past close's join
    engine._loop()  # the worker's loop, its stop already set
    assert finish == {"a": "error: the server is shutting down", "b": "error: the server is shutting down"}
    assert engine._aside == []


def test_close_does_not_emit_to_a_cancelled_request_and_joins_the_worker():
    """After a forced exit of ``deltatune serve`` uvicorn's loop is closed and the handlers cancelled their requests;
    ``close`` emitted the shutdown to each waiting one, whose emit raised "Event loop is closed": close raised (the
    process ended 134) before joining the worker. Now a cancelled request is not emitted to, and the worker is joined
    even when an emit raises."""

    def closed_loop(_t, _f):
        raise RuntimeError("Event loop is closed")

    engine, _ = _tiny_engine(max_batch_size=1)
    finish: dict[str, str] = {}
    prompt = _hold_a_row(engine, finish)
    gone = Request(prompt_ids=prompt, adapter="base", max_tokens=4, emit=closed_loop)
    gone.cancelled.set()  # the handler's finally
    engine.submit(gone)
    engine.submit(Request(prompt_ids=prompt, adapter="base", max_tokens=4, emit=_finished(finish, "b")))
    engine.close()
    shut = "error: the server is shutting down"
    assert finish == {"a": "length", "b": shut} and not engine._thread.is_alive()
    assert gone.finish_reason == shut

    engine, _ = _tiny_engine(max_batch_size=1)
    _hold_a_row(engine, finish)
    engine.submit(Request(prompt_ids=prompt, adapter="base", max_tokens=4, emit=closed_loop))
    engine.submit(Request(prompt_ids=prompt, adapter="base", max_tokens=4, emit=_finished(finish, "c")))
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        engine.close()  # a live client's emit that fails is not hidden, but the worker is joined all the same
    assert not engine._thread.is_alive() and "c" in finish  # answered: shut, or run by the batch it joined


def test_drain_leaves_the_set_aside_requests_to_a_running_worker():
    """``_drain`` read ``_aside`` and wrote it back while the worker ran (``self._aside = self._aside``): a worker that
    took its set-aside requests in between (``self._aside = self._aside[n:]``) had them put back, and ran them twice.
    Now ``_drain`` writes ``_aside`` only once the worker has stopped (and then answers them)."""
    import queue

    taken = [Request(prompt_ids=[5], adapter="base", max_tokens=1, emit=lambda t, f: None) for _ in range(2)]

    class Racing:
        _shut = staticmethod(Engine._shut)
        pending: queue.Queue = queue.Queue()
        _thread = SimpleNamespace(is_alive=lambda: True)
        held, written = taken, []

        @property
        def _aside(self):
            held, self.held = self.held, []  # the worker takes them for its next batch right after this read
            return held

        @_aside.setter
        def _aside(self, value):
            self.written.append(value)  # taken already: these would run again
            self.held = value

    engine = Racing()
    Engine._drain(engine)
    assert engine.written == [] and all(r.finish_reason is None for r in taken)
