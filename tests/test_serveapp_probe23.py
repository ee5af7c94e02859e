"""probe 23 (serve's HTTP layer and ``deltatune chat``) against the references: transformers' ``chat`` and
LLaMA-Factory's ``chat`` print an answer as its tokens come (a TextStreamer); ``deltatune chat`` printed it whole at
the end."""

from __future__ import annotations

import io

import pytest
from test_chat_probe20 import _answering

from deltatune.train import chat


class _Out(io.StringIO):
    """stdout recording each write with the model's forwards so far."""

    def __init__(self, forwards: list[int]) -> None:
        super().__init__()
        self.forwards, self.writes = forwards, []

    def write(self, text: str) -> int:
        self.writes.append((text, self.forwards[0]))
        return super().write(text)


def test_chat_writes_the_answer_as_its_tokens_come():
    """SmolLM2's template, an answer of seven tokens, 日 split over three byte tokens: the REPL writes its
    text after each token (transformers' TextStreamer), an unfinished character held back (no U+FFFD written), the
    pieces adding up to the answer ``generate`` returns; before, one write after the last forward."""
    from tiny import smollm2_tokenizer

    tok = smollm2_tokenizer()
    answer = tok(" one two 日本 three", add_special_tokens=False)["input_ids"]
    model = _answering(len(tok), [*answer, tok.eos_token_id])
    forwards = [0]
    model.lm_head.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    whole = chat.generate(model, tok, chat.prompt_ids(tok, "hi"), max_new_tokens=16, templated=True)
    assert whole == "one two 日本 three"
    total = forwards[0]
    forwards[0] = 0
    out = _Out(forwards)
    assert chat.repl(model, tok, stdin=io.StringIO("hi\n"), stdout=out, max_new_tokens=16) == 0
    assert out.getvalue() == whole + "\n"
    pieces = [(t, n) for t, n in out.writes if t]
    assert "".join(t for t, _ in pieces) == whole + "\n"
    assert all("\ufffd" not in t for t, _ in pieces)
    # each token's text written after its forward ("日" once its third byte token came); the newline after the EOS's
    assert pieces == [("one", 1), (" two", 2), (" 日", 5), ("本", 6), (" three", 7), ("\n", total)]


def test_a_streamed_answer_holds_back_a_text_end_marker_and_trailing_blanks():
    """A tokenizer without EOS under the built-in chatml, its ``<|im_end|>`` three tokens (stopped on as text): the
    stream gives "hi", " yo" and nothing of the marker's opening ``<|``, ``<|im_end`` nor the blank before it, as the
    answer ``generate`` returns ("hi yo") has none (TextStreamer would write them: it knows no marker)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "hi", "yo", "<|", "im_end", "|>", " ", "\n"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\||\|>| |\n|im_end"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>")
    assert tok.eos_token_id is None and tok.decode(tok("hi <|im_end|>")["input_ids"]) == "hi <|im_end|>"
    forced = [tok.convert_tokens_to_ids(w) for w in ["hi", " ", "yo", " ", "<|", "im_end", "|>"]]
    model = _answering(len(tok), [*forced, tok.convert_tokens_to_ids("yo")])
    pieces: list[str] = []
    ids = tok("hi\n")["input_ids"]
    answer = chat.generate(model, tok, ids, max_new_tokens=12, template="chatml", stream=pieces.append)
    assert answer == "hi yo"
    assert pieces == ["hi", " yo"]


def _serve(tok):
    from test_serve_probe11 import _serve as serve

    return serve(tok)


def test_text_parts_are_joined_as_vllms_chat_utils_joins_them():
    """vLLM's _parse_chat_message_content_parts: a plain string part, ``input_text`` / ``output_text`` parts (the
    Responses API's) and an assistant's ``refusal`` part (OpenAI's ChatCompletionContentPartRefusalParam) are text;
    a null or empty part is skipped (vLLM appends the truthy parts alone), the rest joined by newlines. deltatune
    refused all but ``{"type": "text", "text": str}`` (a 400) and joined an empty text part ("\\nb"). The echo of an
    assistant message continued is that same text, as vLLM echoes the parsed conversation's last content."""
    from test_serve_probe11 import _call
    from tiny import smollm2_tokenizer

    from deltatune.serve.prompts import _chat_ids

    tok = smollm2_tokenizer()
    user = ["a", {"type": "input_text", "text": "b"}, {"type": "text", "text": ""}, {"type": "text", "text": None},
            {"type": "text", "text": "c"}]  # fmt: skip
    said = [{"type": "output_text", "text": "d"}, {"type": "refusal", "refusal": "no"}]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": said}]
    flat = [{"role": "user", "content": "a\nb\nc"}, {"role": "assistant", "content": "d\nno"}]
    want = tok.apply_chat_template(flat, continue_final_message=True, tokenize=False)
    rendering = {"add_generation_prompt": False, "continue_final_message": True}
    assert _chat_ids(tok, messages, None, rendering) == tok(want, add_special_tokens=False)["input_ids"]
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    engine, app = _serve(tok)
    try:
        body = {"messages": messages, "max_tokens": 1, "temperature": 0, "echo": True, **rendering}
        status, answer = _call(app, "/v1/chat/completions", body)
        assert status == 200 and answer["choices"][0]["message"]["content"].startswith("d\nno")
        status, answer = _call(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": image}]})
        assert (status, answer["error"]["param"]) == (400, "messages")
    finally:
        engine.close()


def test_an_assistant_turns_reasoning_reaches_the_template_as_vllm_hands_it():
    """vLLM's _parse_chat_message_content: an assistant message's ``reasoning`` (else ``reasoning_content``) goes to
    the chat template under both names (Qwen3's template writes a tool loop's earlier think blocks from
    ``reasoning_content``); deltatune dropped it, so the prompt lacked the think block vLLM's has."""
    from tiny import smollm2_tokenizer

    from deltatune.serve.prompts import _chat_ids

    tok = smollm2_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content is string %}<think>"
        "{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    want = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "why"},
            {"role": "user", "content": "q2"}]  # fmt: skip
    ids = tok(tok.apply_chat_template(want, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    for key in ("reasoning", "reasoning_content"):
        sent = [want[0], {"role": "assistant", "content": "a", key: "why"}, want[2]]
        assert _chat_ids(tok, sent) == ids["input_ids"]


def test_a_terminals_line_is_read_with_readline_editing(monkeypatch):
    """At a terminal the REPL reads a line with ``input()`` once readline is imported, as LLaMA-Factory's chat (its
    arrow keys edit the line and recall earlier ones); ``sys.stdin.readline()`` took the keys' escape codes into the
    message. Ctrl-D (EOFError) ends the chat on a line of its own, as before."""
    import builtins
    import sys

    from tiny import smollm2_tokenizer

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tok = smollm2_tokenizer()
    ok = tok("ok", add_special_tokens=False)["input_ids"]
    model = _answering(len(tok), [*ok, tok.eos_token_id])
    typed, prompts = iter(["hello", "/base"]), []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        return next(typed)  # (StopIteration past the end: the test's lines are two, then EOF below)

    monkeypatch.setattr(builtins, "input", lambda p: read(p) if len(prompts) < 2 else prompts.append(p) or _eof())
    monkeypatch.setattr(sys, "stdin", Tty("not read\n"))
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert chat.repl(model, tok, max_new_tokens=4) == 0
    shown = sys.stdout.getvalue()
    assert prompts == ["you> ", "you> ", "base> "]
    assert shown.splitlines()[1:] == ["ok", "(adapter off: the base model answers)", ""]


def _eof() -> str:
    raise EOFError


@pytest.mark.parametrize("field", ["tools", "documents", "chat_template_kwargs"])
def test_a_lone_surrogate_outside_the_messages_is_a_400_naming_its_field(field):
    """A client cutting a tool's description mid-emoji sends ``"\ud83d"``: the template renders it and the 400
    named ``messages`` ("the rendered chat (a tool call's arguments, chat_template_kwargs)"), not the field at fault;
    one the template does not render is served (as vLLM: the text it tokenizes holds none)."""
    from tiny import smollm2_tokenizer

    from deltatune.serve.engine import RequestError
    from deltatune.serve.prompts import _chat_ids, _rendering

    tok = smollm2_tokenizer()
    shows = (
        "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}{{ tools[0].function.description }}"
        "{% endif %}{% if documents %}{{ documents[0].text }}{% endif %}{{ note or '' }}"
    )
    messages = [{"role": "user", "content": "hi"}]
    value = {
        "tools": [{"type": "function", "function": {"name": "f", "description": "caf\ud83d"}}],
        "documents": [{"title": "a", "text": "caf\ud83d"}],
        "chat_template_kwargs": {"note": "caf\ud83d"},
    }[field]
    body = {"messages": messages, field: value, **({"tool_choice": "none"} if field == "tools" else {})}
    tok.chat_template = shows
    with pytest.raises(RequestError, match="lone surrogate") as raised:
        _chat_ids(tok, messages, None, _rendering(body, None))
    assert raised.value.param == field
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert _chat_ids(tok, messages, None, _rendering(body, None)) == tok("hi")["input_ids"]
