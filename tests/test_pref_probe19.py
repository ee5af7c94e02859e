"""Probe 19 of the DPO and KTO stages (deltatune/train/dpo.py, kto.py, pairs.py) against TRL 1.16: a DPO pair whose
prompt alone fills data.max_length is cut from the pair already encoded (each such pair was rendered and tokenized a
second time: hh_rlhf's 291 of 2,000 pairs at max_length 256, a third of its encoding time; the ids unchanged), and
the training log's preference statistics are every process's under DDP, as TRL gathers them."""

import json

import pytest
from test_pairs_probe18 import ROWS, _bert_raw, _llama_like
from tiny import smollm2_tokenizer

import deltatune.data.encode as encode
from deltatune.train.config import build
from deltatune.train.pairs import encode_pair_splits


def _cfg(rows, tmp_path, max_length):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build({"stage": "dpo", "model": {"name_or_path": "x"},
                  "data": {"train": str(path), "max_length": max_length, "truncation": "truncate"}})  # fmt: skip


@pytest.mark.parametrize("make", [_llama_like, _bert_raw, smollm2_tokenizer])
@pytest.mark.parametrize("max_length", [4, 6])
def test_dpo_pair_whose_prompt_fills_max_length_is_encoded_once(make, max_length, tmp_path, monkeypatch):
    """Each pair is encoded once (one encode_pair_samples call for the split; HEAD called it again for each pair whose
    prompt fills max_length: 3 calls here), and every pair's ids and labels are what encoding it at max_length gives
    (the shared-prompt split of the whole pair, then each side's cut: HEAD's second encoding)."""
    tok, cfg = make(), _cfg(ROWS, tmp_path, max_length)
    calls, real = [], encode.encode_pair_samples

    def counted(samples, *args, **kwargs):
        calls.append(len(samples))
        return real(samples, *args, **kwargs)

    monkeypatch.setattr(encode, "encode_pair_samples", counted)
    got = encode_pair_splits(cfg, tok, causal=True)[0].examples
    assert calls == [len(ROWS)]
    from deltatune.train.prepared import read_splits

    samples, _, template, _ = read_splits(cfg, tok)
    fell_back = 0
    for s, mine in zip(samples, got, strict=True):
        whole = real([s], tok, template, 1 << 62, "truncate", True, True).examples[0]
        first = min(next(i for i, v in enumerate(x["labels"]) if v != -100) for x in whole.values())
        if first < max_length:  # TRL's keep_start: each side's first max_length tokens
            assert mine == {k: {f: v[:max_length] for f, v in x.items()} for k, x in whole.items()}
        else:  # the prompt's end and each answer's start, as encoding the pair at max_length gives
            assert mine == real([s], tok, template, max_length, "truncate", True, True).examples[0]
            fell_back += 1
    assert fell_back >= 1
