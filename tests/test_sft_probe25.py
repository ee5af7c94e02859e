"""Probe 25 (chat / SFT encoding): the built-in chatml template and SmolLM2's own chat template (chatml too) give the
same ids as the tokenizer's apply_chat_template, for training rows and for a generation prompt."""

from __future__ import annotations

import pytest
import tiny

from deltatune.data.encode import encode_sft_samples
from deltatune.data.formats import read_samples
from deltatune.data.load import Row
from deltatune.train.chat import prompt_ids

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "More?"},
    {"role": "assistant", "content": "Sure."},
]


@pytest.fixture(scope="module")
def tok():
    return tiny.smollm2_tokenizer()


def _ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


@pytest.mark.parametrize("template", [None, "chatml"])
def test_generation_prompt_keeps_the_conversations_own_system(tok, template):
    # A conversation with its own system prompt and --system: the tokenizer's path keeps the conversation's own; the
    # built-in template wrote both (two system turns) before.
    ref = _ids(tok, CONV[:2], add_generation_prompt=True)
    assert prompt_ids(tok, CONV[:2], system="Another.", template=template) == ref
    assert prompt_ids(tok, CONV[1:2], system="Be brief.", template=template) == ref


@pytest.mark.parametrize("template", [None, "chatml"])
def test_sft_ids_and_labels_match_apply_chat_template(tok, template):
    ex = encode_sft_samples(read_samples([Row({"messages": CONV}, "t:1")], {}, stage="sft"), tok, template, 512)
    ex = ex.examples[0]
    assert ex["input_ids"] == _ids(tok, CONV)
    # Trained: each answer through its <|im_end|>\n, what the chat template adds after its generation prompt.
    want = [-100] * len(ex["input_ids"])
    for k in (3, 5):
        a, b = len(_ids(tok, CONV[: k - 1], add_generation_prompt=True)), len(_ids(tok, CONV[:k]))
        want[a:b] = ex["input_ids"][a:b]
    assert ex["labels"] == want


# LLaMA-Factory's alpaca (deltatune's built-in "alpaca": its default system, each answer closed by the EOS and a
# blank line) as a jinja chat template, so that transformers' continue_final_message can be applied to it.
ALPACA = (
    "{% if not (messages and messages[0]['role'] == 'system' and messages[0]['content']) %}"
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "{% endif %}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def test_a_final_assistant_turn_goes_on(tok):
    """transformers' continue_final_message (its text-generation pipeline's default for a conversation ending with
    an assistant turn): the prefill stays open, through a built-in template as through the tokenizer's, and as PPO's
    prompt (encode.prompt_ids) continues it. The built-in path cut the text at the content's last match, which may
    lie in the EOS after it: '' and '\n' came back closed, '<' doubled, 'd' and 'e' cut inside <|im_end|>."""
    from deltatune.data.encode import prompt_ids as ppo_prompt_ids
    from deltatune.data.sample import Sample
    from deltatune.data.templates import ChatTemplateError, render

    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(conv, chat_template=ALPACA, tokenize=False) == render(conv, tok, "alpaca")[0]
    cases = [(t, c) for c in ("Sure, ", "", "\n", "<", "d", "e") for t in (None, "chatml")] + [("alpaca", "e")]
    for template, content in cases:
        prefill = [*CONV[:2], {"role": "assistant", "content": content}]
        ref = _ids(tok, prefill, continue_final_message=True, chat_template=ALPACA if template == "alpaca" else None)
        assert prompt_ids(tok, prefill, template=template) == ref, (template, content)
        assert ppo_prompt_ids(Sample("t:1", "prompt_only", prefill), tok, template, 512) == ref, (template, content)
    with pytest.raises(ChatTemplateError, match=r"messages\[2\]\.content: data.template=chatml renders text"):
        prompt_ids(
            tok, [*CONV[:2], {"role": "assistant", "content": [{"type": "text", "text": "Sure, "}]}], template="chatml"
        )


# A chat template that writes an assistant turn's text only where more follows (the final one left out)
DROPS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' or not loop.last %}"
    "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
)


def test_a_final_message_the_chat_template_leaves_out_is_refused_in_one_line(tok, monkeypatch):
    """A chat template that does not write the final assistant message (this one writes an assistant turn's text
    only where more follows): transformers' ValueError, many lines with the whole rendered chat, came through raw."""
    from deltatune.config import ConfigError

    monkeypatch.setattr(tok, "chat_template", DROPS)
    prefill = [*CONV[:2], {"role": "assistant", "content": "Sure, "}]
    with pytest.raises(ValueError, match="continue_final_message"):
        _ids(tok, prefill, continue_final_message=True)  # (transformers refuses it too)
    with pytest.raises(ConfigError, match=r"^messages\[2\]: the chat template does not write") as err:
        prompt_ids(tok, prefill)
    assert "\n" not in str(err.value)


def test_grpo_ppo_chat_and_serve_continue_a_prefill_alike_and_refuse_it_in_one_line(tok, monkeypatch):
    """GRPO's, PPO's and chat's prompts for a final assistant message all equal transformers' continue_final_message
    (under chatml and under the tokenizer's template); a chat template that leaves that message out is one line naming
    the row (PPO, GRPO) or the message (serve), where transformers' ValueError, the whole rendered chat in it, came
    through as it is (review 25 of 71d96f9: the one line was chat's alone, GRPO had a copy of PPO's rendering)."""
    from deltatune.config import ConfigError
    from deltatune.data.encode import prompt_ids as ppo_ids
    from deltatune.data.sample import Sample
    from deltatune.serve.engine import RequestError
    from deltatune.serve.prompts import _chat_ids, _rendering
    from deltatune.train.grpo import encode_prompts

    prefill = [*CONV[:2], {"role": "assistant", "content": "Sure, "}]
    ref = _ids(tok, prefill, continue_final_message=True)
    for template in (None, "chatml"):
        grpo = encode_prompts([Row({"prompt": prefill}, "t.jsonl:3")], tok, "prompt", 512, "keep_end", template)[0]
        ppo = ppo_ids(Sample("t.jsonl:3", "prompt_only", prefill), tok, template, 512)
        assert grpo[0].ids == ppo == prompt_ids(tok, prefill, template=template) == ref, template
    monkeypatch.setattr(tok, "chat_template", DROPS)
    one = r"^t\.jsonl:3: messages\[2\]: the chat template does not write this final assistant message"
    for refused in (lambda: ppo_ids(Sample("t.jsonl:3", "prompt_only", prefill), tok, None, 512),
                    lambda: encode_prompts([Row({"prompt": prefill}, "t.jsonl:3")], tok, "prompt", 512, "keep_end")):  # fmt: skip
        with pytest.raises(ConfigError, match=one) as err:
            refused()
        assert "\n" not in str(err.value)
    monkeypatch.setattr(tok, "chat_template", "{{ raise_exception('no') }}")  # (the row named once, not twice)
    with pytest.raises(ValueError, match=r"^t\.jsonl:3: the model's chat template refuses this conversation: no$"):
        ppo_ids(Sample("t.jsonl:3", "prompt_only", CONV[:2]), tok, None, 512)
    monkeypatch.setattr(tok, "chat_template", DROPS)
    go_on = {"add_generation_prompt": False, "continue_final_message": True}
    with pytest.raises(RequestError, match=r"^messages\[2\]: the chat template does not write") as err:
        _chat_ids(tok, prefill, None, _rendering({"messages": prefill, **go_on}, None))
    assert "\n" not in str(err.value) and err.value.param == "continue_final_message"


@pytest.fixture(scope="module")
def served(tok, tmp_path_factory):
    """The app serving a tiny Llama with SmolLM2's tokenizer: the base (the tokenizer's chatml template) and an
    adapter whose run trained under the built-in chatml."""
    pytest.importorskip("fastapi")
    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt
    from deltatune.serve.app import create_app
    from deltatune.serve.engine import Engine

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                            max_position_embeddings=128)).eval()  # fmt: skip

    run = tmp_path_factory.mktemp("run")
    dt.DeltaModel(model(), dt.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(run))
    (run / "run.yaml").write_text(yaml.safe_dump({"stage": "sft", "data": {"template": "chatml"}}))
    engine = Engine(dt.DeltaModel(model(), fused_loss=False), tok, max_wait_s=0.001)
    engine.load_adapter("tuned", str(run))
    yield create_app(engine, max_tokens=4)
    engine.close()


def test_serve_keeps_vllms_final_assistant_message_under_a_built_in_template(tok, served):
    """vLLM's chat endpoint: by default (add_generation_prompt true) a final assistant message is closed and a new
    assistant header opened; {add_generation_prompt: false, continue_final_message: true} continues it. The adapter
    trained under the built-in chatml continued it by default (8f6362c) and refused the explicit request."""
    from test_serve_probe11 import _call

    messages = [*CONV[:2], {"role": "assistant", "content": "Sure, "}]
    go_on = {"add_generation_prompt": False, "continue_final_message": True}
    for fields, ref in (({}, _ids(tok, messages, add_generation_prompt=True)),
                        (go_on, _ids(tok, messages, continue_final_message=True))):  # fmt: skip
        for model in ("base", "tuned"):
            status, out = _call(served, "/tokenize", {"model": model, "messages": messages, **fields})
            assert (status, out["tokens"]) == (200, ref), (model, fields, out)
            body = {"model": model, "messages": messages, "max_tokens": 1, **fields}
            status, out = _call(served, "/v1/chat/completions", body)
            assert (status, out["usage"]["prompt_tokens"]) == (200, len(ref)), (model, fields, out)
    status, out = _call(served, "/tokenize", {"model": "tuned", "messages": CONV[:2], **go_on})
    assert (status, out["error"]["param"]) == (400, "continue_final_message"), out
