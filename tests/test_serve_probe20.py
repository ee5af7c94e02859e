"""Probe 20 of ``deltatune serve``'s request fields against vLLM's OpenAI server: the tools a chat request renders
into its prompt, as vLLM's pydantic models dump them, and the prompt a row with the same tools trains on."""

from __future__ import annotations

from typing import Any, Literal

import pytest

from deltatune.serve.prompts import _chat_ids, _tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}}


def _vllm_dump(tools: list[dict]) -> list[dict]:
    """vLLM's ``[tool.model_dump() for tool in request.tools]``: its ChatCompletionToolsParam and FunctionDefinition
    (protocol.py), OpenAIBaseModel's ``extra="allow"`` keeping the keys it does not declare, after its own."""
    from pydantic import BaseModel, ConfigDict

    class OpenAIBaseModel(BaseModel):
        model_config = ConfigDict(extra="allow")

    class FunctionDefinition(OpenAIBaseModel):
        name: str
        description: str | None = None
        parameters: dict[str, Any] | None = None

    class ChatCompletionToolsParam(OpenAIBaseModel):
        type: Literal["function"] = "function"
        function: FunctionDefinition

    return [ChatCompletionToolsParam.model_validate(t).model_dump() for t in tools]


def test_a_tools_own_keys_reach_the_template_as_vllms_pydantic_dump():
    """vLLM's OpenAIBaseModel allows extra keys and dumps them after its own, the tool's beside ``type`` and
    ``function`` too (a client's ``"strict": true`` there): deltatune dropped the tool's, so a template that prints
    each tool (Qwen2.5's and Llama 3.1's tojson) rendered another prompt than vLLM's. The function's own extra keys,
    a left-out description or parameters (null) and the key order were already vLLM's."""
    tools = [
        {"function": {"parameters": WEATHER, "name": "get_weather", "strict": True}, "strict": True},
        {"type": "function", "function": {"name": "now", "description": "the time"}, "x-origin": {"a": [1, None]}},
        {"function": {"description": None, "name": "plain"}, "type": "function"},
    ]
    served = _tools({"tools": tools, "tool_choice": "none"})
    assert served == _vllm_dump(tools)
    assert [list(t) for t in served] == [list(t) for t in _vllm_dump(tools)]  # key order: tojson prints it
    assert [list(t["function"]) for t in served] == [list(t["function"]) for t in _vllm_dump(tools)]


def _qwen_tokenizer():
    from tiny import tokenizer, trl_template

    tok = tokenizer()
    tok.chat_template = trl_template("qwen2_5")  # prints each tool with tojson
    return tok


def test_a_row_with_tools_trains_on_the_prompt_a_served_request_with_them_gets():
    """A row whose tool schema leaves out its description (LLaMA-Factory's flat {name, parameters}, glaive's) trained
    on a prompt without ``"description": null``, which vLLM and deltatune serve render for the same tools (6 tokens
    more on Qwen2.5's template): the served prompt was not the trained one. row_tools now renders a
    schema as vLLM dumps it."""
    from deltatune.data.load import Row
    from deltatune.data.templates import encode_chat
    from deltatune.data.tools import row_tools

    tok = _qwen_tokenizer()
    flat = {"parameters": WEATHER, "name": "get_weather"}
    rows = [[flat], [{"type": "function", "function": flat}], [{"function": {"name": "now"}, "type": "function"}]]
    question = [{"role": "user", "content": "weather in Paris?"}]
    for tools in rows:
        schemas = row_tools(Row({"tools": tools}, "f.jsonl:1"), "tools")
        ids, labels = encode_chat([*question, {"role": "assistant", "content": "sunny"}], tok, None, tools=schemas)
        prompt = ids[: next(i for i, label in enumerate(labels) if label != -100)]
        wrapped = [t if "function" in t else {"type": "function", "function": t} for t in tools]
        served = _chat_ids(tok, question, None, {"tools": _tools({"tools": wrapped, "tool_choice": "none"})})
        vllm = tok(tok.apply_chat_template(question, tools=_vllm_dump(wrapped), add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"]  # fmt: skip
        assert served == vllm
        assert prompt == served, tools


TEXTS = (
    "I like 😀 a lot",
    "日本語のテキスト です",
    "naïve café 🇫🇷 flag",
    "x 👩\u200d👩\u200d👧 family",
    "Ελληνικά και 中文",
)


def test_an_answer_completing_a_character_the_prompt_ids_began_is_that_character_as_vllms_decoder():
    """A prompt of token ids that ends inside a character (a byte-level BPE's emoji split over two tokens, the prompt
    cut between them): vLLM's DecodeStream, primed with the prompt, gives the answer's first text as that character
    whole (its first bytes the prompt's, the space before it too); deltatune decoded the answer alone, U+FFFD. Every
    cut of a few texts on SmolLM2's tokenizer, each step's text extending the one before (a stream sends each)."""
    from test_serve_probe11 import _smol, _vllm_text

    from deltatune.serve.detok import Detokenizer

    tok = _smol()
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for cut in range(1, len(ids)):
            prompt, answer = ids[:cut], ids[cut:]
            detok = Detokenizer(tok, prompt)
            steps = [detok.text(answer[: i + 1]) for i in range(len(answer))]
            assert steps[-1] == _vllm_text(tok, prompt, answer), (text, cut)
            assert all(b.startswith(a.rstrip("\ufffd")) for a, b in zip(steps, steps[1:])), (text, cut)


def test_a_completion_of_prompt_ids_cut_mid_character_answers_the_character_streamed_or_not():
    """Through the app: prompt ids "I like" and the emoji's first token, the answer forced to its last one
    (allowed_token_ids): vLLM answers " 😀" (the text its primed decoder gives), deltatune answered U+FFFD."""
    from test_serve_probe11 import _call, _serve, _smol, _vllm_text

    tok = _smol()
    ids = tok("I like 😀", add_special_tokens=False)["input_ids"]
    engine, app = _serve(tok)
    try:
        body = {"model": "base", "prompt": ids[:-1], "max_tokens": 1, "allowed_token_ids": ids[-1:], "temperature": 0}
        want = _vllm_text(tok, ids[:-1], ids[-1:])
        assert want == " 😀"
        status, answer = _call(app, "/v1/completions", body)
        assert status == 200 and answer["choices"][0]["text"] == want
        status, chunks = _call(app, "/v1/completions", {**body, "stream": True})
        assert status == 200 and "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want
    finally:
        engine.close()


def _narrow_engine(tok, vocab: int):
    """A tiny Llama whose embeddings hold ``vocab`` rows, served with ``tok`` (a tokenizer of another length)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.model import DeltaModel
    from deltatune.serve.app import create_app
    from deltatune.serve.engine import Engine

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    engine = Engine(DeltaModel(LlamaForCausalLM(config).eval(), fused_loss=False), tok, max_wait_s=0.001)
    return engine, create_app(engine, max_tokens=64)


def test_a_prompt_id_past_the_models_embeddings_is_a_400_not_its_batchs_500():
    """A tokenizer longer than the model's embeddings (added tokens, no resize): a prompt id between the two passed
    the tokenizer's bound and failed the batch's prefill (IndexError: a 500 for every row in it); vLLM's processor
    refuses an id "out of vocabulary" first. Now a 400 naming the prompt (the messages, for a chat), nothing run."""
    from test_serve_probe11 import _call, _smol

    tok = _smol()
    engine, app = _narrow_engine(tok, len(tok) - 100)
    try:
        for prompt in ([1, 2, len(tok) - 50], [[1, 2], [3, len(tok) - 100]]):
            status, answer = _call(app, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
            assert status == 400 and answer["error"]["param"] == "prompt", answer
            assert (
                f"token id {len(tok) - 50 if len(prompt) == 3 else len(tok) - 100} is out of"
                in answer["error"]["message"]
            )
        assert engine.batches == 0
        assert _call(app, "/v1/completions", {"prompt": [1, 2, len(tok) - 101], "max_tokens": 2})[0] == 200
    finally:
        engine.close()


def test_prompt_ids_may_reach_the_models_vocabulary_past_the_tokenizers_as_vllm():
    """vLLM bounds a prompt's ids by the larger of the tokenizer's and the model's vocabulary (Qwen's embeddings hold
    more rows than its tokenizer has tokens): ``_prompt_ids`` takes the model's (the app passes it: the lead's diff
    in app.py); the tokenizer's length alone bounds them where the model's is not given."""
    from test_serve_probe11 import _smol

    from deltatune.serve.engine import RequestError
    from deltatune.serve.prompts import _prompt_ids

    tok = _smol()
    assert _prompt_ids(tok, [1, len(tok) + 5], True, len(tok) + 6) == [1, len(tok) + 5]
    for vocab in (0, len(tok) + 5):
        with pytest.raises(RequestError, match=r"must lie in \[0, "):
            _prompt_ids(tok, [1, len(tok) + 5], True, vocab)


def _vllm_corrected(tok, token: int, context: list[int]) -> str:
    """vLLM's LogprobsProcessor._correct_decoded_token (v1/engine/logprobs.py), as written there."""
    for num_ctx in range(1, min(len(context), 4) + 1):
        ctx = context[-num_ctx:]
        full = tok.decode(ctx + [token])
        if full.endswith("\ufffd"):
            continue
        clean_end = len(ctx)
        for j in range(len(ctx) - 1, -1, -1):
            if tok.decode([ctx[j]]).endswith("\ufffd"):
                clean_end = j
            else:
                break
        prefix = tok.decode(ctx[:clean_end]) if clean_end > 0 else ""
        if full.startswith(prefix):
            return full[len(prefix) :]
        common = 0
        for a, b in zip(prefix, full):
            if a != b:
                break
            common += 1
        return full[common:]
    return ""


def test_prompt_logprobs_name_a_character_split_over_prompt_tokens_as_vllm():
    """vLLM's prompt_logprobs name each token decoded alone, except one that decodes to U+FFFD: corrected in the
    context of the prompt tokens before it (its _verify_tokens, the first prompt token's null row not counted): ""
    for a character's first pieces, the whole character for its last. deltatune named both pieces of the emoji
    U+FFFD. SmolLM2's tokenizer splits 😀 over two tokens; every entry (the prompt token and its top 3) checked."""
    from test_serve_probe11 import _call, _serve, _smol

    tok = _smol()
    engine, app = _serve(tok)
    try:
        body = {"model": "base", "prompt": "I like 😀 a lot", "max_tokens": 1, "prompt_logprobs": 3}
        status, answer = _call(app, "/v1/completions", body)
    finally:
        engine.close()
    assert status == 200
    ids, rows = tok(body["prompt"])["input_ids"], answer["choices"][0]["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(ids)
    own = [rows[i][str(t)]["decoded_token"] for i, t in enumerate(ids) if i]
    assert own == [" like", "", " 😀", " a", " lot"]  # by hand: vLLM's names add up to the prompt's text
    for i in range(1, len(ids)):
        for t, entry in rows[i].items():
            plain = tok.decode([int(t)])
            want = _vllm_corrected(tok, int(t), ids[1:i][-4:]) if plain.endswith("\ufffd") else plain
            assert entry["decoded_token"] == want, (i, t)
