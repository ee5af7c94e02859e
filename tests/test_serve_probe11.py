"""Probe 11 of ``deltatune serve`` against vLLM's OpenAI server: incremental detokenisation (a first token's leading
space kept, as vLLM decodes the answer after the prompt; deltas that add up to the answer, no U+FFFD in one), vLLM's
``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens`` and ``stop_reason`` (they were a 400 or
missing). Through the app in process (an ASGI call, no socket), on a tiny random llama with SmolLM2's tokenizer or a
SentencePiece-style one."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

pytest.importorskip("fastapi")


def _smol():
    from tiny import smollm2_tokenizer

    return smollm2_tokenizer()


def _metaspace():
    """A Llama-2-style tokenizer: '▁' marks a space, and the decoder strips the first token's."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Say": 3, "▁world": 4, "▁hello": 5, "lo": 6, "▁": 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _vllm_text(tok, prompt: list[int], answer: list[int], skip: bool = True, spaces: bool = True) -> str:
    """vLLM's FastIncrementalDetokenizer: tokenizers' DecodeStream primed with the prompt, each answer token's text;
    with special tokens kept and spaces_between_special_tokens false, an added token after another is its content."""
    from tokenizers.decoders import DecodeStream

    stream, added = DecodeStream(skip_special_tokens=skip), tok.added_tokens_decoder
    for t in prompt:
        stream.step(tok._tokenizer, t)
    out, last = [], False
    for t in answer:
        piece = stream.step(tok._tokenizer, t) or ""
        if not (skip or spaces):
            if t in added and last:
                piece = added[t].content
            last = t in added
        out.append(piece)
    return "".join(out)


def _serve(tok, gen_eos=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.model import DeltaModel
    from deltatune.serve.app import create_app
    from deltatune.serve.engine import Engine

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    if gen_eos is not None:  # the generation config's EOS ids (Llama 3's [<|end_of_text|>, <|eot_id|>], say)
        model.generation_config.eos_token_id = gen_eos
    engine = Engine(DeltaModel(model, fused_loss=False), tok, max_wait_s=0.001)
    return engine, create_app(engine, max_tokens=64)


@pytest.fixture(scope="module")
def smol():
    engine, app = _serve(_smol())
    yield engine, app
    engine.close()


def _call(app, path: str, body: dict):
    """POST ``body`` to the ASGI ``app``: (status, JSON answer, or a stream's chunks)."""

    async def go():
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
                 "headers": [(b"content-type", b"application/json"), (b"host", b"127.0.0.1")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
        sent, status, parts = [False], [0], []

        async def receive():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
            await asyncio.sleep(60)
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await app(scope, receive, send)
        return status[0], b"".join(parts).decode()

    status, text = asyncio.run(go())
    if body.get("stream") and status == 200:
        return status, [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    return status, json.loads(text)


def _drive(engine, tok, ids: list[int], **fields):
    """Feed ``ids`` to a row as if the model chose them: (its deltas, the request)."""
    from deltatune.serve.engine import Request

    deltas: list[str] = []
    r = Request(prompt_ids=tok("Say it:")["input_ids"], adapter="base", max_tokens=len(ids) + 5,
                emit=lambda text, finish: deltas.append(text), **fields)  # fmt: skip
    for t in ids:
        if engine._advance(r, t):
            break
    return deltas, r


def test_a_first_token_keeps_its_leading_space():
    tok = _metaspace()
    engine, app = _serve(tok)
    try:
        body = {"prompt": [1, 3], "max_tokens": 1, "temperature": 0, "logit_bias": {"4": 100}}
        status, answer = _call(app, "/v1/completions", body)
        assert status == 200
        # vLLM decodes after the prompt: "Say" then " world"; "▁world" decoded alone is "world"
        assert answer["choices"][0]["text"] == " world" == tok.decode([3, 4])[len(tok.decode([3])) :]
        _, chunks = _call(app, "/v1/completions", {**body, "stream": True})
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == " world"
        _, answer = _call(app, "/v1/completions", {**body, "max_tokens": 3, "logprobs": 0})
        logprobs = answer["choices"][0]["logprobs"]  # the tokens' names add up to the text again
        assert "".join(logprobs["tokens"]) == answer["choices"][0]["text"] == " world world world"
    finally:
        engine.close()


def test_deltas_add_up_to_the_answer_and_never_hold_a_broken_character(smol):
    engine, _ = smol
    tok = engine.tokenizer
    text = " héllo wörld, 日本語 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some character is split over tokens
    deltas, r = _drive(engine, tok, ids)
    assert "".join(deltas) == r.text == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_token_ids_end_the_answer_with_their_stop_reason(smol):
    engine, app = smol
    x = engine.tokenizer.convert_tokens_to_ids("Ġworld")
    body = {"prompt": "Say it:", "max_tokens": 5, "temperature": 0, "logit_bias": {str(x): 100}}
    status, answer = _call(app, "/v1/completions", {**body, "stop_token_ids": [x]})
    assert status == 200, answer
    choice = answer["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("", "stop", x)
    assert answer["usage"]["completion_tokens"] == 1  # the stop token counts, its text is left out (vLLM's)
    _, answer = _call(app, "/v1/completions", {**body, "stop_token_ids": [x], "include_stop_str_in_output": True})
    assert answer["choices"][0]["text"] == " world"
    # min_tokens masks them too (vLLM's all_stop_token_ids): the first two tokens are something else
    _, answer = _call(app, "/v1/completions", {**body, "stop_token_ids": [x], "min_tokens": 2})
    assert answer["usage"]["completion_tokens"] == 3 and answer["choices"][0]["stop_reason"] == x
    # length: stop_reason null, in chat's stream too (every chunk has the key, as vLLM's)
    _, answer = _call(app, "/v1/completions", body)
    assert answer["choices"][0]["finish_reason"] == "length" and answer["choices"][0]["stop_reason"] is None
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stop_token_ids": [x]}
    _, chunks = _call(app, "/v1/chat/completions", {**chat, "max_tokens": 5, "logit_bias": {str(x): 100}})
    last = [c["choices"][0] for c in chunks if c["choices"]]
    assert [c["stop_reason"] for c in last] == [None] * (len(last) - 1) + [x]


def test_a_stop_string_over_tokens_is_the_stop_reason_and_kept_on_request(smol):
    engine, _ = smol
    tok = engine.tokenizer
    ids = tok(" Hello world, friend", add_special_tokens=False)["input_ids"]
    deltas, r = _drive(engine, tok, ids, stop=["o w"])
    assert (r.text, "".join(deltas), r.finish_reason, r.stop_reason) == (" Hell", " Hell", "stop", "o w")
    deltas, r = _drive(engine, tok, ids, stop=["o w"], include_stop_str_in_output=True)
    assert (r.text, "".join(deltas), r.stop_reason) == (" Hello w", " Hello w", "o w")


def test_skip_special_tokens_false_keeps_them_in_the_text(smol):
    engine, app = smol
    tok = engine.tokenizer
    start = tok.convert_tokens_to_ids("<|im_start|>")
    body = {"prompt": "Say it:", "max_tokens": 2, "temperature": 0, "logit_bias": {str(start): 100}}
    _, answer = _call(app, "/v1/completions", body)
    assert answer["choices"][0]["text"] == ""
    status, answer = _call(app, "/v1/completions", {**body, "skip_special_tokens": False})
    assert status == 200, answer
    assert answer["choices"][0]["text"] == "<|im_start|><|im_start|>" == tok.decode([start, start])
    # kept special tokens in a row: SmolLM2's byte-level decoder puts no space between them either way (vLLM's
    # DecodeStream gives the same text), so spaces_between_special_tokens false leaves it as it is
    status, answer = _call(app, "/v1/completions", {**body, "skip_special_tokens": False,
                                                     "spaces_between_special_tokens": False})  # fmt: skip
    assert status == 200 and answer["choices"][0]["text"] == _vllm_text(tok, [], [start, start], False, False)
    assert answer["choices"][0]["text"] == "<|im_start|><|im_start|>"


@pytest.mark.parametrize("bad", [5, [1.5], [-1], [10**9], [True]])
def test_a_bad_stop_token_ids_is_a_400_naming_it(smol, bad):
    status, answer = _call(smol[1], "/v1/completions", {"prompt": "hi", "max_tokens": 1, "stop_token_ids": bad})
    assert status == 400
    assert answer["error"]["param"] == "stop_token_ids" and "stop_token_ids" in answer["error"]["message"]


def test_prompt_logprobs_are_the_models_log_softmax_with_vllms_ranks(smol):
    engine, app = smol
    tok = engine.tokenizer
    ids = tok("the quick brown fox")["input_ids"]
    status, answer = _call(app, "/v1/completions", {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2})
    assert status == 200, answer
    rows = answer["choices"][0]["prompt_logprobs"]
    model = engine.model.get_base_model()
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert len(rows) == len(ids) and rows[0] is None
    worst = 0.0
    for i, row in enumerate(rows[1:]):
        lp = want[i]
        top = lp.topk(2).indices.tolist()
        assert list(row) == [str(t) for t in dict.fromkeys([ids[i + 1], *top])]  # the prompt's token first
        mine = row[str(ids[i + 1])]
        assert mine["rank"] == int((lp >= lp[ids[i + 1]]).sum())  # vLLM's batched_count_greater_than
        assert mine["decoded_token"] == tok.decode([ids[i + 1]])
        assert [row[str(t)]["rank"] for t in top] == [1, 2]
        worst = max(worst, *(abs(v["logprob"] - float(lp[int(t)])) for t, v in row.items()))
    assert worst < 1e-5
    _, answer = _call(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                                     "prompt_logprobs": 0})  # fmt: skip
    assert answer["prompt_logprobs"][0] is None and all(len(r) == 1 for r in answer["prompt_logprobs"][1:])
    status, answer = _call(app, "/v1/completions", {"prompt": ids, "prompt_logprobs": 1, "stream": True})
    assert status == 400 and answer["error"]["param"] == "prompt_logprobs"


def test_more_than_four_stop_strings_are_served_as_vllm_serves_them(smol):
    engine, _ = smol
    tok = engine.tokenizer
    ids = tok(" Hello world, friend", add_special_tokens=False)["input_ids"]
    stop = ["zz", "yy", "xx", "ww", "ld,"]
    _, r = _drive(engine, tok, ids, stop=stop)
    assert (r.text, r.stop_reason) == (" Hello wor", "ld,")
    status, answer = _call(smol[1], "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": stop})
    assert status == 200, answer
    status, answer = _call(smol[1], "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": ["a", ""]})
    assert status == 400 and answer["error"]["param"] == "stop"


def test_a_temperature_of_2_samples_and_above_2_or_negative_is_a_400_as_vllm(smol):
    engine, app = smol
    body = {"prompt": "hi", "max_tokens": 4, "temperature": 2.0, "seed": 11, "top_k": -1}
    status, first = _call(app, "/v1/completions", body)
    assert status == 200, first
    assert _call(app, "/v1/completions", body)[1]["choices"][0]["text"] == first["choices"][0]["text"]  # seeded
    for t in (3.5, -0.5):  # vLLM's SamplingParams._verify_args: temperature in [0, 2]
        status, answer = _call(app, "/v1/completions", {**body, "temperature": t})
        assert status == 400 and answer["error"]["param"] == "temperature"


def test_allowed_token_ids_mask_every_other_token_as_vllm(smol):
    engine, app = smol
    tok = engine.tokenizer
    ids = tok("the quick brown fox")["input_ids"]
    allowed = [100, 2000, 30000]
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "allowed_token_ids": allowed, "logprobs": 0}
    status, answer = _call(app, "/v1/completions", body)
    assert status == 200, answer
    with torch.no_grad():
        logits = engine.model.get_base_model()(torch.tensor([ids])).logits[0, -1].float()
    want = allowed[int(logits[allowed].argmax())]
    assert answer["choices"][0]["text"] == tok.decode([want])
    # the reported log-probability stays the model's own (vLLM's raw_logprobs)
    lp = float(torch.log_softmax(logits, -1)[want])
    assert answer["choices"][0]["logprobs"]["token_logprobs"][0] == pytest.approx(lp, abs=1e-5)
    status, answer = _call(app, "/v1/completions", {**body, "allowed_token_ids": []})
    assert status == 400 and answer["error"]["param"] == "allowed_token_ids"


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens_as_vllm(smol):
    engine, app = smol
    ids = engine.tokenizer("one two three four five six seven")["input_ids"]
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0}
    _, whole = _call(app, "/v1/completions", {**body, "prompt": ids[-3:]})
    status, answer = _call(app, "/v1/completions", {**body, "truncate_prompt_tokens": 3})
    assert status == 200, answer
    assert answer["usage"]["prompt_tokens"] == 3 and answer["choices"][0]["text"] == whole["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "truncate_prompt_tokens": 2}
    assert _call(app, "/v1/chat/completions", chat)[1]["usage"]["prompt_tokens"] == 2
    for bad in (0, -2, 1.5):
        status, answer = _call(app, "/v1/completions", {**body, "truncate_prompt_tokens": bad})
        assert status == 400 and answer["error"]["param"] == "truncate_prompt_tokens", bad


def test_return_tokens_as_token_ids_names_logprobs_by_id_as_vllm(smol):
    engine, app = smol
    tok = engine.tokenizer
    body = {"prompt": "日本語 é", "max_tokens": 4, "temperature": 0, "logprobs": 2, "return_tokens_as_token_ids": True}
    status, answer = _call(app, "/v1/completions", body)
    assert status == 200, answer
    logprobs = answer["choices"][0]["logprobs"]
    ids = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    assert all(t.startswith("token_id:") for t in logprobs["tokens"])
    assert tok.decode(ids) == answer["choices"][0]["text"]
    assert all(all(k.startswith("token_id:") for k in top) for top in logprobs["top_logprobs"])
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True, "top_logprobs": 1}
    _, answer = _call(app, "/v1/chat/completions", {**chat, "return_tokens_as_token_ids": True})
    content = answer["choices"][0]["logprobs"]["content"]
    assert all(c["token"].startswith("token_id:") and c["bytes"] == list(c["token"].encode()) for c in content)
    _, chunks = _call(app, "/v1/completions", {**body, "stream": True})
    streamed = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]  # fmt: skip
    assert streamed == [f"token_id:{t}" for t in ids]


def test_bad_words_mask_a_words_last_token_after_its_first_ones_as_vllm(smol):
    from types import SimpleNamespace

    from deltatune.serve.fields import bad_words_ids
    from deltatune.serve.sampling import adjusted

    engine, app = smol
    tok = engine.tokenizer
    logits = torch.zeros(len(tok))
    r = SimpleNamespace(output_ids=[5, 7], prompt_ids=[1], bad_words_ids=[[7, 9], [8, 10], [11]])
    out = adjusted(logits, r)
    assert torch.isinf(out[[9, 11]]).all() and out[10] == 0 and int(torch.isinf(out).sum()) == 2
    x = tok.convert_tokens_to_ids("Ġworld")
    assert bad_words_ids(tok, {"bad_words": ["world"]}) == [tok.encode("world"), [x]]  # as written, and " world"
    body = {"prompt": "Say it:", "max_tokens": 2, "temperature": 0, "logit_bias": {str(x): 100}, "logprobs": 0,
            "return_tokens_as_token_ids": True}  # fmt: skip
    _, answer = _call(app, "/v1/completions", body)
    assert answer["choices"][0]["logprobs"]["tokens"] == [f"token_id:{x}"] * 2
    _, answer = _call(app, "/v1/completions", {**body, "bad_words": ["world"]})
    assert f"token_id:{x}" not in answer["choices"][0]["logprobs"]["tokens"]
    status, answer = _call(app, "/v1/completions", {**body, "bad_words": "x"})
    assert status == 400 and answer["error"]["param"] == "bad_words"


def test_allowed_token_ids_that_min_tokens_masks_all_are_a_400_not_a_500(smol):
    """allowed_token_ids all stop tokens under min_tokens left no token to generate: sampling ended in a 500 and
    greedy answered token 0, one the request had masked."""
    engine, app = smol
    eos = sorted(engine.eos_ids)
    body = {"prompt": "the cat", "max_tokens": 2, "min_tokens": 1, "allowed_token_ids": eos}
    for temperature in (0, 1.0):
        status, answer = _call(app, "/v1/completions", {**body, "temperature": temperature})
        assert status == 400 and answer["error"]["param"] == "allowed_token_ids", answer
        assert "min_tokens 1 masks" in answer["error"]["message"]
    # vLLM's min_tokens masks EOS under ignore_eos too (update_from_generation_config adds it to all_stop_token_ids)
    status, answer = _call(app, "/v1/completions", {**body, "temperature": 0, "ignore_eos": True})
    assert status == 400 and answer["error"]["param"] == "allowed_token_ids", answer
    status, answer = _call(app, "/v1/completions", {**body, "temperature": 0, "ignore_eos": True, "min_tokens": 0})
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length"  # EOS is then no stop token
    word = engine.tokenizer.decode([100])
    masked = {"prompt": "the cat", "max_tokens": 1, "temperature": 0, "allowed_token_ids": [100], "bad_words": [word]}
    if engine.tokenizer(word, add_special_tokens=False)["input_ids"] == [100]:  # the word is that one token
        status, answer = _call(app, "/v1/completions", masked)
        assert status != 200 or answer["choices"][0]["text"] != engine.tokenizer.decode([0]), answer


def test_truncate_prompt_tokens_cuts_a_prompt_longer_than_the_context_first_as_vllm(smol):
    """vLLM truncates before its length check (a 201-token prompt cut to 10 is served) and refuses a k above the
    context (_validate_truncation_size): the check came first (a 400) and k = 500 was taken."""
    engine, app = smol
    ids = engine.tokenizer(" word" * 200)["input_ids"]
    assert len(ids) > 128  # the context
    body = {"prompt": ids, "max_tokens": 2, "temperature": 0}
    status, answer = _call(app, "/v1/completions", {**body, "truncate_prompt_tokens": 10})
    assert status == 200 and answer["usage"]["prompt_tokens"] == 10, answer
    _, short = _call(app, "/v1/completions", {**body, "prompt": ids[-10:]})
    assert answer["choices"][0]["text"] == short["choices"][0]["text"]
    # -1 keeps the context's worth (128 tokens), which leaves no room: a 400 about those 128, as vLLM
    status, answer = _call(app, "/v1/completions", {**body, "truncate_prompt_tokens": -1})
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert "has 128 tokens" in answer["error"]["message"]
    for k in (129, 500):
        status, answer = _call(app, "/v1/completions", {**body, "prompt": ids[:20], "truncate_prompt_tokens": k})
        assert status == 400 and answer["error"]["param"] == "truncate_prompt_tokens", answer
    status, answer = _call(app, "/v1/completions", {**body, "prompt": ids[:20], "truncate_prompt_tokens": 128})
    assert status == 200 and answer["usage"]["prompt_tokens"] == 20


def test_an_answer_starting_with_a_skipped_special_token_keeps_the_next_words_space():
    """The first token that is not a skipped special one decides whether the answer is decoded after the prompt
    ([<unk>, ▁world, ▁hello] was "world hello"; vLLM's primed DecodeStream gives " world hello")."""
    from deltatune.serve.engine import Request

    tok = _metaspace()
    engine, _ = _serve(tok)
    try:
        for answer in ([0, 4, 5], [2, 4], [1, 0, 5], [4, 5]):
            deltas: list[str] = []
            r = Request(prompt_ids=[1, 3], adapter="base", max_tokens=len(answer), ignore_eos=True,
                        emit=lambda text, finish, d=deltas: d.append(text))  # fmt: skip
            for t in answer:
                engine._advance(r, t)
            want = _vllm_text(tok, [1, 3], answer)
            assert "".join(deltas) == r.text == want, (answer, deltas, want)  # stream and the whole answer
        assert want == " world hello"
    finally:
        engine.close()


def test_spaces_between_special_tokens_false_joins_kept_added_tokens_as_vllm():
    """A WordPiece decoder puts a space before each token; vLLM's spaces_between_special_tokens false (with
    skip_special_tokens false) gives an added token right after another as its bare content: "[CLS][SEP]"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deltatune.serve.engine import Request

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    engine, _ = _serve(tok)
    try:
        answer = [3, 1, 2, 4]
        for spaces, want in ((True, "hello [CLS] [SEP] world"), (False, "hello [CLS][SEP] world")):
            deltas: list[str] = []
            r = Request(prompt_ids=[3], adapter="base", max_tokens=9, skip_special_tokens=False,
                        spaces_between_special_tokens=spaces, emit=lambda text, finish, d=deltas: d.append(text))  # fmt: skip
            for t in answer:
                engine._advance(r, t)
            # vLLM's primed decoder also puts a space before the first word (a WordPiece answer is decoded alone
            # here: docs/serve.md)
            assert "".join(deltas) == r.text == want == _vllm_text(tok, [3], answer, False, spaces)[1:]
    finally:
        engine.close()


def test_bad_words_that_mask_every_allowed_token_are_a_400_and_a_later_mask_says_so(smol):
    engine, app = smol
    x = engine.tokenizer.convert_tokens_to_ids("Ġworld")
    body = {"prompt": "Say it:", "max_tokens": 2, "allowed_token_ids": [x], "bad_words": ["world"]}
    for temperature in (0, 1.0):  # "world" after a space is Ġworld alone: masked at every step
        status, answer = _call(app, "/v1/completions", {**body, "temperature": temperature})
        assert status == 400 and answer["error"]["param"] == "allowed_token_ids", answer
        assert "bad_words" in answer["error"]["message"]
    # "world world" masks Ġworld only after a Ġworld: the second token has none left, token 0 as vLLM's sampler
    for temperature in (0, 1.0):
        status, answer = _call(app, "/v1/completions", {**body, "bad_words": ["world world"], "temperature": temperature})  # fmt: skip
        assert status == 200 and answer["usage"]["completion_tokens"] >= 1, answer  # tests/test_serve_probe12


def test_min_tokens_masks_eos_under_ignore_eos_and_config_eos_ids_are_stop_token_ids_as_vllm():
    """vLLM's all_stop_token_ids hold the tokenizer's EOS and the generation config's under ignore_eos too (min_tokens
    masks them); the config's other EOS ids are stop_token_ids (stop_reason: the id), not under ignore_eos."""
    tok = _smol()
    other = tok.convert_tokens_to_ids("<|im_start|>")
    engine, app = _serve(tok, gen_eos=[tok.eos_token_id, other])
    try:
        for eos in (tok.eos_token_id, other):
            body = {"prompt": "hi", "max_tokens": 3, "min_tokens": 2, "ignore_eos": True, "temperature": 0,
                    "logit_bias": {str(eos): 100}, "logprobs": 0, "return_tokens_as_token_ids": True}  # fmt: skip
            status, answer = _call(app, "/v1/completions", body)
            tokens = answer["choices"][0]["logprobs"]["tokens"]
            assert status == 200 and f"token_id:{eos}" not in tokens[:2] and tokens[2] == f"token_id:{eos}", tokens
            assert answer["choices"][0]["finish_reason"] == "length"
            status, answer = _call(app, "/v1/completions", {**body, "ignore_eos": False, "min_tokens": 0})
            choice = answer["choices"][0]
            stop = None if eos == tok.eos_token_id else other  # vLLM: the primary EOS's stop_reason is null
            assert (choice["finish_reason"], choice["stop_reason"], choice["text"]) == ("stop", stop, ""), choice
    finally:
        engine.close()


@pytest.mark.parametrize("temperature", [1e39, float("inf")])
def test_a_temperature_past_2_up_to_inf_is_a_400_naming_it(smol, temperature):
    engine, app = smol
    body = {"prompt": "hi", "max_tokens": 1, "allowed_token_ids": [100, 200], "temperature": temperature}
    status, answer = _call(app, "/v1/completions", body)  # json.dumps writes inf as Infinity
    assert status == 400 and answer["error"]["param"] == "temperature", answer
    status, answer = _call(app, "/v1/completions", {**body, "temperature": 2.0})
    assert status == 200 and answer["choices"][0]["text"] in (
        engine.tokenizer.decode([100]),
        engine.tokenizer.decode([200]),
    )


def test_a_prompt_tokens_rank_counts_the_tokens_at_least_as_likely_as_vllm():
    """vLLM's rank is batched_count_greater_than, a >= count: a token tied with a more likely one ranks below it."""
    from deltatune.serve.logprob_names import prompt_row

    logits = torch.tensor([1.0, 2.0, 2.0, 0.0, 3.0])
    lp = torch.log_softmax(logits, -1)
    for token, rank in ((1, 3), (2, 3), (4, 1), (3, 5)):
        row = prompt_row(logits, token, 0)
        assert row[token][1] == rank == int((lp >= lp[token]).sum())
        assert abs(row[token][0] - float(lp[token])) < 1e-7
