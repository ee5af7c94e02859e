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


def test_a_tokenizers_cleanup_takes_back_no_streamed_text():
    """MiniLM's WordPiece with clean_up_tokenization_spaces on (a WordPiece / Unigram tokenizer_config's, transformers'
    clean_up_tokenization): " ' " and " n't" take a blank back once the next token comes, so the stream holds the
    end " '" / " n" until then; the REPL printed "he said '" and stopped (the answer "he said'yes'and left"). A cleanup
    the stream cannot foresee (a tokenizer's own clean_up_tokenization) ends the line and prints the answer again,
    not a cut answer."""
    from tiny import tokenizer

    tok = tokenizer()
    tok.clean_up_tokenization_spaces = True
    for said in ("he said ' yes ' and left", "i do n't know , it ' s fine"):
        ids = tok(said, add_special_tokens=False)["input_ids"]
        want = tok.decode(ids, skip_special_tokens=True)  # transformers' cleaned text: "he said'yes'and left"
        assert "' " not in want and " n'" not in want
        out = io.StringIO()
        model = _answering(len(tok), [*ids, tok.sep_token_id])
        assert chat.repl(model, tok, stdin=io.StringIO("hi there\n"), stdout=out, max_new_tokens=20) == 0
        assert out.getvalue() == want + "\n"
    tok.clean_up_tokenization = lambda text: text.replace(" - ", "-")  # (one of its own, not transformers')
    ids = tok("a - b", add_special_tokens=False)["input_ids"]
    pieces: list[str] = []
    model = _answering(len(tok), [*ids, tok.sep_token_id])
    answer = chat.generate(model, tok, tok("hi")["input_ids"], max_new_tokens=8, stream=pieces.append)
    assert answer == tok.decode(ids) == "a-b"
    assert "".join(pieces) == "a -\na-b"


def test_an_encoder_decoders_answer_is_what_textstreamer_prints():
    """A tiny BART (its decoder starts on id 2) with MiniLM's tokenizer, where id 2 is "[unused1]", not special:
    transformers' TextStreamer(skip_prompt=True) skips the decoder's start token, as the stream did, while the answer
    decoded it ("[unused1] ..."), so stream and answer differed; the answer is now the tokens after it."""
    import torch
    from tiny import tiny_model, tokenizer
    from transformers import TextStreamer

    tok = tokenizer()
    model = tiny_model("bart", "seq2seq", vocab_size=len(tok)).eval()
    ids = tok("hello there")["input_ids"]
    assert model.generation_config.decoder_start_token_id == 2 and 2 not in tok.all_special_ids
    printed: list[str] = []
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    streamer.on_finalized_text = lambda text, stream_end=False: printed.append(text)
    torch.manual_seed(0)
    with torch.no_grad():  # (sampled: greedy, this untrained BART writes its EOS, id 2, at once)
        model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       max_new_tokens=12, do_sample=True, temperature=1.2, streamer=streamer,
                       pad_token_id=tok.pad_token_id)  # fmt: skip
    pieces: list[str] = []
    answer = chat.generate(model, tok, ids, max_new_tokens=12, temperature=1.2, seed=0, stream=pieces.append)
    assert len(answer.split()) > 5
    assert answer == "".join(printed).strip() and not answer.startswith("[unused1]")
    assert "".join(pieces) == answer


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
    """vLLM's _parse_chat_message_content: an assistant message's ``reasoning`` goes to the chat template under both
    names (Qwen3's template writes a tool loop's earlier think blocks from ``reasoning_content``), "" as it is;
    deltatune dropped it, so the prompt lacked the think block vLLM's has. deltatune also reads the older
    ``reasoning_content`` where ``reasoning`` is null or left out (vLLM does not: vllm-project/vllm#38488); a bad
    value's error names the key it came from."""
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
    empty = [want[0], {**want[1], "reasoning_content": ""}, want[2]]  # (it rendered no think block for "")
    ids = tok(tok.apply_chat_template(empty, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    for given in ({"reasoning": ""}, {"reasoning": "", "reasoning_content": "old"}, {"reasoning": None,
                  "reasoning_content": ""}):  # fmt: skip
        assert _chat_ids(tok, [want[0], {"role": "assistant", "content": "a", **given}, want[2]]) == ids["input_ids"]
    from deltatune.serve.engine import RequestError

    with pytest.raises(RequestError, match=r"messages\[1\]\.reasoning_content must be a string, got 5"):
        _chat_ids(tok, [want[0], {"role": "assistant", "content": "a", "reasoning_content": 5}, want[2]])


def test_a_terminals_line_is_read_with_readline_editing(monkeypatch):
    """At a terminal the REPL reads a line with ``input()`` once readline is imported, as LLaMA-Factory's chat (its
    arrow keys edit the line and recall earlier ones); ``sys.stdin.readline()`` took the keys' escape codes into the
    message. Ctrl-D (EOFError) ends the chat on a line of its own, as before. readline is imported by the REPL (it
    is dropped from sys.modules first; where the platform has it)."""
    import builtins
    import importlib.util
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
    monkeypatch.delitem(sys.modules, "readline", raising=False)
    assert chat.repl(model, tok, max_new_tokens=4) == 0
    assert ("readline" in sys.modules) == (importlib.util.find_spec("readline") is not None)
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


def test_a_lone_surrogate_is_blamed_on_the_field_the_template_rendered_it_from():
    """A tool's description and a tool call's arguments both hold "\ud83d", the template renders the arguments alone:
    the 400 named ``tools`` (the first field holding one), which the template never rendered; it names ``messages``,
    found by rendering again with each field's surrogates replaced. The tools rendered too: ``tools``."""
    from tiny import smollm2_tokenizer

    from deltatune.serve.engine import RequestError
    from deltatune.serve.prompts import _chat_ids, _rendering

    tok = smollm2_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.x }}"
        "{% endif %}{% endfor %}{% if show %}{{ tools[0].function.description }}{% endif %}"
    )
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": "caf\\ud83d"}'}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c", "content": "ok"}]  # fmt: skip
    tools = [{"type": "function", "function": {"name": "f", "description": "caf\ud83d"}}]
    for show, blamed in ((False, "messages"), (True, "tools")):
        body = {"messages": messages, "tools": tools, "tool_choice": "none", "chat_template_kwargs": {"show": show}}
        with pytest.raises(RequestError, match="lone surrogate") as raised:
            _chat_ids(tok, messages, None, _rendering(body, None))
        assert raised.value.param == blamed
