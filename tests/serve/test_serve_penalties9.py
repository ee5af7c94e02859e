"""``deltatune serve``'s OpenAI and vLLM sampling fields ``frequency_penalty``, ``presence_penalty``,
``repetition_penalty``, ``min_tokens``, ``top_k`` and ``min_p``, which were a 400 ``unsupported``: computed as vLLM
computes them, in its order (min_tokens and logit_bias, the penalties, temperature, the cuts); greedy and seeded
answers equal transformers' ``generate`` with the matching logits processors, the OpenAI penalties a hand-worked
formula; per choice with n > 1 and in mixed batches; the reported log-probabilities stay the model's own."""

from __future__ import annotations

import functools
import threading
from types import SimpleNamespace

import pytest
import torch
from test_serve_probe9 import _post as post_at

PROMPT = "the cat sat on"


def _post(server, body: dict, path: str = "/v1/completions"):
    return post_at(server, path, body)


@functools.cache
def _model(base: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


class _OpenAIPenalties:
    """OpenAI's formula, by hand: logits[j] -= frequency * count_j + presence * (count_j > 0), counted over the
    tokens generated after the first ``start`` ids; then the temperature, as vLLM orders them."""

    def __init__(self, start: int, frequency: float, presence: float, temperature: float = 1.0) -> None:
        self.start, self.frequency, self.presence, self.temperature = start, frequency, presence, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for row, ids in enumerate(input_ids[:, self.start :].tolist()):
            for t in set(ids):
                scores[row, t] -= self.frequency * ids.count(t) + self.presence
        return scores / self.temperature  # generate's own temperature would come before a processor given


def _generate(base: str, ids: list[int], seed: int | None, n: int = 6, penalties=None, **kw) -> list[int]:
    """transformers' generate on the base: greedy, or sampled under ``torch.manual_seed(seed)``."""
    from transformers import LogitsProcessorList

    x = torch.tensor([ids])
    kw = {"do_sample": False, **kw} if seed is None else {"do_sample": True, **kw}
    if penalties:
        kw["logits_processor"] = LogitsProcessorList([_OpenAIPenalties(len(ids), *penalties)])
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = _model(base).generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, pad_token_id=0, **kw)  # fmt: skip
    return out[0, len(ids) :].tolist()


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_the_penalties_and_min_tokens_in_vllms_order_by_hand():
    """logit_bias, min_tokens, repetition_penalty (prompt and answer), then frequency and presence (answer only),
    worked by hand; the logits handed in (the reported log-probabilities) are left as they were."""
    from deltatune.serve.sampling import adjusted

    logits = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0, 0.0])
    kept = logits.clone()
    r = SimpleNamespace(prompt_ids=[4], output_ids=[1, 1, 2], logit_bias={5: 1.0}, repetition_penalty=None,
                        frequency_penalty=0.5, presence_penalty=0.25, min_tokens=4, ignore_eos=False)  # fmt: skip
    # 1: 2 - 2 * 0.5 - 0.25; 2: -1 - 0.5 - 0.25; the prompt's 4 untouched; 0 (EOS) masked: 3 tokens < 4
    assert adjusted(logits, r, None, {0}).tolist() == [float("-inf"), 0.75, -1.75, 0.5, 3.0, 1.0]
    r.repetition_penalty, r.min_tokens = 2.0, 3  # 3 tokens generated: EOS free again
    # repetition first, over {4, 1, 2}: 3 -> 1.5, 2 -> 1, -1 -> -2; then 1: 1 - 1.25, 2: -2 - 0.75
    assert adjusted(logits, r, None, {0}).tolist() == [1.0, -0.25, -2.75, 0.5, 1.5, 1.0]
    r.frequency_penalty, r.presence_penalty, r.ignore_eos, r.min_tokens = -2.0, 0.0, True, 9  # negative: favoured
    masked = [float("-inf"), 5.0, 0.0, 0.5, 1.5, 1.0]  # EOS masked under min_tokens even with ignore_eos, as vLLM
    assert adjusted(logits, r, None, {0}).tolist() == masked
    assert torch.equal(logits, kept)


def test_repetition_penalty_top_k_min_p_and_min_tokens_answer_as_generate(served):
    """Greedy and seeded answers with repetition_penalty, top_k, min_p and min_tokens (each a 400 before) equal
    transformers' generate with the same settings (its RepetitionPenalty, TopK, MinP, MinNewTokensLength
    processors), token for token; the log-probabilities stay the model's raw log-softmax."""
    engine, server, base, _ = served
    tok = engine.tokenizer
    ids = tok(PROMPT)["input_ids"]
    body = {"model": "base", "prompt": ids, "max_tokens": 6}
    cat = {"logit_bias": {"4937": 0.5}}, {"sequence_bias": {(4937,): 0.5}}  # greedy repeats "cat" (4937, a prompt id)
    for seed, common, tested in (  # (seed (None: greedy), the settings around it, the one tested: (served, generate))
        (None, cat, ({"repetition_penalty": 3.0}, {"repetition_penalty": 3.0})),
        (None, ({}, {}), ({"repetition_penalty": 0.3}, {"repetition_penalty": 0.3})),  # < 1 favours what was seen
        (5, ({"temperature": 0.7, "repetition_penalty": 1.5},) * 2, ({"top_k": 3}, {"top_k": 3})),
        (6, ({"temperature": 1.0},) * 2, ({"top_k": -1, "min_p": 0.9}, {"top_k": 0, "min_p": 0.9})),
    ):
        want = _generate(base, ids, seed, **common[1], **tested[1])
        assert want != _generate(base, ids, seed, **common[1]), tested  # the setting changes the answer
        sampling = {"temperature": 0} if seed is None else {"seed": seed}
        status, answer = _post(server, {**body, **sampling, **common[0], **tested[0], "logprobs": 0})
        assert status == 200, answer
        assert answer["choices"][0]["text"] == _text(tok, want), tested
    raw = torch.log_softmax(_model(base)(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    chosen = answer["choices"][0]["logprobs"]["token_logprobs"][0]
    assert chosen == pytest.approx(float(raw[want[0]]), abs=1e-4)  # the model's own, not min_p's renormalised one
    # min_tokens: EOS favoured by 100 ends the answer at once; with min_tokens 4 it comes fifth, as generate's
    eos = tok.sep_token_id
    bias = {"logit_bias": {str(eos): 100}, "temperature": 0}
    assert _post(server, {**body, **bias})[1]["usage"]["completion_tokens"] == 1
    want = _generate(base, ids, None, min_new_tokens=4, sequence_bias={(eos,): 100.0})
    assert len(want) == 5 and want[-1] == eos
    answer = _post(server, {**body, **bias, "min_tokens": 4})[1]
    assert answer["choices"][0]["text"] == _text(tok, want) != ""
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] == 5


def test_stop_strings_count_only_after_min_tokens_as_vllm(served):
    """vLLM checks stop strings only in text that ends after the first min_tokens tokens (a stop string inside
    them is passed over); without min_tokens the first one ends the answer."""
    engine, server, base, _ = served
    tok = engine.tokenizer
    ids = tok(PROMPT)["input_ids"]
    out = _generate(base, ids, None, n=12)
    full, head = _text(tok, out), _text(tok, out[:3])
    stop = next(c for c in head if c.strip() and c in full[len(head) :])  # in the first 3 tokens and after them
    body = {"model": "base", "prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": stop}
    assert _post(server, body)[1]["choices"][0]["text"] == full[: full.find(stop)]
    answer = _post(server, {**body, "min_tokens": 3})[1]["choices"][0]
    assert answer["text"] == full[: full.find(stop, len(head))] and len(answer["text"]) >= len(head)
    assert answer["finish_reason"] == "stop"


def test_openai_penalties_count_each_choices_own_tokens(served):
    """frequency_penalty and presence_penalty subtract count * f + p from the logit of each token the choice
    generated (OpenAI's formula, vLLM's counts: not the prompt's), before the temperature: greedy and seeded answers
    equal generate with that formula by hand, for each of n choices (the i-th drawn with seed + i) and with other
    requests in the same mixed batch."""
    engine, server, base, _ = served
    tok = engine.tokenizer
    ids = tok(PROMPT)["input_ids"]
    bias = {"sequence_bias": {(4937,): 1.5}}  # "cat", a prompt id: greedy repeats it 4 times under these penalties
    body = {"model": "base", "prompt": ids, "max_tokens": 8, "ignore_eos": True, "top_k": -1}
    body |= {"frequency_penalty": 0.3, "presence_penalty": 0.1, "logit_bias": {"4937": 1.5}}
    greedy = _generate(base, ids, None, n=8, penalties=(0.3, 0.1), **bias)
    assert greedy[:5] == [4937] * 4 + [5509]
    for other in ((0.0, 0.4), (0.4, 0.0), None):  # presence alone, frequency alone, neither: other answers
        assert greedy != _generate(base, ids, None, n=8, penalties=other, **bias)
    status, answer = _post(server, {**body, "temperature": 0, "n": 2})
    assert status == 200, answer
    assert [c["text"] for c in answer["choices"]] == [_text(tok, greedy)] * 2
    # negative ones favour what the choice drew (each its own), before the temperature (0.1: x10 after it)
    pen = {"frequency_penalty": -0.5, "presence_penalty": -1.0, "temperature": 0.1, "logit_bias": None}
    sampled = [_generate(base, ids, 11 + i, n=8, penalties=(-0.5, -1.0, 0.1), top_k=0) for i in range(3)]
    assert sampled[0] != _generate(base, ids, 11, n=8, temperature=0.1, top_k=0) and sampled[0] != sampled[1]
    other_ids = tok("a dog")["input_ids"]
    others = [  # in the same mixed batch: an unpenalised row of the same prompt, another prompt penalised
        (
            {**body, "frequency_penalty": 0, "presence_penalty": 0, "temperature": 0},
            _generate(base, ids, None, n=8, **bias),
        ),  # fmt: skip
        (
            {**body, "prompt": other_ids, "temperature": 0},
            _generate(base, other_ids, None, n=8, penalties=(0.3, 0.1), **bias),
        ),  # fmt: skip
    ]
    results: dict[int, dict] = {}
    asks = [{**body, **pen, "seed": 11, "n": 3}] + [b for b, _ in others]
    threads = [threading.Thread(target=lambda k=k, b=b: results.update({k: _post(server, b)[1]})) for k, b in enumerate(asks)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c["text"] for c in results[0]["choices"]] == [_text(tok, s) for s in sampled]
    for k, (_, want) in enumerate(others, start=1):
        assert results[k]["choices"][0]["text"] == _text(tok, want), k


def test_out_of_range_values_are_400s_naming_the_field(served):
    """OpenAI's and vLLM's ranges: penalties in [-2, 2], repetition_penalty > 0, min_tokens in [0, max_tokens],
    top_k -1, 0 or positive, min_p in [0, 1]; the values that ask for nothing pass."""
    engine, server, _, _ = served
    body = {"model": "lora", "prompt": "hi", "max_tokens": 2}
    for field, value in (("frequency_penalty", 2.5), ("frequency_penalty", "one"), ("presence_penalty", -2.01),
                         ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("min_tokens", -1),
                         ("min_tokens", 1.5), ("min_tokens", 3), ("top_k", -2), ("top_k", 2.5), ("top_k", True),
                         ("min_p", 1.5), ("min_p", -0.1)):  # fmt: skip
        status, answer = _post(server, {**body, field: value})
        assert status == 400 and answer["error"]["param"] == field, (field, value)
        assert answer["error"]["code"] != "unsupported" and field in answer["error"]["message"]
    asks = {"frequency_penalty": -2, "presence_penalty": 2, "repetition_penalty": 0.01, "min_tokens": 2, "top_k": 1}
    status, answer = _post(server, {**body, **asks, "min_p": 1.0}, "/v1/completions")
    assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer
    chat = {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "min_tokens": 2}
    assert _post(server, chat, "/v1/chat/completions")[0] == 200
    del chat["max_tokens"]  # the limit named as the request set it
    status, answer = _post(server, {**chat, "max_completion_tokens": 1}, "/v1/chat/completions")
    assert status == 400 and "at most max_completion_tokens (1)" in answer["error"]["message"]


def test_two_stop_strings_completed_by_one_token_cut_at_the_first_listed_as_vllm():
    """WordPiece's one token 'hello' completes both 'lo' and 'he': vLLM's check_stop_strings takes the first of the
    request's list that the new text holds ('hel'); serve cut at the earliest position ('')."""
    from tiny import tokenizer

    from deltatune.serve.engine import Engine, Request

    tok = tokenizer()
    ids = tok("hello", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    for stop, want in ((["lo", "he"], "hel"), (["he", "lo"], ""), (["x", "ll"], "he")):
        sent: list[str] = []
        r = Request(
            prompt_ids=[1], adapter="base", max_tokens=4, emit=lambda t, f, sent=sent: sent.append(t), stop=stop
        )
        assert Engine._advance(SimpleNamespace(tokenizer=tok, eos_ids=set()), r, ids[0])
        assert (r.text, "".join(sent), r.finish_reason) == (want, want, "stop"), stop
