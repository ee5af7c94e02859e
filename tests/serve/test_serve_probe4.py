"""Probe 4 of ``deltatune serve``: a row whose adapter gives NaN logits fails alone, not its batch mates; a request
that leaves ``top_p`` unset samples with the base's generation config's ``top_p``, as transformers' ``generate``
does (and vLLM)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from deltatune.serve.engine import Request


def _wait(requests: list[Request], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while any(r.finish_reason is None for r in requests):
        assert time.monotonic() < deadline, "the engine did not answer"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def nan_adapter(served, tmp_path_factory):
    """A LoRA on the served tiny base whose weights went to NaN (a run that diverged), saved to a folder."""
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    _, _, base, _ = served
    model = dt.get_delta_model(
        AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(r=4, target_modules=["o_proj"])
    )
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.fill_(float("nan"))
    folder = str(tmp_path_factory.mktemp("nan_lora"))
    model.save_pretrained(folder)
    return folder


def test_a_row_whose_logits_are_nan_fails_alone_not_its_batch(served, nan_adapter):
    """torch.multinomial raised for the NaN row and the whole mixed batch was answered with that error: a sampled
    request on a sound adapter, batched beside it, got a 500 too."""
    from deltatune.serve import build_engine

    _, _, base, folders = served
    engine = build_engine(base, {"lora": folders["lora"], "nan": nan_adapter}, max_batch_size=8, max_wait_ms=2000)
    try:
        tok = engine.tokenizer

        def request(adapter: str) -> Request:
            ids = tok("the cat sat")["input_ids"]
            return Request(ids, adapter, 5, lambda t, f: None, temperature=1.0, seed=3)

        alone = request("lora")
        engine.submit(alone)
        _wait([alone])
        batches = engine.batches
        good, bad = request("lora"), request("nan")
        engine.submit(good)
        engine.submit(bad)  # within the 2 s the first waits for others: one batch
        _wait([good, bad])
        assert engine.batches == batches + 1  # they shared a batch
        assert good.finish_reason == "length" and good.output_ids == alone.output_ids
        assert bad.finish_reason.startswith("error: model 'nan'") and "not finite" in bad.finish_reason
    finally:
        engine.close()


def test_unset_top_p_is_the_generation_configs_as_in_generate(served, monkeypatch):
    """Qwen2.5-Instruct's generation_config.json sets top_p 0.8, Llama-3.1-Instruct's 0.9: generate (and vLLM)
    sample from that nucleus when the caller leaves top_p out; serve applied the config's top_k and repetition
    penalty but drew from the whole distribution."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from deltatune.serve.engine import _pick

    engine, server, _, _ = served
    gen = engine.gen
    monkeypatch.setattr(gen, "top_p", 0.3)
    monkeypatch.setattr(gen, "top_k", 0)  # the nucleus alone, so the reference is one warper
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 1.5  # a nucleus of 4
    kept = TopPLogitsWarper(0.3)(None, logits[None].clone())[0].isfinite()
    unset = Request([1], "base", 1, lambda t, f: None, temperature=1.0)
    g = torch.Generator().manual_seed(1)
    draws = {_pick(logits, unset, g, gen) for _ in range(400)}
    assert draws == set(kept.nonzero().flatten().tolist())  # generate's nucleus, every token of it drawn
    unset.top_p = 1.0  # given explicitly, the request's own wins
    assert not {_pick(logits, unset, g, gen) for _ in range(400)} <= draws

    import openai

    api = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    kw = dict(model="lora", prompt="old house", max_tokens=8, temperature=1.5, seed=11)
    implicit = api.completions.create(**kw).choices[0].text
    assert implicit == api.completions.create(top_p=0.3, **kw).choices[0].text
    assert implicit != api.completions.create(top_p=1.0, **kw).choices[0].text


def test_a_batch_that_never_ends_keeps_its_cache_as_wide_as_its_longest_row(served):
    """Under steady load the mixed batch never drains (newcomers join as rows leave), and its KV cache grew by one
    column a step for as long as it ran: 345 requests of 8 + 6 tokens in 20 s left every row attending over 473
    columns, with no bound (memory and time per step growing until the server ran out of memory). The columns no
    live row attends to are now dropped; every answer still equals transformers' generate."""
    from deltatune.serve import build_engine
    from deltatune.train.run import load_adapter_model

    _, _, base, folders = served
    engine = build_engine(base, {"lora": folders["lora"], "ia3": folders["ia3"]}, max_batch_size=2, max_wait_ms=0)
    engine.close()  # no worker thread: the test runs one batch itself, its newcomers already waiting
    tok = engine.tokenizer
    prompts = ["a big red dog ran under the old tree today", "the cat sat", "old house", "the quiet blue mat"]
    rows = [Request(tok(prompts[k % 4])["input_ids"], ("lora", "ia3", "base")[k % 3], 3 + k % 5, lambda t, f: None)
            for k in range(12)]  # fmt: skip
    for r in rows[1:]:
        engine.pending.put(r)
    widths: list[int] = []
    forward = engine._forward
    engine._forward = lambda ids, mask, cache, names: widths.append(mask.shape[1]) or forward(ids, mask, cache, names)
    engine._run(rows[:1])
    assert engine.batches == 1 and engine.joined == 11 and all(r.finish_reason == "length" for r in rows)
    assert max(widths) <= max(len(r.prompt_ids) + r.max_tokens for r in rows)  # was 35 here, one more a step
    models = {name: load_adapter_model(folders[name], base)[0].eval() for name in ("lora", "ia3")}
    from transformers import AutoModelForCausalLM

    models["base"] = AutoModelForCausalLM.from_pretrained(base).eval()
    for r in rows:
        ids = torch.tensor([r.prompt_ids])
        with torch.no_grad():
            out = models[r.adapter].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=r.max_tokens, pad_token_id=tok.pad_token_id)  # fmt: skip
        assert r.output_ids == out[0, ids.shape[1] :].tolist()


def test_a_run_yaml_whose_model_is_a_name_is_refused_in_one_line(served, tmp_path):
    """``model: smollm2`` in a hand-written run.yaml, served without --model: an AttributeError's traceback."""
    import shutil

    from deltatune.config import ConfigError
    from deltatune.serve import build_engine

    _, _, _, folders = served
    folder = str(tmp_path / "run")
    shutil.copytree(folders["lora"], folder)
    with open(os.path.join(folder, "run.yaml"), "w", encoding="utf-8") as fh:
        fh.write("stage: sft\nmodel: smollm2\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: model must be a mapping with name_or_path, got 'smollm2'"):
        build_engine(None, {"a": folder})


def test_an_adapter_path_with_a_nul_byte_is_a_400(served):
    """os.path.realpath raised ValueError: a 500 whose body was not OpenAI's JSON."""
    import json
    import urllib.error
    import urllib.request

    _, server, _, _ = served
    body = json.dumps({"name": "x", "path": "lora\u0000"}).encode()
    req = urllib.request.Request(server.url + "/v1/adapters", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    error = json.loads(refused.value.read())["error"]
    assert refused.value.code == 400 and error["param"] == "path" and "NUL" in error["message"]
