"""Stage t2i with ``model.train_text_encoder``: the text encoder's LoRA trains with the UNet's, is saved beside it in
diffusers' layout (``unet.`` and ``text_encoder.`` keys, loaded back by diffusers into the same outputs), reloads for
``generate``; with the option off the text encoder is left exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from deltatune.cli import main  # noqa: E402
from deltatune.data import digits  # noqa: E402
from deltatune.model import DeltaModel  # noqa: E402
from deltatune.train import run as run_module  # noqa: E402
from deltatune.train import t2i  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
FAST = ["train.max_steps=2", "train.report_to=[none]", "train.batch_size=4", "train.logging_steps=1", "data.limit=8",
        "train.lr=1e-2"]  # fmt: skip
WEIGHTS = "pytorch_lora_weights.safetensors"
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A diffusers pipeline folder without a VAE: a 16x16 grayscale UNet, a DDPM scheduler, and a tiny CLIP text
    encoder (the kind of text encoder diffusers loads LoRAs into) with MiniLM's tokenizer."""
    pytest.importorskip("diffusers")
    from tiny import save_text_to_image_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    save_text_to_image_pipeline(root)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    digits.write(str(out))
    return out


def train(pipeline: Path, data: Path, out: Path, monkeypatch, *extra: str) -> t2i.T2IProcessor:
    """Two steps of the LoRA recipe through the CLI; returns the processor the run used (its text encoder)."""
    made = []
    real = run_module.load_processor
    monkeypatch.setattr(run_module, "load_processor", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    argv = ["train", str(ROOT / "recipes" / "digits-t2i-lora.yaml"), f"model.name_or_path={pipeline}",
            f"output.dir={out}", f"data.train={data / 't2i-adapt-train.jsonl'}",
            f"data.eval={data / 't2i-adapt-test.jsonl'}", *FAST, *extra]  # fmt: skip
    assert main(argv) == 0
    monkeypatch.undo()
    return made[0]


def plain_encoder(pipeline: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(pipeline / "text_encoder").eval()


def unet_output(unet, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return unet(x, torch.tensor([40]), encoder_hidden_states=states, encoder_attention_mask=mask).sample


def test_the_text_encoder_lora_trains_saves_for_diffusers_and_reloads(pipeline, data, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors import safe_open

    run = tmp_path / "run"
    processor = train(pipeline, data, run, monkeypatch, "model.train_text_encoder=true")
    assert (
        "text encoder " in (run / "report.md").read_text() and "its LoRA trains too" in (run / "report.md").read_text()
    )
    # only the LoRA trained: the text encoder's own weights are as loaded, its LoRA moved from B = 0
    trained = processor.text_encoder.get_base_model().state_dict()
    plain = plain_encoder(pipeline).state_dict()
    for name, value in trained.items():
        if ".lora_" not in name:
            assert torch.equal(value, plain[name.replace(".base_layer", "")]), name
    assert any(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B." in k)
    config = json.loads((run / "text_encoder_lora" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert list(run.glob("checkpoint-*/text_encoder_lora/adapter_model.safetensors"))  # checkpoints carry it too
    with safe_open(str(run / WEIGHTS), "pt") as fh:
        keys, meta = list(fh.keys()), json.loads(fh.metadata()["lora_adapter_metadata"])
    assert {k.split(".", 1)[0] for k in keys} == {"unet", "text_encoder"} and meta["text_encoder.r"] == 8
    # deltatune's reload (what generate draws with): the run's UNet LoRA and its text encoder LoRA
    delta, loaded = run_module.load_adapter_model(str(run))
    assert isinstance(loaded.text_encoder, DeltaModel)
    text, _ = loaded.condition([PROMPT], 16)
    assert "encoder_attention_mask" not in text  # a pipeline's UNet reads the padded context as diffusers feeds it
    ours = unet_output(delta.eval(), text["encoder_hidden_states"], None)
    # diffusers' own loading of the one file (what pipe.load_lora_weights does for the UNet and the text encoder)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(run), return_lora_metadata=True)
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    encoder = plain_encoder(pipeline)
    StableDiffusionPipeline.load_lora_into_text_encoder(
        state, alphas, encoder, prefix="text_encoder", metadata=metadata
    )
    # diffusers' conditioning (StableDiffusionPipeline.encode_prompt, train_text_to_image_lora.py): the prompt
    # padded to the length, no attention mask for the text encoder or the UNet
    enc = loaded.tokenizer(
        [PROMPT], padding="max_length", truncation=True, max_length=loaded.context, return_tensors="pt"
    )  # (the pipeline's: its context, whatever data.max_length cut)
    with torch.no_grad():
        states = encoder(enc["input_ids"])[0]
    torch.testing.assert_close(unet_output(unet, states, None), ours, atol=1e-5, rtol=0)
    with loaded.disable_adapter():  # and both LoRAs matter
        off, _ = loaded.condition([PROMPT], 16)
    assert (unet_output(delta, off["encoder_hidden_states"], None) - ours).abs().max() > 1e-5
    with delta.disable_adapter():
        assert (unet_output(delta, text["encoder_hidden_states"], None) - ours).abs().max() > 1e-5
    assert main(["generate", "--adapter", str(run), "--prompt", PROMPT, "--out", str(tmp_path / "d.png"),
                 "--steps", "2", "--compare"]) == 0  # fmt: skip
    # a merged base keeps the text encoder's LoRA beside the merged UNet, folded in when it loads
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    again, _ = t2i.T2IProcessor(str(tmp_path / "merged")).condition([PROMPT], 16)  # conditioned as its pipeline
    assert "encoder_attention_mask" not in again
    torch.testing.assert_close(again["encoder_hidden_states"], text["encoder_hidden_states"], atol=1e-5, rtol=0)


def test_with_the_option_off_the_text_encoder_stays_as_it_was(pipeline, data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    processor = train(pipeline, data, run, monkeypatch)
    assert not isinstance(processor.text_encoder, DeltaModel) and not processor.trains_text_encoder
    plain = plain_encoder(pipeline).state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in processor.text_encoder.state_dict().items())
    assert not (run / "text_encoder_lora").exists()
    from safetensors import safe_open

    with safe_open(str(run / WEIGHTS), "pt") as fh:  # a plain LoRA run still writes diffusers' file, UNet keys only
        assert {k.split(".", 1)[0] for k in list(fh.keys())} == {"unet"}


def test_the_text_encoder_lora_needs_a_lora_method(pipeline, data, tmp_path, capsys):
    argv = ["train", str(ROOT / "recipes" / "digits-t2i-lora.yaml"), f"model.name_or_path={pipeline}",
            f"output.dir={tmp_path / 'r'}", f"data.train={data / 't2i-adapt-train.jsonl'}", "data.eval=null",
            "method={name: ia3, target_modules: [to_k, to_v]}", "model.train_text_encoder=true", *FAST]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "model.train_text_encoder trains a LoRA" in err and "got ia3" in err and "Traceback" not in err, err


def test_a_resumed_run_trains_both_loras_as_an_uninterrupted_one(pipeline, data, tmp_path):
    """Checkpoints carry the text encoder's LoRA and its optimizer state: resumed from step 1, the second step gives
    both LoRAs exactly as the uninterrupted run (its gradients are zeroed after every step, as the UNet's)."""
    import shutil

    from safetensors.torch import load_file

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    argv = ["train", str(ROOT / "recipes" / "digits-t2i-lora.yaml"), f"model.name_or_path={pipeline}",
            f"data.train={data / 't2i-adapt-train.jsonl'}", "data.eval=null", "model.train_text_encoder=true",
            "train.save_steps=1", *FAST]  # fmt: skip
    assert main([*argv, f"output.dir={whole}"]) == 0
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoint-2")  # as if the run had stopped after its first checkpoint
    (resumed / "metrics.json").unlink()
    assert main([*argv, f"output.dir={resumed}", "--resume"]) == 0
    for file in ("adapter_model.safetensors", "text_encoder_lora/adapter_model.safetensors"):
        want, got = load_file(whole / file), load_file(resumed / file)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), file
