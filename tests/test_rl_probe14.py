"""Stages ppo and grpo against TRL (probe 14): stage ppo's own defaults of the keys it shares with grpo (TRL's
PPOConfig temperature 0.7 and response_length 53; GRPOConfig's temperature 1.0), a resume of a run that began with
the old ones, PPO's val/num_eos_tokens with a stop token, and GRPO's other TRL 1.16 loss types.

TRL 1.16 (the .venv's) no longer ships its PPO trainer: the PPO reference is ``trl/experimental/ppo`` at huggingface/
trl 0062ee10a9bc (its ppo_config.py: ``response_length: int = 53``, ``temperature: float = 0.7``; its ppo_trainer.py:
``metrics["val/num_eos_tokens"] = (responses == processing_class.eos_token_id).sum().item()``, on the responses as
generated, generation stopping at the stop token). The GRPO reference is TRL 1.16's GRPOTrainer._compute_loss."""

from __future__ import annotations

import pytest
import torch
from test_ppo_probe11 import EOS, PAD, _policy, _Tok
from test_ppo_probe12 import _DecodingTok, _Fixed

from deltatune.train.config import build, ignored_keys
from deltatune.train.config_align import AlignArgs, default_changed, validate_align
from deltatune.train.ppo import PPOLoop
from deltatune.train.run import _recipe_dict
from deltatune.train.runfolder import recipe_changes

RAW = {"model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}}
TRL_PPO = {"temperature": 0.7, "response_length": 53}  # TRL's PPOConfig defaults (0062ee10)
TRL_GRPO_TEMPERATURE = 1.0  # TRL 1.16's GRPOConfig temperature


# -- 1. stage ppo's defaults: TRL's PPOConfig's, not GRPO's --------------------------------------------------------


def test_a_ppo_recipe_without_the_keys_samples_as_trls_ppoconfig():
    """Left out, align.temperature and align.max_new_tokens are TRL's PPOConfig temperature and response_length on
    stage ppo, and stay GRPO's (temperature 1.0, as TRL's GRPOConfig) and deltatune's 32 on stage grpo."""
    import trl

    assert trl.GRPOConfig("o", report_to=[], use_cpu=True, bf16=False).temperature == TRL_GRPO_TEMPERATURE
    ppo = build({**RAW, "stage": "ppo"}).align
    assert (ppo.temperature, ppo.max_new_tokens) == (TRL_PPO["temperature"], TRL_PPO["response_length"])
    grpo = build({**RAW, "stage": "grpo"}).align
    assert (grpo.temperature, grpo.max_new_tokens) == (TRL_GRPO_TEMPERATURE, 32)


@pytest.mark.parametrize("align, want", [
    ({"temperature": 1.0}, (1.0, 53)),  # (set to GRPO's value: kept)
    ({"max_new_tokens": 32}, (0.7, 32)),
    ({"response_length": 9}, (0.7, 9)),  # (TRL's name for it)
    ({"temperature": 0.3, "response_length": 53}, (0.3, 53)),
])  # fmt: skip
def test_a_ppo_key_set_keeps_its_value(align, want):
    a = build({**RAW, "stage": "ppo", "align": align}).align
    assert (a.temperature, a.max_new_tokens) == want


def test_a_ppo_run_yaml_builds_to_itself():
    """run.yaml (the resolved recipe) holds the values the run used: building it again changes nothing."""
    cfg = build({**RAW, "stage": "ppo"})
    again = build(_recipe_dict(cfg))
    assert (again.align.temperature, again.align.max_new_tokens) == (0.7, 53)
    assert recipe_changes(_recipe_dict(cfg), _recipe_dict(again)) == []


def test_resuming_a_run_that_began_with_the_old_defaults_says_how_to_continue_as_it_began():
    """A ppo run.yaml written before (temperature 1.0, max_new_tokens 32, the defaults then) against the same recipe
    today: the two changes are named with their old default, and setting them back gives no change at all."""
    old = _recipe_dict(build({**RAW, "stage": "ppo", "align": {"temperature": 1.0, "max_new_tokens": 32}}))
    new = _recipe_dict(build({**RAW, "stage": "ppo"}))
    changes = recipe_changes(old, new)
    assert changes == [
        "align.max_new_tokens: 32 -> 53 (its default was 32, 53 since probe 14 on stage ppo (TRL's PPOConfig "
        "response_length; grpo's stays 32); set align.max_new_tokens: 32 to continue as the run began)",
        "align.temperature: 1.0 -> 0.7 (its default was 1.0, 0.7 since probe 14 on stage ppo (TRL's PPOConfig "
        "temperature; grpo's stays 1.0); set align.temperature: 1.0 to continue as the run began)",
    ]
    assert default_changed("align.temperature", 1.0, 0.5) == ""  # (0.5 is no default: a change made by hand)
    back = _recipe_dict(build({**RAW, "stage": "ppo", "align": {"temperature": 1.0, "max_new_tokens": 32}}))
    assert recipe_changes(old, back) == []


def test_a_bare_align_object_validated_for_ppo_takes_the_ppo_defaults_once():
    """validate_align is idempotent: a second call (the loop's) keeps what the first set."""
    a = AlignArgs()
    validate_align(a, "ppo")
    validate_align(a, "ppo")
    assert (a.temperature, a.max_new_tokens) == (0.7, 53)


def test_a_ppo_run_yaml_reused_on_dpo_names_no_ignored_sampling_key():
    """The ppo defaults in a run.yaml are no keys set by hand on a stage that reads neither (ignored_keys names a key
    off its default); a temperature set by hand still is named."""
    saved = _recipe_dict(build({**RAW, "stage": "ppo"}))
    assert ignored_keys(build({**saved, "stage": "dpo"})) == []
    assert ignored_keys(build({**saved, "stage": "dpo", "align": {"temperature": 0.9}})) == [
        ("align.temperature", "ppo, grpo")
    ]


# -- 2. PPO's val/num_eos_tokens ------------------------------------------------------------------------------------


def test_num_eos_tokens_counts_the_tokenizers_eos_as_trl_with_a_stop_token():
    """align.stop_token_id 7: TRL generates with eos_token_id 7 (the responses pad after it) and counts
    processing_class.eos_token_id (3) in them, not the stop token. Responses (7 the stop, 3 the EOS):
    [5 7 | pad..] -> 0; [3 6 8 8 9] (no stop) -> 1; [7 | pad..] -> 0; [3 3 3 4 7] -> 3: TRL's count 4 (deltatune
    before counted the stop tokens, 3: one per response that has one)."""
    from test_ppo_probe11 import truncate_response

    generated = torch.tensor([[5, 7, 9, 7, 9], [EOS, 6, 8, 8, 9], [7, 4, 4, 4, 4], [EOS, EOS, EOS, 4, 7]])
    trl_responses = truncate_response(7, PAD, generated)  # (generate stopped at 7: only padding after it)
    trl_count = (trl_responses == _Tok.eos_token_id).sum().item()
    assert trl_count == 4
    align = AlignArgs(stop_token_id=7, ppo_epochs=1, max_new_tokens=5)
    validate_align(align, "ppo")
    loop = PPOLoop(_policy(), _DecodingTok(), lambda p, r: [0.0] * 4, align, lr=0.0, max_grad_norm=0.0)
    loop.model.generate = _Fixed(generated).generate
    stats = loop.update(loop.rollout([[5, 6], [8, 9, 10], [11], [12, 13]]))
    assert stats["val/num_eos_tokens"] == trl_count
    assert (generated == 7).logical_and(trl_responses == 7).sum().item() == 3  # (the stop tokens HEAD counted)


def test_num_eos_tokens_without_a_stop_token_is_unchanged():
    """No stop token: the EOS ends each response and is counted once per response that has one."""
    generated = torch.tensor([[5, EOS, 9, 7, 9], [4, 6, 8, 8, 9], [EOS, 4, 4, 4, 4], [6, 4, 6, 4, EOS]])
    align = AlignArgs(ppo_epochs=1, max_new_tokens=5)
    validate_align(align, "ppo")
    loop = PPOLoop(_policy(), _DecodingTok(), lambda p, r: [0.0] * 4, align, lr=0.0, max_grad_norm=0.0)
    loop.model.generate = _Fixed(generated).generate
    stats = loop.update(loop.rollout([[5, 6], [8, 9, 10], [11], [12, 13]]))
    assert stats["val/num_eos_tokens"] == 3
