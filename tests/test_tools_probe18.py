"""Tool-calling conversations in the chat command and the run's before/after samples, against transformers'
``apply_chat_template`` with ``tools=`` (a Qwen2.5-style template, written here as a small jinja string)."""

from __future__ import annotations

import json

import torch

from tests.tiny import tokenizer

QWEN_TOOLS = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
    "tools": TOOLS,
}


def _tok():
    tok = tokenizer()
    tok.chat_template = QWEN_TOOLS
    return tok


def test_run_samples_prompt_a_tool_conversation_as_apply_chat_template_renders_it(tmp_path):
    """eval_prompts kept role and content only: the earlier assistant turn's tool call and the row's tool schemas
    were dropped, so the run's before/after samples prompted the model with a conversation it never trained on."""
    from deltatune.train.chat import eval_prompts, prompt_ids
    from deltatune.train.config import build

    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(TOOL_ROW) + "\n")
    cfg = build({"stage": "sft", "data": {"train": str(path)}})
    (prompt,) = eval_prompts(cfg, 1)
    tok = _tok()
    want_messages = [{**m, "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
                     if m.get("tool_calls") else m for m in TOOL_ROW["messages"][:-1]]  # fmt: skip
    want = tok.apply_chat_template(want_messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tool_call>get_weather" in want and "Tools: get_weather" in want
    assert tok.decode(prompt_ids(tok, prompt)) == tok.decode(tok(want, add_special_tokens=False)["input_ids"])
    assert prompt_ids(tok, prompt) == tok(want, add_special_tokens=False)["input_ids"]


def _split_marker_tokenizer():
    """No EOS, and chatml's ``<|im_end|>`` is three tokens (``<|``, ``im_end``, ``|>``), as in a tokenizer that never
    added it as a special token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<|", "|>", "im_start", "im_end", "user", "assistant", "hi", "yo", "\n", " "]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.decoder = decoders.Fuse()  # (decoded as written, as a byte-level BPE's)
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\||\|>|\n| "), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>")
    assert tok.eos_token_id is None and len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) == 3
    return tok


def test_chat_stops_on_a_multi_token_chatml_end_marker_when_the_tokenizer_has_no_eos():
    """A run trained under the built-in chatml, a tokenizer with no EOS and ``<|im_end|>`` not one token: its answers
    end with the marker's tokens, but generate had no stop id for it (templates.stop_ids gives single tokens only) and
    ran to max_new_tokens, the marker and what followed decoded into the answer; it stops on the marker's text now
    (as transformers' ``stop_strings`` would), the marker left out of the answer."""
    from deltatune.train import chat
    from tests.test_chat_stop_probe14 import _model

    tok = _split_marker_tokenizer()
    want = tok("hi hi<|im_end|>\n", add_special_tokens=False)["input_ids"]
    ids = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    stopped = chat.generate(_model(tok, want), tok, ids, max_new_tokens=12, template="chatml")
    assert stopped == "hi hi"
    ran_on = chat.generate(_model(tok, want), tok, ids, max_new_tokens=12)  # the tokenizer's own template: no stop
    assert ran_on.startswith("hi hi<|im_end|>\nyoyo")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_stops_on_the_chat_templates_end_of_turn_token_beside_the_generation_configs_eos():
    """A model tuned through its tokenizer's own chatml template (the tokenizer's EOS another token, as Qwen2.5's base:
    <|endoftext|>) ends its answers with <|im_end|>; chat ran past it to max_new_tokens (the generation config stops
    on the EOS alone), as LLaMA-Factory's stop words would not. Hand-worked: the answer is the two words."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deltatune.train import chat
    from tests.test_chat_stop_probe14 import _model

    words = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "yo", "\n", " "]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_start\|>|<\|im_end\|>|\n| "), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    hi, sp, im_end = (tok.convert_tokens_to_ids(w) for w in ("hi", " ", "<|im_end|>"))
    model = _model(tok, [hi, sp, hi, im_end])
    model.generation_config.eos_token_id = tok.eos_token_id  # (<|endoftext|>)
    ids = chat.prompt_ids(tok, "hi")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.generate(model, tok, ids, max_new_tokens=8, templated=chat.chat_templated(tok)) == "hi hi"
    assert chat._turn_end_id(tok) == im_end
    tok.chat_template = None  # no chat template: the generation config's stops alone, as before
    ran_on = chat.generate(_model(tok, [hi, sp, hi, im_end]), tok, ids, max_new_tokens=8, templated=True)
    assert ran_on == "hi hi" + "yo" * 4


DEEPSEEK_STYLE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls %}<call>"
    "{%- for t in m.tool_calls %}{{ t.function.name + '\\n```json\\n' + t.function.arguments + '\\n```' }}{%- endfor %}"
    "</call>{%- else %}<{{ m.role }}>{{ m.content }}{%- endif %}{%- endfor %}"
)


def test_a_template_that_joins_the_arguments_as_text_trains_as_transformers_renders_openais_string():
    """DeepSeek-V3's template joins a call's arguments to text ('...' + arguments): transformers renders OpenAI's
    rows (arguments a JSON string) with it; deltatune parses them to a dict for the other templates, and refused
    every tool row ("can only concatenate str (not "dict") to str")."""
    from deltatune.data.encode import sft_example
    from deltatune.data.formats import read_samples
    from deltatune.data.load import Row

    tok = _tok()
    tok.chat_template = DEEPSEEK_STYLE
    (s,) = read_samples([Row(TOOL_ROW, "f.jsonl:1")], {}, stage="sft")
    ids, _ = sft_example(s, tok, None)
    assert ids == list(tok.apply_chat_template(TOOL_ROW["messages"], tokenize=True, return_dict=True)["input_ids"])


# ---- the reviewer's findings on the three commits above (probe 18, second pass) ----


def _chatml_tokenizer(template: str = CHATML):
    """<|im_start|> / <|im_end|> special tokens, the EOS another (<|endoftext|>, as Qwen2.5's base), a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hi", "yo"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*words, "\n", " "])}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_start\|>|<\|im_end\|>|\n| "), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def _scripted(tok, answer: list[int]):
    """A tiny Llama whose greedy answer to any prompt is ``answer`` then "yo" forever (each prompt afresh: the
    script restarts at a prompt's forward, so compare's base and adapter answers are the same); ``.steps`` counts
    the tokens it wrote."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.steps = 0

    def restart(_module, inputs):
        if inputs[0].shape[1] > 1:  # a prompt's forward: the answer starts again
            model.steps = 0

    def force(_module, _inputs, logits):
        out = torch.full_like(logits, -1e4)
        want = answer[model.steps] if model.steps < len(answer) else tok.convert_tokens_to_ids("yo")
        out[:, -1, want] = 0.0
        model.steps += 1
        return out

    model.model.embed_tokens.register_forward_pre_hook(restart)
    model.lm_head.register_forward_hook(force)
    return model


def test_the_turn_end_stop_is_for_prompts_the_tokenizers_chat_template_rendered_alone(tmp_path):
    """e1fce78 stopped on the template's <|im_end|> whenever generate had no built-in template: a --raw prompt, a
    stage-pt run's samples (raw text) and compare's base answer under data.template=chatml were cut there too,
    though their prompt never went through the tokenizer's template (a pt run on chat transcripts: every sample
    ended at the first <|im_end|>). Hand-worked: the script is 'hi hi<|im_end|>' then 'yo' to max_new_tokens (a prompt of
    one token would not restart _scripted's script: "hi hi")."""
    from deltatune.train import chat
    from deltatune.train.config import build

    tok = _chatml_tokenizer()
    hi, sp, im_end = (tok.convert_tokens_to_ids(w) for w in ("hi", " ", "<|im_end|>"))
    model = _scripted(tok, [hi, sp, hi, im_end])
    ran_on, stopped = "hi hi" + "yo" * 4, "hi hi"  # (8 new tokens; <|im_end|> decodes to nothing)
    assert [r["adapter"] for r in chat.compare(model, tok, ["hi hi"], raw=True, max_new_tokens=8)] == [ran_on]
    assert chat.compare(model, tok, ["hi hi"], max_new_tokens=8)[0] == {"prompt": "hi hi", "base": stopped,
                                                                      "adapter": stopped}  # fmt: skip
    # under the run's built-in chatml (which trained the EOS, <|endoftext|>, after each answer: stop_ids) the base
    # is not cut by the tokenizer's template either, which did not render its prompt
    row = chat.compare(model, tok, ["hi hi"], template="chatml", max_new_tokens=8)[0]
    assert (row["base"], row["adapter"]) == (ran_on, ran_on)
    ids = chat.prompt_ids(tok, "hi hi", raw=True)
    assert chat.generate(model, tok, ids, max_new_tokens=8) == ran_on  # (cli's --raw: no flag)
    assert chat.generate(model, tok, ids, max_new_tokens=8, templated=True) == stopped
    own = chat.chat_templated
    assert own(tok) and not own(tok, raw=True) and not own(tok, template="chatml")
    # a stage-pt run's samples: its text's opening as it is, answered to sample_tokens
    path = tmp_path / "pt.jsonl"
    path.write_text(json.dumps({"text": "hi hi"}) + "\n")
    cfg = build({"stage": "pt", "data": {"train": str(path)}, "output": {"samples": 1, "sample_tokens": 8}})
    assert chat.run_samples(model, tok, cfg) == [{"prompt": "hi hi", "base": ran_on, "adapter": ran_on}]
    # chat's loop: --raw lines run on, templated lines stop
    import io

    out = io.StringIO()
    chat.repl(model, tok, raw=True, stdin=io.StringIO("hi hi\n"), stdout=out, max_new_tokens=8)
    assert out.getvalue() == ran_on + "\n"
    out = io.StringIO()
    chat.repl(model, tok, stdin=io.StringIO("hi hi\n"), stdout=out, max_new_tokens=8)
    assert out.getvalue() == stopped + "\n"


def test_the_turn_end_token_of_a_template_that_wants_a_system_message():
    """_turn_end_id rendered a user/assistant exchange alone: a template that raises without a system message gave
    no end-of-turn stop; it retries with a system turn first."""
    from deltatune.train import chat

    needs_system = "{% if messages[0].role != 'system' %}{{ raise_exception('a system message first') }}{% endif %}"
    tok = _chatml_tokenizer(needs_system + CHATML)
    assert chat._turn_end_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    tok.chat_template = "{{ raise_exception('no') }}"  # (a template that renders nothing: none, as before)
    assert chat._turn_end_id(tok) is None


def _finer_marker_tokenizer():
    """As _split_marker_tokenizer (no EOS, <|im_end|> three tokens as encoded), with finer pieces a model may write
    the marker in ('<', '|', 'im', '_', 'end', '|', '>': seven tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<|", "|>", "im_start", "im_end", "user", "assistant", "hi", "yo", "\n", " "]
    words += ["<", "|", ">", "im", "_", "end"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.decoder = decoders.Fuse()
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\||\|>|\n| "), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>")
    assert tok.eos_token_id is None and len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) == 3
    return tok


def test_the_text_stop_sees_a_marker_written_in_more_tokens_than_its_own_encoding():
    """_stop_on_text looked at the marker's token count + 2 (5) last tokens: a model writing <|im_end|> in seven
    pieces was never stopped and ran to max_new_tokens (the answer trimmed after). Hand-worked: it stops after the
    marker's last piece, the 3 + 7th token."""
    from deltatune.train import chat

    tok = _finer_marker_tokenizer()
    pieces = ["hi", " ", "hi", "<", "|", "im", "_", "end", "|", ">", "\n"]
    model = _scripted(tok, [tok.convert_tokens_to_ids(p) for p in pieces])
    model.generation_config.eos_token_id = None
    ids = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert chat.generate(model, tok, ids, max_new_tokens=30, template="chatml") == "hi hi"
    assert model.steps == 10  # (30 before: to max_new_tokens)


def test_the_text_stop_of_an_encoder_decoder_reads_its_decoder_from_the_start():
    """An encoder-decoder's stopping criteria see the decoder's ids, not the prompt's: the window started at the
    prompt's length, past an answer shorter than the prompt, and never stopped."""
    from transformers import T5Config, T5ForConditionalGeneration

    from deltatune.train import chat

    tok = _finer_marker_tokenizer()
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)  # fmt: skip
    model = T5ForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None
    answer = [tok.convert_tokens_to_ids(p) for p in ["hi", "<|", "im_end", "|>", "\n"]]
    model.steps = 0

    def force(_module, _inputs, logits):
        out = torch.full_like(logits, -1e4)
        out[:, -1, answer[model.steps] if model.steps < len(answer) else tok.convert_tokens_to_ids("yo")] = 0.0
        model.steps += 1
        return out

    model.lm_head.register_forward_hook(force)
    ids = tok("<|im_start|>user\nhi hi hi hi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert chat.generate(model, tok, ids["input_ids"], max_new_tokens=20, template="chatml") == "hi"
    assert model.steps == 4  # (20 before)


def test_the_samples_prompt_of_a_conversation_ending_on_a_tool_result_shows_the_result():
    """Two samples of one tool row (its first user turn, and after the tool's result) both showed the user's
    message in the table's prompt column; the second now names the tool result it answers (its first 80
    characters)."""
    from deltatune.train import chat

    tok = _chatml_tokenizer(QWEN_TOOLS)
    model = _scripted(tok, [tok.convert_tokens_to_ids("hi")])
    long = "sunny " * 20
    after = chat.Conversation([*TOOL_ROW["messages"][:2], {"role": "tool", "tool_call_id": "c1", "content": long}])
    rows = chat.compare(model, tok, [TOOL_ROW["messages"][:1], after], max_new_tokens=1)
    assert [r["prompt"] for r in rows] == ["Weather in Paris?",
                                           f"Weather in Paris? (after the tool result: {long[:80]})"]  # fmt: skip


def test_deltatune_generate_stops_at_the_turn_end_of_a_templated_prompt_and_not_of_a_raw_one(tmp_path, monkeypatch,
                                                                                            capsys):  # fmt: skip
    """`deltatune generate` calls chat.generate itself: the turn-end stop needs its templated flag (--raw: none)."""
    from deltatune import cli
    from deltatune.train import run_load, runs

    tok = _chatml_tokenizer()
    hi, sp, im_end = (tok.convert_tokens_to_ids(w) for w in ("hi", " ", "<|im_end|>"))
    monkeypatch.setattr(run_load, "run_task", lambda _path: ("CAUSAL_LM", "sft"))
    monkeypatch.setattr(run_load, "load_generator", lambda *a: (_scripted(tok, [hi, sp, hi, im_end]), tok))
    monkeypatch.setattr(runs, "run_template", lambda _path: None)
    answers = []
    for raw in ([], ["--raw"]):
        assert (
            cli.main(["generate", "--adapter", str(tmp_path), "--prompt", "hi hi", "--max-new-tokens", "8", *raw]) == 0
        )
        answers.append(capsys.readouterr().out)
    assert answers == ["hi hi\n", "hi hi" + "yo" * 4 + "\n"]
