"""Probe 25 of stage rm and PPO's math: a CSV preference file's margin column (read as TRL reads it, through
datasets' CSV builder) and PPO's rewards, GAE and whitening against TRL's PPO trainer's steps 4-6."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tiny import save_tiny

from deltatune.train import build
from deltatune.train.models import load_tokenizer
from deltatune.train.ppo_math import ppo_advantages
from deltatune.train.reward import pairwise_losses
from deltatune.train.table import prepare


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("rm25") / "llama")


def test_a_csv_margin_column_trains_as_trls_reward_trainer_reads_it(base, tmp_path):
    """A CSV's fields are text: HEAD refused every margin of a .csv or .tsv file ("must be a finite number, got
    '0.5'"), which TRL's RewardTrainer (datasets' CSV builder: a float column) trains on. Now read as the number it
    writes; an empty field (datasets: None) is still refused naming the row."""
    from deltatune.data.load import DataError

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,margin\nhello there, hi, go away,0.5\ntell me, a story, no,-1.25\n"
                    "what is it, a cat, a dog, 2e-1\n")  # fmt: skip
    tok = load_tokenizer(base)
    recipe = {"stage": "rm", "model": {"name_or_path": base}, "train": {"report_to": ["none"]},
              "data": {"train": str(path), "max_length": 32}, "output": {"dir": str(tmp_path / "r")}}  # fmt: skip
    prepared = prepare(build(recipe), tok)
    theirs = Dataset.from_csv(str(path))["margin"]  # (TRL's load_dataset("csv"))
    batch = prepared.collator(prepared.train)
    assert batch["margin"].tolist() == pytest.approx(theirs)
    chosen, rejected = torch.tensor([0.3, -0.2, 1.0]), torch.tensor([0.1, 0.4, 0.9])
    trl = -torch.nn.functional.logsigmoid(chosen - rejected - torch.tensor(theirs, dtype=torch.float))
    assert torch.allclose(pairwise_losses(chosen, rejected, batch["margin"]), trl)

    path.write_text("prompt,chosen,rejected,margin\nhello there, hi, go away,0.5\ntell me, a story, no,\n")
    with pytest.raises(DataError, match=r"pairs.csv:3: column 'margin' must be a finite number"):
        prepare(build(recipe), tok)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo_rewards_gae_and_whitening_equal_trls_loop_on_responses_without_eos(estimator):
    """TRL's PPOTrainer's steps 4-6 written out (its loop, on responses with no padding: where the score goes and the
    masks of the two agree): KL penalty, the score on the last token, whiten_rewards, GAE, the whitened advantages."""
    g = torch.Generator().manual_seed(0)
    B, R, coef, gamma, lam = 3, 6, 0.05, 0.9, 0.8
    (lp, ref, values), scores = (torch.randn(B, R, generator=g) for _ in range(3)), torch.randn(B, generator=g)
    for whiten_rewards in (False, True):
        ours = ppo_advantages(lp, ref, values, scores, torch.ones(B, R), coef, gamma, lam, estimator, whiten_rewards)
        logr = ref - lp
        kl = -logr if estimator == "k1" else (logr.exp() - 1) - logr
        rewards = -coef * kl
        rewards[:, -1] += scores
        if whiten_rewards:  # masked_whiten(shift_mean=False): the unbiased variance, the mean added back
            rewards = (rewards - rewards.mean()) * torch.rsqrt(rewards.var() + 1e-8) + rewards.mean()
        last, advs = 0.0, []
        for t in reversed(range(R)):
            nextvalues = values[:, t + 1] if t < R - 1 else 0.0
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            last = delta + gamma * lam * last
            advs.append(last)
        advantages = torch.stack(advs[::-1], 1)
        returns = advantages + values
        advantages = (advantages - advantages.mean()) * torch.rsqrt(advantages.var() + 1e-8)
        assert torch.allclose(ours["rewards"], rewards, atol=1e-6)
        assert torch.allclose(ours["returns"], returns, atol=1e-6)
        assert torch.allclose(ours["advantages"], advantages, atol=1e-5)
