"""The t2i keys diffusers' scripts have reach the stage from a recipe, and are named as ignored by other stages."""

import pytest

from deltatune.config import ConfigError
from deltatune.train.config import build, ignored_keys
from deltatune.train.t2i_noise import loss_options

DDPM = {"noise_offset": 0.05, "input_perturbation": 0.1}
FLOW = {"sigma_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 1.5, "mode_scale": 1.0,
        "precondition_outputs": True}  # fmt: skip
DATA = {"augment": ["random_crop", "hflip"], "image_interpolation_mode": "bilinear", "proportion_empty_prompts": 0.2}


@pytest.mark.parametrize("flow, train", [(False, DDPM), (True, FLOW)])
def test_a_t2i_recipe_sets_diffusers_keys_and_the_losses_read_them(flow, train):
    cfg = build({"stage": "t2i", "train": train, "data": DATA})
    assert {k: loss_options(cfg.train, flow=flow)[k] for k in train} == train
    assert {k: getattr(cfg.data, k) for k in DATA} == DATA
    assert ignored_keys(cfg) == []  # data.augment was named as image_cls's only


def test_another_stage_names_the_t2i_keys_as_ignored():
    cfg = build({"stage": "sft", "model": {"name_or_path": "smollm2"}, "train": DDPM, "data": DATA})
    assert {k for k, _ in ignored_keys(cfg)} == {f"train.{k}" for k in DDPM} | {f"data.{k}" for k in DATA}


def test_a_misspelt_t2i_key_is_refused_naming_the_nearest():
    with pytest.raises(ConfigError, match="noise_ofset.*noise_offset"):
        build({"stage": "t2i", "train": {"noise_ofset": 0.1}})


def test_wpo_is_a_dpo_recipe_key_refused_with_the_sorting_losses_and_named_ignored_elsewhere():
    dpo = build({"stage": "dpo", "model": {"name_or_path": "smollm2"}, "align": {"use_weighting": True}})
    assert dpo.align.use_weighting and ignored_keys(dpo) == []
    kto = build({"stage": "kto", "model": {"name_or_path": "smollm2"}, "align": {"use_weighting": True}})
    assert ignored_keys(kto) == [("align.use_weighting", "dpo")]
    with pytest.raises(ConfigError, match=r"align.use_weighting \(WPO\) does not apply to align.loss_type aot"):
        build({"stage": "dpo", "model": {"name_or_path": "smollm2"},
               "align": {"use_weighting": True, "loss_type": ["sigmoid", "aot"]}})  # fmt: skip
