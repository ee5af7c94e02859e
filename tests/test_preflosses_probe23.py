"""Probe 23 of the preference and reward losses (deltatune/train/reward.py, dpo.py, kto.py, orpo.py, simpo.py)
against TRL 1.16: the reward model's training statistics are every process's under DDP, as TRL's RewardTrainer
gathers them (the other preference stages' since probe 19)."""

import torch
from test_pref_probe19 import _two_rank_stats

from deltatune.data.preference import PairCollator
from deltatune.train.reward import RewardTrainer

_RM_STATS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")


def _rm_trainer(tmp_path):
    from test_dpo_probe12 import _args
    from tiny import tiny_config
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("llama", num_labels=1, pad_token_id=0))
    model.train()
    return RewardTrainer(model=model, args=_args(tmp_path / "rm"), data_collator=PairCollator(0)), model


def _pair(chosen: list[int], rejected: list[int]) -> dict:
    return {side: {"input_ids": ids, "attention_mask": [1] * len(ids)} for side, ids in (("chosen", chosen),
                                                                                          ("rejected", rejected))}  # fmt: skip


def _by_hand(scores: torch.Tensor) -> dict[str, float]:
    chosen, rejected = scores.chunk(2)
    return {"accuracy": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item(),
            "min_reward": scores.min().item(), "mean_reward": scores.mean().item(), "max_reward": scores.max().item()}  # fmt: skip


def test_rm_training_statistics_are_every_process_s(tmp_path):
    """Two processes, two pairs each: TRL's RewardTrainer logs min_reward, mean_reward and max_reward of every
    process's scores (accelerator.gather of the logits) and accuracy and margin as the processes' mean (equal batches:
    the mean over all the pairs), so rank 0 logs what one process holding the four pairs logs, and what the four
    pairs' scores give by hand; HEAD logged rank 0's two pairs alone (one all-gather per micro-batch here, the
    num_tokens count's beside it)."""
    trainer, model = _rm_trainer(tmp_path)
    collator = trainer.data_collator
    rank0 = [_pair([5, 6, 7], [5, 9]), _pair([11, 12], [13, 14, 15, 16])]
    rank1 = [_pair([3, 40], [31, 5, 6]), _pair([57, 10], [54])]  # (rank 1: accuracy 0, the lowest and highest score)
    two, one = _two_rank_stats(trainer, model, collator, rank0, rank1)
    with torch.no_grad():
        scores = model(**collator(rank0 + rank1)).logits.squeeze(-1)
    by_hand = _by_hand(scores)
    assert 0 < by_hand["accuracy"] < 1  # (the two ranks' pairs differ in the statistics)
    alone = _by_hand(
        scores[[0, 1, 4, 5]]
    )  # (rank 0's chosen and rejected: each statistic of its pairs alone is another)
    assert all(abs(alone[k] - by_hand[k]) > 1e-4 for k in _RM_STATS), (alone, by_hand)
    for key in _RM_STATS:
        assert abs(two[key] - one[key]) < 1e-6 and abs(one[key] - by_hand[key]) < 1e-6, (key, two, one, by_hand)


def test_dpo_precomputes_the_train_reference_in_train_sized_batches(tmp_path):
    """TRL 1.16's DPOTrainer precomputes the train split's reference log-probs ``precompute_ref_batch_size or
    per_device_train_batch_size`` pairs per forward, the eval split's ``... or per_device_eval_batch_size`` (as
    deltatune's KTO does); HEAD scored the train pairs in eval-sized forwards (3 + 1 pairs here, where train.batch_size
    2 gives 2 + 2: a train.eval_batch_size set large for a fast evaluation could run out of memory before the first
    step). The values are those scored one pair at a time."""
    from test_dpo_probe12 import _lora
    from test_pref_probe14 import _prepared
    from tiny import save_tiny
    from transformers import TrainingArguments

    base = save_tiny(tmp_path / "llama")
    _, ours = _prepared(base, tmp_path, "dpo", 64, {"precompute_ref": True})
    rows = (ours.train * 2)[:4]
    sizes = []

    def collator(chunk):
        sizes.append(len(chunk))
        return ours.collator(chunk)

    args = TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True, per_device_train_batch_size=2,
                             per_device_eval_batch_size=3)  # fmt: skip
    trainer = ours.trainer_class(model=_lora(base), args=args, data_collator=collator, train_dataset=rows,
                                 eval_dataset=rows)  # fmt: skip
    assert sizes == [2, 2, 3, 1]  # (train, then eval)
    single = ours.trainer_class.func._with_ref(trainer, rows, 1)
    for got, want in zip(trainer.train_dataset, single, strict=True):
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            assert abs(got[key] - want[key]) < 1e-5
