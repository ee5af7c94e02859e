"""Probe 9 of ``deltatune serve``: log-probability names and order as vLLM gives them, and the sampling fields
OpenAI and vLLM define (penalties, ``logit_bias``, ``min_tokens``, ``top_k``, ``min_p``), which were a 400
``unsupported``, computed with their references' formulas (transformers' logits processors where they share one)."""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request

import pytest
import torch

CHAT = [{"role": "user", "content": "the small dog sat"}]


def _post(server, path: str, body: dict):
    request = urllib.request.Request(
        server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return 200, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def _smollm2():
    from transformers import AutoTokenizer

    from deltatune.config import ConfigError
    from deltatune.train.models import resolve_path

    try:
        return AutoTokenizer.from_pretrained(resolve_path("smollm2"))  # byte-level BPE
    except ConfigError as exc:
        pytest.skip(str(exc))


def test_top_logprobs_below_the_floor_are_ordered_by_logit():
    """Every log-probability under -9999 is reported as -9999 (OpenAI's), but the top k were chosen after that
    floor, so among them the order was topk's pick among ties ([0, 1, 2, 3]); vLLM ranks them by the raw values."""
    from deltatune.serve.logprob_names import logprob_row

    logits = torch.tensor([0.0, -20000.0, -30000.0, -15000.0])
    token, lp, top = logprob_row(logits, 2, 4)
    assert (token, lp) == (2, -9999.0)
    assert [i for i, _ in top] == [0, 3, 1, 2] and [v for _, v in top] == [0.0, -9999.0, -9999.0, -9999.0]


def test_alternatives_at_a_split_character_are_named_in_context_as_vllm_names_them():
    """' 你' is ' ' + E4 BD + A0 in byte-level pieces. The chosen pieces were named ' ', '', '你' (probe 7), but each
    alternative by itself ('\\ufffd'), and a completion's top_logprobs key of the completing piece stayed '\\ufffd'
    while its token was '你'. vLLM names every candidate in the context of the tokens chosen before it: the A1 piece
    after E4 BD is '佡', E4 BB after ' ' completes nothing (''); so does our chosen one's key."""
    from deltatune.serve.logprob_names import logprobs_json

    tok = _smollm2()
    a1 = tok.convert_tokens_to_ids("\u00a1")  # the byte A1 alone
    rows = [
        (216, -0.1, [(216, -0.1), (26411, -3.0)]),  # ' ', ' é'
        (18645, -0.2, [(18645, -0.2), (15076, -2.0)]),  # E4 BD, E4 BB
        (250, -0.3, [(250, -0.3), (a1, -1.5)]),  # A0, A1
    ]
    assert [tok.decode([t]) for t in (18645, 15076, 250, a1)] == ["\ufffd"] * 4
    out = logprobs_json(tok, rows, chat=False)
    assert out["tokens"] == [" ", "", "你"]
    assert out["top_logprobs"][2] == {"你": -0.3, "佡": -1.5}  # was {"\ufffd": -1.5}: both pieces one key
    assert out["top_logprobs"][0] == {" ": -0.1, " é": -3.0}
    content = logprobs_json(tok, rows, chat=True)["content"]
    assert [[t["token"] for t in c["top_logprobs"]] for c in content] == [[" ", " é"], ["", ""], ["你", "佡"]]
    assert content[2]["top_logprobs"][1]["bytes"] == list("佡".encode())
    state, streamed = {}, []  # a stream whose chunk ends inside '你' names them alike
    for part in (rows[:2], rows[2:]):
        streamed += logprobs_json(tok, part, chat=True, state=state)["content"]
    assert streamed == content


def _generate(base: str, ids: list[int], bias: dict[int, float], seed: int | None = None, n: int = 6) -> list[int]:
    """transformers' generate on the base with ``sequence_bias`` (each token's bias added to its logit): greedy, or
    sampled under ``torch.manual_seed(seed)`` at temperature 1 with generate's top-k 50."""
    model = _model(base)
    x = torch.tensor([ids])
    kw = {"do_sample": False} if seed is None else {"do_sample": True, "temperature": 1.0, "top_k": 50}
    if bias:
        kw["sequence_bias"] = {(t,): b for t, b in bias.items()}
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, pad_token_id=0, **kw)
    return out[0, len(ids) :].tolist()


def test_logit_bias_is_added_to_the_logits_as_openai_and_generates_sequence_bias(served):
    """OpenAI's logit_bias ({token id: -100..100} added to the logit before sampling) was a 400 unsupported. Greedy
    and seeded answers equal transformers' generate with the same sequence_bias; the log-probabilities stay the
    model's own (vLLM's raw_logprobs)."""
    engine, server, base, _ = served
    tok = engine.tokenizer
    ids = tok("the cat sat on")["input_ids"]
    plain = _generate(base, ids, {})
    bias = {plain[0]: -100.0, plain[2]: -100.0, 1000: 3.5}  # its first pick banned, a token favoured
    body = {"model": "base", "prompt": ids, "max_tokens": 6, "ignore_eos": True}
    wire = {str(t): b for t, b in bias.items()}
    for seed in (None, 3):
        want = _generate(base, ids, bias, seed)
        assert want != _generate(base, ids, {}, seed)  # the bias changes the answer
        sampling = {"temperature": 0} if seed is None else {"seed": seed, "temperature": 1.0}
        status, answer = _post(server, "/v1/completions", {**body, **sampling, "logit_bias": wire, "logprobs": 0})
        assert status == 200, answer
        choice = answer["choices"][0]
        assert choice["text"] == tok.decode(want, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert plain[0] not in want and 1000 in want
    first = _post(server, "/v1/completions", {**body, "temperature": 0, "logit_bias": wire, "logprobs": 0})[1]
    raw = torch.log_softmax(_logits(base, ids), -1)  # the chosen token's own log-probability, not the biased one
    chosen = first["choices"][0]["logprobs"]["token_logprobs"][0]
    assert chosen == pytest.approx(float(raw[_generate(base, ids, bias)[0]]), abs=1e-4)
    chat = {"model": "lora", "messages": CHAT, "max_tokens": 1}
    for wrong in ({"abc": 1}, {"-1": 1}, {str(len(tok) * 10): 1}, {"5": "x"}, {"5": True}, [5]):
        status, answer = _post(server, "/v1/chat/completions", {**chat, "logit_bias": wrong})
        assert status == 400 and answer["error"]["param"] == "logit_bias", wrong
    assert _post(server, "/v1/chat/completions", {**chat, "logit_bias": {"5": -100, "6": 101}})[0] == 200  # clamped
    from deltatune.serve.fields import _logit_bias

    assert _logit_bias({"logit_bias": {"5": 1, "05": -100}}, 10) == {5: -100.0}  # vLLM's int(key): the last one


def _logits(base: str, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return _model(base)(input_ids=torch.tensor([ids])).logits[0, -1].float()


@functools.cache
def _model(base: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def test_a_user_that_is_not_a_string_and_audio_modalities_are_400s(served):
    """OpenAI's user is a string (OpenAI and vLLM refuse another type; it answered 200), and modalities ["text",
    "audio"] asks for spoken output too, which was ignored (a text answer, 200), where `audio` itself is refused."""
    _, server, _, _ = served
    chat = {"model": "lora", "messages": CHAT, "max_tokens": 1}
    for field, value in (("user", 5), ("user", {"id": "x"}), ("modalities", ["text", "audio"])):
        status, answer = _post(server, "/v1/chat/completions", {**chat, field: value})
        assert status == 400 and answer["error"]["param"] == field, (field, value)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    for field, value in (("user", "bob"), ("user", None), ("modalities", ["text"]), ("unknown_field", 1)):
        assert _post(server, "/v1/chat/completions", {**chat, field: value})[0] == 200, (field, value)


NAMED = (  # a chat template that reads the participant's name and a tool result's call id
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m.name is defined %} {{ m.name }}{% endif %}"
    "{% if m.tool_call_id is defined %} [{{ m.tool_call_id }}]{% endif %}{{ '\\n' + m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_text_parts_join_by_newline_and_name_reaches_the_template_as_vllm(served, monkeypatch):
    """Text parts were joined with "" ("a" "b" -> "ab"; vLLM: "a\\nb"), and a message's name and a tool message's
    tool_call_id were dropped before the template (vLLM passes both)."""
    from deltatune.serve.app import _chat_ids

    engine = served[0]
    tok = engine.tokenizer
    monkeypatch.setattr(tok, "chat_template", NAMED)
    messages = [
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "tool", "tool_call_id": "call1", "content": "42"},
        {"role": "user", "content": "c"},
    ]
    want = (
        "<|im_start|>user ann\na\nb<|im_end|>\n<|im_start|>tool [call1]\n42<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
    )
    want += "<|im_start|>assistant\n"
    assert _chat_ids(tok, messages) == tok(want, add_special_tokens=False)["input_ids"]
    # a name that is not a string is a 400, as vLLM's pydantic messages (name: str) answer (tests/test_serve_probe12)
    from deltatune.serve.engine import RequestError

    with pytest.raises(RequestError, match=r"messages\[0\]\.name must be a string"):
        _chat_ids(tok, [{"role": "user", "name": 7, "content": "c"}])


CALLS = (  # a chat template that renders an assistant's tool calls (their arguments read as an object)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' + m['content'] }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments.city }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_an_assistants_tool_calls_reach_the_template_with_their_arguments_parsed(served, monkeypatch):
    """A conversation's earlier tool call was dropped (rendered as an empty assistant turn), and one with content
    null was a 400; vLLM hands tool_calls to the template, each function's JSON arguments parsed into an object."""
    from deltatune.serve.app import _chat_ids

    _, server, _, _ = served
    tok = served[0].tokenizer
    monkeypatch.setattr(tok, "chat_template", CALLS)
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "oslo"}'}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"},
    ]
    want = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>weather oslo</tool_call><|im_end|>\n"
    want += "<|im_start|>tool\ncold<|im_end|>\n<|im_start|>assistant\n"
    assert _chat_ids(tok, messages) == tok(want, add_special_tokens=False)["input_ids"]
    chat = {"model": "lora", "max_tokens": 1}
    assert _post(server, "/v1/chat/completions", {**chat, "messages": messages})[0] == 200
    bad = {**call, "function": {"name": "weather", "arguments": "{oslo"}}
    for calls in ([bad], "x", [5]):
        wrong = [messages[0], {"role": "assistant", "content": "", "tool_calls": calls}]
        status, answer = _post(server, "/v1/chat/completions", {**chat, "messages": wrong})
        assert status == 400 and answer["error"]["param"] == "messages", calls


def test_top_p_is_any_number_in_vllms_half_open_unit_interval(served):
    """top_p 1e-12 was a 400 ([1e-09, 1.0]); vLLM takes (0, 1]: the nucleus is then the most likely token alone, so
    a sampled answer is the greedy one. top_p 0 stays a 400 (vLLM's too)."""
    _, server, _, _ = served
    body = {"model": "base", "prompt": "the cat sat on", "max_tokens": 4, "ignore_eos": True}
    status, greedy = _post(server, "/v1/completions", {**body, "temperature": 0})
    status, answer = _post(server, "/v1/completions", {**body, "temperature": 1.5, "top_p": 1e-12, "seed": 1})
    assert status == 200 and answer["choices"][0]["text"] == greedy["choices"][0]["text"]
    status, answer = _post(server, "/v1/completions", {**body, "top_p": 0})
    assert status == 400 and answer["error"]["param"] == "top_p" and "(0.0, 1.0]" in answer["error"]["message"]


def test_a_lone_surrogate_in_a_tool_calls_arguments_or_template_kwargs_is_a_400(served, monkeypatch):
    """JSON's "\\ud800" parsed from a tool call's arguments (or a chat_template_kwargs value) reached the tokenizer
    through the template: a 500 with the tokenizer's TypeError, where one in a message's content is a 400."""
    _, server, _, _ = served
    monkeypatch.setattr(served[0].tokenizer, "chat_template", CALLS)
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "\\ud800"}'}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    status, answer = _post(server, "/v1/chat/completions", {"model": "lora", "max_tokens": 1, "messages": messages})
    assert status == 400 and answer["error"]["param"] == "messages", answer


def test_an_empty_stop_string_is_a_400_alone_or_in_a_list_as_vllm(served):
    """stop [""] was a 400 but stop "" answered 200 as if no stop were given; vLLM refuses both ("stop cannot
    contain an empty string"). A stop string across two tokens still cuts the text before it, finish_reason stop."""
    _, server, _, _ = served
    body = {"model": "base", "prompt": "the cat sat on", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    for stop in ("", [""], ["x", ""]):
        status, answer = _post(server, "/v1/completions", {**body, "stop": stop})
        assert status == 400 and answer["error"]["param"] == "stop", stop
    for stop in (None, []):
        assert _post(server, "/v1/completions", {**body, "stop": stop})[0] == 200, stop
    text = _post(server, "/v1/completions", body)[1]["choices"][0]["text"]
    space = text.index(" ", 1)  # a stop string from one word into the next: two tokens
    status, answer = _post(server, "/v1/completions", {**body, "stop": [text[space - 2 : space + 2]]})
    assert answer["choices"][0]["text"] == text[: space - 2] and answer["choices"][0]["finish_reason"] == "stop"
