"""The lead's fixes of session 51 from the agents' reviews: checkpointing a diffusers denoiser (its
enable_gradient_checkpointing, 8673207) runs non-reentrant on every block as diffusers' own, and refuses what it
would silently drop or mis-train."""

from __future__ import annotations

import pytest
import torch
from test_diffusion_probe16 import _unet

import deltatune as dt


def _lora_unet():
    torch.manual_seed(1)
    cfg = dt.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False)
    return dt.get_delta_model(_unet(3).train(), cfg)


@pytest.mark.parametrize(
    ("kwargs", "options", "named"),
    [({"use_reentrant": True}, {}, "use_reentrant=True"), ({"use_reentrant": None}, {}, "use_reentrant=None"), ({}, {"every_n_layers": 2}, "every_n_layers=2"),
     ({}, {"offload": True}, "offload=True")],
)  # fmt: skip
def test_reentrant_or_sparse_checkpointing_of_a_diffusers_denoiser_is_one_line_and_changes_nothing(
    kwargs, options, named
):
    """Reentrant checkpointing of a UNet (no enable_input_require_grads) left 12 of 48 LoRA tensors without a
    gradient, with only torch's warning; every_n_layers / offload were dropped silently."""
    model = _lora_unet()
    with pytest.raises(ValueError, match=rf"^UNet2DConditionModel: diffusers' checkpointing .* got {named}$"):
        model.gradient_checkpointing_enable(kwargs, **options)
    assert not model.base_model.is_gradient_checkpointing


def test_the_trainers_default_options_checkpoint_a_diffusers_denoiser_with_every_lora_gradient():
    from diffusers import DDPMScheduler

    from deltatune.train.t2i_noise import denoising_loss

    g = torch.Generator().manual_seed(4)
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g),
              "encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}  # fmt: skip
    grads = []
    for on in (False, True):
        model = _lora_unet()
        if on:
            model.gradient_checkpointing_enable(None, every_n_layers=1, offload=False)  # (the Trainer's call)
            assert model.base_model.is_gradient_checkpointing
        denoising_loss(
            model, DDPMScheduler(num_train_timesteps=100), inputs, generator=torch.Generator().manual_seed(7)
        ).backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(g is not None for g in grads[1]) and len(grads[1]) == 48
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_an_old_qlora_run_with_nothing_quantised_resumes_and_evaluates_in_full_precision(tmp_path, monkeypatch):
    """A QLoRA recipe on a model whose every layer stays full precision (hidden 32) trained in full precision before
    5861694; its --resume and eval rebuilt the base through the new refusal (17f7715 fixed merge and generate)."""
    import json
    import shutil

    import yaml
    from reliability.reliability_helpers import cli
    from tiny import save_tiny

    from deltatune.train import run as run_mod

    base = save_tiny(tmp_path / "base", "llama")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of a small text"}) + "\n" for i in range(4)))
    recipe = {"stage": "pt", "model": {"name_or_path": base, "quantization": {"bits": 4}},
              "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False},
              "data": {"train": str(data), "eval": str(data), "max_length": 16},
              "train": {"batch_size": 4, "max_steps": 2, "save_steps": 1, "lr": 0.01, "report_to": ["none"]},
              "output": {"dir": str(tmp_path / "run")}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with monkeypatch.context() as m:  # the run as the code before 5861694 trained it
        m.setattr(run_mod, "_quantize", lambda model, q, **_: model)
        code, _, err = cli("train", str(tmp_path / "recipe.yaml"))
    assert code == 0, err[-500:]
    code, out, err = cli("eval", "--adapter", str(tmp_path / "run"), "--data", str(data))
    assert code == 0 and "eval_loss" in out, err[-500:]
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")  # cut after step 1
    (tmp_path / "run" / "metrics.json").unlink()
    code, _, err = cli("train", str(tmp_path / "recipe.yaml"), "--resume")
    assert code == 0, err[-500:]
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    assert "trained_run" not in (tmp_path / "run" / "run.yaml").read_text()  # (RunConfig's ClassVar: never a key)


def test_a_remote_code_reward_model_passes_the_reward_folder_check_as_trl_loads_it(tmp_path):
    """TRL loads a reward folder with AutoModelForSequenceClassification(trust_remote_code=...), which follows the
    config's auto_map: a LlamaRewardModel class there is a reward model (630c9db's check asked only architectures)."""
    import json

    from tiny import save_tiny, tokenizer
    from transformers import AutoModelForSequenceClassification

    from deltatune.train.config_align import AlignArgs
    from deltatune.train.grpo_rewards import check_rewards

    folder = tmp_path / "custom-rm"
    AutoModelForSequenceClassification.from_pretrained(save_tiny(tmp_path / "base"), num_labels=1).save_pretrained(
        folder
    )
    tokenizer().save_pretrained(folder)
    (folder / "modeling_rm.py").write_text("from transformers import LlamaForSequenceClassification\n\n\n"
                                           "class LlamaRewardModel(LlamaForSequenceClassification):\n    pass\n")  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaRewardModel"]
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_rm.LlamaRewardModel"}
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, trust_remote_code=True)
    assert type(model).__name__ == "LlamaRewardModel"  # (TRL's load)
    assert check_rewards(AlignArgs(reward_funcs=[str(folder)], num_generations=2))[0].name == "custom-rm"


def test_a_hand_written_null_steps_per_generation_names_no_cause_it_did_not_have():
    from deltatune.train.config_align import default_changed

    plain = {"align.loss_type": "grpo", "align.top_entropy_quantile": 1.0}
    assert default_changed("align.steps_per_generation", None, 1, "grpo", 8, plain) == ""
    assert "bnpo" in default_changed("align.steps_per_generation", None, 1, "grpo", 8, {"align.loss_type": "bnpo"})


def test_a_quantisation_added_at_resume_or_eval_is_refused_where_nothing_would_be_quantised(tmp_path):
    """Review of f38b7ba: the old-run allowance (a recorded quantisation that quantised nothing) covered a
    quantisation added now, at --resume --resume-changed or as an eval override: a "QLoRA" that ran in full
    precision, silently, and run.yaml recording one that never was."""
    import json
    import shutil

    import yaml
    from reliability.reliability_helpers import cli
    from tiny import save_tiny

    base = save_tiny(tmp_path / "base", "llama")  # hidden 32: every linear layer kept
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of a small text"}) + "\n" for i in range(4)))
    recipe = {"stage": "pt", "model": {"name_or_path": base},
              "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
              "data": {"train": str(data), "max_length": 16},
              "train": {"batch_size": 4, "max_steps": 2, "save_steps": 1, "lr": 0.01, "report_to": ["none"]},
              "output": {"dir": str(tmp_path / "run")}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli("train", str(tmp_path / "recipe.yaml"))[0] == 0
    code, _, err = cli("eval", "--adapter", str(tmp_path / "run"), "--data", str(data), "model.quantization={bits: 4}")
    assert code != 0 and "has no linear layer to quantise" in err
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")
    (tmp_path / "run" / "metrics.json").unlink()
    recipe["model"]["quantization"] = {"bits": 4}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = cli("train", str(tmp_path / "recipe.yaml"), "--resume", "--resume-changed")
    assert code != 0 and "has no linear layer to quantise" in err
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["model"]["quantization"] is None
