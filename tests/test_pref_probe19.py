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
        if self.other is None:
            return x
        assert self.other, "rank 0 gathers more often than rank 1: DDP would hang"
        theirs = self.other.pop(0)
        # (accelerate's gather is torch.distributed's all_gather: the same shape and dtype on every process)
        assert theirs.shape == x.shape and theirs.dtype == x.dtype, (theirs.shape, x.shape)
        return torch.cat([x, theirs])

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
        assert trainer.accelerator.other == [], "rank 1 gathers more often than rank 0: DDP would hang"
        trainer.gathers = len(trainer.accelerator.record)  # (rank 0's all-gathers in the one micro-batch)
        two = {k: v[-1] for k, v in trainer._stats.items()}
        trainer._stats.clear()
        trainer.accelerator = real
        trainer.compute_loss(model, collator(rank0 + rank1))
    return two, {k: v[-1] for k, v in trainer._stats.items()}


def _kto_trainer(tmp_path):
    """(a KTO trainer on the tiny llama and four rows, two desirable, its Prepared, its model)."""
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
    return trainer, ours, model


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
    trainer, ours, model = _kto_trainer(tmp_path)
    good = [e for e in ours.train if e["desirable"]]
    bad = [e for e in ours.train if not e["desirable"]]
    two, one = _two_rank_stats(trainer, model, ours.collator, good, bad)
    keys = [k for k in _POOLED if k in one]
    assert len(keys) == 8 and set(keys) <= set(two), (keys, sorted(two))
    for key in keys:
        assert two[key] == pytest.approx(one[key], abs=1e-5, rel=1e-5), key


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_orpo_and_simpo_training_statistics_are_every_process_s(stage, tmp_path):
    """Two processes, one pair each: TRL's ORPOTrainer and CPOTrainer gather the log-probs, logits, NLL and (ORPO)
    log odds before the logged means, as they do the rewards, so rank 0 logs what one process holding both pairs
    logs; HEAD gathered the rewards/* only (log_rewards), so one row mixed the pooled rewards/chosen with rank 0's
    logps/chosen (rewards/chosen != beta * logps/chosen under DDP)."""
    from test_dpo_probe12 import _args, _lora
    from test_pref_probe14 import _prepared
    from tiny import save_tiny

    base = save_tiny(tmp_path / "llama")
    _, ours = _prepared(base, tmp_path, stage, 64, {})
    model = _lora(base)
    trainer = ours.trainer_class(model=model, args=_args(tmp_path / "dt"), data_collator=ours.collator)
    two, one = _two_rank_stats(trainer, model, ours.collator, ours.train[:1], ours.train[1:2])
    keys = ["rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen",
            "logits/rejected", "nll_loss"] + (["nll", "log_odds_ratio", "log_odds_chosen"] if stage == "orpo" else [])  # fmt: skip
    assert set(keys) <= set(two), sorted(two)
    for key in keys:
        assert two[key] == pytest.approx(one[key], abs=1e-5, rel=1e-5), key
    beta = trainer.align.beta  # (the row is consistent: the implicit reward is beta times the mean token log-prob)
    assert two["rewards/chosen"] == pytest.approx(beta * two["logps/chosen"], rel=1e-5)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_moe_aux_loss_is_every_process_s_mean(stage, tmp_path, monkeypatch):
    """A Mixture-of-Experts base's load-balancing loss: TRL logs gather_for_metrics(aux_loss).mean(), the processes'
    mean; rank 1's aux loss 1.0 and rank 0's 3.0 (a stand-in model_token_logprobs) give 2.0 on rank 0 (HEAD: 3.0,
    rank 0's own), and a single process logs its own 5.0."""
    import torch
    from test_dpo_probe12 import _args, _lora
    from test_pref_probe14 import _prepared
    from tiny import save_tiny

    import deltatune.train.dpo as dpo
    import deltatune.train.kto as kto

    module = dpo if stage == "dpo" else kto
    name = "model_token_logprobs" if stage == "dpo" else "sequence_logprobs"
    real, values = getattr(module, name), [1.0, 3.0, 5.0]

    def with_aux(model, batch, stats=None, aux=None):  # (the tiny llama has no router: its aux loss stood in)
        if aux is not None:
            aux.append(torch.tensor(values.pop(0)))
        return real(model, batch, stats)

    monkeypatch.setattr(module, name, with_aux)
    if stage == "dpo":
        base = save_tiny(tmp_path / "llama")
        _, ours = _prepared(base, tmp_path, stage, 64, {})
        model = _lora(base)
        trainer = ours.trainer_class(model=model, args=_args(tmp_path / "dt"), data_collator=ours.collator)
    else:
        trainer, ours, model = _kto_trainer(tmp_path)
    trainer.router_coef = 0.001
    two, one = _two_rank_stats(trainer, model, ours.collator, ours.train[:2], ours.train[2:4])
    assert (two["aux_loss"], one["aux_loss"]) == (2.0, 5.0)


@pytest.mark.parametrize("stage", ["dpo", "orpo", "simpo", "kto"])
def test_uneven_batches_gather_once_with_one_shape(stage, tmp_path):
    """Rank 0 with two pairs (KTO: three rows) and rank 1 with one: each micro-batch's statistics are one all-gather
    of a (1, k) tensor of sums and counts, the same shape on both (all_gather needs it; HEAD gathered each
    statistic's per-pair values, 7 gathers for DPO, of 2 rows against 1: a real DDP run fails there), and rank 0
    logs what one process holding all the pairs logs."""
    from test_dpo_probe12 import _args, _lora
    from test_pref_probe14 import _prepared
    from tiny import save_tiny

    if stage == "kto":
        trainer, ours, model = _kto_trainer(tmp_path)
    else:
        base = save_tiny(tmp_path / "llama")
        _, ours = _prepared(base, tmp_path, stage, 64, {})
        model = _lora(base)
        trainer = ours.trainer_class(model=model, args=_args(tmp_path / "dt"), data_collator=ours.collator)
    cut = 3 if stage == "kto" else 2
    two, one = _two_rank_stats(trainer, model, ours.collator, ours.train[:cut], ours.train[cut : cut + 1])
    assert set(one) <= set(two)
    for key in one:
        if key not in ("num_tokens", "kl"):  # (the running total; KTO's z0, TRL's mean of the processes' means)
            assert two[key] == pytest.approx(one[key], abs=1e-5, rel=1e-5), key
    # the statistics' gather, count_tokens' and (KTO) the KL reference point's
    assert trainer.gathers == {"dpo": 2, "kto": 3}.get(stage, 1)
