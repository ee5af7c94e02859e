"""Probe 12 of ``deltatune serve`` against vLLM's OpenAI server: ``logit_bias`` clamped to [-100, 100] (it was a
400), a mask that leaves no token mid-answer takes token 0 as vLLM's sampler (it was a 500), chat's ``echo`` (it was a
400 unsupported), and a WordPiece answer that starts inside a word ("##s"). Through the app in process (an ASGI call,
no socket, the helpers of test_serve_probe11), on a tiny random llama with SmolLM2's or MiniLM's tokenizer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")

from test_serve_probe11 import _call, _serve, _smol, _vllm_text  # noqa: E402


@pytest.fixture(scope="module")
def smol():
    engine, app = _serve(_smol())
    yield engine, app
    engine.close()


def _ids(answer: dict) -> list[int]:
    """A completion choice's token ids, from its logprobs under return_tokens_as_token_ids."""
    return [int(t.removeprefix("token_id:")) for t in answer["choices"][0]["logprobs"]["tokens"]]


def test_logit_bias_outside_100_is_clamped_as_vllm(smol):
    """vLLM's SamplingParams.from_optional clamps each bias with min(100.0, max(-100.0, bias)); a bias of 1e9 or -500
    was a 400 here."""
    engine, app = smol
    ids = engine.tokenizer("the cat")["input_ids"]
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}  # fmt: skip
    plain = _ids(_call(app, "/v1/completions", body)[1])
    x = 1000  # a token greedy does not pick
    assert x not in plain
    for wire, clamped in ((1e9, 100.0), (250, 100.0), (-500, -100.0), (-1e30, -100.0)):
        vllm = min(100.0, max(-100.0, wire))  # vLLM's expression
        assert vllm == clamped
        status, got = _call(app, "/v1/completions", {**body, "logit_bias": {str(x): wire, str(plain[0]): -wire}})
        _, want = _call(app, "/v1/completions", {**body, "logit_bias": {str(x): vllm, str(plain[0]): -vllm}})
        assert status == 200, got
        assert _ids(got) == _ids(want) and (_ids(got)[0] == x) == (wire > 0), (wire, _ids(got))
        assert torch.equal(torch.tensor(got["choices"][0]["logprobs"]["token_logprobs"]),
                           torch.tensor(want["choices"][0]["logprobs"]["token_logprobs"]))  # fmt: skip
    from deltatune.serve.fields import _logit_bias

    assert _logit_bias({"logit_bias": {"5": 1e9, "6": -101, "7": 3}}, 10) == {5: 100.0, 6: -100.0, 7: 3.0}
    for wrong in (
        {"5": "x"},
        {"5": True},
        {"abc": 1},
        {str(len(engine.tokenizer) * 10): 1},
    ):  # not a number, not a token id: still a 400
        status, answer = _call(app, "/v1/completions", {**body, "logit_bias": wrong})
        assert status == 400 and answer["error"]["param"] == "logit_bias", wrong


def test_a_mask_that_leaves_no_token_mid_answer_takes_token_0_as_vllms_sampler(smol):
    """allowed_token_ids [Ġworld] with bad_words ["world world"] masks every token at the second step. vLLM's sampler
    takes the argmax of all -inf (greedy) or of softmax's all-NaN probabilities over exponential noise (sampled):
    token 0, and the row goes on. Here that step ended the whole request with a 500."""
    engine, app = smol
    tok = engine.tokenizer
    x = tok.convert_tokens_to_ids("Ġworld")
    masked = torch.full((len(tok),), float("-inf"))
    greedy = int(masked.argmax())  # vLLM's greedy_sample
    q = torch.empty_like(masked).exponential_(generator=torch.Generator().manual_seed(0))
    sampled = int(masked.softmax(-1).div_(q).argmax())  # vLLM's random_sample
    assert greedy == sampled == 0
    body = {"prompt": "Say it:", "max_tokens": 3, "allowed_token_ids": [x], "bad_words": ["world world"],
            "logprobs": 0, "return_tokens_as_token_ids": True, "ignore_eos": True}  # fmt: skip
    for temperature in (0, 1.0):
        status, answer = _call(app, "/v1/completions", {**body, "temperature": temperature, "seed": 1})
        assert status == 200, answer
        # Ġworld, then token 0 (every token masked), then Ġworld again (the answer no longer ends with Ġworld)
        assert _ids(answer) == [x, 0, x], answer
        want = _vllm_text(tok, tok("Say it:")["input_ids"], [x, 0, x])
        assert answer["choices"][0]["text"] == want and answer["choices"][0]["finish_reason"] == "length"
    # without ignore_eos token 0 is what it is: SmolLM2's EOS ends the answer there, as vLLM's check_stop
    if 0 in engine.eos_ids:
        status, answer = _call(app, "/v1/completions", {**body, "temperature": 0, "ignore_eos": False})
        assert status == 200 and _ids(answer) == [x, 0] and answer["choices"][0]["finish_reason"] == "stop"


def test_chat_echo_starts_the_answer_with_the_last_message_of_its_role_as_vllm(smol):
    """vLLM's chat echo: where the last message's role is the answer's, each choice's content starts with that
    message's text (parts joined by newlines); in a stream it is a chunk of its own after the role chunks. It was a
    400 unsupported."""
    engine, app = smol
    said = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Sure, "}]
    body = {"messages": said, "max_tokens": 4, "temperature": 0, "n": 2, "seed": 3, "ignore_eos": True}
    status, plain = _call(app, "/v1/chat/completions", body)
    assert status == 200, plain
    status, echoed = _call(app, "/v1/chat/completions", {**body, "echo": True})
    assert status == 200, echoed
    for a, b in zip(plain["choices"], echoed["choices"]):
        assert b["message"]["content"] == "Sure, " + a["message"]["content"]
    assert echoed["usage"] == plain["usage"]  # the echo is no generated token
    parts = [
        {**said[0]},
        {"role": "assistant", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
    ]
    _, answer = _call(app, "/v1/chat/completions", {**body, "n": 1, "messages": parts, "echo": True})
    assert answer["choices"][0]["message"]["content"].startswith("A\nB")
    # the answer's role is the assistant's, the last message the user's: nothing to echo (as vLLM)
    _, answer = _call(app, "/v1/chat/completions", {**body, "messages": said[:1], "echo": True})
    _, want = _call(app, "/v1/chat/completions", {**body, "messages": said[:1]})
    assert [c["message"] for c in answer["choices"]] == [c["message"] for c in want["choices"]]
    # continue_final_message: the answer's role is the last message's, so its text comes first
    cont = {**body, "n": 1, "add_generation_prompt": False, "continue_final_message": True}
    _, answer = _call(app, "/v1/chat/completions", {**cont, "echo": True})
    _, want = _call(app, "/v1/chat/completions", cont)
    assert answer["choices"][0]["message"]["content"] == "Sure, " + want["choices"][0]["message"]["content"]
    status, chunks = _call(app, "/v1/chat/completions", {**body, "echo": True, "stream": True})
    assert status == 200
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert [d["delta"] for d in deltas[:4]] == [{"role": "assistant", "content": ""}] * 2 + [{"content": "Sure, "}] * 2
    assert [d["index"] for d in deltas[:4]] == [0, 1, 0, 1]
    for i, choice in enumerate(echoed["choices"]):
        text = "".join(d["delta"].get("content", "") for d in deltas if d["index"] == i)
        assert text == choice["message"]["content"]
    status, answer = _call(app, "/v1/chat/completions", {**body, "echo": 1})
    assert status == 400 and answer["error"]["param"] == "echo"


def test_a_wordpiece_answer_that_goes_on_a_word_joins_it_as_vllms_decoder():
    """A WordPiece (BERT) answer whose first token is "##s" decoded alone to "##s"; vLLM's DecodeStream, primed with
    the prompt, gives "s" (the prompt's last word goes on)."""
    from tiny import tokenizer

    from deltatune.serve.engine import Request

    tok = tokenizer()
    engine, _ = _serve(tok)
    try:
        prompt = tok("the cat")["input_ids"]
        for answer in (["##s", "sat", "."], ["##ty", "##s"], ["sat", "on"]):
            ids = tok.convert_tokens_to_ids(answer)
            deltas: list[str] = []
            r = Request(prompt_ids=prompt, adapter="base", max_tokens=len(ids), ignore_eos=True,
                        emit=lambda text, finish, d=deltas: d.append(text))  # fmt: skip
            for t in ids:
                engine._advance(r, t)
            want = _vllm_text(tok, prompt, ids)
            if answer[0].startswith("##"):
                assert "".join(deltas) == r.text == want, (answer, deltas, want)
            else:  # a first word: vLLM's space before it is not kept (docs/serve.md)
                assert "".join(deltas) == r.text == want[1:] and want.startswith(" "), (answer, deltas, want)
        assert tok.decode(tok.convert_tokens_to_ids(["##s"])) == "##s"  # what decoding alone gave
    finally:
        engine.close()


@pytest.fixture(scope="module")
def minilm():
    from tiny import tokenizer

    engine, app = _serve(tokenizer())
    yield engine, app
    engine.close()


def test_a_bad_word_of_no_token_and_an_infinite_or_huge_number_are_a_400_not_a_500(minilm):
    """A bad word the tokenizer drops (a zero-width space) indexed an empty list: a 500 (vLLM's 400: "bad_words
    entries must tokenize to at least one token"). repetition_penalty inf was served (vLLM: "must be a finite
    number"), and an integer past float's range an OverflowError, a 500. A huge logit_bias is clamped, as vLLM's
    min/max take it."""
    engine, app = minilm
    assert engine.tokenizer.encode("\u200b", add_special_tokens=False) == []
    body = {"prompt": "the cat", "max_tokens": 2}
    status, answer = _call(app, "/v1/completions", {**body, "bad_words": ["\u200b"]})
    assert status == 400 and answer["error"]["param"] == "bad_words", answer
    for value in (float("inf"), 10**400):
        status, answer = _call(app, "/v1/completions", {**body, "repetition_penalty": value})
        assert status == 400 and answer["error"]["param"] == "repetition_penalty", answer
        assert "finite" in answer["error"]["message"]
    assert _call(app, "/v1/completions", {**body, "repetition_penalty": 1e300})[0] == 200  # finite: vLLM serves it
    from deltatune.serve.fields import _logit_bias

    huge = {"1": 10**400, "2": -(10**400), "3": float("inf"), "4": float("nan")}
    assert _logit_bias({"logit_bias": huge}, 10) == {t: min(100.0, max(-100.0, v)) for t, v in ((1, 10**400),
           (2, -(10**400)), (3, float("inf")), (4, float("nan")))} == {1: 100.0, 2: -100.0, 3: 100.0, 4: -100.0}  # fmt: skip
    assert _call(app, "/v1/completions", {**body, "logit_bias": {"5": 10**400}})[0] == 200


def test_tokenize_and_detokenize_answer_as_vllms_routes(minilm):
    """vLLM's /tokenize (a completion's prompt, or a chat's messages rendered as a chat request renders them) and
    /detokenize were a 404."""
    engine, app = minilm
    tok = engine.tokenizer
    status, answer = _call(app, "/tokenize", {"prompt": "the cat sat", "return_token_strs": True})
    ids = tok("the cat sat")["input_ids"]
    assert status == 200 and answer == {"count": len(ids), "max_model_len": 128, "tokens": ids,
                                        "token_strs": tok.convert_ids_to_tokens(ids)}, answer  # fmt: skip
    _, answer = _call(app, "/tokenize", {"prompt": "the cat sat", "add_special_tokens": False})
    assert answer["tokens"] == ids[1:-1] and answer["token_strs"] is None
    assert _call(app, "/tokenize", {"prompt": ""})[1]["tokens"] == tok("")["input_ids"]  # vLLM tokenizes "" too
    messages = [{"role": "user", "content": "hi there"}]
    _, answer = _call(app, "/tokenize", {"messages": messages})
    want = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert answer["tokens"] == want["input_ids"]
    _, chat = _call(app, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert chat["usage"]["prompt_tokens"] == answer["count"]  # the prompt a chat request computes with
    status, answer = _call(app, "/detokenize", {"tokens": ids})
    assert status == 200 and answer == {"prompt": tok.decode(ids)} and answer["prompt"] == "[CLS] the cat sat [SEP]"
    for path, bad, param in (("/detokenize", {"tokens": [len(tok)]}, "tokens"), ("/detokenize", {"tokens": "1"},
                             "tokens"), ("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"prompt": "a",
                             "model": "nope"}, "model"), ("/tokenize", {"messages": messages, "add_generation_prompt":
                             True, "continue_final_message": True}, "continue_final_message")):  # fmt: skip
        status, answer = _call(app, path, bad)
        assert status in (400, 404) and answer["error"]["param"] == param, (path, bad, answer)


def test_seed_minus_1_is_no_seed_as_vllm(minilm):
    """vLLM's SamplingParams.__post_init__ turns seed -1 into None (unseeded); here it seeded every draw with -1, so
    two requests with seed -1 gave the same answer."""
    from deltatune.serve.fields import Limits, to_request

    limits = Limits(64, 128)
    assert to_request({"seed": -1}, [1, 2], limits, "base").seed is None
    assert to_request({"seed": -2}, [1, 2], limits, "base").seed == -2
    engine, app = minilm
    body = {"prompt": "the cat", "max_tokens": 8, "temperature": 1.0, "top_k": 0, "ignore_eos": True, "n": 4}
    texts = [c["text"] for c in _call(app, "/v1/completions", {**body, "seed": -1})[1]["choices"]]
    again = [c["text"] for c in _call(app, "/v1/completions", {**body, "seed": -1})[1]["choices"]]
    assert texts != again  # 4 x 8 tokens drawn over a 30,522-token vocabulary: equal only by a fluke
    seeded = [c["text"] for c in _call(app, "/v1/completions", {**body, "seed": 5})[1]["choices"]]
    assert seeded == [c["text"] for c in _call(app, "/v1/completions", {**body, "seed": 5})[1]["choices"]]


def test_return_token_ids_gives_the_prompts_and_each_choices_ids_as_vllm(minilm):
    """vLLM's return_token_ids: a completion choice's prompt_token_ids and token_ids, a chat's prompt_token_ids at
    the top; in a stream each chunk's new ids, the prompt's in a choice's first chunk. It was ignored silently."""
    engine, app = minilm
    tok = engine.tokenizer
    body = {"prompt": "the cat", "max_tokens": 5, "temperature": 1.0, "seed": 4, "n": 2, "ignore_eos": True,
            "logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True}  # fmt: skip
    status, answer = _call(app, "/v1/completions", body)
    assert status == 200, answer
    for c in answer["choices"]:
        named = [int(t.removeprefix("token_id:")) for t in c["logprobs"]["tokens"]]
        assert c["token_ids"] == named and len(named) == 5 and c["prompt_token_ids"] == tok("the cat")["input_ids"]
    status, chunks = _call(app, "/v1/completions", {**body, "stream": True})
    for i, c in enumerate(answer["choices"]):
        mine = [ch["choices"][0] for ch in chunks if ch["choices"] and ch["choices"][0]["index"] == i]
        assert sum((m["token_ids"] for m in mine), []) == c["token_ids"]
        assert mine[0]["prompt_token_ids"] == c["prompt_token_ids"] and "prompt_token_ids" not in mine[1]
    messages = [{"role": "user", "content": "hi"}]
    chat = {"messages": messages, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    _, answer = _call(app, "/v1/chat/completions", chat)
    assert answer["prompt_token_ids"] == _call(app, "/tokenize", {"messages": messages})[1]["tokens"]
    ids = answer["choices"][0]["token_ids"]
    vllm = _vllm_text(
        tok, answer["prompt_token_ids"], ids
    )  # the ids' text (less a first word's space: kept on purpose)
    assert len(ids) == 3 and answer["choices"][0]["message"]["content"] == vllm.removeprefix(" ")
    _, chunks = _call(app, "/v1/chat/completions", {**chat, "stream": True})
    assert chunks[0]["prompt_token_ids"] == answer["prompt_token_ids"]
    assert sum((ch["choices"][0].get("token_ids", []) for ch in chunks if ch["choices"]), []) == ids
    _, plain = _call(app, "/v1/chat/completions", {**chat, "return_token_ids": False})
    assert plain["prompt_token_ids"] is None and plain["choices"][0]["token_ids"] is None  # vLLM's null, not asked


def test_documents_reach_the_chat_template_as_vllm():
    """vLLM hands a chat request's documents to the chat template (RAG templates: Command-R's, Granite's); here they
    were dropped silently, so the prompt left them out."""
    from tiny import tokenizer

    tok = tokenizer()
    tok.chat_template = (
        "{% for d in documents or [] %}<doc>{{ d.title }}: {{ d.text }}</doc>\n{% endfor %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    engine, app = _serve(tok)
    try:
        messages = [{"role": "user", "content": "what colour is the sky"}]
        documents = [{"title": "sky", "text": "the sky is blue"}, {"title": "sea", "text": "so is the sea"}]
        want = tok.apply_chat_template(messages, documents=documents, add_generation_prompt=True, tokenize=False)
        assert "the sky is blue" in want
        status, answer = _call(app, "/tokenize", {"messages": messages, "documents": documents})
        assert status == 200 and answer["tokens"] == tok(want, add_special_tokens=False)["input_ids"], answer
        body = {"messages": messages, "documents": documents, "max_tokens": 1}
        status, answer = _call(app, "/v1/chat/completions", body)
        assert status == 200 and answer["usage"]["prompt_tokens"] == len(
            tok(want, add_special_tokens=False)["input_ids"]
        )
        for bad in ("x", [1], [{"title": 5}]):
            status, answer = _call(app, "/v1/chat/completions", {**body, "documents": bad})
            assert status == 400 and answer["error"]["param"] == "documents", bad
    finally:
        engine.close()


@pytest.mark.parametrize(
    "field, value",
    [
        ("thinking_token_budget", 5),
        ("repetition_detection", {"max_pattern_size": 4}),
        ("logits_processors", ["my.module.Processor"]),
        ("structural_tag", '{"type": "structural_tag"}'),
        ("prompt_embeds", "AAAA"),
    ],
)
def test_vllm_fields_that_change_the_answer_are_refused_not_ignored(minilm, field, value):
    """vLLM's thinking_token_budget, repetition_detection, logits_processors, structural_tag and prompt_embeds were
    ignored silently (an answer other than the one asked for); a 400 unsupported naming the field, null served."""
    _, app = minilm
    body = {"prompt": "the cat", "max_tokens": 1}
    status, answer = _call(app, "/v1/completions", {**body, field: value})
    assert status == 400 and answer["error"]["param"] == field and answer["error"]["code"] == "unsupported", answer
    assert _call(app, "/v1/completions", {**body, field: None})[0] == 200


def test_completion_echo_with_return_token_ids_gives_the_prompt_as_ids_alone_as_vllm(minilm):
    """vLLM's completion serving sets prompt_text = "" under return_token_ids (streamed and not): the echoed prompt
    comes back as prompt_token_ids, not in ``text``; its log-probability rows stay. Here ``text`` began with the
    prompt."""
    engine, app = minilm
    tok = engine.tokenizer
    body = {"prompt": "the cat", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "echo": True, "logprobs": 1}
    _, plain = _call(app, "/v1/completions", {k: v for k, v in body.items() if k != "echo"})
    _, echoed = _call(app, "/v1/completions", body)
    status, ids = _call(app, "/v1/completions", {**body, "return_token_ids": True})
    assert status == 200, ids
    choice = ids["choices"][0]
    assert echoed["choices"][0]["text"].startswith("the cat")  # echo alone: the prompt's text first
    assert choice["text"] == plain["choices"][0]["text"] and choice["prompt_token_ids"] == tok("the cat")["input_ids"]
    assert choice["logprobs"] == echoed["choices"][0]["logprobs"]  # the prompt's rows kept, as vLLM's
    assert len(choice["logprobs"]["tokens"]) == len(choice["prompt_token_ids"]) + 3
    _, nothing = _call(app, "/v1/completions", {**body, "max_tokens": 0, "return_token_ids": True})
    assert nothing["choices"][0]["text"] == "" and nothing["choices"][0]["token_ids"] == []
    status, chunks = _call(app, "/v1/completions", {**body, "return_token_ids": True, "stream": True})
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert status == 200 and "".join(texts) == choice["text"] and not texts[0].startswith("the")


def test_tokenize_refuses_chat_template_as_chat_does_and_renders_tools_as_vllm():
    """/tokenize ignored chat_template (chat completions answer a 400), and refused tools with a 400 about
    tool_choice 'auto'; vLLM's TokenizeChatRequest has tools and no tool_choice, and renders them. A non-list
    ``tools`` on chat named tool_choice."""
    from tiny import tokenizer

    tok = tokenizer()
    tok.chat_template = (
        "{% for t in tools or [] %}<tool>{{ t.function.name }}</tool>\n{% endfor %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    engine, app = _serve(tok)
    try:
        messages = [{"role": "user", "content": "hi"}]
        tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
        status, answer = _call(app, "/tokenize", {"messages": messages, "tools": tools})
        want = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        assert "<tool>weather</tool>" in want
        assert status == 200 and answer["tokens"] == tok(want, add_special_tokens=False)["input_ids"], answer
        chat = {"messages": messages, "tools": tools, "tool_choice": "none", "max_tokens": 1, "return_token_ids": True}
        assert _call(app, "/v1/chat/completions", chat)[1]["prompt_token_ids"] == answer["tokens"]
        for path in ("/tokenize", "/v1/chat/completions"):
            status, answer = _call(app, path, {"messages": messages, "chat_template": "{{ 'XYZ' }}", "max_tokens": 1})
            assert status == 400 and answer["error"]["param"] == "chat_template", (path, answer)
            assert answer["error"]["code"] == "unsupported"
            status, answer = _call(app, path, {"messages": messages, "tools": "x", "max_tokens": 1})
            assert status == 400 and answer["error"]["param"] == "tools", (path, answer)
        assert _call(app, "/tokenize", {"messages": messages, "chat_template": None})[0] == 200
    finally:
        engine.close()


def test_thinking_budget_minus_1_and_repetition_detection_off_are_served_as_vllm(minilm):
    """vLLM's validate_thinking_token_budget turns -1 into None (no budget) and RepetitionDetectionParams'
    max_pattern_size 0 disables it: both ask for nothing, and were a 400 unsupported here."""
    _, app = minilm
    body = {"prompt": "the cat", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    _, plain = _call(app, "/v1/completions", body)
    for field, value in (("thinking_token_budget", -1), ("repetition_detection", {"max_pattern_size": 0}),
                         ("repetition_detection", {"max_pattern_size": 0, "min_pattern_size": 0, "min_count": 0})):  # fmt: skip
        status, answer = _call(app, "/v1/completions", {**body, field: value})
        assert status == 200 and answer["choices"][0]["text"] == plain["choices"][0]["text"], (field, value, answer)
    for field, value in (("thinking_token_budget", 0), ("thinking_token_budget", True),
                         ("repetition_detection", {"max_pattern_size": 0, "min_pattern_size": 2})):  # fmt: skip
        status, answer = _call(app, "/v1/completions", {**body, field: value})
        assert status == 400 and answer["error"]["param"] == field, (field, value, answer)


def test_a_messages_name_or_tool_call_id_that_is_no_string_is_a_400(minilm):
    """vLLM's message types all read ``name: str`` (a tool message's ``tool_call_id: str``), and pydantic coerces no
    number to a string: a 400. Here it was dropped silently (d7f65fe, backed out in 2cc8e6e, restored)."""
    _, app = minilm
    for message in (
        {"role": "user", "content": "hi", "name": 7},
        {"role": "tool", "content": "hi", "tool_call_id": [1]},
    ):
        status, answer = _call(app, "/v1/chat/completions", {"messages": [message], "max_tokens": 1})
        assert status == 400 and answer["error"]["param"] == "messages", answer
        assert "must be a string" in answer["error"]["message"]
    message = {"role": "user", "content": "hi", "name": "ann"}
    assert _call(app, "/v1/chat/completions", {"messages": [message], "max_tokens": 1})[0] == 200


def test_a_chat_streams_echo_chunk_carries_no_token_ids_as_vllm(minilm):
    """vLLM's chat echo chunk is a DeltaMessage with the content alone; under return_token_ids it carried
    "token_ids": [] here."""
    _, app = minilm
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "sure ,"}]
    body = {"messages": said, "max_tokens": 2, "echo": True, "stream": True, "return_token_ids": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    status, chunks = _call(app, "/v1/chat/completions", body)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert status == 200 and choices[1]["delta"] == {"content": "sure ,"} and "token_ids" not in choices[1]
    assert len(sum((c.get("token_ids", []) for c in choices), [])) == 2


def test_a_wordpiece_answer_after_an_added_token_joins_it_as_vllm():
    """A prompt ending in [MASK], special tokens kept and spaces_between_special_tokens false: an answer starting
    "##s" gave "##s" (the prompt's context decoded with the added-token cut, the answer's without, so its text was
    no prefix); vLLM's primed DecodeStream gives "s"."""
    from tiny import tokenizer

    from deltatune.serve.engine import Request

    tok = tokenizer()
    engine, _ = _serve(tok)
    try:
        prompt = tok("the cat")["input_ids"] + [tok.mask_token_id]
        for answer in (["##s"], ["##s", "[SEP]", "##s"], ["##ty", "sat"]):
            ids = tok.convert_tokens_to_ids(answer)
            deltas: list[str] = []
            r = Request(prompt_ids=prompt, adapter="base", max_tokens=len(ids), ignore_eos=True,
                        skip_special_tokens=False, spaces_between_special_tokens=False,
                        emit=lambda text, finish, d=deltas: d.append(text))  # fmt: skip
            for t in ids:
                engine._advance(r, t)
            want = _vllm_text(tok, prompt, ids, skip=False, spaces=False)
            assert "".join(deltas) == want and not want.startswith("#"), (answer, deltas, want)
    finally:
        engine.close()


def test_logit_bias_keys_are_read_with_int_and_a_list_is_a_400_as_vllm(minilm):
    """vLLM's from_optional reads each key with int(): " 5" and "+5" are token 5 (they were a 400 here); its
    dict type refuses a list (``"logit_bias": []`` was served here)."""
    engine, app = minilm
    body = {"prompt": "the cat", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    tok_id = engine.tokenizer.convert_tokens_to_ids("sat")
    _, want = _call(app, "/v1/completions", {**body, "logit_bias": {str(tok_id): 100}})
    for key in (" 5", "+5", "5 ", "05"):
        assert int(key) == 5  # vLLM's reading
        wire = key.replace("5", str(tok_id))
        status, answer = _call(app, "/v1/completions", {**body, "logit_bias": {wire: 100}})
        assert status == 200 and answer["choices"][0]["text"] == want["choices"][0]["text"] == "sat sat", answer
    for bad in ([], ["5"], {"-1": 1}, {"5.0": 1}):
        status, answer = _call(app, "/v1/completions", {**body, "logit_bias": bad})
        assert status == 400 and answer["error"]["param"] == "logit_bias", (bad, answer)
    assert _call(app, "/v1/completions", {**body, "logit_bias": {}})[0] == 200
    assert _call(app, "/v1/completions", {**body, "logit_bias": None})[0] == 200
