"""Probe 12 of the diffusion side against diffusers 0.42: kohya's DoRA ``dora_scale`` keys dropped as diffusers drops
them, ``train.prediction_type`` and DreamBooth's prior preservation replayed by hand against diffusers' scripts
(``train_text_to_image_lora.py``, ``train_dreambooth_lora.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusion.test_lora_files import out, tiny_unet  # noqa: E402
from tolerances import ATOL  # noqa: E402

import deltatune as dt  # noqa: E402

ATOL32 = ATOL[torch.float32]
KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{}_to_{}"


def _kohya_dora_file(tmp_path) -> str:
    """A kohya file on the tiny UNet's attention projections with DoRA's ``dora_scale`` beside each module."""
    from safetensors.torch import save_file

    g, tensors = torch.Generator().manual_seed(3), {}
    for attn in (1, 2):
        for proj, width in (("q", 32), ("k", 32), ("v", 32)):
            key = KEY.format(attn, proj)
            tensors[f"{key}.lora_down.weight"] = torch.randn(2, width, generator=g) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(32, 2, generator=g) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
            tensors[f"{key}.dora_scale"] = torch.rand(1, 32, generator=g) + 0.5
    file = str(tmp_path / "kohya_dora.safetensors")
    save_file(tensors, file)
    return file


def test_a_kohya_dora_file_loads_as_diffusers_with_one_warning_naming_the_dropped_keys(tmp_path):
    """HEAD refused the file ("DoRA or LyCORIS parts"); diffusers' load_lora_weights drops the dora_scale keys with a
    warning and loads the LoRA: deltatune now does the same, with diffusers' outputs."""
    file = _kohya_dora_file(tmp_path)
    with pytest.warns(
        UserWarning, match=r"6 dora_scale keys dropped \(lora_unet_down_blocks_0_.*attn1_to_k\.dora_scale"
    ):
        ours = dt.load_lora(tiny_unet(), file)
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(file)  # (its logger warns, and drops them)
    assert not any("dora" in k or "magnitude" in k for k in state)
    theirs = tiny_unet()
    theirs.load_lora_adapter(state, network_alphas=alphas, prefix="unet")
    diff = (out(ours) - out(theirs)).abs().max().item()
    assert diff <= ATOL32 and not torch.allclose(out(ours), out(tiny_unet()), atol=1e-3), diff


def test_a_kohya_dora_file_with_a_text_encoder_part_warns_once_in_generate_lora(tmp_path):
    """``generate --lora`` loads a file's parts one by one; its dropped keys are named once, not once per part."""
    from diffusion.test_t2i_interop_more import tiny_clip
    from safetensors.torch import load_file, save_file

    from deltatune.diffusion import load_pipeline_loras

    file = _kohya_dora_file(tmp_path)
    tensors = load_file(file)
    clip = tiny_clip()
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    width = 32  # (its hidden size)
    tensors |= {f"{key}.lora_down.weight": torch.ones(2, width), f"{key}.lora_up.weight": torch.ones(width, 2) * 0.1,
                f"{key}.dora_scale": torch.ones(1, width)}  # fmt: skip
    save_file(tensors, file)
    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, target_modules=["to_q"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline_loras(model, clip, "unet", [file], [1.0])
    dropped = [w for w in caught if "dora_scale keys dropped" in str(w.message)]
    assert len(dropped) == 1 and "7 dora_scale keys" in str(dropped[0].message), [str(w.message) for w in caught]
