"""method.towers on a tiny LLaVA (CLIP vision tower, two-layer projector, LLaMA language model) built from configs."""

from __future__ import annotations

import pytest
import torch
from tiny_vlm import tiny_vlm, vlm_inputs
from tolerances import ATOL

import deltatune as dt
from deltatune import towers as T
from deltatune.config import ConfigError


def tiny_llava(seed: int = 0):
    return tiny_vlm("llava", seed)


def inputs() -> dict:
    # 16 patches of the 16x16 image (the class token is dropped): 16 image tokens in the text
    return vlm_inputs("llava")


def _lora(**fields) -> dt.LoraConfig:
    return dt.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **fields)


@pytest.mark.parametrize(
    "towers, expected",
    [
        (None, {"language": 4}),  # default: [language], LLaMA's q_proj/v_proj in 2 layers
        (["vision"], {"vision": 4}),  # CLIP's q_proj/v_proj in 2 layers
        (["projector"], {"projector": 2}),  # linear_1, linear_2
        (["language", "vision", "projector"], {"language": 4, "vision": 4, "projector": 2}),
    ],
)
def test_default_targets_per_tower(towers, expected):
    model = tiny_llava()
    config = T.restrict(model, _lora(), towers)
    delta = dt.get_delta_model(model, config)
    assert T.counts(delta) == expected


def test_leaf_names_reaching_an_unnamed_tower_are_an_error():
    model = tiny_llava()
    with pytest.raises(ConfigError) as err:
        T.restrict(model, _lora(target_modules=["q_proj", "v_proj"]))
    msg = str(err.value)
    assert "reaches the vision tower(s), which method.towers=['language'] does not name" in msg
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj" in msg and "language_model" not in msg
    # naming both towers is the explicit way to get the 4 + 4 the leaf names match
    config = T.restrict(model, _lora(target_modules=["q_proj", "v_proj"]), ["language", "vision"])
    assert T.counts(dt.get_delta_model(model, config)) == {"language": 4, "vision": 4}


def test_bad_tower_requests():
    with pytest.raises(ConfigError, match="unknown tower 'audio'; choose from language, vision, projector"):
        T.restrict(tiny_llava(), _lora(), ["audio"])
    from tiny import tiny_model

    assert T.restrict(tiny_model("bert"), _lora()).target_modules is None  # no towers asked, none there: unchanged
    with pytest.raises(ConfigError, match="model type 'bert' has one tower"):
        T.restrict(tiny_model("bert"), _lora(), ["vision"])


def test_restricted_file_loads_in_peft(tmp_path):
    """The resolved full names are a plain target_modules list: PEFT loads the file to the same logits."""
    peft = pytest.importorskip("peft")
    model = tiny_llava()
    delta = dt.get_delta_model(model, T.restrict(model, _lora(), ["vision", "projector"])).eval()
    with torch.no_grad():
        expected = delta(**inputs()).logits
        base = tiny_llava()(**inputs()).logits
    assert (expected - base).abs().max() > ATOL[torch.float32]
    delta.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llava(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs()).logits, expected, atol=ATOL[torch.float32], rtol=0)


def test_recipe_key_is_checked():
    from deltatune.train.config import build

    cfg = build({"stage": "image_cls", "method": {"name": "lora", "towers": ["vision"]}})
    assert cfg.method["towers"] == ["vision"] and cfg.method_config().target_modules is None
    with pytest.raises(ConfigError, match=r"method.towers must be a list of tower names .* got 'vision'"):
        build({"stage": "image_cls", "method": {"name": "lora", "towers": "vision"}})


def test_ia3_feedforward_layers_come_from_the_towers_family():
    """IA3 scales a feed-forward layer's input: LLaMA's down_proj in the language tower, CLIP's fc2 in the vision one
    (their families' IA3 defaults), never decided by the model type 'llava', which has no entry."""
    config = T.restrict(tiny_llava(), dt.IA3Config(), ["language", "vision"])
    assert sorted(config.feedforward_modules) == sorted(
        [f"model.language_model.layers.{i}.mlp.down_proj" for i in (0, 1)]
        + [f"model.vision_tower.encoder.layers.{i}.mlp.fc2" for i in (0, 1)]
    )
    assert set(config.feedforward_modules) <= set(config.target_modules)


LANGUAGE_SITES = [
    f"model.language_model.layers.{i}.{s}" for i in (0, 1) for s in ("self_attn.o_proj", "mlp.down_proj")
]
VISION_SITES = [
    f"model.vision_tower.encoder.layers.{i}.{s}" for i in (0, 1) for s in ("self_attn.out_proj", "mlp.fc2")
]


@pytest.mark.parametrize(
    "towers, sites",
    [
        (None, LANGUAGE_SITES),  # default: [language], LLaMA's o_proj and down_proj in 2 blocks
        (["language"], LANGUAGE_SITES),
        (["vision"], VISION_SITES),  # CLIP's out_proj and mlp.fc2 in 2 blocks
        (["language", "vision"], LANGUAGE_SITES + VISION_SITES),
    ],
)
def test_bottleneck_adapters_go_into_the_named_towers_only(towers, sites):
    """Houlsby adapters after the attention and feed-forward outputs of exactly the named towers' blocks; the model
    starts as the base (W_up = 0), and a random W_up changes the logits (the adapters are on the forward path)."""
    model = tiny_llava()
    config = T.restrict(model, dt.BottleneckConfig(reduction_factor=4), towers)
    assert sorted(config.target_modules) == sorted(sites)
    delta = dt.get_delta_model(model, config).eval()
    per_tower = {"language": 0, "vision": 0}
    for site in sites:
        per_tower["language" if ".language_model." in site else "vision"] += 1
    assert T.counts(delta) == {t: n for t, n in per_tower.items() if n}
    with torch.no_grad():
        base = tiny_llava()(**inputs()).logits
        torch.testing.assert_close(delta(**inputs()).logits, base, atol=0, rtol=0)
        changed = dt.get_delta_model(tiny_llava(), config.replace(init_weights=False)).eval()(**inputs()).logits
    assert (changed - base).abs().max() > ATOL[torch.float32]


def test_bottleneck_towers_pfeiffer_and_the_tower_it_cannot_wrap():
    config = T.restrict(tiny_llava(), dt.BottleneckConfig(config="pfeiffer"), ["vision"])
    assert sorted(config.target_modules) == [f"model.vision_tower.encoder.layers.{i}.mlp.fc2" for i in (0, 1)]
    # LLaVA's projector is two linear layers, no blocks: one line naming the tower
    with pytest.raises(ConfigError) as err:
        T.restrict(tiny_llava(), dt.BottleneckConfig(), ["language", "projector"])
    assert str(err.value).startswith(
        "method.towers: the projector tower of model type 'llava' has no layers a bottleneck adapter (houlsby) can "
        "wrap"
    ) and "\n" not in str(err.value)
    # explicit targets reaching a tower not named are refused as for LoRA
    with pytest.raises(ConfigError, match="reaches the vision tower"):
        T.restrict(tiny_llava(), dt.BottleneckConfig(target_modules=r".*\.mlp\.fc2"))


def test_bottleneck_in_blip2s_qformer():
    """BLIP-2's projector tower is the Q-Former: its queries' attention output and their feed-forward (output_query)."""
    model = tiny_vlm("blip-2")
    config = T.restrict(model, dt.BottleneckConfig(reduction_factor=4), ["projector"])
    assert config.target_modules == ["qformer.encoder.layer.0.attention.output.dense",
                                     "qformer.encoder.layer.0.output_query.dense"]  # fmt: skip
    assert T.counts(dt.get_delta_model(model, config)) == {"projector": 2}
