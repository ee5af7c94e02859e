"""peft 0.21.2's PeftModel on what review 10d found after today's API commits: a set_adapter(inference_mode=True)
freeze held through later add/load/delete of other adapters; set_adapter on a merged model unmerges (an adapter
loaded for inference and made trainable was left merged: backward failed); autocast_adapter_dtype on a load onto an
existing name; load_adapter(modules_to_save=False) onto an existing name refused in one line; GRPO's second reward
run on the policy's base loaded under its own name (it went into the first one's)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from tiny import output_of, tiny_inputs, tiny_model

import deltatune as dt
from deltatune.files import AdapterLoadError

PEFT_022 = tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22)


def _saved(tmp_path, dtype=torch.float32):
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["k_proj"]))
    model.to(dtype).save_pretrained(tmp_path / "c")
    return tmp_path / "c"


def _trainable(model) -> int:
    return model.get_nb_trainable_parameters()[0]


def test_an_inference_mode_freeze_holds_through_other_adapters_as_peft(tmp_path):
    folder = _saved(tmp_path)
    counts = {}
    for lib, cfg, make in ((dt, dt.LoraConfig, dt.get_delta_model), (peft, peft.LoraConfig, peft.get_peft_model)):
        model = make(tiny_model("llama"), cfg(r=4, target_modules=["q_proj"]), adapter_name="a")
        log = [_trainable(model)]
        model.set_adapter("a", inference_mode=True)
        log.append(_trainable(model))
        model.add_adapter("b", cfg(r=2, target_modules=["v_proj"]))
        log.append(_trainable(model))
        model.load_adapter(str(folder), "c")
        model.delete_adapter("b")
        log.append(_trainable(model))
        model.set_adapter("a")  # peft's default inference_mode=False: it trains again
        log.append(_trainable(model))
        counts[lib.__name__] = log
    assert counts["deltatune"] == counts["peft"] and counts["peft"][1:4] == [0, 0, 0] and counts["peft"][-1] > 0


def test_set_adapter_unmerges_a_merged_model_and_the_adapter_trains_as_peft(tmp_path):
    folder = _saved(tmp_path)
    x = tiny_inputs("llama")
    grads = {}
    for lib, load in ((dt, dt.DeltaModel.from_pretrained), (peft, peft.PeftModel.from_pretrained)):
        model = load(tiny_model("llama"), str(folder))  # for inference
        model.merge_adapter()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model.set_adapter("default")
        assert any("Unmerging the model first" in str(w.message) for w in seen)
        model(**x).logits.sum().backward()
        grads[lib.__name__] = sorted(
            n[n.index("layers.") :] for n, p in model.named_parameters() if p.grad is not None
        )
    assert grads["deltatune"] == grads["peft"] and len(grads["peft"]) == 4


def test_autocast_on_a_load_onto_an_existing_name_upcasts_as_peft(tmp_path):
    folder = _saved(tmp_path, torch.bfloat16)
    dtypes = {}
    for lib, load in ((dt, dt.DeltaModel.from_pretrained), (peft, peft.PeftModel.from_pretrained)):
        model = load(tiny_model("llama").to(torch.bfloat16), str(folder), autocast_adapter_dtype=False)
        model.load_adapter(str(folder), "default", autocast_adapter_dtype=True)
        dtypes[lib.__name__] = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes["deltatune"] == dtypes["peft"] == {torch.float32}


def test_a_bodies_only_load_onto_an_existing_name_is_one_line_and_changes_nothing(tmp_path):
    folder = _saved(tmp_path)
    model = dt.DeltaModel.from_pretrained(tiny_model("llama"), str(folder))
    x = tiny_inputs("llama")
    before = output_of(model, x)
    with pytest.raises(AdapterLoadError, match="modules_to_save=False.*onto the existing adapter 'default'"):
        model.load_adapter(str(folder), "default", modules_to_save=False)
    assert torch.equal(output_of(model, x), before)


def test_grpo_loads_each_reward_run_on_the_policys_base_under_its_own_name(monkeypatch):
    from deltatune.train import grpo_rewards, ppo, scorers

    names = []

    class Fake(scorers.AdapterReward):
        def __init__(self, model, run_dir, tokenizer, adapter_name="reward"):
            names.append(adapter_name)

    monkeypatch.setattr(scorers, "AdapterReward", Fake)
    monkeypatch.setattr(scorers, "reward_run", lambda spec: {"model": {"name_or_path": "base"}})
    monkeypatch.setattr(scorers, "trains_base", lambda spec, policy: False)  # (LoRA reward runs: no bias trained)
    monkeypatch.setattr(ppo.os.path, "isdir", lambda spec: True)
    rewards = [grpo_rewards.Reward(n, None, 1.0, True) for n in ("r1", "r2", "r3")]
    shared = grpo_rewards.load_rewards(rewards, ["a", "b", "c"], torch.nn.Linear(1, 1), "base", None)
    assert names == ["reward", "reward_1", "reward_2"] and len(shared) == 3


def test_unload_after_disable_adapter_layers_gives_the_active_head_as_peft(tmp_path):
    heads = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
        model = peft.get_peft_model(tiny_model("llama"), cfg)
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.normal_()
        model.save_pretrained(tmp_path / name)
        heads[name] = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    got = {}
    for lib, load in ((dt, dt.DeltaModel.from_pretrained), (peft, peft.PeftModel.from_pretrained)):
        model = load(tiny_model("llama"), str(tmp_path / "a"), adapter_name="a", is_trainable=True)
        model.load_adapter(str(tmp_path / "b"), "b")
        model.set_adapter("b")
        model.disable_adapter_layers()
        got[lib.__name__] = model.unload().lm_head.weight.detach()
    # peft 0.22's unload gives the head's original (0.21's: the active adapter's copy); deltatune's as 0.22's
    original = tiny_model("llama").lm_head.weight
    assert torch.equal(got["deltatune"], original)
    assert torch.equal(got["peft"], original if PEFT_022 else heads["b"])


def _names(model) -> list[str]:
    return sorted(n[n.index("layers.") :] if "layers." in n else n.rpartition(".")[2] for n, p in
                  model.named_parameters() if p.requires_grad)  # fmt: skip


def test_keep_holds_each_parameters_flag_and_base_parameters_as_peft():
    """Review 10e: with add/delete of another adapter, a hand-frozen lora_A (LoRA-FA) trained again (the adapter
    was kept as one flag), and an inference_mode freeze of LoRA with bias='all' was undone for its biases' sake."""
    for lib, cfg, make in ((dt, dt.LoraConfig, dt.get_delta_model), (peft, peft.LoraConfig, peft.get_peft_model)):
        model = make(tiny_model("llama"), cfg(r=4, target_modules=["q_proj"]), adapter_name="a")
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
        want = _names(model)
        model.add_adapter("b", cfg(r=2, target_modules=["v_proj"]))
        model.delete_adapter("b")
        assert _names(model) == want and want and not any("lora_A" in n for n in want), lib.__name__


@pytest.mark.parametrize("kind", ["BitFitConfig", "FreezeConfig", "FullConfig"])
def test_an_inference_mode_freeze_of_a_method_training_base_parameters_holds(kind):
    """BitFit, freeze and full train the base's own parameters: set_adapter(inference_mode=True) froze them, and the
    next add/delete of another adapter made them train again (review 10e)."""
    model = dt.get_delta_model(tiny_model("opt"), getattr(dt, kind)(), adapter_name="a")  # (opt: biases)
    model.set_adapter("a", inference_mode=True)
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    assert _trainable(model) == 0
    model.delete_adapter("b")
    assert _trainable(model) == 0


def test_deleting_an_active_adapter_sets_the_remaining_ones_trainable_as_peft():
    counts = {}
    for lib, cfg, make in ((dt, dt.LoraConfig, dt.get_delta_model), (peft, peft.LoraConfig, peft.get_peft_model)):
        model = make(tiny_model("llama"), cfg(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="a")
        model.add_adapter("b", cfg(r=2, target_modules=["v_proj"]))
        (model.base_model if lib is peft else model).set_adapter(["a", "b"], inference_mode=True)
        model.delete_adapter("a")
        counts[lib.__name__] = _trainable(model)
    assert counts["deltatune"] == counts["peft"] > 0


def test_merge_and_unload_after_disable_adapter_layers_gives_the_active_head_as_peft():
    x = tiny_inputs("llama")
    cfg = dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**cfg))
    with torch.no_grad():
        model.base_model.lm_head.modules_to_save["default"].weight.normal_()
    want = output_of(model, x)
    model.disable_adapter_layers()
    torch.testing.assert_close(output_of(model.merge_and_unload(), x), want, atol=1e-5, rtol=1e-5)
