"""``deltatune serve`` through the official ``openai`` client: answers equal the library's generate path, concurrent
mixed-adapter batches equal requests served alone, bad requests get OpenAI-style 4xx errors, and a client that
goes away mid-stream frees its row."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from serving import Server

openai = pytest.importorskip("openai")

PROMPTS = ["the cat sat", "a big red dog ran under the tree", "old house", "the quiet blue mat"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the small dog sat on a mat"}]


def client(server: Server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def generate_reference(base: str, folder: str | None, prompt_ids: list[int], max_new_tokens: int, tok) -> str:
    """The library path: the adapter loaded alone (``load_adapter_model``), transformers' greedy ``generate``."""
    from transformers import AutoModelForCausalLM

    from deltatune.train.run import load_adapter_model

    model = AutoModelForCausalLM.from_pretrained(base) if folder is None else load_adapter_model(folder, base)[0]
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_models_lists_base_and_every_adapter(served):
    _, server, _, _ = served
    models = {m.id: m.model_extra["method"] for m in client(server).models.list().data}
    assert models == {"base": "base", "lora": "lora", "ia3": "ia3", "prompt": "prompt_tuning"}


@pytest.mark.parametrize("name", ["base", "lora", "ia3", "prompt"])
def test_greedy_chat_and_completion_equal_library_generate(served, name):
    engine, server, base, folders = served
    tok = engine.tokenizer
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = tok(text, add_special_tokens=False)["input_ids"]
    want_chat = generate_reference(base, folders.get(name), chat_ids, 8, tok)
    want_text = generate_reference(base, folders.get(name), tok(PROMPTS[1])["input_ids"], 8, tok)
    api = client(server)
    got = api.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want_chat
    assert got.usage.prompt_tokens == len(chat_ids)
    assert got.usage.completion_tokens == 8 or got.choices[0].finish_reason == "stop"
    chunks = list(api.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    done = api.completions.create(model=name, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert done.choices[0].text == want_text
    streamed = api.completions.create(model=name, prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want_text


def test_adapters_change_the_answers(served):
    """The equalities above can fail: each adapter answers differently from the base and from the others."""
    _, server, _, _ = served
    api = client(server)
    answers = {
        name: api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=6, temperature=0).choices[0].text
        for name in ("base", "lora", "ia3", "prompt")
    }
    assert len(set(answers.values())) == 4, answers


def test_stop_seed_and_sampling(served):
    _, server, _, _ = served
    api = client(server)
    full = api.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    word = full.split()[2]
    cut = api.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[word])
    assert cut.choices[0].text == full[: full.index(word)] and cut.choices[0].finish_reason == "stop"
    kw = dict(model="ia3", prompt=PROMPTS[2], max_tokens=8, temperature=1.5, top_p=0.9)
    a, b = (api.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    c = api.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c  # a seed fixes the draw; another seed draws otherwise


def test_32_concurrent_clients_mixing_adapters_equal_requests_served_alone(served):
    engine, server, _, _ = served
    rng = random.Random(0)
    names = ["base", "lora", "ia3", "prompt"]
    cases = [(n, p, rng.randint(1, 5)) for n in names for p in PROMPTS]
    api = client(server)
    alone = {c: api.completions.create(model=c[0], prompt=c[1], max_tokens=c[2], temperature=0) for c in cases}
    alone = {c: r.choices[0].text for c, r in alone.items()}
    work = [rng.choice(cases) for _ in range(200)]
    results: dict[int, str] = {}
    batches, joined = engine.batches, engine.joined

    def worker(k: int) -> None:
        own = client(server)
        for i in range(k, len(work), 32):
            n, p, m = work[i]
            results[i] = own.completions.create(model=n, prompt=p, max_tokens=m, temperature=0).choices[0].text

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 200
    assert all(results[i] == alone[work[i]] for i in range(200))
    assert engine.batches - batches < 150  # requests were batched together, not answered one by one
    assert engine.joined > joined  # and some joined a running batch (continuous batching)


def _post(server: Server, path: str, data: bytes, headers: dict | None = None, method: str = "POST"):
    req = urllib.request.Request(
        server.url + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _assert_still_serving(server: Server) -> None:
    out = client(server).completions.create(model="lora", prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_bad_requests_get_openai_errors(served, tmp_path):
    engine, server, _, folders = served
    bodies = {
        "unknown adapter": (404, "model_not_found", {"model": "nope", "prompt": "hi"}),
        "max_tokens over the limit": (400, None, {"model": "lora", "prompt": "hi", "max_tokens": 65}),
        "max_tokens negative": (400, None, {"model": "lora", "prompt": "hi", "max_tokens": -1}),
        "prompt over the context": (400, "context_length_exceeded", {"model": "lora", "prompt": "cat " * 2100}),
        "bad temperature": (400, None, {"model": "lora", "prompt": "hi", "temperature": "hot"}),
        # torch's generator takes seeds in [-2**63, 2**64): a larger one was a 500
        "seed out of range": (400, None, {"model": "lora", "prompt": "hi", "seed": 2**70, "temperature": 1}),
        # a string is not a flag ("no" would have streamed)
        "stream not a flag": (400, None, {"model": "lora", "prompt": "hi", "stream": "no"}),
        "stream_options not an object": (
            400,
            None,
            {"model": "lora", "prompt": "hi", "stream": True, "stream_options": 1},
        ),
        "include_usage not a flag": (
            400,
            None,
            {"model": "lora", "prompt": "hi", "stream": True, "stream_options": {"include_usage": "y"}},
        ),
        # fields the server does not compute are refused, not ignored
        "best_of": (400, "unsupported", {"model": "lora", "prompt": "hi", "best_of": 2}),
        "frequency_penalty past 2": (400, None, {"model": "lora", "prompt": "hi", "frequency_penalty": 3}),
        # as OpenAI answers (it was accepted and ignored)
        "stream_options without stream": (
            400,
            None,
            {"model": "lora", "prompt": "hi", "stream_options": {"include_usage": True}},
        ),
    }
    for what, (status, code, body) in bodies.items():
        got, answer = _post(server, "/v1/completions", json.dumps(body).encode())
        assert got == status, what
        assert set(answer["error"]) == {"message", "type", "param", "code"}, what
        assert code is None or answer["error"]["code"] == code, what
        assert answer["error"]["param"] != "include_usage", what  # named as the field it sits in
        _assert_still_serving(server)
    context = engine.model.config.max_position_embeddings
    ids = [1000] * (context - 2)  # fits with one new token, but not with prompt tuning's 3 virtual tokens
    got, answer = _post(
        server, "/v1/completions", json.dumps({"model": "prompt", "prompt": ids, "max_tokens": 1}).encode()
    )
    assert got == 400 and answer["error"]["code"] == "context_length_exceeded"
    got, answer = _post(
        server, "/v1/completions", json.dumps({"model": "base", "prompt": ids, "max_tokens": 1}).encode()
    )
    assert got == 200 and answer["usage"] == {
        "prompt_tokens": context - 2,
        "completion_tokens": 1,
        "total_tokens": context - 1,
    }
    for path, method in (("/v1/nothing", "POST"), ("/v1/models", "POST")):  # an unknown route, a wrong method
        got, answer = _post(server, path, b"{}", method=method)
        assert got in (404, 405) and set(answer["error"]) == {"message", "type", "param", "code"}
    got, answer = _post(server, "/v1/chat/completions", b'{"model": "lora", "messages": [')
    assert got == 400 and answer["error"]["code"] == "invalid_json"
    got, answer = _post(server, "/v1/chat/completions", json.dumps({"model": "lora", "messages": "hi"}).encode())
    assert got == 400 and answer["error"]["param"] == "messages"
    wizard = {"model": "lora", "messages": [{"role": "wizard", "content": "hi"}]}
    got, answer = _post(server, "/v1/chat/completions", json.dumps(wizard).encode())
    assert got == 400 and answer["error"]["message"].startswith("messages[0].role must be one of system, ")
    for asks_nothing in (
        {"frequency_penalty": 0.0, "logprobs": False, "tools": []},
        {"response_format": {"type": "text"}},
        {"suffix": "", "n": None},  # were 400s
    ):
        body = {"model": "lora", "messages": CHAT, "max_tokens": 1, **asks_nothing}
        assert _post(server, "/v1/chat/completions", json.dumps(body).encode())[0] == 200, asks_nothing
    one = {"model": "base", "prompt": [5], "max_tokens": 1}  # one token id (it was read as a list of one string)
    got, answer = _post(server, "/v1/completions", json.dumps(one).encode())
    assert got == 200 and answer["usage"]["prompt_tokens"] == 1
    # Runtime loading reads only inside --adapter-dir (the fixture's adapters folder).
    outside = str(tmp_path)
    for path in (outside, "../base", "lora/../../base"):
        got, answer = _post(server, "/v1/adapters", json.dumps({"name": "x", "path": path}).encode())
        assert got == 403 and answer["error"]["code"] == "path_outside_adapter_dir", path
    assert "x" not in engine.adapters()
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="nope", prompt="hi", max_tokens=2)
    _assert_still_serving(server)


def test_load_and_unload_adapters_at_run_time(served):
    engine, server, base, folders = served
    got, answer = _post(server, "/v1/adapters", json.dumps({"name": "lora2", "path": "lora"}).encode())
    assert got == 200 and answer["method"] == "lora"
    api = client(server)
    kw = dict(prompt=PROMPTS[3], max_tokens=5, temperature=0)
    assert (
        api.completions.create(model="lora2", **kw).choices[0].text
        == api.completions.create(model="lora", **kw).choices[0].text
    )
    got, answer = _post(server, "/v1/adapters", json.dumps({"name": "lora2", "path": "lora"}).encode())
    assert got == 409
    got, _ = _post(server, "/v1/adapters/lora2", b"", method="DELETE")
    assert got == 200 and "lora2" not in engine.adapters()
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="lora2", **kw)


def _raw_post(server: Server, path: str, headers: dict, body: bytes = b"{}") -> tuple[int, bytes]:
    """A request with exactly these headers (urllib would set Host itself)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", path, skip_host=True)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_web_page_cannot_use_the_server(served):
    """A page on any site can make the user's browser POST to 127.0.0.1 (a text/plain body needs no CORS preflight):
    such a request carries the page's Origin and is refused before it runs. DNS rebinding (the page's own name
    resolving to 127.0.0.1) is refused by the Host name. Clients that are not browsers send neither and are served."""
    engine, server, _, _ = served
    host = f"127.0.0.1:{server.port}"
    body = json.dumps({"model": "lora", "prompt": "hi", "max_tokens": 1}).encode()
    batches = engine.batches
    for headers in (
        {"Host": host, "Origin": "https://evil.example", "Content-Type": "text/plain"},
        {"Host": host, "Origin": "null", "Content-Type": "text/plain"},  # a sandboxed frame or a file:// page
        {"Host": host, "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
        {"Host": f"evil.example:{server.port}", "Content-Type": "application/json"},
    ):
        got, answer = _raw_post(server, "/v1/completions", headers, body)
        assert got == 403 and json.loads(answer)["error"]["code"] == "cross_site_request", headers
    adapters = {"name": "x", "path": "lora"}
    got, _ = _raw_post(
        server, "/v1/adapters", {"Host": host, "Origin": "https://evil.example"}, json.dumps(adapters).encode()
    )
    assert got == 403 and "x" not in engine.adapters()
    assert engine.batches == batches  # nothing ran
    for headers in ({"Host": host}, {"Host": f"localhost:{server.port}", "Origin": f"http://localhost:{server.port}"}):
        got, answer = _raw_post(server, "/v1/completions", {**headers, "Content-Type": "application/json"}, body)
        assert got == 200 and json.loads(answer)["usage"]["completion_tokens"] == 1, headers


def test_api_key(served):
    from deltatune.serve import check_bind
    from deltatune.serve.app import create_app

    engine, _, _, _ = served
    guarded = Server(create_app(engine, api_key="sekret", max_tokens=8))
    try:
        for key in (None, "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            got, answer = _post(guarded, "/v1/completions", b'{"model": "base", "prompt": "hi"}', headers)
            assert got == 401 and answer["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(guarded, "wrong").models.list()
        assert client(guarded, "sekret").completions.create(model="base", prompt="hi", max_tokens=2).usage
        # With a key, any Host name is served (the server may sit behind a proxy or listen beyond this machine)
        body = b'{"model": "base", "prompt": "hi", "max_tokens": 1}'
        got, _ = _raw_post(guarded, "/v1/completions", {"Host": "api.example", "Authorization": "Bearer sekret"}, body)
        assert got == 200
    finally:
        guarded.stop()
    from deltatune.config import ConfigError

    with pytest.raises(ConfigError, match="--api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "sekret")
    check_bind("127.0.0.1", None)


def test_client_disconnecting_mid_stream_frees_its_row(served, monkeypatch):
    from deltatune.serve.app import create_app

    engine, _, _, _ = served
    # The tiny model's context (64) ends the row within milliseconds; slowed to 0.3 s a step, the row would run
    # ~18 s, so it can only leave within the deadline by being dropped, not by finishing (seen in CI: a race).
    forward = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda *a: (time.sleep(0.3), forward(*a))[1])
    long = Server(create_app(engine, max_tokens=2000))
    try:
        cancelled = engine.cancelled
        stream = client(long).completions.create(
            model="lora", prompt="hi", max_tokens=2000, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 10
        while engine.cancelled == cancelled or engine.running:
            assert time.monotonic() < deadline, "the abandoned row was not dropped"
            time.sleep(0.01)
        _assert_still_serving(long)
    finally:
        long.stop()


def _serve_now(engine, requests: list[tuple[str, str, int]], gap=None) -> list[list[int]]:
    """Submit (adapter, prompt, max_tokens) requests (ignoring EOS) and wait; ``gap(i)`` runs before the i-th."""
    from deltatune.serve import Request

    done = [threading.Event() for _ in requests]
    made = []
    for i, (adapter, prompt, n) in enumerate(requests):
        if gap is not None:
            gap(i)
        r = Request(
            engine.tokenizer(prompt)["input_ids"], adapter, n, lambda t, f, e=done[i]: f and e.set(), ignore_eos=True
        )
        made.append(r)
        engine.submit(r)
    assert all(e.wait(60) for e in done)
    return [r.output_ids for r in made]


def test_requests_joining_a_running_batch_equal_requests_served_alone(served):
    """Rows join a running mixed batch with shorter and longer prompts than its cache (both sides get padded)."""
    engine, _, _, _ = served
    work = [("lora", PROMPTS[0], 40), ("ia3", PROMPTS[1] + " " + PROMPTS[3] * 3, 6), ("base", "a", 5),
            ("lora", PROMPTS[2], 8), ("ia3", PROMPTS[0], 3)]  # fmt: skip
    alone = [_serve_now(engine, [w])[0] for w in work]
    joined = engine.joined

    def wait_for_the_first_to_run(i: int) -> None:
        if i == 1:
            deadline = time.monotonic() + 10
            while engine.running == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.02)

    together = _serve_now(engine, work, gap=wait_for_the_first_to_run)
    assert engine.joined - joined >= 3
    assert together == alone
    assert [len(t) for t in together] == [40, 6, 5, 8, 3]


@pytest.mark.parametrize("name", ["ia3", "prompt"])
def test_answers_equal_deltatune_generate(served, name, capsys):
    """The CLI's own path: ``deltatune generate`` (chat template) and ``--raw`` (plain text) print the served answers
    (the CLI strips surrounding spaces from what it prints)."""
    from deltatune.cli import main

    _, server, base, folders = served
    api = client(server)
    for raw in (False, True):
        argv = [
            "generate",
            "--adapter",
            folders[name],
            "--model",
            base,
            "--prompt",
            PROMPTS[3],
            "--max-new-tokens",
            "8",
        ]
        assert main(argv + (["--raw"] if raw else [])) == 0
        printed = capsys.readouterr().out
        if raw:
            got = api.completions.create(model=name, prompt=PROMPTS[3], max_tokens=8, temperature=0).choices[0].text
        else:
            messages = [{"role": "user", "content": PROMPTS[3]}]
            out = api.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
            got = out.choices[0].message.content
        assert printed == got.strip() + "\n"


def test_a_request_waiting_for_an_adapter_that_is_unloaded_gets_a_404(served, monkeypatch):
    engine, server, _, folders = served
    submitted, submit = threading.Event(), engine.submit
    monkeypatch.setattr(engine, "submit", lambda r: (submit(r), submitted.set()))
    got, _ = _post(server, "/v1/adapters", json.dumps({"name": "gone", "path": "ia3"}).encode())
    assert got == 200
    answers = []
    with engine.lock:  # the engine cannot start a batch meanwhile: the request waits in the queue
        thread = threading.Thread(
            target=lambda: answers.append(_post(server, "/v1/completions", b'{"model": "gone", "prompt": "hi"}'))
        )
        thread.start()
        assert submitted.wait(10)
        time.sleep(0.05)  # the engine thread takes it from the queue and waits for the lock
        engine.unload_adapter("gone")
    thread.join(timeout=30)
    status, answer = answers[0]
    assert status == 404 and answer["error"]["code"] == "model_not_found" and "not served any more" in str(answer)
    _assert_still_serving(server)


def test_adapters_that_train_the_shared_base_are_refused(served):
    """LoRA with biases (or BitFit, freeze, full) would overwrite the base every served model shares on loading."""
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    engine, server, base, folders = served
    root = os.path.dirname(folders["lora"])
    torch.manual_seed(5)
    biased = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(r=2, bias="all"))
    with torch.no_grad():
        for n, p in biased.named_parameters():
            if n.endswith("bias"):
                p.add_(1.0)
    biased.save_pretrained(os.path.join(root, "biased"))
    before = client(server).completions.create(model="base", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    got, answer = _post(server, "/v1/adapters", json.dumps({"name": "biased", "path": "biased"}).encode())
    assert got == 400 and "changes the base model's own parameters" in answer["error"]["message"]
    assert "biased" not in engine.adapters()
    after = client(server).completions.create(model="base", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert after.choices[0].text == before.choices[0].text


def test_an_engine_with_no_room_in_a_batch_is_refused(served):
    """max_batch_size 0 built an engine whose batches held no row: every request waited for ever."""
    from deltatune.serve import Engine

    engine = served[0]
    for size, wait in ((0, 0.01), (4, -1.0), (4, float("nan"))):
        with pytest.raises(ValueError, match=r"^max_batch_size must be >= 1 and max_wait_s >= 0"):
            Engine(engine.model, engine.tokenizer, max_batch_size=size, max_wait_s=wait)


def test_a_temperature_below_0_01_samples_at_0_01_and_fails_no_batch_mate(served):
    """temperature 1e-300 divided the logits to inf and NaN: a 500 for the request and every row batched with it. It
    samples at 0.01, as vLLM's SamplingParams raises it (a seeded answer: the same, whatever else is batched)."""
    _, server, _, _ = served
    api = client(server)
    kw = dict(model="lora", prompt=PROMPTS[1], max_tokens=6, seed=3)
    floor = api.completions.create(**kw, temperature=0.01).choices[0].text
    with concurrent_requests() as pool:
        tiny = pool.submit(api.completions.create, **kw, temperature=1e-300)
        mate = pool.submit(api.completions.create, model="ia3", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert tiny.result().choices[0].text == floor
        assert mate.result().choices[0].finish_reason == "length"


def concurrent_requests():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(4)


def test_two_unloads_of_one_adapter_give_200_and_404(served):
    """The name was checked before the lock: a second DELETE waiting behind the first then failed inside
    delete_adapter, a plain-text 500 with a traceback. Both requests are made to wait at the lock here."""
    from deltatune.serve.engine import RequestError

    engine, _, _, folders = served
    engine.load_adapter("twice", folders["lora"])
    outcomes: list[str] = []

    def unload() -> None:
        try:
            engine.unload_adapter("twice")
            outcomes.append("200")
        except RequestError as exc:
            outcomes.append(f"{exc.status} {exc.code}")

    with engine.lock:  # both pass any check made before the lock, then queue for it
        threads = [threading.Thread(target=unload) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["200", "404 model_not_found"]
    assert "twice" not in engine.adapters()


def test_chat_requests_are_rendered_with_the_template_the_run_trained_with(served):
    """A run trained with ``data.template: alpaca`` is prompted in that format, as ``deltatune chat`` prompts it;
    the tokenizer's own chat template (a format it never saw) was used before. A plain adapter folder keeps it."""
    import shutil

    import yaml

    from deltatune.train.chat import prompt_ids

    engine, server, base, folders = served
    run = os.path.join(os.path.dirname(folders["lora"]), "alpaca-run")
    shutil.copytree(folders["lora"], run)
    with open(os.path.join(run, "run.yaml"), "w") as fh:
        yaml.safe_dump({"stage": "sft", "model": {"name_or_path": base}, "data": {"template": "alpaca"}}, fh)
    with open(os.path.join(run, "deltatune_marks.json"), "w") as fh:  # a run begun since the alpaca_system mark
        fh.write('{"alpaca_system": 1}')
    got, _ = _post(server, "/v1/adapters", json.dumps({"name": "alpaca", "path": "alpaca-run"}).encode())
    assert got == 200 and engine.templates == {"alpaca": "alpaca"}
    tok, api = engine.tokenizer, client(server)
    want_ids = prompt_ids(tok, CHAT, template="alpaca")
    chat_ids = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert want_ids != chat_ids["input_ids"]
    for name, ids in (("alpaca", want_ids), ("lora", chat_ids["input_ids"])):  # same weights, two formats
        out = api.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0)
        assert out.usage.prompt_tokens == len(ids)
        assert out.choices[0].message.content == generate_reference(base, folders["lora"], ids, 8, tok)
    got, _ = _post(server, "/v1/adapters/alpaca", b"", method="DELETE")
    assert got == 200 and engine.templates == {}


def test_the_bases_generation_config_applies_as_in_generate(served, monkeypatch):
    """A base whose generation_config.json sets repetition_penalty (Qwen2.5-Instruct: 1.05) answered differently
    through serve, which took the plain argmax, than through generate (and deltatune generate), which applies it."""
    from transformers import AutoModelForCausalLM

    from deltatune.train.run import load_adapter_model

    engine, server, base, folders = served
    monkeypatch.setattr(engine.gen, "repetition_penalty", 0.2)  # < 1 favours what was seen
    tok, api = engine.tokenizer, client(server)
    ids = tok(PROMPTS[1])["input_ids"]
    for name in ("base", "lora"):
        model = (
            AutoModelForCausalLM.from_pretrained(base)
            if name == "base"
            else load_adapter_model(folders[name], base)[0]
        )
        x = torch.tensor([ids])
        with torch.no_grad():
            plain, penalised = (model.eval().generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=24,
                                do_sample=False, pad_token_id=tok.pad_token_id, repetition_penalty=p)[0, len(ids):]
                                for p in (1.0, 0.2))  # fmt: skip
        assert not torch.equal(plain, penalised)  # the penalty changes this answer
        got = api.completions.create(model=name, prompt=PROMPTS[1], max_tokens=24, temperature=0).choices[0].text
        assert got == tok.decode(penalised, skip_special_tokens=True)


def test_sampling_keeps_generates_top_k_where_the_config_leaves_it_unset():
    """transformers 5 leaves generation_config.top_k None and generate fills in 50: serve drew from every token."""
    from types import SimpleNamespace

    from deltatune.serve.engine import _pick

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    top = set(logits.topk(50).indices.tolist())
    r = SimpleNamespace(temperature=1.0, top_p=1.0, prompt_ids=[], output_ids=[])
    g = torch.Generator().manual_seed(1)
    draws = [_pick(logits, r, g, SimpleNamespace(top_k=None, repetition_penalty=None)) for _ in range(200)]
    assert set(draws) <= top and len(set(draws)) > 10
    draws = [_pick(logits, r, g, SimpleNamespace(top_k=0, repetition_penalty=None)) for _ in range(200)]
    assert not set(draws) <= top  # top_k 0 set in the config: every token, as generate


def test_developer_messages_and_odd_bodies_are_answered_not_500(served):
    """The developer role was a 500 with a built-in template (it has no such role); a lone surrogate, a body nested
    100,000 deep or a 5,000-digit number were 500s; vLLM's sampling fields were accepted and ignored."""
    from deltatune.serve.app import _chat_ids

    engine, server, _, _ = served
    tok = engine.tokenizer
    dev, sys_ = ([{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}] for role in ("developer", "system"))  # fmt: skip
    for template in ("alpaca", "chatml", None):  # the tiny tokenizer's own template has no developer role either
        assert _chat_ids(tok, dev, template) == _chat_ids(tok, sys_, template)
    bodies = {
        "lone surrogate": (b'{"model": "lora", "prompt": "hi \\ud83d", "max_tokens": 1}', "/v1/completions", "prompt"),
        "surrogate in chat": (b'{"model": "lora", "messages": [{"role": "user", "content": "\\ud83d"}]}',
                              "/v1/chat/completions", "messages"),
        "nested": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "/v1/completions", None),
        "digits": (b'{"model": "lora", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "/v1/completions", None),
    }  # fmt: skip
    for what, (body, path, param) in bodies.items():
        got, answer = _post(server, path, body)
        assert got == 400 and answer["error"]["param"] == param, what
    for field, value in (("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0), ("stop_token_ids", [-1]),
                         ("min_tokens", -1), ("tool_choice", "required")):  # fmt: skip
        got, answer = _post(
            server, "/v1/completions", json.dumps({"model": "lora", "prompt": "hi", field: value}).encode()
        )
        assert got == 400 and answer["error"]["param"] == field, field
    for asks_nothing in ({"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "tool_choice": "none"}, {"top_k": 0}):
        body = {"model": "lora", "prompt": "hi", "max_tokens": 1, **asks_nothing}
        assert _post(server, "/v1/completions", json.dumps(body).encode())[0] == 200, asks_nothing
    _assert_still_serving(server)


def test_unloading_an_adapter_another_computes_with_is_a_409(served, monkeypatch):
    """delete_adapter refuses a fusion's member (ValueError): serve answered that with a 500."""
    engine, server, _, _ = served

    def refuse(name):
        raise ValueError(f"adapter {name!r} is used by 'f' (fusion); delete 'f' first")

    monkeypatch.setattr(engine.model, "delete_adapter", refuse)
    got, answer = _post(server, "/v1/adapters/lora", b"", method="DELETE")
    assert got == 409 and answer["error"]["code"] == "adapter_in_use" and "used by 'f'" in answer["error"]["message"]
    assert "lora" in engine.adapters()
