"""GRPO: advantages, the clipped objective, the k3 KL estimator and the two loss normalisations by hand; beta 0 makes
no reference pass; a group of equal rewards has zero advantages; bad rewards are one line naming the reward and the
row; the mean reward rises on a tiny model; the recipe through the CLI (with a reward-model run as a reward); a
resumed run equals an uninterrupted one; bad settings are refused before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny, word_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from deltatune import LoraConfig, get_delta_model
from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.train import build, train
from deltatune.train.config import AlignArgs
from deltatune.train.grpo import GRPOLoop, PromptItem, group_advantages, grpo_loss, k3_kl
from deltatune.train.grpo_rewards import Reward, RewardError, check_rewards, combine, score

ROOT = Path(__file__).resolve().parents[2]


# -- the math by hand ----------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    """Two groups of G = 3. [1, 2, 3]: mean 2, Bessel std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1, so A = [-1, 0, 1] / 1.0001.
    [5, 5, 5]: every advantage exactly 0 (0 / (0 + 1e-4)). Without the std (Dr. GRPO): [-1, 0, 1, 0, 0, 0]."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    torch.testing.assert_close(group_advantages(rewards, 3), torch.tensor([-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(rewards, 3, scale=False), torch.tensor([-1.0, 0, 1, 0, 0, 0]))


def test_identical_rewards_give_zero_advantages():
    adv = group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.7, 0.0, 1.0, 0.0, 1.0]), 4)
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]  # exactly: the equal group teaches nothing
    assert adv[4:].abs().min() > 0.5  # the guard: the other group does move


def test_k3_kl_by_hand():
    """KL_t = exp(d) - d - 1 with d = log ref - log pi: d = 0 -> 0; d = ln 2 -> 2 - 0.693147 - 1 = 0.306853;
    d = -ln 2 -> 0.5 + 0.693147 - 1 = 0.193147 (never negative, 0 only where pi = ref)."""
    ln2 = math.log(2)
    kl = k3_kl(torch.zeros(3), torch.tensor([0.0, ln2, -ln2]))
    torch.testing.assert_close(kl, torch.tensor([0.0, 0.306853, 0.193147]), atol=1e-6, rtol=0)


def test_clipped_objective_by_hand():
    """Three one-token completions, ratios [0.5, 1.0, 1.5], advantages [1, -1, 1], eps 0.2; per token
    -min(r A, clip(r, 0.8, 1.2) A):

        0: -min(0.5, 0.8)   = -0.5   (a ratio below 1 - eps with A > 0 is not clipped)
        1: -min(-1, -1)     =  1.0
        2: -min(1.5, 1.2)   = -1.2   (clipped)
    loss = (-0.5 + 1.0 - 1.2) / 3 = -0.233333; one clipped token of three.
    """
    logp = torch.log(torch.tensor([[0.5], [1.0], [1.5]]))
    loss, stats = grpo_loss(logp, torch.zeros(3, 1), torch.tensor([1.0, -1.0, 1.0]), torch.ones(3, 1), 0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.7 / 3))
    assert stats["clipped"].item() == 1 and stats["tokens"].item() == 3 and "kl" not in stats


def test_loss_normalisations_by_hand():
    """Completion 0 has 1 token with A = 1, completion 1 has 3 tokens with A = -1; ratio 1, so l_t = -A:
    sequence mean: (mean[-1] + mean[1, 1, 1]) / 2 = (-1 + 1) / 2 = 0;  token mean: (-1 + 1 + 1 + 1) / 4 = 0.5."""
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    logp = torch.full((2, 3), -1.0)
    adv = torch.tensor([1.0, -1.0])
    seq, _ = grpo_loss(logp, logp, adv, mask, loss_norm="sequence")
    tok, _ = grpo_loss(logp, logp, adv, mask, loss_norm="token")
    assert seq.item() == pytest.approx(0.0) and tok.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="loss_norm"):
        grpo_loss(logp, logp, adv, mask, loss_norm="max")


def test_kl_term_by_hand():
    """One completion of 3 tokens, ratio 1, A = 2, beta 0.1, KL_t = [0, 0.306853, 0.193147] (as above):
    loss = mean(-2 + 0.1 KL_t) = -2 + 0.1 * 0.5 / 3 = -1.983333."""
    ln2 = math.log(2)
    logp = torch.zeros(1, 3)
    loss, stats = grpo_loss(logp, logp, torch.tensor([2.0]), torch.ones(1, 3), beta=0.1,
                            ref_logprobs=torch.tensor([[0.0, ln2, -ln2]]))  # fmt: skip
    assert loss.item() == pytest.approx(-2 + 0.05 / 3, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_chunk_losses_add_up_to_the_batch_loss(norm):
    g = torch.Generator().manual_seed(0)
    logp, old, ref = (torch.randn(5, 4, generator=g) * 0.3 - 1 for _ in range(3))
    adv, mask = torch.randn(5, generator=g), torch.tensor([[1.0, 1, 1, 0]] * 3 + [[1.0, 0, 0, 0]] * 2)
    whole, _ = grpo_loss(logp, old, adv, mask, 0.2, 0.05, ref, norm)
    parts = [grpo_loss(logp[i:j], old[i:j], adv[i:j], mask[i:j], 0.2, 0.05, ref[i:j], norm, 5, mask.sum())[0]
             for i, j in ((0, 2), (2, 5))]  # fmt: skip
    torch.testing.assert_close(sum(parts), whole)


# -- rewards -------------------------------------------------------------------------------------------------

SOURCES = ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3"]


def _score(fn, completions=("a", "bad", "c"), **columns):
    return score([Reward(fn.__name__, fn)], ["x", "y", "z"], ["x", "y", "z"], list(completions), columns, SOURCES)


def test_rewards_get_prompts_completions_and_columns_by_keyword():
    def lengths(prompts, completions, answer, **kwargs):
        return [len(c) + a for c, a in zip(completions, answer)]

    assert _score(lengths, answer=[10, 20, 30]).flatten().tolist() == [11.0, 23.0, 31.0]


def test_a_reward_that_raises_names_the_reward_and_the_row():
    def boom(prompts, completions, **kwargs):
        if "bad" in completions:
            raise ValueError("cannot parse")
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"^reward boom raised ValueError: cannot parse \(row p.jsonl:2, "):
        _score(boom)


@pytest.mark.parametrize(
    "value, message",
    [
        ([1.0, 2.0], "reward f returned 2 values for 3 completions"),
        ([1.0, float("nan"), 0.0], "reward f returned nan for row p.jsonl:2; rewards must be finite numbers"),
        ([1.0, "abc", 0.0], r"reward f returned 'abc' \(str\) for row p.jsonl:2, not a number"),
        ({"a": 1}, "reward f returned a dict, not a list of 3 numbers"),
    ],
)
def test_bad_reward_values_are_one_line(value, message):
    def f(prompts, completions, **kwargs):
        return value

    with pytest.raises(RewardError, match=message):
        _score(f)


def test_a_reward_of_none_does_not_apply_to_that_row_as_in_trl():
    """TRL: None from a reward function is "not applicable" (NaN), left out of the weighted sum (nansum), of that
    reward's logged mean and std, and, where no reward applies, of the group's baseline (advantage 0)."""
    from trl.trainer.utils import nanstd

    def math_only(prompts, completions, **kwargs):
        return [None if c == "bad" else 1.0 for c in completions]

    table = _score(math_only)
    assert table[:, 0].isnan().tolist() == [False, True, False]
    table = torch.tensor([[1.0, math.nan], [math.nan, 2.0], [3.0, 4.0], [math.nan, math.nan]] * 2)
    with pytest.warns(UserWarning, match=r"every reward returned None for row p:4, p:8: it gets no reward"):
        rewards = combine(table, torch.tensor([1.0, 0.5]), [f"p:{i + 1}" for i in range(8)])
    assert rewards[:3].tolist() == [1.0, 1.0, 5.0] and rewards[3].isnan()  # by hand
    grouped = rewards.view(-1, 4)  # TRL's sum_then_normalize with its own nanstd
    want = (grouped - grouped.nanmean(-1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4), want.nan_to_num(0.0).flatten())
    assert group_advantages(rewards, 4)[3] == 0
    assert group_advantages(torch.tensor([1.0, math.nan]), 2).tolist() == [0, 0]  # one reward: no std


def test_a_step_with_rewards_that_apply_to_some_rows_logs_trls_statistics(base_dir):
    from trl.trainer.utils import nanstd

    def odd_rows(prompts, completions, **kwargs):  # applies to every other completion
        return [None if i % 2 else yes_fraction(prompts, [c])[0] for i, c in enumerate(completions)]

    seen = []

    def length(prompts, completions, **kwargs):
        seen.append(len(completions))
        return [float(len(c.split())) for c in completions]

    rewards = [Reward("odd_rows", odd_rows), Reward("length", length, 0.5)]
    loop = GRPOLoop(policy(base_dir), word_tokenizer(), rewards, AlignArgs(num_generations=4, max_new_tokens=4),
                    lr=1e-2, seed=0)  # fmt: skip
    tables = []
    original = loop.score
    loop.score = lambda s: tables.append(original(s)) or tables[-1]
    stats = loop.step(ITEMS[:2])
    table = tables[0]
    assert table[1::2, 0].isnan().all() and not table[:, 1].isnan().any() and seen == [8]
    total = (table * torch.tensor([1.0, 0.5])).nansum(-1)
    assert stats["reward"] == pytest.approx(total.mean().item()) and math.isfinite(stats["loss"])
    assert stats["rewards/odd_rows/mean"] == pytest.approx(table[0::2, 0].mean().item())
    assert stats["rewards/odd_rows/std"] == pytest.approx(nanstd(table[:, 0]).item())


def test_reward_specs_are_checked(tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text("def short(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n")
    rewards = check_rewards(AlignArgs(reward_funcs=[f"{module}:short", f"{module}:short"], reward_weights=[1, 0.5]))
    assert [(r.name, r.weight) for r in rewards] == [("short", 1.0), ("short_", 0.5)]
    assert rewards[0].fn(prompts=["p"], completions=["abc"]) == [-3]
    for funcs, weights, message in [
        (["no_such_module_xyz:f"], None, "align.reward_funcs entry 'no_such_module_xyz:f' could not be imported"),
        ([str(tmp_path / "missing.py") + ":f"], None, "could not be imported: ImportError: no file"),
        ([f"{module}:long"], None, "could not be imported: AttributeError"),
        (["os.path:sep"], None, "'os.path:sep' is not callable"),
        (["just_a_name"], None, "neither a reward run folder nor of the form module:function"),
        ([], None, "align.reward_funcs is empty"),
        ([f"{module}:short"], [1, 2], "align.reward_weights has 2 values for 1 align.reward_funcs"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_rewards(AlignArgs(reward_funcs=funcs, reward_weights=weights))


def test_the_arithmetic_recipe_rewards():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("arithmetic", ROOT / "recipes" / "rewards" / "arithmetic.py")
    a = module_from_spec(spec)
    spec.loader.exec_module(a)
    completions = ["5 + 10 = 15\nAnswer: 15", "Answer: 14 apples, no wait\n15 - 1 = 14", "The answer is 15.", "none"]
    assert a.exact_answer(None, completions, [15, 15, 15, 15]) == [1.0, 0.0, 1.0, 0.0]
    assert a.answer_format(None, completions) == [1.0, 0.5, 0.25, 0.0]
    rows = a.rows(5, seed=0)
    assert rows == a.rows(5, seed=0) and rows != a.rows(5, seed=1)  # seeded
    first = rows[0]["prompt"][0]["content"].split("\n")[0]
    assert first not in {r["prompt"][0]["content"].split("\n")[0] for r in a.rows(50, seed=1, exclude={first})}


# -- the loop on a tiny policy -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    tok = word_tokenizer()
    config = AutoConfig.for_model(
        "llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=len(tok), pad_token_id=0, bos_token_id=2, eos_token_id=3,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("grpo") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def policy(base_dir: str):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    return get_delta_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))


def yes_fraction(prompts, completions, **kwargs):
    """The reward that prefers one token: the fraction of the completion's words that are 'yes'."""
    return [sum(w == "yes" for w in c.split()) / max(len(c.split()), 1) for c in completions]


ITEMS = [PromptItem([2, 4 + i, 4 + (i * 7) % 40, 4 + (i * 3) % 40], f"prompt {i}", {}, f"p.jsonl:{i + 1}")
         for i in range(40)]  # fmt: skip
YES = [Reward("yes_fraction", yes_fraction)]


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_beta_zero_makes_no_reference_pass(base_dir, beta):
    """The reference is the policy with the adapter off: count the times the loop turns the adapter off."""
    model = policy(base_dir)
    calls = []
    original = model.disable_adapter

    def counting():
        calls.append(1)
        return original()

    model.disable_adapter = counting
    loop = GRPOLoop(model, word_tokenizer(), YES, AlignArgs(num_generations=4, max_new_tokens=4, beta=beta,
                                                            mini_batch_size=4), lr=1e-2)  # fmt: skip
    stats = loop.step(ITEMS[:4])
    if beta == 0:
        assert calls == [] and "kl" not in stats
    else:  # the guard: with a KL term the reference runs, once per chunk of 4 of the 16 completions
        assert len(calls) == 4 and stats["kl"] >= 0


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_precision_samples_and_trains_under_autocast_with_fp32_weights(base_dir, bf16):
    """train.precision: bf16 runs sampling and every forward under bf16 autocast (as the Trainer's stages do);
    fp32 runs none of them so. The trainable weights stay fp32 either way."""
    model = policy(base_dir)
    seen = []
    model.get_base_model().register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    align = AlignArgs(num_generations=2, max_new_tokens=3, mini_batch_size=8)
    loop = GRPOLoop(model, word_tokenizer(), YES, align, lr=1e-2, bf16=bf16)
    loop.step(ITEMS[:2])
    loop.mean_reward(ITEMS[:2], 2)
    assert seen and set(seen) == {bf16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("bf16", [False, True])
def test_several_iterations_per_generation_batch(base_dir, bf16):
    """num_iterations = 3: three optimizer steps on one batch of samples; from the second on pi differs from pi_old,
    so with a large learning rate some ratios leave [1 - eps, 1 + eps] and are clipped (at mu = 1 none can be).
    Under bf16 autocast too: autocast caches its bf16 copies of the trainable weights for as long as its region
    lasts, so without clearing them after each update the later iterations would still see the first weights."""
    clipped = []
    for mu in (1, 3):
        align = AlignArgs(num_generations=4, max_new_tokens=4, num_iterations=mu, mini_batch_size=16)
        loop = GRPOLoop(policy(base_dir), word_tokenizer(), YES, align, lr=0.2, seed=0, bf16=bf16)
        update, in_autocast = loop.optimizer.step, []
        loop.optimizer.step = lambda seen=in_autocast, step=update: (
            seen.append(torch.is_autocast_enabled("cpu")),
            step(),
        )[1]
        torch.manual_seed(1)
        stats = loop.step(ITEMS[:4])
        assert in_autocast == [False] * mu  # no autocast region (and its weight cache) spans an update
        steps = {int(state["step"]) for state in loop.optimizer.state.values()}
        assert steps == {mu}
        clipped.append(stats["clipfrac"])
    assert clipped[0] == 0.0 and clipped[1] > 0.0


def test_mean_reward_rises_on_a_tiny_model(base_dir):
    """'yes' starts at ~1 word in 45 (reward ~0.03); 20 GRPO steps of 8 prompts x 8 completions make it nearly every
    word (seeds 0 and 1 reach 1.0 by step 12)."""
    align = AlignArgs(num_generations=8, max_new_tokens=6, beta=0.0, mini_batch_size=64, loss_norm="token")
    loop = GRPOLoop(policy(base_dir), word_tokenizer(), YES, align, lr=3e-2, seed=0, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    history = [loop.step([ITEMS[i] for i in torch.randperm(40, generator=g)[:8].tolist()]) for _ in range(20)]
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-5:]) / 5
    assert first < 0.1 and last > 0.8, (first, last, [round(h["reward"], 2) for h in history])
    for key in ("clipfrac", "entropy", "completion_length", "rewards/yes_fraction/mean", "rewards/yes_fraction/std"):
        assert all(math.isfinite(h[key]) for h in history), key


# -- through the CLI -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo_cli")
    bert = save_tiny(tmp / "bert", "bert", "seq_cls")
    rows = [{"prompt": f"w{i} w{i + 1}", "chosen": "a kind answer", "rejected": f"w{i} no"} for i in range(8)]
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm = str(tmp / "rm")
    train(build({
        "stage": "rm", "model": {"name_or_path": bert},
        "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
        "data": {"train": str(pairs), "max_length": 32},
        "train": {"max_steps": 1, "batch_size": 4, "report_to": ["none"]}, "output": {"dir": rm},
    }))  # fmt: skip
    return {"llama": save_tiny(tmp / "llama", "llama", "causal_lm"), "rm": rm,
            "short": save_tiny(tmp / "short", "llama", "causal_lm", max_position_embeddings=32)}  # fmt: skip


TINY_RUN = ["model.dtype=float32", "data.limit=8", "train.batch_size=2", "align.num_generations=2",
            "align.max_new_tokens=4", "align.mini_batch_size=4", "train.eval_batch_size=4"]  # fmt: skip


def test_recipe_two_steps_through_cli(cli_files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names its data and reward module relative to the repository
    out = tmp_path / "run"
    rewards = (
        f"[{cli_files['rm']}, recipes/rewards/arithmetic.py:exact_answer, recipes/rewards/arithmetic.py:answer_format]"
    )
    code = main(["train", "recipes/grpo-arithmetic.yaml", f"model.name_or_path={cli_files['llama']}", *TINY_RUN,
                 "train.max_steps=2", f"align.reward_funcs={rewards}", "align.reward_weights=[0.1, 1.0, 0.5]",
                 "align.beta=0.05", f"output.dir={out}"])  # fmt: skip
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2
    assert {"reward_first", "reward_last", "kl_last", "eval_reward", "eval_reward_before"} <= metrics.keys()
    for name in ("adapter_model.safetensors", "report.md", "run.yaml", "metrics.json", "grpo_stats.png"):
        assert (out / name).is_file(), name
    assert "rm (weight 0.1), exact_answer (weight 1), answer_format (weight 0.5)" in (out / "report.md").read_text()


def test_resume_equals_uninterrupted(cli_files, tmp_path, capsys, monkeypatch):
    """4 steps straight, and 2 steps, a crash (what a killed run leaves: run.yaml and checkpoint-2), then --resume to
    step 4: the same adapter, because the optimizer, the data order and the sampling RNG are restored."""
    monkeypatch.chdir(ROOT)
    common = [
        "recipes/grpo-arithmetic.yaml",
        f"model.name_or_path={cli_files['llama']}",
        *TINY_RUN,
        "train.save_steps=2",
        "train.eval_on_start=false",
        "data.eval=null",
        "train.lr=0.05",
        "train.weight_decay=0.01",
    ]  # fmt: skip  (decay moves the adapter even at a step whose rewards all tie)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *common, "train.max_steps=4", f"output.dir={straight}"]) == 0
    assert main(["train", *common, "train.max_steps=2", f"output.dir={resumed}"]) == 0
    for name in resumed.iterdir():
        if name.name not in ("run.yaml", "checkpoint-2"):
            name.unlink() if name.is_file() else None
    assert (resumed / "checkpoint-2" / "trainer_state.json").is_file()
    assert main(["train", *common, "train.max_steps=4", f"output.dir={resumed}", "--resume"]) == 0
    capsys.readouterr()
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    two = load_file(resumed / "checkpoint-2" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], two[k]) for k in a)  # the guard: steps 3 and 4 changed the adapter
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    steps = [
        h["step"] for h in json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    ]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["align.num_generations=1"],
            "align.num_generations must be >= 2 (advantages are relative to a group), got 1",
        ),
        (
            ["align.reward_funcs=[no_such_module_xyz:score]", "align.reward_weights=null"],
            "align.reward_funcs entry 'no_such_module_xyz:score' could not be imported",
        ),
        (["model.name_or_path={short}", "data.max_length=512"], "more than the model's context of 32"),
        (["align.loss_norm=max"], "align.loss_norm must be sequence or token"),
    ],
)
def test_bad_settings_are_one_line_and_change_nothing(cli_files, tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    overrides = [o.format(short=cli_files["short"]) for o in overrides]
    keys = {o.split("=")[0] for o in overrides}
    base = [o for o in [f"model.name_or_path={cli_files['llama']}", *TINY_RUN] if o.split("=")[0] not in keys]
    # (each key once: a key given twice is said on stderr)
    code = main(["train", "recipes/grpo-arithmetic.yaml", *base, *overrides, f"output.dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_recipes_weight_decay_and_schedule_are_used_and_each_steps_rate_logged(cli_files, tmp_path, monkeypatch):
    """GRPO's AdamW took torch's default weight decay (0.01) over the recipe's, and logged the next step's rate."""
    monkeypatch.chdir(ROOT)
    made = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: made.append(k) or adamw(*a, **k))
    out = tmp_path / "run"
    assert main(["train", "recipes/grpo-arithmetic.yaml", f"model.name_or_path={cli_files['llama']}", *TINY_RUN,
                 "train.max_steps=4", "train.lr=0.01", "train.scheduler=linear", "train.warmup_steps=1",
                 "train.weight_decay=0.0", "train.eval_on_start=false", "data.eval=null", f"output.dir={out}"]) == 0  # fmt: skip
    assert made and made[0]["weight_decay"] == 0.0
    logged = [
        json.loads(line)["lr"] for line in (out / "log_history.jsonl").read_text().splitlines() if '"lr"' in line
    ]
    assert logged == pytest.approx([0.0, 0.01, 0.01 * 2 / 3, 0.01 / 3])  # the rate each update used


def test_a_launch_of_several_processes_is_refused(cli_files, tmp_path, capsys, monkeypatch):
    """Under torchrun every process ran the whole loop on the whole data into one folder: twice the compute, each
    step logged twice, and the processes racing on the checkpoints (one died in four tries)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    argv = ["train", "recipes/grpo-arithmetic.yaml", f"model.name_or_path={cli_files['llama']}", f"output.dir={out}"]
    assert main(argv) == 2
    assert "stage grpo trains in one process (its own loop shards nothing): launch it without torchrun" in (
        capsys.readouterr().err
    )
    assert not out.exists()


def test_prompts_are_rendered_with_the_recipes_template_as_generate_prompts_the_run():
    """data.template was ignored: GRPO sampled after the raw text (or the tokenizer's chat template) while PPO, and
    generate and chat afterwards, prompt such a run through the template."""
    from tiny import tokenizer

    from deltatune.data.load import Row
    from deltatune.train.chat import prompt_ids
    from deltatune.train.grpo import encode_prompts

    tok = tokenizer()
    rows = [Row({"prompt": "what is two plus two", "answer": "4"}, "p.jsonl:1"),
            Row({"prompt": [{"role": "user", "content": "what is two plus two"}], "answer": "4"}, "p.jsonl:2")]  # fmt: skip
    for template in ("alpaca", "chatml"):
        items, _ = encode_prompts(rows, tok, "prompt", 64, "truncate", template)
        want = prompt_ids(tok, "what is two plus two", template=template)
        assert [it.ids for it in items] == [want, want] and items[0].columns == {"answer": "4"}
    assert encode_prompts(rows[:1], tok, "prompt", 64, "truncate")[0][0].ids != want  # no template: the text as is


def test_a_prompt_ending_with_an_assistant_turn_is_continued_as_trl_renders_it():
    """A prefill (messages ending with an assistant turn) was closed and followed by a new assistant header; TRL's
    maybe_apply_chat_template continues it (continue_final_message), and so does a built-in template now."""
    from tiny import tokenizer
    from trl.data_utils import maybe_apply_chat_template

    from deltatune.data.load import Row
    from deltatune.data.templates import render
    from deltatune.train.grpo import encode_prompts

    tok = tokenizer()
    prompt = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "let me think"}]
    rows = [Row({"prompt": prompt}, "p.jsonl:1")]
    want = tok(maybe_apply_chat_template({"prompt": prompt}, tok)["prompt"], add_special_tokens=False)["input_ids"]
    assert encode_prompts(rows, tok, "prompt", 64, "truncate")[0][0].ids == want
    full = render(prompt, tok, "chatml")[0]  # the whole conversation, closed: the prefill is its text up to the close
    ids = encode_prompts(rows, tok, "prompt", 64, "truncate", "chatml")[0][0].ids
    assert ids == tok(full[: full.rindex("let me think") + len("let me think")])["input_ids"][:-1]  # (no [SEP])
    weighted = [Row({"prompt": [prompt[0], {**prompt[1], "weight": 0}]}, "p.jsonl:2")]  # no span: was an IndexError
    assert encode_prompts(weighted, tok, "prompt", 64, "truncate", "chatml")[0][0].ids == ids


def test_groups_of_equal_rewards_count_as_zero_std_as_in_trl(base_dir):
    """TRL counts a group's std as zero by torch.isclose: seven rewards of 0.1 have a float32 std of 8e-9, not 0,
    and deltatune's exact test logged frac_zero_std_groups 0.0 where TRL logs 1.0."""

    def tenth(prompts, completions, **kwargs):
        return [0.1] * len(completions)

    loop = GRPOLoop(policy(base_dir), word_tokenizer(), [Reward("tenth", tenth)],
                    AlignArgs(num_generations=7, max_new_tokens=2), lr=1e-2)  # fmt: skip
    assert loop.step(ITEMS[:2])["frac_zero_std_groups"] == 1.0
