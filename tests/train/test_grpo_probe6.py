"""GRPO against TRL 1.16's GRPOTrainer, round 6: what a reward function is given besides the columns
(completion_ids, trainer_state, log_metric, log_extra), as TRL's ``_calculate_rewards`` gives it; completions end at
any EOS id of the generation config, as TRL's ``eos_token_ids``."""

from __future__ import annotations

import json

import pytest
import torch
from test_grpo import ITEMS, base_dir, policy  # noqa: F401  (base_dir: the module's tiny policy fixture)
from tiny import word_tokenizer

from deltatune.train import build
from deltatune.train.config import AlignArgs
from deltatune.train.grpo import GRPOLoop, train_grpo
from deltatune.train.grpo_rewards import Reward


def trl_completion_ids(completion: torch.Tensor, eos_token_ids: list[int]) -> list[list[int]]:
    """TRL's completion_ids_list from generate's completions (GRPOTrainer._generate_single_turn, transformers path):
    the tokens up to and including the first of any EOS id."""
    is_eos = torch.isin(completion, torch.tensor(eos_token_ids))
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    mask = torch.arange(is_eos.size(1)).expand(is_eos.size(0), -1) <= eos_idx.unsqueeze(1)
    return [c[m].tolist() for c, m in zip(completion, mask)]


def test_rewards_get_completion_ids_and_log_metric_as_trl_gives_them(base_dir):  # noqa: F811
    """A TRL reward function that reads ``completion_ids`` or calls ``log_metric`` raised TypeError (a missing
    argument) and stopped the run: deltatune gave the columns only."""
    seen = []

    def by_ids(prompts, completions, completion_ids, log_metric, log_extra, **kwargs):
        seen.append(completion_ids)
        log_metric("probe/mean_ids", sum(map(len, completion_ids)) / len(completion_ids))
        log_metric("probe/mean_ids", torch.tensor(0.0))  # two values in one step: TRL logs their mean (a tensor too)
        log_extra("probe_column", [0] * len(completions))
        return [float(len(ids)) for ids in completion_ids]

    tok = word_tokenizer()
    loop = GRPOLoop(policy(base_dir), tok, [Reward("by_ids", by_ids)], AlignArgs(num_generations=6, max_new_tokens=16),
                    lr=1e-2, seed=0)  # fmt: skip
    samples = []
    sample = loop.sample
    loop.sample = lambda items, num: samples.append(sample(items, num)) or samples[-1]
    stats = loop.step(ITEMS[:3])
    s = samples[0]
    assert s.truncated.any() and not s.truncated.all()  # the guard: some completions end at an EOS, some do not
    want = trl_completion_ids(s.sequences[:, s.prompt_length :], [tok.eos_token_id])
    assert seen == [want]
    assert [tok.decode(ids, skip_special_tokens=True) for ids in want] == s.completions
    mean_length = sum(map(len, want)) / len(want)  # TRL's completions/mean_length, from the same lists
    assert stats["completion_length"] == pytest.approx(mean_length)
    assert stats["probe/mean_ids"] == pytest.approx(mean_length / 2)
    assert json.loads(json.dumps(stats))["probe/mean_ids"] == stats["probe/mean_ids"]  # the log line writes it
    assert stats["reward"] == pytest.approx(mean_length)


def test_rewards_get_trainer_state_counting_optimizer_steps_as_trl(base_dir, tmp_path, monkeypatch):  # noqa: F811
    """TRL gives ``trainer_state`` (a transformers TrainerState) for reward shaping over the run: at the k-th
    generation batch (from 0) its global_step is k x num_iterations optimizer steps, max_steps the run's optimizer
    steps, its epoch the passes over the prompts. Such a reward raised TypeError in deltatune."""
    from transformers import TrainerState

    from deltatune.train import grpo

    monkeypatch.setattr(grpo, "plot_panels", lambda *a: None)  # (the plot is most of the run's time)
    steps = []

    def shaped(prompts, completions, trainer_state, **kwargs):
        assert isinstance(trainer_state, TrainerState)
        steps.append((trainer_state.global_step, trainer_state.max_steps, trainer_state.epoch))
        return [trainer_state.global_step / trainer_state.max_steps] * len(completions)

    cfg = build({"stage": "grpo", "model": {"name_or_path": base_dir}, "method": {"name": "lora"},
                 "data": {"train": "unused.jsonl"}, "output": {"dir": str(tmp_path / "run")},
                 "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "save_steps": 10},
                 "align": {"num_generations": 2, "max_new_tokens": 2, "num_iterations": 2, "beta": 0.0,
                           "reward_funcs": ["unused:shaped"]}})  # fmt: skip
    _, history = train_grpo(policy(base_dir), word_tokenizer(), cfg, ITEMS[:4], None, [Reward("shaped", shaped)])
    assert steps == [(0, 6, 0.0), (2, 6, 0.5), (4, 6, 1.0)]  # 4 prompts: an epoch is 2 steps
    assert [h["reward"] for h in history] == pytest.approx([0.0, 1 / 3, 2 / 3])


def test_a_completion_ends_at_any_eos_id_of_the_generation_config_as_trl(base_dir, monkeypatch):  # noqa: F811
    """TRL's eos_token_ids are the tokenizer's EOS and every id of the model's generation_config.eos_token_id
    (Gemma-it's <end_of_turn>, Phi-3's <|end|>, Llama 3's <|eom_id|> are listed only there); a completion ends at the
    first of them. deltatune ended it at the tokenizer's EOS only: the reward, the loss and the logged length took
    the tokens after an <end_of_turn> (here 4 of 32 completions ran past token 10; mean length 13.47, TRL's 12.66)."""
    from deltatune.train import grpo

    raw = []
    sample = grpo.sample_responses
    monkeypatch.setattr(grpo, "sample_responses", lambda *a: raw.append(sample(*a)) or raw[-1])
    seen = []

    def by_ids(prompts, completions, completion_ids, **kwargs):
        seen.extend(completion_ids)
        return [float(len(ids)) for ids in completion_ids]

    tok, model = word_tokenizer(), policy(base_dir)
    model.get_base_model().generation_config.eos_token_id = [3, 10]  # the tokenizer's EOS and another end
    loop = GRPOLoop(model, tok, [Reward("by_ids", by_ids)], AlignArgs(num_generations=8, max_new_tokens=16),
                    lr=1e-2, seed=0)  # fmt: skip
    stats = loop.step(ITEMS[:4])
    generated = raw[0][3]  # what generate sampled, pad after the tokenizer's EOS
    want = trl_completion_ids(generated, [3, 10])
    assert any(10 in ids[:-1] for ids in trl_completion_ids(generated, [3]))  # the guard: some run past token 10
    assert seen == want
    assert stats["completion_length"] == pytest.approx(sum(map(len, want)) / len(want))  # completions/mean_length
    clipped = [ids[-1] not in (3, 10, tok.pad_token_id) for ids in want]  # TRL's completions/clipped_ratio
    assert stats["truncated_fraction"] == pytest.approx(sum(clipped) / len(clipped))


def test_an_async_reward_function_is_awaited_as_trl_awaits_it():
    """TRL 1.16 awaits a reward function defined with ``async def`` (GRPOTrainer._calculate_rewards); deltatune called
    it and got a coroutine: 'reward lengths returned a coroutine, not a list of 2 numbers'. Its errors still name the
    row."""
    from deltatune.train.grpo_rewards import RewardError, score

    async def lengths(prompts, completions, answer, **kwargs):
        if "boom" in completions:
            raise ValueError("no")
        return [len(c) + a for c, a in zip(completions, answer)]

    table = score([Reward("lengths", lengths)], ["p", "q"], ["p", "q"], ["ab", "abc"], {"answer": [10, 20]},
                  ["d.jsonl:1", "d.jsonl:2"])  # fmt: skip
    assert table.flatten().tolist() == [12.0, 23.0]
    with pytest.raises(RewardError, match=r"reward lengths raised ValueError: no \(row d.jsonl:2, completion 'boom'"):
        score([Reward("lengths", lengths)], ["p", "q"], ["p", "q"], ["ab", "boom"], {"answer": [1, 2]},
              ["d.jsonl:1", "d.jsonl:2"])  # fmt: skip


def test_log_probs_and_entropy_equal_trls_on_a_left_padded_batch(base_dir, tmp_path):  # noqa: F811
    """The loop's log-probs and entropies of sampled completions (prompts of two lengths, so left padding; sampling
    temperature 0.7) equal TRL's _get_per_token_logps_and_entropies on the same batch (TRL passes no position ids:
    rotary positions shifted by the padding give the same scores)."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base_dir), config)  # (TRL: no lm_head adapter)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    tok, zeros = word_tokenizer(), lambda completions, **_: [0.0] * len(completions)
    loop = GRPOLoop(model, tok, [Reward("zeros", zeros)], AlignArgs(num_generations=3, max_new_tokens=8,
                    temperature=0.7), seed=0)  # fmt: skip
    short = type(ITEMS[1])(ITEMS[1].ids[:2], "p", {}, "p.jsonl:2")
    s = loop.sample([ITEMS[0], short], 3)
    logp, entropy = loop._forward(s, slice(0, None))
    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=6, report_to=[], use_cpu=True, bf16=False,
                          temperature=0.7, num_generations=3, max_completion_length=8)  # fmt: skip
    trainer = dt.trl_trainer(trl.GRPOTrainer)(model=model, args=args, processing_class=tok, reward_funcs=zeros,
                                              train_dataset=Dataset.from_list([{"prompt": "hi"}] * 6))  # fmt: skip
    model.eval()
    with torch.no_grad():
        want, want_entropy, _ = trainer._get_per_token_logps_and_entropies(
            model, s.sequences, s.attention_mask, s.sequences.shape[1] - s.prompt_length, compute_entropy=True
        )
    m = s.completion_mask.bool()
    assert s.attention_mask[:, 0].eq(0).any()  # the guard: some rows are left-padded
    torch.testing.assert_close(logp[m], want[m], atol=2e-6, rtol=0)
    torch.testing.assert_close(entropy[m], want_entropy[m], atol=2e-6, rtol=0)


def test_a_tokenizer_without_eos_stops_at_the_generation_configs(base_dir):  # noqa: F811
    """With no EOS on the tokenizer, completions ran to max_new_tokens whatever they sampled: they end at the
    generation config's EOS (TRL's eos_token_ids hold it too)."""
    tok, model = word_tokenizer(), policy(base_dir)
    tok.eos_token = None
    model.get_base_model().generation_config.eos_token_id = 3
    seen = []

    def by_ids(prompts, completions, completion_ids, **kwargs):
        seen.extend(completion_ids)
        return [0.0] * len(completions)

    loop = GRPOLoop(model, tok, [Reward("by_ids", by_ids)], AlignArgs(num_generations=8, max_new_tokens=16),
                    lr=1e-2, seed=0)  # fmt: skip
    stats = loop.step(ITEMS[:4])
    assert all(3 not in ids[:-1] for ids in seen) and any(ids[-1] == 3 for ids in seen)
    assert stats["truncated_fraction"] == sum(ids[-1] != 3 for ids in seen) / len(seen) < 1
