"""Probe 25 of the command line around a trained adapter: a key overridden twice is named in one line (the last
wins, as before, but unsaid); ``merge`` saves the run's built-in ``data.template`` as the tokenizer's chat template
(LLaMA-Factory's export writes its template's jinja; the merged folder prompted with the base tokenizer's format, or
none); a killed merge's staging folder is swept by the next merge into that folder (it stayed, hidden, forever)."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel
from tiny import save_tiny, smollm2_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune import LoraConfig, info
from deltatune.cli import main
from deltatune.data.templates import TEMPLATES, render
from deltatune.model import get_delta_model
from deltatune.train.runs import write_run_file

CONVERSATIONS = [
    [{"role": "user", "content": 'hi "x"\n{{ a }}'}, {"role": "assistant", "content": "yo"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}],
]


def test_a_key_overridden_twice_is_named(capsys):
    """``train.lr=1e-3 train.lr=1e-4``: the last wins, as argparse's and OmegaConf's, but it went unsaid (a repeat
    typed by mistake trained with the value not meant); now one line names the key and both items."""
    assert main(["train", "no-such-recipe.yaml", "train.lr=1e-3", "--overwrite", "train.lr=1e-4"]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if "twice" in line]
    assert said == [
        "deltatune: override 'train.lr' is given twice ('train.lr=1e-3', then 'train.lr=1e-4'): the last is used"
    ]
    assert main(["train", "no-such-recipe.yaml", "train.lr=1e-3", "train.lr=1e-3"]) == 2  # the same twice: harmless
    assert "twice" not in capsys.readouterr().err


def test_the_template_jinja_renders_as_the_built_in_template():
    """Each built-in template's jinja, through transformers' apply_chat_template, is the text ``render`` trains and
    prompts with (default system, empty system, quotes and braces in the content, the generation prompt)."""
    tok = smollm2_tokenizer()
    for name in TEMPLATES:
        tok.chat_template = info.chat_template_jinja(name, tok.eos_token)
        for messages in CONVERSATIONS:
            for gen in (False, True):
                want = render(messages, tok, name, add_generation_prompt=gen)[0]
                assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == want
    assert info.chat_template_jinja("raw", tok.eos_token) is None


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = save_tiny(root / "base", "llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    get_delta_model(model, LoraConfig(r=2, init_lora_weights=False)).save_pretrained(root / "run")
    write_run_file(
        str(root / "run"), {"stage": "sft", "model": {"name_or_path": base}, "data": {"template": "alpaca"}}
    )
    stale = root / ".out.staging-999999999"  # a merge killed mid-write (no such process)
    os.makedirs(stale)
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(["merge", "--adapter", str(root / "run"), "--out", str(root / "out")]) == 0
    return root


def test_merge_writes_the_trained_template_and_matches_peft(merged):
    """The merged folder's tokenizer prompts as the run trained (alpaca, its default system), and its logits are
    peft's merge_and_unload of the same adapter on the same base."""
    tok = AutoTokenizer.from_pretrained(merged / "out")
    for messages in CONVERSATIONS[1:]:
        want = render(messages, tok, "alpaca", add_generation_prompt=True)[0]
        got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert got == want
    ids = torch.tensor([[5, 9, 17, 3, 11]])
    ours = AutoModelForCausalLM.from_pretrained(merged / "out")(ids).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merged / "base"), merged / "run")
    assert torch.allclose(ours, peft.merge_and_unload()(ids).logits, atol=1e-5)


def test_merge_sweeps_a_killed_merges_staging_folder(merged):
    """A merge killed mid-write left ``.out.staging-<pid>`` beside --out for good (its finally never ran); the next
    merge into that folder removes those of processes that are gone."""
    assert not [e for e in os.listdir(merged) if ".staging-" in e]
