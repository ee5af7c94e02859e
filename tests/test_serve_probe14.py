"""Probe 14 of ``deltatune serve`` against vLLM's OpenAI server: ``logit_bias`` values sent as numeric strings (vLLM's
pydantic ``dict[str, float]`` reads them; they were a 400), a completion without ``max_tokens`` stops at 16 tokens
(vLLM's CompletionRequest default, OpenAI's legacy API's; it ran to the context), continuous usage counts each
chunk's tokens (it read the engine's live count: ahead of the chunk, and not 0 in a chat's role chunk), and
``prompt_logprobs: 0`` streams (vLLM's check_logprobs refuses only more). Through the app in process (an ASGI call,
the helpers of test_serve_probe11), on a tiny random llama with SmolLM2's tokenizer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")

from test_serve_probe11 import _call, _serve, _smol  # noqa: E402


@pytest.fixture(scope="module")
def smol():
    engine, app = _serve(_smol())
    yield engine, app
    engine.close()


def _ids(answer: dict) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in answer["choices"][0]["logprobs"]["tokens"]]


def test_logit_bias_numeric_strings_are_read_as_vllms_pydantic_model(smol):
    """vLLM's ChatCompletionRequest and CompletionRequest declare ``logit_bias: dict[str, float]``: pydantic's lax
    float reads "5", " 5 ", "1e3", "-inf" and "nan" (then from_optional clamps them to [-100, 100], NaN to -100)."""
    from pydantic import BaseModel, ValidationError

    from deltatune.serve.fields import _logit_bias

    class VllmBias(BaseModel):  # the field as vLLM's protocol declares it
        logit_bias: dict[str, float] | None = None

    wire = {"5": "5", "6": " 2.5 ", "7": "1e3", "8": "-inf", "9": "nan", "10": "+7", "11": 3}
    parsed = VllmBias(logit_bias=wire).logit_bias
    vllm = {int(k): min(100.0, max(-100.0, v)) for k, v in parsed.items()}  # SamplingParams.from_optional
    assert _logit_bias({"logit_bias": wire}, 100) == vllm == {5: 5.0, 6: 2.5, 7: 100.0, 8: -100.0, 9: -100.0,
                                                             10: 7.0, 11: 3.0}  # fmt: skip
    engine, app = smol
    body = {"prompt": "the cat", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}  # fmt: skip
    x = 1000  # a token greedy does not pick
    status, as_string = _call(app, "/v1/completions", {**body, "logit_bias": {str(x): "100"}})
    _, as_number = _call(app, "/v1/completions", {**body, "logit_bias": {str(x): 100}})
    assert status == 200, as_string
    assert _ids(as_string) == _ids(as_number) and _ids(as_string)[0] == x
    assert torch.equal(torch.tensor(as_string["choices"][0]["logprobs"]["token_logprobs"]),
                       torch.tensor(as_number["choices"][0]["logprobs"]["token_logprobs"]))  # fmt: skip
    for wrong in ("abc", "", "5e", "\uff15"):  # pydantic refuses these (a full-width 5 too, which float() reads)
        with pytest.raises(ValidationError):
            VllmBias(logit_bias={"5": wrong})
        status, answer = _call(app, "/v1/completions", {**body, "logit_bias": {"5": wrong}})
        assert status == 400 and answer["error"]["param"] == "logit_bias", (wrong, answer)


def test_a_completion_without_max_tokens_stops_at_16_as_vllm(smol):
    """vLLM's CompletionRequest: ``max_tokens: int | None = 16`` (OpenAI's legacy completions: 16); null is no limit
    (the context's room). A chat has no such default (vLLM's ChatCompletionRequest: None)."""
    engine, app = smol
    body = {"prompt": "the cat", "temperature": 0, "ignore_eos": True}
    status, answer = _call(app, "/v1/completions", body)
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 16 and answer["choices"][0]["finish_reason"] == "length"
    _, longer = _call(app, "/v1/completions", {**body, "max_tokens": 20})
    assert longer["choices"][0]["text"].startswith(answer["choices"][0]["text"])  # the same greedy answer, cut
    _, unbounded = _call(app, "/v1/completions", {**body, "max_tokens": None})
    assert unbounded["usage"]["completion_tokens"] == 64  # the server's --max-tokens (64 here), under the room
    _, chat = _call(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **body})
    assert chat["usage"]["completion_tokens"] == 64
    status, chunks = _call(app, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and chunks[-1]["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_counts_the_tokens_up_to_each_chunk_as_vllm(smol, path):
    """vLLM's continuous_usage_stats: each chunk counts its choice's tokens so far (previous_num_tokens), a chat's
    role chunk 0. Here every chunk read the engine thread's live count, which runs ahead of the chunks sent."""
    engine, app = smol
    ask = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "the cat"}
    body = {**ask, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "return_token_ids": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    status, chunks = _call(app, path, body)
    assert status == 200, chunks
    done, counted = 0, []
    for chunk in chunks[:-1]:  # the last: the request's usage, no choice
        done += len(chunk["choices"][0].get("token_ids") or [])
        counted.append((chunk["usage"]["completion_tokens"], done))
        prompt = chunk["usage"]["prompt_tokens"]
        assert chunk["usage"]["total_tokens"] == prompt + done
    assert all(got == want for got, want in counted), counted
    if "chat" in path:
        assert counted[0] == (0, 0)  # the role chunk
    assert done == 40 and chunks[-1]["usage"]["completion_tokens"] == 40 and chunks[-1]["choices"] == []


def test_prompt_logprobs_0_streams_as_vllm(smol):
    """vLLM's check_logprobs refuses prompt_logprobs with stream only where it is above 0 (or -1): 0 streams, no
    prompt log-probabilities in the chunks. It was a 400 here."""
    engine, app = smol
    body = {"prompt": "the cat", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    _, plain = _call(app, "/v1/completions", body)
    for path, ask in (
        ("/v1/completions", {}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        status, chunks = _call(app, path, {**body, **ask, "prompt_logprobs": 0, "stream": True})
        assert status == 200, chunks
        assert not any("prompt_logprobs" in c or "prompt_logprobs" in (c["choices"] or [{}])[0] for c in chunks)
    status, chunks = _call(app, "/v1/completions", {**body, "prompt_logprobs": 0, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    status, answer = _call(app, "/v1/completions", {**body, "prompt_logprobs": 1, "stream": True})
    assert status == 400 and answer["error"]["param"] == "prompt_logprobs"


def test_echo_scores_the_prompt_as_vllms_prompt_logprobs(smol):
    """vLLM's to_sampling_params: echo without prompt_logprobs sets prompt_logprobs to the answer's k (a completion's
    logprobs, a chat's top_logprobs, 0 left out), so the answer carries prompt_logprobs, as with that k asked for.
    Here echo gave none."""
    engine, app = smol
    body = {"prompt": "the cat sat", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    _, echoed = _call(app, "/v1/completions", {**body, "echo": True, "logprobs": 2})
    _, asked = _call(app, "/v1/completions", {**body, "prompt_logprobs": 2})
    got, want = echoed["choices"][0]["prompt_logprobs"], asked["choices"][0]["prompt_logprobs"]
    assert got == want and got[0] is None and len(got) == echoed["usage"]["prompt_tokens"]
    # the prompt's rows of the echoed logprobs are these numbers
    chosen = [row[str(t)]["logprob"] for row, t in zip(got[1:], engine.tokenizer("the cat sat")["input_ids"][1:])]
    assert chosen == echoed["choices"][0]["logprobs"]["token_logprobs"][1:3]
    _, plain = _call(app, "/v1/completions", {**body, "echo": True})  # no logprobs: none (vLLM's None)
    assert plain["choices"][0]["prompt_logprobs"] is None  # vLLM's null
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    _, echoed = _call(app, "/v1/chat/completions", {**chat, "echo": True})
    _, asked = _call(app, "/v1/chat/completions", {**chat, "prompt_logprobs": 0})
    assert echoed["prompt_logprobs"] == asked["prompt_logprobs"] and echoed["prompt_logprobs"][0] is None
    assert all(len(row) == 1 for row in echoed["prompt_logprobs"][1:])  # top_logprobs 0: the prompt's token alone
    _, echoed = _call(app, "/v1/chat/completions", {**chat, "echo": True, "logprobs": True, "top_logprobs": 3})
    _, asked = _call(app, "/v1/chat/completions", {**chat, "prompt_logprobs": 3})
    assert echoed["prompt_logprobs"] == asked["prompt_logprobs"]
    _, plain = _call(app, "/v1/chat/completions", chat)
    assert plain["prompt_logprobs"] is None


def test_detokenize_takes_more_tokens_than_the_context_as_vllm(smol):
    """vLLM's _validate_input returns a DetokenizeRequest's tokens before any max_model_len check ("does not require
    model context length validation"): a list longer than the context decodes. Pinned: it is so here too."""
    engine, app = smol
    _, info = _call(app, "/tokenize", {"prompt": "hi"})
    ids = engine.tokenizer(" the cat sat", add_special_tokens=False)["input_ids"] * (info["max_model_len"] // 3 + 5)
    assert len(ids) > info["max_model_len"]
    status, answer = _call(app, "/detokenize", {"tokens": ids})
    assert status == 200 and answer == {"prompt": engine.tokenizer.decode(ids)}


def test_a_stream_that_fails_ends_with_the_error_and_no_usage_as_vllm(smol, monkeypatch):
    """vLLM's completion and chat stream generators send the error's JSON, then [DONE]: the usage chunk is inside the
    try the error left. Here a usage chunk counting the failed rows' tokens came after the error."""
    import deltatune.serve.engine as engine_module

    engine, app = smol
    pick = engine_module._pick

    def failing(logits, r, *args):
        if r.seed == 123 and len(r.output_ids) == 2:  # this request's third token: as NaN logits end a row
            raise FloatingPointError("its logits are NaN, so no token can be chosen")
        return pick(logits, r, *args)

    monkeypatch.setattr(engine_module, "_pick", failing)
    body = {"prompt": "the cat", "max_tokens": 6, "temperature": 0.5, "seed": 123, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    for path, ask in (
        ("/v1/completions", {}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ):
        status, chunks = _call(app, path, {**body, **ask})
        assert status == 200
        assert "error" in chunks[-1] and "NaN" in chunks[-1]["error"]["message"], chunks[-1]
        assert not any(c.get("usage") for c in chunks), chunks
    body = {**body, "seed": 7}  # another request streams its usage as before
    status, chunks = _call(app, "/v1/completions", body)
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["choices"] == []


def test_a_chats_prompt_logprobs_are_computed_once_for_n_choices(smol, monkeypatch):
    """A chat answer carries prompt_logprobs once (vLLM's, at the top): with n choices every row scored the prompt,
    n - 1 of them for nothing (a forward pass over the prompt each)."""
    import deltatune.serve.engine as engine_module

    engine, app = smol
    calls, row = [], engine_module.prompt_row
    monkeypatch.setattr(engine_module, "prompt_row", lambda *a: calls.append(1) or row(*a))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 1.0, "seed": 1,
            "prompt_logprobs": 1}  # fmt: skip
    _, one = _call(app, "/v1/chat/completions", body)
    single = len(calls)
    assert single == one["usage"]["prompt_tokens"] - 1
    _, three = _call(app, "/v1/chat/completions", {**body, "n": 3})
    assert len(three["choices"]) == 3 and three["prompt_logprobs"] == one["prompt_logprobs"]
    assert len(calls) == 2 * single  # once more, not three times
