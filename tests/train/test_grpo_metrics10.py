"""GRPO's logged clip ratio as TRL 1.16 counts it (``clip_ratio/region_mean``: its region test on the delta-capped
ratio, over completion tokens, or over completions when GSPO gives one ratio per completion); hand-worked cases of
review 10c, where deltatune counted tokens under GSPO and counted a delta-capped ratio as clipped."""

import math

import torch

from deltatune.train.grpo_loss import grpo_loss


def _ratio(stats: dict) -> float:
    return (stats["clipped"] / stats["clip_units"]).item()


def test_under_gspo_the_clip_ratio_counts_completions():
    # completions of 1 and 4 tokens; the first's sequence ratio e^0.5 = 1.65 > 1.2 with A > 0: clipped; the
    # second's e^0 = 1: not. TRL: 1 of 2 completions (deltatune said 1 of 5 tokens).
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    logprobs = torch.tensor([[0.5, 0, 0, 0], [0.0, 0, 0, 0]])
    _, stats = grpo_loss(
        logprobs, torch.zeros(2, 4), torch.tensor([1.0, 1.0]), mask, importance_sampling_level="sequence"
    )
    assert _ratio(stats) == 0.5 and stats["tokens"].item() == 5  # (the KL still counts tokens)


def test_a_delta_capped_ratio_inside_the_region_is_not_counted():
    # ratio 1.15, A = -1, delta 1.1, eps 0.2: TRL tests the capped 1.1, inside [0.8, 1.2]: not clipped (the term
    # taken is the capped one, which carries gradient); deltatune counted it clipped
    logprobs = torch.full((1, 1), math.log(1.15), requires_grad=True)
    _, stats = grpo_loss(logprobs, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), delta=1.1)
    assert _ratio(stats) == 0.0


def test_token_level_counts_are_the_region_test_over_tokens():
    # ratios e^{0.3}=1.35 (A>0: high clip), e^{-0.3}=0.74 (A>0: none), on row 0; e^{-0.3} with A<0 (low clip),
    # a padded position not counted, on row 1: 2 of 3 tokens
    logprobs = torch.tensor([[0.3, -0.3], [-0.3, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    _, stats = grpo_loss(logprobs, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), mask)
    assert stats["clipped"].item() == 2 and stats["clip_units"].item() == 3
