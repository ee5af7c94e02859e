"""PPO probed against TRL's PPOTrainer (trl/experimental/ppo, the last TRL to ship it; 1.16 has none): what its
optimizer decays, and what a checkpoint of the optimizer before that holds."""

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
