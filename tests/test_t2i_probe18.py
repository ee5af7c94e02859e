"""Probe 18 of stage t2i and the diffusion LoRA files against diffusers 0.42.1: model.gradient_checkpointing with
model.train_text_encoder checkpoints the text encoder too, as the LoRA scripts' ``text_encoder.gradient_checkpointing_
enable()``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from pathlib import Path  # noqa: E402

from test_diffusion_probe12 import data, pipeline  # noqa: E402,F401  (fixtures)

from deltatune.train import t2i  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _checkpointing(module: torch.nn.Module) -> list[bool]:
    return [m.gradient_checkpointing for m in module.modules() if hasattr(m, "gradient_checkpointing")]


PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def run(pipeline, data, tmp_path_factory):  # noqa: F811
    """One epoch of 2 steps with model.train_text_encoder, a LoRA dropout of 0.5, model.gradient_checkpointing and a
    validation image: (the run folder, what each step saw: the checkpointing flags of the text encoder and UNet)."""
    from deltatune.train import run as run_module
    from deltatune.train.config import load_recipe

    out, seen = tmp_path_factory.mktemp("run"), []
    compute = t2i.T2ITrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append((_checkpointing(self.processor.text_encoder), _checkpointing(model.get_base_model())))
        return compute(self, model, inputs, *args, **kwargs)

    cfg = load_recipe(str(ROOT / "recipes" / "digits-t2i-lora.yaml"),
                      [f"model.name_or_path={pipeline}", f"data.train={data / 't2i-adapt-train.jsonl'}",
                       "data.eval=null", "data.limit=4", "train.epochs=1", "train.max_steps=-1", "train.batch_size=2",
                       "train.warmup_ratio=0", "train.lr=1e-1", "train.report_to=[none]", f"output.dir={out}",
                       "train.seed=3", f"train.validation_prompt={PROMPT}", "train.num_validation_images=1",
                       "model.train_text_encoder=true", "method.lora_dropout=0.5",
                       "model.gradient_checkpointing=true"])  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(t2i.T2ITrainer, "compute_loss", spy)
        run_module.train(cfg)
    return out, seen


def test_gradient_checkpointing_reaches_a_training_text_encoder(run):
    """train_text_to_image_lora.py / train_dreambooth_lora.py: ``if args.gradient_checkpointing:
    unet.enable_gradient_checkpointing(); if args.train_text_encoder: text_encoder.gradient_checkpointing_enable()``.
    deltatune checkpointed the UNet alone (the Trainer's model): the text encoder's encoder layers kept every
    activation. Seen at each step: every checkpointable module of both."""
    _, seen = run
    assert len(seen) == 2
    for encoder, unet in seen:
        assert encoder and all(encoder) and unet and all(unet)


def test_validation_with_a_training_text_encoder_draws_as_the_saved_run_draws_in_diffusers(pipeline, run):  # noqa: F811
    """model.train_text_encoder with a LoRA dropout: the validation image of the run's one epoch equals diffusers'
    StableDiffusionPipeline with the run's pytorch_lora_weights loaded (DDIM, 30 steps, guidance 7.5, the seeded
    latents), to a PNG's rounding, as the module docstring promises for ``deltatune generate``. deltatune drew with
    the text encoder left in training mode by the last step (its LoRA's dropout on): another image."""
    import numpy as np
    from diffusers import DDIMScheduler
    from PIL import Image
    from tiny import sd_pipeline

    out, _ = run
    pipe = sd_pipeline(pipeline, out)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        drawn = pipe([PROMPT], num_inference_steps=30, guidance_scale=7.5, latents=latents, output_type="latent")
    theirs = (((drawn.images.float() + 1) / 2).clamp(0, 1)[0, 0] * 255).round()
    mine = torch.tensor(np.asarray(Image.open(out / "validation" / "epoch-1.png")), dtype=torch.float32)
    assert (mine - theirs).abs().max().item() <= 1.0, (mine - theirs).abs().max().item()


def _unet():
    """A tiny UNet on 3-channel 16x16 inputs, cross-attending to 32-wide text states."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip


Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "lora_unet_" + Q.replace(".", "_")
PAIR = {f"unet.{Q}.lora_A.weight": torch.ones(4, 16), f"unet.{Q}.lora_B.weight": torch.ones(16, 4)}


@pytest.mark.parametrize(
    ("tensors", "meta", "message"),
    [(PAIR, '{"unet.r": 4, "unet.lora_alpha": 8', "its metadata's lora_adapter_metadata is not JSON (Expecting"),
     (PAIR, "[4, 8]", "its metadata's lora_adapter_metadata is a JSON array, not an object"),
     (PAIR, '{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": [2]}',
      "its metadata's alpha_pattern is a JSON array, not an object"),
     (PAIR, '{"unet.r": 4, "unet.lora_alpha": 1' + "0" * 400 + "}", f"module {Q}'s alpha is inf (the metadata's"),
     (PAIR, '{"unet.r": 4, "unet.lora_alpha": "8"}', f"module {Q}'s alpha is '8' (the metadata's lora_alpha"),
     ({f"{K}.lora_down.weight": torch.ones(4, 16), f"{K}.lora_up.weight": torch.ones(16, 4),
       f"{K}.alpha": torch.tensor([4.0, 8.0])}, None, f"module {Q}'s .alpha holds 2 numbers; an alpha is one")],
)  # fmt: skip
def test_a_lora_file_with_a_bad_config_is_one_line_naming_the_file_and_changes_nothing(
    tmp_path, tensors, meta, message
):
    """diffusers' load_lora_adapter fails on metadata that is not JSON (json.loads: a traceback); deltatune read such
    a file as one without metadata, alpha = rank: every update scaled by 1 where the file says lora_alpha / r = 2.
    A metadata list, an alpha_pattern list or a kohya .alpha of two numbers gave AttributeError / ValueError
    tracebacks naming neither the file nor the key; a string alpha is refused as a nan one is."""
    from safetensors.torch import save_file

    from deltatune.config import ConfigError
    from deltatune.diffusion import load_lora

    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), {"lora_adapter_metadata": meta} if meta is not None else None)
    if meta is not None and not meta.endswith("}"):  # (diffusers fails on it too: json.loads, metadata.items)
        with pytest.raises((ValueError, AttributeError)):
            _unet().load_lora_adapter(str(tmp_path), prefix="unet", weight_name=path.name)
    unet = _unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ConfigError) as e:
        load_lora(unet, path)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)
    assert "\n" not in str(e.value)
    assert unet.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_a_lora_files_null_metadata_loads_as_none_as_diffusers_reads_it(tmp_path):
    """diffusers reads a lora_adapter_metadata of JSON null as no metadata (the config from the tensors: alpha = r,
    scale 1); it was refused (review of t2i probe 18). The model then computes as diffusers' with the same file."""
    from safetensors.torch import save_file

    from deltatune.diffusion import load_lora

    path = tmp_path / "pytorch_lora_weights.safetensors"
    torch.manual_seed(2)
    save_file({k: torch.randn(v.shape) for k, v in PAIR.items()}, str(path), {"lora_adapter_metadata": "null"})
    theirs, ours = _unet(), _unet()
    theirs.load_lora_adapter(str(tmp_path), prefix="unet", weight_name=path.name)
    load_lora(ours, path)
    torch.manual_seed(1)
    x, t, text = torch.randn(1, 3, 16, 16), torch.tensor([10]), torch.randn(1, 4, 32)
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=text).sample
        got = ours(x, t, encoder_hidden_states=text).sample
        base = _unet()(x, t, encoder_hidden_states=text).sample
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
