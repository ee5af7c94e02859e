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
