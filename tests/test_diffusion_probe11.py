"""Probe 11 of the diffusion side against diffusers 0.42: kohya's SDXL (SGM-named) LoRA files, diffusers' adapter
switching on a tiny UNet, and the t2i losses checked term by term against diffusers' training scripts."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import deltatune as dt  # noqa: E402
from deltatune.config import ConfigError  # noqa: E402
from deltatune.diffusion import WEIGHT_NAME, load_lora  # noqa: E402


def _sdxl_unet():
    """A tiny UNet shaped as SDXL's (layers_per_block 2; a plain first block, then cross-attention)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip


SGM = {  # kohya's SDXL key (SGM UNet names) -> the diffusers UNet's module
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_2_0_in_layers_2": "down_blocks.0.resnets.1.conv1",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_5_1_proj_in": "down_blocks.1.attentions.1.proj_in",
    "input_blocks_5_0_out_layers_3": "down_blocks.1.resnets.1.conv2",
    "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks_0_1_transformer_blocks_0_ff_net_2": "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "output_blocks_2_1_transformer_blocks_0_attn2_to_out_0": "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
    "time_embed_0": "time_embedding.linear_1",
    "out_2": "conv_out",
}  # fmt: skip


def _sgm_file(tmp_path, unet) -> str:
    from safetensors.torch import save_file

    g, tensors = torch.Generator().manual_seed(5), {}
    for sgm, path in SGM.items():
        w, r = unet.get_submodule(path).weight, 2
        down = (r, w.shape[1], *w.shape[2:]) if w.dim() == 4 else (r, w.shape[1])
        up = (w.shape[0], r, 1, 1) if w.dim() == 4 else (w.shape[0], r)
        tensors[f"lora_unet_{sgm}.lora_down.weight"] = torch.randn(down, generator=g) * 0.3
        tensors[f"lora_unet_{sgm}.lora_up.weight"] = torch.randn(up, generator=g) * 0.3
        tensors[f"lora_unet_{sgm}.alpha"] = torch.tensor(
            1.0
        )  # scale 1 / 2; one rank, one alpha: diffusers 0.42 drops per-module alphas
    save_file(tensors, tmp_path / "sdxl.safetensors")
    return str(tmp_path / "sdxl.safetensors")


def test_a_kohya_sdxl_file_with_sgm_block_names_loads_as_diffusers_loads_it(tmp_path):
    """kohya's SDXL LoRAs name the SGM UNet's blocks (``lora_unet_input_blocks_4_1_...``, ``middle_block``,
    ``output_blocks``), which diffusers renumbers by the UNet's layers_per_block; deltatune refused every such key
    as "a LoRA for another architecture"."""
    from diffusers import StableDiffusionXLPipeline

    file, g = _sgm_file(tmp_path, _sdxl_unet()), torch.Generator().manual_seed(1)
    x, c, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g), 10
    theirs = _sdxl_unet()
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(file, unet_config=theirs.config)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, theirs)
    mine = load_lora(_sdxl_unet(), file, prefix="unet")
    assert sorted(p.rpartition(".lora_A")[0] for p in mine.adapter_state_dict() if "lora_A" in p) == sorted(
        f"base_model.model.{p}" for p in SGM.values()
    )
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=c).sample
        assert (want - _sdxl_unet()(x, t, encoder_hidden_states=c).sample).abs().max() > 0.1
        diff = (mine(x, t, encoder_hidden_states=c).sample - want).abs().max()
    assert diff < 1e-5, diff


def test_an_sgm_block_the_unet_lacks_is_refused_naming_the_key(tmp_path):
    from safetensors.torch import save_file

    key = "lora_unet_middle_block_3_proj_in"
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 32), f"{key}.lora_up.weight": torch.zeros(32, 2)},
              tmp_path / "x.safetensors")  # fmt: skip
    unet = _sdxl_unet()
    with pytest.raises(ConfigError, match=rf"{key}\.lora_down\.weight: SGM middle block 3 does not exist"):
        load_lora(unet, tmp_path / "x.safetensors")
    assert not any("lora" in n for n, _ in unet.named_modules())


def _two_loras(tmp_path):
    """Two LoRAs on the SDXL-shaped UNet (attention projections and the resnets' conv1), saved in diffusers' format."""
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]
        config = dt.LoraConfig(r=2, lora_alpha=3 + i, target_modules=targets, init_lora_weights=False)
        dt.save_diffusers_lora(dt.get_delta_model(_sdxl_unet(), config), tmp_path / name)
    theirs = _sdxl_unet()
    for name in ("a", "b"):
        theirs.load_lora_adapter(str(tmp_path / name), prefix="unet", adapter_name=name, weight_name=WEIGHT_NAME)
    ours = dt.DeltaModel(_sdxl_unet())
    for name in ("a", "b"):
        load_lora(ours, tmp_path / name, name, prefix="unet")
    return ours, theirs


def _out(unet):
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=c).sample


BLOCKS = {"down": 0.3, "mid": [-0.5], "up": {"block_0": [1.5, 0.0, 0.7]}}


def test_per_block_weights_merge_disable_and_delete_match_diffusers(tmp_path):
    """diffusers' ``unet.set_adapters(names, [{"down": ..., "mid": ..., "up": {"block_0": [...]}}, w])`` weighs each
    block's transformers (and, as diffusers does, a block's resnets by its attention of the same index); deltatune
    refused a dict as "must be a finite number". Then fuse_lora / unfuse_lora (merge_adapter / unmerge_adapter),
    disable_lora (disable_adapter), delete_adapters (delete_adapter): diffusers' outputs."""
    from deltatune.diffusion import set_adapters

    ours, theirs = _two_loras(tmp_path)
    theirs.set_adapters(["a", "b"], [BLOCKS, 0.6])
    set_adapters(ours, ["a", "b"], [BLOCKS, 0.6])
    want = _out(theirs)
    theirs.set_adapters(["a", "b"], [1.0, 0.6])
    assert (want - _out(theirs)).abs().max() > 0.05  # the block weights changed the output
    assert (_out(ours) - want).abs().max() < 1e-5
    theirs.set_adapters(["a", "b"], [BLOCKS, 0.6])
    theirs.fuse_lora()
    ours.merge_adapter()
    fused = _out(theirs)
    assert (_out(ours) - fused).abs().max() < 1e-5
    theirs.unfuse_lora()
    ours.unmerge_adapter()
    assert (_out(ours) - want).abs().max() < 1e-5
    theirs.disable_lora()
    with ours.disable_adapter():
        assert (_out(ours) - _out(theirs)).abs().max() < 1e-6
    theirs.enable_lora()
    theirs.delete_adapters("a")
    ours.delete_adapter("a")
    theirs.set_adapters("b", 0.6)
    set_adapters(ours, "b", 0.6)
    assert (_out(ours) - _out(theirs)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"left": 1.0}, r"name 'left'; a UNet's blocks are down, mid and up"),
        ({"down": {"block_0": 1.0}}, r"down\.block_0 is no down block with attentions here \(block_1\)"),
        ({"up": {"block_0": [1.0, 2.0]}}, r"up\.block_0 takes 3 weights \(one per transformer\), got 2"),
        ({"mid": float("nan")}, r"the weight of 'mid_block\.attentions\.0' must be a finite number"),
    ],
)
def test_bad_block_weights_are_refused_in_one_line(tmp_path, weights, message):
    """diffusers ignores a block without attentions silently; deltatune names it, and changes nothing."""
    from deltatune.diffusion import set_adapters

    ours, _ = _two_loras(tmp_path)
    before = _out(ours)
    with pytest.raises(ConfigError, match=rf"^set_adapters: the weights of 'a'.*{message}"):
        set_adapters(ours, ["a", "b"], [weights, 1.0])
    assert torch.equal(_out(ours), before)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_ddpm_loss_is_train_text_to_image_lora_py_term_by_term(kind):
    """diffusers' train_text_to_image(_lora).py on fixed draws: noise e, offset noise (noise_offset times one N(0, 1)
    per image and channel), input perturbation (the input gets e + p * fresh N(0, I), the target names e), t, then
    min-SNR weights from diffusers.training_utils.compute_snr: min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from deltatune.train.t2i_noise import denoising_loss

    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=kind)
    unet, g = _sdxl_unet(), torch.Generator().manual_seed(4)
    x0, c = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 32, generator=g)
    inputs = {"pixel_values": x0, "encoder_hidden_states": c}
    opts = {"snr_gamma": 5.0, "noise_offset": 0.1, "input_perturbation": 0.2}
    with torch.no_grad():
        mine = denoising_loss(unet, scheduler, inputs, generator=torch.Generator().manual_seed(7), **opts)
        g = torch.Generator().manual_seed(7)  # the same draws, in the scripts' order
        noise = torch.randn(x0.shape, generator=g)
        noise = noise + 0.1 * torch.randn((3, 4, 1, 1), generator=g)
        new_noise = noise + 0.2 * torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 100, (3,), generator=g).long()
        abar = scheduler.alphas_cumprod[t].view(3, 1, 1, 1)
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * new_noise
        target = noise if kind == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        pred = unet(noisy, t, encoder_hidden_states=c).sample
        snr = compute_snr(scheduler, t)
        weights = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
        weights = weights / snr if kind == "epsilon" else weights / (snr + 1)
        want = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights
        plain = torch.nn.functional.mse_loss(pred, target)
    assert abs(float(mine) - float(want.mean())) < 1e-6, (float(mine), float(want.mean()))
    assert abs(float(want.mean()) - float(plain)) > 1e-3  # the weights mattered


def test_fuse_lora_with_a_lora_scale_equals_diffusers(tmp_path):
    """diffusers' ``fuse_lora(lora_scale=0.5)`` folds the active LoRAs in at half their (weighted) scale; deltatune's
    merge_adapter had no scale (a diffusers user had to re-weight by hand, per block too). unfuse restores the base
    and, as in diffusers, leaves the scale multiplied; a nan scale is refused with nothing changed."""
    from deltatune.diffusion import fuse_lora, set_adapters

    ours, theirs = _two_loras(tmp_path)
    theirs.set_adapters(["a", "b"], [BLOCKS, 0.6])
    set_adapters(ours, ["a", "b"], [BLOCKS, 0.6])
    before = _out(ours)
    with pytest.raises(ConfigError, match=r"^fuse_lora: the weight of 'lora_scale' must be a finite number, got nan"):
        fuse_lora(ours, float("nan"))
    assert torch.equal(_out(ours), before)
    theirs.fuse_lora(lora_scale=0.5)
    fuse_lora(ours, 0.5)
    want = _out(theirs)
    assert (want - before).abs().max() > 0.05
    assert (_out(ours) - want).abs().max() < 1e-5
    theirs.unfuse_lora()
    ours.unmerge_adapter()
    assert (_out(ours) - _out(theirs)).abs().max() < 1e-5
    with ours.disable_adapter():
        theirs.disable_lora()
        assert (_out(ours) - _out(theirs)).abs().max() < 1e-6


def test_a_diffusers_dora_file_loads_with_diffusers_outputs(tmp_path):
    """A DoRA trained with diffusers + peft (``unet.add_adapter(LoraConfig(use_dora=True))``, saved by
    ``save_lora_adapter``: ``lora_magnitude_vector`` keys) loads in diffusers; deltatune refused it as "DoRA or
    LyCORIS parts"."""
    from peft import LoraConfig

    theirs = _sdxl_unet()
    torch.manual_seed(3)
    targets = ["to_q", "to_v", "conv1"]
    theirs.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.3)
    theirs.save_lora_adapter(str(tmp_path / "dora"))
    want = _out(theirs)
    assert (want - _out(_sdxl_unet())).abs().max() > 0.05
    mine = load_lora(_sdxl_unet(), tmp_path / "dora")
    assert mine.peft_config["default"].use_dora
    assert (_out(mine) - want).abs().max() < 1e-5


def test_a_dora_saved_in_diffusers_format_loads_in_diffusers_with_the_same_outputs(tmp_path):
    """save_diffusers_lora refused a DoRA ("kohya and diffusers LoRA files hold plain LoRA updates"), though
    diffusers' load_lora_adapter reads DoRA (peft's lora_magnitude_vector keys); the round trip back is exact."""
    from deltatune.diffusion import save_diffusers_lora, save_kohya_lora

    torch.manual_seed(6)
    config = dt.LoraConfig(r=2, lora_alpha=3, target_modules=["to_k", "conv1"], use_dora=True, init_lora_weights=False)
    ours = dt.get_delta_model(_sdxl_unet(), config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.8)
    save_diffusers_lora(ours, tmp_path / "d")
    theirs = _sdxl_unet()
    theirs.load_lora_adapter(str(tmp_path / "d"), prefix="unet", weight_name=WEIGHT_NAME)
    want = _out(ours)
    assert (want - _out(_sdxl_unet())).abs().max() > 0.05
    assert (_out(theirs) - want).abs().max() < 1e-5
    assert torch.equal(_out(load_lora(_sdxl_unet(), tmp_path / "d")), want)
    with pytest.raises(ConfigError, match="adapter 'default' is DoRA; kohya's files"):
        save_kohya_lora(ours, tmp_path / "k.safetensors")
    from deltatune.train import t2i

    assert t2i._plain_lora(ours)  # a t2i run's folder gets the diffusers file too (it wrote none for a DoRA)


def test_set_adapters_and_fuse_lora_take_a_dora_as_diffusers_does(tmp_path):
    """diffusers' set_adapters (per block too) and fuse_lora(lora_scale) work on a DoRA; deltatune refused both
    ("adapter 'a' is DoRA; kohya's files and this call take plain LoRA updates only")."""
    from peft import LoraConfig

    from deltatune.diffusion import fuse_lora, set_adapters

    theirs = _sdxl_unet()
    torch.manual_seed(3)
    targets = ["to_q", "to_v", "conv1", "proj_in"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=True, init_lora_weights=False)
    theirs.add_adapter(config, adapter_name="a")
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.3)
    theirs.save_lora_adapter(str(tmp_path / "dora"), adapter_name="a")
    ours = load_lora(_sdxl_unet(), tmp_path / "dora", "a")
    full = _out(theirs)
    theirs.set_adapters(["a"], [BLOCKS])
    set_adapters(ours, ["a"], [BLOCKS])
    want = _out(theirs)
    assert (want - full).abs().max() > 0.05
    assert (_out(ours) - want).abs().max() < 1e-5
    theirs.fuse_lora(lora_scale=0.5)
    fuse_lora(ours, 0.5)
    want = _out(theirs)
    assert (want - full).abs().max() > 0.05
    assert (_out(ours) - want).abs().max() < 1e-5
    theirs.unfuse_lora()
    ours.unmerge_adapter()
    assert (_out(ours) - _out(theirs)).abs().max() < 1e-5


def test_a_t2i_dora_runs_folder_gets_the_diffusers_file_with_its_magnitudes(tmp_path):
    """The t2i processor's save_pretrained (what a run's folder gets) wrote no pytorch_lora_weights.safetensors for
    a DoRA before 30a0c25; now it holds the lora_magnitude_vector keys and loads in diffusers with the same outputs."""
    import json

    from diffusers import DDPMScheduler
    from safetensors.torch import load_file
    from tiny import tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    from deltatune.train import t2i

    root = tmp_path / "sd"
    _sdxl_unet().save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "scheduler")
    tok = tokenizer()
    tok.model_max_length = 32
    CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=32, pad_token_id=tok.pad_token_id)
    ).save_pretrained(root / "text_encoder")  # fmt: skip
    tok.save_pretrained(root / "tokenizer")
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", type(tok).__name__]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", **components}))
    processor = t2i.T2IProcessor(str(root))
    torch.manual_seed(6)
    config = dt.LoraConfig(r=2, lora_alpha=3, target_modules=["to_k", "conv1"], use_dora=True, init_lora_weights=False)
    processor.denoiser = dt.get_delta_model(t2i.load_denoiser(str(root)), config).eval()
    with torch.no_grad():
        for name, p in processor.denoiser.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.8)
    processor.save_pretrained(str(tmp_path / "run"))
    keys = list(load_file(tmp_path / "run" / WEIGHT_NAME))
    assert any(k.startswith("unet.") and "lora_magnitude_vector" in k for k in keys), keys[:4]
    theirs = _sdxl_unet()
    theirs.load_lora_adapter(str(tmp_path / "run"), prefix="unet", weight_name=WEIGHT_NAME)
    want = _out(processor.denoiser)
    assert (want - _out(_sdxl_unet())).abs().max() > 0.05
    assert (_out(theirs) - want).abs().max() < 1e-5
