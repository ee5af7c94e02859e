"""Review findings of probe 14 fixed by the lead: resume-harmless Trainer keys, a missing absolute model path, an
adapter config that is not UTF-8, a resumed preference run's paired metrics."""

from __future__ import annotations

import os

import pytest
import torch

from deltatune.config import ConfigError


@pytest.mark.parametrize("key, value", [("logging_first_step", True), ("eval_accumulation_steps", 4)])
def test_trainer_keys_that_change_no_training_are_harmless_on_resume(key, value):
    """train.logging_first_step and train.eval_accumulation_steps (recipe keys since 5847216) change what is logged
    or how evaluation batches are gathered, not the training: --resume takes them as logging_steps (it refused)."""
    from deltatune.train.runfolder import recipe_changes

    old = {"stage": "sft", "train": {"lr": 1e-3}}
    assert recipe_changes(old, {"stage": "sft", "train": {"lr": 1e-3, key: value}}) == []
    assert recipe_changes(old, {"stage": "sft", "train": {"lr": 2e-3, key: value}}) != []


def test_a_missing_absolute_model_path_is_named_a_missing_folder_not_a_hub_id(tmp_path):
    from deltatune.train.models import not_loaded

    gone = str(tmp_path / "gone")
    assert str(not_loaded(gone, OSError("x"))) == f"model {gone!r}: no such folder"
    assert "the hub could not provide it" in str(not_loaded("org/name", OSError("x")))


def test_an_adapter_config_that_is_not_utf8_is_one_line(tmp_path):
    from deltatune.config import read_config_file

    (tmp_path / "adapter_config.json").write_bytes(b'{"peft_type": "LORA\xff"}')
    with pytest.raises(
        ConfigError, match=r"adapter_config.json is not UTF-8 text \(byte 19\); an adapter config is JSON$"
    ):
        read_config_file(str(tmp_path))
    assert os.listdir(tmp_path) == ["adapter_config.json"]


def test_a_resumed_preference_run_pairs_its_evaluations_with_its_starts_scores(tmp_path, monkeypatch):
    """rm with eval_on_start: every later evaluation reports gained / lost / paired_p against the start's scores.
    Those were kept in memory only, so a --resume'd run's evaluations lacked them, and metric_for_best_model:
    paired_p (accepted up front since efccf61) failed at its first evaluation after the resume (review J). The
    scores are kept in the run folder now: the resumed run's last evaluation equals an uninterrupted run's."""
    import json
    import random

    from tiny import WORDS, save_tiny

    import deltatune.train.trainer as T
    from deltatune.train import build, train

    bert = save_tiny(tmp_path / "bert", "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=3)), "chosen": " ".join(rng.choices(WORDS, k=4)) + " good",
             "rejected": " ".join(rng.choices(WORDS, k=5))} for _ in range(24)]  # fmt: skip
    for name, part in (("t", rows[:16]), ("e", rows[16:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

    def recipe(out: str) -> dict:
        return {"stage": "rm", "model": {"name_or_path": bert},
                "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
                "data": {"train": str(tmp_path / "t.jsonl"), "eval": str(tmp_path / "e.jsonl"), "max_length": 24},
                "train": {"batch_size": 4, "lr": 5e-3, "seed": 0, "max_steps": 4, "eval_steps": 2, "save_steps": 2,
                          "eval_on_start": True, "load_best_model_at_end": True, "metric_for_best_model": "paired_p",
                          "greater_is_better": False, "report_to": ["none"]},
                "output": {"dir": str(tmp_path / out)}}  # fmt: skip

    whole = train(build(recipe("whole")))
    step = T.DeltaTrainer.training_step

    def stop_after_2(self, *a, **k):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(T.DeltaTrainer, "training_step", stop_after_2)
    with pytest.raises(KeyboardInterrupt):
        train(build(recipe("cut")))
    monkeypatch.setattr(T.DeltaTrainer, "training_step", step)
    resumed = train(build(recipe("cut")), resume=True)
    assert "eval_paired_p" in whole
    for key in ("eval_gained", "eval_lost", "eval_paired_p", "eval_loss"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key


@pytest.mark.parametrize("sequence", ["disable merge enable", "merge disable enable", "disable merge fwd enable",
                                      "merge disable fwd enable", "disable merge", "merge disable", "merge disable fwd"])  # fmt: skip
def test_merging_while_disabled_computes_as_peft_at_every_step(sequence):
    """peft's merged layer that is disabled unmerges itself at its next forward, not before: enabled again before
    one, it computes merged (every merged adapter, active or not). acebc4f left disabled layers unmerged (0.279 off
    peft after disable, merge a+b, enable), and disabling unmerged at once (0.279 off after merge a+b, disable,
    enable; review K)."""
    import peft
    from tiny import tiny_inputs, tiny_model

    import deltatune as dt

    lora = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**lora), adapter_name="a")
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**lora), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**lora))
    ours.add_adapter("b", dt.LoraConfig(**lora))
    for name in ("a", "b"):
        dt.set_peft_model_state_dict(
            ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), adapter_name=name
        )
    theirs.eval(), ours.eval()
    x = tiny_inputs("llama")["input_ids"]
    for model in (ours, theirs):
        model.set_adapter("a")
    assert (ours(input_ids=x).logits - theirs(input_ids=x).logits).abs().max() < 1e-6
    for step in sequence.split():
        for model in (ours, theirs):
            if step == "merge":
                model.merge_adapter(["a", "b"])
            elif step == "fwd":
                model(input_ids=x)
            else:
                getattr(model, f"{step}_adapter_layers")()
    got, want = ours(input_ids=x).logits, theirs(input_ids=x).logits  # (a forward after each step would unmerge)
    assert (got - want).abs().max() < 1e-5
    assert [m.merged_adapters for m in ours.modules() if hasattr(m, "merged_adapters")] == [
        m.merged_adapters for m in theirs.modules() if hasattr(m, "merged_adapters") and hasattr(m, "lora_A")
    ]
