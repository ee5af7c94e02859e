"""Probe 7 of ``deltatune serve``: log-probabilities as OpenAI and vLLM answer them. Chat's ``logprobs: true`` with
``top_logprobs: k`` and a completion's ``logprobs: k`` (with ``echo``, the prompt's tokens too), streamed or not,
are the model's own log-softmax (vLLM's default ``logprobs_mode``, raw_logprobs), equal to transformers' forward
pass over the same adapter; they were a 400 ``unsupported``."""

from __future__ import annotations

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
            raw = answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())
    if not body.get("stream"):
        return 200, json.loads(raw)
    return 200, [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]


def _log_softmax(base: str, folder: str, ids: list[int]) -> torch.Tensor:
    """transformers' forward over ``ids`` with the adapter loaded alone: log_softmax at every position."""
    from deltatune.train.run import load_adapter_model

    model = load_adapter_model(folder, base)[0].eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[-len(ids) :], dim=-1)  # a token adapter's virtual tokens come first


def test_chat_logprobs_are_the_adapters_log_softmax(served):
    engine, server, base, folders = served
    tok = engine.tokenizer
    prompt = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    prompt = prompt["input_ids"]
    body = {"model": "lora", "messages": CHAT, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    status, answer = _post(server, "/v1/chat/completions", body)
    assert status == 200
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 5
    ids = [tok.convert_tokens_to_ids(c["token"]) for c in content]
    want = _log_softmax(base, folders["lora"], prompt + ids)
    for i, c in enumerate(content):
        row = want[len(prompt) + i - 1]
        assert c["logprob"] == pytest.approx(float(row[ids[i]]), abs=1e-4)
        assert c["bytes"] == list(c["token"].encode("utf-8"))
        top = row.topk(3)
        assert [a["token"] for a in c["top_logprobs"]] == [tok.decode([t]) for t in top.indices.tolist()]
        assert [a["logprob"] for a in c["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert c["top_logprobs"][0]["token"] == c["token"]  # greedy: the most likely token
    assert answer["choices"][0]["message"]["content"] == tok.decode(ids, skip_special_tokens=True)
    status, chunks = _post(server, "/v1/chat/completions", {**body, "stream": True})
    streamed = [c for chunk in chunks for c in (chunk["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == content


def test_completion_logprobs_with_echo_are_the_token_adapters_log_softmax(served):
    """A prompt-tuning adapter (its batch of its own, virtual tokens ahead of the prompt), the prompt echoed."""
    engine, server, base, folders = served
    tok = engine.tokenizer
    prompt = tok("the cat sat on")["input_ids"]
    body = {"model": "prompt", "prompt": "the cat sat on", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    status, answer = _post(server, "/v1/completions", {**body, "echo": True})
    assert status == 200
    text, logprobs = answer["choices"][0]["text"], answer["choices"][0]["logprobs"]
    ids = prompt + [tok.convert_tokens_to_ids(t) for t in logprobs["tokens"][len(prompt) :]]
    assert logprobs["tokens"] == [tok.decode([t]) for t in ids] and len(ids) == len(prompt) + 4
    assert text.startswith("the cat sat on") and text == "the cat sat on" + tok.decode(ids[len(prompt) :])
    want = _log_softmax(base, folders["prompt"], ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert logprobs["token_logprobs"][i] == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-4)
        top = logprobs["top_logprobs"][i]  # the 2 most likely, and the chosen token among them
        best = want[i - 1].topk(2)
        assert list(top)[:2] == [tok.decode([t]) for t in best.indices.tolist()] or len(top) == 3
        assert tok.decode([ids[i]]) in top and len(top) in (2, 3)
        assert list(top.values()) == sorted(top.values(), reverse=True)
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(ids))]
    status, plain = _post(server, "/v1/completions", body)  # without echo: the answer's tokens alone
    assert plain["choices"][0]["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][len(prompt) :]
    status, chunks = _post(server, "/v1/completions", {**body, "echo": True, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    merged = {key: [] for key in logprobs}
    for chunk in chunks:
        for key, values in (chunk["choices"][0]["logprobs"] or {}).items():
            merged[key] += values
    assert merged == logprobs


def test_logprobs_limits_are_a_400_naming_the_field(served):
    _, server, _, _ = served
    chat = {"model": "lora", "messages": CHAT, "max_tokens": 1}
    for fields, param in (
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": "two"}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true (OpenAI's and vLLM's 400)
        ({"logprobs": 1}, "logprobs"),
        ({"echo": 1}, "echo"),  # served on chat too (vLLM's), a flag
    ):
        status, answer = _post(server, "/v1/chat/completions", {**chat, **fields})
        assert status == 400 and answer["error"]["param"] == param, fields
    status, answer = _post(server, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 0})
    content = answer["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) == 1 and content[0]["top_logprobs"] == []
    completion = {"model": "lora", "prompt": "the cat", "max_tokens": 1}
    for fields, param in (({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2},
                          "top_logprobs"), ({"echo": 1}, "echo")):  # fmt: skip
        status, answer = _post(server, "/v1/completions", {**completion, **fields})
        assert status == 400 and answer["error"]["param"] == param, fields
    status, answer = _post(server, "/v1/completions", {**completion, "logprobs": 0})
    logprobs = answer["choices"][0]["logprobs"]
    assert status == 200 and list(logprobs["top_logprobs"][0]) == logprobs["tokens"]  # the chosen token's alone
    for nothing in ({}, {"logprobs": None}, {"logprobs": False}):
        assert _post(server, "/v1/completions", {**completion, **nothing})[1]["choices"][0]["logprobs"] is None


def test_n_choices_as_openai_and_vllm_answer_them(served):
    """n > 1 was a 400: now n choices, a seeded request's i-th drawn with seed + i (vLLM's), the prompt counted once
    in usage, every choice streamed under its index."""
    _, server, _, _ = served
    body = {"model": "ia3", "prompt": "the cat sat", "max_tokens": 5, "temperature": 1.0, "seed": 7}
    alone = [_post(server, "/v1/completions", {**body, "seed": 7 + i})[1] for i in range(3)]
    status, answer = _post(server, "/v1/completions", {**body, "n": 3, "logprobs": 1})
    assert status == 200 and [c["index"] for c in answer["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in answer["choices"]]
    assert texts == [a["choices"][0]["text"] for a in alone] and len(set(texts)) > 1
    assert answer["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
    assert answer["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    assert [len(c["logprobs"]["tokens"]) for c in answer["choices"]] == [
        a["usage"]["completion_tokens"] for a in alone
    ]
    chat = {"model": "lora", "messages": CHAT, "max_tokens": 4, "temperature": 0, "n": 2}
    status, answer = _post(server, "/v1/chat/completions", chat)
    greedy = [c["message"]["content"] for c in answer["choices"]]
    assert status == 200 and len(greedy) == 2 and greedy[0] == greedy[1]
    options = {"stream": True, "stream_options": {"include_usage": True}}
    status, chunks = _post(server, "/v1/chat/completions", {**chat, **options})
    streamed, finish = ["", ""], [None, None]
    for c in chunks[:-1]:
        choice = c["choices"][0]
        streamed[choice["index"]] += choice["delta"].get("content", "")
        finish[choice["index"]] = choice["finish_reason"] or finish[choice["index"]]
    assert streamed == greedy and finish == [c["finish_reason"] for c in answer["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == answer["usage"]
    top = {**body, "seed": 2**63 - 1, "n": 2}  # vLLM's int64 seed's top: seed + 1 past int64 fails no batch
    assert _post(server, "/v1/completions", top)[0] == 200
    assert _post(server, "/v1/completions", {**body, "seed": 2**63})[1]["error"]["param"] == "seed"  # vLLM's 400
    for n in (0, 129, True, 1.5):
        status, answer = _post(server, "/v1/completions", {**body, "n": n})
        assert status == 400 and answer["error"]["param"] == "n", n


def test_openai_error_types_a_batch_of_one_token_list_and_continuous_usage(served):
    """An unknown model answered type not_found_error (OpenAI: invalid_request_error, code model_not_found); a
    prompt [[ids]] (lm-evaluation-harness's local-completions, batch size 1) was a 400; vLLM's
    stream_options.continuous_usage_stats was accepted and ignored (usage null in every chunk)."""
    engine, server, _, _ = served
    status, answer = _post(server, "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert status == 404 and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["code"] == "model_not_found"
    ids = engine.tokenizer("the cat sat")["input_ids"]
    body = {"model": "lora", "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    flat = _post(server, "/v1/completions", {**body, "prompt": ids})
    status, nested = _post(server, "/v1/completions", {**body, "prompt": [ids]})
    assert (
        status == 200 and nested["choices"] == flat[1]["choices"] and len(nested["choices"][0]["logprobs"]["tokens"])
    )
    stream = {
        "model": "lora",
        "prompt": "the cat",
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    status, chunks = _post(server, "/v1/completions", {**stream, "stream_options": {"include_usage": True,
                                                                                      "continuous_usage_stats": True}})  # fmt: skip
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert (
        status == 200
        and counts == sorted(counts)
        and counts[-1] == 4
        and chunks[-1]["usage"]["completion_tokens"] == 4
    )
    assert all(c["usage"]["prompt_tokens"] == len(engine.tokenizer("the cat")["input_ids"]) for c in chunks)


def test_a_batch_of_prompts_answers_n_choices_per_prompt(served):
    """A completion's prompt list of strings or of token id lists (OpenAI's and vLLM's batch) was a 400: now the
    choices of prompt p are p * n .. p * n + n - 1, each as that prompt alone with seed + i, every prompt counted in
    usage, each echo its own prompt; vLLM's return_tokens_as_token_ids names logprobs "token_id:N" (13d6e70)."""
    engine, server, _, _ = served
    other = engine.tokenizer("a big red dog")["input_ids"]
    body = {"model": "lora", "max_tokens": 3, "temperature": 1.0, "seed": 5, "echo": True}
    alone = [_post(server, "/v1/completions", {**body, "prompt": p, "seed": 5 + i})[1]
             for p in ("the cat", other) for i in range(2)]  # fmt: skip
    status, answer = _post(server, "/v1/completions", {**body, "prompt": ["the cat", other], "n": 2})
    assert status == 200 and [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in answer["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert answer["choices"][2]["text"].startswith(engine.tokenizer.decode(other))
    assert answer["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"] + len(other)
    assert answer["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    status, chunks = _post(server, "/v1/completions", {**body, "prompt": ["the cat", other], "n": 2, "stream": True})
    texts = ["", "", "", ""]
    for c in chunks:
        texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
    assert texts == [c["text"] for c in answer["choices"]]
    for bad in (["the cat", 3], [[1, 2], []], []):
        assert _post(server, "/v1/completions", {**body, "prompt": bad})[1]["error"]["param"] == "prompt", bad
    named = {**body, "prompt": "the cat", "logprobs": 1, "return_tokens_as_token_ids": True}
    assert _post(server, "/v1/completions", named)[1]["choices"][0]["logprobs"]["tokens"][0].startswith("token_id:")


def test_echo_with_max_tokens_0_scores_the_prompt_alone(served):
    """echo with max_tokens 0 (vLLM's and OpenAI's way to score a prompt, as lm-evaluation-harness does) was a 400:
    now the prompt's text and log-probabilities, nothing generated; max_tokens 0 without echo stays a 400."""
    engine, server, base, folders = served
    ids = engine.tokenizer("the cat sat on")["input_ids"]
    body = {"model": "ia3", "prompt": "the cat sat on", "max_tokens": 0, "logprobs": 1, "echo": True}
    status, answer = _post(server, "/v1/completions", body)
    choice = answer["choices"][0]
    assert status == 200 and choice["text"] == "the cat sat on" and choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    want = _log_softmax(base, folders["ia3"], ids)
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [float(want[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4
    )
    status, answer = _post(server, "/v1/completions", {**body, "echo": False})
    assert status == 400 and answer["error"]["param"] == "max_tokens"
    status, answer = _post(server, "/v1/chat/completions", {"model": "ia3", "messages": CHAT, "max_tokens": 0})
    assert status == 400 and answer["error"]["param"] == "max_tokens"


def test_a_sentencepiece_tokens_leading_space_is_kept_in_its_name():
    """decode([id]) drops the space a SentencePiece piece's "▁" stands for at the start of a text (Llama 2,
    Mistral): " the" was named "the", so the names did not add up to the text (vLLM restores the spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deltatune.serve.engine import logprobs_json

    spm = Tokenizer(models.WordLevel({"\u2581the": 0, "\u2581cat": 1, "ts": 2, "[UNK]": 3}, unk_token="[UNK]"))
    spm.pre_tokenizer, spm.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=spm)
    rows = [(0, -0.5, [(0, -0.5), (2, -1.0)]), (1, -0.25, []), (2, -2.0, [])]
    out = logprobs_json(tok, rows, chat=False)
    assert out["tokens"] == [" the", " cat", "ts"] and out["text_offset"] == [0, 4, 8]
    assert out["top_logprobs"][0] == {" the": -0.5, "ts": -1.0}
    chat = logprobs_json(tok, rows, chat=True)["content"][0]
    assert chat["token"] == " the" and chat["bytes"] == [32, 116, 104, 101]


def test_a_greedy_row_whose_logits_are_nan_fails_alone(served, tmp_path):
    """A sampled NaN row fails alone with a 500 generation_failed (probe 4), but a greedy one took argmax's pick of
    a NaN and answered 200 with three tokens of garbage; with logprobs, a bare 500 (NaN is not JSON)."""
    from serving import Server
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.serve import build_engine
    from deltatune.serve.app import create_app

    _, _, base, folders = served
    model = dt.get_delta_model(
        AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(r=4, target_modules=["o_proj"])
    )
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.fill_(float("nan"))
    model.save_pretrained(str(tmp_path / "nan"))
    engine = build_engine(base, {"nan": str(tmp_path / "nan"), "lora": folders["lora"]}, max_wait_ms=0)
    server = Server(create_app(engine, max_tokens=8))
    try:
        for extra in ({}, {"logprobs": 1}):
            body = {"model": "nan", "prompt": "the cat", "max_tokens": 3, "temperature": 0, **extra}
            status, answer = _post(server, "/v1/completions", body)
            assert status == 500 and answer["error"]["code"] == "generation_failed", extra
        status, answer = _post(server, "/v1/completions", {**body, "model": "lora"})
        assert status == 200 and answer["usage"]["completion_tokens"] == 3
    finally:
        server.stop()
        engine.close()


def test_logprob_names_of_a_character_split_over_tokens_add_up_to_the_text_streamed_or_not():
    """Byte-level pieces of one character each decoded alone to U+FFFD: ' café 你好 🙂!' had names 13 characters long
    and '!' at text_offset 12 (it is at 10). vLLM names the piece completing a character by the character, "" before;
    a stream whose chunk ends inside a character carries it to the next."""
    from transformers import AutoTokenizer

    from deltatune.config import ConfigError
    from deltatune.serve.engine import logprobs_json
    from deltatune.train.models import resolve_path

    try:
        tok = AutoTokenizer.from_pretrained(resolve_path("smollm2"))  # byte-level BPE
    except ConfigError as exc:
        pytest.skip(str(exc))
    text = " café 你好 🙂!"
    rows = [(t, -1.0, [(t, -1.0)]) for t in tok(text, add_special_tokens=False)["input_ids"]]
    whole = logprobs_json(tok, rows, chat=False)
    assert "".join(whole["tokens"]) == text and whole["text_offset"][-1] == text.index("!")
    content = logprobs_json(tok, rows, chat=True)["content"]
    assert bytes(b for c in content for b in c["bytes"]).decode("utf-8") == text
    split = next(i for i, t in enumerate(whole["tokens"]) if t == "") + 1  # a chunk ending inside '你'
    state, offset, streamed = {}, 0, []
    for part in (rows[:split], rows[split:]):
        got = logprobs_json(tok, part, chat=False, offset=offset, state=state)
        offset += sum(len(t) for t in got["tokens"])
        streamed += got["tokens"]
    assert streamed == whole["tokens"]


def test_greedy_takes_the_argmax_of_a_positive_infinite_logit_as_generate_does():
    """413cdf5 refused any +inf logit when greedy; generate and vLLM take the argmax there (NaN stays refused)."""
    from types import SimpleNamespace

    from deltatune.serve.engine import _pick

    r = SimpleNamespace(prompt_ids=[1], output_ids=[], temperature=0.0, repetition_penalty=None)
    logits = torch.tensor([0.0, float("inf"), 1.0])
    assert _pick(logits, r, None) == 1
    with pytest.raises(FloatingPointError, match="NaN"):
        _pick(torch.tensor([0.0, float("nan"), 1.0]), r, None)
    from deltatune.serve.engine import _logprob_row  # its log-probability: the limit, all the mass on +inf (was nan)

    assert _logprob_row(logits, 1, 2) == (1, 0.0, [(1, 0.0), (0, -9999.0)])
