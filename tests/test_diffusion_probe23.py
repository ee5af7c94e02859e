"""Probe 23 of the diffusion stage and its LoRA files: a LoRA file whose alpha is 0 or negative (kohya's .alpha, or
diffusers' metadata lora_alpha / alpha_pattern) is refused in one line naming the file and the module, the model
unchanged (LoraConfig's own check named neither: "alpha_pattern['down_blocks\\\\.0...'] must be in (0, inf)")."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffusion.test_lora_files import tiny_unet  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.config import ConfigError  # noqa: E402
from deltatune.diffusion import load_lora  # noqa: E402

KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{}"
PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{}"


def _kohya(file, alphas: dict[str, float]) -> str:
    from safetensors.torch import save_file

    g, tensors = torch.Generator().manual_seed(0), {}
    for proj, alpha in alphas.items():
        key = KOHYA.format(proj)
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, 32, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(32, 2, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(file))
    return str(file)


def _diffusers(file, meta: dict) -> str:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {f"unet.{PATH.format(p)}.lora_{x}.weight": torch.randn(*s, generator=g)
               for p in ("q", "k") for x, s in (("A", (2, 32)), ("B", (32, 2)))}  # fmt: skip
    save_file(tensors, str(file), {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in meta.items()})})
    return str(file)


@pytest.mark.parametrize(
    "make, module, value",
    [
        (lambda f: _kohya(f, {"q": 1.0, "k": 1.0, "v": 0.0}), "v", "0"),  # (an alpha_pattern entry)
        (lambda f: _kohya(f, {"q": -2.0}), "q", "-2"),  # (the config's lora_alpha)
        (lambda f: _diffusers(f, {"r": 2, "lora_alpha": 0}), "k", "0"),
        (lambda f: _diffusers(f, {"r": 2, "lora_alpha": 4, "alpha_pattern": {"attn1.to_q": -1}}), "q", "-1"),
    ],
)
def test_an_alpha_of_zero_or_below_is_refused_naming_the_file_and_module(tmp_path, make, module, value):
    file = make(tmp_path / "lora.safetensors")
    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, target_modules=["to_k"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        load_lora(model, file, "other", prefix="unet")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{file}: module {PATH.format(module)}'s alpha is {value} ("), (
        message
    )
    assert list(model.peft_config) == ["default"] and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_save_kohya_lora_of_sdxls_second_text_encoder_writes_lora_te2_keys_as_diffusers_loads_them(tmp_path):
    """kohya's SDXL files name the second text encoder's modules ``lora_te2_`` (what diffusers' kohya converter,
    A1111 and ComfyUI read, and ``load_lora(prefix="text_encoder_2")`` here); ``save_kohya_lora(prefix=
    "text_encoder_2")`` wrote ``lora_text_encoder_2_`` keys, which diffusers' ``load_lora_weights`` could not read
    and ``load_lora`` refused. The pooled embedding (the second encoder's) equals diffusers' after its load."""
    import copy

    from diffusion.test_sdxl_te2_10 import _outputs, tiny_sdxl
    from safetensors import safe_open

    from deltatune.diffusion import save_kohya_lora

    pipe = tiny_sdxl(tmp_path)
    torch.manual_seed(5)
    # (out_proj among them: diffusers tells its converted kohya text-encoder keys by a to_out_lora key, else refuses)
    config = dt.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "out_proj"], init_lora_weights=False)
    te2 = dt.get_delta_model(copy.deepcopy(pipe.text_encoder_2), config).eval()
    file = save_kohya_lora(te2, tmp_path / "te2.safetensors", prefix="text_encoder_2")
    with safe_open(file, "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("lora_te2_") for k in keys), keys[:3]

    theirs = copy.deepcopy(pipe)
    theirs.load_lora_weights(file)
    ours = copy.deepcopy(pipe)
    ours.text_encoder_2 = load_lora(ours.text_encoder_2, file, prefix="text_encoder_2").get_base_model()
    saved = copy.deepcopy(pipe)
    saved.text_encoder_2 = te2.get_base_model()
    base, want, got, trained = _outputs(pipe)[1], _outputs(theirs)[1], _outputs(ours)[1], _outputs(saved)[1]
    assert (want - base).abs().max() > 1e-2  # (diffusers loaded the second encoder's part)
    torch.testing.assert_close(want, trained, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, trained, atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_lora_initialised_from_the_base_is_not_written_as_a_file_for_the_original_base(tmp_path, init):
    """PiSSA and OLoRA leave the model's base weights as their residual W - s B0 A0; a diffusers or kohya file is
    loaded on the original base (diffusers' load_lora_weights, ``load_lora`` here), where the file's A, B drew
    0.29 (PiSSA) / 1.05 (OLoRA) off the model that wrote it. Both writers refuse it in one line naming the adapter,
    nothing written; a plain LoRA's file loads back equal (the control)."""
    from diffusion.test_lora_files import out

    from deltatune.diffusion import save_diffusers_lora, save_kohya_lora

    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, init_lora_weights=init)).eval()
    for write, where in ((save_diffusers_lora, tmp_path / "d"), (save_kohya_lora, tmp_path / "k.safetensors")):
        with pytest.raises(ConfigError, match=rf"^adapter 'default' was initialised from the base \({init}\)"):
            write(model, where)
        assert not where.exists()
    plain = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, init_lora_weights=False)).eval()
    back = load_lora(tiny_unet(), save_diffusers_lora(plain, tmp_path / "plain"))
    torch.testing.assert_close(out(back), out(plain), atol=1e-6, rtol=0)
    from deltatune.train import t2i

    assert t2i._plain_lora(plain) and not t2i._plain_lora(model)  # (a t2i run's save writes no file it would refuse)


def test_final_validation_copied_from_the_last_epochs_drawing_is_never_half_written(tmp_path, monkeypatch):
    """validation/final.png copied from the last epoch's drawing (same step, same weights) went straight to its name:
    a copy cut short (a full disk) left half a PNG there, where every drawing is written whole (t2i.save_png's
    atomic_write). Now the copy lands whole or not at all; the failure is the one line it was."""
    import shutil
    from types import SimpleNamespace

    from deltatune.train import t2i_validation

    folder = tmp_path / "validation"
    folder.mkdir()
    (folder / "epoch-1.png").write_bytes(b"\x89PNG" + bytes(range(200)))

    def cut_short(src, dst):
        with open(dst, "wb") as fh:
            fh.write(b"\x89PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", cut_short)
    v = t2i_validation.Validation({"prompt": "a", "count": 1, "every": 1, "seed": 0}, None, None)
    v.last = (3, str(folder / "epoch-1.png"))
    v.pending = (SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3), None, False)
    v.final()
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-1.png"]  # (no final.png, no temporary file left)
    monkeypatch.undo()
    v.pending = (SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3), None, False)
    v.final()
    assert (folder / "final.png").read_bytes() == (folder / "epoch-1.png").read_bytes()
