"""PPO (probe 21): a transformers reward model with fewer positions than a prompt and its response, the
evaluation's forwards, and a stop after the last step (the Ctrl-C window of the final evaluation).

TRL's PPOTrainer (``trl/experimental/ppo/ppo_trainer.py``, huggingface/trl 0062ee10a9bc; TRL 1.16 no longer ships it)
scores ``query_responses`` whole with ``get_reward`` (positions mask.cumsum - mask), so a reward model of fewer
positions fails inside torch's embedding there too; the HF Trainer's DefaultFlowCallback saves a checkpoint after
the last step under save_strategy steps.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from test_ppo_probe11 import _policy, _Tok
from tiny import save_tiny, tokenizer

from deltatune.config import ConfigError
from deltatune.train import build, train
from deltatune.train.config import AlignArgs
from deltatune.train.ppo import PPOLoop, train_ppo


def test_a_reward_model_shorter_than_a_prompt_and_its_response_is_one_line_before_any_model_loads(tmp_path):
    """A GPT-2 sequence classifier of 16 positions as align.reward_model, prompts of 16 tokens and 20 new ones:
    HEAD loaded the policy, sampled, then failed in torch's embedding (IndexError: index out of range in self);
    now one line naming align.reward_model and align.max_new_tokens, and no run folder."""
    from transformers import AutoModelForSequenceClassification

    base = save_tiny(tmp_path / "base", max_position_embeddings=128)
    rm = AutoModelForSequenceClassification.from_pretrained(
        save_tiny(tmp_path / "rmbase", family="gpt2", n_positions=16), num_labels=1
    )
    rm.config.pad_token_id = tokenizer().pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    tokenizer().save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abc"))
    raw = {
        "stage": "ppo", "model": {"name_or_path": base}, "data": {"train": str(prompts), "max_length": 16},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "align": {"reward_model": str(tmp_path / "rm"), "max_new_tokens": 20, "ppo_epochs": 1},
        "output": {"dir": str(tmp_path / "run")},
        "train": {"max_steps": 1, "batch_size": 2, "report_to": ["none"]},
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"^align.reward_model '.*rm' was built for at most 16 positions, fewer "
                       r"than the longest prompt \(16 tokens\) plus align.max_new_tokens=20 \(36\)"):  # fmt: skip
        train(build(raw))
    assert not (tmp_path / "run").exists()


def test_the_evaluation_runs_no_forward_of_policy_values_or_reference():
    """mean_reward (eval_reward, eval_reward_before) samples and scores; HEAD also ran the policy's, the value head's
    and the reference's forwards over every eval batch, read by nothing (2 of them a batch here). The mean is the
    same: the forwards draw no random numbers, so it equals the scores of a full rollout from the same seed."""
    align = AlignArgs(max_new_tokens=4, mini_batch_size=4)
    loop = PPOLoop(_policy(), _Tok(), lambda p, r: [float(len(x)) for x in r], align)
    loop.tokenizer = type("T", (), {"batch_decode": staticmethod(lambda ids, **kw: ["x" * len(i) for i in ids]),
                                    "eos_token_id": 3, "pad_token_id": 0})()  # fmt: skip
    calls = []
    forward = loop._forward
    loop._forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    torch.manual_seed(3)
    got = loop.mean_reward(prompts, 4)
    assert calls == []
    torch.manual_seed(3)
    want = loop.rollout(prompts).scores.mean().item()  # (the full rollout: its forwards)
    assert len(calls) == 2
    assert got == want


def _cfg(out, eval_path=None):
    return build({
        "stage": "ppo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}, "output": {"dir": str(out)},
        "align": {"max_new_tokens": 3, "ppo_epochs": 1, "mini_batch_size": 2},
        "train": {"max_steps": 3, "batch_size": 2, "report_to": ["none"], "save_steps": 2, "save_total_limit": None,
                  "lr": 1e-2, "max_grad_norm": 0.0},
    })  # fmt: skip


class _Interrupt:
    """A reward of the response lengths that raises KeyboardInterrupt on call ``at`` (then never again)."""

    def __init__(self, at: int | None):
        self.at, self.calls = at, 0

    def __call__(self, prompts, responses):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return [len(r) / 10 for r in responses]


class _DecodeTok(_Tok):
    @staticmethod
    def batch_decode(ids, **kw):
        return [" ".join(map(str, i.tolist() if hasattr(i, "tolist") else i)) for i in ids]


def test_a_stop_in_the_final_evaluation_resumes_from_the_last_step(tmp_path):
    """3 steps saving every 2, 2 eval prompts: Ctrl-C in the final evaluation (the reward's 4th call). HEAD wrote no
    checkpoint after the last step (only checkpoint-2): --resume trained step 3 again. Now checkpoint-3 is there (the
    HF Trainer saves after its last step too) and the resumed run ends with the unbroken run's adapter, value head,
    history and eval reward, training nothing (the reward called once, for the evaluation)."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]]
    evals = [[15, 16], [17, 18, 19]]

    def run(out, reward, checkpoint=None):
        torch.manual_seed(0)
        model = _policy()
        metrics, history = train_ppo(model, _DecodeTok(), _cfg(out), prompts, evals, reward, checkpoint, facts={})
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return metrics, history, state

    want, want_history, want_state = run(tmp_path / "unbroken", _Interrupt(None))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", _Interrupt(4))
    assert sorted(os.listdir(tmp_path / "stopped")) == ["checkpoint-2", "checkpoint-3", "log_history.jsonl"]
    reward = _Interrupt(None)
    got, history, state = run(tmp_path / "stopped", reward, str(tmp_path / "stopped" / "checkpoint-3"))
    assert reward.calls == 1
    assert [h["loss"] for h in history] == [h["loss"] for h in want_history]
    assert got["eval_reward"] == want["eval_reward"] and got["train_loss"] == want["train_loss"]
    for name, p in want_state.items():
        assert torch.equal(state[name], p), name
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "unbroken" / "value_head.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "value_head.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_keeps_the_start_evaluation_instead_of_sampling_it_again(tmp_path):
    """train.eval_on_start: the checkpoints keep eval_reward_before (as GRPO's do), so a resume reports the unbroken
    run's number without sampling the eval prompts again; HEAD sampled them again on every resume, with a fresh loop,
    to the same number (the reward called 3 times: the start's evaluation again, step 2, the final evaluation)."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]]
    evals = [[15, 16], [17, 18, 19]]
    cfg = build({
        "stage": "ppo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl", "eval": "e.jsonl"},
        "output": {"dir": str(tmp_path)},
        "align": {"max_new_tokens": 3, "ppo_epochs": 1, "mini_batch_size": 2},
        "train": {"max_steps": 2, "batch_size": 2, "report_to": ["none"], "save_steps": 1, "save_total_limit": None,
                  "lr": 1e-2, "eval_on_start": True, "eval_batch_size": 2},
    })  # fmt: skip
    want, _ = train_ppo(_policy(), _DecodeTok(), cfg, prompts, evals, _Interrupt(None), facts={})
    reward = _Interrupt(None)
    got, _ = train_ppo(_policy(), _DecodeTok(), cfg, prompts, evals, reward, str(tmp_path / "checkpoint-1"), facts={})
    assert reward.calls == 2  # (step 2, then the final evaluation)
    assert got["eval_reward_before"] == want["eval_reward_before"]
    assert got["eval_reward"] == want["eval_reward"] and got["train_loss"] == want["train_loss"]


def _divides(prompts, responses):
    return [1 / (p != "8 9") for p in prompts]  # (ZeroDivisionError on the prompt "8 9")


def test_a_reward_function_that_raises_is_one_line_naming_the_response():
    """A reward function that raises on one response: HEAD let its ZeroDivisionError out of the loop (the user's
    traceback through PPOLoop.rollout); now one line, as GRPO's rewards (grpo_rewards), naming the reward, the
    response it raised on alone and the file:line, the exception chained for --debug."""
    from deltatune.train.ppo import RewardError

    align = AlignArgs(max_new_tokens=2, mini_batch_size=4, reward_model="rewards21:divides")
    loop = PPOLoop(_policy(), _DecodeTok(), _divides, align)
    with pytest.raises(RewardError) as info:
        loop.rollout([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]])
    line = _divides.__code__.co_firstlineno + 1
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("reward rewards21:divides raised ZeroDivisionError: division by zero (the "
                                      "response '")  # fmt: skip
    where = re.search(r"' to '8 9', at (.+):(\d+)\)$", str(info.value))  # (the path: relative to the cwd, if under it)
    assert where and os.path.samefile(where[1], __file__) and int(where[2]) == line, str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
