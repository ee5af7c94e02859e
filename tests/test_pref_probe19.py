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


class _TwoRanks:
    """The trainer's accelerator as rank 0 of two processes: ``gather`` returns this process's tensor followed by
    the one rank 1 gave at the same call (``other``, recorded by a run on rank 1's batch); recording (``other`` None),
    rank 1's own tensor alone."""

    def __init__(self, real, other: list | None = None) -> None:
        self.real, self.other, self.record = real, other, []
        self.num_processes = 2

    def gather(self, x):
        import torch

        self.record.append(x.detach().clone())
        return x if self.other is None else torch.cat([x, self.other.pop(0)])

    def __getattr__(self, name):
        return getattr(self.real, name)


_POOLED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")  # fmt: skip


def _two_rank_stats(trainer, model, collator, rank0: list, rank1: list) -> tuple[dict, dict]:
    """(the logged statistics of rank 0 under two processes, those of one process holding both ranks' rows)."""
    import torch

    real = trainer.accelerator
    with torch.no_grad():
        trainer.accelerator = _TwoRanks(real)
        trainer.compute_loss(model, collator(rank1))
        trainer._stats.clear()
        trainer.accelerator = _TwoRanks(real, trainer.accelerator.record)
        trainer.compute_loss(model, collator(rank0))
        two = {k: v[-1] for k, v in trainer._stats.items()}
        trainer._stats.clear()
        trainer.accelerator = real
        trainer.compute_loss(model, collator(rank0 + rank1))
    return two, {k: v[-1] for k, v in trainer._stats.items()}


def test_dpo_training_statistics_are_every_process_s(tmp_path):
    """Two processes, one pair each: TRL's DPOTrainer gathers the rewards, accuracies, margins and log-probs of every
    process's pairs, and the logits, entropy and token accuracy sums and token counts, before the logged mean, so
    rank 0 logs the statistics of one process holding both pairs; HEAD logged rank 0's pair alone (rewards/chosen
    0.2783 against the pooled 0.2136 here)."""
    from test_dpo_probe12 import _args, _lora
    from test_pref_probe14 import _prepared
    from tiny import save_tiny

    base = save_tiny(tmp_path / "llama")
    _, ours = _prepared(base, tmp_path, "dpo", 64, {"beta": 0.3})
    model = _lora(base)
    trainer = ours.trainer_class(model=model, args=_args(tmp_path / "dt"), data_collator=ours.collator)
    two, one = _two_rank_stats(trainer, model, ours.collator, ours.train[:1], ours.train[1:2])
    assert set(_POOLED) <= set(two)
    for key in _POOLED:
        assert two[key] == pytest.approx(one[key], abs=1e-5, rel=1e-5), key


def test_kto_training_statistics_are_every_process_s(tmp_path):
    """Two processes, rank 0 with the two desirable rows and rank 1 with the two undesirable ones: TRL's KTOTrainer
    sums each label's rewards and log-probs, and the logits and entropy over the tokens, over every process, so rank
    0 logs rewards/rejected, logps/rejected, logits/rejected and rewards/margins from rank 1's rows, as one process
    holding all four; HEAD's rank 0 logged none of them and its own chosen means."""
    from test_dpo_probe12 import _args, _lora
    from test_pref_probe14 import KTO_ROWS
    from tiny import save_tiny

    from deltatune.train.models import load_tokenizer
    from deltatune.train.table import prepare

    base = save_tiny(tmp_path / "llama")
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
             "label": good} for p, c, good in KTO_ROWS]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": "kto", "model": {"name_or_path": base}, "train": {"report_to": ["none"], "batch_size": 2},
                 "data": {"train": str(path)}, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    ours = prepare(cfg, load_tokenizer(base))
    model = _lora(base)
    trainer = ours.trainer_class(model=model, args=_args(tmp_path / "dt"), data_collator=ours.collator)
    good = [e for e in ours.train if e["desirable"]]
    bad = [e for e in ours.train if not e["desirable"]]
    two, one = _two_rank_stats(trainer, model, ours.collator, good, bad)
    keys = [k for k in _POOLED if k in one]
    assert len(keys) == 8 and set(keys) <= set(two), (keys, sorted(two))
    for key in keys:
        assert two[key] == pytest.approx(one[key], abs=1e-5, rel=1e-5), key
