"""Stage t2i on a tiny SD3 transformer (MM-DiT) with flow matching: the loss by hand against diffusers' SD3 recipe,
LoRA on its default targets loading in diffusers with the same outputs, two steps of the stage through the CLI, and
the drawing loop against Euler steps by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import deltatune as dt  # noqa: E402
from deltatune.cli import main  # noqa: E402
from deltatune.data import digits  # noqa: E402
from deltatune.train import t2i  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
FAST = ["train.max_steps=2", "train.report_to=[none]", "train.batch_size=4", "train.logging_steps=1", "data.limit=8"]
JOINT = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def tiny_sd3():
    """16x16 grayscale in 2x2 patches, two joint blocks, text states 32 wide (the tiny BERT's)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=1, out_channels=1, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A bare transformer folder (no scheduler config: flow matching is the default) naming a tiny BERT encoder."""
    from tiny import save_tiny

    root = tmp_path_factory.mktemp("sd3")
    encoder = save_tiny(root / "bert", "bert", "seq_cls")
    tiny_sd3().save_pretrained(root / "sd3")
    (root / "sd3" / "t2i.json").write_text(json.dumps({"text_encoder": encoder}))
    return root / "sd3"


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.rand(3, 1, 16, 16, generator=g) * 2 - 1,
        "encoder_hidden_states": torch.randn(3, 4, 32, generator=g),
        "pooled_projections": torch.randn(3, 32, generator=g),
    }


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_flow_matching_loss_by_hand(sampling):
    """x_t = (1 - sigma) x0 + sigma e, target e - x0, with diffusers' SD3 sampling of u (its own function) and
    sigma = (1000 - i) / 1000 at i = floor(1000 u), the unshifted schedule's sigma, worked out here."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    model, batch = tiny_sd3(), inputs()
    loss = t2i.flow_matching_loss(
        model, FlowMatchEulerDiscreteScheduler(), batch, generator=torch.Generator().manual_seed(7),
        sigma_sampling=sampling,
    )  # fmt: skip
    g = torch.Generator().manual_seed(7)
    x0 = batch["pixel_values"]
    noise = torch.randn(x0.shape, generator=g)
    scheme = "none" if sampling == "uniform" else "logit_normal"
    u = compute_density_for_timestep_sampling(scheme, 3, logit_mean=0.0, logit_std=1.0, generator=g)
    sigma = (1000 - (u * 1000).long()).float() / 1000
    s = sigma.view(3, 1, 1, 1)
    with torch.no_grad():
        pred = model(
            hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000,
            encoder_hidden_states=batch["encoder_hidden_states"], pooled_projections=batch["pooled_projections"],
        ).sample  # fmt: skip
    torch.testing.assert_close(loss, ((pred - (noise - x0)) ** 2).mean(), atol=1e-6, rtol=1e-5)


def test_lora_on_the_joint_attention_loads_in_diffusers_with_the_same_outputs(tmp_path):
    def out(model):
        with torch.no_grad():
            return t2i.predict(model, inputs()["pixel_values"], torch.tensor([900.0, 500.0, 20.0]), inputs())

    torch.manual_seed(1)
    model = dt.get_delta_model(tiny_sd3(), dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)).eval()
    assert model.peft_config["default"].target_modules == JOINT  # diffusers' SD3 LoRA targets, the text stream's too
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A")}
    assert {"add_q_proj", "to_add_out", "to_q"} <= adapted
    dt.save_diffusers_lora(model, tmp_path, prefix="transformer")
    theirs = tiny_sd3()
    theirs.load_lora_adapter(str(tmp_path), prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(out(theirs), out(model), atol=1e-6, rtol=0)
    assert (out(theirs) - out(tiny_sd3())).abs().max() > 1e-4


def test_the_stage_trains_an_sd3_transformer_two_steps_and_draws(base, tmp_path):
    from deltatune.train.run import load_adapter_model

    data = tmp_path / "digits"
    digits.write(str(data))
    run = tmp_path / "run"
    argv = ["train", str(ROOT / "recipes" / "digits-t2i-lora.yaml"), f"model.name_or_path={base}", f"output.dir={run}",
            f"data.train={data / 't2i-adapt-train.jsonl'}", "data.eval=null", "method.target_modules=null",
            "train.sigma_sampling=logit_normal", *FAST]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((run / "metrics.json").read_text())["train_steps"] == 2
    assert "loss: flow matching, logit_normal sigmas" in (run / "report.md").read_text()
    assert json.loads((run / "adapter_config.json").read_text())["target_modules"] == JOINT
    assert json.loads((run / "scheduler_config.json").read_text())["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    png = tmp_path / "d.png"
    argv = ["generate", "--adapter", str(run), "--prompt", "a handwritten digit seven", "--out", str(png), "--steps",
            "2", "--compare"]  # fmt: skip
    assert main(argv) == 0
    from PIL import Image

    assert Image.open(png).size == (32, 16)  # base | adapter
    # the drawing loop against Euler steps by hand: x <- x + (sigma_next - sigma) * v, from the same seeded noise
    delta, processor = load_adapter_model(str(run))
    delta.eval()
    drawn = t2i.sample(delta, processor, ["a digit"], steps=3, seed=4, max_length=16)
    text, _ = processor.condition(["a digit"], 16)
    x = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(4))
    sigmas = torch.linspace(1.0, 1 / 1000, 3).tolist() + [0.0]  # the unshifted schedule over 3 steps
    with torch.no_grad():
        for s, s_next in zip(sigmas, sigmas[1:]):
            x = x + (s_next - s) * t2i.predict(delta, x, torch.tensor([s * 1000]), text)
    torch.testing.assert_close(drawn, ((x + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)


def test_min_snr_weighting_is_refused_on_flow_matching_in_one_line(base, tmp_path, capsys):
    data = tmp_path / "digits"
    digits.write(str(data))
    argv = ["train", str(ROOT / "recipes" / "digits-t2i-lora.yaml"), f"model.name_or_path={base}",
            f"output.dir={tmp_path / 'run'}", f"data.train={data / 't2i-adapt-train.jsonl'}", "data.eval=null",
            "method.target_modules=null", "train.snr_gamma=5", *FAST]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()  # after transformers' "Loading weights" bar of the text encoder
    assert "train.snr_gamma weighs the DDPM loss; this base trains with flow matching" in err.splitlines()[-1]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_text_encoder_of_another_width_is_refused_in_one_line(base, tmp_path):
    with pytest.raises(dt.ConfigError, match="joint_attention_dim is 32, but the text encoder 'minilm' gives 384"):
        t2i.T2IProcessor(str(base), text_encoder="minilm")


def test_a_captions_conditioning_does_not_depend_on_the_captions_beside_it(base):
    """The SD3 transformer reads every text position (no mask): captions padded to the longest of their split gave
    the same caption another conditioning (and another output, 0.0095 off) in training, eval and generate."""
    processor = t2i.T2IProcessor(str(base))
    alone, _ = processor.condition(["a digit"], 16)
    beside, _ = processor.condition(["a digit", "a handwritten digit seven with thin strokes"], 16)
    assert alone["encoder_hidden_states"].shape[1] == 16
    for key in alone:
        torch.testing.assert_close(beside[key][:1], alone[key], atol=0, rtol=0)
