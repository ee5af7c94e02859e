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

from deltatune.config import ConfigError
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
        "align.max_new_tokens: 32 -> 53 (its default was 32, 53 since 5cc3d64 on stage ppo (TRL's PPOConfig "
        "response_length; grpo's stays 32); set align.max_new_tokens: 32 to continue as the run began)",
        "align.temperature: 1.0 -> 0.7 (its default was 1.0, 0.7 since 5cc3d64 on stage ppo (TRL's PPOConfig "
        "temperature; grpo's stays 1.0); set align.temperature: 1.0 to continue as the run began)",
    ]
    assert default_changed("align.temperature", 1.0, 0.5) == ""  # (0.5 is no default: a change made by hand)
    back = _recipe_dict(build({**RAW, "stage": "ppo", "align": {"temperature": 1.0, "max_new_tokens": 32}}))
    assert recipe_changes(old, back) == []


@pytest.mark.parametrize("align, want", [
    ({}, 8),  # (TRL's num_mini_batches 1: the whole batch of 8 rollouts)
    ({"mini_batch_size": 4}, 4),  # (set to the old default: kept)
    ({"num_mini_batches": 2}, 4),
])  # fmt: skip
def test_ppo_mini_batches_left_out_are_one_as_trls(align, want):
    """TRL's PPOConfig num_mini_batches defaults to 1 (mini_batch_size = batch_size / num_mini_batches); deltatune's
    align.mini_batch_size left out was 4. On grpo (completions per forward, memory alone) it stays 4."""
    train = {"batch_size": 8}
    assert build({**RAW, "stage": "ppo", "train": train, "align": align}).align.mini_batch_size == want
    assert build({**RAW, "stage": "grpo", "train": train}).align.mini_batch_size == 4
    old = _recipe_dict(build({**RAW, "stage": "ppo", "train": train, "align": {"mini_batch_size": 4}}))
    new = _recipe_dict(build({**RAW, "stage": "ppo", "train": train}))
    assert recipe_changes(old, new) == [
        "align.mini_batch_size: 4 -> 8 (its default was 4, 8 since 8fba9a4 on stage ppo: train.batch_size (TRL's "
        "PPOConfig num_mini_batches 1); set align.mini_batch_size: 4 to continue as the run began)"
    ]
    assert ignored_keys(build({**new, "stage": "dpo"})) == []  # (a ppo run.yaml reused on dpo)


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


# -- 3. GRPO: TRL 1.16's cispo, sapo and luspo losses -----------------------------------------------------------

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def grpo_model(tmp_path_factory):
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    base = save_tiny(tmp_path_factory.mktemp("tiny") / "llama")
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():  # a trained-looking adapter: the policy is no longer the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def _trl_loss(model, tmp_path, b, old, reference, **kwargs):
    import warnings

    import trl
    from datasets import Dataset
    from tiny import tokenizer

    import deltatune as dt

    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=b["n"], report_to=[], use_cpu=True, bf16=False,
                          temperature=TEMPERATURE, num_generations=b["n"], max_completion_length=b["t"],
                          use_bias_correction_kl=False, **kwargs)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = dt.trl_trainer(trl.GRPOTrainer)(
            model=model, args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * b["n"]),
            processing_class=tokenizer(), reward_funcs=lambda completions, **_: [0.0] * len(completions),
        )  # fmt: skip
    model.eval()
    inputs = {"prompt_ids": b["prompts"], "prompt_mask": torch.ones_like(b["prompts"]),
              "completion_ids": b["completions"], "completion_mask": b["mask"], "advantages": b["advantages"],
              "old_per_token_logps": old, "ref_per_token_logps": reference,
              "num_items_in_batch": b["mask"].sum()}  # fmt: skip
    loss = trainer._compute_loss(model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items() if v}  # (the model in eval mode)


def _ours(model, ids, p):
    import torch.nn.functional as F

    logits = model(input_ids=ids).logits[:, p - 1 : -1].float() / TEMPERATURE
    return F.log_softmax(logits, -1).gather(-1, ids[:, p:].unsqueeze(-1)).squeeze(-1)


def _grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out


GRPO_CASES = {  # (TRL's keys, deltatune's align keys)
    "cispo": ({"loss_type": "cispo", "epsilon_high": 1.2}, {"loss_type": "cispo", "cliprange_high": 1.2}),
    "cispo_eps_default": ({"loss_type": "cispo"}, {"loss_type": "cispo"}),
    "sapo": ({"loss_type": "sapo"}, {"loss_type": "sapo"}),
    "sapo_temperatures_kl": ({"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0,
                              "beta": 0.04},
                             {"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0,
                              "beta": 0.04}),
    "luspo": ({"loss_type": "luspo", "importance_sampling_level": "sequence"},
              {"loss_type": "luspo", "importance_sampling_level": "sequence"}),
    "luspo_token": ({"loss_type": "luspo"}, {"loss_type": "luspo"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_loss_types_cispo_sapo_luspo_equal_trl(grpo_model, tmp_path, case):
    """TRL 1.16's _compute_loss against grpo_loss on the same completions, old and reference log-probs: loss and
    every LoRA gradient to 1e-6, and TRL's clip statistic (cispo_clip_ratio; clip_ratio/region_mean for luspo)."""
    from tiny import grpo_batch

    from deltatune.train.config_align import grpo_loss_norm, grpo_policy
    from deltatune.train.grpo_loss import grpo_loss

    model = grpo_model
    trl_keys, keys = GRPO_CASES[case]
    b = grpo_batch(model.config.vocab_size)
    with torch.no_grad(), model.disable_adapter():
        reference = _ours(model, b["ids"], b["p"])
    with torch.no_grad():
        old = _ours(model, b["ids"], b["p"]) + 0.3 * torch.randn(b["mask"].shape, generator=b["g"])
        old = old + torch.tensor([[0.3], [-0.3], [-0.3], [0.3]])
    expected, metrics = _trl_loss(model, tmp_path, b, old, reference, **{"beta": 0.0, **trl_keys})
    expected.backward()
    expected_grads = _grads(model)

    a = AlignArgs(**{"beta": 0.0, "max_new_tokens": b["t"], **keys})
    validate_align(a, "grpo")
    loss, stats = grpo_loss(_ours(model, b["ids"], b["p"]), old, b["advantages"], b["mask"], a.cliprange, a.beta,
                            reference, grpo_loss_norm(a), None, None, a.bias_correction_kl, a.cliprange_high, a.delta,
                            a.importance_sampling_level, a.max_new_tokens, None, grpo_policy(a),
                            (a.sapo_temperature_pos, a.sapo_temperature_neg))  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for ours_grad, theirs in zip(_grads(model), expected_grads, strict=True):
        assert torch.allclose(ours_grad, theirs, atol=1e-6, rtol=0)
    assert any(gr.abs().max() > 1e-4 for gr in expected_grads)
    name = {"cispo": "cispo_clip_ratio", "sapo": None}.get(a.loss_type, "clip_ratio/region_mean")
    if name:
        assert (stats["clipped"] / stats["clip_units"]).item() == pytest.approx(metrics[name], abs=1e-6)
        for side in ("low", "high") if name == "clip_ratio/region_mean" else ():  # (each side's, as TRL's)
            got = (stats[f"clipped_{side}"] / stats["clip_units"]).item()
            assert got == pytest.approx(metrics[f"clip_ratio/{side}_mean"], abs=1e-6)
            assert 0 < got < 1  # (both sides clip some, not all)
        assert name != "cispo_clip_ratio" or 0 < metrics[name] < 1  # (the cap binds on some tokens, not all)
    else:
        assert not {k for k in metrics if "clip" in k}  # (TRL's sapo logs no clip statistic; neither does ours)


@pytest.mark.parametrize("align, words", [
    ({"loss_type": "vespo"}, "^align.loss_type vespo \\(TRL's GRPO\\) is not in deltatune; use one of grpo, "),
    ({"loss_type": "cispo", "delta": 1.5}, "^align.delta caps the clipped losses' ratio; align.loss_type cispo"),
    ({"loss_type": "sapo", "sapo_temperature_neg": 0.0}, "^align.sapo_temperature_neg must be > 0, got 0.0$"),
    ({"loss_type": "luspo", "loss_norm": "token"}, "^align.loss_type luspo and align.loss_norm token disagree"),
])  # fmt: skip
def test_grpo_loss_type_bad_input_is_one_line_naming_the_key(align, words):
    with pytest.raises(ConfigError, match=words) as err:
        build({**RAW, "stage": "grpo", "align": align})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo"])
def test_a_loop_step_with_cispo_sapo_luspo_equals_trls_on_the_same_completions(grpo_model, tmp_path, monkeypatch,
                                                                                loss_type):  # fmt: skip
    """GRPOLoop.step on injected completions (one truncated) and rewards against TRL's _generate_and_score_completions
    (a rollout_func gives it the same completions) then _compute_loss: the loss and TRL's logged statistics."""
    from tiny import grpo_step_against_trl

    rewards = [1.0, 0.0, 2.5, 0.5, 2.0, 1.0, 2.0, 3.0]
    stats, logged, expected = grpo_step_against_trl(
        grpo_model,
        tmp_path,
        monkeypatch,
        rewards,
        {"loss_type": loss_type, "epsilon_high": 2.0},
        {"loss_type": loss_type, "cliprange_high": 2.0},
        mini_batch_size=3,
        temperature=TEMPERATURE,
    )
    assert stats["loss"] == pytest.approx(expected, abs=1e-6)
    clip = {"cispo": ["cispo_clip_ratio"], "sapo": [],
            "luspo": ["clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/low_min",
                      "clip_ratio/high_max"]}[loss_type]  # fmt: skip
    lengths = [f"completions/{k}" for k in ("mean_length", "min_length", "max_length", "clipped_ratio",
                                            "mean_terminated_length", "min_terminated_length", "max_terminated_length")]  # fmt: skip
    for key in ("reward", "reward_std", "frac_reward_zero_std", *lengths, *clip):
        assert stats[key] == pytest.approx(logged[key], abs=1e-6), key
    assert {k for k in stats if "clip_ratio" in k} == set(clip) <= set(logged)
    assert (logged["completions/clipped_ratio"], logged["completions/min_length"]) == (1 / 8, 2.0)  # (not trivial)


# -- 4. GRPO sampling: TRL's top_k, min_p, repetition_penalty, generation_kwargs --------------------------------------


def test_grpo_sampling_settings_reach_generate_as_trls(grpo_model, tmp_path):
    """The GenerationConfig the loop samples with holds TRL's GRPOTrainer generation_config values for the same
    top_k, min_p, repetition_penalty and generation_kwargs (one of them over top_k, as TRL's update)."""
    import warnings

    import trl
    from datasets import Dataset
    from tiny import tokenizer

    import deltatune as dt
    from deltatune.train.grpo import GRPOLoop, PromptItem
    from deltatune.train.grpo_rewards import Reward

    keys = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3,
            "generation_kwargs": {"typical_p": 0.9, "top_k": 7, "no_repeat_ngram_size": 2}}  # fmt: skip
    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                          num_generations=4, max_completion_length=3, **keys)  # fmt: skip
    tok = tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = dt.trl_trainer(trl.GRPOTrainer)(
            model=grpo_model, args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4),
            processing_class=tok, reward_funcs=lambda completions, **_: [0.0] * len(completions),
        )  # fmt: skip
    grpo_model.eval()
    want = trainer.generation_config
    align = AlignArgs(num_generations=4, max_new_tokens=3, **keys)
    validate_align(align, "grpo")
    loop = GRPOLoop(grpo_model, tok, [Reward("zero", lambda completions, **_: [0.0] * len(completions))], align)
    seen = []
    real = grpo_model.generate

    def generate(*a, generation_config, **kw):
        seen.append(generation_config)
        return real(*a, generation_config=generation_config, **kw)

    grpo_model.generate = generate
    try:
        loop.sample([PromptItem(tok("hi")["input_ids"], "hi", {}, "p:1")], 4)
    finally:
        del grpo_model.generate
    got = seen[0]
    for key in ("top_k", "min_p", "repetition_penalty", "typical_p", "no_repeat_ngram_size", "top_p", "do_sample"):
        assert getattr(got, key) == getattr(want, key), key
    assert got.top_k == 7


def test_grpo_top_k_1_samples_the_likeliest_token_every_time(grpo_model):
    """top_k 1 leaves one token to sample: every completion of a prompt is the same (at top_k 0 they differ)."""
    from tiny import tokenizer

    from deltatune.train.grpo import GRPOLoop, PromptItem
    from deltatune.train.grpo_rewards import Reward

    tok = tokenizer()
    item = PromptItem(tok("hello there")["input_ids"], "hello there", {}, "p:1")
    texts = {}
    for k in (0, 1):
        align = AlignArgs(num_generations=6, max_new_tokens=4, top_k=k, temperature=2.0)
        validate_align(align, "grpo")
        loop = GRPOLoop(grpo_model, tok, [Reward("zero", lambda completions, **_: [0.0] * 6)], align, seed=3)
        texts[k] = loop.sample([item], 6).completion_ids
    assert len({tuple(c) for c in texts[1]}) == 1 and len({tuple(c) for c in texts[0]}) > 1


@pytest.mark.parametrize("align, words", [
    ({"top_k": -1}, "^align.top_k must be an integer >= 0 \\(0: all tokens\\), got -1$"),
    ({"min_p": 1.5}, "^align.min_p must be in \\[0, 1\\] \\(or null: off\\), got 1.5$"),
    ({"repetition_penalty": 0}, "^align.repetition_penalty must be > 0 \\(1: none\\), got 0.0$"),
    ({"generation_kwargs": ["top_k"]}, "^align.generation_kwargs must be dict or null, got \\[.top_k.\\]$"),
    ({"generation_kwargs": {"max_new_tokens": 9, "num_return_sequences": 2}},
     "^align.generation_kwargs sets max_new_tokens, num_return_sequences, which the GRPO loop sets itself"),
])  # fmt: skip
def test_grpo_sampling_bad_input_is_one_line_naming_the_key(align, words):
    with pytest.raises(ConfigError, match=words) as err:
        build({**RAW, "stage": "grpo", "align": align})
    assert "\n" not in str(err.value)


def test_grpos_new_sampling_keys_are_named_ignored_on_other_stages():
    """align.top_k, min_p, repetition_penalty, generation_kwargs and the sapo temperatures are grpo's: a dpo recipe
    that sets them is told they are ignored (config.READ_BY), not silently run without them."""
    from deltatune.train.config import build, ignored_keys

    keys = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "generation_kwargs": {"top_p": 0.9},
            "sapo_temperature_pos": 2.0, "sapo_temperature_neg": 2.0}  # fmt: skip
    named = {k for k, _ in ignored_keys(build({"stage": "dpo", "data": {"train": "p.jsonl"}, "align": keys}))}
    assert {f"align.{k}" for k in keys} <= named
    assert not ignored_keys(build({"stage": "grpo", "data": {"train": "p.jsonl"}, "align": keys}))
