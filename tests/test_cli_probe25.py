"""Probe 25 of the command line around a trained adapter: a key overridden twice is named in one line (the last
wins, as before, but unsaid); ``merge`` saves the run's built-in ``data.template`` as the tokenizer's chat template
(LLaMA-Factory's export writes its template's jinja; the merged folder prompted with the base tokenizer's format, or
none); a killed merge's staging folder is swept by the next merge into that folder (it stayed, hidden, forever).
Review 25's fixes: the template opens with the special tokens the run trained with (MiniLM's [CLS], a Llama BOS),
compared as token ids with ``encode_chat``; only a stage that reads data.template writes one; tool calls and other
roles raise as ``render`` refuses them; an emoji EOS; one override line per key, by value."""

from __future__ import annotations

import os

import pytest
import torch
from jinja2.exceptions import TemplateError
from peft import PeftModel
from tiny import save_tiny, smollm2_tokenizer
from tiny import tokenizer as minilm_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from deltatune import LoraConfig
from deltatune.cli import main
from deltatune.data.templates import TEMPLATES, ChatTemplateError, encode_chat, render
from deltatune.model import get_delta_model
from deltatune.train import run_load
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
    # the same value in another spelling (train.config._coerce reads both as 0.001): nothing said
    assert main(["train", "no-such-recipe.yaml", "train.lr=1e-3", "train.lr =0.001"]) == 2
    assert "given" not in capsys.readouterr().err
    # three times, two values: one line for the key (it printed two, each saying "twice")
    assert main(["train", "no-such-recipe.yaml", "seed=1", "seed=2", "seed=1"]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if "given" in line]
    assert said == [
        "deltatune: override 'seed' is given 3 times ('seed=1', then 'seed=2', then 'seed=1'): the last is used"
    ]


def test_the_template_jinja_renders_as_the_built_in_template():
    """Each built-in template's jinja, through transformers' apply_chat_template, is the text ``render`` trains and
    prompts with (default system, empty system, quotes and braces in the content, the generation prompt)."""
    tok = smollm2_tokenizer()
    for name in TEMPLATES:
        tok.chat_template = run_load.chat_template_jinja(name, tok.eos_token)
        for messages in CONVERSATIONS:
            for gen in (False, True):
                want = render(messages, tok, name, add_generation_prompt=gen)[0]
                assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == want
    assert run_load.chat_template_jinja("raw", tok.eos_token) is None


def test_the_template_jinja_refuses_what_render_refuses_and_keeps_an_emoji_eos():
    """Tool messages, tool calls, ``tools=`` and other roles: ``render`` refuses them under a built-in template; the
    jinja dropped them without a word (the tool's answer gone from the prompt); now it raises, as render does. An EOS
    outside the BMP came out as two lone surrogates (JSON's ASCII escapes read by jinja)."""
    tok = minilm_tokenizer()
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    cases = [
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}],
            None,
            "tool",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "sunny"}], None, "tool"),
        ([{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "weather"}}], "tool"),
        ([{"role": "user", "content": "hi"}, {"role": "observation", "content": "sunny"}], None, "observation"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], None, "renders text, not"),
    ]
    for name in ("chatml", "alpaca"):
        tok.chat_template = run_load.chat_template_jinja(name, tok.eos_token)
        for messages, tools, why in cases:
            with pytest.raises(ChatTemplateError, match=why):
                render(messages, tok, name, True, tools)
            with pytest.raises(TemplateError, match=why):
                tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    tok.eos_token = "\U0001f51a"
    for name in ("chatml", "alpaca"):
        tok.chat_template = run_load.chat_template_jinja(name, tok.eos_token)
        want = render(CONVERSATIONS[0], tok, name)[0]
        assert "yo\U0001f51a" in want
        assert tok.apply_chat_template(CONVERSATIONS[0], tokenize=False) == want


def test_the_template_opens_with_the_bos_the_run_trained_with(tmp_path):
    """A Llama-like tokenizer that puts a BOS before every text: training's ids (``encode_chat``, the built-in
    template's text with the tokenizer's special tokens) and ``apply_chat_template(tokenize=True)``'s (no special
    tokens added, as vLLM's too) are the same ids (the BOS was missing), for a prompt too; a cls run, which reads no
    data.template, keeps the tokenizer's chat template."""
    from tokenizers.processors import TemplateProcessing

    tok = smollm2_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)]
    )
    tok.bos_token, tok.eos_token = "<|endoftext|>", "<|im_end|>"
    for stage, template in (("sft", "alpaca"), ("dpo", "chatml"), ("cls", "chatml")):
        run = tmp_path / stage
        os.makedirs(run)
        write_run_file(str(run), {"stage": stage, "data": {"template": template}})
        jinja = run_load.merged_chat_template(str(run), tok)
        if stage == "cls":
            assert jinja is None
            continue
        tok.chat_template = jinja
        for messages in CONVERSATIONS[:2]:
            want = encode_chat(messages, tok, template)[0]
            assert want[0] == 0
            assert list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) == want
        prompt = render(CONVERSATIONS[1], tok, template, add_generation_prompt=True)[0]
        got = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, return_dict=True)["input_ids"]
        assert list(got) == tok(prompt)["input_ids"]


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
    cls_base = save_tiny(root / "cls-base", "llama", "seq_cls")  # a cls run: data.template read by no row
    model = AutoModelForSequenceClassification.from_pretrained(cls_base)
    get_delta_model(model, LoraConfig(r=2, task_type="SEQ_CLS")).save_pretrained(root / "cls")
    write_run_file(
        str(root / "cls"), {"stage": "cls", "model": {"name_or_path": cls_base}, "data": {"template": "chatml"}}
    )
    assert main(["merge", "--adapter", str(root / "cls"), "--out", str(root / "cls-out")]) == 0
    return root


def test_merge_writes_the_trained_template_and_matches_peft(merged):
    """The merged folder's tokenizer prompts as the run trained (alpaca, its default system), and its logits are
    peft's merge_and_unload of the same adapter on the same base."""
    tok = AutoTokenizer.from_pretrained(merged / "out")
    for messages in CONVERSATIONS[1:]:  # as token ids: MiniLM's tokenizer puts [CLS] first, and the run trained so
        want = tok(render(messages, tok, "alpaca", add_generation_prompt=True)[0])["input_ids"][:-1]  # (no [SEP])
        got = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert list(got["input_ids"]) == want
    conversation = CONVERSATIONS[1][:3]  # the training row: its ids but the closing [SEP], which no template writes
    got = tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert list(got) + [tok.sep_token_id] == encode_chat(conversation, tok, "alpaca")[0]
    cls = AutoTokenizer.from_pretrained(merged / "cls-out")  # a cls run keeps the base's chat template
    assert cls.chat_template == AutoTokenizer.from_pretrained(merged / "cls-base").chat_template
    ids = torch.tensor([[5, 9, 17, 3, 11]])
    ours = AutoModelForCausalLM.from_pretrained(merged / "out")(ids).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merged / "base"), merged / "run")
    assert torch.allclose(ours, peft.merge_and_unload()(ids).logits, atol=1e-5)


def test_merge_sweeps_a_killed_merges_staging_folder(merged):
    """A merge killed mid-write left ``.out.staging-<pid>`` beside --out for good (its finally never ran); the next
    merge into that folder removes those of processes that are gone."""
    assert not [e for e in os.listdir(merged) if ".staging-" in e]


def _metaspace_tokenizer(scheme: str, bos: str = "<s>"):
    """A Llama-2 / Mistral-class BPE tokenizer with a BOS: ``legacy`` (their tokenizer.json: Prepend("▁") and
    Replace as normalizer) or ``first`` (Metaspace(prepend_scheme="first"), as transformers 5's LlamaTokenizer
    rebuilds it unless tokenizer_config says legacy)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    if scheme == "first":
        t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    corpus = [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "### Instruction: hi there ### Response: yo again. Be brief.",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    ] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    t.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, t.token_to_id(bos))]
    )
    t.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_the_template_head_gives_the_trained_ids_for_metaspace_tokenizers(tmp_path, capsys):
    """Llama-2 / Mistral-class tokenizers: under transformers 5's Metaspace "first" the word after a literal "<s>"
    lost its "▁" (trained "<s>", "▁Below"; apply_chat_template gave "<s>", "B", "elow"): the head is now the text
    whose ids are the run's ("<s> " there, "<s>" for a legacy one), checked against encode_chat and, for a prompt,
    tokenizer(text) as vLLM's and training's. A head no text gives keeps the base's template, said in one line."""
    run = tmp_path / "run"
    os.makedirs(run)
    for scheme in ("first", "legacy"):
        tok = _metaspace_tokenizer(scheme)
        for template in ("alpaca", "chatml"):
            write_run_file(str(run), {"stage": "sft", "data": {"template": template}})
            tok.chat_template = run_load.merged_chat_template(str(run), tok)
            for messages in CONVERSATIONS[:2]:
                got = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
                assert list(got) == encode_chat(messages, tok, template)[0], (scheme, template)
            prompt = render(CONVERSATIONS[1], tok, template, add_generation_prompt=True)[0]
            got = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, return_dict=True)
            assert list(got["input_ids"]) == tok(prompt)["input_ids"]
    tok = _metaspace_tokenizer("first", bos="#")  # a leading token that is no special one: no text gives it
    tok.chat_template = base = "{{ 'base' }}"
    write_run_file(str(run), {"stage": "sft", "data": {"template": "alpaca"}})
    assert run_load.merged_chat_template(str(run), tok) is None
    assert "the base tokenizer's chat template is kept" in capsys.readouterr().err
    assert tok.chat_template == base


def test_sweep_staging_skips_a_parent_it_cannot_list(tmp_path, monkeypatch):
    """A drop folder (mode 0733: written and renamed into without read permission) stopped merge with a
    PermissionError traceback before it merged, since the sweep listed the parent unguarded; now nothing is swept."""
    from deltatune.train.staging import sweep_staging

    def refuse(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "listdir", refuse)  # (root reads a 0333 folder: the refusal made by hand)
    sweep_staging(str(tmp_path / "out"))


def test_the_override_line_tells_typed_values_apart(capsys):
    """1, 1.0 and true are three values to the recipe (int, float, bool), as are false and 0, but Python's == made
    them one and nothing was said; .nan twice is one value (nan != nan said "given twice")."""
    for first, second in (("train.epochs=1", "train.epochs=true"), ("data.packing=false", "data.packing=0")):
        assert main(["train", "no-such-recipe.yaml", first, second]) == 2
        assert f"is given twice ('{first}', then '{second}')" in capsys.readouterr().err
    assert main(["train", "no-such-recipe.yaml", "train.lr=.nan", "train.lr=.nan"]) == 2
    assert "given" not in capsys.readouterr().err


def test_the_template_jinja_names_none_content():
    """An assistant turn whose content is None: render says "not NoneType"; the jinja said "a list of parts"."""
    tok = smollm2_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    with pytest.raises(ChatTemplateError, match="renders text, not NoneType"):
        render(messages, tok, "chatml")
    tok.chat_template = run_load.chat_template_jinja("chatml", tok.eos_token)
    with pytest.raises(TemplateError, match="renders text, not None$"):
        tok.apply_chat_template(messages, tokenize=False)


def test_a_folder_of_many_adapters_names_eight_then_counts_the_rest(tmp_path):
    """`merge --adapter runs/` on a folder of 130 runs listed all 130 names in its one line; now the first 8 (sorted),
    then how many more. A folder of 8 or fewer lists them all."""
    from deltatune.config import named_adapters_hint

    for i in range(30):
        (tmp_path / "many" / f"run{i:02d}").mkdir(parents=True)
        (tmp_path / "many" / f"run{i:02d}" / "adapter_config.json").write_text("{}")
    hint = named_adapters_hint(str(tmp_path / "many"))
    names = ", ".join(f"run{i:02d}" for i in range(8))
    assert hint == f"; its sub-folders hold adapters: {names} and 22 more (load one by name)"
    for i in range(3):
        (tmp_path / "few" / f"r{i}").mkdir(parents=True)
        (tmp_path / "few" / f"r{i}" / "adapter_config.json").write_text("{}")
    assert (
        named_adapters_hint(str(tmp_path / "few")) == "; its sub-folders hold adapters: r0, r1, r2 (load one by name)"
    )
