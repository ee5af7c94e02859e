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

# (tiny_vlm: a worker that ran test_bench_vision has imported benchmarks/vision.py as `vision`, so
# `from vision.tiny_vlm import` failed there)
sys.path.insert(0, str(Path(__file__).parent / "vision"))


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
    from tiny_vlm import tiny_vlm

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
    from tiny_vlm import tiny_vlm

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

    from tiny_vlm import tiny_vlm

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

    from tiny_vlm import tiny_vlm

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


# -- methodsfix20: the tower switches of freeze, Qwen-VL's merger, dual encoders, full's resume ------------------------


def _old_freeze_file(tmp_path, family: str = "blip-2") -> None:
    """An adapter folder saved before the tower switches: its adapter_config.json without them (nor use_llama_pro)."""
    import json

    from tiny_vlm import tiny_vlm

    old = dt.FreezeConfig.from_dict({"peft_type": "FREEZE", "freeze_trainable_layers": 1})  # (the old rule)
    dt.get_delta_model(tiny_vlm(family), old).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in ("freeze_vision_tower", "freeze_multi_modal_projector", "use_llama_pro"):
        del config[key]
    path.write_text(json.dumps(config))


def _blip2_blocks(base, *towers: str) -> set[str]:
    """The parameters of the last block of each block stack under ``towers`` (top-level module names)."""
    from deltatune.methods.freeze import _block

    blocks = {k: b for k, _ in base.named_parameters() if (b := _block(k)) is not None}
    last: dict[str, int] = {}
    for stack, i in blocks.values():
        last[stack] = max(last.get(stack, 0), i)
    return {k for k, (stack, i) in blocks.items() if i == last[stack] and stack.split(".")[0] in towers}


def test_freeze_resume_of_a_blip2_run_from_before_the_switches_trains_the_qformer_block_as_it_began(tmp_path):
    """A freeze run on BLIP-2 begun before bd6df2c trained the Q-Former's last block beside the language model's (every
    stack not named for vision); bd6df2c froze it, and --resume rebuilt the adapter as a new one: its optimizer's
    groups no longer matched the checkpoint's (a crash). LLaMA-Factory's get_forbidden_modules is a switch for freeze
    too (freeze_multi_modal_projector): the checkpoint without it goes on with the rule it trained with."""
    import json

    from tiny_vlm import save_vlm

    from deltatune.train.config import build
    from deltatune.train.models import load_processor
    from deltatune.train.run import start_model

    save_vlm(tmp_path / "blip2", "blip-2")
    (tmp_path / "checkpoint-2").mkdir()
    config = {"peft_type": "FREEZE", "task_type": "CAUSAL_LM", "freeze_trainable_layers": 1}  # (before bd6df2c)
    (tmp_path / "checkpoint-2" / "adapter_config.json").write_text(json.dumps(config))
    cfg = build({"stage": "caption", "model": {"name_or_path": str(tmp_path / "blip2")},
                 "method": {"name": "freeze", "freeze_trainable_layers": 1},
                 "data": {"train": str(tmp_path / "c.jsonl")}})  # fmt: skip
    proc = load_processor(str(tmp_path / "blip2"), "caption")
    delta, _ = start_model(cfg, proc, None, str(tmp_path / "checkpoint-2"))
    base = delta.base_model
    old = _blip2_blocks(base, "qformer", "language_model")
    assert {k for k, p in base.named_parameters() if p.requires_grad} == old
    delta.save_pretrained(tmp_path / "checkpoint-4")  # (its next checkpoint: the same rule on the next resume)
    again, _ = start_model(cfg, proc, None, str(tmp_path / "checkpoint-4"))
    assert {k for k, p in again.base_model.named_parameters() if p.requires_grad} == old
    fresh, _ = start_model(cfg, proc)  # (a new run: the language tower alone, as LLaMA-Factory)
    language = _blip2_blocks(base, "language_model")
    assert {k for k, p in fresh.base_model.named_parameters() if p.requires_grad} == language
    assert fresh.peft_config["default"].freeze_multi_modal_projector is True


def test_freeze_blip2_file_from_before_the_switches_loads_trainable_as_it_trained(tmp_path):
    """The file from before the switches loads (is_trainable) with its Q-Former block training, as it trained; a
    direct call with the switches None takes LLaMA-Factory's defaults (True); False trains that tower's blocks."""
    from tiny_vlm import tiny_vlm

    _old_freeze_file(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(tiny_vlm("blip-2"), tmp_path, is_trainable=True)
    base = loaded.base_model
    expected = _blip2_blocks(base, "qformer", "language_model")
    assert {k for k, p in base.named_parameters() if p.requires_grad} == expected
    language = _blip2_blocks(base, "language_model")
    assert set(dt.FreezeConfig(freeze_trainable_layers=1).trainable_base_parameters(base)) == language
    every = dt.FreezeConfig(freeze_trainable_layers=1, freeze_vision_tower=False, freeze_multi_modal_projector=False)
    projector = {
        k for k, _ in base.named_parameters() if k.startswith(("qformer.", "query_tokens", "language_projection."))
    }
    blocks = _blip2_blocks(base, "language_model", "vision_model")
    assert set(every.trainable_base_parameters(base)) == blocks | projector  # (the whole projector, as LLaMA-Factory)


@pytest.mark.parametrize("value", ["no", 1])
@pytest.mark.parametrize("key", ["freeze_vision_tower", "freeze_multi_modal_projector"])
def test_freeze_tower_fields_not_a_bool_refused_naming_them(key, value):
    with pytest.raises(dt.ConfigError, match=rf"^{key} must be true or false, got {value!r}$"):
        dt.FreezeConfig(**{key: value})


def _pix2struct():
    import transformers as T

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    text = dict(hidden_size=16, d_kv=4, num_heads=4, num_layers=2, d_ff=24, vocab_size=64)
    vision = dict(
        hidden_size=16, d_kv=4, num_attention_heads=4, num_hidden_layers=2, d_ff=24, patch_embed_hidden_size=12
    )
    return T.Pix2StructForConditionalGeneration(T.Pix2StructConfig(text_config=text, vision_config=vision))


def test_freeze_pix2struct_file_from_before_the_switches_loads_with_its_encoder_block_as_it_trained():
    """Pix2Struct's image encoder ("encoder.encoder.layer") is not named for vision: the old rule trained its last
    block beside the decoder's, which the switches' (True, False) would not reproduce; the old rule is kept exactly."""
    model = _pix2struct()
    old = dt.FreezeConfig.from_dict({"peft_type": "FREEZE", "freeze_trainable_layers": 1})
    stacks = {n.split(".1.")[0] for n in old.trainable_base_parameters(model)}
    assert stacks == {"encoder.encoder.layer", "decoder.layer"}
    new = {n.split(".1.")[0] for n in dt.FreezeConfig(freeze_trainable_layers=1).trainable_base_parameters(model)}
    assert new == {"decoder.layer"}  # (its vision_config's tower: frozen, as a VLM's)


def _qwen2_vl():
    import transformers as T

    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=128, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})  # fmt: skip
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=2, spatial_merge_size=1,
                  temporal_patch_size=1)  # fmt: skip
    return T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(vision_config=vision, text_config=text))


@pytest.mark.parametrize("vision, projector", [(True, False), (False, True), (True, True)])
def test_full_qwen2_vl_merger_is_the_projector_as_llamafactory(vision, projector):
    """LLaMA-Factory's qwen2_vl: vision_model_keys ["visual.patch_embed", "visual.blocks"], projector_key
    "visual.merger" (model_utils/visual.py); _setup_full_tuning freezes every parameter under a forbidden key. The
    merger sat in the vision config's module: freeze_multi_modal_projector did nothing, freeze_vision_tower froze it."""
    model = _qwen2_vl()
    names = [n for n, _ in model.named_parameters()]
    forbidden = (["visual.patch_embed", "visual.blocks"] if vision else []) + (["visual.merger"] if projector else [])
    expected = {n for n in names if not any(f in n for f in forbidden)}
    config = dt.FullConfig(freeze_vision_tower=vision, freeze_multi_modal_projector=projector)
    assert set(config.trainable_base_parameters(model)) == expected
    assert any("merger" in n for n in names)


def test_freeze_qwen2_vl_projector_switch_trains_the_whole_merger_as_llamafactory():
    """LLaMA-Factory's _setup_freeze_tuning: trainable_layers (".{idx}." of the text config's last n layers) plus, with
    freeze_multi_modal_projector false, the projector_keys ("visual.merger"), less the forbidden modules (the vision
    keys where freeze_vision_tower). The merger has no numbered blocks: false trained nothing of it."""
    model = _qwen2_vl()
    names = [n for n, _ in model.named_parameters()]
    for vision in (True, False):
        config = dt.FreezeConfig(
            freeze_trainable_layers=1, freeze_vision_tower=vision, freeze_multi_modal_projector=False
        )
        forbidden = ["visual.patch_embed", "visual.blocks"] if vision else []
        expected = {
            n for n in names if any(t in n for t in (".1.", "visual.merger")) and not any(f in n for f in forbidden)
        }
        assert set(config.trainable_base_parameters(model)) == expected
        assert any("merger" in n for n in expected)
    stacks = {
        n.split(".1.")[0]
        for n in dt.FreezeConfig(freeze_trainable_layers=1, freeze_vision_tower=False).trainable_base_parameters(model)
    }
    assert stacks == {"model.visual.blocks", "model.language_model.layers"}  # (the merger frozen by default)


@pytest.mark.parametrize("family", ["clip", "siglip", "blip"])
def test_full_on_a_dual_encoder_trains_every_parameter_as_llamafactory(family):
    """CLIP and SigLIP (and BLIP's captioner) have a text_config and a vision_config but no LM head (no output
    embeddings) and are no LLaMA-Factory VLM (its COMPOSITE_MODELS): full trains every parameter there. The tower rule froze CLIPModel's vision tower, its
    visual_projection, and, as "projector" (in neither sub-config), text_projection and logit_scale."""
    import transformers as T

    text = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, vocab_size=64)
    vision = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, image_size=8,
                  patch_size=4)  # fmt: skip
    if family == "clip":
        model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    elif family == "blip":  # (BLIP's captioner: its class gives no output embeddings; BLIP fine-tunes its ViT)
        text = dict(text, encoder_hidden_size=16, bos_token_id=1, sep_token_id=2, pad_token_id=0)
        model = T.BlipForConditionalGeneration(T.BlipConfig(text_config=text, vision_config=vision))
    else:
        model = T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=vision))
    names = [n for n, _ in model.named_parameters()]
    assert set(dt.FullConfig(freeze_vision_tower=True).trainable_base_parameters(model)) == set(names)
    full = dt.get_delta_model(model, dt.FullConfig())
    assert all(p.requires_grad for p in full.base_model.parameters())
    stacks = {n.split(".1.")[0] for n in dt.FreezeConfig(freeze_trainable_layers=1).trainable_base_parameters(model)}
    text_stack = "text_decoder.bert.encoder.layer" if family == "blip" else "text_model.encoder.layers"
    assert stacks == {text_stack}  # (freeze: the stack not named for vision, as before)


@pytest.mark.parametrize("saved, trains", [({"freeze_vision_tower": None}, True), ({}, True), ({"freeze_vision_tower": True}, False)])  # fmt: skip
def test_full_resume_of_a_checkpoint_with_null_switches_goes_on_training_every_tower(saved, trains):
    """A file from before the switches, loaded and saved again, holds them null: as_resumed took None, which inject
    turned True, freezing the vision tower mid-run."""
    from tiny_vlm import tiny_vlm

    config = dt.FullConfig().as_resumed({"peft_type": "FULL", "freeze_multi_modal_projector": None, **saved})
    model = dt.get_delta_model(tiny_vlm("llava"), config)
    vision = [p.requires_grad for n, p in model.base_model.named_parameters() if "vision_tower" in n]
    assert vision and all(vision) is trains and any(vision) is trains


@pytest.mark.parametrize("cls", [dt.FullConfig, dt.FreezeConfig])
def test_as_resumed_from_another_methods_checkpoint_leaves_the_config_as_it_is(cls):
    """A checkpoint of another method (LoRA) says nothing of this one's towers: the recipe's config, unchanged (full
    took the LoRA file's missing switches as an old full run's: every tower trained)."""
    config = cls()
    assert cls().as_resumed({"peft_type": "LORA", "r": 8}) == config
    assert cls().as_resumed({"peft_type": "LORA"}).freeze_vision_tower is None


def test_freeze_llava_projector_false_trains_the_projector_as_llamafactory():
    """LLaVA's multi_modal_projector has no numbered blocks: freeze_multi_modal_projector=False trained nothing more;
    LLaMA-Factory appends its projector_keys to trainable_layers (the whole projector trains, freeze_trainable_modules
    or not)."""
    from tiny_vlm import tiny_vlm

    base = tiny_vlm("llava")
    names = [k for k, _ in base.named_parameters()]
    last = [f".{i}." for i in _llamafactory_blocks(base.config.text_config.num_hidden_layers, 1)]
    expected = {k for k in names if any(t in k for t in [*last, "multi_modal_projector"]) and "vision_tower" not in k}
    config = dt.FreezeConfig(freeze_trainable_layers=1, freeze_multi_modal_projector=False)
    model = dt.get_delta_model(base, config)
    assert {k for k, p in model.base_model.named_parameters() if p.requires_grad} == expected
    assert any("multi_modal_projector" in k for k in expected)
    mlp = config.replace(freeze_trainable_modules=["mlp"])
    assert {k for k in expected if "multi_modal_projector" in k} <= set(mlp.trainable_base_parameters(base))


def test_freeze_resume_of_an_old_blip2_run_with_one_switch_set_trains_the_qformer_block_alone(tmp_path):
    """A checkpoint from before the switches, resumed with freeze_vision_tower set: the Q-Former's last block trained
    as the old rule did, not the whole Q-Former (its optimizer state holds those); its next checkpoint (and that
    file loaded) goes on so: the unset switch was saved false, which then trained the whole Q-Former."""
    import json

    from tiny_vlm import tiny_vlm

    base = tiny_vlm("blip-2")
    old = _blip2_blocks(base, "qformer", "language_model")
    config = dt.FreezeConfig(freeze_trainable_layers=1, freeze_vision_tower=True)
    resumed = config.as_resumed({"peft_type": "FREEZE", "freeze_trainable_layers": 1})
    assert set(resumed.trainable_base_parameters(base)) == old
    dt.get_delta_model(tiny_vlm("blip-2"), resumed).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    again = dt.FreezeConfig(freeze_trainable_layers=1, freeze_vision_tower=True).as_resumed(saved)
    assert set(again.trainable_base_parameters(base)) == old
    loaded = dt.DeltaModel.from_pretrained(tiny_vlm("blip-2"), tmp_path, is_trainable=True)
    assert {k for k, p in loaded.base_model.named_parameters() if p.requires_grad} == old
    qformer = {
        k for k, _ in base.named_parameters() if k.startswith(("qformer.", "query_tokens", "language_projection."))
    }
    new = set(
        dt.FreezeConfig(freeze_trainable_layers=1, freeze_multi_modal_projector=False).trainable_base_parameters(base)
    )
    assert qformer <= new  # (a new adapter: the whole projector)


def test_full_qwen3_vl_deepstack_mergers_are_the_vision_tower_as_llamafactory():
    """LLaMA-Factory's qwen3_vl: vision_model_keys ["visual.pos_embed", "visual.patch_embed", "visual.blocks",
    "visual.deepstack_merger_list"], projector_keys ["visual.merger"]: the deepstack mergers were the projector here."""
    import torch
    import transformers as T

    with torch.device("meta"):
        model = T.AutoModelForImageTextToText.from_config(T.AutoConfig.for_model("qwen3_vl"))
    names = [n for n, _ in model.named_parameters()]
    vision_keys = ["visual.pos_embed", "visual.patch_embed", "visual.blocks", "visual.deepstack_merger_list"]
    for vision, projector in [(True, False), (False, True)]:
        forbidden = (vision_keys if vision else []) + (["visual.merger"] if projector else [])
        expected = {n for n in names if not any(f in n for f in forbidden)}
        config = dt.FullConfig(freeze_vision_tower=vision, freeze_multi_modal_projector=projector)
        assert set(config.trainable_base_parameters(model)) == expected
    assert any("deepstack_merger_list" in n for n in names)


def _gemma3_seq_cls():
    import torch
    import transformers as T

    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=300, head_dim=8)  # fmt: skip
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
                  patch_size=4)  # fmt: skip
    torch.manual_seed(0)
    config = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, num_labels=1)
    return T.Gemma3ForSequenceClassification(config)


def test_full_gemma3_seq_cls_freezes_its_towers_and_an_old_file_loads(tmp_path):
    """Gemma3ForSequenceClassification (deltatune's SEQ_CLS for cls / rm on Gemma 3) has no output embeddings but a
    score head: it lost its towers (84e60f4), full trained the vision tower and projector even with
    freeze_vision_tower=True (LLaMA-Factory forbids "vision_tower", "multi_modal_projector" for gemma3 whatever the
    head), and a file saved with them frozen (6c8bd43..84e60f4) no longer loaded."""
    import json

    import torch
    from safetensors.torch import save_file

    base = _gemma3_seq_cls()
    forbidden = ("vision_tower", "multi_modal_projector")
    names = [k for k, _ in base.named_parameters()]
    expected = {k for k in names if not any(f in k for f in forbidden)}
    assert (
        set(dt.FullConfig(freeze_vision_tower=True, freeze_multi_modal_projector=True).trainable_base_parameters(base))
        == expected
    )
    stacks = {n.split(".1.")[0] for n in dt.FreezeConfig(freeze_trainable_layers=1).trainable_base_parameters(base)}
    assert stacks == {"model.language_model.layers"}
    # the file as 6c8bd43..84e60f4 wrote it: every parameter but the towers', the score head as modules_to_save
    tensors = {f"base_model.model.{k}": p.detach() + 0.25 for k, p in base.named_parameters() if k in expected}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    config = {"peft_type": "FULL", "task_type": "SEQ_CLS", "modules_to_save": ["score"], "freeze_vision_tower": True,
              "freeze_multi_modal_projector": True}  # fmt: skip
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = dt.DeltaModel.from_pretrained(_gemma3_seq_cls(), tmp_path, is_trainable=True)
    params = dict(loaded.base_model.named_parameters())
    trained = {k for k, p in params.items() if p.requires_grad}
    assert {k for k in trained if any(f in k for f in forbidden)} == set()
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    assert torch.equal(params[key], tensors[f"base_model.model.{key}"])
