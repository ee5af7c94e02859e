"""Stage grpo against TRL 1.16's GRPOTrainer (probe 20): the policy_loss TRL logs with an entropy bonus (each
micro-batch's loss before the bonus, their mean over the step's updates), and the epoch each log row carries (TRL's
state.epoch at the log: its optimizer steps over those of a pass, num_iterations x steps_per_generation a
generation batch)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_grpo_probe15 import _ours, _trl_run, policy  # noqa: F401  (policy: the fixture)

CASES = [(2, 2, "grpo", {"entropy_coef": 0.05}, 1), (2, 1, "dapo", {"entropy_coef": 0.1, "top_entropy_quantile": 0.5}, 1),
         (2, 2, "bnpo", {"entropy_coef": 0.1}, 2), (1, 2, "grpo", {"entropy_coef": 0.1}, 2),
         (2, 1, "cispo", {"entropy_coef": 0.1}, 2), (2, 1, "dr_grpo", {"entropy_coef": 0.1}, 2)]  # fmt: skip


@pytest.mark.parametrize("S, mu, loss_type, keys, ga", CASES)
def test_policy_loss_is_trls_with_a_bonus(policy, tmp_path, monkeypatch, S, mu, loss_type, keys, ga):  # noqa: F811
    """TRL logs policy_loss (the loss before the entropy bonus, per micro-batch, not divided by the accumulation
    steps) when an entropy bonus is on; the step logs the mean of its micro-batches' values. deltatune logged none."""
    model, _ = policy
    trl_steps, _ = _trl_run(copy.deepcopy(model), tmp_path, monkeypatch, S, mu, loss_type, keys, ga=ga)
    stats, *_ = _ours(copy.deepcopy(model), S, mu, loss_type, keys, monkeypatch, mini_batch_size=8 // S // ga)
    want = sum(p for p, *_ in trl_steps) / len(trl_steps)
    assert abs(want - stats["loss"]) > 1e-4  # (the bonus moves the loss: policy_loss is another number)
    assert stats["policy_loss"] == pytest.approx(want, rel=1e-5, abs=2e-6)


def test_no_policy_loss_without_an_entropy_bonus_as_trl(policy, tmp_path, monkeypatch):  # noqa: F811
    """Without the bonus TRL's _compute_loss logs no policy_loss; nor does the step."""
    model, _ = policy
    _trl_run(copy.deepcopy(model), tmp_path, monkeypatch, 1, 1, "grpo", {})
    stats, *_ = _ours(copy.deepcopy(model), 1, 1, "grpo", {}, monkeypatch)
    assert "policy_loss" not in stats and "loss" in stats


def _trl_epochs(tmp_path, base: str, mu: int, S: int, max_steps: int, n: int = 4, epochs: float = 0) -> list[float]:
    """The epoch of each row TRL's GRPOTrainer logs, one row per generation batch (logging_steps mu x S), ``n``
    prompts two a generation batch, for ``max_steps`` generation batches or (max_steps 0) ``epochs`` passes."""
    import trl
    from datasets import Dataset
    from tiny import tokenizer
    from transformers import AutoModelForCausalLM

    tok = tokenizer()
    prompt, a_id = tok("hi")["input_ids"], tok.convert_tokens_to_ids("a")

    def rollout(prompts, trainer):
        body = [[a_id + i, tok.eos_token_id] for i in range(len(prompts))]
        return {"prompt_ids": [prompt] * len(prompts), "completion_ids": body, "logprobs": [[0.0] * 2 for _ in body]}

    length = {"max_steps": max_steps * mu * S} if max_steps else {"num_train_epochs": epochs}
    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=4 // S, steps_per_generation=S,
                          num_iterations=mu, learning_rate=1e-3, logging_steps=mu * S, **length,
                          save_strategy="no", report_to=[], use_cpu=True, bf16=False, num_generations=2,
                          max_completion_length=2, beta=0.0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(base), args=args, processing_class=tok,
            train_dataset=Dataset.from_list([{"prompt": f"p{i}"} for i in range(n)]),
            reward_funcs=lambda completions, **_: [float(len(c)) for c in completions], rollout_func=rollout,
        )  # fmt: skip
        trainer.train()
    return [h["epoch"] for h in trainer.state.log_history if "loss" in h]


def _run(base: str, out, n: int, train: dict, align: dict | None = None, checkpoint=None):
    """train_grpo on ``n`` prompts (``train`` over batch_size 2, lr 1e-3, save_steps 10): its log rows."""
    from tiny import tokenizer
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.train import build
    from deltatune.train.grpo import PromptItem, train_grpo
    from deltatune.train.grpo_rewards import Reward

    tok = tokenizer()
    items = [PromptItem(tok(f"p{i}")["input_ids"], f"p{i}", {}, f"t.jsonl:{i + 1}") for i in range(n)]
    cfg = build({"stage": "grpo", "model": {"name_or_path": base}, "method": {"name": "lora"},
                 "data": {"train": "t.jsonl"}, "output": {"dir": str(out)},
                 "train": {"batch_size": 2, "lr": 1e-3, "save_steps": 10, **train},
                 "align": {"num_generations": 2, "max_new_tokens": 2, "beta": 0.0, "reward_funcs": ["unused:f"],
                           **(align or {})}})  # fmt: skip
    torch.manual_seed(0)
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(r=2, task_type="CAUSAL_LM"))
    reward = Reward("f", lambda completions, **_: [float(len(c)) for c in completions])
    return train_grpo(model, tok, cfg, items, None, [reward], checkpoint=checkpoint)[1]


@pytest.mark.parametrize("mu, S, n, epochs", [(2, 1, 4, 0), (1, 2, 4, 0), (2, 1, 7, 2)])
def test_each_log_row_carries_trls_epoch(policy, tmp_path, monkeypatch, mu, S, n, epochs):  # noqa: F811
    """Each row of the step log carries TRL's epoch (its log rows', the board's epoch axis reads it): with
    num_iterations or steps_per_generation 2, a step is 2 of TRL's optimizer steps, and 4 prompts 2 a step make a
    pass in 2 steps. deltatune's rows had no epoch (the board's epoch axis showed a GRPO run empty). 7 prompts 2 a
    step: TRL's RepeatSampler drops each pass's last partial batch, 3 steps a pass (2 passes: 6 rows, epochs 1/3 ...
    2); deltatune counted 4 (8 rows, 0.25 ... 2)."""
    from deltatune.train import grpo

    _, base = policy
    want = _trl_epochs(tmp_path / "trl", base, mu, S, 0 if epochs else 3, n, epochs)
    monkeypatch.setattr(grpo, "plot_panels", lambda *a: None)
    train = {"epochs": epochs} if epochs else {"max_steps": 3}
    history = _run(base, tmp_path / "run", n, train, {"num_iterations": mu, "steps_per_generation": S})
    assert want == ([0.5, 1.0, 1.5] if n == 4 else pytest.approx([k / 3 for k in range(1, 7)]))
    assert [h["epoch"] for h in history] == pytest.approx(want)


def test_a_run_begun_counting_a_partial_batch_keeps_its_count_on_every_resume(policy, tmp_path, monkeypatch):  # noqa: F811
    """A checkpoint without the epoch_count marker (a run begun before TRL's floor count) resumes with its old count
    (7 prompts 2 a step: 4 steps a pass), and its later checkpoints keep it (resumed again: 4 steps); a new run counts
    3 steps and its checkpoints say so."""
    from deltatune.train import grpo
    from deltatune.train.grpo_checkpoint import STATE_FILE, counted_ceil

    _, base = policy
    monkeypatch.setattr(grpo, "plot_panels", lambda *a: None)
    out = tmp_path / "run"
    new = _run(base, out, 7, {"epochs": 1, "save_steps": 1, "save_total_limit": 9})
    assert [h["step"] for h in new] == [1, 2, 3] and not counted_ceil(str(out / "checkpoint-1"))
    state_file = out / "checkpoint-1" / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    del state["epoch_count"]  # (as a checkpoint written before the marker)
    torch.save(state, state_file)
    old = _run(
        base, out, 7, {"epochs": 1, "save_steps": 1, "save_total_limit": 9}, checkpoint=str(out / "checkpoint-1")
    )
    assert [h["step"] for h in old] == [1, 2, 3, 4]
    assert [h["epoch"] for h in old[1:]] == pytest.approx([0.5, 0.75, 1.0])
    assert counted_ceil(str(out / "checkpoint-2")) and counted_ceil(str(out / "checkpoint-4"))
    again = _run(
        base, out, 7, {"epochs": 1, "save_steps": 1, "save_total_limit": 9}, checkpoint=str(out / "checkpoint-2")
    )
    assert [h["step"] for h in again] == [1, 2, 3, 4]


def test_fewer_prompts_than_a_batch_is_one_config_line(policy, tmp_path, monkeypatch):  # noqa: F811
    """3 prompts, train.batch_size 4: TRL's sampler makes no batch (it trains nothing); the loop raised RuntimeError
    (shape '[4, -1]' is invalid) from the slices of steps_per_generation 4. Now one ConfigError line naming data.train
    and train.batch_size, before anything is written."""
    from deltatune.config import ConfigError
    from deltatune.train import grpo

    monkeypatch.setattr(grpo, "plot_panels", lambda *a: None)
    with pytest.raises(
        ConfigError, match=r"^data\.train \(t\.jsonl\) has 3 prompt\(s\), fewer than train\.batch_size 4"
    ) as e:
        _run(policy[1], tmp_path / "run", 3, {"max_steps": 2, "batch_size": 4}, {"steps_per_generation": 4})
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "run").exists()


def _trl_logged(monkeypatch, keys: tuple[str, ...]) -> list[list[float]]:
    """The values of ``keys`` TRL's GRPOTrainer logs at each micro-batch (each _compute_loss call)."""
    import trl.trainer.grpo_trainer as gt

    seen, real = [], gt.GRPOTrainer._compute_loss

    def compute_loss(self, model, inputs):
        loss = real(self, model, inputs)
        seen.append([self._metrics["train"][k][-1] for k in keys])
        return loss

    monkeypatch.setattr(gt.GRPOTrainer, "_compute_loss", compute_loss)
    return seen


KEYS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy")


@pytest.mark.parametrize("S, mu, loss_type, keys, ga", [(2, 2, "grpo", {}, 1), (1, 3, "dapo", {"epsilon_high": 0.1}, 1),
                                                        (2, 1, "bnpo", {}, 2)])  # fmt: skip
def test_clip_ratios_and_entropy_are_trls_micro_batch_means(policy, tmp_path, monkeypatch, S, mu, loss_type, keys, ga):  # noqa: F811
    """S x mu updates on one generation batch of 8 fixed completions (the later ones clip): TRL logs each
    micro-batch's clip_ratio/* and entropy (a token mean of that micro-batch, every update's), the step their mean.
    deltatune weighed them by the tokens over the whole step and took the entropy of the first iteration only
    (region_mean 0.3261 where TRL's is 0.3058 at S 2, mu 2; entropy 6.1256 for 6.1082)."""
    seen = _trl_logged(monkeypatch, KEYS)
    model, _ = policy
    ours_keys = {"cliprange_high": keys["epsilon_high"]} if keys else {}
    _trl_run(copy.deepcopy(model), tmp_path, monkeypatch, S, mu, loss_type, keys, ga=ga)
    stats, *_ = _ours(copy.deepcopy(model), S, mu, loss_type, ours_keys, monkeypatch, mini_batch_size=8 // S // ga)
    assert len(seen) == S * mu * ga
    want = [sum(v) / len(v) for v in zip(*seen)]
    assert mu == 1 or want[2] > 0  # (the later updates clip)
    assert [stats[k] for k in KEYS] == pytest.approx(want, rel=1e-5, abs=1e-6)  # (entropy ~6: float noise)


def test_kl_is_the_mean_of_each_micro_batchs_token_mean_by_hand():
    """TRL's kl log: global_masked_mean per micro-batch, then their mean (not weighed by the micro-batches' tokens).
    Two micro-batches: 3 tokens of KL 1 each, 1 token of KL 3: TRL's kl (1 + 3) / 2 = 2 (a token-weighed mean: 1.5);
    the rows gathered in another order than the micro-batches take them."""
    from deltatune.train.grpo_stats import MicroMeans

    means = MicroMeans(2)
    for row, (kl, tokens) in enumerate(((3.0, 3.0), (3.0, 1.0))):
        mask = torch.tensor([[1.0] * int(tokens) + [0.0] * (3 - int(tokens))])
        rows = {"clipped": torch.zeros(1), "clip_units": torch.tensor([tokens]), "kl": torch.tensor([kl]),
                "kl_units": torch.tensor([tokens])}  # fmt: skip
        means.gather(torch.tensor([1 - row]), {"rows": rows}, torch.ones(1, 3), mask)
    means.take(torch.tensor([1, 0]), [slice(0, 1), slice(1, 2)])
    assert means.stats("cispo") == {"kl": 2.0, "entropy": 1.0, "cispo_clip_ratio": 0.0}
    assert means.stats("sapo") == {"kl": 2.0, "entropy": 1.0}


@pytest.mark.parametrize("seed, mu, loss_type", [(7, 3, "grpo"), (11, 3, "grpo"), (7, 2, "dapo")])
def test_means_at_s1_are_over_trls_shuffled_micro_batches(policy, tmp_path, monkeypatch, seed, mu, loss_type):  # noqa: F811
    """steps_per_generation 1, align.mini_batch_size 4 of 8 completions (TRL's gradient_accumulation_steps 2), grpo
    and dapo: the loop trains in order (the same weights as TRL's shuffled micro-batches) but takes the clip ratios
    and entropy over micro-batches shuffled as TRL's (``trl_micro_order``, here seeded as TRL's shuffle), as it took
    clip_ratio/low_min and high_max already. They were over the in-order chunks: seed 7, mu 3, grpo: low_mean 0.15657
    where TRL's is 0.14872, region_mean 0.27273 for 0.26667, entropy 6.20035 for 6.20328."""
    import test_grpo_probe15 as p15

    from deltatune.train import grpo_loss

    monkeypatch.setattr(p15, "SHUFFLE_SEED", seed)
    monkeypatch.setattr(grpo_loss, "micro_seed", lambda *_: seed)  # (TRL's draw, after torch.manual_seed(seed))
    keys = KEYS + ("clip_ratio/low_min", "clip_ratio/high_max")
    seen = _trl_logged(monkeypatch, keys)
    _trl_run(copy.deepcopy(policy[0]), tmp_path, monkeypatch, 1, mu, loss_type, {}, ga=2)
    stats, *_ = _ours(copy.deepcopy(policy[0]), 1, mu, loss_type, {}, monkeypatch, mini_batch_size=4)
    assert len(seen) == 2 * mu
    want = [sum(v) / len(v) for v in zip(*seen)]
    assert [stats[k] for k in keys] == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("align, where", [
    ({"max_new_tokens": 0}, "align.max_new_tokens: "),
    ({"generation_kwargs": {"watermarking_config": 3}}, "align.generation_kwargs watermarking_config must be a mapping"),
])  # fmt: skip
def test_a_setting_generate_refuses_is_named_by_its_own_key(align, where):
    """transformers' GenerationConfig.validate names the setting it refuses (`max_new_tokens` must be greater than
    0); the one line named align.generation_kwargs for align.max_new_tokens 0, a key the recipe never set. A
    watermarking_config that is no mapping raised AttributeError ('int' object has no attribute 'validate')."""
    from deltatune.config import ConfigError
    from deltatune.train.config import build

    raw = {"stage": "grpo", "model": {"name_or_path": "x"}, "method": {"name": "lora"}, "data": {"train": "t.jsonl"},
           "align": {"reward_funcs": ["m:f"], **align}}  # fmt: skip
    with pytest.raises(ConfigError, match=f"^{where}") as e:
        build(raw)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("S, mu, loss_type, ga, bias", [(2, 2, "grpo", 1, True), (1, 2, "dapo", 2, False)])
def test_kl_and_weights_at_beta_are_trls(policy, tmp_path, monkeypatch, S, mu, loss_type, ga, bias):  # noqa: F811
    """align.beta 0.1 (TRL's beta; use_bias_correction_kl its default, and off): the step's kl is the mean of TRL's
    per-micro-batch kl logs (at steps_per_generation 1 over TRL's shuffled micro-batches: the in-order chunks gave
    2.9146 where TRL's is 2.9923), each update's loss (the KL term in it) and the weights after the S x mu updates
    equal TRL's. TRL's reference is the policy's base with the adapter off, as deltatune's (trl_trainer's frozen copy
    of the policy, its LoRA zeroed)."""
    import test_grpo_probe15 as p15
    import trl
    import trl.trainer.grpo_trainer as gt

    from deltatune.train import grpo_loss
    from deltatune.train.config_align import AlignArgs

    beta, real_config, real_init = 0.1, trl.GRPOConfig, gt.GRPOTrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        with torch.no_grad():  # (the reference: the base, as the loop's adapter-off pass)
            for name, p in self.ref_model.named_parameters():
                p.zero_() if "lora_B" in name else None

    monkeypatch.setattr(gt.GRPOTrainer, "__init__", init)
    monkeypatch.setattr(trl, "GRPOConfig", lambda *a, **kw: real_config(*a, **{**kw, "beta": beta}))
    monkeypatch.setattr(p15, "AlignArgs", lambda **kw: AlignArgs(**{**kw, "beta": beta}))
    monkeypatch.setattr(grpo_loss, "micro_seed", lambda *_: p15.SHUFFLE_SEED)  # (TRL's shuffle, S 1)
    seen = _trl_logged(monkeypatch, ("kl",))
    model = copy.deepcopy(policy[0])
    with torch.no_grad():  # (an adapter nearer the base: kl ~1, where float noise is not blown up by kl ~850)
        for name, p in model.named_parameters():
            p.mul_(0.1) if "lora_B" in name else None
    ours_model, trl_model = copy.deepcopy(model), copy.deepcopy(model)
    trl_steps, _ = _trl_run(trl_model, tmp_path, monkeypatch, S, mu, loss_type, {"use_bias_correction_kl": bias}, ga)
    stats, steps, _ = _ours(ours_model, S, mu, loss_type, {"bias_correction_kl": bias}, monkeypatch, 8 // S // ga)
    assert len(seen) == len(steps) == S * mu * ga
    want = sum(v for (v,) in seen) / len(seen)
    assert want > 0.05 and stats["kl"] == pytest.approx(want, rel=1e-5)
    for u in range(S * mu):  # (each update's: its micro-batches' losses add up, in whatever order they train)
        got = sum(loss for loss, _ in steps[u * ga : (u + 1) * ga])
        assert got == pytest.approx(sum(loss for *_, loss in trl_steps[u * ga : (u + 1) * ga]), rel=1e-5, abs=2e-5)
    theirs = dict(trl_model.named_parameters())
    diffs = torch.cat([(p - theirs[n]).abs().flatten() for n, p in ours_model.named_parameters() if p.requires_grad])
    moved = max((p - q).abs().max().item() for p, q in zip(ours_model.parameters(), model.parameters()))
    assert moved > 1e-3 and diffs.max() < 1e-6  # (seen: 3.1e-7)


@pytest.mark.parametrize("mark", [{"greenlist_ratio": 0.5}, {"ngram_len": 5, "keys": [1, 2, 3]}, "object"])
def test_a_watermarking_config_as_transformers_takes_it_builds(mark):
    """generate takes watermarking_config as a mapping (WatermarkingConfig's settings, SynthID's with ngram_len) or a
    transformers WatermarkingConfig: each builds; a bad setting in the mapping is one line naming
    align.generation_kwargs (validate's ValueError)."""
    from transformers import WatermarkingConfig

    from deltatune.config import ConfigError
    from deltatune.train.config import build

    mark = WatermarkingConfig(greenlist_ratio=0.5) if mark == "object" else mark
    raw = {"stage": "grpo", "model": {"name_or_path": "x"}, "method": {"name": "lora"}, "data": {"train": "t.jsonl"},
           "align": {"reward_funcs": ["m:f"], "generation_kwargs": {"watermarking_config": mark}}}  # fmt: skip
    assert build(raw).align.generation_kwargs["watermarking_config"] is mark
    raw["align"]["generation_kwargs"]["watermarking_config"] = {"greenlist_ratio": 2.0}
    with pytest.raises(
        ConfigError, match="^align.generation_kwargs watermarking_config: transformers' generate refuses"
    ) as e:
        build(raw)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("n, seed", [(7, 42), (5, 0)])
def test_each_step_trains_the_prompts_of_trls_repeat_sampler(policy, tmp_path, monkeypatch, n, seed):  # noqa: F811
    """The prompts of each step, two passes of n prompts 2 a step, are TRL's RepeatSampler's (same seed): it drops a
    pass's last partial batch. The loop carried the prompts left over into the next step, so from the second pass on
    it trained others (7 prompts, seed 42: TRL [4, 0], [5, 3], [2, 4], [0, 1] after [1, 6], [3, 5]; the loop's
    [4, 0], [2, 5], [3, 2], [4, 0])."""
    from trl.trainer.utils import RepeatSampler

    from deltatune.train import grpo

    sampler = RepeatSampler(list(range(n)), 1, batch_size=2, seed=seed)
    idx = list(sampler) + list(sampler)  # (two passes, as TRL's dataloader iterates it each epoch)
    want = [idx[k : k + 2] for k in range(0, len(idx), 2)]
    seen = []
    monkeypatch.setattr(grpo, "plot_panels", lambda *a: None)
    monkeypatch.setattr(
        grpo.GRPOLoop, "step", lambda self, b: seen.append([int(p.prompt[1:]) for p in b]) or {"loss": 0, "reward": 0}
    )
    _run(policy[1], tmp_path / "run", n, {"epochs": 2, "seed": seed})
    assert len(want) == 2 * (n // 2) and seen == want


@pytest.mark.parametrize("mark, why", [
    ({"foo": 1}, "got an unexpected keyword argument 'foo'"),
    ({"greenlist_ratio": "x"}, "'<=' not supported"),
    ({"ngram_len": 5}, "missing 1 required positional argument: 'keys'"),
])  # fmt: skip
def test_a_watermarking_mapping_transformers_cannot_build_is_named(mark, why):
    """A watermarking_config mapping GenerationConfig cannot build (WatermarkingConfig.from_dict's TypeError, or
    validate's on a value of the wrong type; SynthID's without its keys) is one line naming align.generation_kwargs
    watermarking_config, with transformers' own words; it was the generic align.generation_kwargs line."""
    from transformers import GenerationConfig

    from deltatune.config import ConfigError
    from deltatune.train.config import build

    with pytest.raises(TypeError, match=why):  # (transformers: its constructor, or the first rollout's validate)
        GenerationConfig(watermarking_config=mark).validate()
    raw = {"stage": "grpo", "model": {"name_or_path": "x"}, "method": {"name": "lora"}, "data": {"train": "t.jsonl"},
           "align": {"reward_funcs": ["m:f"], "generation_kwargs": {"watermarking_config": mark}}}  # fmt: skip
    with pytest.raises(ConfigError) as e:
        build(raw)
    assert str(e.value).startswith("align.generation_kwargs watermarking_config: transformers' generate refuses")
    assert why in str(e.value) and len(str(e.value).splitlines()) == 1


def test_the_loss_computes_no_per_forward_clip_extremes_the_loop_does_not_read():
    """Each forward's stats are the sums the loop reads (clipped, clip_units, clipped_low, clipped_high, tokens) and
    each completion's rows, from which MicroMeans takes TRL's clip_ratio/low_min and high_max over TRL's micro-batches
    (tests/test_grpo_probe18.py by hand, against TRL). The loss also computed each chunk's clipped_low_rows /
    clipped_high_rows / clipped_low_min / clipped_high_max, read by nothing, whose NaN-dropping boolean indexing
    synchronised a GPU twice per forward chunk; clip_extremes, their last reader, was called nowhere."""
    from deltatune.train import grpo_loss as gl

    logp = torch.tensor([[0.5, 0.0, 0.0], [-1.0, -1.0, 0.0]])
    _, st = gl.grpo_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert sorted(st) == ["clip_units", "clipped", "clipped_high", "clipped_low", "rows", "tokens"]
    assert [st[k].item() for k in ("clipped", "clipped_low", "clipped_high", "clip_units")] == [3.0, 2.0, 1.0, 5.0]
    assert sorted(st["rows"]) == ["clip_units", "clipped", "clipped_high", "clipped_low"]
    assert not hasattr(gl, "clip_extremes")


def test_a_resume_reads_the_checkpoints_state_once(policy, tmp_path, monkeypatch):  # noqa: F811
    """--resume read grpo_state.pt (the optimizer's state, the log) twice: once for its epoch_count, once to load it.
    Now once, and the resumed run is the same as before: the uninterrupted run's prompts and log from step 2 on."""
    from deltatune.train import grpo
    from deltatune.train.grpo_checkpoint import STATE_FILE

    monkeypatch.setattr(grpo, "plot_panels", lambda *a: None)
    train = {"max_steps": 3, "save_steps": 1, "save_total_limit": 9}
    whole = _run(policy[1], tmp_path / "run", 5, train)
    real_load, reads = torch.load, []
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: reads.append(str(f)) or real_load(f, *a, **kw))
    again = _run(policy[1], tmp_path / "run", 5, train, checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert [r for r in reads if r.endswith(STATE_FILE)] == [str(tmp_path / "run" / "checkpoint-1" / STATE_FILE)]
    assert len(again) == len(whole) == 3
    for ours, want in zip(again[1:], whole[1:]):  # (the steps the resume trained; step_time_s, wall_time: clocks)
        drop = ("step_time_s", "wall_time")
        assert {k: v for k, v in ours.items() if k not in drop} == pytest.approx(
            {k: v for k, v in want.items() if k not in drop}, rel=1e-5, abs=1e-6
        )


def test_a_run_begun_counting_a_partial_batch_still_carries_the_prompts_left_over(policy, tmp_path, monkeypatch):  # noqa: F811
    """A checkpoint without the epoch_count marker resumes as its run ran: the prompt left over from a pass (7 prompts
    2 a step) starts the next step, with the first of the next pass's permutation; a new run drops it."""
    from deltatune.train import grpo
    from deltatune.train.grpo_checkpoint import STATE_FILE

    seen = []
    monkeypatch.setattr(grpo, "plot_panels", lambda *a: None)
    monkeypatch.setattr(
        grpo.GRPOLoop, "step", lambda self, b: seen.append([int(p.prompt[1:]) for p in b]) or {"loss": 0, "reward": 0}
    )
    out, train = tmp_path / "run", {"epochs": 2, "save_steps": 1, "save_total_limit": 9, "seed": 0}
    _run(policy[1], out, 7, train)
    g = torch.Generator().manual_seed(0)
    first, second, third = (torch.randperm(7, generator=g).tolist() for _ in range(3))
    assert seen == [first[k : k + 2] for k in (0, 2, 4)] + [second[k : k + 2] for k in (0, 2, 4)]
    state = torch.load(out / "checkpoint-3" / STATE_FILE, weights_only=True)
    del state["epoch_count"]  # (as a checkpoint written before the marker)
    torch.save(state, out / "checkpoint-3" / STATE_FILE)
    seen.clear()
    _run(policy[1], out, 7, train, checkpoint=str(out / "checkpoint-3"))
    # (4 steps a pass now: steps 4 to 8)
    assert seen == [[first[6], second[0]], second[1:3], second[3:5], second[5:7], third[0:2]]
