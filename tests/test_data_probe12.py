"""Data probe 12: the built-in chatml template against the model's own chat template (transformers'
apply_chat_template, TRL's prompt/completion split), the report line of a reshaped file, and LLaMA-Factory's
multi-turn encodings (mask_history, train_on_prompt, tool calls, cutoff_len) on SmolLM2's tokenizer."""

from __future__ import annotations

import glob

import pytest

from deltatune.data.encode import format_note, lm_example, sft_example
from deltatune.data.formats import read_samples
from deltatune.data.load import Row
from deltatune.data.sample import Sample
from deltatune.data.templates import IGNORE_INDEX, render

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    SYSTEM,
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def smol():
    folders = glob.glob("/root/.cache/deltatune/smollm2-*/")
    if not folders:
        pytest.skip("SmolLM2's converted folder is not cached")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folders[0])


def _trained(ids: list[int], labels: list[int]) -> list[int]:
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    return [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


# -- leftover 1: chatml's <|im_end|> trains with its line break, as the model's own template trains it -------------


def test_built_in_chatml_sft_equals_the_tokenizers_own_template(smol):
    """SmolLM2's own template is chatml: the built-in one now gives the same ids and the same labels (each answer
    through ``<|im_end|>\\n``); it trained ``<|im_end|>`` without its ``\\n``."""
    s = Sample("t.jsonl:1", "messages", TURNS)
    own = sft_example(s, smol, None)
    built_in = sft_example(s, smol, "chatml")
    assert built_in[0] == smol.apply_chat_template(TURNS, tokenize=True, return_dict=False)
    assert built_in == own
    assert smol.decode(_trained(*built_in)) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_built_in_chatml_preference_labels_equal_trls_completion(smol, stage):
    """DPO / KTO / ORPO / SimPO (``lm_example``): the answer's labels are TRL's completion, the text
    ``maybe_apply_chat_template`` writes after the prompt's generation prompt (``Green.<|im_end|>\\n``)."""
    from trl.data_utils import maybe_apply_chat_template

    prompt, answer = TURNS[:4], [TURNS[4]]
    if stage == "dpo":
        s = Sample(
            "t.jsonl:1", "preference", prompt, chosen=answer, rejected=[{"role": "assistant", "content": "No."}]
        )
        ref = maybe_apply_chat_template({"prompt": prompt, "chosen": answer, "rejected": s.rejected}, smol)["chosen"]
    else:
        s = Sample("t.jsonl:1", "unpaired", prompt, completion=answer, label=True)
        ref = maybe_apply_chat_template({"prompt": prompt, "completion": answer}, smol)["completion"]
    assert ref == "Green.<|im_end|>\n"
    ref_ids = smol(ref, add_special_tokens=False)["input_ids"]
    for template in ("chatml", None):
        enc, cut = lm_example(s, answer, smol, template, 512)
        assert not cut and _trained(enc["input_ids"], enc["labels"]) == ref_ids
        assert enc["input_ids"] == smol.apply_chat_template(prompt + answer, tokenize=True, return_dict=False)


def test_chatml_on_a_tokenizer_without_eos_trains_its_end_marker(smol):
    """With no EOS to append, the built-in chatml trained the answer's words alone (never how to stop)."""
    from tiny import tokenizer

    tok = tokenizer()
    tok.eos_token = None
    text, spans = render(TURNS[:3], tok, "chatml")
    assert [text[a:b] for a, b in spans] == ["Blue.<|im_end|>\n"]


# -- leftover 2: the report line of a reshaped file names the format the rows hold -----------------------------


@pytest.mark.parametrize(
    "row, stage, expected",
    [
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}], "label": True}, "kto",
         "data format: sharegpt, detected from the rows; read by stage kto as unpaired (conversational)"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "ppo",
         "data format: messages, detected from the rows; read by stage ppo as prompt (conversational)"),
        ({"instruction": "Hi", "output": "Yo", "label": False}, "kto",
         "data format: alpaca, detected from the rows; read by stage kto as unpaired (standard)"),
    ],
)  # fmt: skip
def test_a_detected_reshaped_format_is_named_as_the_rows_hold_it(row, stage, expected):
    """It said ``unpaired (conversational), detected from the rows`` of a sharegpt file (nothing in it is
    "unpaired"); a forced format already said both."""
    samples = read_samples([Row(row, "d.jsonl:1")], {}, None, stage=stage)
    assert format_note(samples, None, stage) == expected
    forced = samples[0].written
    assert format_note(read_samples([Row(row, "d.jsonl:1")], {}, forced, stage=stage), forced, stage) == (
        expected.replace("detected from the rows", "set by data.format")
    )
