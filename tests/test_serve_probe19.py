"""Probe 19 of ``deltatune serve`` against ``deltatune chat``'s stopping: a chat request rendered with the tokenizer's
own chat template stops where that template ends a turn (chat's ``_turn_end_id``: chatml's ``<|im_end|>`` though the
generation config stops on none, as LLaMA-Factory's API adds its template's stop words to vLLM's stop_token_ids),
and an adapter whose run trained under chatml with a tokenizer that has no EOS and writes ``<|im_end|>`` in several
tokens stops on that text (chat's ``_end_marker``); both ran to max_tokens, the marker and what followed in the text.
On a tiny Llama whose answer is forced token by token (test_chat_stop_probe14's), through the app in process."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from test_chat_stop_probe14 import _model  # noqa: E402
from test_chat_stop_probe14 import _tokenizer as _chatml_tokenizer  # noqa: E402
from test_serve_probe11 import _call  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.train import chat  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _split_tokenizer():
    """A tokenizer with no EOS that writes ``<|im_end|>`` in three tokens ("<|", "im_end", "|>"), decoded joined."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<|im_start|>", "<|", "im_end", "|>", "user", "assistant", "hi", "yo", "\n", " "]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    split = Regex(r"<\|im_start\|>|<\||\|>|im_end|\n| |[a-z]+")
    raw.pre_tokenizer = pre_tokenizers.Split(split, behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    assert tok.eos_token_id is None and len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) == 3
    return tok


def _streamed(chunks) -> tuple[str, list]:
    """A streamed chat answer's text and its finish reasons."""
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, [
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]


def _app(model, tok):
    from deltatune.serve.app import create_app
    from deltatune.serve.engine import Engine

    engine = Engine(dt.DeltaModel(model, fused_loss=False), tok, max_wait_s=0.001)
    return engine, create_app(engine, max_tokens=16)


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_rendered_with_the_tokenizers_template_stops_at_its_end_of_turn_as_deltatune_chat(stream):
    tok = _chatml_tokenizer()
    tok.chat_template = CHATML
    hi, im_end = tok.convert_tokens_to_ids("hi"), tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = chat.generate(_model(tok, [hi, hi, im_end]), tok, ids, max_new_tokens=8, templated=True)
    assert want == "hi hi"  # deltatune chat stops on the template's end of a turn
    engine, app = _app(_model(tok, [hi, hi, im_end]), tok)
    try:
        body = {"messages": messages, "max_tokens": 8, "temperature": 0, "stream": stream}
        status, answer = _call(app, "/v1/chat/completions", body)
    finally:
        engine.close()
    assert status == 200
    if stream:
        text, ends = _streamed(answer)
        assert (text.split(), ends) == (["hi", "hi"], ["stop"])
        return
    choice = answer["choices"][0]
    # it stops as vLLM stops on a generation config's EOS id that is not the tokenizer's: stop_reason the id
    assert (choice["message"]["content"].split(), choice["finish_reason"]) == (["hi", "hi"], "stop")
    assert choice["stop_reason"] == im_end and answer["usage"]["completion_tokens"] == 3


def test_a_completion_and_ignore_eos_run_past_the_chat_templates_end_of_turn():
    """A completion's prompt was not framed by the template (chat's --raw): nothing more stops it; nor ignore_eos."""
    tok = _chatml_tokenizer()
    tok.chat_template = CHATML
    hi, im_end = tok.convert_tokens_to_ids("hi"), tok.convert_tokens_to_ids("<|im_end|>")
    for path, body in (
        ("/v1/completions", {"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}),
    ):
        engine, app = _app(_model(tok, [hi, im_end]), tok)
        try:
            status, answer = _call(app, path, {**body, "max_tokens": 4, "temperature": 0})
        finally:
            engine.close()
        assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("stream", [False, True])
def test_an_adapter_trained_under_chatml_stops_on_a_several_token_end_marker_as_deltatune_chat(tmp_path, stream):
    import yaml

    tok = _split_tokenizer()
    hi, yo = tok.convert_tokens_to_ids("hi"), tok.convert_tokens_to_ids("yo")
    marker = tok("<|im_end|>", add_special_tokens=False)["input_ids"]
    answer_ids = [hi, yo, hi, *marker, yo, yo]
    ids = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert chat.generate(_model(tok, answer_ids), tok, ids, max_new_tokens=8, template="chatml") == "hiyohi"
    lora = dt.DeltaModel(_model(tok, []), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "run"))
    (tmp_path / "run" / "run.yaml").write_text(yaml.safe_dump({"stage": "sft", "data": {"template": "chatml"}}))
    engine, app = _app(_model(tok, answer_ids), tok)
    try:
        engine.load_adapter("tuned", str(tmp_path / "run"))
        body = {"model": "tuned", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
                "temperature": 0, "stream": stream}  # fmt: skip
        status, answer = _call(app, "/v1/chat/completions", body)
    finally:
        engine.close()
    assert status == 200
    if stream:
        text, ends = _streamed(answer)
        assert (text, ends) == ("hiyohi", ["stop"])  # no piece of the marker was sent
        return
    choice = answer["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"], choice["stop_reason"]) == ("hiyohi", "stop", None)
    assert answer["usage"]["completion_tokens"] == 6


def test_the_several_token_end_marker_is_no_stop_under_ignore_eos_and_kept_on_request(tmp_path):
    import yaml

    tok = _split_tokenizer()
    hi, yo = tok.convert_tokens_to_ids("hi"), tok.convert_tokens_to_ids("yo")
    marker = tok("<|im_end|>", add_special_tokens=False)["input_ids"]
    lora = dt.DeltaModel(_model(tok, []), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "run"))
    (tmp_path / "run" / "run.yaml").write_text(yaml.safe_dump({"stage": "sft", "data": {"template": "chatml"}}))
    got = []
    for extra in ({"ignore_eos": True}, {"include_stop_str_in_output": True}):
        engine, app = _app(_model(tok, [hi, *marker, yo]), tok)
        try:
            engine.load_adapter("tuned", str(tmp_path / "run"))
            body = {"model": "tuned", "prompt": "hi", "max_tokens": 6, "temperature": 0, **extra}
            status, answer = _call(app, "/v1/completions", body)
        finally:
            engine.close()
        assert status == 200
        got.append((answer["choices"][0]["text"], answer["choices"][0]["finish_reason"]))
    assert got == [("hi<|im_end|>yoyo", "length"), ("hi<|im_end|>", "stop")]


def test_turn_end_is_read_once_per_engine():
    """The template's end of a turn is rendered once, not per request."""
    tok = _chatml_tokenizer()
    tok.chat_template = CHATML
    engine, _ = _app(_model(tok, []), tok)
    try:
        calls = []
        real = tok.apply_chat_template
        tok.apply_chat_template = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        first, second = engine.turn_end(), engine.turn_end()
    finally:
        engine.close()
    assert first == second == tok.convert_tokens_to_ids("<|im_end|>") and len(calls) == 1


def test_min_tokens_masks_the_chat_templates_end_of_turn_as_vllm_masks_its_stop_ids():
    """The end of a turn is a stop id to min_tokens (vLLM's all_stop_token_ids): masked until min_tokens, and
    allowed_token_ids that leave only it under min_tokens are refused (review of 298ed41)."""
    tok = _chatml_tokenizer()
    tok.chat_template = CHATML
    hi, im_end = tok.convert_tokens_to_ids("hi"), tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "hi"}]
    answers = []
    for extra in ({"min_tokens": 4}, {"min_tokens": 1, "allowed_token_ids": [im_end]}):
        engine, app = _app(_model(tok, [hi, im_end, hi, hi, im_end]), tok)
        try:
            body = {"messages": messages, "max_tokens": 8, "temperature": 0, **extra}
            answers.append(_call(app, "/v1/chat/completions", body))
        finally:
            engine.close()
    (status, masked), (refused, error) = answers
    choice = masked["choices"][0]
    assert status == 200 and choice["finish_reason"] == "stop" and masked["usage"]["completion_tokens"] == 5
    assert choice["message"]["content"].split() == ["hi", "hi", "hi"]
    assert refused == 400 and "allowed_token_ids" in str(error)
