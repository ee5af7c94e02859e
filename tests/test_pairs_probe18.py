"""Probe 18 of the pair encoding (deltatune/train/pairs.py, deltatune/data/preference.py) against TRL 1.16: raw rows
of DPO split and cut as DPOTrainer's ``_prepare_dataset`` + ``DataCollatorForPreference`` (keep_start), ORPO's and
CPO's as their ``tokenize_row`` (a BERT-style tokenizer's [CLS]-less ``p r [SEP]`` included: TRL's own), and an
orpo / simpo / cpo pair whose prompt alone fills data.max_length ending its kept answer with the EOS every other
pair of the stage trains (align.answer_eos)."""

import json
import types

import pytest
from tiny import tokenizer, word_tokenizer
from tokenizers import processors

from deltatune.data.preference import cut_lm
from deltatune.data.templates import IGNORE_INDEX
from deltatune.train.config import build
from deltatune.train.pairs import encode_pair_splits

ROWS = [
    {"prompt": "w1 w2", "chosen": " w3 w4", "rejected": " w5"},
    {"prompt": "w1 w2 w3 w4 w5 w6 w7 w8", "chosen": " yes", "rejected": " w9 w10 w11"},
    {"prompt": "w6", "chosen": " w7", "rejected": " w7 w8"},  # chosen a prefix of rejected
]


def _llama_like():
    """``word_tokenizer`` opening every text with its BOS, as Llama's."""
    tok = word_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", 2)]
    )
    return tok


def _bert_raw():
    tok = tokenizer()
    tok.chat_template = None
    return tok


def _sides(tok, rows, stage, max_length, tmp_path, **align):
    path = tmp_path / f"{stage}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": stage, "model": {"name_or_path": "x"}, "align": align,
                 "data": {"train": str(path), "max_length": max_length, "truncation": "truncate"}})  # fmt: skip
    return encode_pair_splits(cfg, tok, causal=True)[0].examples


@pytest.mark.parametrize("make", [_llama_like, _bert_raw])
@pytest.mark.parametrize("max_length", [100, 6])
def test_raw_dpo_pairs_are_trls_prepare_dataset_and_collator(make, max_length, tmp_path):
    """Each side's ids and trained tokens equal TRL's DPOTrainer's (prompt split at the shorter common prefix, EOS
    added, the first max_length tokens kept); the rows TRL keeps (a prompt that fills max_length it drops)."""
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    tok = make()
    args = DPOConfig(output_dir=str(tmp_path), max_length=max_length, report_to=[], use_cpu=True, bf16=False)
    ref = list(DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), Dataset.from_list(ROWS), tok,
                                           args, "train"))  # fmt: skip
    kept = [next(i for i, r in enumerate(ROWS) if r["prompt"] == x["prompt"]) for x in ref]
    mine = _sides(tok, ROWS, "dpo", max_length, tmp_path)
    assert len(kept) >= 2 and (len(kept) < len(ROWS)) == (max_length == 6)
    for r, i in zip(ref, kept, strict=True):
        for side in ("chosen", "rejected"):
            ids = (r["prompt_ids"] + r[f"{side}_ids"])[:max_length]
            trained = ([False] * len(r["prompt_ids"]) + [True] * len(r[f"{side}_ids"]))[:max_length]
            assert mine[i][side]["input_ids"] == ids
            assert [lab != IGNORE_INDEX for lab in mine[i][side]["labels"]] == trained


@pytest.mark.parametrize("stage", ["orpo", "cpo", "simpo"])
@pytest.mark.parametrize("make", [_llama_like, _bert_raw])
def test_raw_orpo_cpo_simpo_pairs_are_trls_tokenize_row(stage, make, tmp_path):
    """Ids and labels equal TRL 1.16's ORPO / CPO ``tokenize_row`` (SimPO is CPO's loss_type): the text without the
    tokenizer's own specials, a BOS put first where the tokenizer has one, the answer closed by EOS. A BERT-style
    tokenizer (no BOS) gives ``p r [SEP]`` with no [CLS] in TRL too, so deltatune keeps it (probe 18's check of
    an earlier session's note)."""
    from accelerate import PartialState

    PartialState()  # (TRL's warning_once needs it)
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    cls, tok = ORPOTrainer if stage == "orpo" else CPOTrainer, make()
    fake = types.SimpleNamespace(processing_class=tok, is_encoder_decoder=False, max_length=8, label_pad_token_id=-100)
    fake.build_tokenized_answer = lambda p, a: cls.build_tokenized_answer(fake, p, a)
    mine = _sides(tok, ROWS, stage, 8, tmp_path)
    checked = 0
    for row, ex in zip(ROWS, mine, strict=True):
        ref = cls.tokenize_row(fake, dict(row))
        if len(ref["prompt_input_ids"]) >= 8:  # (TRL keeps the prompt whole and no answer; deltatune its end)
            continue
        for side in ("chosen", "rejected"):
            assert ex[side]["input_ids"] == ref[f"{side}_input_ids"]
            assert ex[side]["labels"] == ref[f"{side}_labels"]
            checked += 1
    assert checked == 4
    if make is _bert_raw:
        assert mine[0]["chosen"]["input_ids"][0] != tok.cls_token_id == tok("a")["input_ids"][0]


@pytest.mark.parametrize("stage", ["orpo", "simpo", "cpo"])
@pytest.mark.parametrize("make", [tokenizer, _llama_like])
def test_a_prompt_filling_max_length_keeps_the_answer_eos(stage, make, tmp_path):
    """A pair whose prompt alone fills data.max_length keeps the prompt's end and the answer; its answer ends with
    the EOS that align.answer_eos gives every other pair of the stage (TRL's CPO and ORPO ``add_eos_token_if_needed``).
    Before: the pair was encoded again without it, so under a chat template that ends the turn with another token
    (ChatML's ``<|im_end|>`` then a newline) exactly these pairs trained no EOS. It is the whole pair's cut
    (``cut_lm``, the BOS of a raw row kept first); with answer_eos false, the same as before."""
    tok = make()
    rows = [{"prompt": " ".join(f"w{i}" for i in range(12)), "chosen": " yes", "rejected": " w1 w2"},
            {"prompt": "w3", "chosen": " yes", "rejected": " w4"}]  # fmt: skip
    max_length = 24 if make is tokenizer else 12  # (MiniLM reads ChatML's <|im_end|> as 7 word pieces)
    whole = _sides(tok, rows, stage, 1000, tmp_path)
    cut = _sides(tok, rows, stage, max_length, tmp_path)
    old = _sides(tok, rows, stage, max_length, tmp_path, answer_eos=False)
    eos = tok.eos_token_id
    first = next(i for i, lab in enumerate(whole[0]["chosen"]["labels"]) if lab != IGNORE_INDEX)
    assert first >= max_length  # the fallback: the prompt alone fills max_length
    lead = int(make is _llama_like)
    for side in ("chosen", "rejected"):
        got = cut[0][side]
        assert whole[0][side]["input_ids"][-1] == eos == got["input_ids"][-1] == got["labels"][-1]
        assert got == cut_lm(whole[0][side], max_length, lead)[0]
        assert len(got["input_ids"]) == max_length and got["input_ids"][:lead] == [2] * lead
        if make is _llama_like:  # (a short pair: untouched; MiniLM's ChatML rows are all longer than 24)
            assert cut[1][side] == whole[1][side]
    if make is tokenizer:  # ChatML: the EOS after "<|im_end|>\n" is answer_eos's own
        assert old[0]["chosen"]["input_ids"][-1] != eos
