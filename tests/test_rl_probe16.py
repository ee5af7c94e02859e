"""Online RL stages against TRL 1.16 (probe 16): GRPO's adaptive entropy control (TRL's use_adaptive_entropy,
Skywork-OR1), equal to TRL's GRPOTrainer's trained weights, its checkpointed state and its bad settings.

The reference is the .venv's TRL 1.16 GRPOTrainer._compute_loss (the bonus applied with the coefficient of the update
before, only while the last update's entropy was at most entropy_target; the coefficient moved by entropy_coef_delta
at each optimizer step, clamped to [entropy_coef_min, entropy_coef_max]), run through tests/test_grpo_probe15.py's
harness on the same fixed completions."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import test_grpo_probe15 as p15
import torch
from test_grpo_probe15 import _ours, _trl_run, policy  # noqa: F401  (policy: the fixture)

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.train.config_align import AlignArgs


@dataclasses.dataclass
class _Align(AlignArgs):
    """AlignArgs with TRL's adaptive entropy keys (the config_align.py diff in the rl probe16 report adds them)."""

    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    multi_objective_aggregation: str = "sum_then_normalize"
    off_policy_mask_threshold: float | None = None


ADAPTIVE_CASES = [
    # bonus off at the first update (TRL's last entropy starts at inf), then the coefficient 0 -> 0.05 -> 0.08 (max)
    (4, 1, "grpo", {"entropy_coef": 0.0, "use_adaptive_entropy": True, "entropy_target": 100.0,
                    "entropy_coef_delta": 0.05, "entropy_coef_max": 0.08}, [0.05, 0.08, 0.08, 0.08]),
    # entropy above the target: never applied, the coefficient 0.1 down to the floor 0.02
    (2, 2, "dapo", {"entropy_coef": 0.1, "use_adaptive_entropy": True, "entropy_target": 0.0,
                    "entropy_coef_delta": 0.05, "entropy_coef_min": 0.02}, [0.05, 0.02, 0.02, 0.02]),
    (2, 1, "bnpo", {"entropy_coef": 0.2, "use_adaptive_entropy": True, "entropy_target": 100.0,
                    "top_entropy_quantile": 0.5}, [0.205, 0.21]),
    # num_iterations 2, the target always met: the bonus applied in every update after the first, each iteration's
    # with the coefficient of the update before (0.1 -> 0.15 -> 0.2 -> 0.25 -> 0.3)
    (2, 2, "dapo", {"entropy_coef": 0.1, "use_adaptive_entropy": True, "entropy_target": 100.0,
                    "entropy_coef_delta": 0.05}, [0.15, 0.2, 0.25, 0.3]),
]  # fmt: skip


@pytest.mark.parametrize("S, mu, loss_type, keys, coefs", ADAPTIVE_CASES)
@pytest.mark.parametrize("ga", [1, 2])
def test_adaptive_entropy_trains_as_trls(policy, tmp_path, monkeypatch, S, mu, loss_type, keys, coefs, ga):  # noqa: F811
    """align.use_adaptive_entropy: S x mu updates (each ``ga`` chunks, TRL's micro-batches under
    gradient_accumulation_steps) leave the adapter weights TRL's GRPOTrainer leaves (seen <4e-7; the loop before
    ignored the key: 2.3e-3 to 1.8e-2 off), and the logged entropy_coef is the mean of the
    coefficients after each update (TRL's metric)."""
    model, _ = policy
    monkeypatch.setattr(p15, "AlignArgs", _Align)
    ours_model, trl_model = copy.deepcopy(model), copy.deepcopy(model)
    _trl_run(trl_model, tmp_path, monkeypatch, S, mu, loss_type, keys, ga=ga)
    stats, _, _ = _ours(ours_model, S, mu, loss_type, keys, monkeypatch, mini_batch_size=8 // S // ga)
    theirs = dict(trl_model.named_parameters())
    diffs = [(p - theirs[n]).abs().max().item() for n, p in ours_model.named_parameters() if p.requires_grad]
    moved = max((p - q).abs().max().item() for p, q in zip(ours_model.parameters(), model.parameters()))
    assert max(diffs) < 1e-6 and moved > 1e-3
    assert stats["entropy_coef"] == pytest.approx(sum(coefs) / len(coefs), abs=1e-9)


def test_adaptive_entropy_changes_the_weights_once_the_target_is_met(policy, monkeypatch):  # noqa: F811
    """Not a no-op: starting at coefficient 0 under a target the entropy meets, the bonus comes on from the second
    update, and the weights differ from the same run without the control (seen 1.3e-2)."""
    model, _ = policy
    monkeypatch.setattr(p15, "AlignArgs", _Align)
    on, off = copy.deepcopy(model), copy.deepcopy(model)
    keys = {"entropy_coef": 0.0, "entropy_target": 100.0, "entropy_coef_delta": 0.5}
    _ours(on, 4, 1, "grpo", {**keys, "use_adaptive_entropy": True}, monkeypatch)
    stats, _, _ = _ours(off, 4, 1, "grpo", keys, monkeypatch)
    assert "entropy_coef" not in stats  # (no bonus: TRL logs none)
    assert max((p - q).abs().max().item() for p, q in zip(on.parameters(), off.parameters())) > 1e-4


def test_adaptive_entropy_state_is_checkpointed_and_resumed(policy, tmp_path):  # noqa: F811
    """The coefficient and the last update's entropy (TRL's entropy_ctrl_state.json) go into the checkpoint and come
    back on --resume; a checkpoint written before them resumes at the recipe's coefficient."""
    from tiny import tokenizer

    from deltatune.train.grpo import STATE_FILE, GRPOLoop, _load_checkpoint, _save_checkpoint
    from deltatune.train.grpo_rewards import Reward

    model, _ = policy
    align = _Align(num_generations=4, entropy_coef=0.1, use_adaptive_entropy=True)
    reward = [Reward("r", lambda completions, **_: [0.0] * len(completions))]
    first = GRPOLoop(copy.deepcopy(model), tokenizer(), reward, align)
    first.bonus.coef, first.bonus.last = 0.37, 0.125
    g = torch.Generator().manual_seed(0)
    _save_checkpoint(str(tmp_path), 3, first, g, [], [], {}, None)
    again = GRPOLoop(copy.deepcopy(model), tokenizer(), reward, align)
    assert (again.bonus.coef, again.bonus.last) == (0.1, math.inf)
    _load_checkpoint(str(tmp_path / "checkpoint-3"), again, g)
    assert (again.bonus.coef, again.bonus.last) == (0.37, 0.125)
    state = torch.load(tmp_path / "checkpoint-3" / STATE_FILE, weights_only=True)
    del state["entropy"]  # (as a checkpoint before the control)
    torch.save(state, tmp_path / "checkpoint-3" / STATE_FILE)
    old = GRPOLoop(copy.deepcopy(model), tokenizer(), reward, align)
    _load_checkpoint(str(tmp_path / "checkpoint-3"), old, g)
    assert (old.bonus.coef, old.bonus.last) == (0.1, math.inf)


@pytest.mark.parametrize("keys, words", [
    ({"use_adaptive_entropy": True, "entropy_coef_min": 0.5, "entropy_coef_max": 0.1},
     "align.entropy_coef_min 0.5 is above align.entropy_coef_max 0.1"),
    ({"use_adaptive_entropy": True, "entropy_coef_delta": -0.01}, "align.entropy_coef_delta must be >= 0, got -0.01"),
    ({"entropy_target": float("nan")}, "align.entropy_target must be a finite number, got nan"),
    ({"entropy_coef": float("inf")}, "align.entropy_coef must be a finite number, got inf"),
    ({"use_adaptive_entropy": "yes"}, "align.use_adaptive_entropy must be true or false, got 'yes'"),
])  # fmt: skip
def test_bad_entropy_settings_are_one_line_naming_the_key(keys, words):
    """A bad entropy control setting is one ConfigError naming the key, from grpo's recipe check (before the model
    loads; TRL's GRPOConfig takes them all and trains with a coefficient clamped to nonsense or nan)."""
    from types import SimpleNamespace

    from deltatune.train.grpo import _check

    def cfg(**align):
        return SimpleNamespace(align=_Align(num_generations=4, **align), train=SimpleNamespace(batch_size=2))

    with pytest.raises(ConfigError) as err:
        _check(cfg(**keys))
    assert str(err.value).startswith(words) and "\n" not in str(err.value)
    _check(cfg(use_adaptive_entropy=True))  # (TRL's defaults pass)


# -- a top_entropy_quantile run trained before 2f11afa (its chunks in order) ------------------------------------------


def test_top_entropy_quantile_chunks_in_order_and_shuffled_train_apart(policy, monkeypatch):  # noqa: F811
    """Why an old run's resume must say so: top_entropy_quantile < 1 with align.mini_batch_size below the batch takes
    its mask over each chunk (TRL's micro-batch); since 2f11afa the chunks are shuffled at steps_per_generation 1, as
    TRL's; the chunks in order (before) train other weights (seen 6.0e-3)."""
    model, _ = policy
    shuffled, ordered = copy.deepcopy(model), copy.deepcopy(model)
    keys = {"top_entropy_quantile": 0.5}
    _ours(shuffled, 1, 1, "grpo", keys, monkeypatch, mini_batch_size=2)
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n))
    _ours(ordered, 1, 1, "grpo", keys, monkeypatch, mini_batch_size=2)
    assert max((p - q).abs().max().item() for p, q in zip(shuffled.parameters(), ordered.parameters())) > 1e-4


def test_resume_of_a_top_entropy_quantile_run_before_2f11afa_names_the_change(tmp_path):
    """A released grpo run.yaml (no align.steps_per_generation) with top_entropy_quantile < 1 and mini_batch_size below
    the batch resumed silently with its chunks shuffled (above); the resume names the change in one line, as the old
    bnpo run's (tests/test_grpo_probe15.py), and one chunk per batch (mini_batch_size 8) names none."""
    from deltatune.train.run import _check_resume_recipe

    run, recipe = p15._old_bnpo_run(tmp_path, loss_type="grpo", top_entropy_quantile=0.5)
    with pytest.raises(ConfigError) as err:
        _check_resume_recipe(run, recipe, False)
    message = str(err.value)
    assert "\n" not in message and "align.steps_per_generation: None -> 1 (" in message
    assert "a top_entropy_quantile < 1 run before 2f11afa took its align.mini_batch_size chunks in order" in message
    (tmp_path / "whole").mkdir()
    whole, recipe = p15._old_bnpo_run(
        tmp_path / "whole", loss_type="grpo", top_entropy_quantile=0.5, mini_batch_size=8
    )
    assert _check_resume_recipe(whole, recipe, False) is False


# -- TRL's multi_objective_aggregation normalize_then_sum (GDPO) ----------------------------------------------------

GDPO = {"multi_objective_aggregation": "normalize_then_sum"}


def test_gdpo_trains_as_trls(policy, tmp_path, monkeypatch):  # noqa: F811
    """align.multi_objective_aggregation normalize_then_sum: each reward normalised in its group, the sum over the
    batch, align.scale_rewards not read (as TRL's); two updates leave TRL's GRPOTrainer's weights (the loop before
    ignored the key: it trained the unscaled group advantages of scale_rewards none, seen 1.1e-2 apart). (One reward
    alone: GDPO's advantages are the group-scaled ones times one constant, which AdamW does not see.)"""
    model, _ = policy
    monkeypatch.setattr(p15, "AlignArgs", _Align)
    ours_model, trl_model, plain = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    keys = {**GDPO, "scale_rewards": "none"}
    _trl_run(trl_model, tmp_path, monkeypatch, 2, 1, "grpo", keys)
    _ours(ours_model, 2, 1, "grpo", keys, monkeypatch)
    _ours(plain, 2, 1, "grpo", {"scale_rewards": "none"}, monkeypatch)
    theirs = dict(trl_model.named_parameters())
    diffs = [(p - theirs[n]).abs().max().item() for n, p in ours_model.named_parameters() if p.requires_grad]
    apart = max((p - q).abs().max().item() for p, q in zip(plain.parameters(), trl_model.parameters()))
    assert max(diffs) < 1e-6 and apart > 1e-4


def _trl_gdpo_scored(model, tmp_path, first, second, weights):
    """TRL's GRPOTrainer under normalize_then_sum scoring 8 completions of "hi" with two rewards (``first``,
    ``second``: a value or None per row) weighted ``weights``: (its _generate_and_score_completions output, the
    trainer)."""
    import warnings

    import trl
    from datasets import Dataset
    from tiny import tokenizer

    tok = tokenizer()
    body, prompt = p15._completions(tok), tok("hi")["input_ids"]

    def rollout(prompts, trainer):
        return {"prompt_ids": [prompt] * len(prompts), "completion_ids": body,
                "logprobs": [[0.0] * len(c) for c in body]}  # fmt: skip

    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=p15.T,
                          report_to=[], use_cpu=True, bf16=False, reward_weights=list(weights), **GDPO)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = dt.trl_trainer(trl.GRPOTrainer)(
            model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 8),
            processing_class=tok, rollout_func=rollout,
            reward_funcs=[lambda completions, **_: list(first), lambda completions, **_: list(second)],
        )  # fmt: skip
        trainer.model.train()
        return trainer._generate_and_score_completions([{"prompt": "hi"}] * 8), trainer


def test_gdpo_advantages_equal_trls_with_weights_and_rows_a_reward_skips(policy, tmp_path):  # noqa: F811
    """Two weighted rewards, one returning None for some rows (one row neither scores): the advantages equal TRL's
    _generate_and_score_completions's under normalize_then_sum (0 for the unscorable row)."""
    from deltatune.train.grpo_loss import gdpo_advantages

    model, _ = policy
    first = [1.0, 0.0, 2.5, 0.5, 2.0, None, 2.0, 3.0]
    second = [0.3, 0.1, None, 0.9, 0.0, None, 1.0, 1.0]
    want = _trl_gdpo_scored(model, tmp_path, first, second, (1.0, 0.5))[0]["advantages"]
    table = torch.tensor([[math.nan if v is None else v for v in row] for row in zip(first, second)])
    got, _ = gdpo_advantages(table, torch.tensor([1.0, 0.5]), 4)
    assert got[5] == 0 and torch.allclose(got, want.float(), atol=1e-6)


def test_an_unknown_aggregation_is_one_line_naming_the_key():
    """TRL's GRPOTrainer raises on an unknown multi_objective_aggregation at its first generation; grpo's recipe check
    names the key and both values before the model loads."""
    from types import SimpleNamespace

    from deltatune.train.grpo import _check

    cfg = SimpleNamespace(align=_Align(num_generations=4, multi_objective_aggregation="gdpo"),
                          train=SimpleNamespace(batch_size=2))  # fmt: skip
    with pytest.raises(ConfigError, match=r"^align.multi_objective_aggregation must be one of sum_then_normalize, "
                       r"normalize_then_sum, got 'gdpo'$"):  # fmt: skip
        _check(cfg)


# -- recipe keys (the config.py / config_align.py diffs of the rl probe16 report) ------------------------------------

RAW = {"model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}, "stage": "grpo"}


def test_recipe_keys_of_the_entropy_control_and_gdpo_reach_the_loop(policy):  # noqa: F811
    """align.use_adaptive_entropy (and its four settings) and align.multi_objective_aggregation are recipe keys TRL's
    users write; built, they reach the loop's bonus and advantages, and a bad one is one line from the recipe check."""
    from types import SimpleNamespace

    from tiny import tokenizer

    from deltatune.train.config import build
    from deltatune.train.grpo import GRPOLoop, _check

    align = {"reward_funcs": ["m:f"], "use_adaptive_entropy": True, "entropy_target": 0.5, "entropy_coef_delta": 0.01,
             "entropy_coef_min": 0.0, "entropy_coef_max": 0.3, "multi_objective_aggregation": "normalize_then_sum",
             "off_policy_mask_threshold": 0.5}  # fmt: skip
    cfg = build({**RAW, "align": align})
    _check(cfg)
    loop = GRPOLoop(copy.deepcopy(policy[0]), tokenizer(), [], cfg.align)
    assert (loop.bonus.adaptive, loop.bonus.target, loop.bonus.delta, loop.bonus.high) == (True, 0.5, 0.01, 0.3)
    assert (cfg.align.multi_objective_aggregation, cfg.align.off_policy_mask_threshold) == ("normalize_then_sum", 0.5)
    bad = build({**RAW, "align": {**align, "entropy_coef_min": 0.5}})
    with pytest.raises(ConfigError, match="^align.entropy_coef_min 0.5 is above align.entropy_coef_max 0.3"):
        _check(SimpleNamespace(align=bad.align, train=bad.train))


@pytest.mark.parametrize("key, value, words", [
    ("generation_batch_size", 16, "TRL's generation_batch_size is train.batch_size x align.num_generations completions "
                                  "here (split into align.steps_per_generation updates)"),
    ("max_completion_length", 64, "TRL's max_completion_length is align.max_new_tokens here"),
    ("epsilon", 0.2, "TRL's epsilon is align.cliprange here"),
    ("epsilon_high", 0.28, "TRL's epsilon_high is align.cliprange_high here"),
])  # fmt: skip
def test_trls_grpo_names_say_what_they_are_here(key, value, words):
    """A TRL GRPOConfig name in the align section was 'did you mean mini_batch_size?' (generation_batch_size: the
    chunk size of the forward passes, nothing like it) or a list of 70 keys; the one line says the recipe's name."""
    from deltatune.train.config import build

    with pytest.raises(ConfigError) as err:
        build({**RAW, "align": {key: value, "reward_funcs": ["m:f"]}})
    assert str(err.value) == f"unknown key 'align.{key}' in recipe; {words}"


# -- a transformers reward model as a GRPO reward (TRL's reward_funcs=<model path>) ---------------------------------


@pytest.fixture(scope="module")
def reward_model_folder(tmp_path_factory):
    """A tiny Llama sequence classifier (one label, a seeded score head) saved with its tokenizer: no deltatune run."""
    from tiny import save_tiny, tokenizer
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path_factory.mktemp("rm") / "tiny-rm"
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(save_tiny(folder.parent / "base"), num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return str(folder)


CHAT = [[{"role": "user", "content": c}] for c in ("hi", "a longer prompt here", "b")]
ANSWERS = [[{"role": "assistant", "content": c}] for c in ("there friend", "x", "and some more words to score")]


@pytest.mark.parametrize("chat", [False, True])
def test_a_transformers_reward_model_scores_as_trls(policy, reward_model_folder, tmp_path, chat):  # noqa: F811
    """align.reward_funcs naming a transformers sequence-classification model folder (TRL's reward model, with its
    own tokenizer) was refused ('holds no run.yaml'); it scores each prompt + completion as TRL's GRPOTrainer
    (_calculate_rewards: joined, or chat messages through the reward tokenizer's template, right-padded, the logit at
    the last token that is no pad), rows of unequal lengths."""
    import warnings

    import trl
    from datasets import Dataset
    from tiny import tokenizer

    import deltatune as dt
    from deltatune.train.grpo_rewards import check_rewards, load_rewards, score

    prompts = CHAT if chat else ["hi", "a longer prompt here", "b"]
    completions = ANSWERS if chat else [" there friend", " x", " and some more words to score"]
    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=3, num_generations=3, report_to=[], use_cpu=True,
                          bf16=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = dt.trl_trainer(trl.GRPOTrainer)(
            model=copy.deepcopy(policy[0]), args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 3),
            processing_class=tokenizer(), reward_funcs=[reward_model_folder],
        )  # fmt: skip
    want = trainer._calculate_rewards([{"prompt": p} for p in prompts], prompts, completions, [[1]] * 3)[:, 0]
    align = AlignArgs(reward_funcs=[reward_model_folder], num_generations=3)
    rewards = check_rewards(align)
    load_rewards(rewards, align.reward_funcs, policy[0], "policy", tokenizer())
    got = score(rewards, prompts, prompts, completions, {}, ["r:1", "r:2", "r:3"])[:, 0]
    assert rewards[0].name == trainer.reward_func_names[0] == "tiny-rm"
    assert torch.allclose(got, want.float(), atol=1e-6) and want.std() > 1e-3


# -- TRL's off_policy_mask_threshold (DeepSeek-V3.2's off-policy sequence mask) --------------------------------------


@pytest.mark.parametrize("S, mu, loss_type", [(2, 2, "grpo"), (1, 3, "dapo"), (4, 1, "bnpo")])
def test_off_policy_mask_trains_as_trls(policy, tmp_path, monkeypatch, S, mu, loss_type):  # noqa: F811
    """align.off_policy_mask_threshold: after the first update, a completion with a negative advantage whose mean
    KL(pi_old || pi) passed the threshold drops out of the policy term; each update's loss and the weights equal
    TRL's GRPOTrainer's (the loop before ignored the key: seen 6.9e-3 to 1.4e-2 apart from TRL's)."""
    model, _ = policy
    monkeypatch.setattr(p15, "AlignArgs", _Align)
    import trl.trainer.grpo_trainer as gt

    real = gt.GRPOTrainer._generate_and_score_completions

    def no_sampling_logps(self, inputs):  # (the harness's rollout gives log-probs 0; TRL's own generate gives none)
        out = real(self, inputs)
        out.pop("sampling_per_token_logps", None)
        return out

    monkeypatch.setattr(gt.GRPOTrainer, "_generate_and_score_completions", no_sampling_logps)
    keys = {"off_policy_mask_threshold": 1e-4}
    ours_model, trl_model, plain = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    trl_steps, _ = _trl_run(trl_model, tmp_path, monkeypatch, S, mu, loss_type, keys)
    _, steps, _ = _ours(ours_model, S, mu, loss_type, keys, monkeypatch)
    _ours(plain, S, mu, loss_type, {}, monkeypatch)
    for (loss, _), (want_loss, *_) in zip(steps, trl_steps):
        assert loss == pytest.approx(want_loss, rel=1e-5, abs=2e-5)
    theirs = dict(trl_model.named_parameters())
    diffs = [(p - theirs[n]).abs().max().item() for n, p in ours_model.named_parameters() if p.requires_grad]
    apart = max((p - q).abs().max().item() for p, q in zip(plain.parameters(), trl_model.parameters()))
    assert max(diffs) < 1e-6 and apart > 1e-4


@pytest.mark.parametrize("value", [0, -0.5, float("inf"), "0.5", True])
def test_a_bad_off_policy_mask_threshold_is_one_line_naming_the_key(value):
    """A threshold that is no number > 0 is one ConfigError from grpo's recipe check, before the model loads."""
    from types import SimpleNamespace

    from deltatune.train.grpo import _check

    cfg = SimpleNamespace(align=_Align(num_generations=4, off_policy_mask_threshold=value),
                          train=SimpleNamespace(batch_size=2))  # fmt: skip
    with pytest.raises(ConfigError, match=r"^align.off_policy_mask_threshold must be a number > 0 "):
        _check(cfg)


# -- review16-rr: GDPO's frac_reward_zero_std, a static run's entropy state, reward model folders --------------------


def test_gdpo_frac_reward_zero_std_is_trls(policy, tmp_path, monkeypatch):  # noqa: F811
    """Under normalize_then_sum TRL's frac_reward_zero_std is of the std of the weighted sum of the group-normalised
    rewards, not of the raw weighted sum: rewards [[2, 0], [0, 1]] x 4, weights (1, 2), groups of 4 (the raw sums
    all 2: the loop before logged 1.0; TRL's 0.0)."""
    import deltatune.train.grpo as grpo
    from deltatune.train.grpo_rewards import Reward

    model, _ = policy
    first, second = [2.0, 0.0] * 4, [0.0, 1.0] * 4
    trainer = _trl_gdpo_scored(model, tmp_path, first, second, (1.0, 2.0))[1]
    want = trainer._metrics["train"]["frac_reward_zero_std"][-1]

    def score(self, s):  # (the loop's two weighted rewards and their table)
        self.rewards = [Reward("first", lambda **_: first, 1.0), Reward("second", lambda **_: second, 2.0)]
        return torch.tensor([first, second]).T

    monkeypatch.setattr(p15, "AlignArgs", _Align)
    monkeypatch.setattr(grpo.GRPOLoop, "score", score)
    stats, _, _ = _ours(copy.deepcopy(model), 1, 1, "grpo", GDPO, monkeypatch)
    assert want == 0.0 and stats["frac_reward_zero_std"] == want


def test_switching_adaptive_entropy_on_at_resume_starts_at_the_recipes_coefficient(policy, tmp_path):  # noqa: F811
    """A static run's checkpoint carries no entropy control state (TRL writes entropy_ctrl_state.json only under
    adaptive control): turning use_adaptive_entropy on at --resume starts the control at the new recipe's
    entropy_coef, not the old run's static one (the loop before loaded the old 0.1 over the recipe's 0.3); a static
    checkpoint written before this (an entropy state whose last entropy is still inf) is read the same."""
    from tiny import tokenizer

    from deltatune.train.grpo import STATE_FILE, GRPOLoop, _load_checkpoint, _save_checkpoint
    from deltatune.train.grpo_rewards import Reward

    model, _ = policy
    reward = [Reward("r", lambda completions, **_: [0.0] * len(completions))]
    static = GRPOLoop(copy.deepcopy(model), tokenizer(), reward, _Align(num_generations=4, entropy_coef=0.1))
    g = torch.Generator().manual_seed(0)
    _save_checkpoint(str(tmp_path), 2, static, g, [], [], {}, None)
    assert torch.load(tmp_path / "checkpoint-2" / STATE_FILE, weights_only=True)["entropy"] is None
    adaptive = _Align(num_generations=4, entropy_coef=0.3, use_adaptive_entropy=True)
    again = GRPOLoop(copy.deepcopy(model), tokenizer(), reward, adaptive)
    _load_checkpoint(str(tmp_path / "checkpoint-2"), again, g)
    assert (again.bonus.coef, again.bonus.last) == (0.3, math.inf)
    state = torch.load(tmp_path / "checkpoint-2" / STATE_FILE, weights_only=True)
    state["entropy"] = {"entropy_coef": 0.1, "last_world_entropy": math.inf}  # (a static run's, before)
    torch.save(state, tmp_path / "checkpoint-2" / STATE_FILE)
    before = GRPOLoop(copy.deepcopy(model), tokenizer(), reward, adaptive)
    _load_checkpoint(str(tmp_path / "checkpoint-2"), before, g)
    assert (before.bonus.coef, before.bonus.last) == (0.3, math.inf)


@pytest.mark.parametrize("keys, bnpo, entropy", [
    ({"loss_type": "bnpo"}, True, False),
    ({"loss_type": "grpo", "top_entropy_quantile": 0.5}, False, True),
    ({"loss_type": "bnpo", "top_entropy_quantile": 0.5}, True, True),
])  # fmt: skip
def test_resume_of_an_old_grpo_run_names_only_the_causes_it_had(tmp_path, keys, bnpo, entropy):
    """An old grpo run's --resume (runs.old_run_data marks its steps_per_generation null) names the bnpo clause only
    for a bnpo run and the chunk order clause only for a top_entropy_quantile < 1 run (the note before named both
    whichever the run had)."""
    from deltatune.train.config_align import BNPO_BEFORE, ENTROPY_BEFORE
    from deltatune.train.run import _check_resume_recipe

    run, recipe = p15._old_bnpo_run(tmp_path, **keys)
    with pytest.raises(ConfigError) as err:
        _check_resume_recipe(run, recipe, False)
    message = str(err.value)
    assert "\n" not in message and "align.steps_per_generation: None -> 1 (" in message
    assert (BNPO_BEFORE in message, ENTROPY_BEFORE in message) == (bnpo, entropy)


def test_a_reward_folder_that_is_no_one_label_classifier_is_one_line_before_any_model_loads(reward_model_folder):
    """A causal LM folder (config.json, no run.yaml) was taken as a reward model: it scored with a random score head,
    silently; a two-label classifier passed check_rewards and failed once the policy had loaded, in TRL's load
    (AutoModelForSequenceClassification num_labels=1: a multi-line size mismatch error, as TRL's GRPOTrainer fails on
    it). check_rewards refuses both in one line naming the folder; the one-label classifier passes."""
    import os

    from tiny import tokenizer
    from transformers import AutoModelForSequenceClassification

    from deltatune.train.grpo_rewards import check_rewards

    base, two = os.path.join(os.path.dirname(reward_model_folder), "base"), reward_model_folder + "-2"
    tokenizer().save_pretrained(base)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).save_pretrained(two)
    tokenizer().save_pretrained(two)
    with pytest.raises(RuntimeError):  # (TRL's load of it)
        AutoModelForSequenceClassification.from_pretrained(two, num_labels=1)
    for folder, words in ((base, "is no sequence-classification model (config.json's architectures: "
                                 "['LlamaForCausalLM'])"), (two, "is a classifier of 2 labels")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            check_rewards(AlignArgs(reward_funcs=[folder], num_generations=2))
        assert "\n" not in str(err.value) and str(err.value).startswith(f"align.reward_funcs: {folder!r} {words}")
    assert check_rewards(AlignArgs(reward_funcs=[reward_model_folder], num_generations=2))[0].name == "tiny-rm"


def test_a_reward_model_loads_with_the_recipes_trust_remote_code(reward_model_folder, monkeypatch):
    """The reward model loads with model.trust_remote_code, as TRL passes args.trust_remote_code to its
    from_pretrained (the loop before always passed False)."""
    import deltatune.train.grpo_reward_model as grm
    from deltatune.train.grpo_rewards import check_rewards, load_rewards

    seen = []
    monkeypatch.setattr(grm, "SequenceClassifierReward", lambda path, device, trust=False: seen.append(trust))
    align = AlignArgs(reward_funcs=[reward_model_folder], num_generations=2)
    load_rewards(check_rewards(align), align.reward_funcs, torch.nn.Linear(1, 1), "p", None, trust_remote_code=True)
    assert seen == [True]
