"""PPO and GRPO (review of probe 21's PPO commits): the start evaluation a checkpoint keeps is reused only for the
eval set and settings it was taken on, a raising reward is located in its own file, a reward model's positions are
named as what it was built for, and GRPO's checkpoint after the last step (as PPO's and the HF Trainer's
DefaultFlowCallback: a Ctrl-C in the final evaluation keeps every step).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from test_ppo_probe11 import _policy
from test_ppo_probe21 import _DecodeTok, _Interrupt

from deltatune.config import ConfigError
from deltatune.train import build
from deltatune.train.config import AlignArgs
from deltatune.train.ppo import PPOLoop, RewardError, train_ppo

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]]
EVALS_A = [[15, 16], [17, 18, 19]]
EVALS_B = [[20], [21, 22, 23, 24, 25, 26], [27, 28]]  # (another eval file: --resume-changed)


def _ppo_cfg(out, **train):
    return build({
        "stage": "ppo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl", "eval": "e.jsonl"},
        "output": {"dir": str(out)}, "align": {"max_new_tokens": 3, "ppo_epochs": 1, "mini_batch_size": 2},
        "train": {"max_steps": 2, "batch_size": 2, "report_to": ["none"], "save_steps": 1, "save_total_limit": None,
                  "lr": 1e-2, "eval_on_start": True, "eval_batch_size": 2, **train},
    })  # fmt: skip


def test_ppo_a_resume_onto_another_eval_set_evaluates_its_start_on_it(tmp_path):
    """A run on eval set A resumed (--resume-changed) onto eval set B: HEAD reported A's eval_reward_before (0.65,
    kept by checkpoint-1) beside B's eval_reward, a start and an end of different sets; now B's own start (0.667), as
    a run begun on B reports it (and as before 9e9b484, which sampled the start again on every resume)."""
    on_a, _ = train_ppo(
        _policy(), _DecodeTok(), _ppo_cfg(tmp_path / "a"), PROMPTS, EVALS_A, _Interrupt(None), facts={}
    )
    on_b, _ = train_ppo(
        _policy(), _DecodeTok(), _ppo_cfg(tmp_path / "b"), PROMPTS, EVALS_B, _Interrupt(None), facts={}
    )
    assert on_a["eval_reward_before"] != on_b["eval_reward_before"]  # (the sets' starts differ: the test tells)
    ckpt = str(tmp_path / "a" / "checkpoint-1")
    got, _ = train_ppo(_policy(), _DecodeTok(), _ppo_cfg(tmp_path / "a"), PROMPTS, EVALS_B, _Interrupt(None), ckpt,
                       facts={})  # fmt: skip
    assert got["eval_reward_before"] == on_b["eval_reward_before"]


def test_ppo_a_checkpoint_without_the_start_key_evaluates_the_start_again(tmp_path):
    """A checkpoint written by 9e9b484..fix21 keeps eval_reward_before but not what it was taken on: HEAD reused it
    (2 reward calls: step 2, the end); now the start is sampled again (3 calls), to the unbroken run's number."""
    cfg = _ppo_cfg(tmp_path)
    want, _ = train_ppo(_policy(), _DecodeTok(), cfg, PROMPTS, EVALS_A, _Interrupt(None), facts={})
    state_file = tmp_path / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert "eval_reward_before" in state["metrics"]
    state.pop("start_key", None)
    state_file.write_text(json.dumps(state))
    reward = _Interrupt(None)
    got, _ = train_ppo(
        _policy(), _DecodeTok(), cfg, PROMPTS, EVALS_A, reward, str(tmp_path / "checkpoint-1"), facts={}
    )
    assert reward.calls == 3  # (the start again, step 2, the end)
    assert got["eval_reward_before"] == want["eval_reward_before"] and got["eval_reward"] == want["eval_reward"]


def test_the_start_key_changes_with_what_the_start_evaluation_depends_on_only():
    """start_key (PPO's and GRPO's): another eval set, eval batch, seed, reward, model or sampling setting is another
    key; a setting of the training only (lr, cliprange, save_steps) is the same key; no start evaluation is None."""
    from deltatune.train.ppo_checkpoint import kept_start, start_key

    def key(evals=EVALS_A, align=None, **train):
        cfg = build({"stage": "ppo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl", "eval": "e.jsonl"},
                     "align": {"max_new_tokens": 3, **(align or {})},
                     "train": {"batch_size": 2, "eval_on_start": True, **train}})  # fmt: skip
        return start_key(cfg, evals)

    base = key()
    assert key(lr=0.5) == key(save_steps=3) == key(align={"cliprange": 0.1}) == base
    others = [key(EVALS_B), key([[15, 16], [17, 18]]), key(eval_batch_size=1), key(seed=7),
              key(align={"reward_model": "r:f"}), key(align={"max_new_tokens": 4}), key(align={"temperature": 0.5}),
              key(align={"stop_token_id": 3}), key(align={"top_p": 0.9}), key(precision="fp32")]  # fmt: skip
    assert base not in others and len(set(others)) == len(others)
    assert key(eval_on_start=False) is None and key([]) is None
    saved = {"eval_reward_before": 0.5, "train_runtime_s": 3.0}
    assert kept_start(saved, base, base) == saved
    assert kept_start(saved, None, base) == kept_start(saved, key(EVALS_B), base) == {"train_runtime_s": 3.0}


def _parse(prompts, responses):
    return [json.loads(r)["score"] for r in responses]  # (JSONDecodeError from json's decoder.py)


def test_ppo_a_raising_reward_names_the_line_of_its_own_file_not_the_library_it_called():
    """A reward that calls json.loads on a response: HEAD named the innermost frame outside deltatune, json's own
    decoder.py; now the line in the reward's file (as GRPO's rewards, whose _where PPO now shares), from any cwd."""
    align = AlignArgs(max_new_tokens=2, mini_batch_size=4, reward_model="rewards21:parse")
    loop = PPOLoop(_policy(), _DecodeTok(), _parse, align)
    with pytest.raises(RewardError) as info:
        loop.rollout([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]])
    where = re.fullmatch(r"reward rewards21:parse raised JSONDecodeError: .* \(the response '.*' to '5 6 7', at "
                         r"(.+):(\d+)\)", str(info.value))  # fmt: skip
    assert where, str(info.value)
    assert os.path.samefile(where[1], __file__) and int(where[2]) == _parse.__code__.co_firstlineno + 1


def test_a_rope_reward_model_is_named_by_the_positions_it_was_built_for_as_the_policy_is(tmp_path):
    """A llama (RoPE) reward model of 16 positions scores past them without an error, but is held to them as the
    policy is (checks.check_rollout_context refuses the same lengths for a policy of that config); HEAD's message
    said it "scores at most 16 positions", which a RoPE model does not; now what it was built for."""
    from tiny import save_tiny

    from deltatune.train.checks import check_rollout_context
    from deltatune.train.ppo_checks import check_reward_context

    folder = save_tiny(tmp_path / "rm", max_position_embeddings=16)
    with pytest.raises(ConfigError, match=r"^align.reward_model '.*rm' was built for at most 16 positions, fewer "
                       r"than the longest prompt \(16 tokens\) plus align.max_new_tokens=20 \(36\)"):  # fmt: skip
        check_reward_context(folder, 16, 20)
    cfg = build({"stage": "ppo", "model": {"name_or_path": folder}, "data": {"train": "t.jsonl", "max_length": 16},
                 "align": {"max_new_tokens": 20}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"more than the model's context of 16"):
        check_rollout_context(cfg, 16, folder)
    check_reward_context(folder, 16, 0)  # (within: nothing)


# -- GRPO ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


class _GRPOReward:
    """Completion plus prompt lengths; KeyboardInterrupt on the ``stop_at``-th call over eval prompts (then never again)."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.train_calls, self.eval_calls = stop_at, 0, 0

    def __call__(self, prompts, completions, **_):
        if not prompts[0].startswith("e"):
            self.train_calls += 1
        else:
            self.eval_calls += 1
            if self.eval_calls == self.stop_at:
                raise KeyboardInterrupt
        return [float(len(c) + len(p)) for p, c in zip(prompts, completions)]


def _grpo(base, out, evals, reward, checkpoint=None, **train):
    """train_grpo: 4 prompts 2 a step, 3 steps, save_steps 2, the start evaluated; (metrics, history)."""
    from tiny import tokenizer
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.train.grpo import PromptItem, train_grpo
    from deltatune.train.grpo_rewards import Reward

    tok = tokenizer()
    items = [PromptItem(tok(f"p{i}")["input_ids"], f"p{i}", {}, f"t.jsonl:{i + 1}") for i in range(4)]
    eval_items = [PromptItem(tok(t)["input_ids"], t, {}, f"e.jsonl:{i + 1}") for i, t in enumerate(evals)]
    cfg = build({"stage": "grpo", "model": {"name_or_path": base}, "method": {"name": "lora"},
                 "data": {"train": "t.jsonl", "eval": "e.jsonl"}, "output": {"dir": str(out)},
                 "train": {"batch_size": 2, "lr": 1e-2, "max_steps": 3, "save_steps": 2, "save_total_limit": None,
                           "eval_on_start": True, "eval_batch_size": 2, "report_to": ["none"], **train},
                 "align": {"num_generations": 2, "max_new_tokens": 3, "beta": 0.0, "reward_funcs": ["unused:f"]}})  # fmt: skip
    torch.manual_seed(0)
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(r=2, task_type="CAUSAL_LM"))
    return train_grpo(model, tok, cfg, items, eval_items, [Reward("f", reward)], checkpoint=checkpoint, facts={})


def _same(a, b):
    clocks = ("train_runtime_s", "step_time_s", "wall_time")
    return {k: v for k, v in a.items() if k not in clocks} == {k: v for k, v in b.items() if k not in clocks}


def test_grpo_checkpoints_the_last_step_so_a_stop_in_the_final_evaluation_keeps_the_run(base, tmp_path, monkeypatch):
    """3 steps, save_steps 2: HEAD saved checkpoint-2 only, so a Ctrl-C in the final evaluation lost step 3 (--resume
    trained it again); now checkpoint-3 too (as PPO's and the Trainer's DefaultFlowCallback), and a resume from it
    trains nothing and reports the unbroken run's metrics and log."""
    from deltatune.train import grpo

    monkeypatch.setattr(grpo, "plot_panels", lambda *a: None)
    evals = ["e one", "e two"]
    want, whole = _grpo(base, tmp_path / "unbroken", evals, _GRPOReward())
    with pytest.raises(KeyboardInterrupt):
        _grpo(base, tmp_path / "stopped", evals, _GRPOReward(stop_at=2))  # (1: the start, 2: the end)
    assert sorted(n for n in os.listdir(tmp_path / "stopped") if n.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-3"]  # fmt: skip
    reward = _GRPOReward()
    got, history = _grpo(base, tmp_path / "stopped", evals, reward, str(tmp_path / "stopped" / "checkpoint-3"))
    assert reward.train_calls == 0 and reward.eval_calls == 1  # (the end only: the start kept under its key)
    assert _same(got, want) and len(history) == len(whole) == 3
    assert all(_same(a, b) for a, b in zip(history, whole))


def test_grpo_a_resume_onto_another_eval_set_or_from_an_unkeyed_checkpoint_evaluates_its_start(base, tmp_path):
    """GRPO kept eval_reward_before in every checkpoint and HEAD reported it on any resume: onto another eval set
    its start beside the new set's end. Now the start is evaluated again (by the start's policy, before the
    checkpoint loads) where the set or settings differ, or the checkpoint has no key; equal to a run begun so."""
    from deltatune.train.grpo_checkpoint import STATE_FILE

    on_a, _ = _grpo(base, tmp_path / "a", ["e one", "e two"], _GRPOReward())
    on_b, _ = _grpo(base, tmp_path / "b", ["e a longer prompt", "e"], _GRPOReward())
    assert on_a["eval_reward_before"] != on_b["eval_reward_before"]
    ckpt = str(tmp_path / "a" / "checkpoint-2")
    got, _ = _grpo(base, tmp_path / "a", ["e a longer prompt", "e"], _GRPOReward(), ckpt)
    assert got["eval_reward_before"] == on_b["eval_reward_before"]
    state = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=True)
    state.pop("start_key", None)  # (as one written before the key)
    torch.save(state, os.path.join(ckpt, STATE_FILE))
    reward = _GRPOReward()
    got, _ = _grpo(base, tmp_path / "a", ["e one", "e two"], reward, ckpt)
    assert reward.eval_calls == 2 and got["eval_reward_before"] == on_a["eval_reward_before"]
