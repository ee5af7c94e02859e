"""Data probe 15: TRL's per-row ``chat_template_kwargs`` (ids and labels against TRL 1.16's SFT and DPO tokenization
on SmolLM2's tokenizer with a template that reads two variables), TRL's dataset types one by one against its own
tokenization, stepwise supervision refused in one line, and LLaMA-Factory's dataset_info options."""

from __future__ import annotations

import glob
import json

import pytest

from deltatune.data.encode import lm_example, prompt_ids, sft_example
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row
from deltatune.data.templates import IGNORE_INDEX

# chatml whose system default and assistant header read two variables (Qwen3's enable_thinking writes an empty
# think block after the header); the generation tags let TRL's assistant_only_loss mark the trained tokens.
KW_TEMPLATE = (
    "{%- if messages[0].role != 'system' %}<|im_start|>system\n{{ persona | default('You are helpful.') }}"
    "<|im_end|>\n{%- endif %}"
    "{%- set think = '<think>\n</think>\n' if enable_thinking is defined and enable_thinking is false else '' %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}<|im_start|>assistant\n{{ think }}"
    "{% generation %}{{ m.content }}<|im_end|>\n{% endgeneration %}"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{{ think }}{%- endif %}"
)
KW = {"enable_thinking": False, "persona": "Be terse."}


@pytest.fixture(scope="module")
def tok():
    folders = glob.glob("/root/.cache/deltatune/smollm2-*/")
    if not folders:
        pytest.skip("SmolLM2's converted folder is not cached")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(folders[0])
    t.chat_template = KW_TEMPLATE
    return t


def _read(row: dict, stage: str | None = "sft", **kw):
    return read_samples([Row(row, "t.jsonl:4")], kw.pop("columns", {}), stage=stage, **kw)[0]


def _trl_sft(example: dict, tok) -> tuple[list[int], list[int]]:
    """TRL 1.16's SFTTrainer tokenize_fn (conversational rows, assistant_only_loss for messages) as ids and labels."""
    from trl.data_utils import _tokenize, common_prefix_length

    kw = {"tools": example.get("tools"), **example.get("chat_template_kwargs", {})}
    if "prompt" in example:
        p = _tokenize(tok, example["prompt"], add_generation_prompt=True, **kw)["input_ids"]
        ids = _tokenize(tok, example["prompt"] + example["completion"], **kw)["input_ids"]
        n = common_prefix_length(p, ids)
        return ids, [IGNORE_INDEX] * n + ids[n:]
    out = _tokenize(tok, example["messages"], return_assistant_tokens_mask=True, **kw)
    return out["input_ids"], [i if m else IGNORE_INDEX for i, m in zip(out["input_ids"], out["assistant_masks"])]


Q = [{"role": "user", "content": "What colour is a ripe lemon?"}]
A = [{"role": "assistant", "content": "Yellow."}]
B = [{"role": "assistant", "content": "Purple."}]


@pytest.mark.parametrize("shape", ["messages", "prompt_completion"])
@pytest.mark.parametrize("as_json", [False, True])
def test_chat_template_kwargs_reach_the_template_as_trls_sft(tok, shape, as_json):
    """A row's chat_template_kwargs were dropped without a word: the template rendered its defaults (no think block,
    "You are helpful."), where TRL's SFTTrainer passes them to apply_chat_template."""
    example = {"messages": Q + A} if shape == "messages" else {"prompt": Q, "completion": A}
    example["chat_template_kwargs"] = KW
    ids, labels = sft_example(_read({**example, "chat_template_kwargs": json.dumps(KW) if as_json else KW}), tok, None)
    ref_ids, ref_labels = _trl_sft(example, tok)
    assert "<think>" in tok.decode(ids) and "Be terse." in tok.decode(ids)  # (the variables changed the text)
    assert ids == ref_ids and labels == ref_labels
    assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == "Yellow.<|im_end|>\n"
    plain = sft_example(_read({k: v for k, v in example.items() if k != "chat_template_kwargs"}), tok, None)[0]
    assert plain == _trl_sft({k: v for k, v in example.items() if k != "chat_template_kwargs"}, tok)[0] != ids


def test_chat_template_kwargs_reach_dpo_and_ppo_as_trls(tok):
    """DPO's chosen/rejected ids and PPO's prompt ids render with the row's variables, as TRL's DPO tokenize_fn and
    maybe_apply_chat_template do (prompt ids = its prompt_ids cut to the common prefix)."""
    from trl.data_utils import _tokenize, common_prefix_length, maybe_apply_chat_template

    s = _read({"prompt": Q, "chosen": A, "rejected": B, "chat_template_kwargs": KW}, "dpo")
    p = _tokenize(tok, Q, add_generation_prompt=True, **KW)["input_ids"]
    for response, side in ((s.chosen, A), (s.rejected, B)):
        full = _tokenize(tok, Q + side, **KW)["input_ids"]
        n = common_prefix_length(p, full)
        ex, cut = lm_example(s, response, tok, None, 10**6)
        assert not cut and ex["input_ids"] == full
        assert ex["labels"] == [IGNORE_INDEX] * n + full[n:]
    s = _read({"prompt": Q, "chat_template_kwargs": KW}, "ppo")
    want = maybe_apply_chat_template({"prompt": Q, "chat_template_kwargs": KW}, tok)["prompt"]
    assert tok.decode(prompt_ids(s, tok, None, 10**6)) == want and want.endswith("</think>\n")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("[1, 2]", "must be an object of template variables, got list"),
        ("{not json", "must be a JSON object, got '{not json'"),
        ({"add_generation_prompt": True}, r"chat_template_kwargs\.add_generation_prompt: the stage sets this"),
        ({"tools": []}, r"chat_template_kwargs\.tools: the stage sets this"),
    ],
)
def test_bad_chat_template_kwargs_are_one_line_naming_the_row(value, why):
    value = json.loads(value) if value == "[1, 2]" else value
    with pytest.raises(DataError, match=rf"^t\.jsonl:4: (column 'chat_template_kwargs' )?{why}"):
        _read({"messages": Q + A, "chat_template_kwargs": value})
