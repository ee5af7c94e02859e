"""PPO against TRL's PPO trainer on a fixed rollout (probe 11).

TRL 1.16 (the .venv's) no longer ships its PPO trainer; ``first_true_indices`` is still in ``trl.experimental.utils``
and is imported from there. The rest of the reference below is TRL's own code, copied from
``trl/experimental/ppo/ppo_trainer.py`` (huggingface/trl, commit 0062ee10a9bc): ``masked_mean``, ``masked_var``,
``masked_whiten``, ``truncate_response`` (trl/trainer/utils.py before the move), the rollout's steps 3-6 (missing-EOS
penalty, padding masks, rewards, whitening, GAE) and the mini-batch loop (losses, statistics), with TRL's
``forward`` (attention mask = not pad, position ids = exclusive cumsum) over deltatune's policy and value head.
The only change is ``fix_3750``: TRL puts the score one past the EOS, on the first pad, and bootstraps from the
value there (huggingface/trl#3750, PR #5338); deltatune puts it on the EOS and ends the episode there, on purpose
(so the values, the rewards' whitening and the returns cover the response tokens, the EOS the last of them).
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from deltatune import LoraConfig, get_delta_model
from deltatune.config import ConfigError
from deltatune.train.config import AlignArgs
from deltatune.train.config_align import validate_align
from deltatune.train.ppo import PPOLoop, Rollout, adamw_groups, sample_responses
from deltatune.train.ppo_math import kl_penalty, ppo_advantages

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
PAD, EOS, INVALID_LOGPROB = 0, 3, 1.0


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    from trl.experimental.utils import first_true_indices as trl_first_true_indices

    return trl_first_true_indices(bools)


# -- TRL's code (see the module docstring) ---------------------------------------------------------------------


def masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        variance = variance * mask_sum / (mask_sum - 1)
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def truncate_response(stop_token_id, pad_token_id, responses):
    trunc_idxs = first_true_indices(responses == stop_token_id).unsqueeze(-1)
    new_size = [1] * (len(responses.size()) - 1) + [responses.shape[1]]
    idxs = torch.arange(responses.shape[1], device=responses.device).view(*new_size)
    return torch.masked_fill(responses, idxs > trunc_idxs, pad_token_id)


def trl_targets(responses, logprobs, ref_logprobs, values, scores, args, fix_3750=False):
    """TRL's train loop, steps 1 and 3-6, on a rollout's tensors (pad != eos; stop_token = eos)."""
    postprocessed_responses = truncate_response(EOS, PAD, responses)
    sequence_lengths = first_true_indices(postprocessed_responses == PAD) - 1
    scores = scores.clone()
    contain_eos_token = torch.any(postprocessed_responses == EOS, dim=-1)
    if args.missing_eos_penalty is not None:
        scores[~contain_eos_token] -= args.missing_eos_penalty
    response_idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    value_mask = padding_mask if fix_3750 else padding_mask_p1  # (the positions after the episode, values 0)
    values = torch.masked_fill(values, value_mask, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -args.kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, sequence_lengths if fix_3750 else actual_end] += scores
    if args.whiten_rewards:
        reward_mask = padding_mask if fix_3750 else padding_mask_p1
        rewards = masked_whiten(rewards, mask=~reward_mask, shift_mean=False)
        rewards = torch.masked_fill(rewards, reward_mask, 0)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
        lastgaelam = delta + args.gamma * args.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return SimpleNamespace(**{k: v for k, v in locals().items() if isinstance(v, torch.Tensor)})


def trl_forward(model, value_head, query_responses):
    """TRL's ``forward`` over PolicyAndValueWrapper: logits, and the value head on the policy's last hidden state."""
    attention_mask = query_responses != PAD
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False)  # fmt: skip
    return out, value_head(out.hidden_states[-1].float())


def trl_update(model, value_head, optimizer, query_responses, context_length, t, args, b_inds_per_epoch):
    """TRL's PPO epochs / mini-batches / micro-batches (accelerate: loss / grad_acc, one step per grad_acc)."""
    responses = query_responses[:, context_length:]
    stats = {k: [] for k in ("approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")}
    micro_done = 0
    for ppo_epoch_idx in range(args.num_ppo_epochs):
        b_inds = b_inds_per_epoch[ppo_epoch_idx]
        for mini_batch_start in range(0, args.local_batch_size, args.local_mini_batch_size):
            mini_batch_inds = b_inds[mini_batch_start : mini_batch_start + args.local_mini_batch_size]
            for micro_batch_start in range(0, args.local_mini_batch_size, args.per_device_train_batch_size):
                micro_batch_inds = mini_batch_inds[
                    micro_batch_start : micro_batch_start + args.per_device_train_batch_size
                ]
                mb_advantage = t.advantages[micro_batch_inds]
                mb_responses = responses[micro_batch_inds]
                mb_logprobs = t.logprobs[micro_batch_inds]
                mb_return = t.returns[micro_batch_inds]
                mb_values = t.values[micro_batch_inds]
                output, vpred_temp = trl_forward(model, value_head, query_responses[micro_batch_inds])
                logits = output.logits[:, context_length - 1 : -1].float()
                logits /= args.temperature + 1e-7
                new_logprobs = torch.log_softmax(logits, -1).gather(-1, mb_responses.unsqueeze(-1)).squeeze(-1)
                new_logprobs = torch.masked_fill(new_logprobs, t.padding_mask[micro_batch_inds], INVALID_LOGPROB)
                vpred = vpred_temp[:, context_length - 1 : -1].squeeze(-1)
                vpred = torch.masked_fill(vpred, t.value_mask[micro_batch_inds], 0)
                vpredclipped = torch.clamp(vpred, mb_values - args.cliprange_value, mb_values + args.cliprange_value)
                vf_losses1 = torch.square(vpred - mb_return)
                vf_losses2 = torch.square(vpredclipped - mb_return)
                vf_loss_max = torch.max(vf_losses1, vf_losses2)
                vf_loss = 0.5 * masked_mean(vf_loss_max, ~t.value_mask[micro_batch_inds])
                vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~t.value_mask[micro_batch_inds])
                logprobs_diff = new_logprobs - mb_logprobs
                ratio = torch.exp(logprobs_diff)
                pg_losses = -mb_advantage * ratio
                pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
                pg_loss_max = torch.max(pg_losses, pg_losses2)
                pg_loss = masked_mean(pg_loss_max, ~t.padding_mask[micro_batch_inds])
                loss = pg_loss + args.vf_coef * vf_loss
                (loss / args.gradient_accumulation_steps).backward()
                micro_done += 1
                if micro_done % args.gradient_accumulation_steps == 0:
                    optimizer.step()
                    optimizer.zero_grad()
                with torch.no_grad():
                    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~t.padding_mask[micro_batch_inds])
                    prob_dist = torch.nn.functional.softmax(logits, dim=-1)
                    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
                    for key, v in zip(stats, (0.5 * (logprobs_diff**2).mean(), pg_clipfrac, pg_loss, vf_loss,
                                              vf_clipfrac, entropy.mean(), ratio.mean())):  # fmt: skip
                        stats[key].append(v.item())
    stats = {k: torch.tensor(v) for k, v in stats.items()}
    mean_non_score_reward = t.non_score_reward.sum(1).mean()
    return {
        "objective/kl": t.kl.sum(1).mean().item(),
        "objective/entropy": (-t.logprobs).sum(1).mean().item(),
        "objective/non_score_reward": mean_non_score_reward.item(),
        "objective/rlhf_reward": (mean_non_score_reward + t.scores.mean()).item(),
        "objective/scores": t.scores.mean().item(),
        "policy/approxkl_avg": stats["approxkl"].mean().item(),
        "policy/clipfrac_avg": stats["pg_clipfrac"].mean().item(),
        "loss/policy_avg": stats["pg_loss"].mean().item(),
        "loss/value_avg": stats["vf_loss"].mean().item(),
        "val/clipfrac_avg": stats["vf_clipfrac"].mean().item(),
        "policy/entropy_avg": stats["entropy"].mean().item(),
        "val/ratio": stats["ratio"].mean().item(),
        "val/ratio_var": stats["ratio"].var().item(),
    }


# -- a fixed rollout -------------------------------------------------------------------------------------------


def _rollout_tensors(seed: int, B: int = 6, R: int = 7, eos_rows: bool = True):
    """Random log-probs, values, scores and responses (rows 0 and 1 end with an EOS at 2 and 5 when ``eos_rows``)."""
    g = torch.Generator().manual_seed(seed)
    responses = torch.randint(4, 40, (B, R), generator=g)
    if eos_rows:
        responses[0, 2], responses[1, 5] = EOS, EOS
        responses[0, 3:] = PAD  # (what generate leaves after an EOS)
        responses[1, 6:] = PAD
    logprobs = -torch.rand(B, R, generator=g) * 3
    ref_logprobs = logprobs + torch.randn(B, R, generator=g) * 0.3
    values = torch.randn(B, R, generator=g)
    scores = torch.randn(B, generator=g) * 2
    return responses, logprobs, ref_logprobs, values, scores


def _mask(responses: torch.Tensor) -> torch.Tensor:
    """deltatune's response mask: 1 up to and including the first EOS."""
    is_eos = responses == EOS
    return (~((is_eos.cumsum(-1) - is_eos.long()) > 0)).float()


def _args(**kw) -> SimpleNamespace:
    base = dict(kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, whiten_rewards=False, missing_eos_penalty=None)
    return SimpleNamespace(**{**base, **kw})


SETTINGS = [
    {},
    {"kl_estimator": "k3"},
    {"whiten_rewards": True, "gamma": 0.9, "lam": 0.8},
    {"kl_estimator": "k3", "whiten_rewards": True, "kl_coef": 0.3, "missing_eos_penalty": 1.5},
]


@pytest.mark.parametrize("kw", SETTINGS, ids=["k1", "k3", "whiten_rewards", "k3_whiten_penalty"])
def test_targets_equal_trls_on_responses_without_eos(kw):
    """No EOS in any response: TRL's score lands on the last token, as deltatune's; every tensor agrees (1e-6)."""
    responses, logprobs, ref_logprobs, values, scores = _rollout_tensors(0, eos_rows=False)
    args = _args(**kw)
    want = trl_targets(responses, logprobs, ref_logprobs, values, scores, args)
    mask = _mask(responses)
    assert mask.all()
    penalised = scores - (args.missing_eos_penalty or 0.0)  # (no response has an EOS: each is penalised)
    got = ppo_advantages(logprobs * mask, ref_logprobs * mask, values * mask, penalised, mask, args.kl_coef,
                         args.gamma, args.lam, args.kl_estimator, args.whiten_rewards)  # fmt: skip
    for key in ("kl", "non_score_reward", "rewards", "advantages", "returns"):
        diff = (got[key] - getattr(want, key)).abs().max().item()
        assert diff < 1e-6, (key, diff)
    assert got["advantages"].abs().max() > 0.1  # (not all zero)


@pytest.mark.parametrize("kw", SETTINGS, ids=["k1", "k3", "whiten_rewards", "k3_whiten_penalty"])
def test_targets_with_eos_equal_trls_with_the_score_on_the_eos(kw):
    """Responses with an EOS: deltatune equals TRL with the fix of huggingface/trl#3750 (score on the EOS, no value
    after it) to 1e-6 on the response tokens; unfixed TRL puts the score on the first pad after the EOS."""
    responses, logprobs, ref_logprobs, values, scores = _rollout_tensors(1)
    args = _args(**kw)
    want = trl_targets(responses, logprobs, ref_logprobs, values, scores, args, fix_3750=True)
    mask = _mask(responses)
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0] and mask[1].sum() == 6
    truncated = ~(responses == EOS).any(-1)
    penalised = scores - (args.missing_eos_penalty or 0.0) * truncated.float()
    got = ppo_advantages(logprobs * mask, ref_logprobs * mask, values * mask, penalised, mask, args.kl_coef,
                         args.gamma, args.lam, args.kl_estimator, args.whiten_rewards)  # fmt: skip
    for key in ("kl", "non_score_reward", "advantages", "returns"):
        diff = ((got[key] - getattr(want, key)) * mask).abs().max().item()
        assert diff < 1e-6, (key, diff)
    if not args.whiten_rewards:
        assert (got["rewards"] - want.rewards * mask).abs().max() < 1e-6
    unfixed = trl_targets(responses, logprobs, ref_logprobs, values, scores, args)
    assert unfixed.padding_mask[0].tolist() == (mask[0] == 0).tolist()  # (the policy's tokens are the same)
    if not args.whiten_rewards:  # TRL's score sits on position 3 of row 0, the pad after its EOS at 2
        assert abs(unfixed.rewards[0, 3] - unfixed.scores[0]) < 1e-6


def test_kl_estimators_by_hand():
    """log pi = log 0.5, log ref = log 0.25: log r = log(ref / pi) = -log 2.
    k1 = -log r = 0.693147; k3 = (r - 1) - log r = -0.5 + 0.693147 = 0.193147."""
    lp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([0.693147]), atol=1e-6, rtol=0)
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.tensor([0.193147]), atol=1e-6, rtol=0)


def test_truncation_after_the_stop_token_as_trls():
    """sample_responses' postprocessing equals TRL's truncate_response (pad after the first EOS) and its response
    mask TRL's ~padding_mask (pad != eos), on a generate that returns fixed tokens, EOS twice in one row."""
    generated = torch.tensor([[5, 3, 7, 3, 9], [5, 6, 7, 8, 9], [3, 4, 4, 4, 4]])

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = None

        def generate(self, input_ids, attention_mask, generation_config):
            return torch.cat([input_ids, generated], 1)

    ids, _, response_mask, response, truncated = sample_responses(
        Fixed(), [[4, 5], [6], [7, 8]], PAD, EOS, AlignArgs()
    )
    want = truncate_response(EOS, PAD, generated)
    assert torch.equal(response, want)
    seq_len = first_true_indices(want == PAD) - 1
    padding_mask = torch.arange(5).repeat(3, 1) > seq_len.unsqueeze(1)
    assert torch.equal(response_mask.bool(), ~padding_mask)
    assert truncated.tolist() == [False, True, False]


# -- one optimisation step from the same start ---------------------------------------------------------------


def _policy():
    config = AutoConfig.for_model(
        "llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=48, pad_token_id=PAD, bos_token_id=2, eos_token_id=EOS,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    model = get_delta_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 would leave the first step's ratio at exactly 1 everywhere
            torch.nn.init.normal_(p, std=0.05)
    return model


class _Tok:
    eos_token_id, pad_token_id = EOS, PAD


def _fixed_rollout(loop: PPOLoop, eos_rows: bool) -> Rollout:
    """Four left-padded prompts and fixed responses (row 0 ends with an EOS at 2 when ``eos_rows``), scored by the
    loop's own forward (old log-probs, values) and reference (adapter off)."""
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]]
    P = 4
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    prompt_mask = (ids != PAD).long()
    responses = torch.randint(4, 40, (4, 5), generator=torch.Generator().manual_seed(3))
    if eos_rows:
        responses[0, 2], responses[0, 3:] = EOS, PAD
    mask = _mask(responses).long()
    r = Rollout(torch.cat([ids, responses], 1), torch.cat([prompt_mask, mask], 1), mask, P,
                None, None, None, None, [], [], truncated=~(responses == EOS).any(-1))  # fmt: skip
    with torch.no_grad():
        logp, values, _ = loop._forward(r)
    r.logprobs, r.values = logp * mask, values * mask
    r.ref_logprobs = loop.reference_logprobs(r) * mask
    r.scores = torch.tensor([1.0, -0.5, 2.0, 0.3])
    return r


STEP_SETTINGS = [
    dict(kl_estimator="k1", ppo_epochs=2, num_mini_batches=1, grad_accum=2, temperature=1.0),
    dict(kl_estimator="k3", whiten_rewards=True, missing_eos_penalty=1.0, ppo_epochs=1, num_mini_batches=2,
         grad_accum=1, temperature=0.7),
]  # fmt: skip


@pytest.mark.parametrize("eos_rows", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("kw", STEP_SETTINGS, ids=["k1_accum", "k3_whiten_minibatches"])
def test_one_step_equals_trls_from_the_same_start(kw, eos_rows):
    """One PPO step (update half) on a fixed rollout: the LoRA and value-head parameters after it equal those after
    TRL's loop from the same start with the same AdamW (max abs diff < 1e-6), and the step's metrics TRL's (1e-5).
    TRL clips no gradient: train.max_grad_norm 0 here. With an EOS in row 0, against TRL with the score on the EOS
    (fix_3750); then TRL's token averages that count the padding after the EOS differ (approxkl, ratio, entropy;
    its objective/entropy counts -1 per pad: 2 pads over 4 rows, 0.5 lower), the rest agree."""
    kw = dict(kw)
    grad_accum = kw.pop("grad_accum")
    align = AlignArgs(init_kl_coef=0.1, cliprange=0.1, cliprange_value=0.05, vf_coef=0.5, **kw)
    validate_align(align, "ppo")
    model = _policy()
    loop = PPOLoop(model, _Tok(), lambda p, r: [0.0] * len(p), align, lr=3e-2, max_grad_norm=0.0,
                   grad_accum=grad_accum)  # fmt: skip
    torch.nn.init.normal_(loop.value_head.weight, std=0.3)
    r = _fixed_rollout(loop, eos_rows=eos_rows)
    ref_model, ref_head = copy.deepcopy(model), copy.deepcopy(loop.value_head)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    torch.manual_seed(7)
    stats = loop.update(r)

    B = 4
    args = SimpleNamespace(
        kl_coef=0.1, kl_estimator=align.kl_estimator, gamma=1.0, lam=0.95, whiten_rewards=align.whiten_rewards,
        missing_eos_penalty=align.missing_eos_penalty, num_ppo_epochs=align.ppo_epochs, cliprange=0.1,
        cliprange_value=0.05, vf_coef=0.5, temperature=align.temperature, local_batch_size=B,
        local_mini_batch_size=B // align.num_mini_batches, gradient_accumulation_steps=grad_accum,
        per_device_train_batch_size=B // align.num_mini_batches // grad_accum,
    )  # fmt: skip
    m = r.response_mask.bool()
    t = trl_targets(r.sequences[:, 4:], r.logprobs, r.ref_logprobs, r.values, r.scores, args, fix_3750=eos_rows)
    both = torch.nn.ModuleDict({"policy": ref_model, "value_head": ref_head})
    opt = torch.optim.AdamW(adamw_groups(both, 0.0), lr=3e-2, weight_decay=0.0)
    torch.manual_seed(7)
    perms = [torch.randperm(B) for _ in range(args.num_ppo_epochs)]  # (the loop's shuffles, torch's not numpy's)
    want = trl_update(ref_model, ref_head, opt, r.sequences, 4, t, args, perms)

    assert m.sum() == 20 - 2 * eos_rows
    moved = 0.0
    for (name, p), q in zip(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad],
        [q for n, q in ref_model.named_parameters() if q.requires_grad],
    ):
        # 5e-6: Adam's first steps move an element by ~lr whatever its gradient's size, so a near-zero gradient
        # element summed in another order moves 2.9e-6 apart (this AMD EPYC's kernels; 1e-6 held on the Intel Xeon)
        assert (p - q).abs().max() < 5e-6, name
        moved = max(moved, (p - start[name]).abs().max().item())
    assert moved > 1e-3  # (the step did move them)
    for a, b in zip(loop.value_head.parameters(), ref_head.parameters()):
        assert (a - b).abs().max() < 1e-6
    padded = ("policy/approxkl_avg", "val/ratio", "val/ratio_var", "policy/entropy_avg", "objective/entropy")
    for key, value in want.items():
        if not (eos_rows and key in padded):
            assert stats[key] == pytest.approx(value, abs=1e-5), key
    if eos_rows:
        assert stats["objective/entropy"] - 0.5 == pytest.approx(want["objective/entropy"], abs=1e-5)
    assert want["policy/clipfrac_avg"] > 0 or want["val/clipfrac_avg"] > 0  # (clipping was exercised)


def test_trl_names_are_accepted_and_checked():
    """align.kl_coef / num_ppo_epochs / response_length (TRL's names) set init_kl_coef / ppo_epochs / max_new_tokens;
    both set differently is one line; kl_estimator other than k1 / k3 and a negative missing_eos_penalty are refused."""
    a = AlignArgs(kl_coef=0.05, num_ppo_epochs=2, response_length=7)
    validate_align(a, "ppo")
    assert (a.init_kl_coef, a.ppo_epochs, a.max_new_tokens) == (0.05, 2, 7)
    for bad, words in ((dict(kl_coef=0.05, init_kl_coef=0.3), "align.kl_coef"),
                       (dict(response_length=7, max_new_tokens=9), "align.response_length"),
                       (dict(kl_estimator="k2"), "align.kl_estimator"),
                       (dict(missing_eos_penalty=-1.0), "align.missing_eos_penalty"),
                       (dict(num_mini_batches=0), "align.num_mini_batches")):  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            validate_align(AlignArgs(**bad), "ppo")


def test_num_mini_batches_must_divide_the_batch():
    align = AlignArgs(num_mini_batches=3, ppo_epochs=1)
    loop = PPOLoop(_policy(), _Tok(), lambda p, r: [0.0] * len(p), align, max_grad_norm=0.0)
    r = _fixed_rollout(loop, eos_rows=True)
    with pytest.raises(ConfigError, match="align.num_mini_batches"):
        loop.update(r)


# -- review 11a: grad_accum micro-batches, num_mini_batches, TRL's names ---------------------------------------


RAW = {"model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}}


@pytest.mark.parametrize("mini, grad_accum, words", [(4, 3, "mini-batch of 4"), (3, 2, "mini-batch of 3"),
                                                      (3, 1, None), (4, 2, None), (4, 4, None)])  # fmt: skip
def test_grad_accum_must_split_every_mini_batch_evenly(mini, grad_accum, words):
    """train.grad_accum splits each mini-batch into grad_accum equal micro-batches (each loss / grad_accum, as
    accelerate's): a grad_accum that does not divide a mini-batch is one line, before any forward (HEAD split 4 rows
    by grad_accum 3 into 2 + 2, and 3 rows by 2 into 2 + 1 with each micro mean / 2: rows weighed 1/4, 1/4, 1/2)."""
    align = AlignArgs(ppo_epochs=1, mini_batch_size=mini)
    validate_align(align, "ppo")
    loop = PPOLoop(_policy(), _Tok(), lambda p, r: [0.0] * len(p), align, lr=0.0, max_grad_norm=0.0,
                   grad_accum=grad_accum)  # fmt: skip
    r = _fixed_rollout(loop, eos_rows=False)
    sizes = []
    forward = loop._forward
    loop._forward = lambda sub, with_values=True: (sizes.append(len(sub.sequences)), forward(sub, with_values))[1]
    if words:
        with pytest.raises(ConfigError, match=f"train.grad_accum {grad_accum} does not divide PPO's {words}"):
            loop.update(r)
        assert sizes == []
        return
    loop.update(r)
    want = [mini // grad_accum] * grad_accum + [(4 - mini) // grad_accum] * grad_accum * (mini < 4)
    assert sorted(sizes) == sorted(want)


def test_grad_accum_checks_the_last_mini_batch_before_the_model_loads():
    """prepare_ppo's check (config_align.ppo_micro_batches, no model): the last mini-batch counts too."""
    from deltatune.train.config_align import ppo_micro_batches

    assert ppo_micro_batches(AlignArgs(mini_batch_size=4), 6, 2) == 4  # 4 + 2: both split in two
    with pytest.raises(ConfigError, match=r"last mini-batch \(train.batch_size 5\) of 1 rollouts"):
        ppo_micro_batches(AlignArgs(mini_batch_size=4), 5, 2)
    with pytest.raises(ConfigError, match="train.grad_accum 4 does not divide PPO's mini-batch of 2"):
        ppo_micro_batches(AlignArgs(num_mini_batches=4), 8, 4)


def test_num_mini_batches_sets_mini_batch_size():
    """align.num_mini_batches sets align.mini_batch_size to train.batch_size / num_mini_batches (run.yaml and the
    report then state the size the loop uses); a different mini_batch_size set beside it is one line."""
    a = AlignArgs(num_mini_batches=4)
    validate_align(a, "ppo", batch_size=8)
    assert a.mini_batch_size == 2
    same = AlignArgs(num_mini_batches=4, mini_batch_size=2)
    validate_align(same, "ppo", batch_size=8)
    assert same.mini_batch_size == 2
    with pytest.raises(ConfigError, match=r"align.mini_batch_size 4 and align.num_mini_batches 4 .* = 2\) are both"):
        validate_align(AlignArgs(num_mini_batches=4, mini_batch_size=4), "ppo", batch_size=8)  # (4: the default)
    with pytest.raises(ConfigError, match="train.batch_size 6 is not a multiple of align.num_mini_batches 4"):
        validate_align(AlignArgs(num_mini_batches=4), "ppo", batch_size=6)
    grpo = AlignArgs(num_mini_batches=4)  # (grpo reads mini_batch_size as completions per forward)
    validate_align(grpo, "grpo", batch_size=8)
    assert grpo.mini_batch_size == 4


@pytest.mark.parametrize("align, words", [
    ({"kl_coef": -1}, "align.kl_coef must be >= 0, got -1"),
    ({"num_ppo_epochs": 0}, "align.num_ppo_epochs must be >= 1, got 0"),
    ({"response_length": 0}, "align.response_length must be >= 1, got 0"),
    ({"ppo_epochs": 4, "num_ppo_epochs": 2}, "align.num_ppo_epochs .TRL's name. and align.ppo_epochs are both set"),
    ({"init_kl_coef": 0.2, "kl_coef": 0.1}, "align.kl_coef .TRL's name. and align.init_kl_coef are both set"),
])  # fmt: skip
def test_trl_names_name_the_key_written(align, words):
    """A bad TRL-named key is named as the recipe wrote it; one set beside deltatune's, even to deltatune's default
    (ppo_epochs: 4), is refused rather than silently winning."""
    from deltatune.train.config import build

    with pytest.raises(ConfigError, match=words):
        build({**RAW, "stage": "ppo", "align": align})


def test_trl_names_on_other_stages():
    """On dpo, kl_coef is named ignored as written (not also align.init_kl_coef); grpo reads response_length."""
    from deltatune.train.config import build, ignored_keys

    cfg = build({**RAW, "stage": "dpo", "align": {"kl_coef": 0.1}})
    assert ignored_keys(cfg) == [("align.kl_coef", "ppo")]
    assert cfg.align.init_kl_coef == AlignArgs().init_kl_coef  # (the default: kl_coef is not copied on dpo)
    cfg = build({**RAW, "stage": "grpo", "align": {"response_length": 9}})
    assert cfg.align.max_new_tokens == 9 and ignored_keys(cfg) == []
    cfg = build({**RAW, "stage": "ppo", "align": {"ppo_epochs": 2, "num_ppo_epochs": 2, "kl_coef": 0.2}})
    assert (cfg.align.ppo_epochs, cfg.align.init_kl_coef) == (2, 0.2)


def test_prepare_ppo_states_the_loops_mini_batch_and_checks_grad_accum(tmp_path):
    """The report's PPO note states the mini-batch the loop uses (train.batch_size / num_mini_batches: HEAD stated
    align.mini_batch_size, 4); an uneven train.grad_accum is refused by prepare_ppo, before any model loads."""
    import json

    from tiny import save_tiny, tokenizer

    from deltatune.train.config import build
    from deltatune.train.ppo import prepare_ppo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abcdefgh"))
    raw = {"stage": "ppo", "model": {"name_or_path": save_tiny(tmp_path / "llama")}, "data": {"train": str(prompts)},
           "align": {"reward_model": "operator:add", "num_mini_batches": 4}}  # fmt: skip
    notes = prepare_ppo(build({**raw, "train": {"batch_size": 8}}), tokenizer()).notes
    assert notes[0].startswith("PPO: 4 epochs of mini-batches of 2 per batch of 8 rollouts")
    with pytest.raises(ConfigError, match="train.grad_accum 4 does not divide PPO's mini-batch of 2 rollouts"):
        prepare_ppo(build({**raw, "train": {"batch_size": 8, "grad_accum": 4}}), tokenizer())
