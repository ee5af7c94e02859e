"""Probe 20 of the in-place methods (freeze, BitFit, full) and IA3 / TrainableTokens against their references.

Freeze tuning is compared with LLaMA-Factory's ``_setup_freeze_tuning`` (src/llamafactory/model/adapter.py), whose
choice of blocks is written out here: ``range(max(0, num_layers - n), num_layers)`` for n > 0 and
``range(min(-n, num_layers))`` for n < 0, over the text config's layers, with the vision tower and the projector
frozen by default (``freeze_vision_tower``, ``freeze_multi_modal_projector``) for the VLMs it registers (BLIP-2 is not
among them: its substring test would reach the Q-Former's and the vision tower's blocks of the same number; the
Q-Former is BLIP-2's projector, frozen here as LLaVA's multi_modal_projector is there).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import deltatune as dt
from tests.tiny import tiny_model

sys.path.insert(0, str(Path(__file__).parent))


def _llamafactory_blocks(num_layers: int, n: int) -> range:
    """LLaMA-Factory's trainable_layer_ids (adapter.py, use_llama_pro off)."""
    return range(max(0, num_layers - n), num_layers) if n > 0 else range(min(-n, num_layers))


@pytest.mark.parametrize("n", [2, 5, -2, -5])
def test_freeze_layers_beyond_the_depth_take_every_block_as_llamafactory(n):
    """n beyond the 2 blocks of the tiny LLaMA: LLaMA-Factory trains every block; this refused it with an error."""
    base = tiny_model("llama")
    names = [k for k, _ in base.named_parameters()]
    ids = _llamafactory_blocks(base.config.num_hidden_layers, n)
    expected = {k for k in names if any(f".{i}." in k for i in ids)}
    model = dt.get_delta_model(base, dt.FreezeConfig(freeze_trainable_layers=n))
    assert {k for k, p in model.base_model.named_parameters() if p.requires_grad} == expected
    assert len(expected) == 18  # both blocks, 9 tensors each


def test_freeze_on_blip2_trains_the_language_model_blocks_only_as_llamafactory():
    """BLIP-2: the text config's layers counted, the vision tower and the projector (the Q-Former) frozen, as
    LLaMA-Factory's defaults for a registered VLM; this trained the Q-Former's last block as well (a stack of its
    own, not named for vision)."""
    from vision.tiny_vlm import tiny_vlm

    base = tiny_vlm("blip-2")
    num = base.config.text_config.num_hidden_layers
    forbidden = ("vision_model", "qformer", "language_projection", "query_tokens")  # vision tower, projector
    expected = {
        k
        for k, _ in base.named_parameters()
        if any(f".{i}." in k for i in _llamafactory_blocks(num, 1)) and not any(f in k for f in forbidden)
    }
    assert expected and all(k.startswith("language_model.") for k in expected)
    model = dt.get_delta_model(base, dt.FreezeConfig(freeze_trainable_layers=1))
    assert {k for k, p in model.base_model.named_parameters() if p.requires_grad} == expected


def _llamafactory_llama_pro(num_layers: int, n: int) -> range:
    """LLaMA-Factory's trainable_layer_ids with use_llama_pro (adapter.py)."""
    if num_layers % n != 0:
        raise ValueError(f"`num_layers` {num_layers} should be divisible by `num_layer_trainable` {n}.")
    stride = num_layers // n
    return range(stride - 1, num_layers + stride - 1, stride)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_freeze_use_llama_pro_trains_the_expanded_blocks_as_llamafactory(n):
    """LLaMA-Factory's use_llama_pro: the last block of each 1/n of the stack (the expanded ones); had no such key."""
    base = tiny_model("llama", num_hidden_layers=4)
    ids = _llamafactory_llama_pro(4, n)
    expected = {k for k, _ in base.named_parameters() if any(f".{i}." in k for i in ids)}
    model = dt.get_delta_model(base, dt.FreezeConfig(freeze_trainable_layers=n, use_llama_pro=True))
    assert {k for k, p in model.base_model.named_parameters() if p.requires_grad} == expected
    assert len(expected) == 9 * n


@pytest.mark.parametrize(
    "config, match",
    [
        (
            dict(freeze_trainable_layers=3, use_llama_pro=True),
            "use_llama_pro: model.layers has 4 blocks, not a multiple",
        ),
        (dict(freeze_trainable_layers=-2, use_llama_pro=True), "use_llama_pro needs freeze_trainable_layers > 0"),
        (dict(use_llama_pro="yes"), "use_llama_pro must be true or false, got 'yes'"),
    ],
)
def test_freeze_use_llama_pro_bad_input_is_one_line_and_changes_nothing(config, match):
    base = tiny_model("llama", num_hidden_layers=4)
    model = dt.DeltaModel(base)
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    with pytest.raises(dt.ConfigError, match=match):
        model.add_adapter("default", dt.FreezeConfig(**config))
    with pytest.raises(ValueError):
        _llamafactory_llama_pro(4, 3)
    assert not model.peft_config
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads


def test_freeze_use_llama_pro_saves_the_expanded_blocks_and_loads_as_it_trained(tmp_path):
    """The file holds exactly LLaMA-Factory's blocks 1 and 3 (n = 2 of 4), and loads back with the same choice."""
    import json

    import torch
    from safetensors.torch import load_file

    model = dt.get_delta_model(
        tiny_model("llama", num_hidden_layers=4), dt.FreezeConfig(freeze_trainable_layers=2, use_llama_pro=True)
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.25)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in saved} == set(_llamafactory_llama_pro(4, 2))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_llama_pro"] is True
    loaded = dt.DeltaModel.from_pretrained(tiny_model("llama", num_hidden_layers=4), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].use_llama_pro is True
    trained = {k for k, p in loaded.base_model.named_parameters() if p.requires_grad}
    assert trained == {k for k, p in model.base_model.named_parameters() if p.requires_grad}
    for (k, p), (_, q) in zip(model.base_model.named_parameters(), loaded.base_model.named_parameters()):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_trainable_tokens_init_weights_not_a_bool_is_refused_naming_it(value):
    """init_weights: "false" (text from a form or the command line) was read as true: the rows started as the
    embedding's, the opposite of what was asked; now one line naming the key, before any model is touched."""
    with pytest.raises(dt.ConfigError, match=r"^init_weights must be true or false, got "):
        dt.TrainableTokensConfig(token_indices=[3, 7], init_weights=value)


@pytest.mark.parametrize("init", [True, False])
def test_trainable_tokens_init_weights_bool_still_as_peft(init):
    """The bools as peft 0.21.2 reads them: the rows start as the embedding's, or N(0, 1) drawn with the same seed."""
    import peft
    import torch

    torch.manual_seed(4)
    ours = dt.get_delta_model(tiny_model("llama"), dt.TrainableTokensConfig(token_indices=[3, 7], init_weights=init))
    torch.manual_seed(4)
    ref = peft.get_peft_model(tiny_model("llama"), peft.TrainableTokensConfig(token_indices=[3, 7], init_weights=init))
    (a,) = [v for k, v in ours.state_dict().items() if k.endswith("trainable_tokens_delta.default")]
    (b,) = [v for k, v in ref.state_dict().items() if k.endswith("trainable_tokens_delta.default")]
    assert torch.equal(a, b)


def test_freeze_blip2_file_from_before_with_the_qformer_block_loads_as_it_trained(tmp_path):
    """A file saved before this change holds the Q-Former's last block too: loading still copies it into the base."""
    import torch
    from safetensors.torch import load_file, save_file
    from vision.tiny_vlm import tiny_vlm

    model = dt.get_delta_model(tiny_vlm("blip-2"), dt.FreezeConfig(freeze_trainable_layers=1))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    old = {
        k: p.detach() + 0.5
        for k, p in tiny_vlm("blip-2").named_parameters()
        if k.startswith("qformer.encoder.layer.0.")
    }
    save_file({**tensors, **{f"base_model.model.{k}": v for k, v in old.items()}}, path)
    loaded = dt.DeltaModel.from_pretrained(tiny_vlm("blip-2"), tmp_path)
    params = dict(loaded.base_model.named_parameters())
    assert old and all(torch.equal(params[k], v) for k, v in old.items())


def test_full_on_llava_freezes_the_vision_tower_and_projector_as_llamafactory(tmp_path):
    """LLaMA-Factory's full tuning on LLaVA: every parameter but those under its forbidden modules, "vision_tower" and
    "multi_modal_projector" (freeze_vision_tower, freeze_multi_modal_projector: true by default); this trained
    them as well."""
    import json

    from vision.tiny_vlm import tiny_vlm

    base = tiny_vlm("llava")
    forbidden = ("vision_tower", "multi_modal_projector")  # LLaMA-Factory's get_forbidden_modules for llava
    expected = {k for k, _ in base.named_parameters() if not any(f in k for f in forbidden)}
    model = dt.get_delta_model(base, dt.FullConfig())
    assert {k for k, p in model.base_model.named_parameters() if p.requires_grad} == expected
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["freeze_vision_tower"] is True and saved["freeze_multi_modal_projector"] is True
    loaded = dt.DeltaModel.from_pretrained(tiny_vlm("llava"), tmp_path, is_trainable=True)
    assert {k for k, p in loaded.base_model.named_parameters() if p.requires_grad} == expected
    every = dt.get_delta_model(
        tiny_vlm("llava"), dt.FullConfig(freeze_vision_tower=False, freeze_multi_modal_projector=False)
    )
    assert all(p.requires_grad for p in every.base_model.parameters())


def test_full_llava_file_from_before_without_the_fields_loads_training_every_parameter(tmp_path):
    """A file saved before the fields (its config lacks them) trained every parameter: it resumes so."""
    import json

    from vision.tiny_vlm import tiny_vlm

    model = dt.get_delta_model(
        tiny_vlm("llava"), dt.FullConfig(freeze_vision_tower=False, freeze_multi_modal_projector=False)
    )
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["freeze_vision_tower"], config["freeze_multi_modal_projector"]
    path.write_text(json.dumps(config))
    loaded = dt.DeltaModel.from_pretrained(tiny_vlm("llava"), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in loaded.base_model.parameters())


@pytest.mark.parametrize("value", ["no", 1, 0])
@pytest.mark.parametrize("key", ["freeze_vision_tower", "freeze_multi_modal_projector"])
def test_full_tower_fields_not_a_bool_refused_naming_them(key, value):
    with pytest.raises(dt.ConfigError, match=rf"^{key} must be true or false, got {value!r}"):
        dt.FullConfig(**{key: value})


def test_trainable_tokens_file_with_init_weights_as_text_loads_as_it_ran(tmp_path):
    """A config saved with init_weights "no" (taken, run as true, before the refusal) loads, warning, values as saved."""
    import json

    import torch

    model = dt.get_delta_model(tiny_model("llama"), dt.TrainableTokensConfig(token_indices=[3, 7]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_weights": "no"}))
    with pytest.warns(UserWarning, match=r"init_weights='no' \(read as True\)"):
        loaded = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.peft_config["default"].init_weights is True
    ids = torch.tensor([[3, 7, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_full_and_freeze_on_a_text_model_are_unchanged():
    """A model with one tower: full trains every parameter, freeze the last block of each stack (T5: both)."""
    full = dt.get_delta_model(tiny_model("t5"), dt.FullConfig())
    assert all(p.requires_grad for p in full.base_model.parameters())
    names = dt.FreezeConfig(freeze_trainable_layers=1).trainable_base_parameters(tiny_model("t5"))
    assert {n.split(".block.")[0] + ".block." + n.split(".block.")[1].split(".")[0] for n in names} == {
        "encoder.block.1",
        "decoder.block.1",
    }
