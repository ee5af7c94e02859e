"""Probe 10 of the diffusion LoRA files: an SDXL LoRA that trained both text encoders (diffusers' ``text_encoder.``
and ``text_encoder_2.`` keys, kohya's ``lora_te1_`` and ``lora_te2_``) loads as ``pipe.load_lora_weights`` loads it
into a tiny StableDiffusionXLPipeline built from configs: the same prompt embeddings, pooled embeddings and UNet
output. ``load_pipeline_loras`` (what ``generate --lora`` calls) left the second encoder's part out."""

from __future__ import annotations

import copy
import json
import string

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import deltatune as dt  # noqa: E402
from deltatune.config import ConfigError  # noqa: E402
from deltatune.diffusion import load_pipeline_loras  # noqa: E402

PROMPT = "a cat on a mat"
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=16)


def tiny_sdxl(folder):
    """SDXL's pipeline at toy size: two CLIP encoders (the second with a projection: the pooled embedding), a UNet
    that reads text_embeds and time_ids beside the text states (cross-attention width 32 + 32), no VAE."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
        norm_num_groups=4,
    ).eval()  # fmt: skip
    config = dict(
        vocab_size=60, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32,
    )  # fmt: skip
    te1 = CLIPTextModel(CLIPTextConfig(**config)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    tok = _tokenizer(folder)
    return diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(), force_zeros_for_empty_prompt=False,
    )  # fmt: skip


def _lora_tensors(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {module path: (A, B)}} with random A and B, on every module a LoRA of that component targets."""
    g = torch.Generator().manual_seed(3)
    parts = {}
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS), ("text_encoder_2", TE_TARGETS)):
        model = getattr(pipe, component)
        parts[component] = {
            path: (torch.randn(2, m.in_features, generator=g) * 0.3, torch.randn(m.out_features, 2, generator=g) * 0.3)
            for path, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(path.endswith("." + t) for t in targets)
        }
    return parts


def _diffusers_file(folder, parts) -> str:
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    alphas = {"unet": 4.0, "text_encoder": 2.0, "text_encoder_2": 8.0}  # a scale of its own per component
    for component, modules in parts.items():
        for path, (a, b) in modules.items():
            tensors[f"{component}.{path}.lora_A.weight"] = a
            tensors[f"{component}.{path}.lora_B.weight"] = b
        meta |= {f"{component}.r": 2, f"{component}.lora_alpha": alphas[component]}
        meta[f"{component}.target_modules"] = sorted(modules)
    folder.mkdir()
    save_file(tensors, folder / "pytorch_lora_weights.safetensors", {"lora_adapter_metadata": json.dumps(meta)})
    return str(folder)


def _kohya_file(file, parts) -> str:
    from safetensors.torch import save_file

    heads = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    alphas = {"unet": 1.0, "text_encoder": 3.0, "text_encoder_2": 0.5}
    tensors = {}
    for component, modules in parts.items():
        for path, (a, b) in modules.items():
            path = path if component != "text_encoder" else f"text_model.{path}"  # kohya writes transformers 4's
            key = f"{heads[component]}_{path.replace('.', '_')}"
            tensors |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b}
            tensors[f"{key}.alpha"] = torch.tensor(alphas[component])
    save_file(tensors, file)
    return str(file)


def _outputs(pipe) -> tuple[torch.Tensor, ...]:
    """SDXL's prompt embeddings, pooled embeddings and one UNet output on them."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, 8, 8, generator=g)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        out = pipe.unet(
            x, torch.tensor([500]), encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample  # fmt: skip
    return embeds, pooled, out


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    pipe = tiny_sdxl(root)
    parts = _lora_tensors(pipe)
    assert all(len(parts[c]) >= 4 for c in parts), {c: len(m) for c, m in parts.items()}
    files = {
        "diffusers": _diffusers_file(root / "diffusers", parts),
        "kohya": _kohya_file(root / "k.safetensors", parts),
    }
    return pipe, files


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_an_sdxl_lora_with_both_text_encoders_parts_loads_as_load_lora_weights(sdxl, kind):
    """Both text encoders' parts, the UNet's too, weighted 0.6 beside the run's own LoRA (weight 0.7; B = 0 here, so it
    adds nothing): prompt_embeds, pooled and the UNet's output equal diffusers' load_lora_weights + set_adapters.
    Before, the second encoder's part was left out: pooled (the second encoder's alone) differed."""
    pipe, files = sdxl
    theirs = copy.deepcopy(pipe)
    theirs.load_lora_weights(files[kind], adapter_name="style")
    theirs.set_adapters(["style"], [0.6])
    want = _outputs(theirs)
    base = _outputs(pipe)

    ours = copy.deepcopy(pipe)
    unet = dt.get_delta_model(ours.unet, dt.LoraConfig(r=2, target_modules=["to_q"]))  # the run's own: B = 0
    te1, te2 = load_pipeline_loras(unet, ours.text_encoder, "unet", [files[kind]], [0.6], 0.7, ours.text_encoder_2)
    assert isinstance(te2, dt.DeltaModel) and isinstance(te1, dt.DeltaModel)
    ours.unet, ours.text_encoder, ours.text_encoder_2 = (
        unet.get_base_model(),
        te1.get_base_model(),
        te2.get_base_model(),
    )
    got = _outputs(ours)
    for name, g, w, b in zip(("prompt_embeds", "pooled", "unet"), got, want, base):
        assert (w - b).abs().max() > 1e-2, name  # the LoRA changes each of them
        torch.testing.assert_close(g, w, atol=0, rtol=0, msg=name)  # bit-exact


def test_a_second_encoders_part_without_a_second_encoder_is_refused_in_one_line(sdxl):
    """On a pipeline with one text encoder (what the t2i stage trains), a file's text_encoder_2 part has nowhere to
    go: refused, naming it, with nothing loaded (it was dropped without a word)."""
    pipe, files = sdxl
    ours = copy.deepcopy(pipe)
    unet = dt.get_delta_model(ours.unet, dt.LoraConfig(r=2, target_modules=["to_q"]))
    te1 = ours.text_encoder
    for kind in ("diffusers", "kohya"):
        with pytest.raises(ConfigError, match=r"text_encoder_2.*second text encoder") as err:
            load_pipeline_loras(unet, te1, "unet", [files[kind]], [0.6], 1.0)
        assert "\n" not in str(err.value)
        assert list(unet.peft_config) == ["default"] and not isinstance(te1, dt.DeltaModel)
        assert not any("lora" in n for n, _ in te1.named_modules())
