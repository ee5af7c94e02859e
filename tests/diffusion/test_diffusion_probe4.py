"""Stage t2i against diffusers' StableDiffusionPipeline: a drawing with the run's LoRA loaded by
``pipe.load_lora_weights`` (same seed, steps, guidance, DDIM), and images that are not square (diffusers' scripts
cut them at the centre)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import deltatune as dt  # noqa: E402
from deltatune.train import t2i  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline folder: an RGB VAE (16x16 <-> 4x8x8, scaling factor 0.5), a UNet on its
    latents, a tiny CLIP text encoder whose tokenizer says its 32-token context, and a DDPM scheduler with its
    defaults (steps_offset 0, clip_sample true: what StableDiffusionPipeline overrides)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from tiny import latent_unet, tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        scaling_factor=0.5,
    ).save_pretrained(root / "vae")  # fmt: skip
    latent_unet().save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "scheduler")
    tok = tokenizer()
    tok.model_max_length = 32
    CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=32, pad_token_id=tok.pad_token_id)
    ).save_pretrained(root / "text_encoder")  # fmt: skip
    tok.save_pretrained(root / "tokenizer")
    components = {
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", type(tok).__name__], "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }  # fmt: skip
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", **components}))
    return root


@pytest.mark.parametrize("guidance", [3.0, 0.5])
def test_a_drawing_equals_diffusers_pipeline_with_the_lora_loaded(pipeline, tmp_path, guidance):
    """StableDiffusionPipeline sets its scheduler's steps_offset to 1 and clip_sample to false, and guides only
    above 1; deltatune drew with the scheduler's own config (images 0.012 off at guidance 1) and guided at 0.5
    too (0.02 off)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    processor = t2i.T2IProcessor(str(pipeline))
    torch.manual_seed(1)
    model = dt.get_delta_model(t2i.load_denoiser(str(pipeline)), dt.LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    dt.save_diffusers_lora(model, tmp_path / "lora")
    mine = t2i.sample(model.eval(), processor, ["a digit seven"], steps=3, guidance=guidance, seed=0, max_length=77)

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=3, guidance_scale=guidance, output_type="pt")
    theirs = pipe("a digit seven", generator=torch.Generator().manual_seed(0), **run).images
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_an_image_that_is_not_square_is_cut_at_the_centre_not_squeezed(pipeline):
    """diffusers' scripts resize the shorter side and crop at the centre (Resize + CenterCrop); deltatune squeezed
    a 64x32 image into 16x16, so the black bands at its ends (outside the centred square) came in at both sides."""
    from PIL import Image

    processor = t2i.T2IProcessor(str(pipeline))
    img = Image.new("RGB", (64, 32), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 8, 32))  # black bands 8 pixels wide at both ends, away from the centred square
    img.paste((0, 0, 0), (56, 0, 64, 32))
    pixels = processor.pixels(img)
    assert pixels.shape == (3, 16, 16)
    torch.testing.assert_close(pixels, torch.ones(3, 16, 16), atol=0, rtol=0)
    square = Image.new("RGB", (24, 24), (10, 200, 30))  # a square one is resized alone, as before
    torch.testing.assert_close(processor.pixels(square), processor.pixels(square.resize((16, 16), Image.BICUBIC)))


def test_a_clip_text_encoders_kohya_file_has_kohya_names_and_loads_back(tmp_path):
    """kohya's text-encoder keys are transformers 4's names, ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``
    (sd-scripts writes them, A1111 and ComfyUI match them); on transformers 5's CLIPTextModel, which has no
    ``text_model`` level, deltatune wrote ``lora_te_encoder_layers_0_...``, which those tools match to nothing."""
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from deltatune.diffusion import load_lora, save_kohya_lora

    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    model = dt.get_delta_model(CLIPTextModel(config), dt.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    file = save_kohya_lora(model, tmp_path / "te.safetensors", prefix="text_encoder")
    with safe_open(file, "pt") as fh:
        keys = sorted(fh.keys())
    stem = "lora_te_text_model_encoder_layers_{}_self_attn_q_proj"
    assert keys == sorted(f"{stem.format(i)}.{leaf}" for i in (0, 1) for leaf in ("alpha", "lora_down.weight",
                                                                                   "lora_up.weight"))  # fmt: skip
    torch.manual_seed(0)  # the same base weights
    loaded = load_lora(CLIPTextModel(config), file, prefix="text_encoder").eval()
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids)[0], model.eval()(input_ids=ids)[0], atol=1e-6, rtol=0)


def _unet():
    from tiny import latent_unet

    torch.manual_seed(0)
    return latent_unet().eval()


def test_the_attention_processor_layout_loads_as_diffusers_loads_it(tmp_path):
    """diffusers' LoRA files from before 0.21 (``...attn1.processor.to_q_lora.down.weight``, ``to_out_lora`` for
    ``to_out.0``; ``self_attn.to_q_lora`` for a CLIP text encoder's ``q_proj``) load in diffusers; deltatune refused
    all 64 keys of such a UNet file as "a LoRA for another architecture"."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from deltatune.diffusion import load_lora

    unet, g, tensors = _unet(), torch.Generator().manual_seed(3), {}
    for name, m in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for proj, layer in (("to_q", m.to_q), ("to_k", m.to_k), ("to_v", m.to_v), ("to_out", m.to_out[0])):
                key = f"unet.{name}.processor.{proj}_lora"
                tensors[f"{key}.down.weight"] = torch.randn(4, layer.in_features, generator=g) * 0.3
                tensors[f"{key}.up.weight"] = torch.randn(layer.out_features, 4, generator=g) * 0.3
    save_file(tensors, tmp_path / "old.safetensors")
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "old.safetensors"))
    theirs = _unet()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, theirs)
    mine = load_lora(_unet(), tmp_path / "old.safetensors", prefix="unet")
    with torch.no_grad():
        want = theirs(x, 10, encoder_hidden_states=c).sample
        assert (want - unet(x, 10, encoder_hidden_states=c).sample).abs().max() > 0.1
        torch.testing.assert_close(mine(x, 10, encoder_hidden_states=c).sample, want, atol=1e-5, rtol=0)
    # a text encoder's: the same update as the lora_A / lora_B layout of the same tensors
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
    old, new = {}, {}
    for proj, name in (("to_q", "q_proj"), ("to_out", "out_proj")):
        a, b = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
        old[f"text_encoder.text_model.encoder.layers.0.self_attn.{proj}_lora.down.weight"] = a
        old[f"text_encoder.text_model.encoder.layers.0.self_attn.{proj}_lora.up.weight"] = b
        new[f"text_encoder.encoder.layers.0.self_attn.{name}.lora_A.weight"] = a
        new[f"text_encoder.encoder.layers.0.self_attn.{name}.lora_B.weight"] = b
    save_file(old, tmp_path / "te_old.safetensors")
    save_file(new, tmp_path / "te_new.safetensors")
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    outputs = []
    for file in ("te_old", "te_new"):
        torch.manual_seed(0)
        model = load_lora(CLIPTextModel(config), tmp_path / f"{file}.safetensors", prefix="text_encoder").eval()
        with torch.no_grad():
            outputs.append(model(input_ids=ids)[0])
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)


# (.dora_scale: dropped with a warning, as diffusers drops it: test_diffusion_probe12)
@pytest.mark.parametrize("extra", [".hada_w1_a", ".diff"])
def test_a_dora_or_lycoris_file_is_refused_as_such_not_as_another_architecture(tmp_path, extra):
    """A kohya file for this very UNet with DoRA's dora_scale (or LyCORIS' LoHa parts, or full differences) was
    refused as "a LoRA for another architecture or component?"; the modules are there, the update is not a LoRA's."""
    from safetensors.torch import save_file

    from deltatune.config import ConfigError
    from deltatune.diffusion import load_lora

    unet, key = _unet(), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{key}.lora_down.weight": torch.zeros(2, 16), f"{key}.lora_up.weight": torch.zeros(16, 2),
               f"{key}{extra}": torch.ones(16, 1)}  # fmt: skip
    save_file(tensors, tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match=rf"keys such as {key}\{extra} hold DoRA or LyCORIS .* plain LoRA"):
        load_lora(unet, tmp_path / "x.safetensors")
    assert not any("lora" in n for n, _ in unet.named_modules())  # left unchanged


def test_a_pipelines_captions_are_padded_to_the_context_however_short_data_max_length(pipeline):
    """diffusers' pipelines pad every prompt to the text encoder's context (32 here); under data.max_length 16
    deltatune padded to 16, so the UNet trained on 16 text states and the pipeline gives it 32. A caption over
    16 tokens is still cut there (and counted)."""
    processor = t2i.T2IProcessor(str(pipeline))
    long = "a handwritten digit seven drawn with a thick black pen on a sheet of white paper, slightly tilted"
    text, cut = processor.condition(["a digit seven", long], 16)
    assert cut == 1 and text["encoder_hidden_states"].shape == (2, 32, 32)
    tok = processor.tokenizer
    ids = tok(["a digit seven"], padding="max_length", max_length=tok.model_max_length, truncation=True)
    with torch.no_grad():  # StableDiffusionPipeline.encode_prompt: padded to the context, no attention mask
        want = processor.text_encoder(torch.tensor(ids["input_ids"]))[0]
    torch.testing.assert_close(text["encoder_hidden_states"][:1], want, atol=1e-6, rtol=0)
    ids, mask, _ = processor.tokenize([long], 16)
    assert ids.shape == (1, 32) and int(mask.sum()) == 16 and ids[0, 15] == tok.sep_token_id
