"""Probe 21 of the preference stages (deltatune/train/kto.py, dpo.py, pairs.py) against TRL 1.16: a KTO row whose
prompt alone fills data.max_length is cut from the row already encoded (each such row was rendered and tokenized a
second time, as DPO's pairs were until probe 19), the ids unchanged."""

import json

import pytest
from test_pairs_probe18 import ROWS, _bert_raw, _llama_like
from tiny import smollm2_tokenizer

import deltatune.train.kto as kto
from deltatune.train.config import build


def _cfg(rows, tmp_path, stage: str, max_length: int, **train):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build({"stage": stage, "model": {"name_or_path": "x"}, "train": {"batch_size": 2, **train},
                  "data": {"train": str(path), "max_length": max_length, "truncation": "truncate"}})  # fmt: skip


@pytest.mark.parametrize("make", [_llama_like, _bert_raw, smollm2_tokenizer])
@pytest.mark.parametrize("max_length", [4, 6])
def test_kto_row_whose_prompt_fills_max_length_is_encoded_once(make, max_length, tmp_path, monkeypatch):
    """Each KTO row is encoded once (HEAD encoded each row whose prompt fills max_length a second time: 12 calls
    for the 6 rows at max_length 4), and every row's ids and labels are what encoding it at max_length gives (HEAD's
    second encoding) where its prompt fills max_length, its first max_length tokens elsewhere (TRL's keep_start)."""
    import warnings

    from deltatune.data.sample import unpaired_examples
    from deltatune.train.prepared import read_splits

    tok, cfg = make(), _cfg(ROWS, tmp_path, "kto", max_length)
    calls, real = [], kto.encode_prompt_response

    def counted(*args, **kwargs):
        calls.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(kto, "encode_prompt_response", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = kto.prepare_kto(cfg, tok).train
    samples, _, template, _ = read_splits(cfg, tok, "kto")
    rows = [(s, t) for s in samples for t in unpaired_examples([s])]
    rows = [r for r in rows if r[1][2]] + [r for r in rows if not r[1][2]]  # (TRL's order: the chosen, then rejected)
    assert len(calls) == len(rows) == len(got)
    fell_back = 0
    for (s, (prompt, completion, _)), mine in zip(rows, got, strict=True):
        whole = real(prompt, completion, tok, template, 1 << 62, s.tools, s.template_kwargs)[0]
        first = next(i for i, v in enumerate(whole["labels"]) if v != -100)
        if first < max_length:
            want = {k: v[:max_length] for k, v in whole.items()}
        else:
            want = real(prompt, completion, tok, template, max_length, s.tools, s.template_kwargs)[0]
            fell_back += 1
        assert {k: mine[k] for k in want} == want
        assert mine["completion_ids"] == whole["input_ids"][first:]
    assert fell_back >= 1


@pytest.mark.xfail(
    strict=True, reason="needs the config_align.py diff of pref probe 21's report (not this helper's file)"
)
@pytest.mark.parametrize("weights", [[float("nan")], [float("inf")], [1.0, float("nan")]])
def test_dpo_loss_weights_that_are_no_finite_number_are_one_line(weights, tmp_path):
    """align.loss_weights of NaN (or inf) gives a NaN loss from the first step (TRL's DPOConfig does not check): the
    recipe is refused, naming the key, as any other non-finite align number is (HEAD accepted it)."""
    from deltatune.config import ConfigError

    kinds = ["sigmoid", "sft"][: len(weights)]
    with pytest.raises(ConfigError, match=r"align\.loss_weights must be \d numbers, one per align\.loss_type"):
        build(
            {"stage": "dpo", "model": {"name_or_path": "x"}, "data": {"train": str(tmp_path / "p.jsonl")},
             "align": {"loss_type": kinds, "loss_weights": weights}})  # fmt: skip
