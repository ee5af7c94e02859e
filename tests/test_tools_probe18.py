"""Tool-calling conversations in the chat command and the run's before/after samples, against transformers'
``apply_chat_template`` with ``tools=`` (a Qwen2.5-style template, written here as a small jinja string)."""

from __future__ import annotations

import json

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
    assert chat.generate(model, tok, ids, max_new_tokens=8) == "hi hi"
    assert chat._turn_end_id(tok) == im_end
    tok.chat_template = None  # no chat template: the generation config's stops alone, as before
    assert chat.generate(_model(tok, [hi, sp, hi, im_end]), tok, ids, max_new_tokens=8) == "hi hi" + "yo" * 4


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
