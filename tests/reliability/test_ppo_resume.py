"""PPO writes checkpoints and resumes like the other stages: a run killed (SIGKILL) right after its step-2
checkpoint, resumed with --resume, ends with the adapter, value head and losses of the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from reliability_helpers import cli
from safetensors.torch import load_file
from tiny import save_tiny

from deltatune.train import load_recipe, train

REWARD = '''
def score(prompts, responses):
    """Reward the share of letters 'e' in the response (any deterministic function of the text will do)."""
    return [r.count("e") / max(len(r), 1) for r in responses]
'''


@pytest.fixture
def ppo_recipe(tmp_path, monkeypatch):
    (tmp_path / "ppo_reward_for_tests.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abcdef"))
    model = save_tiny(tmp_path / "llama", "llama", "causal_lm", max_position_embeddings=48)
    recipe = {
        "stage": "ppo",
        "model": {"name_or_path": model},
        "method": {"name": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(prompts), "max_length": 16},
        "train": {"max_steps": 4, "save_steps": 2, "batch_size": 2, "lr": 1e-2, "seed": 5, "report_to": ["none"]},
        "align": {"reward_model": "ppo_reward_for_tests:score", "max_new_tokens": 3, "mini_batch_size": 2,
                  "ppo_epochs": 1},
        "output": {"dir": str(tmp_path / "run")},
    }  # fmt: skip
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path), tmp_path


def test_ppo_resume_after_kill_equals_uninterrupted(ppo_recipe):
    recipe, tmp = ppo_recipe
    whole_dir = tmp / "whole"
    whole = train(load_recipe(recipe, [f"output.dir={whole_dir}"]))
    assert "checkpoint-2" in os.listdir(whole_dir)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DELTATUNE_TEST_KILL_AFTER_STEP": "2",
           "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    killed = subprocess.run(
        [sys.executable, "-m", "deltatune.cli", "train", recipe], capture_output=True, text=True, env=env, timeout=600
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp / "run"
    left = sorted(os.listdir(run))
    assert "checkpoint-2" in left and "adapter_model.safetensors" not in left and "metrics.json" not in left
    assert not [n for n in left if n.startswith(".")]  # no staging folder behind

    code, out, err = cli("train", recipe, "--resume")
    assert code == 0, err
    resumed = json.loads(out.strip().splitlines()[-1])
    assert resumed["train_steps"] == 4
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-6)
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(whole_dir / name), load_file(run / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=lambda m, k=k, n=name: f"{n} {k}: {m}")
    adapter = load_file(run / "adapter_model.safetensors")
    assert any(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # the adapter did train
