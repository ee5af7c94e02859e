"""PPO probed against TRL's PPOTrainer (trl/experimental/ppo, the last TRL to ship it; 1.16 has none): what its
optimizer decays, and what a checkpoint of the optimizer before that holds; where the score lands."""

from __future__ import annotations

import pytest
import torch
from test_ppo import base_dir, policy, yes_fraction  # noqa: F401  (base_dir: the module fixture)
from tiny import word_tokenizer
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from deltatune import BottleneckConfig, get_delta_model
from deltatune.train.config import AlignArgs
from deltatune.train.ppo import PPOLoop


def test_weight_decay_spares_biases_and_norms_as_the_trainers_optimizer(base_dir, tmp_path):  # noqa: F811
    """TRL's PPOTrainer builds AdamW with the HF Trainer's create_optimizer: train.weight_decay on every trainable
    parameter but the biases and norm weights (0 on those). PPOLoop decayed all of them: a bottleneck adapter's
    biases and layer norm, and the value head's bias, shrank by lr * wd each update where the Trainer's do not."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_delta_model(base, BottleneckConfig(target_modules=["mlp"], bottleneck_size=4, ln_after=True))
    loop = PPOLoop(model, word_tokenizer(), yes_fraction, AlignArgs(), lr=1e-3, weight_decay=0.1)
    ours = {id(p): g["weight_decay"] for g in loop.optimizer.param_groups for p in g["params"]}
    args = TrainingArguments(str(tmp_path), weight_decay=0.1, report_to=[], use_cpu=True)
    hf = Trainer(model=model, args=args).create_optimizer()
    want = {id(p): g["weight_decay"] for g in hf.param_groups for p in g["params"]}
    want[id(loop.value_head.weight)], want[id(loop.value_head.bias)] = 0.1, 0.0
    names = {id(p): n for n, p in model.named_parameters()} | {id(loop.value_head.bias): "value_head.bias"}
    assert {names.get(k, k): v for k, v in ours.items()} == {names.get(k, k): v for k, v in want.items()}
    spared = sorted(names[k] for k, v in want.items() if v == 0.0)
    assert "value_head.bias" in spared and any("bias" in n for n in spared[:-1]), spared  # the guard: both kinds
    assert any("norm" in n or "ln" in n for n in spared), spared


def test_a_checkpoint_of_one_adamw_group_is_refused_in_one_line(base_dir, tmp_path):  # noqa: F811
    """A checkpoint written while PPO's AdamW had one group (every parameter decayed) does not fit the two groups:
    torch's load_state_dict raised a ValueError from deep inside it; now one line naming the checkpoint."""
    from deltatune.config import ConfigError
    from deltatune.train import ppo_checkpoint

    loop = PPOLoop(policy(base_dir), word_tokenizer(), yes_fraction, AlignArgs(max_new_tokens=2), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    folder = ppo_checkpoint.save(str(tmp_path), 1, loop, g, [], [], 2)
    assert ppo_checkpoint.load(folder, loop, g)[0] == 1  # the guard: this run's own checkpoint loads
    old = torch.load(f"{folder}/optimizer.pt", weights_only=True)
    first = old["param_groups"][0]
    old["param_groups"] = [{**first, "params": [i for group in old["param_groups"] for i in group["params"]]}]
    torch.save(old, f"{folder}/optimizer.pt")
    with pytest.raises(
        ConfigError, match=r"checkpoint-1: optimizer.pt holds 1 parameter group\(s\), this run's AdamW 2"
    ):
        ppo_checkpoint.load(folder, loop, g)


def test_the_score_lands_on_the_eos_token_and_nothing_after_it_counts(base_dir, monkeypatch):  # noqa: F811
    """Response [w5, EOS, pad, pad] scored 2 and a truncated [w6 w7 w8 w9] scored -1, KL coefficient 0.5:
    r_t = -0.5 (log pi - log ref) on response tokens, 0 after EOS, the score added on the EOS token (on the last
    token when no EOS). TRL's PPOTrainer adds it one past EOS, on the first pad (its open issue #3750; the fix
    proposed there is this placement), and bootstraps V there: with V = 0, gamma 1, lambda 0.95 its EOS-token
    advantage is 0.95 * score where the textbook's, and ours, is the score."""
    import deltatune.train.ppo as ppo

    loop = PPOLoop(policy(base_dir), word_tokenizer(), yes_fraction, AlignArgs(init_kl_coef=0.5, ppo_epochs=1))
    prompt, response = torch.tensor([[5, 6], [7, 8]]), torch.tensor([[9, 3, 0, 0], [10, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    r = ppo.Rollout(torch.cat([prompt, response], 1), torch.cat([torch.ones_like(prompt), mask], 1), mask, 2,
                    None, None, None, torch.tensor([2.0, -1.0]), [], [])  # fmt: skip
    logp, values, _ = loop._forward(r)
    r.logprobs, r.values = logp.detach() * mask, values.detach() * mask
    r.ref_logprobs = loop.reference_logprobs(r) * mask
    seen, gae = {}, ppo.gae
    monkeypatch.setattr(loop, "rollout", lambda prompts: r)
    monkeypatch.setattr(ppo, "gae", lambda rewards, *a: gae(seen.setdefault("rewards", rewards.clone()), *a))
    loop.step([[5, 6], [7, 8]])
    want = -0.5 * (r.logprobs - r.ref_logprobs)
    want[0, 1] += 2.0
    want[1, 3] -= 1.0
    torch.testing.assert_close(seen["rewards"], want)
    assert (seen["rewards"][0, 2:] == 0).all()
    # V = 0: ours, A at EOS = its reward; TRL's (score one past EOS, nextvalues unmasked): -0.5 kl + 0.95 * 2.
    zeros, kl_eos = torch.zeros(2, 4), want[0, 1] - 2.0
    adv, _ = ppo.gae(want, zeros, mask.float(), 1.0, 0.95)
    torch.testing.assert_close(adv[0, 1], want[0, 1])
    trl_rewards, trl_last = want.clone(), torch.zeros(2)
    trl_rewards[0, 1], trl_rewards[0, 2] = kl_eos, 2.0
    for t in reversed(range(4)):  # TRL's loop (trl/experimental/ppo/ppo_trainer.py, "compute advantages")
        trl_last = trl_rewards[:, t] + (zeros[:, t + 1] if t < 3 else 0.0) - zeros[:, t] + 0.95 * trl_last
        if t == 1:
            torch.testing.assert_close(trl_last[0], kl_eos + 0.95 * 2.0)


def test_a_token_adapters_virtual_tokens_count_in_the_context_check(tmp_path, capsys):
    """GPT-2 with 48 positions, prompt tuning with 20 virtual tokens, prompts of at most 16 tokens and 28 new ones:
    16 + 28 = 44 passed the check, prompt and virtual tokens fit (36), then sampling ran past position 48: an
    IndexError inside torch's embedding. Now refused before the model loads, naming the key and the virtual tokens."""
    import json

    from tiny import save_tiny

    from deltatune.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abcd"))
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(json.dumps({
        "stage": "ppo", "model": {"name_or_path": save_tiny(tmp_path / "gpt2", "gpt2", "causal_lm", n_positions=48)},
        "method": {"name": "prompt_tuning", "num_virtual_tokens": 20},
        "data": {"train": str(prompts), "max_length": 16}, "train": {"max_steps": 1, "batch_size": 2},
        "align": {"reward_model": "test_ppo:yes_fraction", "max_new_tokens": 28, "mini_batch_size": 2},
        "output": {"dir": str(tmp_path / "run")},
    }))  # fmt: skip
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "align.max_new_tokens=28" in err and "the adapter's 20 virtual tokens" in err and "context of 48" in err
    assert not (tmp_path / "run").exists()
