"""Probe 10 of stage grpo against TRL 1.16's GRPOTrainer: its loss types (grpo, bnpo, dapo, dr_grpo), clip-higher
(epsilon_high), the two-sided clip (delta), sequence-level importance sampling (GSPO), the top-entropy token mask,
scale_rewards group / batch / none, and mask_truncated_completions; each on the same injected completions and
rewards on both sides, losses and gradients to 1e-6."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import trl
from datasets import Dataset
from tiny import grpo_batch, grpo_step_against_trl, save_tiny, tokenizer
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.train.config import AlignArgs, validate_align
from deltatune.train.config_align import grpo_loss_norm
from deltatune.train.grpo import group_advantages, grpo_loss, high_entropy_mask

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dt.DeltaModel:
    base = save_tiny(tmp_path_factory.mktemp("tiny") / "llama")
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():  # a trained-looking adapter: the policy is no longer the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        model.get_output_embeddings().weight.mul_(10)  # peaked distributions: entropies differ beyond fp noise
    return model.eval()


def trl_trainer(model, tmp_path, n: int, **kwargs):
    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=n, report_to=[], use_cpu=True, bf16=False,
                          temperature=TEMPERATURE, **kwargs)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = dt.trl_trainer(trl.GRPOTrainer)(
            model=model, args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * n),
            processing_class=tokenizer(), reward_funcs=lambda completions, **_: [0.0] * len(completions),
        )  # fmt: skip
    model.eval()
    return trainer


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out


def ours(model, ids, p):
    """(log-probs, entropies) of the completion tokens at the sampling temperature, as the GRPO loop takes them."""
    logits = model(input_ids=ids).logits[:, p - 1 : -1].float() / TEMPERATURE
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(-1, ids[:, p:].unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


# (TRL's keys, deltatune's align keys). TRL's default loss_type is dapo; deltatune's default loss_norm is grpo's.
CASES = {
    "grpo": ({"loss_type": "grpo"}, {"loss_type": "grpo"}),
    "bnpo": ({"loss_type": "bnpo"}, {"loss_type": "bnpo"}),
    "dapo": ({"loss_type": "dapo"}, {"loss_type": "dapo"}),
    "dr_grpo": ({"loss_type": "dr_grpo"}, {"loss_type": "dr_grpo"}),
    "clip_higher": ({"loss_type": "dapo", "epsilon_high": 0.28}, {"loss_type": "dapo", "cliprange_high": 0.28}),
    "two_sided": ({"loss_type": "grpo", "delta": 1.1}, {"loss_type": "grpo", "delta": 1.1}),
    "gspo": ({"loss_type": "grpo", "importance_sampling_level": "sequence"},
             {"loss_type": "grpo", "importance_sampling_level": "sequence"}),
    "top_entropy": ({"loss_type": "dapo", "top_entropy_quantile": 0.3},
                    {"loss_type": "dapo", "top_entropy_quantile": 0.3}),
    "kl_bias_corrected": ({"loss_type": "dapo", "beta": 0.04, "use_bias_correction_kl": True},
                          {"loss_type": "dapo", "beta": 0.04, "bias_correction_kl": True}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_trl(model, tmp_path, case):
    trl_keys, keys = CASES[case]
    b = grpo_batch(model.config.vocab_size)
    g, n, p, t, prompts, completions, mask, advantages, ids = (
        b[k] for k in ("g", "n", "p", "t", "prompts", "completions", "mask", "advantages", "ids"))  # fmt: skip
    with torch.no_grad(), model.disable_adapter():
        reference = ours(model, ids, p)[0]
    with torch.no_grad():
        old = ours(model, ids, p)[0] + 0.3 * torch.randn(mask.shape, generator=g)  # off-policy: ratios clip
        old = old + torch.tensor([[0.3], [-0.3], [-0.3], [0.3]])  # (and whole sequences: GSPO's ratios clip)
    trl_keys = {"beta": 0.0, "use_bias_correction_kl": False, **trl_keys}
    trainer = trl_trainer(model, tmp_path, n, num_generations=n, max_completion_length=t, epsilon=0.2, **trl_keys)
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completions,
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": reference, "num_items_in_batch": mask.sum()}  # fmt: skip
    expected = trainer._compute_loss(model, inputs)
    expected.backward()
    expected_grads = grads(model)

    a = AlignArgs(**{"beta": 0.0, "max_new_tokens": t, **keys})
    validate_align(a, "grpo")
    logp, entropy = ours(model, ids, p)
    top = high_entropy_mask(entropy.detach(), mask, a.top_entropy_quantile) if a.top_entropy_quantile < 1 else None
    loss, stats = grpo_loss(logp, old, advantages, mask, a.cliprange, a.beta, reference, grpo_loss_norm(a), None,
                            None, a.bias_correction_kl, a.cliprange_high, a.delta, a.importance_sampling_level,
                            a.max_new_tokens, top)  # fmt: skip
    loss.backward()
    assert stats["clipped"] > 0
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for ours_grad, theirs in zip(grads(model), expected_grads, strict=True):
        assert torch.allclose(ours_grad, theirs, atol=1e-6, rtol=0)  # (measured: 7e-7 at most, of gradients ~1)
    assert any(gr.abs().max() > 1e-4 for gr in expected_grads)  # (a gradient there is to compare)


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
def test_advantages_equal_trl_for_every_scale_rewards(model, tmp_path, scale):
    """TRL's _generate_and_score_completions on injected completions (a rollout_func) and rewards (one a None, left
    out of its group as TRL does) against group_advantages, for each scale_rewards."""
    G, tok = 4, tokenizer()
    rewards = [1.0, 0.0, 2.5, 0.5, 3.0, 3.0, None, 1.0]
    completion_ids = [[tok.convert_tokens_to_ids("a")] * (1 + i % 3) + [tok.eos_token_id] for i in range(8)]

    def rollout(prompts, trainer):
        return {"prompt_ids": [tok("hi")["input_ids"]] * len(prompts), "completion_ids": completion_ids,
                "logprobs": [[0.0] * len(c) for c in completion_ids]}  # fmt: skip

    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=8, report_to=[], use_cpu=True, bf16=False,
                          num_generations=G, scale_rewards=scale, max_completion_length=4)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = dt.trl_trainer(trl.GRPOTrainer)(
            model=model, args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 8), processing_class=tok,
            reward_funcs=lambda completions, **_: list(rewards), rollout_func=rollout,
        )  # fmt: skip
    model.eval()
    with torch.no_grad():
        out = trainer._generate_and_score_completions([{"prompt": "hi"}] * 8)
    table = torch.tensor([float("nan") if r is None else r for r in rewards])
    validate_align(AlignArgs(scale_rewards=scale), "grpo")
    ours_adv = group_advantages(table, G, scale)
    assert torch.allclose(ours_adv, out["advantages"].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("key, value, words", [
    ("loss_type", "vespo", "align.loss_type vespo"),
    ("loss_type", "sigmoid_norm", "align.loss_type for stage grpo"),
    ("loss_type", ["grpo", "dapo"], "align.loss_type for stage grpo"),
    ("scale_rewards", "groups", "align.scale_rewards"),
    ("importance_sampling_level", "seq", "align.importance_sampling_level"),
    ("delta", 0.9, "align.delta"),
    ("top_entropy_quantile", 1.5, "align.top_entropy_quantile"),
    ("cliprange_high", -0.1, "align.cliprange_high"),
])  # fmt: skip
def test_grpo_settings_trl_lacks_or_refuses_are_one_line_naming_the_key(key, value, words):
    with pytest.raises(ConfigError, match=words):
        validate_align(AlignArgs(**{key: value}), "grpo")


LOOP_CASES = {
    "dapo_masked_batch": ({"loss_type": "dapo", "mask_truncated_completions": True, "scale_rewards": "batch"},
                          {"loss_type": "dapo", "mask_truncated_completions": True, "scale_rewards": "batch"}),
    "dr_grpo_unscaled": ({"loss_type": "dr_grpo", "scale_rewards": "none"},
                         {"loss_type": "dr_grpo", "scale_rewards": "none"}),
    "grpo_masked": ({"loss_type": "grpo", "mask_truncated_completions": True},
                    {"loss_type": "grpo", "mask_truncated_completions": True}),
    "grpo_masked_top_entropy": ({"loss_type": "grpo", "mask_truncated_completions": True, "top_entropy_quantile": 0.5},
                                {"loss_type": "grpo", "mask_truncated_completions": True,
                                 "top_entropy_quantile": 0.5}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_a_loop_steps_loss_equals_trls_on_the_same_completions(model, tmp_path, monkeypatch, case):
    """GRPOLoop.step on injected completions (one of them truncated: no EOS within max_new_tokens) and rewards against
    TRL's _generate_and_score_completions (a rollout_func gives it the same completions) then _compute_loss."""
    trl_keys, keys = LOOP_CASES[case]
    rewards = [1.0, 0.0, 2.5, 0.5, 2.0, 2.0, 2.0, 2.0]  # (the second group's all equal)
    stats, logged, expected = grpo_step_against_trl(model, tmp_path, monkeypatch, rewards, trl_keys, keys,
                                                    temperature=TEMPERATURE)  # fmt: skip
    assert stats["loss"] == pytest.approx(expected, abs=1e-6)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "clip_ratio/region_mean"):
        assert stats[key] == pytest.approx(logged[key], abs=1e-6), key
