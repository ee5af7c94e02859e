"""deltatune chat / generate against transformers' ``chat`` and LLaMA-Factory's ``chat``: the tokenizer's EOS ends an
answer as in serve, vLLM and LLaMA-Factory (``get_stop_token_ids``) though the generation config names none; the
REPL's commands as the references name them (``!clear``/``clear``, ``!help``); the prompt each turn renders equals
the tokenizer's ``apply_chat_template`` on the same history."""

from __future__ import annotations

import io

import pytest
import torch
from test_chat_stop_probe14 import _model  # (the tiny Llama whose answer is forced)

from deltatune.train import chat


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "hi", "yo", "\n", "user", "assistant", ":"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split(r"(</s>|\n| |:)", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% endif %}"
        "\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return tok


def test_the_tokenizers_eos_ends_an_answer_though_the_generation_config_names_none():
    """A base whose config.json has no eos_token_id, its run trained on rows ending with the tokenizer's EOS: serve
    (engine.eos_ids), vLLM and LLaMA-Factory (template.get_stop_token_ids: the tokenizer's eos_token_id first) stop
    there; generate ran on to max_new_tokens, the text after the EOS in the answer ("hi hi yo yo yo yo")."""
    tok = _tokenizer()
    hi, eos = tok.convert_tokens_to_ids("hi"), tok.eos_token_id
    ids = chat.prompt_ids(tok, "hi")
    for templated in (False, True):
        assert chat.generate(_model(tok, [hi, hi, eos]), tok, ids, max_new_tokens=6, templated=templated) == "hi hi"
    raw = chat.prompt_ids(tok, "hi", raw=True)  # a prompt sent as text too, as serve's completions
    assert chat.generate(_model(tok, [hi, eos]), tok, raw, max_new_tokens=6) == "hi"
    # the generation config's own EOS still stops it, with the tokenizer's beside
    yo = tok.convert_tokens_to_ids("yo")
    assert chat.generate(_model(tok, [hi, yo], eos=yo), tok, ids, max_new_tokens=6) == "hi yo"  # ("yo": not special)
    assert chat.generate(_model(tok, [hi, eos], eos=yo), tok, ids, max_new_tokens=6) == "hi"


def _answering(vocab: int, answer: list[int]):
    """A tiny Llama of ``vocab`` ids that answers every prompt with ``answer`` (its first id after the prompt's
    forward, then one a step), whatever the history."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    step = {"n": 0}

    def count(_module, inputs):
        step["n"] = 0 if inputs[0].shape[1] > 1 else step["n"] + 1  # (the prompt's forward: a new answer)

    def force(_module, _inputs, logits):
        out = torch.full_like(logits, -1e4)
        out[:, -1, answer[min(step["n"], len(answer) - 1)]] = 0.0
        return out

    model.model.embed_tokens.register_forward_pre_hook(count)
    model.lm_head.register_forward_hook(force)
    return model


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_each_turn_is_apply_chat_template_of_the_history_and_clear_and_help_as_the_references(monkeypatch):
    """SmolLM2's template, a system prompt, a multi-byte turn: each prompt the REPL sends equals the tokenizer's
    apply_chat_template(add_generation_prompt=True) on the history so far (LLaMA-Factory's and transformers chat's
    history). ``/clear`` clears it as transformers chat's ``!clear`` (LLaMA-Factory's ``clear``): it was an
    "unknown command" and the next turn carried the old history; ``/help`` printed "unknown command" too."""
    from tiny import smollm2_tokenizer

    tok = smollm2_tokenizer()
    ok = tok("ok", add_special_tokens=False)["input_ids"]
    model = _answering(len(tok), [*ok, tok.eos_token_id])
    sent, real = [], chat.generate
    monkeypatch.setattr(chat, "generate", lambda m, t, ids, **kw: sent.append(list(ids)) or real(m, t, ids, **kw))
    out = io.StringIO()
    script = "hello\n/help\nhow are you, 日本?\n/clear\nagain\n"
    assert chat.repl(model, tok, system="be brief", stdin=io.StringIO(script), stdout=out, max_new_tokens=4) == 0
    system = {"role": "system", "content": "be brief"}
    turns = [
        [system, {"role": "user", "content": "hello"}],
        [system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "ok"},
         {"role": "user", "content": "how are you, 日本?"}],
        [system, {"role": "user", "content": "again"}],
    ]  # fmt: skip
    want = [list(tok.apply_chat_template(t, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
            for t in turns]  # fmt: skip
    assert sent == want
    lines = out.getvalue().splitlines()
    assert lines == ["ok", f"({chat.HELP})", "ok", "(history cleared)", "ok"]


def test_end_of_input_at_a_terminal_ends_the_line():
    """Ctrl-D at the ``you>`` prompt: the chat ends (0) with a newline, so the shell's prompt is not left after
    "you> " (transformers chat's input, Python's own REPL, print one)."""
    tok = _tokenizer()
    out = io.StringIO()
    assert chat.repl(_answering(len(tok), [tok.eos_token_id]), tok, stdin=_Tty(""), stdout=out) == 0
    assert out.getvalue() == f"deltatune chat: {chat.HELP}\nyou> \n"


def test_a_top_p_for_a_greedy_decode_is_one_line_before_any_model_loads(tmp_path, capsys):
    """``--top-p 0.5`` without ``--temperature``: the answer was greedy and the flag ignored without a word
    (transformers' generate warns that top_p is not valid with do_sample=False; LLaMA-Factory drops it)."""
    from deltatune.cli import main
    from deltatune.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--top-p 0\.5 applies to sampling"):
        chat.check_sampling(8, 0.0, 0.5)
    chat.check_sampling(8, 0.7, 0.5)  # sampling: taken
    capsys.readouterr()
    assert main(["generate", "--adapter", str(tmp_path), "--prompt", "x", "--top-p", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--top-p 0.5 applies to sampling" in err and "Traceback" not in err


def test_a_system_prompt_not_in_utf8_is_refused_before_the_first_message_is_read():
    """``deltatune chat --system`` with bytes that are not UTF-8: one line naming --system before the chat reads a
    message (generate refuses it before any model loads); it read and lost the first message typed, then ended."""
    from deltatune.config import ConfigError

    tok, stdin = _tokenizer(), io.StringIO("hi\n")
    with pytest.raises(ConfigError, match=r"^--system holds bytes that are not UTF-8 text"):
        chat.repl(_answering(len(tok), [tok.eos_token_id]), tok, system="caf\udce9", stdin=stdin, stdout=io.StringIO())
    assert stdin.tell() == 0  # nothing read
