"""LoRA on a tiny diffusers UNet (deltatune.diffusion): the layer properties, diffusers' file format both ways
(against diffusers + peft's own loading and saving), kohya's format both ways (and through diffusers' own kohya
converter), unmatched keys refused, and LoRAs combined with weights."""

from __future__ import annotations

import pytest
import torch
from tolerances import ATOL

import deltatune as dt
from deltatune.diffusion import read_lora_file

diffusers = pytest.importorskip("diffusers")
ATOL32 = ATOL[torch.float32]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHT = "pytorch_lora_weights.safetensors"


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip


def inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 1, 16, 16, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
    }


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).sample


def lora(seed: int = 0, **fields) -> dt.DeltaModel:
    torch.manual_seed(seed)
    config = dt.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **fields})
    return dt.get_delta_model(tiny_unet(), config).eval()


def test_default_targets_init_equals_base_and_a_step_trains_only_the_adapter():
    base = out(tiny_unet())
    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=4)).eval()  # diffusers' attention projections
    assert torch.equal(out(model), base)
    assert sorted(model.peft_config["default"].target_modules) == sorted(TARGETS)
    model.train()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs()).sample.square().mean().backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert (out(model.eval()) - base).abs().max() > ATOL32


def test_merge_unmerge_exact():
    model = lora()
    adapted, base = out(model), out(tiny_unet())
    model.merge_adapter()
    torch.testing.assert_close(out(model), adapted, atol=ATOL32, rtol=0)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(out(model), base, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_diffusers_loads_what_deltatune_saves(tmp_path, rslora):
    model = lora(use_rslora=rslora, rank_pattern={"to_out.0": 2}, alpha_pattern={"to_q": 3.0})
    dt.save_diffusers_lora(model, tmp_path)
    theirs = tiny_unet()
    theirs.load_lora_adapter(str(tmp_path), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(out(theirs), out(model), atol=ATOL32, rtol=0)
    assert (out(theirs) - out(tiny_unet())).abs().max() > ATOL32


@pytest.mark.parametrize("layout", ["peft", "diffusers-scripts"])
def test_deltatune_loads_what_diffusers_and_peft_save(tmp_path, layout):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs = tiny_unet()
    torch.manual_seed(3)
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False))
    state = get_peft_model_state_dict(theirs)
    if layout == "diffusers-scripts":  # what diffusers' train_text_to_image_lora.py writes: lora.down / lora.up
        state = convert_state_dict_to_diffusers(state)
    metadata = {"r": 4, "lora_alpha": 6, "target_modules": TARGETS}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=state, unet_lora_adapter_metadata=metadata
    )
    ours = dt.load_lora(tiny_unet(), tmp_path)
    torch.testing.assert_close(out(ours), out(theirs.eval()), atol=ATOL32, rtol=0)


def test_kohya_round_trip_and_diffusers_reads_our_kohya_file(tmp_path):
    model = lora(use_rslora=True, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3.0})
    file = dt.save_kohya_lora(model, tmp_path / "style.safetensors")
    tensors, _ = read_lora_file(file)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= set(tensors)
    assert torch.equal(out(dt.load_lora(tiny_unet(), file)), out(model))
    # diffusers' own kohya converter (lora_state_dict) reads our file into the same UNet outputs. (With one alpha
    # for every module: diffusers 0.42's converter drops per-module alphas; peft warns "alpha_pattern keys did not
    # match any targeted module", so a kohya file with several alphas loads mis-scaled there, not here.)
    model = lora(lora_alpha=6, rank_pattern={"to_k": 2})
    file = dt.save_kohya_lora(model, tmp_path / "uniform.safetensors")
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(file))
    theirs = tiny_unet()
    theirs.load_lora_adapter(state, network_alphas=alphas, prefix="unet")
    torch.testing.assert_close(out(theirs), out(model), atol=ATOL32, rtol=0)


def test_a_lora_for_another_architecture_is_refused_listing_its_keys(tmp_path):
    from safetensors.torch import save_file

    foreign = {
        "lora_unet_input_blocks_1_1_proj_nope.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_input_blocks_1_1_proj_nope.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_input_blocks_1_1_proj_nope.alpha": torch.tensor(4.0),
    }
    save_file(foreign, tmp_path / "sdxl.safetensors")
    model = dt.DeltaModel(tiny_unet())
    with pytest.raises(dt.ConfigError, match=r"3 of 3 keys name no module .*lora_unet_input_blocks_1_1_proj_nope"):
        dt.load_lora(model, tmp_path / "sdxl.safetensors")
    assert not model.peft_config and torch.equal(out(model), out(tiny_unet()))
    # diffusers-format keys for another model: the same refusal
    save_file({"unet.mid_block.nope.lora_A.weight": torch.zeros(4, 32)}, tmp_path / "other.safetensors")
    with pytest.raises(dt.ConfigError, match="unet.mid_block.nope.lora_A.weight"):
        dt.load_lora(model, tmp_path / "other.safetensors")


def test_two_loras_combined_with_weights_are_the_weighted_sum_of_their_updates():
    from deltatune.layer import DeltaLayer

    model = lora(seed=0)
    torch.manual_seed(1)
    model.add_adapter("b", dt.LoraConfig(r=2, lora_alpha=5, target_modules=["to_q", "to_v"], init_lora_weights=False))
    weights = {"default": 0.7, "b": -1.3}
    dt.combine_loras(model, list(weights), list(weights.values()), "mix")
    # By hand: the base with sum_i w_i * delta_i added to every weight either adapter adapts.
    plain = tiny_unet()
    with torch.no_grad():
        for path, layer in model.get_base_model().named_modules():
            if isinstance(layer, DeltaLayer):
                update = sum(w * layer.delta_weight(n) for n, w in weights.items() if n in layer.adapter_names)
                torch.testing.assert_close(layer.delta_weight("mix"), update, atol=1e-6, rtol=0)
                plain.get_submodule(path).weight.add_(update)
    model.set_adapter("mix")
    torch.testing.assert_close(out(model), out(plain), atol=1e-5, rtol=0)
    model.merge_adapter()  # several LoRAs folded into the weights at once
    torch.testing.assert_close(out(model), out(plain), atol=1e-5, rtol=0)
    with pytest.raises(dt.ConfigError, match="one weight each"):
        dt.combine_loras(model, ["default", "b"], [1.0], "again")
    for bad in (float("nan"), float("inf"), "0.5", True):  # nan made every output nan; a string a TypeError
        with pytest.raises(dt.ConfigError, match=r"^combine_loras: the weight of 'b' must be a finite number, got"):
            dt.combine_loras(model, ["default", "b"], [1.0, bad], "again")
    assert "again" not in model.peft_config
    dt.combine_loras(model, "b", [2.0], "twice_b")  # one name as a string (read letter by letter: "1 adapters...")
    for layer in model.get_base_model().modules():
        if isinstance(layer, DeltaLayer) and "b" in layer.adapter_names:
            torch.testing.assert_close(layer.delta_weight("twice_b"), 2.0 * layer.delta_weight("b"), atol=1e-6, rtol=0)


def test_several_loras_with_weights_match_diffusers_set_adapters(tmp_path):
    """Two LoRAs (a diffusers file, a deltatune adapter folder) active at once with weights [0.7, 0.4]: the same UNet
    outputs as diffusers' load_lora_adapter + set_adapters, and as the two combined into one LoRA; weights 1 are the
    plain sum, and re-weighting a merged adapter is refused."""
    from deltatune.diffusion import load_loras, set_adapters

    dt.save_diffusers_lora(lora(seed=0, rank_pattern={"to_out.0": 2}), tmp_path / "a")
    torch.manual_seed(1)
    config = dt.LoraConfig(r=2, lora_alpha=5, target_modules=["to_q", "to_v"], init_lora_weights=False)
    b = dt.get_delta_model(tiny_unet(), config)
    dt.save_diffusers_lora(b, tmp_path / "b")
    b.save_pretrained(tmp_path / "b-run")  # deltatune's own adapter folder, as a t2i run holds it
    theirs = tiny_unet()
    for name in ("a", "b"):
        theirs.load_lora_adapter(str(tmp_path / name), prefix="unet", adapter_name=name, weight_name=WEIGHT)
    theirs.set_adapters(["a", "b"], weights=[0.7, 0.4])
    want = out(theirs)
    ours = load_loras(tiny_unet(), [tmp_path / "a", tmp_path / "b-run"], [0.7, 0.4], names=["a", "b"])
    assert ours.active_adapters == ["a", "b"]
    torch.testing.assert_close(out(ours), want, atol=ATOL32, rtol=0)
    dt.combine_loras(ours, ["a", "b"], [0.7, 0.4], "mix")  # the same weighted sum folded into one adapter
    set_adapters(ours, "mix")
    torch.testing.assert_close(out(ours), want, atol=ATOL32, rtol=0)
    set_adapters(ours, ["a", "b"])  # weights 1: the plain sum, which the weights above really changed
    theirs.set_adapters(["a", "b"], weights=[1.0, 1.0])
    torch.testing.assert_close(out(ours), out(theirs), atol=ATOL32, rtol=0)
    assert (out(ours) - want).abs().max() > ATOL32
    ours.merge_adapter(["a"])
    with pytest.raises(dt.ConfigError, match="a is merged into the weights"):
        set_adapters(ours, ["a", "b"], [0.5, 0.5])
    with pytest.raises(dt.ConfigError, match="one weight each"):
        set_adapters(ours, ["a", "b"], [0.5])
    with pytest.raises(dt.ConfigError, match=r"^set_adapters: the weight of 'b' must be a finite number, got nan$"):
        set_adapters(ours, ["b"], float("nan"))
    with pytest.raises(dt.ConfigError, match="'a' is given twice or taken"):
        load_loras(ours, [tmp_path / "a"], names=["a"])


def test_a_prefix_picks_its_components_keys_from_a_file_holding_several(tmp_path):
    """A file with unet. and text_encoder. keys (a t2i run that trained its text encoder writes one; so do diffusers'
    SD scripts), or kohya's lora_unet_ and lora_te_: load_lora(unet, prefix="unet") refused the other component's
    keys as "name no module of this UNet"."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    model = lora()
    torch.manual_seed(1)
    text_config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
    text_encoder = CLIPTextModel(text_config).eval()
    plain = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    encoder = dt.get_delta_model(
        text_encoder, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    dt.save_diffusers_lora(model, tmp_path / "both", text_encoder=encoder)
    assert {k.split(".")[0] for k in load_file(tmp_path / "both" / WEIGHT)} == {"unet", "text_encoder"}
    torch.testing.assert_close(out(dt.load_lora(tiny_unet(), tmp_path / "both", prefix="unet")), out(model))
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        want = encoder(input_ids=ids).last_hidden_state
        fresh = CLIPTextModel(text_config).eval()
        fresh.load_state_dict(plain)
        got = dt.load_lora(fresh, tmp_path / "both", prefix="text_encoder")(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, want)
    dt.save_kohya_lora(model, tmp_path / "unet.safetensors")
    dt.save_kohya_lora(encoder, tmp_path / "te.safetensors", prefix="text_encoder")
    both = {**load_file(tmp_path / "unet.safetensors"), **load_file(tmp_path / "te.safetensors")}
    save_file(both, tmp_path / "kohya.safetensors")
    torch.testing.assert_close(
        out(dt.load_lora(tiny_unet(), tmp_path / "kohya.safetensors", prefix="unet")), out(model)
    )
