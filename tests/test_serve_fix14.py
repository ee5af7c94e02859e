"""Serve fixes (review 14).

An adapter's template stop (chatml's ``<|im_end|>`` with a tokenizer that has no EOS) was added to the engine-wide
EOS ids: once such an adapter loaded, the base and every other adapter stopped on it too, unload or not. A chat
``echo`` with ``top_logprobs: null`` scored the prompt (prompt_logprobs 0) where vLLM's to_sampling_params passes None.
"""

from __future__ import annotations

import threading

import yaml
from test_chat_stop_probe14 import _model, _tokenizer

import deltatune as dt
from deltatune.serve import Engine, Request
from deltatune.serve.fields import _prompt_logprobs


def _save(tok, path, template: str | None) -> str:
    lora = dt.DeltaModel(_model(tok, []), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(path))
    if template is not None:
        (path / "run.yaml").write_text(yaml.safe_dump({"stage": "sft", "data": {"template": template}}))
    return str(path)


def _ask(engine, tok, adapters: list[str], **settings) -> list[Request]:
    """One request per adapter, submitted together (one mixed batch: the engine gathers them for 0.5 s)."""
    left, done = [len(adapters)], threading.Event()

    def emit(_text, finish):
        if finish:
            left[0] -= 1
            if not left[0]:
                done.set()

    rows = [Request(tok("<|im_start|>user\nhi")["input_ids"], a, 6, emit, **settings) for a in adapters]
    for r in rows:
        engine.submit(r)
    assert done.wait(60)
    return rows


def test_an_adapters_template_stop_ends_its_rows_alone_and_unload_drops_it(tmp_path):
    tok = _tokenizer()
    hi, im_end = tok.convert_tokens_to_ids("hi"), tok.convert_tokens_to_ids("<|im_end|>")
    tuned = _save(tok, tmp_path / "tuned", "chatml")
    other = _save(tok, tmp_path / "other", None)
    # every forward answers "hi", "<|im_end|>", "hi", ... whatever the row (the model's lm_head is forced)
    engine = Engine(dt.DeltaModel(_model(tok, [hi, im_end] * 40), fused_loss=False), tok, max_wait_s=0.5)
    try:
        engine.load_adapter("tuned", tuned)
        engine.load_adapter("other", other)
        base, plain, chatml = _ask(engine, tok, ["base", "other", "tuned"])
        assert engine.batches == 1  # one mixed batch: the stop applies per row
        # vLLM's stop_token_ids: the id is the stop_reason, its text left out
        assert (chatml.output_ids, chatml.finish_reason, chatml.stop_reason, chatml.text) == ([hi, im_end], "stop",
                                                                                              im_end, "hi")  # fmt: skip
        for r in (base, plain):  # they ran to max_tokens: <|im_end|> is no stop of theirs (it was, since 8cb284b)
            assert (r.output_ids, r.finish_reason, r.stop_reason) == ([hi, im_end] * 3, "length", None)
        assert engine.eos_ids == set() and engine.stops == {"tuned": {im_end}}
        assert engine.eos_of("tuned") == {im_end} and engine.eos_of("base") == engine.eos_of("other") == set()
        # as the generation config's other EOS ids (vLLM's stop_token_ids unless ignore_eos): ignore_eos runs on
        (chatml,) = _ask(engine, tok, ["tuned"], ignore_eos=True)
        assert (chatml.output_ids, chatml.finish_reason) == ([hi, im_end] * 3, "length")
        engine.unload_adapter("tuned")
        assert engine.stops == {} and engine.eos_of("tuned") == set()
        (base,) = _ask(engine, tok, ["base"])
        assert (base.output_ids, base.finish_reason) == ([hi, im_end] * 3, "length")
        engine.load_adapter("tuned", other)  # the name again, a run with no template: no stop left from before
        (again,) = _ask(engine, tok, ["tuned"])
        assert (again.output_ids, again.finish_reason) == ([hi, im_end] * 3, "length")
    finally:
        engine.close()


def test_chat_echo_with_top_logprobs_null_scores_no_prompt_as_vllm():
    """vLLM's ChatCompletionRequest.to_sampling_params: prompt_logprobs = self.top_logprobs under echo, whose default
    0 applies only where the key is left out; null is None (no prompt_logprobs in the answer)."""
    chat = {"messages": [], "echo": True}
    assert _prompt_logprobs({**chat, "top_logprobs": None}, True) is None
    assert _prompt_logprobs(chat, True) == 0
    assert _prompt_logprobs({**chat, "top_logprobs": 3, "logprobs": True}, True) == 3
    assert _prompt_logprobs({**chat, "top_logprobs": False}, True) == 0  # pydantic's lax int: false is 0
    assert _prompt_logprobs({**chat, "top_logprobs": None, "prompt_logprobs": 2}, True) == 2
    assert _prompt_logprobs({"echo": True, "logprobs": None}, False) is None  # a completion's, as before
