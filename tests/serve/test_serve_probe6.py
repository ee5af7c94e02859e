"""Probe 6 of ``deltatune serve``: the sampling settings a request leaves unset are the base's generation config's,
as transformers' ``generate`` (and vLLM) take them: ``temperature`` (served as 1 always), ``min_p`` (never applied),
``do_sample: false`` (greedy); and vLLM's explicit "nothing" values (``top_k: -1``, ``min_p: 0``,
``repetition_penalty: 1``) override the config, where the config's were applied anyway. A seeded sampled answer
equals ``generate`` under ``torch.manual_seed`` of that seed, token for token."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

# Qwen2.5-Instruct-like sampling defaults, with a min_p (Qwen3's generation config sets one).
GENERATION = {
    "do_sample": True,
    "temperature": 0.3,
    "top_k": 20,
    "top_p": 0.9,
    "min_p": 0.2,
    "repetition_penalty": 1.1,
}


@pytest.fixture(scope="module")
def sampled(served, tmp_path_factory):
    """(engine, server, reference model, tokenizer) on a copy of the tiny base with sharp logits (a near-uniform
    distribution draws the same token at any temperature) and GENERATION in its generation_config.json."""
    from serving import Server
    from transformers import AutoModelForCausalLM

    from deltatune.serve import build_engine
    from deltatune.serve.app import create_app

    _, _, base, folders = served
    folder = str(tmp_path_factory.mktemp("sampled") / "base")
    shutil.copytree(base, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.mul_(20)
    model.save_pretrained(folder)
    path = os.path.join(folder, "generation_config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh) | GENERATION
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    engine = build_engine(folder, {"lora": folders["lora"]}, max_wait_ms=0)
    server = Server(create_app(engine, max_tokens=16))
    yield engine, server, AutoModelForCausalLM.from_pretrained(folder).eval(), engine.tokenizer
    server.stop()
    engine.close()


def _generate(model, ids: list[int], seed: int, **kw) -> list[int]:
    x = torch.tensor([ids])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, pad_token_id=0, **kw)
    return out[0, len(ids) :].tolist()


def _complete(server, **body) -> str:
    import urllib.request

    body = {"model": "base", "prompt": "the cat sat on", "max_tokens": 8, **body}
    request = urllib.request.Request(
        server.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())["choices"][0]["text"]


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_unset_temperature_and_min_p_are_the_generation_configs(sampled):
    """Served at temperature 1 and without the min_p, the three seeds' answers differed from generate's from the
    fourth token on; now each equals generate's."""
    engine, server, model, tok = sampled
    ids = tok("the cat sat on")["input_ids"]
    answers = set()
    for seed in (1, 2, 3):
        want = _text(tok, _generate(model, ids, seed))
        assert _complete(server, seed=seed) == want
        answers.add(want)
    assert len(answers) == 3  # sampled: each seed its own answer
    t1 = _text(tok, _generate(model, ids, 1, temperature=1.0))
    assert _complete(server, seed=1, temperature=1.0) == t1 != _complete(server, seed=1)  # a given one wins


def test_a_config_that_says_do_sample_false_answers_greedily(sampled, monkeypatch):
    """generate decodes greedily where the config says do_sample false (Llama-2-chat, some Mistral configs): serve
    sampled at temperature 1, a different answer per seed."""
    engine, server, model, tok = sampled
    monkeypatch.setattr(engine.gen, "do_sample", False)
    ids = tok("the cat sat on")["input_ids"]
    greedy = _text(tok, _generate(model, ids, 0, do_sample=False))
    assert {_complete(server, seed=seed) for seed in (1, 2)} == {greedy}
    assert _complete(server, seed=1, temperature=0.3) == _text(tok, _generate(model, ids, 1))  # asked: sampled


def test_vllms_nothing_values_override_the_config(sampled):
    """top_k -1 (vLLM: every token) and min_p 0 were accepted, and the config's top_k 20 and min_p applied anyway."""
    engine, server, model, tok = sampled
    ids = tok("the cat sat on")["input_ids"]
    for field, value, reference, other in (
        ("top_k", -1, 0, {}),
        ("min_p", 0, 0.0, {"top_k": (-1, 0), "top_p": (1.0, 1.0)}),  # (served, generate's): min_p cuts past these
    ):
        body = {"temperature": 2.0, **{k: v[0] for k, v in other.items()}}
        kw = {"temperature": 2.0, **{k: v[1] for k, v in other.items()}}
        differs = False
        for seed in (1, 2):
            want = _text(tok, _generate(model, ids, seed, **kw, **{field: reference}))
            assert _complete(server, seed=seed, **body, **{field: value}) == want, field
            config = _complete(server, seed=seed, **body)
            assert config == _text(tok, _generate(model, ids, seed, **kw)), field
            differs |= config != want
        assert differs, field  # the config's value answers otherwise


def test_repetition_penalty_1_overrides_the_config(sampled, monkeypatch):
    """repetition_penalty 1 was accepted and the config's penalty applied anyway (greedy answers too)."""
    engine, server, model, tok = sampled
    monkeypatch.setattr(engine.gen, "repetition_penalty", 0.2)  # < 1 favours what was seen: this model repeats
    ids = tok("the cat sat on")["input_ids"]
    plain, penalised = (
        _text(tok, _generate(model, ids, 0, do_sample=False, repetition_penalty=p)) for p in (1.0, 0.2)
    )
    assert plain != penalised
    assert _complete(server, temperature=0, repetition_penalty=1) == plain
    assert _complete(server, temperature=0) == penalised


THINKING = (  # Qwen3's switch, in the tiny template's shape
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_vllms_chat_rendering_fields_are_applied_not_ignored(served, monkeypatch):
    """chat_template_kwargs (Qwen3's enable_thinking: false), continue_final_message, add_generation_prompt and
    add_special_tokens were accepted and ignored: the prompt was the default rendering (25 tokens where
    enable_thinking false renders 32)."""
    engine, server, _, _ = served
    tok = engine.tokenizer
    monkeypatch.setattr(tok, "chat_template", THINKING)
    chat = [{"role": "user", "content": "Hi there"}]
    prefill = [*chat, {"role": "assistant", "content": "Well"}]

    def want(messages, special=False, **kw) -> int:
        return len(tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=special).input_ids)

    cases = [
        ({}, chat, want(chat, add_generation_prompt=True)),
        ({"chat_template_kwargs": {"enable_thinking": False}}, chat,
         want(chat, add_generation_prompt=True, enable_thinking=False)),
        ({"add_generation_prompt": False, "continue_final_message": True}, prefill,
         want(prefill, continue_final_message=True)),
        ({"add_generation_prompt": False}, chat, want(chat)),
        ({"add_special_tokens": True}, chat, want(chat, True, add_generation_prompt=True)),
    ]  # fmt: skip
    assert len({n for _, _, n in cases}) == len(cases)  # each field changes the prompt
    for fields, messages, n in cases:
        body = {"model": "lora", "messages": messages, "max_tokens": 1, **fields}
        status, answer = _post(server, "/v1/chat/completions", body)
        assert status == 200 and answer["usage"]["prompt_tokens"] == n, fields
    plain = {"model": "lora", "prompt": "the cat", "max_tokens": 1}
    n = [_post(server, "/v1/completions", {**plain, "add_special_tokens": s})[1]["usage"]["prompt_tokens"]
         for s in (True, False)]  # fmt: skip
    assert n == [len(tok("the cat").input_ids), len(tok("the cat", add_special_tokens=False).input_ids)]


def test_vllm_fields_the_server_does_not_compute_are_refused_not_ignored(served):
    """guided_json, use_beam_search, ... answered 200 as if not sent (include_stop_str_in_output and
    skip_special_tokens false are served since 8b508ba)."""
    _, server, _, _ = served
    chat = {"model": "lora", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    for field, value in (("guided_json", {"type": "object"}), ("use_beam_search", True), ("chat_template", "{{ 1 }}"),
                         ("continue_final_message", True), ("chat_template_kwargs", {"tokenize": True})):  # fmt: skip
        status, answer = _post(server, "/v1/chat/completions", {**chat, field: value})
        assert status == 400 and answer["error"]["param"] == field, field
    for field, value in (("include_stop_str_in_output", False), ("skip_special_tokens", True)):
        assert _post(server, "/v1/chat/completions", {**chat, field: value})[0] == 200, field


def test_unset_max_tokens_is_at_most_the_generation_configs_max_new_tokens(served, monkeypatch):
    """A generation_config.json with max_new_tokens 3: generate (and vLLM) stop there when the caller sets no
    limit; serve went on to --max-tokens (64 here)."""
    from transformers import AutoModelForCausalLM

    engine, server, base, _ = served
    monkeypatch.setattr(engine.gen, "max_new_tokens", 3)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    model.generation_config.max_new_tokens = 3
    tok = engine.tokenizer
    x = torch.tensor([tok("the cat sat on")["input_ids"]])
    with torch.no_grad():  # max_new_tokens from the config, as a caller that sets none gets
        want = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)
    want = _text(tok, want[0, x.shape[1] :].tolist())
    status, answer = _post(server, "/v1/completions", {"model": "base", "prompt": "the cat sat on", "temperature": 0})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3 and answer["choices"][0]["text"] == want
    asked = {"model": "base", "prompt": "the cat sat on", "temperature": 0, "max_tokens": 5}
    assert _post(server, "/v1/completions", asked)[1]["usage"]["completion_tokens"] == 5  # asked for: as asked
